-- Acceptance 2: `factory run` killed with SIGKILL at 20 random moments of a run
-- against the replay provider; each restart completes the run, no stage runs again
-- after it completed, and the audit chain verifies.
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local fs = require "factory.core.fs"
local host = require "factory.core.host"
local time = require "factory.core.time"
local db = require "factory.db"
local audit = require "factory.audit"
local dsl = require "factory.dsl"
local pipeline = require "factory.pipeline"
local locks = require "factory.agents.locks"
local git = require "factory.git"
local orchestrator = require "factory.agents.orchestrator"

local ROOT = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../"
local sample_repo = dofile(ROOT .. "tests/tools/sample_repo.lua")
local TRIALS = 20

local dir, replay, tasks_repo

-- A replay server answering after delay seconds, logging to dir/NAME.log, and the
-- factory.lua that routes every alias to it (dir/CONFIG.lua); extra: more of it.
local function replay_server(delay, name, config, extra)
  local server = assert(proc.spawn{ argv = { host.exe, ROOT .. "examples/replay/server.lua", "--delay", delay,
                                             "--log", dir .. "/" .. name .. ".log" } })
  local url = assert(server:read_line())
  assert(fs.write(dir .. "/" .. config .. ".lua", ([[
providers { replay = { base_url = %q, api_key = "replay-no-key" } }
models { ["factory/architect"] = { "replay/r" }, ["factory/coder"] = { "replay/r" },
         ["factory/fast"] = { "replay/r" }, ["factory/cheap"] = { "replay/r" } }
%s]]):format(url .. "/v1", extra or "")))
  return server
end

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir))
  -- The repository the `feature` runs build in: the replayed agent writes its change there.
  tasks_repo = sample_repo.make(dir .. "/tasks", "sample-repo")
  replay = replay_server("0.02", "replay", "factory")
end)

after_each(function()
  replay:kill("KILL")
  replay:wait()
  replay:close()
  assert(fs.remove(dir, { recursive = true }))
end)

