-- factory.agents.workspace: the built-in agent, scripted by the fake model, fixes the
-- failing test of examples/sample-c-repo in its own worktree and branch; the branch
-- holds the agent's commit, the repo's own `make test` passes there, main is untouched.
local workspace = require "factory.agents.workspace"
local router = require "factory.router"
local git = require "factory.git"
local json = require "factory.json"
local proc = require "factory.proc"
local fs = require "factory.core.fs"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local fake_model = dofile(HERE .. "../../../tools/fake_model.lua")
local sample_repo = dofile(HERE .. "../../../tools/sample_repo.lua")
local AUTHOR = { name = "Test Agent", email = "agent@factory.test" }
local PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"

local fake, root, repo_dir

local function make_test(dir)
  return assert(proc.run{ argv = { "make", "-s", "test" }, cwd = dir, env = { PATH = PATH }, stderr = "stdout",
                          timeout = 60 })
end

before_each(function()
  fake = assert(fake_model.start())
  assert(router.configure(fake:router_config{ coder = "gpt-test" }))
  root = os.tmpname()
  os.remove(root)
  assert(fs.mkdir_p(root))
  repo_dir = sample_repo.make(root .. "/calc")
end)

after_each(function()
  fake:close()
  assert(fs.remove(root, { recursive = true }))
end)

local n = 0
local function call(name, args)
  n = n + 1
  return { tool_calls = { { id = "call_" .. n, name = name, arguments = json.encode(args) } } }
end

local FIX_SCRIPT = {
  call("run_command", { command = "make -s test" }),
  call("read_file", { path = "tests/test_calc.c" }),
  call("read_file", { path = "src/calc.c" }),
  call("edit_file", { path = "src/calc.c", old = "int calc_sub(int a, int b) { return a + b; }",
                      new = "int calc_sub(int a, int b) { return a - b; }" }),
  call("run_command", { command = "make -s test" }),
  call("finish", { status = "COMPLETE", reasoning = "calc_sub added instead of subtracting",
                   artifact = "src/calc.c: calc_sub returns a - b",
                   verified_facts = { "make test passes" } }),
}

