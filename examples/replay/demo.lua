-- `make demo`: two pipelines end to end, offline. The model is the REPLAY provider
-- (examples/replay/server.lua): recorded replies, no model runs.
--  1. `feature` over examples/sample-repo: five teams, a clarification between two
--     of them, the summary and the run's timeline.
--  2. `bugfix` over a git copy of examples/sample-c-repo, whose `make test` fails:
--     the fix stage's coding agent works in its own worktree and branch (its tool
--     calls are replayed, the tools really run), the branch holds its commit, and
--     the repository's own `make test` passes on that branch while main still fails.
-- Everything lives in a fresh directory under /tmp, removed at the end.
local fs = require "factory.core.fs"
local git = require "factory.git"
local proc = require "factory.proc"
local run_cli = require "factory.run_cli"

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
local opts = { router = replay.router_config(srv:url()) }

print("== 1. factory run feature --repo examples/sample-repo --file examples/work-items/due-dates.md\n")
local code = run_cli.main("run", { "feature", "--repo", ROOT .. "examples/sample-repo",
  "--file", ROOT .. "examples/work-items/due-dates.md", "--project", ROOT, "--db", url }, opts)
print("\n== the run's timeline: factory runs show 1\n")
run_cli.main("runs", { "show", "1", "--db", url })

local function make_test(dir)
  local res = assert(proc.run{ argv = { "make", "-s", "test" }, cwd = dir, env = { PATH = PATH }, stderr = "stdout",
                               timeout = 120 })
  return res.code, (res.stdout:gsub("%s+$", ""))
end

print("\n== 2. a failing C repository: a git copy of examples/sample-c-repo")
local repo_dir = tmp .. "/calc"
local cp = assert(proc.run{ argv = { "cp", "-R", ROOT .. "examples/sample-c-repo", repo_dir }, env = { PATH = PATH } })
assert(cp.code == 0, "cp failed")
fs.remove(repo_dir .. "/build", { recursive = true })
local repo = assert(git.init(repo_dir))
assert(repo:add_all())
assert(repo:commit("sample C repository", { author = { name = "Demo", email = "demo@factory.local" } }))
local rc, out = make_test(repo_dir)
print(("make test on main: exit %d\n%s\n"):format(rc, out))
fs.remove(repo_dir .. "/build", { recursive = true })

print("== factory run bugfix --repo " .. repo_dir .. " --issue 'calc_sub returns the wrong result'\n")
local code2 = run_cli.main("run", { "bugfix", "--repo", repo_dir, "--issue",
  "calc_sub returns the wrong result: calc_sub(2, 3) gives 5", "--project", ROOT, "--db", url }, opts)

local branch
for _, b in ipairs(repo:branches()) do
  if b.name:match("^factory%-run%d+%-fix%-") then branch = b end
end
if branch then
  print(("\n== the agent's branch %s (commit %s), checked out in a fresh worktree"):format(branch.name,
    branch.oid:sub(1, 10)))
  local check = tmp .. "/check"
  assert(repo:worktree_add("demo-check", check, { base = branch.name }))
  local wt = assert(git.open(check))
  io.stdout:write(assert(wt:diff(repo:head().oid)))
  wt:close()
  rc, out = make_test(check)
  print(("make test on the branch: exit %d\n%s"):format(rc, out))
  assert(repo:worktree_remove("demo-check", { force = true }))
  rc = make_test(repo_dir)
  print(("make test on main (untouched): exit %d"):format(rc))
else
  print("\nno branch was made by the fix stage")
  code2 = 1
end
repo:close()
srv:close()
fs.remove(tmp, { recursive = true })
return code ~= 0 and code or code2