-- args may give a --config or --project of their own.
local function factory(args)
  local argv = { host.exe }
  local given = {}
  for _, a in ipairs(args) do
    argv[#argv + 1] = a
    given[a] = true
  end
  for _, option in ipairs({ { "--config", dir .. "/factory.lua" }, { "--db", "sqlite:" .. dir .. "/factory.db" },
                            { "--project", ROOT } }) do
    if not given[option[1]] then
      argv[#argv + 1], argv[#argv + 2] = option[1], option[2]
    end
  end
  return assert(proc.spawn{ argv = argv, stdout = "pipe", stderr = "stdout" })
end

local function title(n) return "Tasks can have a due date, trial " .. n end

local function start(n)
  return factory{ "run", "feature", "--repo", tasks_repo, "--issue", title(n) }
end

local function runs_of(store, n)
  return assert(store:query("SELECT r.id, r.state FROM runs r JOIN work_items w ON w.id = r.work_item_id"
    .. " WHERE w.title = ?", { title(n) }))
end

local function finish(p)
  local status = p:wait()
  local out = {}
  while true do
    local chunk = p:read()
    if not chunk then break end
    out[#out + 1] = chunk
  end
  p:close()
  return status, table.concat(out)
end

-- The replay log's requests since t0: { at, team, objective }.
local function requests(t0)
  local out = {}
  for line in (fs.read(dir .. "/replay.log") or ""):gmatch("[^\n]+") do
    local at, team, objective = line:match("^([%d.]+)\t(%S+)\t(.+)$")
    if tonumber(at) >= t0 then out[#out + 1] = { at = tonumber(at), team = team, objective = objective } end
  end
  return out
end

describe("factory run under kill -9", function()
  it("completes after a kill at any moment, never re-running a finished stage", function()
    -- How long an undisturbed run takes bounds the moments to kill at.
    local t = time.monotonic()
    local status = finish(start(0))
    assert.equal(0, status.code)
    local full = time.monotonic() - t
    math.randomseed(os.time())
    local killed = 0
    for n = 1, TRIALS do
      local t0 = time.now()
      local p = start(n)
      fiber.sleep(math.random() * full)
      p:kill("KILL")
      if finish(p).signal == 9 then
        killed = killed + 1
        -- Restarted by the same command, or (every other time) by `factory resume RUN`.
        local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
        local before = runs_of(store, n)
        store:close()
        local out
        if n % 2 == 0 and before[1] then
          status, out = finish(factory{ "resume", tostring(before[1].id) })
        else
          status, out = finish(start(n))
        end
        assert.equal(0, status.code, out)
        assert.contains("succeeded (feature)", out)
      end
      local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
      local run = runs_of(store, n)
      assert.equal(1, #run, "one run per work item")
      assert.equal("succeeded", run[1].state)
      local done = {}
      for _, r in ipairs(store:query("SELECT stage, created_at FROM stage_results WHERE run_id = ? AND"
        .. " status = 'COMPLETE'", { run[1].id })) do
        assert.is_nil(done[r.stage], "stage " .. r.stage .. " completed twice")
        done[r.stage] = r.created_at
      end
      for _, req in ipairs(requests(t0)) do
        local stage = req.objective:match("^stage (.*)$")
        if stage then
          assert.truthy(done[stage], "a request for an unknown stage " .. stage)
          assert.truthy(req.at < done[stage], ("stage %s was asked again after it completed"):format(stage))
        end
      end
      store:close()
    end
    print(("     %d of %d runs were killed mid-way"):format(killed, TRIALS))
    assert.truthy(killed >= TRIALS / 2, ("only %d of %d runs were still running when killed"):format(killed, TRIALS))
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert.truthy(audit.verify(store))
    store:close()
  end, { timeout = 60 })

  it("Ctrl-C stops it saying how to continue, and `factory resume` finishes the run", function()
    local t0 = time.now()
    local p = start(1)
    local deadline = time.monotonic() + 10
    while #requests(t0) < 2 and time.monotonic() < deadline do fiber.sleep(0.005) end
    p:kill("INT")
    local status, out = finish(p)
    assert.equal(2, status.signal, out)
    local id = assert(tonumber(out:match("interrupted %(SIGINT%): run (%d+) stops here")), out)
    assert.contains(("its finished stages are kept. Continue it with: factory resume %d\n"):format(id), out)
    status, out = finish(factory{ "resume", tostring(id) })
    assert.equal(0, status.code, out)
    assert.contains(("run %d succeeded (feature)"):format(id), out)
  end, { timeout = 30 })

  it("Ctrl-C during a model call records the call as cancelled, with its cost, and leaves the run resumable",
     function()
    -- A provider that takes its time: the call is still with it when Ctrl-C comes.
    local slow = replay_server("30", "slow", "slow", [[prices { ["replay/r"] = { input = 3, output = 15 } }]])
    local p = factory{ "run", "feature", "--repo", tasks_repo, "--issue", title(2), "--config", dir .. "/slow.lua" }
    local deadline = time.monotonic() + 10
    while not (fs.read(dir .. "/slow.log") or ""):find("\n") and time.monotonic() < deadline do fiber.sleep(0.005) end
    p:kill("INT")
    local status, out = finish(p)
    slow:kill("KILL")
    slow:wait()
    slow:close()
    assert.equal(2, status.signal, out)
    assert.contains("1 model call(s) in flight stopped, recorded as cancelled with what they cost", out)
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    local calls = assert(store:query("SELECT team, status, code, error, prompt_tokens, cost_usd FROM model_calls"))
    local run = runs_of(store, 2)[1]
    local results = assert(store:query("SELECT COUNT(*) AS n FROM stage_results"))[1].n
    local asked = assert(store:query("SELECT COUNT(*) AS n FROM mail WHERE kind = 'escalation'"))[1].n
    assert.truthy(audit.verify(store))
    store:close()
    assert.equal(1, #calls, out)
    local c = calls[1]
    assert.same({ "business_analysis", "cancelled", "ECANCELED", "the run was interrupted (SIGINT)" },
                { c.team, c.status, c.code, c.error })
    -- The provider had the request: its prompt is paid for.
    assert.truthy(c.prompt_tokens > 0 and c.cost_usd > 0, out)
    -- Nothing acted on the stopped call: no result, no question for a human, the run still running.
    assert.equal(0, results)
    assert.equal(0, asked)
    assert.equal("running", run.state)
    status, out = finish(factory{ "resume", tostring(run.id) })
    assert.equal(0, status.code, out)
  end, { timeout = 30 })

  it("a store that takes no more writes (a full disk) stops the run, and the summary says so and how to go on",
     function()
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert(store:migrate())
    -- What a full disk does to every write, done to two: a stage's result and the stop.
    assert(store:script([[
CREATE TRIGGER full_results BEFORE INSERT ON stage_results BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END;
CREATE TRIGGER full_runs BEFORE UPDATE OF state ON runs WHEN NEW.state = 'stopped'
  BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END;]]))
    store:close()
    local status, out = finish(start(4))
    assert.equal(1, status.code, out)
    local id = assert(tonumber(out:match("\nrun (%d+) stopped %(feature%)")), out)
    assert.contains("disk full (test)", out)
    assert.contains("(the store could not record the stop either)", out)
    assert.contains(("continue it with: factory resume %d"):format(id), out)
  end, { timeout = 30 })

  it("refuses a pipeline the project does not have, naming those it has, before making a store", function()
    local status, out = finish(factory{ "run", "featrue", "--repo", tasks_repo, "--issue", title(3),
                                        "--db", "sqlite:" .. dir .. "/fresh.db" })
    assert.equal(1, status.code, out)
    assert.equal('factory: ENOENT: no pipeline "featrue" (pipelines: bugfix, feature, full)\n', out)
    assert.is_nil(fs.stat(dir .. "/fresh.db"), "no store was made")
    status, out = finish(factory{ "run", "feature", "--repo", tasks_repo, "--issue", title(3),
                                  "--project", tasks_repo, "--db", "sqlite:" .. dir .. "/fresh.db" })
    assert.equal(1, status.code, out)
    assert.contains('no pipeline "feature": no pipelines/*.lua in ' .. tasks_repo, out)
    assert.is_nil(fs.stat(dir .. "/fresh.db"), "no store was made")
  end, { timeout = 30 })

  it("reads a work item file saved with CRLF line ends and a byte-order mark as the same item", function()
    local body = "# Tasks can have a due date, from a file\n\nUsers want due dates.\n"
    assert(fs.write(dir .. "/unix.md", body))
    assert(fs.write(dir .. "/windows.md", "\239\187\191" .. body:gsub("\n", "\r\n")))
    local status, out = finish(factory{ "run", "feature", "--repo", tasks_repo, "--file",
                                        dir .. "/windows.md" })
    assert.equal(0, status.code, out)
    status, out = finish(factory{ "run", "feature", "--repo", tasks_repo, "--file", dir .. "/unix.md" })
    assert.equal(0, status.code, out)
    assert.contains("has succeeded already", out)
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    local items = assert(store:query("SELECT title, body FROM work_items"))
    store:close()
    assert.same({ { title = "Tasks can have a due date, from a file", body = "\nUsers want due dates.\n" } }, items)
  end, { timeout = 30 })

  it("the same work item run again after it succeeded is not run or paid for twice", function()
    local status, out = finish(start(0))
    assert.equal(0, status.code, out)
    local t0 = time.now()
    status, out = finish(start(0))
    assert.equal(0, status.code, out)
    assert.contains("succeeded (feature)", out)
    assert.contains("of this work item has succeeded already: it is not run or paid for again", out)
    assert.contains("(--again runs it anew)", out)
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert.equal(1, #runs_of(store, 0), "one run per work item")
    store:close()
    assert.equal(0, #requests(t0), "no model call the second time")
    -- --again: a new run of the same work item, paid for again.
    local p = factory{ "run", "feature", "--repo", tasks_repo, "--issue", title(0), "--again" }
    status, out = finish(p)
    assert.equal(0, status.code, out)
    assert.contains("run 2 succeeded (feature)", out)
    store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert.same({ { id = 1, state = "succeeded" }, { id = 2, state = "succeeded" } }, runs_of(store, 0))
    assert.equal(1, #assert(store:query("SELECT id FROM work_items")), "the same work item")
    store:close()
    assert.truthy(#requests(t0) >= 5, "the new run called the model")
  end, { timeout = 30 })
end)

-- A copy of the shipped teams and pipelines whose build stage's operative is a CLI
-- agent running command (an argv template); writing it again changes the command.
local function cli_agent_project(command)
  local project = dir .. "/project"
  for _, sub in ipairs({ "teams", "pipelines" }) do
    assert(fs.mkdir_p(project .. "/" .. sub))
    for _, f in ipairs(assert(fs.list(ROOT .. sub))) do
      assert(fs.write(project .. "/" .. sub .. "/" .. f, assert(fs.read(ROOT .. sub .. "/" .. f))))
    end
  end
  local quoted = {}
  for i, a in ipairs(command) do quoted[i] = ("%q"):format(a) end
  local team = project .. "/teams/backend_engineering.lua"
  local text, n = assert(fs.read(ROOT .. "teams/backend_engineering.lua")):gsub("operative \"implementer\" {",
    'operative "implementer" {\n    agent = { cli = "custom", command = { ' .. table.concat(quoted, ", ") .. " } },")
  assert.equal(1, n)
  assert(fs.write(team, text))
  return project
end

describe("factory run killed while its CLI agent works", function()
  it("kills, on the next start, the agent process the killed run left running", function()
    local pid_file = dir .. "/agent.pid"
    local project = cli_agent_project({ "sh", "-c", "echo $$ > " .. pid_file .. "; echo working; exec sleep 300" })
    local p = factory{ "run", "feature", "--repo", tasks_repo, "--issue", "An agent that outlives us", "--project",
                       project }
    local deadline = time.monotonic() + 20
    while not fs.exists(pid_file) and time.monotonic() < deadline do fiber.sleep(0.02) end
    fiber.sleep(0.1)
    p:kill("KILL")
    finish(p)
    local agent = assert(tonumber(assert(fs.read(pid_file)):match("%d+")), "the agent did not start")
    -- Alive: not gone, nor a zombie waiting for whoever inherited it to reap it.
    local function alive(pid)
      local st = orchestrator.stat(pid)
      return st ~= nil and st.state ~= "Z"
    end
    assert.truthy(alive(agent), "the agent outlives the killed run")
    -- The next start, with an agent that does nothing, reaps the one left.
    cli_agent_project({ "sh", "-c", "exit 0" })
    local status, out = finish(factory{ "resume", "1", "--project", project, "--no-wait" })
    assert.contains(("killed 1 agent process(es) left running by a factory process that died: %d"):format(agent), out)
    assert.equal(3, status.code, out)
    assert.falsy(alive(agent), "the agent is gone")
  end, { timeout = 60 })
end)

describe("factory run that cannot get through its pipeline", function()
  -- The command fails at once, saying each of `says`: no model call, no work item.
  local function refused_before_paying(args, says)
    local t0 = time.now()
    local status, out = finish(factory(args))
    assert.equal(1, status.code, out)
    for _, text in ipairs(says) do assert.contains(text, out) end
    assert.equal(0, #requests(t0), "no model call")
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert.equal(0, #assert(store:query("SELECT id FROM work_items")))
    store:close()
  end

  it("refuses a repository without a commit, which the build stage branches from", function()
    local empty = dir .. "/empty"
    assert(fs.mkdir_p(empty))
    assert.equal(0, assert(proc.run{ argv = { "git", "init", "-q", empty } }).code)
    refused_before_paying({ "run", "feature", "--repo", empty, "--issue", "Nothing to branch from" },
      { ("--repo %s: the repository has no commit yet, and the pipeline's stage build works in a worktree branched"
        .. " from HEAD: commit something first"):format(empty) })
  end, { timeout = 30 })

  it("refuses a --repo that is no git repository for a pipeline whose stages only read the code", function()
    local project = cli_agent_project({ "true" })
    assert(fs.write(project .. "/pipelines/review.lua", 'return pipeline "review" {\n'
      .. '  stage "summary" { team = "business_analysis" },\n'
      .. '  stage "review" { team = "security_engineering", workspace = "read" },\n}'))
    local plain = dir .. "/plain"
    assert(fs.mkdir_p(plain))
    refused_before_paying({ "run", "review", "--repo", plain, "--issue", "Review it", "--project", project },
      { ("--repo %s: %s is not a git repository, and stage review reads the code in a git worktree: give a git"
        .. " repository (git init, then commit the code)"):format(plain, plain) })
  end, { timeout = 30 })

  it("refuses a --repo that is no git repository, or a directory inside one, naming the one to give", function()
    local plain = dir .. "/plain"
    assert(fs.mkdir_p(plain))
    refused_before_paying({ "run", "feature", "--repo", plain, "--issue", "Not a repository" },
      { ("--repo %s: %s is not a git repository, and stage build changes the code in a git worktree: give a git"
        .. " repository (git init, then commit the code)"):format(plain, plain) })
    local inside = tasks_repo .. "/src"
    refused_before_paying({ "run", "feature", "--repo", inside, "--issue", "Inside a repository" },
      { ("--repo %s: %s is not a git repository but a directory inside %s, and stage build changes the code in"
        .. " a git worktree: give --repo %s"):format(inside, fs.realpath(inside), fs.realpath(tasks_repo),
        fs.realpath(tasks_repo)) })
  end, { timeout = 30 })

  it("refuses a pipeline with a team that does not load, naming the stage and the team", function()
    -- factory.lua without factory/fast: the teams that use it do not load.
    local cfg = assert(fs.read(dir .. "/factory.lua")):gsub(',%s*%["factory/fast"%] = { "replay/r" }', "")
    assert(fs.write(dir .. "/factory.lua", cfg))
    refused_before_paying({ "run", "feature", "--repo", tasks_repo, "--issue", "A team is missing" },
      { 'unknown model alias "factory/fast"', "stage build needs team backend_engineering, which did not load" })
  end, { timeout = 30 })

  it("refuses a work item that is not UTF-8 text, saying where", function()
    local file = dir .. "/latin1.md"
    assert(fs.write(file, "# Prices\n\nThe caf\233 page shows \163 5.\n"))
    local t0 = time.now()
    local status, out = finish(factory({ "run", "feature", "--repo", tasks_repo, "--file", file }))
    assert.equal(1, status.code, out)
    assert.contains(("--file %s is not UTF-8 text: byte 0xE9 at line 3, column 8 (Latin-1 or Windows-1252?): save it"
      .. " as UTF-8 and run again"):format(file), out)
    assert.equal(0, #requests(t0), "no model call")
    assert.is_nil(fs.stat(dir .. "/factory.db"), "refused before the store is opened")
  end, { timeout = 30 })

  -- A project whose build stage's agent runs a program that is not installed.
  local function agent_missing_project()
    return cli_agent_project({ "factory-test-no-such-agent", "{prompt}" })
  end
  local NOT_INSTALLED = "stage build: the agent of backend_engineering/implementer runs factory-test-no-such-agent,"
    .. " which is not installed (not found in PATH "

  it("refuses a pipeline whose build stage's CLI agent is not installed, naming the stage and the program", function()
    local project = agent_missing_project()
    local repo = sample_repo.make(dir .. "/calc")
    refused_before_paying({ "run", "feature", "--repo", repo, "--issue", "The agent is not installed", "--project", project },
      { NOT_INSTALLED })
  end, { timeout = 30 })

  -- A run of `feature` submitted by the engine itself (where its repository and agent
  -- were as they should be), not started yet.
  local function submitted(project, title, repo)
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert(store:migrate())
    local defs = dsl.project(project)
    defs:load()
    local engine = pipeline.engine{ db = store, project = defs }
    local run = assert(engine:submit{ pipeline = "feature", title = title, repo = repo })
    engine:close()
    store:close()
    return run
  end

  it("factory resume refuses the same, for a build stage the run has still to do", function()
    local project = agent_missing_project()
    local run = submitted(project, "The agent went away", sample_repo.make(dir .. "/calc"))
    local t0 = time.now()
    local status, out = finish(factory{ "resume", tostring(run), "--project", project })
    assert.equal(1, status.code, out)
    assert.contains(NOT_INSTALLED, out)
    assert.equal(0, #requests(t0), "no model call")
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert.same({ { state = "pending", stage_index = 0 } }, store:query("SELECT state, stage_index FROM runs"))
    store:close()
  end, { timeout = 30 })

  it("factory resume warns of the unpriced budgets of its run's pipeline's teams only, and not for a finished run",
    function()
    local run = submitted(ROOT, "Resumed with unpriced models", tasks_repo)
    local status, out = finish(factory{ "resume", tostring(run) })
    assert.equal(0, status.code, out)
    assert.contains("factory: warning: backend_engineering, business_analysis, documentation, qa_engineering,"
      .. " solution_architecture have a USD budget, but replay/r has no price", out)
    assert.falsy(out:find("api_design", 1, true), out)
    status, out = finish(factory{ "resume", tostring(run) })
    assert.equal(0, status.code, out)
    assert.falsy(out:find("warning", 1, true), out)
  end, { timeout = 30 })

  it("factory resume refuses a run whose repository is no longer a git repository", function()
    local run = submitted(ROOT, "The repository went away", tasks_repo)
    assert(fs.remove(tasks_repo .. "/.git", { recursive = true }))
    local t0 = time.now()
    local status, out = finish(factory{ "resume", tostring(run) })
    assert.equal(1, status.code, out)
    assert.contains(("run %d's repository %s: %s is not a git repository, and stage build changes the code in a git"
      .. " worktree"):format(run, tasks_repo, tasks_repo), out)
    assert.equal(0, #requests(t0), "no model call")
  end, { timeout = 30 })
end)

describe("factory run with a build stage", function()
  it("ends with the branch that holds the change, or says that the stage changed nothing", function()
    local bugfix = assert(proc.spawn{ argv = { host.exe, ROOT .. "examples/replay/server.lua", "--replies",
                                               ROOT .. "examples/replay/bugfix.lua" } })
    local url = assert(bugfix:read_line())
    assert(fs.write(dir .. "/factory.lua", assert(fs.read(dir .. "/factory.lua")):gsub("http://[%d.:]+/v1", url .. "/v1")))
    local repo = sample_repo.make(dir .. "/calc")
    local status, out = finish(factory{ "run", "bugfix", "--repo", repo, "--issue", "calc_sub adds" })
    assert.equal(0, status.code, out)
    assert.matches("\n  fix +backend_engineering/implementer +COMPLETE +attempts 1  branch factory%-run1%-fix%-1 %(commit"
      .. " %x+, 1 file%(s%) %+1 %-1%)\n", out)
    -- Another objective holds the file the fix edits: the replayed agent finishes without a change.
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert(locks.acquire(store, { repo = repo, path = "src/calc.c", owner = "run:99/fix" }))
    store:close()
    status, out = finish(factory{ "run", "bugfix", "--repo", repo, "--issue", "calc_sub adds, again" })
    bugfix:kill("KILL")
    bugfix:wait()
    bugfix:close()
    assert.equal(0, status.code, out)
    assert.matches("\n  fix +backend_engineering/implementer +COMPLETE +attempts 1  no change to the repository\n", out)
    assert.matches("\n  triage +qa_engineering/tester +COMPLETE +attempts 1  no change to the repository\n", out)
    -- The verify stage read the repository as the fix left it (the fix changed nothing: HEAD).
    local head = assert(git.open(repo))
    local oid = head:head().oid
    head:close()
    assert.matches("\n  verify +qa_engineering/tester +COMPLETE +attempts 1  read commit " .. oid:sub(1, 10) .. "\n", out)
    assert.matches("\n  worktree factory%-run2%-verify%-1 to read and run the code %(nothing changed there is kept%)\n",
      out)
  end, { timeout = 30 })
end)

describe("factory run's summary of a run with several build stages", function()
  it("names the branch that holds the whole change", function()
    local store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
    assert(store:migrate())
    local item = assert(store:exec("INSERT INTO work_items (source, title, state, created_at, updated_at)"
      .. " VALUES ('cli', 'Tags', 'accepted', 0, 0) RETURNING id")).last_id
    local run = assert(store:exec("INSERT INTO runs (work_item_id, pipeline, state, stage_index, data, created_at,"
      .. " updated_at) VALUES (?, 'feature', 'succeeded', 2, ?, 0, 0) RETURNING id",
      { item, { anchor = "Tags", stages = { "backend", "frontend" } } })).last_id
    for i, stage in ipairs({ "backend", "frontend" }) do
      assert(store:exec("INSERT INTO stage_results (run_id, stage, attempt, team, operative, status, result, created_at)"
        .. " VALUES (?, ?, 1, 'backend_engineering', 'implementer', 'COMPLETE', ?, 0)", { run, stage,
        { status = "COMPLETE", artifact = "x", workspace = { branch = ("factory-run%d-%s-1"):format(run, stage),
          commit = string.rep(tostring(i), 40),
          diff_stats = { files = 1, insertions = 1, deletions = 0 } } } }))
    end
    store:close()
    local status, out = finish(factory{ "resume", tostring(run) })
    assert.equal(0, status.code, out)
    assert.contains(("the run's whole change (2 stages changed the code) is on branch factory-run%d-frontend-1\n"):format(run), out)
  end, { timeout = 30 })
end)

describe("factory run while factory.lua changes", function()
  -- Lines of p's output until one matches pattern (nil after 10 s or at its end).
  local function read_until(p, pattern, seen)
    local deadline = time.monotonic() + 10
    while time.monotonic() < deadline do
      local line = p:read_line()
      if not line then return nil end
      seen[#seen + 1] = line
      local a, b = line:match(pattern)
      if a then return a, b end
    end
  end

  it("warns when an edit takes the prices away: the teams' USD budgets would limit nothing", function()
    local slow = replay_server("0.2", "slow", "slow", 'prices { r = { input = 0, output = 0 } }\n')
    local cfg = assert(fs.read(dir .. "/slow.lua"))
    local p = factory{ "run", "feature", "--repo", tasks_repo, "--issue", title(0), "--config", dir .. "/slow.lua" }
    local seen = {}
    assert.truthy(read_until(p, "^(%[1/5%]) analysis", seen), table.concat(seen, "\n"))
    assert.falsy(table.concat(seen, "\n"):find("warning", 1, true), "priced at 0: nothing to warn of")
    assert(fs.write(dir .. "/slow.lua", (cfg:gsub("prices {[^\n]*\n", ""))))
    assert.truthy(read_until(p, "(reloaded) file=", seen), table.concat(seen, "\n"))
    assert.truthy(read_until(p, "^factory: warning: (backend_engineering, business_analysis, documentation,"
      .. " qa_engineering, solution_architecture) have a USD budget, but replay/r has no price in factory%.lua's"
      .. " prices {}: its calls count as %$0 against it", seen), table.concat(seen, "\n"))
    local status, rest = finish(p)
    slow:kill("KILL")
    slow:wait()
    slow:close()
    assert.equal(0, status.code, rest)
  end, { timeout = 30 })

  it("runs factory.lua's notify command when the run needs a human, before --no-wait exits", function()
    local cfg = assert(fs.read(dir .. "/factory.lua"))
    assert(fs.write(dir .. "/factory.lua", cfg .. ([[
prices { r = { input = 1, output = 1 } }
budgets { teams = { documentation = { usd_per_day = 0 } } }
notify { command = { "sh", "-c", 'sleep 0.5; printf "%%s\n" "$1" >> %s/told.txt', "notify", "{message}" } }
]]):format(dir)))
    local status, out = finish(factory{ "run", "feature", "--repo", tasks_repo, "--issue", title(7), "--no-wait" })
    assert.equal(3, status.code, out)
    local told = fs.read(dir .. "/told.txt") or ""
    assert.matches("^factory: run %d+ needs a human: escalation #%d+ from documentation: BLOCKED: budget exhausted: team"
      .. " documentation has 0%.0000 of 0%.0000 USD left[^\n]* %(factory hitl answer %d+ TEXT%)\n$", told)
  end, { timeout = 30 })

  it("takes a raised budget for the objectives that start after the edit", function()
    local cfg = assert(fs.read(dir .. "/factory.lua"))
    assert(fs.write(dir .. "/factory.lua", cfg .. [[
prices { r = { input = 1, output = 1 } }
budgets { teams = { documentation = { usd_per_day = 0 } } }
]]))
    local p = start(1)
    local seen = {}
    local run, esc = read_until(p, "^run (%d+) waits for a human: escalation #(%d+) from documentation", seen)
    assert.truthy(esc, table.concat(seen, "\n"))
    assert.contains("budget exhausted: team documentation", table.concat(seen, "\n"))
    assert(fs.write(dir .. "/factory.lua", cfg .. 'prices { r = { input = 1, output = 1 } }\n'))
    assert.truthy(read_until(p, "(reloaded) file=", seen), table.concat(seen, "\n"))
    local answer, out = finish(assert(proc.spawn{ argv = { host.exe, "hitl", "answer", esc, "The budget is raised.",
      "--db", "sqlite:" .. dir .. "/factory.db" }, stderr = "stdout" }))
    assert.equal(0, answer.code, out)
    local status, rest = finish(p)
    assert.equal(0, status.code, rest)
    assert.contains(("run %s succeeded (feature)"):format(run), rest)
  end, { timeout = 30 })
end)