local function tool_results()
  local msgs = json.decode(fake:requests()[#fake:requests()].body).messages
  local out = {}
  for _, m in ipairs(msgs) do if m.role == "tool" then out[#out + 1] = m.content end end
  return out
end

describe("workspace", function()
  it("the sample repository's own make test fails before the fix", function()
    local res = make_test(repo_dir)
    assert.truthy(res.code ~= 0)
    assert.matches("calc_sub%(2, 3%): expected %-1, got 5", res.stdout)
  end)

  it("the agent fixes the failing test on its branch; main is untouched", function()
    fake:script(FIX_SCRIPT)
    local repo = assert(git.open(repo_dir))
    local main_before = repo:head().oid
    local wt_path = root .. "/wt/fix-calc"
    local ws = assert(workspace.run{
      repo = repo, branch = "fix-calc", path = wt_path, base = "main", author = AUTHOR, keep = true,
      objective = "Make `make test` pass in this C repository", model = "coder",
    })
    assert.equal("COMPLETE", ws.result.status)
    assert.equal("src/calc.c: calc_sub returns a - b", ws.result.artifact)
    assert.equal(6, ws.stats.iterations)
    assert.equal(1, ws.stats.changes)
    assert.equal(main_before, ws.base)
    assert.truthy(ws.commit)
    assert.equal(false, ws.removed)

    -- The model saw the failing test first, then the passing one.
    local seen = tool_results()
    assert.matches("^exit code 2\n", seen[1])
    assert.matches("expected %-1, got 5", seen[1])
    assert.equal("edited src/calc.c", seen[4])
    assert.matches("^exit code 0\n", seen[5])
    assert.matches("all checks passed", seen[5])

    -- Diff stats name the file changed.
    assert.equal(1, ws.diff_stats.files)
    assert.equal(1, ws.diff_stats.insertions)
    assert.equal(1, ws.diff_stats.deletions)
    assert.equal("src/calc.c", ws.diff_stats.per_file[1].path)
    -- and the patch is kept for the stages after.
    assert.contains("+int calc_sub(int a, int b) { return a - b; }", ws.diff)

    -- The branch holds the agent's commit, authored as configured, on top of main.
    local branch_oid, main_oid
    for _, b in ipairs(repo:branches()) do
      if b.name == "fix-calc" then branch_oid = b.oid end
      if b.name == "main" then main_oid = b.oid end
    end
    assert.equal(ws.commit, branch_oid)
    assert.equal(main_before, main_oid)
    local env = { PATH = PATH, HOME = root, GIT_CONFIG_NOSYSTEM = "1" }
    local log = assert(proc.run{ argv = { "git", "log", "--format=%an <%ae>|%s|%P", "-1", "fix-calc" },
                                 cwd = repo_dir, env = env })
    assert.equal("Test Agent <agent@factory.test>|factory: Make `make test` pass in this C repository|"
                 .. main_before .. "\n", log.stdout)

    -- The repo's own make test passes on the branch, from a clean checkout of it.
    local wt = assert(git.open(wt_path))
    assert.same({}, wt:status())
    wt:close()
    assert(workspace.remove(repo, "fix-calc"))
    assert.equal(nil, fs.exists(wt_path) or nil)
    local fresh = root .. "/fresh"
    local clone = assert(proc.run{ argv = { "git", "clone", "-q", "-b", "fix-calc", repo_dir, fresh }, env = env })
    assert.equal(0, clone.code)
    local res = make_test(fresh)
    assert.equal(0, res.code)
    assert.matches("all checks passed", res.stdout)

    -- main is untouched: its working tree is clean and its make test still fails.
    assert.same({}, repo:status())
    assert.equal("int calc_sub(int a, int b) { return a + b; }",
                 fs.read(repo_dir .. "/src/calc.c"):match("int calc_sub[^\n]*"))
    assert.truthy(make_test(repo_dir).code ~= 0)
    repo:close()
  end)

  it("removes the worktree by default and records no commit when nothing changed", function()
    fake:script{ call("read_file", { path = "src/calc.c" }),
                 call("finish", { status = "BLOCKED", reasoning = "cannot", blockers = { "no idea" } }) }
    local ws = assert(workspace.run{ repo = repo_dir, branch = "idle", path = root .. "/wt/idle",
                                     objective = "Look only", model = "coder" })
    assert.equal("BLOCKED", ws.result.status)
    assert.equal(nil, ws.commit)
    assert.equal(nil, ws.diff)
    assert.equal(0, ws.diff_stats.files)
    assert.equal(true, ws.removed)
    assert.equal(nil, fs.exists(root .. "/wt/idle") or nil)
    local repo = assert(git.open(repo_dir))
    assert.same({}, repo:worktrees())
    repo:close()
  end)

  it("keeps what the agent committed itself, with what it left uncommitted on top", function()
    local GIT = "git -c user.name=Agent -c user.email=agent@x.test commit -q -a -m 'fix calc_sub'"
    fake:script{ call("edit_file", { path = "src/calc.c", old = "int calc_sub(int a, int b) { return a + b; }",
                                     new = "int calc_sub(int a, int b) { return a - b; }" }),
                 call("run_command", { command = GIT }),
                 call("write_file", { path = "NOTES.md", text = "calc_sub fixed\n" }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "fixed" }) }
    local ws = assert(workspace.run{ repo = repo_dir, branch = "selfcommit", path = root .. "/wt/self",
                                     objective = "Fix calc_sub", model = "coder", author = AUTHOR })
    assert.truthy(ws.commit)
    assert.equal(2, ws.diff_stats.files)
    assert.contains("+int calc_sub(int a, int b) { return a - b; }", ws.diff)
    assert.contains("+calc_sub fixed", ws.diff)
    local repo = assert(git.open(repo_dir))
    local oid
    for _, b in ipairs(repo:branches()) do
      if b.name == "selfcommit" then oid = b.oid end
    end
    repo:close()
    assert.equal(ws.commit, oid)
    -- Only its own commit, nothing left: that commit is the change.
    fake:script{ call("write_file", { path = "ONLY.md", text = "one\n" }),
                 call("run_command", { command = "git add ONLY.md && " .. GIT }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "one" }) }
    ws = assert(workspace.run{ repo = repo_dir, branch = "selfonly", path = root .. "/wt/only",
                               objective = "Add ONLY.md", model = "coder", author = AUTHOR })
    assert.truthy(ws.commit)
    assert.equal(1, ws.diff_stats.files)
    assert.contains("+one", ws.diff)
  end)

  it("an agent that leaves its worktree on another branch is an error that says where its commits are", function()
    fake:script{ call("run_command", { command = "git checkout -q -b elsewhere" }),
                 call("write_file", { path = "lost.txt", text = "x\n" }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "x" }) }
    local ws, err, code = workspace.run{ repo = repo_dir, branch = "wander", path = root .. "/wt/wander",
                                         objective = "Wander", model = "coder", author = AUTHOR }
    assert.equal(nil, ws)
    assert.equal("EBRANCH", code)
    assert.equal("EBRANCH: the agent left its worktree on branch elsewhere, not on its branch wander: what it"
      .. " committed there stays there, what it did not commit is lost", err)
    local repo = assert(git.open(repo_dir))
    assert.same({}, repo:worktrees())
    repo:close()
    -- Where nothing is kept (commit = false), where it left the worktree does not matter.
    fake:script{ call("run_command", { command = "git checkout -q -b elsewhere2" }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "read" }) }
    ws = assert(workspace.run{ repo = repo_dir, branch = "reader", path = root .. "/wt/reader", commit = false,
                               objective = "Read", model = "coder" })
    assert.equal("COMPLETE", ws.result.status)
    assert.equal(nil, ws.commit)
  end)

  it("keeps the first max_diff bytes of a long patch, saying how long it was", function()
    fake:script{ call("write_file", { path = "big.txt", text = string.rep("a line of generated text\n", 400) }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "big.txt" }) }
    local ws = assert(workspace.run{ repo = repo_dir, branch = "big", path = root .. "/wt/big", objective = "Write",
                                     model = "coder", author = AUTHOR, max_diff = 500 })
    assert.truthy(ws.commit)
    local cut = ws.diff:match("\n%[diff cut: (%d+) bytes in all; the branch holds the whole change%]\n$")
    assert.truthy(tonumber(cut) > 10000, ws.diff:sub(-200))
    assert.equal(500, #ws.diff:match("^(.-)\n%[diff cut"))
  end)

  it("makes its default worktree root a top directory where the filesystem has the flag", function()
    fake:script{ call("finish", { status = "BLOCKED", reasoning = "cannot", blockers = { "no idea" } }) }
    local ws = assert(workspace.run{ repo = repo_dir, branch = "spread", objective = "Look only", model = "coder" })
    assert.equal(root .. "/.factory-worktrees/spread", ws.path)
    local res = assert(proc.run{ argv = { "stat", "-f", "-c", "%T", root }, env = { PATH = PATH } })
    if res.stdout:match("^ext") then
      local attrs = assert(proc.run{ argv = { "lsattr", "-d", root .. "/.factory-worktrees" }, env = { PATH = PATH } })
      assert.truthy(attrs.stdout:match("^%S*T%S* "), "lsattr: " .. attrs.stdout)
    end
    assert.equal(true, fs.stat(root .. "/.factory-worktrees").type == "directory")
  end)

  -- What `factory run` killed in the middle of making a worktree leaves behind: the
  -- checkout's directory, no worktree registered there, and the start of git's own
  -- administrative directory for it.
  it("makes its worktree over what an attempt killed while making it left behind", function()
    local left = root .. "/.factory-worktrees/again"
    assert(fs.mkdir_p(left .. "/src"))
    assert(fs.write(left .. "/src/calc.c", "half a checkout"))
    assert(fs.mkdir_p(repo_dir .. "/.git/worktrees/again"))
    fake:script{ call("finish", { status = "COMPLETE", reasoning = "nothing to do", artifact = "none" }) }
    local ws, err = workspace.run{ repo = repo_dir, branch = "again", objective = "Look", model = "coder" }
    assert(ws, err)
    assert.equal("COMPLETE", ws.result.status)
    assert.equal(left, ws.path)
    assert.is_nil(fs.stat(left), "removed at the end, as any worktree")
  end)

  it("refuses a branch name that is taken", function()
    local ws, err, code = workspace.run{ repo = repo_dir, branch = "main", path = root .. "/wt/m",
                                         objective = "x", model = "coder" }
    assert.equal(nil, ws)
    assert.equal("EEXISTS", code)
    assert.matches("^EEXISTS", err)
  end)
end)
