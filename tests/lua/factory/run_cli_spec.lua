-- `factory runs` and `factory runs show RUN` (lua/factory/run_cli.lua) against a
-- store whose events are written as the engine and the agents write them, plus the
-- ones a timeline must survive: an event missing a field, one of a kind this
-- version does not know, and one whose data is not an object.
local db = require "factory.db"
local records = require "factory.records"
local host = require "factory.core.host"
local time = require "factory.core.time"

local backends = require "tests.tools.backends"

local store, url

local function factory(args)
  local p = io.popen(("%s %s --db %s 2>&1; echo exit=$?"):format(host.exe, args, url))
  local out = p:read("*a")
  p:close()
  return out
end

local function new_run(title)
  local now = time.now()
  local item = assert(store:exec("INSERT INTO work_items (source, title, state, created_at, updated_at)"
    .. " VALUES ('cli', ?, 'accepted', ?, ?) RETURNING id", { title, now, now })).last_id
  return assert(store:exec("INSERT INTO runs (work_item_id, pipeline, state, stage_index, data, created_at, updated_at)"
    .. " VALUES (?, 'feature', 'succeeded', 1, '{}', ?, ?) RETURNING id", { item, now, now })).last_id
end

describe("factory runs", function()
  before_each(function()
    url = backends.sqlite_url()
    store = assert(db.open(url))
    assert(store:migrate())
  end)

  after_each(function()
    store:close()
    backends.cleanup()
  end)

  it("shows a run with a built-in agent's stage as a timeline", function()
    local run = new_run("Add due dates")
    local list = {
      { "run_created", { pipeline = "feature", title = "Add due dates" } },
      { "run_started", { stage_index = 0, resumed = false, stages = 1, pipeline = "feature" } },
      { "stage_started", { index = 1, team = "backend_engineering", stage = "build" } },
      { "objective_started", { operative = "implementer", attempt = 1, team = "backend_engineering", stage = "build" } },
      -- The pool charges the built-in agent once per attempt: no iteration number.
      { "agent_iteration", { attempt = 1, stage = "build" } },
      { "workspace_started", { branch = "factory-run1-build-1", stage = "build" } },
      { "tool_call", { name = "edit_file", ok = true, stage = "build" } },
      { "agent_context_fitted", { messages = 3, bytes = 98000, iteration = 7 } },
      { "agent_usage", { iteration = 1, input_tokens = 6588, output_tokens = 10, cost_usd = 0.0359, estimate = true } },
      { "workspace_started", { branch = "factory-run1-ui-1", stage = "ui",
                               from = { stage = "build", branch = "factory-run1-build-1", commit = "89ff632bec00aa" } } },
      { "workspace_started", { branch = "factory-run1-ui-2", stage = "ui",
                               from = { stage = "build", branch = "factory-run1-build-1", gone = true } } },
      { "workspace_started", { branch = "factory-run1-ui-2-2", stage = "ui",
                               from = { stage = "ui", branch = "factory-run1-ui-2", commit = "77aa11bb22cc33",
                                        continued = true } } },
      { "workspace_started", { branch = "factory-run1-ui-3", stage = "ui",
                               from = { stage = "ui", branch = "factory-run1-ui-2-2", commit = "99aa11bb22cc33",
                                        continued = true, after = "NEEDS_CLARIFICATION" } } },
      { "workspace_started", { branch = "factory-run1-qa-1", stage = "qa", read = true,
                               from = { stage = "ui", branch = "factory-run1-ui-2-2", commit = "5566778899aa" } } },
      { "tool_call", { name = "run_command", ok = true, command = "make -s test", exit = 2, stage = "qa" } },
      { "tool_call", { name = "run_command", ok = true, command = "sleep 900", timed_out = true, stage = "qa" } },
      { "workspace_done", { branch = "factory-run1-qa-1", stage = "qa", kept = false, read = true,
                            base = "5566778899aabb", discarded = 3 } },
      { "agent_done", { iterations = 2, status = "COMPLETE", tokens = 1561 } },
      { "workspace_done", { branch = "factory-run1-build-1", stage = "build", commit = "89ff632bec00",
                            files = 1, insertions = 1, deletions = 1 } },
      { "task_result", { team = "backend_engineering", stage = "build", operative = "implementer", attempt = 1,
                         status = "COMPLETE" } },
      { "stage_completed", { attempt = 1, team = "backend_engineering", stage = "build" } },
      { "run_finished", { state = "succeeded" } },
    }
    for _, e in ipairs(list) do records.event(store, run, e[1], e[2]) end
    records.model_call(store, { alias = "factory/coder", provider = "fake", model = "m", team = "backend_engineering",
                                run = run, prompt_tokens = 1463, completion_tokens = 98, cost_usd = 0.0021,
                                latency_ms = 12, status = "ok" })
    local out = factory("runs show " .. run)
    assert.contains("exit=0\n", out)
    assert.contains(('run %d  feature  succeeded  "Add due dates"'):format(run), out)
    for _, line in ipairs({ "started: 1 stages", "stage 1 build (backend_engineering)",
                            "objective: backend_engineering/implementer, attempt 1", "agent started (attempt 1)",
                            "worktree and branch factory-run1-build-1", "tool edit_file ok",
                            "context fitted to the window: 3 earlier tool message(s) left out, 98000 bytes sent",
                            "agent usage: 6588+10 tok, $0.0359 by the agent's own estimate (the proxy's records above are"
                              .. " what was charged)",
                            "worktree and branch factory-run1-ui-1 from stage build's commit 89ff632bec\n",
                            "worktree and branch factory-run1-ui-2 from the repository's HEAD: branch"
                              .. " factory-run1-build-1 of stage build no longer holds that stage's commit",
                            "worktree and branch factory-run1-ui-2-2 going on from commit 77aa11bb22, which a stopped"
                              .. " attempt of this stage left on branch factory-run1-ui-2\n",
                            "worktree and branch factory-run1-ui-3 going on from commit 99aa11bb22, which the attempt"
                              .. " that asked a question of this stage left on branch factory-run1-ui-2-2\n",
                            "worktree factory-run1-qa-1 to read and run the code from stage ui's commit 5566778899"
                              .. " (nothing changed there is kept)\n",
                            "tool run_command `make -s test`: exit 2\n", "tool run_command `sleep 900`: timed out\n",
                            "read commit 5566778899, worktree removed, 3 changed path(s) not kept\n",
                            "agent COMPLETE after 2 iteration(s), 1561 tokens",
                            "branch factory-run1-build-1: commit 89ff632bec, 1 file(s) +1 -1",
                            "TaskResult COMPLETE", "stage build COMPLETE", "run succeeded",
                            "model factory/coder (fake/m) for backend_engineering: ok, 1463+98 tok, $0.0021, 12 ms" }) do
      assert.contains(line, out)
    end
  end)

  it("gives an event it cannot describe a line with its kind and data", function()
    local run = new_run("Odd events")
    records.event(store, run, "agent_iteration", { iteration = 3, attempt = 2 })
    records.event(store, run, "stage_started", { stage = "build" })  -- no index, no team
    records.event(store, run, "from_a_newer_version", { detail = "x" })
    records.event(store, run, "workspace_started", { branch = "factory-run1-build-1", stage = "build", uncommitted = 2 })
    records.event(store, run, "workspace_done", { branch = "factory-run1-build-1", stage = "build", kept = false,
                                                  files = 0, insertions = 0, deletions = 0 })
    records.event(store, run, "workspace_done", { branch = "factory-run1-build-2", stage = "build",
                                                  files = 0, insertions = 0, deletions = 0 }) -- recorded before `kept`
    records.event(store, run, "model_unavailable", { code = "ECONNREFUSED", error = "x", wait_s = 60, wait = 2, waits = 3 })
    assert(store:exec("INSERT INTO events (run_id, kind, data, created_at) VALUES (?, 'escalated', '[1]', ?)",
      { run, time.now() }))
    local out = factory("runs show " .. run)
    assert.contains("exit=0\n", out)
    assert.contains("agent iteration 3 (attempt 2)", out)
    assert.contains('stage_started {"stage":"build"}', out)
    assert.contains('from_a_newer_version {"detail":"x"}', out)
    assert.contains("escalated [1]", out)
    assert.contains("no change: branch factory-run1-build-1 deleted", out)
    assert.contains("branch factory-run1-build-2: no change, 0 file(s) +0 -0", out)
    assert.contains("model unreachable (ECONNREFUSED): waiting 60s before asking again (2 of 3)", out)
    assert.contains("worktree and branch factory-run1-build-1 from the last commit: the repository's 2 uncommitted"
      .. " change(s) are not in it", out)
  end)

  it("cancels a run that has not finished, and says why it will not cancel one that has", function()
    local done = new_run("Finished")
    assert.equal(("factory: EINVAL: run %d has succeeded already\nexit=1\n"):format(done), factory("runs cancel " .. done))
    local waiting = new_run("Waiting")
    assert(store:exec("UPDATE runs SET state = 'waiting' WHERE id = ?", { waiting }))
    assert.equal(("run %d cancelled: the same work item, run again, starts a new run\nexit=0\n"):format(waiting),
                 factory("runs cancel " .. waiting))
    assert.equal("cancelled", store:query("SELECT state FROM runs WHERE id = ?", { waiting })[1].state)
    assert.contains("usage: factory runs [show RUN | cancel RUN]", factory("runs cancel"))
  end)

  for _, b in ipairs(backends.LIST) do
    it("lists the runs with what their calls cost, and says when a run does not exist, on " .. b[1], function()
      if b[1] ~= "sqlite" then
        store:close()
        url = b[2]()
        store = assert(db.open(url))
        assert(store:migrate())
      end
      assert.equal("no runs\nexit=0\n", factory("runs"))
      local run = new_run("Listed")
      for _, cost in ipairs({ 0.25, 1.125 }) do
        records.model_call(store, { run = tostring(run), team = "t", alias = "a", provider = "p", model = "m",
                                    prompt_tokens = 1000, completion_tokens = 500, cost_usd = cost, status = "ok" })
      end
      local out = factory("runs")
      assert.matches("^  RUN  PIPELINE   STATE +STAGES +COST +TOKENS +UPDATED +TITLE\n", out)
      assert.matches("\n%s*" .. run .. "  feature%s+succeeded%s+1 done  %$1%.3750 +3,000  %d%d%d%d%-[^\n]*  Listed\n", out)
      local second = new_run("Second")
      out = factory("runs --limit 1")
      assert.matches("\n%s*" .. second .. "  feature .*  Second\n", out)
      assert.falsy(out:find("Listed", 1, true), out)
      assert.contains("(the latest 1 of 2 runs: factory runs --limit N shows more)", out)
      assert.contains("--limit needs a whole number", factory("runs --limit 0"))
      assert.equal(("factory: no run %d\nexit=1\n"):format(second + 1), factory("runs show " .. (second + 1)))
    end)
  end
end)
