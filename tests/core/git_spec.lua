-- factory.git (libgit2): repositories, worktrees per objective, status/diff checked
-- against the `git` CLI (used here only as an oracle), commits, worktree clean-up,
-- fetch/push with a local bare remote, error messages, and many fibers and
-- processes at once.
local git = require "factory.git"
local fs = require "factory.core.fs"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local host = require "factory.core.host"

local TOOLS = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../tools/"

local root

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(fs.mkdir_p(p))
  return p
end

-- The git CLI as an oracle: stdout of a successful run.
local function cli(dir, ...)
  local res = assert(proc.run{
    argv = { "git", ... }, cwd = dir,
    env = { PATH = os.getenv("PATH") or "/usr/bin:/bin", HOME = root, GIT_CONFIG_NOSYSTEM = "1" },
  })
  assert.equal(0, res.code, "git " .. table.concat({ ... }, " ") .. ": " .. (res.stderr or ""))
  return res.stdout
end

local ME = { name = "Ada Agent", email = "ada@factory.test" }
local BOT = { name = "Factory Bot", email = "bot@factory.test" }

-- A repository on branch main with one commit of two files.
local function new_repo()
  local dir = root .. "/repo"
  local repo = assert(git.init(dir))
  assert(fs.write(dir .. "/a.txt", "one\ntwo\nthree\n"))
  assert(fs.mkdir_p(dir .. "/src"))
  assert(fs.write(dir .. "/src/b.c", "int b;\n"))
  assert(repo:add_all())
  local oid = assert(repo:commit("initial", { author = ME }))
  return repo, dir, oid
end

before_each(function() root = tmpdir() end)
after_each(function() assert(fs.remove(root, { recursive = true })) end)

