-- The built-in agent's tools (factory.agents.tools): confinement to the worktree
-- (acceptance 2: a table of escape attempts, all refused, nothing outside touched),
-- the scrubbed command environment (acceptance 5), and each tool's normal behaviour.
-- The "worktree" is a plain directory; writes are never aimed at real system files
-- (tests may run as root), only at a canary directory next to the worktree.
local tools = require "factory.agents.tools"
local fs = require "factory.core.fs"
local env = require "factory.core.env"
local proc = require "factory.proc"

local base, wt, box

local function sh(cmd, cwd)
  local r = assert(proc.run{ argv = { "/bin/sh", "-c", cmd }, cwd = cwd or wt })
  assert.equal(0, r.code, cmd .. ": " .. tostring(r.stderr))
end

-- base/canary.txt and base/outside/ sit next to the worktree base/wt.
before_each(function()
  base = os.tmpname()
  os.remove(base)
  assert(fs.mkdir_p(base .. "/wt/a/b"))
  assert(fs.mkdir_p(base .. "/outside"))
  base = assert(fs.realpath(base))
  wt = base .. "/wt"
  assert(fs.write(base .. "/canary.txt", "CANARY"))
  assert(fs.write(base .. "/outside/secret.txt", "SECRET"))
  assert(fs.write(wt .. "/hello.txt", "hello world\nsecond line\n"))
  assert(fs.write(wt .. "/a/b/deep.txt", "deep\n"))
  box = assert(tools.new(wt, { secrets = { "FACTORY_TEST_SECRET" }, timeout = 5, max_output = 4096 }))
end)

after_each(function()
  assert(fs.remove(base, { recursive = true }))
end)

local function outside_state()
  return { fs.read(base .. "/canary.txt"), table.concat(fs.list(base), ","),
           table.concat(fs.list(base .. "/outside"), ","), fs.read(base .. "/outside/secret.txt") }
end

local LONG_NAME = string.rep("n", 300)
local LONG_PATH = string.rep("d/", 2100) .. "x"

-- { name, setup shell command (in the worktree) or nil, tool, args... }
local ESCAPES = {
  { "read ../x", nil, "read_file", "../canary.txt" },
  { "read /etc/passwd", nil, "read_file", "/etc/passwd" },
  { "read absolute canary", nil, "read_file", "@BASE/canary.txt" },
  { "read a/../../x", nil, "read_file", "a/../../canary.txt" },
  { "read a/b/../../../x", nil, "read_file", "a/b/../../../canary.txt" },
  { "read absolute root/../x", nil, "read_file", "@WT/../canary.txt" },
  { "read NUL byte", nil, "read_file", "hello.txt\0../../canary.txt" },
  { "read very long name", nil, "read_file", LONG_NAME },
  { "read very long path", nil, "read_file", LONG_PATH },
  { "read symlink to /etc", "ln -s /etc etc", "read_file", "etc/passwd" },
  { "read symlink to file outside", "ln -s ../canary.txt c", "read_file", "c" },
  { "read symlink made by run_command", "@RUN ln -s /etc/passwd pw", "read_file", "pw" },
  { "read through symlinked dir component", "ln -s ../outside a/out", "read_file", "a/out/secret.txt" },
  { "read through chained symlinks", "ln -s ../outside o1 && ln -s o1 o2", "read_file", "o2/secret.txt" },
  { "write ../x", nil, "write_file", "../canary.txt", "PWNED" },
  { "write absolute outside", nil, "write_file", "@BASE/new.txt", "PWNED" },
  { "write a/../../x", nil, "write_file", "a/../../new.txt", "PWNED" },
  { "write NUL byte", nil, "write_file", "x\0y", "PWNED" },
  { "write very long name", nil, "write_file", LONG_NAME, "PWNED" },
  { "write through symlinked dir", "ln -s ../outside out", "write_file", "out/secret.txt", "PWNED" },
  { "write new file under symlinked dir", "ln -s ../outside out", "write_file", "out/sub/new.txt", "PWNED" },
  { "write symlink to outside file", "ln -s ../canary.txt c", "write_file", "c", "PWNED" },
  { "write dangling symlink outside", "ln -s ../dangling.txt d", "write_file", "d", "PWNED" },
  { "write dangling symlink in dir component", "ln -s ../newdir nd", "write_file", "nd/f.txt", "PWNED" },
  { "edit ../x", nil, "edit_file", "../canary.txt", "CANARY", "PWNED" },
  { "edit symlink to outside", "ln -s ../canary.txt c", "edit_file", "c", "CANARY", "PWNED" },
  { "edit through symlinked dir", "ln -s ../outside out", "edit_file", "out/secret.txt", "SECRET", "PWNED" },
  { "edit a/../../x", nil, "edit_file", "a/../../canary.txt", "CANARY", "PWNED" },
  { "list ..", nil, "list_dir", ".." },
  { "list /etc", nil, "list_dir", "/etc" },
  { "list symlink to /etc", "ln -s /etc etc", "list_dir", "etc" },
  { "list symlinked dir made by run_command", "@RUN ln -s ../outside out", "list_dir", "out" },
  { "grep ..", nil, "grep", "CANARY", ".." },
  { "grep /etc", nil, "grep", "root", "/etc/passwd" },
  { "grep symlinked dir", "ln -s ../outside out", "grep", "SECRET", "out" },
  { "grep a/../../x", nil, "grep", "CANARY", "a/../../canary.txt" },
  { "grep NUL byte", nil, "grep", "x", "a\0b" },
}

