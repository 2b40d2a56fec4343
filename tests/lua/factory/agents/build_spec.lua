-- factory.agents.build through the pipeline engine (issue 6, acceptance 1): the
-- shipped `bugfix` pipeline over a git copy of examples/sample-c-repo, the fake
-- model scripting the fix stage's tool calls. The stage's agent works in its own
-- worktree and branch; the branch holds its commit and the repository's own
-- `make test` passes there; main is untouched; the run records the diff stats.
local pipeline = require "factory.pipeline"
local dsl = require "factory.dsl"
local db = require "factory.db"
local router = require "factory.router"
local git = require "factory.git"
local json = require "factory.json"
local proc = require "factory.proc"
local fs = require "factory.core.fs"
local fiber = require "factory.fiber"
local build = require "factory.agents.build"
local builtin = require "factory.agents.builtin"
local locks = require "factory.agents.locks"
local hitl = require "factory.hitl"
local records = require "factory.records"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local ROOT = HERE .. "../../../../"
local fake_model = dofile(HERE .. "../../../tools/fake_model.lua")
local sample_repo = dofile(HERE .. "../../../tools/sample_repo.lua")
local PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"
local GIT_ENV = { PATH = PATH, GIT_CONFIG_NOSYSTEM = "1" }

local dir, repo_dir, fake, store, engine, events

local function copy(from, to)
  assert(fs.write(to, assert(fs.read(from))))
end

local function make_test(d)
  return assert(proc.run{ argv = { "make", "-s", "test" }, cwd = d, env = { PATH = PATH }, stderr = "stdout",
                          timeout = 60 })