describe("git repositories", function()
  it("init, commit and head agree with the CLI, author and committer included", function()
    local repo, dir, oid = new_repo()
    assert.matches("^%x+$", oid)
    assert.equal(40, #oid)
    assert.same({ branch = "main", oid = oid }, repo:head())
    assert.equal(oid .. "\n", cli(dir, "rev-parse", "HEAD"))
    assert.equal("main\n", cli(dir, "branch", "--show-current"))
    assert.equal("Ada Agent <ada@factory.test>|Ada Agent <ada@factory.test>|initial\n",
      cli(dir, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%B"):gsub("\n+$", "\n"))
    assert(fs.write(dir .. "/a.txt", "changed\n"))
    assert(repo:add({ "a.txt" }))
    local two = assert(repo:commit("second\n\nbody", { author = ME, committer = BOT }))
    assert.equal("Ada Agent <ada@factory.test>|Factory Bot <bot@factory.test>|" .. oid .. "\n",
      cli(dir, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%P"))
    assert.equal(two .. "\n", cli(dir, "rev-parse", "main"))
    assert.equal("", cli(dir, "status", "--porcelain"))
    repo:close()
    repo:close() -- idempotent
    assert.error_matches(function() repo:head() end, "closed")
  end)

  it("an unborn repository has a branch and no oid; bare init works", function()
    local repo = assert(git.init(root .. "/empty"))
    assert.same({ branch = "main" }, repo:head())
    local bare = assert(git.init(root .. "/bare.git", { bare = true }))
    assert.equal("true\n", cli(root .. "/bare.git", "rev-parse", "--is-bare-repository"))
    bare:close()
    repo:close()
  end)

  it("status, diff and diff stats agree with the CLI", function()
    local repo, dir = new_repo()
    assert.same({}, repo:status())
    assert(fs.write(dir .. "/a.txt", "one\n2\nthree\nfour\n"))   -- modified, unstaged
    assert(fs.write(dir .. "/new.txt", "fresh\n"))               -- untracked
    assert(fs.mkdir_p(dir .. "/d/e"))
    assert(fs.write(dir .. "/d/e/deep.txt", "x\n"))              -- untracked, nested
    assert(fs.remove(dir .. "/src/b.c"))                         -- deleted
    assert(fs.write(dir .. "/staged.txt", "s\n"))
    assert(repo:add({ "staged.txt" }))                            -- added to the index
    local want = {}
    for line in cli(dir, "status", "--porcelain", "-uall"):gmatch("[^\n]+") do
      want[#want + 1] = { status = line:sub(1, 2), path = line:sub(4) }
    end
    table.sort(want, function(x, y) return x.path < y.path end)
    assert.same(want, repo:status())

    local stats = assert(repo:diff_stats())
    local per, ins, del = {}, 0, 0
    for line in cli(dir, "diff", "--numstat", "HEAD"):gmatch("[^\n]+") do
      local i, d, path = line:match("^(%d+)\t(%d+)\t(.+)$")
      per[#per + 1] = { path = path, insertions = tonumber(i), deletions = tonumber(d) }
      ins, del = ins + tonumber(i), del + tonumber(d)
    end
    assert.same(per, stats.per_file)
    assert.equal(#per, stats.files)
    assert.equal(ins, stats.insertions)
    assert.equal(del, stats.deletions)
    assert.equal(3, stats.files) -- a.txt, src/b.c, staged.txt; untracked files are not in a diff

    assert.equal(cli(dir, "diff", "--no-color", "HEAD"), assert(repo:diff()))
    assert.equal(cli(dir, "diff", "--no-color", "main"), assert(repo:diff("main")))
    repo:close()
  end)

  it("add_all stages new, changed and deleted files like git add -A", function()
    local repo, dir = new_repo()
    assert(fs.write(dir .. "/a.txt", "other\n"))
    assert(fs.write(dir .. "/n.txt", "n\n"))
    assert(fs.remove(dir .. "/src/b.c"))
    assert(repo:add_all())
    assert.equal("M  a.txt\nA  n.txt\nD  src/b.c\n", cli(dir, "status", "--porcelain"))
    assert.same({ { path = "a.txt", status = "M " }, { path = "n.txt", status = "A " },
      { path = "src/b.c", status = "D " } }, repo:status())
    repo:close()
  end)
end)

describe("git worktrees", function()
  it("a worktree per objective, each on its own branch from the latest base", function()
    local repo, dir = new_repo()
    assert(fs.write(dir .. "/a.txt", "newer\n"))
    assert(repo:add_all())
    local latest = assert(repo:commit("latest", { author = ME }))
    for i = 1, 3 do
      local name = "obj-" .. i
      assert.equal(true, repo:worktree_add(name, root .. "/wt/" .. name, { base = "main" }))
      local wt = assert(git.open(root .. "/wt/" .. name))
      assert.same({ branch = name, oid = latest }, wt:head())
      assert.equal("newer\n", fs.read(root .. "/wt/" .. name .. "/a.txt"))
      assert.same({}, wt:status())
      -- work in the worktree and commit on its branch
      assert(fs.write(root .. "/wt/" .. name .. "/f" .. i, "work " .. i .. "\n"))
      assert(wt:add_all())
      local c = assert(wt:commit("work " .. i, { author = ME }))
      assert.equal(c .. "\n", cli(dir, "rev-parse", name))
      wt:close()
    end
    -- an older base by oid
    local first = cli(dir, "rev-parse", "HEAD~1"):gsub("%s+$", "")
    assert(repo:worktree_add("old", root .. "/wt/old", { base = first }))
    assert.equal("one\ntwo\nthree\n", fs.read(root .. "/wt/old/a.txt"))
    -- the main checkout is untouched, and the CLI sees every worktree
    assert.same({ branch = "main", oid = latest }, repo:head())
    local listed = cli(dir, "worktree", "list", "--porcelain")
    for _, n in ipairs { "obj-1", "obj-2", "obj-3", "old" } do assert.contains("branch refs/heads/" .. n, listed) end
    local names = {}
    for _, w in ipairs(assert(repo:worktrees())) do
      names[#names + 1] = w.name
      assert.equal(false, w.locked)
      assert.equal(false, w.prunable)
    end
    table.sort(names)
    assert.same({ "obj-1", "obj-2", "obj-3", "old" }, names)
    local branches = {}
    for _, b in ipairs(assert(repo:branches())) do branches[b.name] = b end
    assert.equal(true, branches.main.head)
    assert.equal(latest, branches.main.oid)
    assert.truthy(branches["obj-2"])
    repo:close()
  end)

  it("remove deletes the directory, refuses a dirty worktree without force; prune forgets orphans", function()
    local repo, dir = new_repo()
    assert(repo:worktree_add("keep", root .. "/wt/keep"))
    assert(repo:worktree_add("dirty", root .. "/wt/dirty"))
    assert(repo:worktree_add("orphan", root .. "/wt/orphan"))
    assert(repo:worktree_remove("keep"))
    assert.equal(false, fs.exists(root .. "/wt/keep"))

    assert(fs.write(root .. "/wt/dirty/untracked", "x"))
    local ok, err, code = repo:worktree_remove("dirty")
    assert.is_nil(ok)
    assert.equal("EDIRTY", code)
    assert.equal("EDIRTY: worktree 'dirty' has changes (use force)", err)
    assert(repo:worktree_remove("dirty", { force = true }))
    assert.equal(false, fs.exists(root .. "/wt/dirty"))

    assert(fs.remove(root .. "/wt/orphan", { recursive = true })) -- the directory vanished
    local wts = assert(repo:worktrees())
    assert.equal(1, #wts)
    assert.equal("orphan", wts[1].name)
    assert.equal(true, wts[1].prunable)
    assert.same({ "orphan" }, repo:prune_worktrees())
    assert.same({}, repo:worktrees())
    assert.same({}, repo:prune_worktrees())
    assert.equal(cli(dir, "rev-parse", "--show-toplevel"):gsub("%s+$", "") .. " ", -- only the main one
      cli(dir, "worktree", "list", "--porcelain"):match("^worktree (%S+)\n") .. " ")
    assert.equal(1, select(2, cli(dir, "worktree", "list"):gsub("\n", "")))
    -- branches stay after removal
    local names = {}
    for _, b in ipairs(repo:branches()) do names[#names + 1] = b.name end
    table.sort(names)
    assert.same({ "dirty", "keep", "main", "orphan" }, names)
    repo:close()
  end)

  it("checks out line endings and ident exactly as the CLI does, whatever turns the filters on", function()
    -- Filters are skipped when no attributes and no core.autocrlf can apply;
    -- each source that can apply must still turn them on.
    local cases = {
      none = function() end,
      tree = function(dir, repo)
        assert(fs.write(dir .. "/.gitattributes", "*.txt eol=crlf\n*.c ident\n"))
        assert(repo:add_all())
        assert(repo:commit("attributes", { author = ME }))
      end,
      nested = function(dir, repo)
        assert(fs.write(dir .. "/src/.gitattributes", "*.c eol=crlf\n"))
        assert(repo:add_all())
        assert(repo:commit("attributes", { author = ME }))
      end,
      info = function(dir)
        assert(fs.mkdir_p(dir .. "/.git/info"))
        assert(fs.write(dir .. "/.git/info/attributes", "*.txt eol=crlf\n"))
      end,
      autocrlf = function(dir) cli(dir, "config", "core.autocrlf", "true") end,
    }
    local converted = { tree = { "a.txt" }, nested = { "src/b.c" }, info = { "a.txt" },
                        autocrlf = { "a.txt", "src/b.c" } }
    for name, setup in pairs(cases) do
      local dir = root .. "/" .. name
      local repo = assert(git.init(dir))
      assert(fs.write(dir .. "/a.txt", "one\ntwo\n"))
      assert(fs.mkdir_p(dir .. "/src"))
      assert(fs.write(dir .. "/src/b.c", "/* $Id$ */\nint b;\n"))
      assert(repo:add_all())
      assert(repo:commit("initial", { author = ME }))
      setup(dir, repo)
      assert(repo:worktree_add("lib", root .. "/" .. name .. "-lib", { base = "main" }))
      cli(dir, "worktree", "add", "-q", "-b", "cli", root .. "/" .. name .. "-cli", "main")
      for _, f in ipairs { "a.txt", "src/b.c" } do
        assert.equal(fs.read(root .. "/" .. name .. "-cli/" .. f), fs.read(root .. "/" .. name .. "-lib/" .. f),
          name .. ": " .. f)
      end
      for _, f in ipairs(converted[name] or {}) do
        assert.contains("\r\n", fs.read(root .. "/" .. name .. "-lib/" .. f), name .. ": " .. f)
      end
      if name == "tree" then assert.contains("$Id: ", fs.read(root .. "/tree-lib/src/b.c")) end
      if name == "none" then assert.equal("one\ntwo\n", fs.read(root .. "/none-lib/a.txt")) end
      local wt = assert(git.open(root .. "/" .. name .. "-lib"))
      assert.same({}, wt:status(), name)
      wt:close()
      assert(repo:worktree_remove("lib"), name)
      repo:close()
    end
  end)

  it("remove refuses exactly what `git worktree remove` refuses", function()
    local repo, dir = new_repo()
    assert(fs.write(dir .. "/.gitignore", "*.log\n"))
    assert(repo:add_all())
    assert(repo:commit("ignore logs", { author = ME }))
    local function sh(...)
      local res = assert(proc.run{ argv = { ... } })
      assert.equal(0, res.code, table.concat({ ... }, " ") .. ": " .. (res.stderr or ""))
    end
    -- Writes text to file in the worktree at path and stages it there.
    local function stage(path, file, text)
      assert(fs.write(path .. "/" .. file, text))
      local wt = assert(git.open(path))
      assert(wt:add({ file }))
      wt:close()
    end
    -- Each case changes a fresh worktree (path) whose admin directory is admin.
    local cases = {
      { "nothing changed", true, function() end },
      { "a tracked file edited, its size and mtime kept", false, function(path)
          sh("cp", "-p", path .. "/a.txt", path .. "/../a.ref")
          assert(fs.write(path .. "/a.txt", "ONE\ntwo\nthree\n"))
          sh("touch", "-r", path .. "/../a.ref", path .. "/a.txt")
        end },
      { "a tracked file grown", false, function(path) assert(fs.append(path .. "/a.txt", "four\n")) end },
      { "a tracked file deleted", false, function(path) assert(fs.remove(path .. "/src/b.c")) end },
      { "a tracked file made executable", false, function(path) sh("chmod", "+x", path .. "/a.txt") end },
      { "an untracked file", false, function(path) assert(fs.write(path .. "/src/new.c", "int n;\n")) end },
      { "an untracked symlink", false, function(path) sh("ln", "-s", "a.txt", path .. "/link") end },
      { "an ignored file", true, function(path) assert(fs.write(path .. "/src/debug.log", "x\n")) end },
      { "an empty directory", true, function(path) assert(fs.mkdir_p(path .. "/empty")) end },
      { "an edit staged, the file as staged", false, function(path) stage(path, "a.txt", "staged\n") end },
      { "a new file staged", false, function(path) stage(path, "staged.c", "int s;\n") end },
      { "work committed on the branch", true, function(path)
          assert(fs.write(path .. "/done.c", "int d;\n"))
          local wt = assert(git.open(path))
          assert(wt:add_all())
          assert(wt:commit("done", { author = ME }))
          wt:close()
        end },
      { "files as old as the index (racy: hashed)", true, function(_, admin)
          sh("touch", "-d", "2000-01-01 00:00:00", admin .. "/index")
        end },
    }
    for i, case in ipairs(cases) do
      local label, removable, change = case[1], case[2], case[3]
      local lib, byc = root .. "/wt/lib" .. i, root .. "/wt/cli" .. i
      assert(repo:worktree_add("lib" .. i, lib, { base = "main" }))
      cli(dir, "worktree", "add", "-q", "-b", "cli" .. i, byc, "main")
      change(lib, dir .. "/.git/worktrees/lib" .. i)
      change(byc, dir .. "/.git/worktrees/cli" .. i)
      local res = assert(proc.run{ argv = { "git", "worktree", "remove", byc }, cwd = dir,
        env = { PATH = os.getenv("PATH") or "/usr/bin:/bin", HOME = root, GIT_CONFIG_NOSYSTEM = "1" } })
      assert.equal(removable, res.code == 0, "the CLI on: " .. label)
      local ok, err, code = repo:worktree_remove("lib" .. i)
      if removable then
        assert.equal(true, ok, label .. ": " .. tostring(err))
        assert.equal(false, fs.exists(lib), label)
      else
        assert.is_nil(ok, label)
        assert.equal("EDIRTY", code, label)
        assert.equal(true, fs.exists(lib .. "/.git"), label)
        assert(repo:worktree_remove("lib" .. i, { force = true }))
      end
    end
    repo:close()
  end)

  it("makes a worktree where one whose making was cut short left git's administrative directory and a lock", function()
    local repo, dir = new_repo()
    assert(fs.mkdir_p(dir .. "/.git/worktrees/cut"))
    assert(fs.write(dir .. "/.git/worktrees/cut/commondir", "../..\n"))
    assert(fs.write(dir .. "/.git/refs/heads/cut.lock", ""))
    assert(repo:worktree_add("cut", root .. "/wt/cut"))
    assert.equal("a.txt\nsrc/b.c\n", cli(root .. "/wt/cut", "ls-files"))
    local _, err, code = repo:worktree_add("cut", root .. "/wt/cut2")
    assert.equal("EEXISTS", code, err)
    repo:close()
  end)

  it("deletes a branch, not one that is checked out", function()
    local repo, dir = new_repo()
    assert(repo:worktree_add("busy", root .. "/wt/busy"))
    assert(repo:worktree_add("done", root .. "/wt/done"))
    assert(repo:worktree_remove("done"))
    assert.equal(true, repo:branch_delete("done"))
    local ok, err, code = repo:branch_delete("busy")
    assert.is_nil(ok)
    assert.equal("ELOCKED", code)
    assert.equal("ELOCKED: branch 'busy' is checked out", err)
    _, err, code = repo:branch_delete("main")
    assert.equal("ELOCKED", code)
    _, err, code = repo:branch_delete("nope")
    assert.equal("ENOTFOUND", code)
    assert.equal("ENOTFOUND: no branch named 'nope'", err)
    assert.equal("busy\nmain\n", cli(dir, "branch", "--format=%(refname:short)"))
    repo:close()
  end)
end)

describe("git remotes", function()
  it("push to and fetch from a local bare repository", function()
    local repo, dir, oid = new_repo()
    local bare = root .. "/remote.git"
    assert(git.init(bare, { bare = true })):close()
    assert(repo:remote_add("origin", bare))
    assert(repo:push("origin", "refs/heads/main:refs/heads/main"))
    assert.equal(oid .. "\n", cli(bare, "rev-parse", "main"))
    -- someone else pushes a new commit; fetch sees it
    local other = assert(git.init(root .. "/other"))
    assert(other:remote_add("origin", bare))
    assert(other:fetch("origin"))
    assert(other:worktree_add("feature", root .. "/feature", { base = "origin/main" }))
    local feat = assert(git.open(root .. "/feature"))
    assert(fs.write(root .. "/feature/g.txt", "g\n"))
    assert(feat:add_all())
    local c = assert(feat:commit("feature", { author = ME }))
    assert(feat:push("origin", "refs/heads/feature:refs/heads/feature"))
    assert(repo:fetch("origin"))
    assert.equal(c .. "\n", cli(dir, "rev-parse", "refs/remotes/origin/feature"))
    -- an anonymous remote by path
    assert(repo:fetch(bare))
    feat:close()
    other:close()
    repo:close()
  end)
end)

describe("git errors", function()
  it("are clear one-liners", function()
    local repo = new_repo()
    local cases = {
      { function() return git.open(root .. "/nope") end, "ENOTFOUND", "^ENOTFOUND: not a git repository: .*/nope$" },
      { function() return repo:worktree_add("x", root .. "/x", { base = "no-such-branch" }) end,
        "ENOTFOUND", "^ENOTFOUND: unknown base 'no%-such%-branch'$" },
      { function() return repo:diff_stats("deadbeef") end, "ENOTFOUND", "^ENOTFOUND: unknown base 'deadbeef'$" },
      { function() return repo:worktree_remove("ghost") end, "ENOTFOUND", "^ENOTFOUND: no worktree named 'ghost'$" },
      { function() return repo:fetch("nowhere") end, "ENOTFOUND", "^ENOTFOUND: no remote named 'nowhere'$" },
      { function() return repo:push(root .. "/nothing-here", "refs/heads/main:refs/heads/main") end, "EGIT", "^EGIT: " },
    }
    assert(repo:worktree_add("w", root .. "/w"))
    cases[#cases + 1] = { function() return repo:worktree_add("w", root .. "/w2") end,
      "EEXISTS", "^EEXISTS: worktree 'w' already exists$" }
    cases[#cases + 1] = { function() return repo:worktree_add("main", root .. "/w3") end,
      "EEXISTS", "^EEXISTS: branch 'main' already exists$" }
    for i, c in ipairs(cases) do
      local ok, err, code = c[1]()
      assert.is_nil(ok, "case " .. i)
      assert.equal(c[2], code, "case " .. i)
      assert.matches(c[3], err, "case " .. i)
      assert.equal(nil, err:find("\n"), "case " .. i .. " is one line")
    end
    assert.equal(false, fs.exists(root .. "/w3"))
    -- misuse raises
    assert.error_matches(function() git.open() end, "bad argument")
    assert.error_matches(function() repo:add("a.txt") end, "bad argument")
    assert.error_matches(function() repo:commit("m", { author = { name = "x" } }) end, "needs name and email")
    repo:close()
  end)
end)

describe("git from many fibers", function()
  it("runs concurrent calls on one handle and on many", function()
    local repo, dir = new_repo()
    local fibers, results = {}, {}
    for i = 1, 16 do
      fibers[#fibers + 1] = fiber.spawn(function()
        local name = "f" .. i
        assert(repo:worktree_add(name, root .. "/wt/" .. name, { base = "main" }))
        local wt = assert(git.open(root .. "/wt/" .. name))
        assert(fs.write(root .. "/wt/" .. name .. "/x.txt", ("line\n"):rep(i)))
        assert(wt:add_all())
        local st = assert(wt:diff_stats())
        results[i] = (wt:commit(name, { author = ME })) and st.insertions
        assert.same({}, wt:status())
        wt:close()
        assert(repo:status())
      end)
    end
    for _, f in ipairs(fibers) do
      local ok, err = fiber.join(f)
      assert(ok, tostring(err))
    end
    for i = 1, 16 do assert.equal(i, results[i]) end -- a staged new file is in the diff from HEAD
    assert.equal(16, #assert(repo:worktrees()))
    for i = 1, 16 do assert(repo:worktree_remove("f" .. i)) end
    assert.same({}, repo:worktrees())
    assert.equal("", cli(dir, "status", "--porcelain"))
    repo:close()
  end)

  -- As several `factory run`s on one repository do: libgit2 itself took a worktree
  -- that another process removed meanwhile for one that has the branch checked out.
  -- The processes run without LeakSanitizer: libgit2 1.5 itself loses an allocation
  -- on these very races (56 bytes from its realloc, in one run of three or four).
  it("adds and removes worktrees and deletes their branches from several processes at once", function()
    local repo, dir = new_repo()
    local workers = {}
    for w = 1, 4 do
      workers[w] = assert(proc.spawn{ argv = { host.exe, TOOLS .. "worktree_churn.lua", dir, "p" .. w, "25" },
                                      env = { PATH = os.getenv("PATH"), ASAN_OPTIONS = "detect_leaks=0" },
                                      stderr = "stdout" })
    end
    local failures = {}
    for _, p in ipairs(workers) do
      local status = p:wait(120)
      local out = {}
      for line in function() return p:read_line() end do out[#out + 1] = line end
      p:close()
      assert.equal(0, status.code, table.concat(out, "\n"))
      assert.equal("done", table.remove(out))
      for _, line in ipairs(out) do failures[#failures + 1] = line end
    end
    assert.same({}, failures)
    assert.same({}, repo:worktrees())
    assert.equal("main\n", cli(dir, "branch", "--format=%(refname:short)"))
    repo:close()
  end)
end)