describe("escape attempts (acceptance 2)", function()
  it("has at least 20 cases", function() assert.truthy(#ESCAPES >= 20, #ESCAPES .. " cases") end)

  for _, case in ipairs(ESCAPES) do
    local name, setup, tool = case[1], case[2], case[3]
    it("refuses: " .. name, function()
      if setup then
        if setup:sub(1, 5) == "@RUN " then
          local r = assert(box:run_command(setup:sub(6)))
          assert.equal(0, r.code)
        else
          sh(setup)
        end
      end
      local before = outside_state()
      local args = {}
      for k = 4, #case do
        args[#args + 1] = type(case[k]) == "string" and case[k]:gsub("^@BASE", base):gsub("^@WT", wt) or case[k]
      end
      local res, err, code = box[tool](box, unpack(args))
      assert.is_nil(res, name .. " returned " .. tostring(res))
      assert.equal("EPATH", code, name .. ": " .. tostring(err))
      assert.matches("^EPATH: .+: .+", err)
      assert.same(before, outside_state())
      assert.falsy(fs.exists(base .. "/new.txt"))
      assert.falsy(fs.exists(base .. "/dangling.txt"))
      assert.falsy(fs.exists(base .. "/newdir"))
      assert.falsy(fs.exists(base .. "/outside/sub"))
    end)
  end

  it("names the reason in the error", function()
    local _, err = box:read_file("../x")
    assert.equal("EPATH: ../x: '..' leaves the worktree", err)
    _, err = box:read_file("/etc/passwd")
    assert.matches("^EPATH: /etc/passwd: absolute path outside the worktree", err)
    _, err = box:read_file("a\0b")
    assert.equal("EPATH: a\\0b: path contains a NUL byte", err)
    _, err = box:read_file(LONG_NAME)
    assert.matches("component is longer than 255 bytes", err)
    sh("ln -s /etc etc")
    _, err = box:read_file("etc/passwd")
    assert.equal("EPATH: etc/passwd: symbolic link etc leads outside the worktree", err)
  end)

  it("allows symlinks and .. that stay inside", function()
    sh("ln -s a/b inner && ln -s hello.txt h")
    assert.equal("deep\n", box:read_file("inner/deep.txt"))
    assert.equal("hello world\nsecond line\n", box:read_file("h"))
    assert.equal("deep\n", box:read_file("a/../a/b/./deep.txt"))
    assert.equal("deep\n", box:read_file(wt .. "/a/b/deep.txt"))
    assert.truthy(box:write_file("inner/new.txt", "x"))
    assert.equal("x", fs.read(wt .. "/a/b/new.txt"))
  end)
end)

describe("a directory swapped for a link between the check and the use", function()
  -- resolve() checks a/b while it is a directory; a process left running by
  -- run_command then replaces it with a link to the outside before the file is
  -- opened. The kernel (openat2 RESOLVE_BENEATH) refuses what the check let through.
  local function racing(tool, ...)
    local resolve = box.resolve
    box.resolve = function(self, p)
      local full, rel, code = resolve(self, p)
      sh("rm -rf a/b && ln -s " .. base .. "/outside a/b")
      return full, rel, code
    end
    local res, err, code = box[tool](box, ...)
    box.resolve = resolve
    return res, err, code
  end

  it("a read is refused", function()
    local res, err, code = racing("read_file", "a/b/secret.txt")
    assert.is_nil(res)
    assert.equal("EPATH", code)
    assert.equal("EPATH: a/b/secret.txt: leads outside the worktree (refused by the kernel)", err)
  end)

  it("a write is refused and nothing outside is touched", function()
    local before = outside_state()
    local res, _, code = racing("write_file", "a/b/secret.txt", "PWNED")
    assert.is_nil(res)
    assert.equal("EPATH", code)
    res, _, code = racing("write_file", "a/b/new/dir/file.txt", "PWNED")
    assert.is_nil(res)
    assert.equal("EPATH", code)
    assert.same(before, outside_state())
  end)
end)

describe("run_command environment (acceptance 5)", function()
  local NAMES = { "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FACTORY_TEST_SECRET" }
  local saved = {}
  before_each(function()
    for _, n in ipairs(NAMES) do saved[n] = env.get(n); env.set(n, "sk-leak-" .. n) end
    env.set("FACTORY_TEST_HARMLESS", "visible-to-parent")
  end)
  after_each(function()
    for _, n in ipairs(NAMES) do env.set(n, saved[n]) end
    env.set("FACTORY_TEST_HARMLESS", nil)
  end)

  it("passes no API key, no configured secret, nothing unlisted", function()
    local r = assert(box:run_command({ "env" }))
    assert.equal(0, r.code)
    for _, n in ipairs(NAMES) do
      assert.falsy(r.stdout:find(n, 1, true), n .. " reached the child")
      assert.falsy(r.stdout:find("sk-leak-", 1, true))
    end
    assert.falsy(r.stdout:find("FACTORY_TEST_HARMLESS", 1, true))
    local home = ("\n" .. r.stdout):match("\nHOME=([^\n]*)")
    assert.truthy(home and home ~= "" and not (home .. "/"):find(wt .. "/", 1, true), home)
    assert.matches("\nPATH=", "\n" .. r.stdout)
  end)

  it("gives commands a home outside the worktree, so what tools keep there is not committed", function()
    -- npm writes a debug log into ~/.npm/_logs on every run, Go its module cache into ~/go.
    local r = assert(box:run_command("mkdir -p \"$HOME/.npm/_logs\" && echo log > \"$HOME/.npm/_logs/debug.log\""
      .. " && echo \"$HOME\""))
    assert.equal(0, r.code, r.stderr)
    local home = r.stdout:gsub("\n$", "")
    assert.equal("log\n", fs.read(home .. "/.npm/_logs/debug.log"))
    assert.is_nil(fs.stat(wt .. "/.npm"))
    local own = tools.new(wt, { home = wt .. "/../elsewhere" })
    assert.equal(wt .. "/../elsewhere\n", assert(own:run_command("echo \"$HOME\"")).stdout)
  end)

  it("scrubs a shell command string too", function()
    local r = assert(box:run_command("echo \"[$OPENAI_API_KEY][$ANTHROPIC_API_KEY][$FACTORY_TEST_SECRET]\""))
    assert.equal("[][][]\n", r.stdout)
  end)

  it("never passes a secret even when it is a passed name", function()
    local b = assert(tools.new(wt, { secrets = { "LANG" } }))
    local r = assert(b:run_command({ "env" }))
    assert.falsy(r.stdout:find("\nLANG=", 1, true) or r.stdout:find("^LANG="))
  end)
end)

describe("run_command", function()
  it("runs in the worktree and reports code and output", function()
    local r = assert(box:run_command("pwd; echo err >&2; exit 3"))
    assert.equal(3, r.code)
    assert.equal(wt .. "\n", r.stdout)
    assert.equal("err\n", r.stderr)
  end)

  it("kills the process group at the timeout", function()
    local b = assert(tools.new(wt, { timeout = 0.3 }))
    local r = assert(b:run_command("sleep 30 & echo $! > child.pid; wait"))
    assert.truthy(r.timed_out)
    local pid = fs.read(wt .. "/child.pid"):match("%d+")
    -- Gone, or a zombie waiting for its reaper: either way no longer running.
    local st = assert(proc.run{ argv = { "/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do "
      .. "s=$(awk '{print $3}' /proc/" .. pid .. "/stat 2>/dev/null); [ -z \"$s\" -o \"$s\" = Z ] && exit 0; "
      .. "sleep 0.1; done; echo $s; exit 1" } })
    assert.equal(0, st.code, "the background child " .. pid .. " survived the timeout: " .. tostring(st.stdout))
  end)

  it("caps the output, keeping its end, where a test run's verdict is", function()
    local r = assert(box:run_command("head -c 100000 /dev/zero | tr '\\0' x; echo; echo '3 tests FAILED'"))
    assert.truthy(r.truncated)
    local marker = "\n[... 95920 bytes cut here ...]\n"
    assert.equal(("x"):rep(1024) .. marker, r.stdout:sub(1, 1024 + #marker))
    assert.matches("x\n3 tests FAILED\n$", r.stdout)
    assert.equal(4096 + #marker, #r.stdout)
    r = assert(box:run_command("echo short"))
    assert.falsy(r.truncated)
    assert.equal("short\n", r.stdout)
  end)

  it("refuses a bad command", function()
    local _, _, code = box:run_command({})
    assert.equal("EINVAL", code)
    _, _, code = box:run_command("a\0b")
    assert.equal("EINVAL", code)
  end)
end)

describe("file tools", function()
  it("does not read a binary file into the model's context, and says how to look at it", function()
    assert(fs.write(wt .. "/logo.png", "\137PNG\r\n\26\n\0\0\0\rIHDR" .. ("\255"):rep(5000)))
    local out, err, code = box:read_file("logo.png")
    assert.is_nil(out)
    assert.equal("EBINARY", code)
    assert.equal("EBINARY: logo.png is a binary file (5016 bytes): not shown; inspect it with run_command (file, od,"
      .. " or the project's own tools)", err)
    -- a Latin-1 text file is read (the router makes the request UTF-8)
    assert(fs.write(wt .. "/old.c", "/* caf\233 */\n"))
    assert.equal("/* caf\233 */\n", box:read_file("old.c"))
  end)

  it("reads, writes (creating directories), and counts changes", function()
    assert.equal("hello world\nsecond line\n", box:read_file("hello.txt"))
    assert.equal("wrote 3 bytes to new/dir/f.txt", box:write_file("new/dir/f.txt", "abc"))
    assert.equal("abc", fs.read(wt .. "/new/dir/f.txt"))
    assert.equal(1, box.changes)
    local _, _, code = box:read_file("missing.txt")
    assert.equal("ENOENT", code)
    _, _, code = box:read_file("a")
    assert.equal("EISDIR", code)
    _, _, code = box:write_file("a", "x")
    assert.equal("EISDIR", code)
    _, _, code = box:read_file("hello.txt/x")
    assert.equal("EPATH", code)
  end)

  it("edits one exact occurrence", function()
    assert.equal("edited hello.txt", box:edit_file("hello.txt", "world", "there"))
    assert.equal("hello there\nsecond line\n", fs.read(wt .. "/hello.txt"))
    assert.equal(1, box.changes)
  end)

  it("says when the text is missing or not unique", function()
    local _, err, code = box:edit_file("hello.txt", "absent", "x")
    assert.equal("ENOTFOUND", code)
    assert.matches("not found in hello%.txt", err)
    _, err, code = box:edit_file("hello.txt", "e", "x")
    assert.equal("ENOTUNIQUE", code)
    assert.matches("occurs 3 times in hello%.txt", err)
    assert.equal("hello world\nsecond line\n", fs.read(wt .. "/hello.txt"))
    assert.equal(0, box.changes)
  end)

  it("edits a file with CRLF line ends given text with LF ends, keeping the file's ends", function()
    assert(fs.write(wt .. "/dos.c", "int add(int a, int b)\r\n{\r\n\treturn a - b;\r\n}\r\n"))
    assert.equal("edited dos.c", box:edit_file("dos.c", "{\n\treturn a - b;\n}", "{\n\treturn a + b;\n}"))
    assert.equal("int add(int a, int b)\r\n{\r\n\treturn a + b;\r\n}\r\n", fs.read(wt .. "/dos.c"))
  end)

  it("shows the file's own lines when the text to replace differs from them only in whitespace", function()
    assert(fs.write(wt .. "/calc.c", "int add(int a, int b)\n{\n\treturn a - b;\n}\n\nint sub(int a, int b)\n{\n"
      .. "\treturn a + b;\n}\n"))
    -- Spaces for the file's tab, and the first line given only in part.
    local _, err, code = box:edit_file("calc.c", "sub(int a, int b)\n{\n    return a + b;\n}", "x")
    assert.equal("ENOTFOUND", code)
    assert.equal("ENOTFOUND: the text to replace was not found in calc.c as given, but line 6 on matches it except"
      .. " for whitespace (indentation, tabs, line ends); give old exactly as the file has it:\nint sub(int a, int b)\n"
      .. "{\n\treturn a + b;\n}", err)
    -- Twice but for whitespace, or nowhere: no lines to show.
    _, err = box:edit_file("calc.c", "{\n    return", "x")
    assert.equal("ENOTFOUND: the text to replace was not found in calc.c (it must match exactly, whitespace included)",
      err)
    assert.equal(0, box.changes)
  end)

  it("lists a directory, at most 1,000 entries of it", function()
    sh("ln -s hello.txt h")
    assert.same({ "a/", "h@", "hello.txt" }, box:list_dir("."))
    assert(fs.mkdir_p(wt .. "/many"))
    for i = 1, 1005 do assert(fs.write(("%s/many/f%04d"):format(wt, i), "")) end
    local list = box:list_dir("many")
    assert.equal(1001, #list)
    assert.equal("[5 more entries not shown: 1005 in all]", list[1001])
    assert.same({ "b/" }, box:list_dir("a"))
  end)

  it("greps with extended regular expressions and fixed strings, bounded", function()
    assert.equal("hello.txt:2:second line", box:grep("^sec"))
    assert.equal("hello.txt:1:hello world\nhello.txt:2:second line", box:grep("^(hello|second) ", "hello.txt"))
    assert.equal("a/b/deep.txt:1:deep", box:grep("deep", "a"))
    assert.equal("no matches", box:grep("%d+"))
    assert.equal("no matches", box:grep("[0-9]+"))
    assert.equal("hello.txt:1:hello world", box:grep("o w", "hello.txt", true))
    assert.equal("no matches", box:grep("(hello|", "hello.txt", true))
    local out, err, code = box:grep("[unclosed")
    assert.equal(nil, out)
    assert.equal("EINVAL", code)
    assert.matches("bad regular expression '%[unclosed'", err)
    _, err, code = box:grep("(a)\\1")
    assert.equal("EINVAL", code)
    assert.matches("back%-references", err)
    local lines = {}
    for i = 1, 500 do lines[i] = "match " .. i end
    assert(fs.write(wt .. "/many.txt", table.concat(lines, "\n")))
    out = box:grep("match", "many.txt")
    assert.matches("%[output cut at 200 matches", out)
  end)

  it("skips in a git worktree what git ignores, whose matches would crowd out the source's", function()
    local git = require "factory.git"
    local repo = assert(git.init(wt))
    assert(fs.write(wt .. "/.gitignore", "node_modules/\n*.log\n"))
    assert(repo:add_all())
    assert(repo:commit("base", { author = { name = "a", email = "a@b" } }))
    assert.same({ true, true, false, false }, repo:ignored({ "node_modules/", "x.log", "src/", "hello.txt" }))
    repo:close()
    assert(fs.mkdir_p(wt .. "/node_modules/lib"))
    for i = 1, 300 do assert(fs.write(wt .. "/node_modules/lib/f" .. i .. ".js", "var needle" .. i .. ";\n")) end
    assert(fs.write(wt .. "/debug.log", "needle in a log\n"))
    assert(fs.mkdir_p(wt .. "/src"))
    assert(fs.write(wt .. "/src/main.c", "int needle;\n"))
    assert.equal("src/main.c:1:int needle;", box:grep("needle"))
    -- a place inside what is ignored, named explicitly, is searched
    assert.equal("node_modules/lib/f7.js:1:var needle7;", box:grep("needle7;", "node_modules"))
    assert.equal("debug.log:1:needle in a log", box:grep("needle", "debug.log"))
    -- outside a git repository nothing is skipped
    local plain = assert(tools.new(wt .. "/node_modules"))
    assert.equal("lib/f7.js:1:var needle7;", plain:grep("needle7;"))
  end)

  it("dispatches named arguments and records finish", function()
    assert.equal("hello world\nsecond line\n", box:call("read_file", { path = "hello.txt" }))
    local _, _, code = box:call("teleport", {})
    assert.equal("ENOTOOL", code)
    assert.equal("finished", box:call("finish", { status = "COMPLETE", reasoning = "done" }))
    assert.equal("COMPLETE", box.result.status)
  end)
end)