end

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  for _, sub in ipairs({ "project/teams", "project/pipelines" }) do assert(fs.mkdir_p(dir .. "/" .. sub)) end
  for _, f in ipairs(assert(fs.list(ROOT .. "teams"))) do
    if f:find("%.lua$") then copy(ROOT .. "teams/" .. f, dir .. "/project/teams/" .. f) end
  end
  copy(ROOT .. "pipelines/bugfix.lua", dir .. "/project/pipelines/bugfix.lua")
  local project = dsl.project(dir .. "/project")
  assert.same({}, project:load())

  repo_dir = sample_repo.make(dir .. "/calc")

  fake = assert(fake_model.start())
  assert(router.configure(fake:router_config{ ["factory/architect"] = "architect", ["factory/coder"] = "coder",
                                               ["factory/fast"] = "fast", ["factory/cheap"] = "cheap" }))
  store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
  assert(store:migrate())
  events = {}
  engine = pipeline.engine{ db = store, project = project, on_event = function(ev) events[#events + 1] = ev end }
end)

after_each(function()
  engine:close()
  store:close()
  fake:close()
  assert(fs.remove(dir, { recursive = true }))
end)

local function complete(artifact)
  return { content = json.encode{ status = "COMPLETE", reasoning = "done", artifact = artifact, blockers = {},
                                  assumptions_made = {}, verified_facts = {} } }
end

local n = 0
local function call(name, args)
  n = n + 1
  return { tool_calls = { { id = "call_" .. n, name = name, arguments = json.encode(args) } } }
end

local FIX = {
  call("run_command", { command = "make -s test" }),
  call("read_file", { path = "src/calc.c" }),
  call("edit_file", { path = "src/calc.c", old = "int calc_sub(int a, int b) { return a + b; }",
                      new = "int calc_sub(int a, int b) { return a - b; }" }),
  call("run_command", { command = "make -s test" }),
  call("finish", { status = "COMPLETE", reasoning = "calc_sub added", artifact = "calc_sub returns a - b",
                   verified_facts = { "make test passes" } }),
}

local function script_run()
  local replies = { complete("# Reproduction\nmake test fails on calc_sub") }
  for _, r in ipairs(FIX) do replies[#replies + 1] = r end
  replies[#replies + 1] = complete("# Test report\nno regressions")
  replies[#replies + 1] = complete("CHANGELOG: fixed calc_sub")
  fake:script(replies)
end

local function submit(repo)
  return assert(engine:submit{ pipeline = "bugfix", title = "calc_sub returns the wrong result",
                               body = "calc_sub(2, 3) gives 5", repo = repo or repo_dir, external_id = "calc-1" })
end

-- What a killed attempt of the fix stage recorded before its process died: the
-- branch its workspace was given (it is the run's own, to go on from).
local function killed_attempt(run_id)
  records.event(store, run_id, "workspace_started", { stage = "fix", branch = "factory-run1-fix-1" })
end

local function kinds()
  local out = {}
  for _, ev in ipairs(events) do out[#out + 1] = ev.kind end
  return table.concat(out, " ")
end

local function branch_oid(name)
  local repo = assert(git.open(repo_dir))
  local oid
  for _, b in ipairs(repo:branches()) do
    if b.name == name then oid = b.oid end
  end
  repo:close()
  return oid
end

-- Each stage's result.workspace in run run_id, by stage.
local function workspaces(run_id)
  local ws = {}
  for _, row in ipairs(assert(store:query("SELECT stage, result FROM stage_results WHERE run_id = ?", { run_id }))) do
    ws[row.stage] = row.result.workspace
  end
  return ws
end

-- Where stage's worktree started (its workspace_started event's `from`).
local function started_from(stage)
  local from
  for _, ev in ipairs(events) do
    if ev.kind == "workspace_started" and ev.data.stage == stage then from = ev.data.from end
  end
  return from
end

-- The last command stage's agent ran (its tool_call event).
local function command_of(stage)
  local ran
  for _, ev in ipairs(events) do
    if ev.kind == "tool_call" and ev.data.name == "run_command" and ev.data.stage == stage then ran = ev.data end
  end
  return ran
end

-- The system message of the last model request of stage's objective.
local function system_of(stage)
  local told
  for _, r in ipairs(fake:requests()) do
    local m = json.decode(r.body).messages
    if m[1].content:find("objective: stage " .. stage, 1, true) then told = m[1].content end
  end
  return told
end

-- A one-stage pipeline "onefix" (the fix stage, two acceptance items), and the engine
-- restarted to load it, with factory.lua's agents section.
local function onefix_engine(agents)
  assert(fs.write(dir .. "/project/pipelines/onefix.lua", 'return pipeline "onefix" {\n'
    .. '  stage "fix" { team = "backend_engineering", workspace = "worktree",\n'
    .. '    acceptance = { "calc_sub subtracts", "make test passes" } },\n}'))
  engine:close()
  local project = dsl.project(dir .. "/project")
  assert.same({}, project:load())
  engine = pipeline.engine{ db = store, project = project, agents = agents,
                            on_event = function(ev) events[#events + 1] = ev end }
end

-- backend_engineering's implementer made a CLI agent: tests/tools/fake_claude.sh in
-- "work" mode, counting its calls in a state directory, which is returned.
local function fake_cli_agent()
  local state = dir .. "/agent-state"
  assert(fs.mkdir_p(state))
  local team = assert(fs.read(ROOT .. "teams/backend_engineering.lua"))
  team = team:gsub('operative "implementer" {', ('operative "implementer" {\n    agent = { cli = "fake", '
    .. 'command = { "sh", %q, "work", %q }, format = "claude", heartbeat_timeout = 5 },'):format(
    assert(fs.realpath(ROOT .. "tests/tools/fake_claude.sh")), state), 1)
  assert(fs.write(dir .. "/project/teams/backend_engineering.lua", team))
  return state
end

describe("build stage", function()
  it("fixes the failing test on its own branch; the run records the diff stats; main is untouched", function()
    script_run()
    local main_before = branch_oid("main")
    -- A change not committed (and an untracked file) in the repository: the worktree
    -- starts from the last commit, and the run says so.
    assert(fs.write(repo_dir .. "/README.md", assert(fs.read(repo_dir .. "/README.md")) .. "A local note.\n"))
    assert(fs.write(repo_dir .. "/scratch.txt", "notes\n"))
    local run_id = submit()
    assert.equal("succeeded", (engine:execute(run_id)))
    assert.contains("workspace_started", kinds())
    for _, ev in ipairs(events) do
      if ev.kind == "workspace_started" then assert.equal(1, ev.data.uncommitted) end
    end
    assert.contains("tool_call", kinds())
    assert.contains("workspace_done", kinds())

    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'", { run_id }))[1]
    local ws = fix.result.workspace
    assert.equal("factory-run" .. run_id .. "-fix-1", ws.branch)
    assert.equal(main_before, ws.base)
    assert.equal(branch_oid(ws.branch), ws.commit)
    assert.equal(1, ws.diff_stats.files)
    assert.equal("src/calc.c", ws.diff_stats.per_file[1].path)
    assert.equal("calc_sub returns a - b", fix.result.artifact)

    -- The agent's tool calls are in the run's events, each with its stage.
    local tools = {}
    for _, ev in ipairs(events) do
      if ev.kind == "tool_call" then tools[#tools + 1] = ev.data.name .. (ev.data.ok and "" or "!") end
    end
    assert.equal("run_command read_file edit_file run_command finish", table.concat(tools, " "))

    -- The worktree is gone, the branch stays, its make test passes; main still fails.
    local repo = assert(git.open(repo_dir))
    assert.equal(0, #repo:worktrees())
    repo:close()
    assert.equal(main_before, branch_oid("main"))
    local fresh = dir .. "/fresh"
    assert.equal(0, assert(proc.run{ argv = { "git", "clone", "-q", "-b", ws.branch, repo_dir, fresh },
                                     env = GIT_ENV }).code)
    local res = make_test(fresh)
    assert.equal(0, res.code)
    assert.matches("all checks passed", res.stdout)
    assert.truthy(make_test(repo_dir).code ~= 0)
  end)

  it("the verify stage sees the change summary of the fix, and the change itself", function()
    script_run()
    local run_id = submit()
    assert.equal("succeeded", (engine:execute(run_id)))
    local verify
    for _, r in ipairs(fake:requests()) do
      local body = json.decode(r.body)
      if body.messages[1].content:find("objective: stage verify", 1, true) then
        local all = {}
        for _, m in ipairs(body.messages) do all[#all + 1] = m.content end
        verify = table.concat(all, "\n")
      end
    end
    assert.contains("calc_sub returns a - b", verify)
    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'", { run_id }))[1]
    local ws = fix.result.workspace
    assert.contains(("### The change: branch %s, commit %s, 1 file(s) +1 -1\n```diff\n"):format(ws.branch,
      ws.commit:sub(1, 10)), verify)
    assert.contains("-int calc_sub(int a, int b) { return a + b; }\n+int calc_sub(int a, int b) { return a - b; }",
      verify)
    assert.contains("diff --git a/src/calc.c b/src/calc.c", ws.diff)
  end)

  local function branch_names(repo)
    local names = {}
    for _, b in ipairs(repo:branches()) do names[#names + 1] = b.name end
    table.sort(names)
    return names
  end

  it("a worktree left by a killed attempt is removed, and its branch, which holds no commit, reused", function()
    script_run()
    local repo = assert(git.open(repo_dir))
    assert(repo:worktree_add("factory-run1-fix-1", dir .. "/stale", {}))
    -- The CLI loop's own files are not work to keep.
    assert(fs.write(dir .. "/stale/SPEC.md", "- [ ] fix calc_sub\n"))
    assert(fs.mkdir_p(dir .. "/stale/.ai"))
    assert(fs.write(dir .. "/stale/.ai/new-learnings.md", "x\n"))
    repo:close()
    local run_id = submit()
    assert.equal(1, run_id)
    killed_attempt(run_id)
    assert.equal("succeeded", (engine:execute(run_id)))
    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'", { run_id }))[1]
    assert.equal("factory-run1-fix-1", fix.result.workspace.branch)
    assert.truthy(fix.result.workspace.commit)
    assert.equal(nil, fs.exists(dir .. "/stale") or nil)
    repo = assert(git.open(repo_dir))
    assert.equal(0, #repo:worktrees())
    assert.same({ "factory-run1-fix-1", "main" }, branch_names(repo))
    repo:close()
  end)

  it("what a killed attempt's agent left uncommitted is committed on its branch, and the attempt goes on from it",
    function()
    script_run()
    local main_before = branch_oid("main")
    local repo = assert(git.open(repo_dir))
    assert(repo:worktree_add("factory-run1-fix-1", dir .. "/stale", {}))
    repo:close()
    assert(fs.mkdir_p(dir .. "/stale/notes"))
    assert(fs.write(dir .. "/stale/notes/half-done.txt", "from the killed attempt\n"))
    assert(fs.write(dir .. "/stale/README.md", assert(fs.read(dir .. "/stale/README.md")) .. "Edited by the agent.\n"))
    assert(fs.write(dir .. "/stale/SPEC.md", "- [ ] fix calc_sub\n"))
    local run_id = submit()
    killed_attempt(run_id)
    assert.equal("succeeded", (engine:execute(run_id)))
    local ws = workspaces(run_id).fix
    assert.equal("factory-run1-fix-1-2", ws.branch)
    assert.equal(main_before, ws.base)
    local paths = {}
    for _, f in ipairs(ws.diff_stats.per_file) do paths[#paths + 1] = f.path end
    table.sort(paths)
    assert.same({ "README.md", "notes/half-done.txt", "src/calc.c" }, paths)
    local salvaged = branch_oid("factory-run1-fix-1")
    local from = started_from("fix")
    assert.same({ stage = "fix", branch = "factory-run1-fix-1", commit = salvaged, continued = true }, from)
    local fresh = dir .. "/fresh"
    assert.equal(0, assert(proc.run{ argv = { "git", "clone", "-q", "-b", ws.branch, repo_dir, fresh },
                                     env = GIT_ENV }).code)
    assert.equal("from the killed attempt\n", fs.read(fresh .. "/notes/half-done.txt"))
    assert.equal(nil, fs.exists(fresh .. "/SPEC.md") or nil)
    assert.equal(0, make_test(fresh).code)
  end)

  it("the attempt after one that changed files and then asked a question goes on from that work", function()
    fake:script{
      complete("# Reproduction\nmake test fails on calc_sub"),
      FIX[3], -- the edit that fixes calc_sub
      call("finish", { status = "NEEDS_CLARIFICATION", reasoning = "fixed; is overflow in scope?",
                       clarification_needed = { team = "solution_architecture", question = "Is overflow in scope?" } }),
      complete("No: overflow is out of scope."),
      call("run_command", { command = "make -s test" }),
      call("finish", { status = "COMPLETE", reasoning = "r", artifact = "calc_sub returns a - b" }),
      complete("# Test report\nno regressions"),
      complete("CHANGELOG: fixed calc_sub"),
    }
    local main_before = branch_oid("main")
    local run_id = submit()
    assert.equal("succeeded", (engine:execute(run_id)))
    local asked = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'"
      .. " AND status = 'NEEDS_CLARIFICATION'", { run_id }))[1].result.workspace
    assert.equal("factory-run1-fix-1", asked.branch)
    local ws = workspaces(run_id).fix
    assert.equal("factory-run1-fix-2", ws.branch)
    assert.equal(main_before, ws.base)
    assert.equal("src/calc.c", ws.diff_stats.per_file[1].path)
    local from, ran = started_from("fix"), command_of("fix")
    assert.same({ stage = "fix", branch = "factory-run1-fix-1", commit = asked.commit, continued = true,
                  after = "NEEDS_CLARIFICATION" }, from)
    assert.equal(0, ran.exit) -- the second attempt ran the tests on the first one's fix
  end)

  it("the attempt after a BLOCKED one that changed files, answered by a human, goes on from that work", function()
    fake:script{
      complete("# Reproduction\nmake test fails on calc_sub"),
      FIX[3], -- the edit that fixes calc_sub
      call("finish", { status = "BLOCKED", reasoning = "cannot run make here", blockers = { "make is missing?" } }),
    }
    local main_before = branch_oid("main")
    local run_id = submit()
    local state, esc = engine:execute(run_id)
    assert.equal("waiting", state)
    assert(hitl.answer(store, esc.id, "make is installed: run it."))
    fake:script{
      call("run_command", { command = "make -s test" }),
      call("finish", { status = "COMPLETE", reasoning = "r", artifact = "calc_sub returns a - b" }),
      complete("# Test report\nno regressions"),
      complete("CHANGELOG: fixed calc_sub"),
    }
    assert.equal("succeeded", (engine:execute(run_id)))
    local blocked = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'"
      .. " AND status = 'BLOCKED'", { run_id }))[1].result.workspace
    local ws = workspaces(run_id).fix
    assert.equal("factory-run1-fix-2", ws.branch)
    assert.equal(main_before, ws.base)
    local from, ran = started_from("fix"), command_of("fix")
    assert.same({ stage = "fix", branch = "factory-run1-fix-1", commit = blocked.commit, continued = true,
                  after = "BLOCKED" }, from)
    assert.equal(0, ran.exit)
    -- The agent was told where its work came from, and where the stage started.
    local told = system_of("fix")
    assert.contains("changed files, then ended BLOCKED: this worktree starts from the commit that holds its work ("
      .. blocked.commit:sub(1, 10) .. ")", told)
    assert.contains("The stage itself started from commit " .. main_before .. ": to start over", told)
  end)

  it("a branch and worktree of the same name that another store's run 1 has are left alone, not gone on from",
    function()
    script_run()
    local main_before = branch_oid("main")
    -- Another store's run 1 (an earlier .factory, or a `factory run` from another
    -- directory, working now): its agent's worktree, with work committed and not.
    local repo = assert(git.open(repo_dir))
    assert(repo:worktree_add("factory-run1-fix-1", dir .. "/theirs", {}))
    repo:close()
    local theirs = assert(git.open(dir .. "/theirs"))
    assert(fs.write(dir .. "/theirs/their-work.txt", "another run's change\n"))
    assert(theirs:add_all())
    local their_commit = assert(theirs:commit("their work", { author = { name = "a", email = "a@b" } }))
    theirs:close()
    assert(fs.write(dir .. "/theirs/in-progress.txt", "their agent is writing this\n"))
    local run_id = submit()
    assert.equal(1, run_id)
    assert.equal("succeeded", (engine:execute(run_id)))
    local ws = workspaces(run_id).fix
    assert.equal("factory-run1-fix-1-2", ws.branch)
    assert.is_nil(started_from("fix"))
    assert.equal(main_before, ws.base)
    local paths = {}
    for _, f in ipairs(ws.diff_stats.per_file) do paths[#paths + 1] = f.path end
    assert.same({ "src/calc.c" }, paths)
    assert.equal(their_commit, branch_oid("factory-run1-fix-1"))
    assert.equal("their agent is writing this\n", fs.read(dir .. "/theirs/in-progress.txt"))
    repo = assert(git.open(repo_dir))
    local worktrees = {}
    for _, w in ipairs(repo:worktrees()) do worktrees[#worktrees + 1] = w.name end
    repo:close()
    assert.same({ "factory-run1-fix-1" }, worktrees)
  end)

  it("a branch left by a killed attempt with a commit of its own is kept, and the attempt goes on from it", function()
    script_run()
    local main_before = branch_oid("main")
    local repo = assert(git.open(repo_dir))
    assert(repo:worktree_add("factory-run1-fix-1", dir .. "/stale", {}))
    local stale = assert(git.open(dir .. "/stale"))
    assert(fs.write(dir .. "/stale/half-done.txt", "committed by the killed attempt"))
    assert(stale:add_all())
    local kept = assert(stale:commit("the killed attempt's work", { author = { name = "a", email = "a@b" } }))
    stale:close()
    repo:close()
    local run_id = submit()
    killed_attempt(run_id)
    assert.equal("succeeded", (engine:execute(run_id)))
    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'", { run_id }))[1]
    local ws = fix.result.workspace
    assert.equal("factory-run1-fix-1-2", ws.branch)
    repo = assert(git.open(repo_dir))
    assert.same({ "factory-run1-fix-1", "factory-run1-fix-1-2", "main" }, branch_names(repo))
    for _, b in ipairs(repo:branches()) do
      if b.name == "factory-run1-fix-1" then assert.equal(kept, b.oid) end
    end
    repo:close()
    -- The new attempt started from the killed one's commit, and was told so; the
    -- stage's change is counted from where the stage starts, so it holds both.
    local from = started_from("fix")
    assert.same({ stage = "fix", branch = "factory-run1-fix-1", commit = kept, continued = true }, from)
    assert.equal(main_before, ws.base)
    local paths = {}
    for _, f in ipairs(ws.diff_stats.per_file) do paths[#paths + 1] = f.path end
    table.sort(paths)
    assert.same({ "half-done.txt", "src/calc.c" }, paths)
    local told = system_of("fix")
    assert.contains("This stage was stopped before it finished, after its agent had changed files: this worktree"
      .. " starts from the commit that holds that work (" .. kept:sub(1, 10) .. ")", told)
    local fresh = dir .. "/fresh"
    assert.equal(0, assert(proc.run{ argv = { "git", "clone", "-q", "-b", ws.branch, repo_dir, fresh },
                                     env = GIT_ENV }).code)
    assert.equal("committed by the killed attempt", fs.read(fresh .. "/half-done.txt"))
  end)

  it("a run's second build stage starts from the commit the first left, and says so", function()
    assert(fs.write(dir .. "/project/pipelines/twofix.lua", 'return pipeline "twofix" {\n'
      .. '  stage "backend" { team = "backend_engineering", workspace = "worktree" },\n'
      .. '  stage "frontend" { team = "backend_engineering", workspace = "worktree" },\n}'))
    onefix_engine()
    fake:script{
      call("write_file", { path = "api.txt", text = "GET /tasks\n" }),
      call("finish", { status = "COMPLETE", reasoning = "r", artifact = "the API" }),
      call("read_file", { path = "api.txt" }),
      call("write_file", { path = "ui.txt", text = "a list of tasks\n" }),
      call("finish", { status = "COMPLETE", reasoning = "r", artifact = "the UI" }),
    }
    local run_id = assert(engine:submit{ pipeline = "twofix", title = "tasks page", repo = repo_dir,
                                         external_id = "two-1" })
    assert.equal("succeeded", (engine:execute(run_id)))
    local ws = workspaces(run_id)
    assert.equal(ws.backend.commit, ws.frontend.base)
    -- The frontend's agent read what the backend's wrote, and its branch holds both.
    local read = json.decode(fake:requests()[4].body).messages
    assert.equal("GET /tasks\n", read[#read].content)
    assert.same({ { path = "ui.txt", insertions = 1, deletions = 0 } }, ws.frontend.diff_stats.per_file)
    local check = dir .. "/check"
    local repo = assert(git.open(repo_dir))
    assert(repo:worktree_add("check", check, { base = ws.frontend.branch }))
    assert.equal("GET /tasks\n", fs.read(check .. "/api.txt"))
    assert.equal("a list of tasks\n", fs.read(check .. "/ui.txt"))
    assert(repo:worktree_remove("check", { force = true }))
    local from = started_from("frontend")
    assert.same({ stage = "backend", branch = ws.backend.branch, commit = ws.backend.commit }, from)
    -- A resumed run whose earlier branch was deleted meanwhile starts from HEAD and says so.
    assert(repo:branch_delete(ws.frontend.branch))
    assert(repo:branch_delete(ws.backend.branch))
    repo:close()
    assert(store:exec("DELETE FROM stage_results WHERE run_id = ? AND stage = 'frontend'", { run_id }))
    assert(store:exec("UPDATE runs SET state = 'stopped', stage_index = 1 WHERE id = ?", { run_id }))
    fake:script{ call("write_file", { path = "ui.txt", text = "again\n" }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "the UI" }) }
    events = {}
    assert.equal("succeeded", (engine:execute(run_id)))
    for _, ev in ipairs(events) do
      if ev.kind == "workspace_started" then from = ev.data.from end
    end
    assert.same({ stage = "backend", branch = ws.backend.branch, gone = true }, from)
  end)

  it("the operative's command_timeout is how long its agent's commands may run, and the model is told", function()
    local team = dir .. "/project/teams/backend_engineering.lua"
    local text, subs = assert(fs.read(team)):gsub("max_iterations = 20,",
      "max_iterations = 20,\n    command_timeout = 1, max_tokens = 3000,", 1)
    assert.equal(1, subs)
    assert(fs.write(team, text))
    onefix_engine()
    fake:script{ call("run_command", { command = "sleep 5; echo never" }),
                 call("finish", { status = "COMPLETE", reasoning = "the tests are too slow to run here",
                                  artifact = "nothing changed" }) }
    local t0 = require("factory.core.time").monotonic()
    local run_id = assert(engine:submit{ pipeline = "onefix", title = "slow tests", body = "x", repo = repo_dir,
                                         external_id = "slow-1" })
    assert.equal("succeeded", (engine:execute(run_id)))
    assert.truthy(require("factory.core.time").monotonic() - t0 < 4)
    local seen
    for _, m in ipairs(json.decode(fake:requests()[2].body).messages) do
      if m.role == "tool" then seen = m.content end
    end
    assert.equal("timed out after 1 s: killed (a team's operative sets the limit: command_timeout)", seen)
    -- The operative's max_tokens is its agent's too.
    assert.equal(3000, json.decode(fake:requests()[1].body).max_tokens)
  end)

  -- Recorded, a command outlives no killed engine: the next run or resume reaps it
  -- (run_kill_spec shows the reaping with a CLI agent).
  it("records each command the built-in agent runs while it runs, and forgets it after", function()
    onefix_engine()
    fake:script{ call("run_command", { command = "sleep 0.5" }),
                 call("finish", { status = "COMPLETE", reasoning = "r", artifact = "nothing changed" }) }
    local run_id = assert(engine:submit{ pipeline = "onefix", title = "a command", body = "x", repo = repo_dir,
                                         external_id = "command-1" })
    local seen
    local watcher = fiber.spawn(function()
      for _ = 1, 200 do
        local rows = store:query("SELECT owner, data FROM locks WHERE name LIKE 'agent:%'")
        if rows[1] then seen = rows[1] return end
        fiber.sleep(0.01)
      end
    end)
    assert.equal("succeeded", (engine:execute(run_id)))
    fiber.join(watcher)
    assert(seen, "no record while the command ran")
    assert.equal(engine.owner, seen.owner)
    assert.equal(run_id, seen.data.run)
    assert.equal("fix", seen.data.stage)
    assert.same({}, store:query("SELECT name FROM locks WHERE name LIKE 'agent:%'"))
  end)

  it("a repository that is not a git repository: the stage runs without a worktree and says why", function()
    local plain = dir .. "/plain"
    assert(fs.mkdir_p(plain))
    fake:script{ complete("repro"), complete("changed nothing"), complete("report"), complete("note") }
    local run_id = submit(plain)
    assert.equal("succeeded", (engine:execute(run_id)))
    local skipped = {}
    for _, ev in ipairs(events) do
      if ev.kind == "workspace_skipped" then skipped[ev.data.stage] = ev.data end
    end
    assert.same({ stage = "fix", reason = plain .. " is not a git repository" }, skipped.fix)
    assert.same({ stage = "verify", reason = plain .. " is not a git repository", read = true }, skipped.verify)
    assert.same({ "fix", "release_note", "triage", "verify" }, (function()
      local names = {}
      for name in pairs(skipped) do names[#names + 1] = name end
      table.sort(names)
      return names
    end)())
    assert.equal(4, fake:count())
    -- A directory inside a repository (a monorepo's service): the message names the top.
    assert.same({ false, ("%s/src is not a git repository but a directory inside %s (give --repo %s for a worktree)")
      :format(repo_dir, repo_dir, repo_dir), repo_dir }, { build.applies({ repo = repo_dir .. "/src" }) })
  end)

  it("a run given no repository: only the stages that were to change code say they run without one", function()
    fake:script{ complete("repro"), complete("changed nothing"), complete("report"), complete("note") }
    local run_id = assert(engine:submit{ pipeline = "bugfix", title = "calc_sub", external_id = "calc-none" })
    assert.equal("succeeded", (engine:execute(run_id)))
    local skipped = {}
    for _, ev in ipairs(events) do
      if ev.kind == "workspace_skipped" then
        skipped[#skipped + 1] = ev.data.stage .. ": " .. ev.data.reason
      end
    end
    assert.same({ "triage: the run names no repository (--repo)", "fix: the run names no repository (--repo)",
                  "release_note: the run names no repository (--repo)" }, skipped)
  end)

  it("a workspace = \"read\" stage runs its operative's tools on the latest change, and keeps nothing", function()
    local replies = { complete("# Reproduction\nmake test fails on calc_sub") }
    for _, r in ipairs(FIX) do replies[#replies + 1] = r end
    for _, r in ipairs{
      call("run_command", { command = "make -s test" }),
      call("write_file", { path = "src/calc.c", text = "scratch\n" }),
      call("write_file", { path = "notes.txt", text = "a scratch note\n" }),
      call("finish", { status = "COMPLETE", reasoning = "ran it", artifact = "# Test report\nmake test passes",
                       verified_facts = { "make -s test: all checks passed" } }),
    } do replies[#replies + 1] = r end
    replies[#replies + 1] = complete("CHANGELOG: fixed calc_sub")
    fake:script(replies)
    local main_before = branch_oid("main")
    local run_id = submit()
    -- Another run holds the file: a stage that keeps nothing takes no lock, so is not stopped by one.
    assert(locks.acquire(store, { repo = repo_dir, path = "src/calc.c", owner = "run:99/fix" }))
    assert.equal("succeeded", (engine:execute(run_id)))
    local ws = workspaces(run_id)
    -- The fix could not edit the locked file; the verify stage read the fix's starting point, HEAD.
    assert.same({ base = main_before, read = true, discarded = 2 }, ws.verify)
    local outcome = {}
    for _, ev in ipairs(events) do
      if ev.kind == "tool_call" and ev.data.stage == "verify" then
        outcome[#outcome + 1] = ev.data.name .. (ev.data.ok and "" or "!")
      elseif (ev.kind == "workspace_started" or ev.kind == "workspace_done") and ev.data.stage == "verify" then
        outcome[#outcome + 1] = ev.kind .. (ev.data.read and ":read" or "")
      end
    end
    assert.equal("workspace_started:read run_command write_file write_file finish workspace_done:read",
      table.concat(outcome, " "))
    -- A command's event says what it was and how it ended: HEAD's tests fail.
    for _, ev in ipairs(events) do
      if ev.kind == "tool_call" and ev.data.stage == "verify" and ev.data.name == "run_command" then
        assert.same({ name = "run_command", ok = true, command = "make -s test", exit = 2, stage = "verify" }, ev.data)
      end
    end
    -- The model was told that nothing is kept, and offered the operative's tools only.
    local body
    for _, r in ipairs(fake:requests()) do
      local b = json.decode(r.body)
      if b.messages[1].content:find("objective: stage verify", 1, true) and not body then body = b end
    end
    assert.contains(builtin.READ_SYSTEM, body.messages[1].content)
    local offered = {}
    for _, t in ipairs(body.tools) do offered[#offered + 1] = t["function"].name end
    table.sort(offered)
    assert.same({ "finish", "grep", "list_dir", "read_file", "run_command", "write_file" }, offered)
    -- No branch or worktree of the stage is left; main is untouched and still fails.
    local repo = assert(git.open(repo_dir))
    assert.equal(0, #repo:worktrees())
    for _, b in ipairs(repo:branches()) do assert.falsy(b.name:find("verify", 1, true), b.name) end
    repo:close()
    assert.equal(main_before, branch_oid("main"))
    assert.equal(nil, fs.stat(repo_dir .. "/notes.txt"))
    assert.truthy(make_test(repo_dir).code ~= 0)
  end)

  it("a stage agent's TaskResult that stays invalid is sent back the pipeline's `retries` times, then escalated",
    function()
    local replies = { complete("# Reproduction\nmake test fails on calc_sub") }
    for _, r in ipairs(FIX) do replies[#replies + 1] = r end
    for _ = 1, 3 do replies[#replies + 1] = { content = '{"status": "PASSED", "reasoning": "tests pass"}' } end
    fake:script(replies)
    local run_id = submit()
    local state = engine:execute(run_id)
    assert.equal("waiting", state)
    local escalated
    for _, ev in ipairs(events) do
      if ev.kind == "escalated" then escalated = ev.data.reason end
    end
    assert.contains('no valid TaskResult after 3 attempts: status must be COMPLETE, NEEDS_CLARIFICATION or BLOCKED,'
      .. ' got "PASSED"', escalated)
    assert.equal(3, #(function()
      local out = {}
      for _, ev in ipairs(events) do
        if ev.kind == "task_result_invalid" then out[#out + 1] = ev end
      end
      return out
    end)())
  end)

  it("the shipped full pipeline: 17 stages, reviews read the latest change, the changing stages build on it",
    function()
    copy(ROOT .. "pipelines/full.lua", dir .. "/project/pipelines/full.lua")
    onefix_engine()
    local replies = {}
    for _, st in ipairs({ "product", "analysis", "compliance", "ux", "architecture", "api", "database" }) do
      replies[#replies + 1] = complete("# " .. st)
    end
    replies[#replies + 1] = call("edit_file", { path = "src/calc.c", old = "int calc_sub(int a, int b) { return a + b; }",
                                                new = "int calc_sub(int a, int b) { return a - b; }" })
    replies[#replies + 1] = complete("# backend: calc_sub fixed")
    for _, st in ipairs({ "frontend", "integration", "data", "ml" }) do replies[#replies + 1] = complete("# " .. st) end
    replies[#replies + 1] = call("run_command", { command = "make -s test" })
    replies[#replies + 1] = complete("# qa: make test passes")
    for _, st in ipairs({ "security_review", "devops", "operations" }) do replies[#replies + 1] = complete("# " .. st) end
    replies[#replies + 1] = call("write_file", { path = "CHANGELOG.md", text = "- Fixed calc_sub\n" })
    replies[#replies + 1] = complete("# docs")
    fake:script(replies)
    local main_before = branch_oid("main")
    local run_id = assert(engine:submit{ pipeline = "full", title = "calc_sub", repo = repo_dir, external_id = "full-1" })
    local state, detail = engine:execute(run_id)
    assert.equal("succeeded", state, detail and detail.reason)
    assert.equal(#replies, fake:count())
    local ws = workspaces(run_id)
    for _, st in ipairs({ "product", "analysis", "compliance", "ux", "architecture", "api" }) do
      assert.same({ base = main_before, read = true, discarded = 0 }, ws[st], st)
    end
    assert.equal(main_before, ws.backend.base)
    for _, st in ipairs({ "qa", "security_review", "operations" }) do
      assert.same({ base = ws.backend.commit, read = true, discarded = 0 }, ws[st], st)
    end
    for _, st in ipairs({ "database", "frontend", "integration", "data", "ml", "devops" }) do
      assert.equal(nil, ws[st].commit, st) -- changed nothing: no commit, no branch
      assert.equal(nil, ws[st].branch, st)
    end
    assert.equal(ws.backend.commit, ws.docs.base)
    assert.equal(0, command_of("qa").exit)
    -- Two branches: the fix, and the docs on top of it, which pass the tests.
    local repo = assert(git.open(repo_dir))
    assert.equal(0, #repo:worktrees())
    local names = {}
    for _, b in ipairs(repo:branches()) do names[#names + 1] = b.name end
    table.sort(names)
    assert.same({ "factory-run" .. run_id .. "-backend-1", "factory-run" .. run_id .. "-docs-1", "main" }, names)
    repo:close()
    local fresh = dir .. "/fresh"
    assert.equal(0, assert(proc.run{ argv = { "git", "clone", "-q", "-b", ws.docs.branch, repo_dir, fresh },
                                     env = GIT_ENV }).code)
    assert.equal("- Fixed calc_sub\n", fs.read(fresh .. "/CHANGELOG.md"))
    assert.equal(0, make_test(fresh).code)
  end)

  it("a read stage starts from the latest change, so it runs the code the build stage wrote", function()
    local replies = { complete("# Reproduction\nmake test fails on calc_sub") }
    for _, r in ipairs(FIX) do replies[#replies + 1] = r end
    replies[#replies + 1] = call("run_command", { command = "make -s test" })
    replies[#replies + 1] = complete("# Test report\nall checks passed")
    replies[#replies + 1] = complete("CHANGELOG: fixed calc_sub")
    fake:script(replies)
    local run_id = submit()
    assert.equal("succeeded", (engine:execute(run_id)))
    local ws = workspaces(run_id)
    assert.equal(ws.fix.commit, ws.verify.base)
    -- The tool result the model saw: the repository's tests pass on the fix.
    local seen
    for _, r in ipairs(fake:requests()) do
      local m = json.decode(r.body).messages
      if m[1].content:find("objective: stage verify", 1, true) and m[#m].role == "tool" then seen = m[#m].content end
    end
    assert.contains("exit code 0", seen)
    assert.contains("all checks passed", seen)
    local from = started_from("verify")
    assert.same({ stage = "fix", branch = ws.fix.branch, commit = ws.fix.commit }, from)
  end)

  it("a stage's workspace other than \"worktree\" or \"read\" is refused with file:line", function()
    local p = dsl.project(dir .. "/project")
    assert(fs.write(dir .. "/project/pipelines/odd.lua", 'return pipeline "odd" {\n  stage "x" {\n'
      .. '    team = "backend_engineering", workspace = "container" },\n}'))
    local problems = p:load()
    assert.equal(1, #problems)
    assert.matches("odd%.lua:2: .*workspace must be \"worktree\"", problems[1])
  end)

  it("an operative with agent = { cli = ... } runs the CLI agent loop in the worktree", function()
    local state = fake_cli_agent()
    onefix_engine()
    local run_id = assert(engine:submit{ pipeline = "onefix", title = "calc_sub is wrong", repo = repo_dir,
                                         external_id = "cli-agent" })
    local st, detail = engine:execute(run_id)
    assert.equal("succeeded", st, detail and detail.reason)
    assert.equal(0, fake:count()) -- the CLI agent, not the router, did the work
    assert.equal("2", (assert(fs.read(state .. "/calls")):gsub("%s+$", "")))
    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ?", { run_id }))[1].result
    assert.equal("COMPLETE", fix.status)
    local ws = fix.workspace
    assert.equal(1, ws.diff_stats.files)
    assert.equal("progress.txt", ws.diff_stats.per_file[1].path) -- SPEC.md and .ai/ never reach the branch
    assert.contains("agent_iteration", kinds())
    assert.contains("agent_done", kinds())
    local stored = assert(store:query("SELECT kind FROM events WHERE run_id = ? AND kind = 'agent_progress'",
                                      { run_id }))
    assert.equal(0, #stored) -- live progress is shown, not stored
    -- The learning the agent left is stored with its team and repository.
    local learned = assert(store:query("SELECT team, repo, text FROM learnings ORDER BY id"))
    assert.equal(2, #learned)
    assert.equal("backend_engineering", learned[1].team)
    assert.equal(repo_dir, learned[1].repo)
    assert.equal("The calc tests run with `make -s test` from the repository root", learned[1].text)
  end)

  it("a CLI agent in a read stage works in a checkout of the latest change, and nothing it writes is kept", function()
    local state = fake_cli_agent()
    assert(fs.write(dir .. "/project/pipelines/onereview.lua", 'return pipeline "onereview" {\n'
      .. '  stage "review" { team = "backend_engineering", workspace = "read",\n'
      .. '    acceptance = { "calc_sub reviewed", "make test run" } },\n}'))
    onefix_engine()
    local main_before = branch_oid("main")
    local run_id = assert(engine:submit{ pipeline = "onereview", title = "review calc_sub", repo = repo_dir,
                                         external_id = "cli-review" })
    local st, detail = engine:execute(run_id)
    assert.equal("succeeded", st, detail and detail.reason)
    assert.equal("2", (assert(fs.read(state .. "/calls")):gsub("%s+$", "")))
    local review = assert(store:query("SELECT result FROM stage_results WHERE run_id = ?", { run_id }))[1].result
    assert.equal("COMPLETE", review.status)
    assert.equal(main_before, review.workspace.base)
    assert.truthy(review.workspace.read)
    assert.truthy(review.workspace.discarded >= 1, review.workspace.discarded) -- its progress.txt
    local repo = assert(git.open(repo_dir))
    assert.equal(0, #repo:worktrees())
    for _, b in ipairs(repo:branches()) do assert.falsy(b.name:find("review", 1, true), b.name) end
    repo:close()
    assert.equal(main_before, branch_oid("main"))
  end)

  it("a CLI agent's model calls go through a proxy of the engine, counted for its team and run", function()
    -- The agent: one chat call through the proxy in its environment, with the model its
    -- environment names (the operative's), then the box checked.
    local script = [[
set -e
curl -s -f -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" \
  -d '{"model":"'"$ANTHROPIC_MODEL"'","messages":[{"role":"user","content":"fix it"}]}' \
  "$OPENAI_BASE_URL/chat/completions" > reply.json
printf '%s\n' "$OPENAI_API_KEY" > key.txt
sed -i 's/- \[ \]/- [x]/' SPEC.md
echo done
]]
    local team = assert(fs.read(ROOT .. "teams/backend_engineering.lua"))
    team = team:gsub('operative "implementer" {', ('operative "implementer" {\n    agent = { cli = "script", '
      .. 'command = { "sh", "-c", %q }, format = "plain", heartbeat_timeout = 5 },'):format(script), 1)
    assert(fs.write(dir .. "/project/teams/backend_engineering.lua", team))
    -- Priced, so that the team's budget (25 USD a day) holds the proxied call in the store's ledger.
    local cfg = fake:router_config{ ["factory/architect"] = "architect", ["factory/coder"] = "coder",
                                    ["factory/fast"] = "fast", ["factory/cheap"] = "cheap" }
    cfg.prices = { ["fake/coder"] = { input = 1, output = 1 } }
    assert(router.configure(cfg))
    onefix_engine()
    fake:script{ { content = "the fix is a - b" } }
    local run_id = assert(engine:submit{ pipeline = "onefix", title = "calc_sub is wrong", repo = repo_dir,
                                         external_id = "cli-proxy" })
    local st, detail = engine:execute(run_id)
    assert.equal("succeeded", st, detail and detail.reason)
    assert.equal(1, fake:count())
    -- The upstream saw the provider's key; the agent only ever had its virtual key.
    assert.equal("Bearer " .. fake_model.API_KEY, fake:requests()[1].headers["authorization"])
    local calls = assert(store:query("SELECT team, run_id, alias, status, cost_usd FROM model_calls"))
    assert.equal(1, #calls)
    assert.truthy(calls[1].cost_usd > 0, "priced")
    assert.equal(0, #assert(store:query("SELECT id FROM budget_holds")), "its hold went with its record")
    assert.equal("backend_engineering", calls[1].team)
    assert.equal(run_id, calls[1].run_id)
    assert.equal("factory/coder", calls[1].alias)
    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ?", { run_id }))[1].result
    local files = {}
    for _, f in ipairs(fix.workspace.diff_stats.per_file) do files[#files + 1] = f.path end
    assert.equal("key.txt reply.json", table.concat(files, " "))
  end)

  it("a file another objective holds is a recorded conflict, not an overwrite", function()
    assert(locks.acquire(store, { repo = repo_dir, path = "src/calc.c", owner = "run:99/fix" }))
    script_run()
    local run_id = submit()
    assert.equal("succeeded", (engine:execute(run_id)))
    local fix = assert(store:query("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'fix'", { run_id }))[1]
    assert.equal(nil, fix.result.workspace.commit) -- the edit was refused: nothing to commit
    -- and no branch is left that would only repeat the base
    assert.equal(nil, fix.result.workspace.branch)
    local repo = assert(git.open(repo_dir))
    assert.same({ "main" }, branch_names(repo))
    repo:close()
    local conflicts = assert(store:query("SELECT data FROM events WHERE kind = 'file_conflict'"))
    assert.equal(1, #conflicts)
    assert.equal("run:" .. run_id .. "/fix", conflicts[1].data.owner)
    local mail = assert(store:query("SELECT sender, recipient, subject FROM mail WHERE kind = 'conflict'"))
    assert.equal(1, #mail)
    assert.equal("backend_engineering", mail[1].recipient)
    assert.equal("file conflict: src/calc.c", mail[1].subject)
    -- The run's own locks are gone; the other objective's stays.
    assert.same({}, locks.held(store, "run:" .. run_id .. "/fix"))
    assert.equal("run:99/fix", locks.holder(store, { repo = repo_dir, path = "src/calc.c" }).owner)
  end)

  -- The engine's agent pool (factory.lua's agents section) holds build stages of
  -- parallel runs to its places and pays their agents from the daily budget.

  it("parallel runs' build stages wait for a place in the agent pool", function()
    onefix_engine{ max_concurrent = 1 }
    local replies = {}
    for _ = 1, 2 do
      for _, r in ipairs(FIX) do replies[#replies + 1] = r end
    end
    fake:script(replies)
    local runs, fibers = {}, {}
    for i = 1, 2 do
      runs[i] = assert(engine:submit{ pipeline = "onefix", title = "calc_sub is wrong " .. i, repo = repo_dir,
                                      external_id = "pool-" .. i })
    end
    for i = 1, 2 do fibers[i] = fiber.spawn(function() return engine:execute(runs[i]) end) end
    local ok, outcomes = fiber.all(fibers)
    assert.equal(true, ok)
    for i = 1, 2 do assert.equal("succeeded", outcomes[i][1]) end
    -- One agent at a time: each worktree is done before the next one starts.
    local seq = {}
    for _, ev in ipairs(events) do
      if ev.kind == "workspace_started" or ev.kind == "workspace_done" then seq[#seq + 1] = ev.kind end
    end
    assert.same({ "workspace_started", "workspace_done", "workspace_started", "workspace_done" }, seq)
    local paid = assert(store:query("SELECT COUNT(*) AS n FROM events WHERE kind = 'agent_iteration'"))[1].n
    assert.equal(2, paid)
  end)

  it("a spent daily iteration budget blocks the build stage with the reason, before any worktree", function()
    onefix_engine{ daily_iterations = 0 }
    local run_id = assert(engine:submit{ pipeline = "onefix", title = "calc_sub is wrong", repo = repo_dir,
                                         external_id = "pool-budget" })
    local st, esc = engine:execute(run_id)
    assert.equal("waiting", st)
    assert.equal("BLOCKED: the daily budget of 0 agent iterations is used up (0 today, UTC)", esc.reason)
    assert.equal(0, fake:count())
    local repo = assert(git.open(repo_dir))
    assert.equal(0, #repo:worktrees())
    assert.equal(1, #repo:branches())
    repo:close()
  end)

  it("a CLI agent pays each process from the daily budget and stops, BLOCKED, when it is spent", function()
    local state = fake_cli_agent()
    onefix_engine{ daily_iterations = 1 }
    local run_id = assert(engine:submit{ pipeline = "onefix", title = "calc_sub is wrong", repo = repo_dir,
                                         external_id = "cli-budget" })
    local st, esc = engine:execute(run_id)
    assert.equal("waiting", st)
    assert.equal("1", (assert(fs.read(state .. "/calls")):gsub("%s+$", ""))) -- the second process never started
    assert.equal("BLOCKED: the daily budget of 1 agent iterations is used up (1 today, UTC)", esc.reason)
    -- Each process is counted once: by the pool, not again from the agent's own event.
    local paid = assert(store:query("SELECT COUNT(*) AS n FROM events WHERE kind = 'agent_iteration'"))[1].n
    assert.equal(1, paid)
  end)
end)
