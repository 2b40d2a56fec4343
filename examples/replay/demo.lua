-- `make demo`: two pipelines end to end, offline. The model is the REPLAY provider
-- (examples/replay/server.lua): recorded replies, no model runs.
--  1. `feature` over a git copy of examples/sample-repo: five teams, a clarification
--     between two of them, the summary and the run's timeline. Every stage's agent
--     works in a worktree (its tool calls are replayed, the tools really run):
--     analysis and architecture read the code, the build stage's coding agent writes
--     the feature and its tests on its own branch, verify runs the tests on that
--     commit, docs adds the README section and changelog on top; the repository's
--     tests pass on the run's last branch.
--  2. `bugfix` over a git copy of examples/sample-c-repo, whose `make test` fails:
--     triage runs the failing tests, the fix stage's coding agent fixes the code on
--     its own branch, verify runs the tests there, release_note adds the changelog;
--     the repository's own `make test` passes on the run's last branch while main
--     still fails.
--  3. `factory status`: no run left to do, and each team's calls today against its budget.
-- Everything lives in a fresh directory under /tmp, removed at the end.
local fs = require "factory.core.fs"
local env = require "factory.core.env"
local git = require "factory.git"
local proc = require "factory.proc"
local run_cli = require "factory.run_cli"
local host = require "factory.core.host"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local ROOT = HERE .. "../../"
local replay = dofile(HERE .. "server.lua")
local PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"

print("== OFFLINE DEMO: model replies are REPLAYED from examples/replay/{feature,bugfix}.lua (no model is called)\n")
local srv = assert(replay.start{ delay = 0.2, replies = { HERE .. "feature.lua", HERE .. "bugfix.lua" } })
local tmp = os.tmpname()
os.remove(tmp)
assert(fs.mkdir_p(tmp))
local url = "sqlite:" .. tmp .. "/demo.db"
-- The replayed agents run `factory tests/tasks_test.lua`: this binary, found on the
-- PATH their commands get, as an installed factory would be.
assert(fs.mkdir_p(tmp .. "/bin"))
assert(assert(proc.run{ argv = { "ln", "-s", host.exe, tmp .. "/bin/factory" }, env = { PATH = PATH } }).code == 0,
  "cannot link " .. host.exe)
env.set("PATH", tmp .. "/bin:" .. PATH)
local opts = { router = replay.router_config(srv:url()) }

-- A git repository made from one of the examples: a build stage works in a worktree of it.
local function git_copy(example, dir, message)
  local cp = assert(proc.run{ argv = { "cp", "-R", ROOT .. "examples/" .. example, dir }, env = { PATH = PATH } })
  assert(cp.code == 0, "cp failed")
  fs.remove(dir .. "/build", { recursive = true })
  local repo = assert(git.init(dir))
  assert(repo:add_all())
  assert(repo:commit(message, { author = { name = "Demo", email = "demo@factory.local" } }))
  return repo
end

-- A repository's tests, run in dir: their exit code and output.
local function run_tests(argv, dir)
  local res = assert(proc.run{ argv = argv, cwd = dir, env = { PATH = PATH }, stderr = "stdout", timeout = 120 })
  return res.code, (res.stdout:gsub("%s+$", ""))
end

-- The branch a run left (the last whose name matches pattern), checked out
-- in a fresh worktree: its change, and the repository's tests run there and on main.
-- Returns the exit code of the tests on the branch (1 when there is no branch).
local function check_branch(repo, dir, pattern, test_argv)
  local branch
  for _, b in ipairs(repo:branches()) do
    if b.name:match(pattern) then branch = b end
  end
  if not branch then
    print("\nno branch was made by the run")
    return 1
  end
  local shown = table.concat(test_argv, " "):gsub("^%S*/factory[%w-]* ", "factory ")
  print(("\n== the run's last branch %s (commit %s), checked out in a fresh worktree"):format(branch.name,
    branch.oid:sub(1, 10)))
  local check = dir .. "-check"
  assert(repo:worktree_add("demo-check", check, { base = branch.name }))
  local wt = assert(git.open(check))
  io.stdout:write(assert(wt:diff(repo:head().oid)))
  wt:close()
  local rc, out = run_tests(test_argv, check)
  print(("%s on the branch: exit %d\n%s"):format(shown, rc, out))
  assert(repo:worktree_remove("demo-check", { force = true }))
  print(("%s on main (untouched): exit %d"):format(shown, (run_tests(test_argv, dir))))
  return rc
end

print("== 1. factory run feature --repo (a git copy of examples/sample-repo) --file examples/work-items/due-dates.md\n")
local tasks_dir = tmp .. "/tasks"
local tasks_repo = git_copy("sample-repo", tasks_dir, "sample repository")
local code = run_cli.main("run", { "feature", "--repo", tasks_dir,
  "--file", ROOT .. "examples/work-items/due-dates.md", "--project", ROOT, "--db", url }, opts)
print("\n== the run's timeline: factory runs show 1\n")
run_cli.main("runs", { "show", "1", "--db", url })
if code == 0 then
  code = check_branch(tasks_repo, tasks_dir, "^factory%-run1%-docs%-", { host.exe, "tests/tasks_test.lua" })
end
tasks_repo:close()

print("\n== 2. a failing C repository: a git copy of examples/sample-c-repo")
local repo_dir = tmp .. "/calc"
local repo = git_copy("sample-c-repo", repo_dir, "sample C repository")
local rc, out = run_tests({ "make", "-s", "test" }, repo_dir)
print(("make test on main: exit %d\n%s\n"):format(rc, out))
fs.remove(repo_dir .. "/build", { recursive = true })

print("== factory run bugfix --repo " .. repo_dir .. " --issue 'calc_sub returns the wrong result'\n")
local code2 = run_cli.main("run", { "bugfix", "--repo", repo_dir, "--issue",
  "calc_sub returns the wrong result: calc_sub(2, 3) gives 5", "--project", ROOT, "--db", url }, opts)
if code2 == 0 then code2 = check_branch(repo, repo_dir, "^factory%-run2%-release_note%-", { "make", "-s", "test" }) end
repo:close()
print("\n== factory status: what is left to do, and what each team's calls came to today\n")
require("factory.status_cli").run({ "--db", url, "--project", ROOT })
srv:close()
fs.remove(tmp, { recursive = true })
return code ~= 0 and code or code2
