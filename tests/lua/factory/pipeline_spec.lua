-- The pipeline engine end to end against the fake model (acceptance 1 and 3): a
-- whole feature run, the clarification broker and its limits, escalation to a
-- human and resumption, budgets, malformed TaskResults, hot reload of a team.
-- Each test runs in a project copied from the shipped teams, plus small pipelines.
local pipeline = require "factory.pipeline"
local dsl = require "factory.dsl"
local db = require "factory.db"
local hitl = require "factory.hitl"
local audit = require "factory.audit"
local router = require "factory.router"
local fiber = require "factory.fiber"
local json = require "factory.json"
local fs = require "factory.core.fs"
local host = require "factory.core.host"
local log = require "factory.log"
local time = require "factory.core.time"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local ROOT = HERE .. "../../../"
local fake_model = dofile(HERE .. "../../tools/fake_model.lua")

local PIPELINES = {
  short = [[
return pipeline "short" {
  limits = { clarification_timeout_s = 0.2, max_iterations = 3, retries = %d, outage_retries = 2,
             outage_wait_s = 0.05 },
  stage "analysis" { team = "business_analysis" },
  stage "design" { team = "solution_architecture" },
}]],
  broke = [[
return pipeline "broke" {
  limits = { budget_usd = 0.001 },
  stage "analysis" { team = "business_analysis" },
}]],
  slow = [[
return pipeline "slow" {
  limits = { timeout_s = 0.2 },
  stage "analysis" { team = "business_analysis" },
  stage "design" { team = "solution_architecture" },
}]],
  twice = [[
return pipeline "twice" {
  stage "first" { team = "business_analysis" },
  stage "second" { team = "business_analysis" },
}]],
}

local dir, fake, store, project, engine, events

local function copy(from, to)
  assert(fs.write(to, assert(fs.read(from))))
end

local function start(retries)
  for _, sub in ipairs({ "teams", "pipelines" }) do assert(fs.mkdir_p(dir .. "/" .. sub)) end
  for _, f in ipairs(assert(fs.list(ROOT .. "teams"))) do
    if f:find("%.lua$") then copy(ROOT .. "teams/" .. f, dir .. "/teams/" .. f) end
  end
  copy(ROOT .. "pipelines/feature.lua", dir .. "/pipelines/feature.lua")
  for name, text in pairs(PIPELINES) do
    assert(fs.write(dir .. "/pipelines/" .. name .. ".lua", text:format(retries or 2)))
  end
  project = dsl.project(dir)
  assert.same({}, project:load())
  events = {}
  engine = pipeline.engine{ db = store, project = project, on_event = function(ev) events[#events + 1] = ev end }
end

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir))
  fake = assert(fake_model.start())
  local models = {}
  for _, alias in ipairs({ "factory/architect", "factory/coder", "factory/fast", "factory/cheap" }) do
    models[alias] = { "fake/" .. alias:match("/(.*)") }
  end
  assert(router.configure{
    providers = { fake = { base_url = fake:url() .. "/v1", api_key = "sk-test-pipeline-0000" } },
    models = models,
    prices = { ["fake/architect"] = { input = 1, output = 1 } },
    limits = { retries = 0, timeout = 5, first_token_timeout = 2, idle_timeout = 2, breaker_failures = 1000 },
  })
  store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
  assert(store:migrate())
end)

after_each(function()
  if engine then engine:close() end
  engine = nil
  store:close()
  fake:close()
  assert(fs.remove(dir, { recursive = true }))
end)

-- ---- replies ---------------------------------------------------------------------

local function reply(t) return { content = json.encode(t) } end

local function complete(artifact, facts)
  return reply{ status = "COMPLETE", reasoning = "done", artifact = artifact, verified_facts = facts,
                assumptions_made = {}, blockers = {}, clarification_needed = json.null }
end

-- The reply, answered after `delay` seconds.
local function late(r, delay)
  r.delay = delay
  return r
end

local function ask(team, question)
  return reply{ status = "NEEDS_CLARIFICATION", reasoning = "I cannot decide this", blockers = {},
                clarification_needed = { team = team, question = question } }
end

local function blocked(why)
  return reply{ status = "BLOCKED", reasoning = "stuck", blockers = { why } }
end

local function request(i)
  local r = fake:requests()[i]
  return r and json.decode(r.body)
end

local function text_of(i)
  local parts = {}
  for _, m in ipairs(request(i).messages) do parts[#parts + 1] = m.content end
  return table.concat(parts, "\n")
end

local function submit(name, title)
  return assert(engine:submit{ pipeline = name, title = title or "Add due dates to tasks",
                               body = "Users want a due date on each task.", repo = dir, external_id = title or name })
end

local function rows(sql, params) return assert(store:query(sql, params)) end

-- Answers the run's escalation; the run then succeeds, the model having had `calls`
-- requests in all (a finished stage does not run again).
local function answered_to_the_end(run, esc, text, calls)
  assert(hitl.answer(store, esc.id, text))
  assert.equal("succeeded", (engine:execute(run)))
  assert.equal(calls, fake:count(), "requests to the model")
end

local function feature_replies()
  return { complete("# Requirements\n1. a task has an optional due date", { "tasks live in tasks.lua" }),
           complete("# Design\nadd due_date to the task table"),
           complete("# Change\nadded due_date"),
           complete("# Test report\nall criteria pass"),
           complete("# Docs\nchangelog entry") }
end

local function unpacked(list, ...)
  local out = {}
  for _, r in ipairs(list) do out[#out + 1] = r end
  for _, r in ipairs({ ... }) do out[#out + 1] = r end
  return out
end

describe("pipeline engine", function()
  for _, backend in ipairs({ "sqlite", "postgres" }) do
    it("runs the feature pipeline end to end with every record, on " .. backend, function()
      if backend == "postgres" then
        store:close()
        store = assert(db.open(require("tests.tools.pg").fresh()))
        assert(store:migrate())
      end
      start()
      fake:script(feature_replies())
      local run = submit("feature")
      assert.equal("succeeded", (engine:execute(run)))
      assert.equal(5, fake:count())
      local results = rows("SELECT stage, status, team FROM stage_results WHERE run_id = ? ORDER BY id", { run })
      assert.same({ "analysis", "architecture", "build", "verify", "docs" },
                  { results[1].stage, results[2].stage, results[3].stage, results[4].stage, results[5].stage })
      for _, r in ipairs(results) do assert.equal("COMPLETE", r.status) end
      local r = rows("SELECT state, stage_index, finished_at FROM runs WHERE id = ?", { run })[1]
      assert.equal("succeeded", r.state)
      assert.equal(5, r.stage_index)
      -- The anchor is in every request; the last stage sees the first stage's artifact.
      for i = 1, 5 do assert.contains("Users want a due date on each task.", text_of(i)) end
      assert.contains("a task has an optional due date", text_of(5))
      assert.contains("team: documentation; operative: writer; objective: stage docs", request(5).messages[1].content)
      assert.equal("fast", request(5).model)
      assert.equal(5, rows("SELECT COUNT(*) AS n FROM model_calls WHERE run_id = ?", { run })[1].n)
      assert.equal(5, rows("SELECT COUNT(*) AS n FROM decisions WHERE run_id = ?", { run })[1].n)
      local facts = rows("SELECT bank FROM memory_facts ORDER BY bank")
      assert.same({ "business_analysis", "shared-world" }, { facts[1].bank, facts[2].bank })
      assert.truthy(audit.verify(store))
      assert.truthy(#events > 10)
      -- The run's budget account went with the run.
      assert.is_nil(router.stats().budgets["run:" .. run])
    end)
  end

  it("refuses a work item without a title, or for a pipeline it does not have, naming those it has", function()
    start()
    for _, title in ipairs({ "", "  \n\t" }) do
      local run, err, code = engine:submit{ pipeline = "feature", title = title, body = "text", repo = dir }
      assert.is_nil(run)
      assert.equal("EINVAL", code)
      assert.equal("EINVAL: the work item has no title: its text is empty", err)
    end
    local run, err, code = engine:submit{ pipeline = "featrue", title = "Add due dates", repo = dir }
    assert.is_nil(run)
    assert.equal("ENOENT", code)
    assert.equal('ENOENT: no pipeline "featrue" (pipelines: broke, feature, short, slow, twice)', err)
    -- A project directory without pipelines (the wrong --project) is named.
    assert(fs.mkdir_p(dir .. "/elsewhere"))
    local empty = dsl.project(dir .. "/elsewhere")
    assert.same({}, empty:load())
    local lost = pipeline.engine{ db = store, project = empty }
    run, err = lost:submit{ pipeline = "feature", title = "Add due dates", repo = dir }
    lost:close()
    assert.is_nil(run)
    assert.equal('ENOENT: no pipeline "feature": no pipelines/*.lua in ' .. dir .. "/elsewhere; --project DIR names"
      .. " where teams/ and pipelines/ are", err)
    assert.equal(0, rows("SELECT COUNT(*) AS n FROM work_items")[1].n, "nothing was recorded")
  end)

  it("refuses, before paying, a work item that cannot fit in a stage's context window, saying how to go on",
    function()
    start()
    -- A pasted log of 2.8 MB: every request would hold it, past any window.
    local log = string.rep("Some log line with details about the failure.\n", 60000)
    local run, err, code = engine:submit{ pipeline = "feature", title = "Tests fail", body = log, repo = dir }
    assert.is_nil(run)
    assert.equal("EINVAL", code)
    local anchor = "Tests fail\n\n" .. log .. "\n\nRepository: " .. dir
    assert.equal(("EINVAL: the work item (%d bytes, about %d tokens) does not fit in the context window of stage"
      .. " analysis (business_analysis/analyst: 32000 tokens), and every request of the run holds all of it: shorten"
      .. " it (keep the part of a log that shows the failure), or set context_window in the team's file if its"
      .. " model's window is larger"):format(#anchor, math.ceil(#anchor / 4) + 4), err)
    assert.equal(0, rows("SELECT COUNT(*) AS n FROM work_items")[1].n, "nothing was recorded")
    assert.equal(0, fake:count(), "no model was called")
    -- The room kept for a stage operative's reply counts; a team with a larger window takes it.
    local text = assert(fs.read(dir .. "/teams/business_analysis.lua"))
    assert(fs.write(dir .. "/teams/business_analysis.lua", (text:gsub('operative "analyst" {',
      'operative "analyst" { max_tokens = 4000,'))))
    assert.same({}, project:load())
    local fits_alone = string.rep("x", 4 * 30000)
    run, err = engine:submit{ pipeline = "feature", title = "Tests fail", body = fits_alone, repo = dir }
    assert.is_nil(run)
    assert.truthy(err:find("(business_analysis/analyst: 32000 tokens, 4000 of them kept for the reply)", 1, true),
      err)
    assert(fs.write(dir .. "/teams/business_analysis.lua", (text:gsub('operative "analyst" {',
      'operative "analyst" { max_tokens = 4000, context_window = 200000,'))))
    assert.same({}, project:load())
    assert.truthy(engine:submit{ pipeline = "feature", title = "Tests fail", body = fits_alone, repo = dir })
  end)

  -- A feature run whose build stage asks `to` the question and gets the answer;
  -- returns the run, which has succeeded.
  local function clarified_run(to, question, answer)
    start()
    local replies = feature_replies()
    table.insert(replies, 3, ask(to, question))
    table.insert(replies, 4, complete(answer))
    fake:script(replies)
    local run = submit("feature")
    assert.equal("succeeded", (engine:execute(run)))
    return run
  end

  it("asks another team and feeds its answer back to the asker", function()
    local run = clarified_run("solution_architecture", "REST or GraphQL for the due-date API?",
                              "Use REST: the service already exposes /tasks over REST.")
    assert.equal(7, fake:count())
    assert.contains("objective: clarification", request(4).messages[1].content)
    assert.contains("REST or GraphQL for the due-date API?", text_of(4))
    assert.contains("Use REST: the service already exposes /tasks over REST.", text_of(5))
    local mail = rows("SELECT sender, recipient, kind FROM mail WHERE run_id = ? ORDER BY id", { run })
    assert.same({ sender = "backend_engineering", recipient = "solution_architecture", kind = "clarification" }, mail[1])
    assert.same({ sender = "solution_architecture", recipient = "backend_engineering", kind = "answer" }, mail[2])
    assert.same({ 1, 2 }, { rows("SELECT attempt FROM stage_results WHERE run_id = ? AND stage = 'build' ORDER BY id",
      { run })[1].attempt, rows("SELECT MAX(attempt) AS a FROM stage_results WHERE stage = 'build'")[1].a })
  end)

  it("asks the team a model names as people write it (\"Solution Architecture\")", function()
    local run = clarified_run("Solution Architecture", "REST or GraphQL?", "REST.")
    local mail = rows("SELECT sender, recipient, kind FROM mail WHERE run_id = ? ORDER BY id", { run })
    assert.same({ sender = "backend_engineering", recipient = "solution_architecture", kind = "clarification" }, mail[1])
  end)

  local limit_cases = {
    { "stops a ping-pong A -> B -> A by cycle detection", 1,
      { ask("product_management", "Is this in scope?"), ask("business_analysis", "What do users need?") },
      "^cycle: business_analysis %-> product_management %-> business_analysis$", 2 },
    { "enforces the hop limit", 3,
      { complete("req"), complete("design"), ask("solution_architecture", "q1"), ask("database_engineering", "q2"),
        ask("data_engineering", "q3") },
      "^hop limit reached: backend_engineering %-> solution_architecture %-> database_engineering %-> data_engineering",
      5 },
    { "enforces the request limit per objective", 1,
      { ask("product_management", "q1"), complete("a1"), ask("product_management", "q2"), complete("a2"),
        ask("product_management", "q3"), complete("a3"), ask("product_management", "q4") },
      "^clarification limit reached: 3 per objective", 7 },
    { "refuses self-routing", 1, { ask("business_analysis", "Who am I?") }, "^self%-routing: ", 1 },
    { "refuses a team outside may_ask", 1, { ask("sre", "Is it up?") }, "may not ask sre", 1 },
  }
  for _, c in ipairs(limit_cases) do
    it(c[1] .. " and escalates to a human", function()
      start()
      fake:script(c[3])
      local run = submit("feature")
      local state, esc = engine:execute(run)
      assert.equal("waiting", state)
      assert.equal(c[5], fake:count())
      assert.matches(c[4], esc.reason)
      local stages = { "analysis", "architecture", "build" }
      assert.equal(stages[c[2]], esc.stage)
      assert.equal("waiting", rows("SELECT state FROM runs WHERE id = ?", { run })[1].state)
      assert.same({ esc.id }, { hitl.list(store)[1].id })
    end)
  end

  it("escalates a clarification that times out", function()
    start()
    fake:script{ ask("product_management", "Is this in scope?"), { delay = 0.4, content = "late" } }
    local run = submit("short")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.matches("^no answer from product_management within 0.2 s", esc.reason)
    fiber.sleep(0.3) -- the fake finishes its delayed reply
  end)

  it("escalates a BLOCKED objective; `factory hitl answer` resumes it", function()
    start()
    fake:script{ blocked("Which currency do prices use?") }
    local run = submit("short")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal("BLOCKED: Which currency do prices use?", esc.reason)
    -- The answer comes from another process, through the CLI.
    local url = "sqlite:" .. dir .. "/factory.db"
    local p = io.popen(("%s hitl list --db %s 2>&1"):format(host.exe, url))
    assert.contains(("#%d  run %d  stage analysis"):format(esc.id, run), p:read("*a"))
    p:close()
    -- An answer typed in a Latin-1 terminal is refused, saying where, and the question stays open.
    p = io.popen(("%s hitl answer %d 'Euros \163' --db %s 2>&1; echo exit=$?"):format(host.exe, esc.id, url))
    assert.equal("factory: the answer is not UTF-8 text: byte 0xA3 at line 1, column 7 (Latin-1 or Windows-1252?):"
      .. " give it as UTF-8\nexit=1\n", p:read("*a"))
    p:close()
    assert.equal(1, #hitl.list(store))
    p = io.popen(("%s hitl answer %d 'Euros, always.' --db %s 2>&1; echo exit=$?"):format(host.exe, esc.id, url))
    assert.equal(("answered #%d: run %d goes on (a factory run waiting for it takes the answer; if none is,"
      .. " continue it with: factory resume %d)\nexit=0\n"):format(esc.id, run, run), p:read("*a"))
    p:close()
    assert.equal("pending", rows("SELECT state FROM runs WHERE id = ?", { run })[1].state)
    fake:script{ complete("req in EUR"), complete("design") }
    assert.equal("succeeded", (engine:execute(run)))
    assert.contains("Euros, always.", text_of(2))
    assert.same({}, hitl.list(store))
    local answered = hitl.get(store, esc.id)
    assert.equal("Euros, always.", answered.answer)
    assert.truthy(audit.verify(store))
  end)

  it("turns budget exhaustion into BLOCKED with a clear message", function()
    start()
    local run = submit("broke")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal(0, fake:count())
    assert.matches("^BLOCKED: budget exhausted: run " .. run .. " has 0.0010 of [%d.]+ USD left", esc.reason)
    assert.matches("^One call may cost [%d.]+ USD %(its prompt, and max_tokens at the dearest price of its model's chain%),"
      .. " more than all the run's budget had left %(0%.0010 USD%): raise limits%.budget_usd in pipelines/broke%.lua, or"
      .. " lower the operative's max_tokens; then answer this to go on%.$", esc.question)
    assert.is_nil(router.stats().budgets["run:" .. run])
    local r = rows("SELECT result FROM stage_results WHERE run_id = ?", { run })[1].result
    assert.equal("BLOCKED", r.status)
  end)

  it("submits a work item anew with again only once its run has succeeded, never beside an unfinished one", function()
    start()
    local item = { pipeline = "twice", title = "Again", body = "b", repo = dir, external_id = "again", again = true }
    local first = assert(engine:submit(item))
    local same, earlier = engine:submit(item)
    assert.same({ first, "pending" }, { same, earlier })
    fake:script{ complete("one"), complete("two") }
    assert.equal("succeeded", (engine:execute(first)))
    local plain = { pipeline = "twice", title = "Again", body = "b", repo = dir, external_id = "again" }
    assert.same({ first, "succeeded" }, { engine:submit(plain) })
    local second, fresh = engine:submit(item)
    assert.same({ first + 1, false }, { second, fresh })
  end)

  it("blocks a stage whose team's budget another process holds for its calls in flight", function()
    start()
    -- Another engine on this host (a second `factory run`) has all of the team's 10 USD out.
    assert(store:exec("INSERT INTO budget_holds (team, process, usd, tokens, expires_at) VALUES (?, ?, 10, 0, ?)",
                      { "business_analysis", require("factory.engine_id").new(), os.time() + 60 }))
    local run = submit("feature")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal(0, fake:count())
    assert.matches("^BLOCKED: budget exhausted: team business_analysis has 0%.0000 of 10%.0000 USD left today %(0%.0000"
      .. " spent, 10%.0000 held by calls in flight in any process%)", esc.reason)
    assert.contains("Team business_analysis's budget for today is spent.", esc.question)
  end)

  it("stops a run whose records could not be written, saying which stage and why, and resumes it", function()
    start()
    -- A timeline write of this run's fiber that the store refuses (an unknown table).
    engine.on_event = function(ev)
      if ev.kind == "objective_started" then
        store:post(function(tx) return tx:exec("INSERT INTO no_such_table (x) VALUES (1)") end)
      end
    end
    fake:script(feature_replies())
    local run = submit("feature")
    local logged = io.tmpfile()
    log.set_console(logged)
    local state, why = engine:execute(run)
    log.set_console(nil)
    logged:seek("set")
    assert.contains("a posted write failed", logged:read("*a"))
    assert.equal("stopped", state)
    assert.contains("stage analysis: the objective's result could not be recorded: EPOSTED", why)
    assert.contains("no_such_table", why)
    local r = rows("SELECT state, error FROM runs WHERE id = ?", { run })[1]
    assert.equal("stopped", r.state)
    assert.contains("EPOSTED", r.error)
    assert.same({}, rows("SELECT id FROM stage_results WHERE run_id = ?", { run }))
    -- The cause gone, the same work item continues the run (a failed one would start anew).
    engine.on_event = nil
    local again, earlier = engine:submit{ pipeline = "feature", title = "Add due dates to tasks",
                                          body = "Users want a due date on each task.", repo = dir, external_id = "feature" }
    assert.same({ run, "stopped" }, { again, earlier })
    fake:reset()
    fake:script(feature_replies())
    assert.equal("succeeded", (engine:execute(run)))
    assert.equal(5, fake:count())
  end)

  it("sends a malformed TaskResult back and accepts the correction", function()
    start()
    fake:script{ { content = "Sure! Here are the requirements." }, complete("req"), complete("design") }
    local run = submit("short")
    assert.equal("succeeded", (engine:execute(run)))
    assert.equal(3, fake:count())
    local msgs = request(2).messages
    assert.equal("Sure! Here are the requirements.", msgs[#msgs - 1].content)
    assert.contains("not a valid TaskResult: the reply is not a JSON object", msgs[#msgs].content)
  end)

  it("says where the JSON of a malformed TaskResult broke when it sends it back", function()
    start()
    local broken = '```json\n{"status": "COMPLETE", "reasoning": "r", "artifact": "req",}\n```'
    fake:script{ { content = broken }, complete("req"), complete("design") }
    local run = submit("short")
    assert.equal("succeeded", (engine:execute(run)))
    local msgs = request(2).messages
    assert.contains('the reply is not a JSON object: Expected object key string but found T_OBJ_END at character'
      .. ' 60 of the JSON, near `ning": "r", "artifact": "req",}`', msgs[#msgs].content)
  end)

  it("takes a status in lower case, or one fact without its list, without sending them back", function()
    start()
    fake:script{ reply{ status = "complete", reasoning = "r", artifact = "req", verified_facts = "Tasks have ids." },
                 complete("design") }
    local run = submit("short")
    assert.equal("succeeded", (engine:execute(run)))
    assert.equal(2, fake:count())
    local result = rows("SELECT result FROM stage_results WHERE run_id = ? AND stage = 'analysis'", { run })[1].result
    assert.equal("COMPLETE", result.status)
    assert.same({ "Tasks have ids." }, result.verified_facts)
  end)

  it("blocks an objective whose TaskResult is never corrected", function()
    start(1)
    fake:script{ { content = "nope" }, reply{ status = "DONE", reasoning = "x" } }
    local run = submit("short")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal(2, fake:count())
    assert.matches("^BLOCKED: no valid TaskResult after 2 attempts: status must be", esc.reason)
  end)

  it("tells a model whose reply was cut at max_tokens to be shorter, and the human to raise it", function()
    start(1)
    local cut = { content = '{"status": "COMPLETE", "reasoning": "done", "artifact": "# Requirements\n1. a ta', finish = "length" }
    fake:script{ cut, cut }
    local run = submit("short")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    local msgs = request(2).messages
    assert.contains("cut off at the token limit", msgs[#msgs].content)
    assert.matches("^BLOCKED: no valid TaskResult after 2 attempts: the reply was cut off at the token limit %(max_tokens ",
                   esc.reason)
    assert.contains("raise the operative's max_tokens", esc.reason)
  end)

  it("executes a run in one engine at a time; another says which process has it", function()
    start()
    fake:script{ late(complete("req"), 0.5), complete("design") }
    local run = submit("short")
    local first = fiber.spawn(function() return engine:execute(run) end)
    fiber.sleep(0.1)
    local other = pipeline.engine{ db = store, project = project }
    local state, why = other:execute(run)
    other:close()
    assert.equal("busy", state)
    assert.matches("^EBUSY: run " .. run .. " is being executed by process %d+ on .+: wait for it to finish, or stop"
      .. " that process and run `factory resume " .. run .. "`$", why)
    local ok, final = fiber.join(first)
    assert.truthy(ok)
    assert.equal("succeeded", final)
  end)

  it("asks a human to fix a stage's team whose file does not load, and goes on once it does", function()
    local path = dir .. "/teams/solution_architecture.lua"
    start()
    local good = assert(fs.read(path))
    engine:close()
    -- The project as `factory resume` finds it: the team's file broke since the run began.
    assert(fs.write(path, good:gsub('model = "factory/architect"', 'model = "factory/archtect"', 1)))
    project = dsl.project(dir)
    local problems = project:load()
    assert.equal(1, #problems)
    engine = pipeline.engine{ db = store, project = project }
    fake:script{ complete("req"), complete("design") }
    local run = submit("short")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal(1, fake:count(), "the first stage ran")
    assert.equal("team solution_architecture is not loaded: " .. problems[1], esc.reason)
    assert.contains("Fix the team's file", esc.question)
    assert(fs.write(path, good))
    assert.same({}, project.teams:load_all())
    answered_to_the_end(run, esc, "Fixed the alias.", 2)
  end)

  it("keeps a run on the stages its pipeline had when it began, however the file changes meanwhile", function()
    start()
    local function pipeline_of(...)
      local lines = { 'return pipeline "twice" {' }
      for _, name in ipairs({ ... }) do lines[#lines + 1] = ('  stage "%s" { team = "business_analysis" },'):format(name) end
      lines[#lines + 1] = "}"
      assert(fs.write(dir .. "/pipelines/twice.lua", table.concat(lines, "\n")))
      assert.same({}, project.pipelines:load_all())
    end
    local function waiting_at(stage, run)
      local state, esc = engine:execute(run)
      assert.equal("waiting", state)
      assert.equal(stage, esc.stage)
      assert(hitl.answer(store, esc.id, "Go on."))
    end
    local function stages_run(run)
      local out = {}
      for _, r in ipairs(rows("SELECT stage FROM stage_results WHERE run_id = ? ORDER BY id", { run })) do
        out[#out + 1] = r.stage
      end
      return out
    end
    -- A stage added before the finished ones: the run neither repeats "first" nor runs "zeroth".
    fake:script{ complete("one"), blocked("a human must choose") }
    local run = submit("twice", "pinned 1")
    pipeline_of("zeroth", "first", "second")
    waiting_at("second", run)
    fake:script{ complete("two") }
    assert.equal("succeeded", (engine:execute(run)))
    assert.same({ "first", "second", "second" }, stages_run(run))
    -- A stage removed before the run reached it is skipped; with none left, the run succeeds.
    fake:script{ complete("zero"), blocked("a human must choose") }
    run = submit("twice", "pinned 2")
    waiting_at("first", run)
    pipeline_of("zeroth")
    local calls = fake:count()
    assert.equal("succeeded", (engine:execute(run)))
    assert.equal(calls, fake:count(), "no stage ran")
    assert.same({ "zeroth", "first" }, stages_run(run))
    assert.equal("succeeded", rows("SELECT state FROM runs WHERE id = ?", { run })[1].state)
  end)

  it("leaves a run as it was when its pipeline's file does not load, to resume once it does", function()
    start()
    fake:script{ complete("one"), blocked("a human must choose") }
    local run = submit("twice")
    local _, esc = engine:execute(run)
    assert(hitl.answer(store, esc.id, "Go on."))
    engine:close()
    -- The process that resumes it finds the file broken.
    local path = dir .. "/pipelines/twice.lua"
    local good = assert(fs.read(path))
    assert(fs.write(path, good:gsub('stage "second"', 'stage "second" {{', 1)))
    project = dsl.project(dir)
    local problems = project:load()
    assert.equal(1, #problems)
    engine = pipeline.engine{ db = store, project = project }
    local before = rows("SELECT state FROM runs WHERE id = ?", { run })[1].state
    local state, why = engine:execute(run)
    assert.equal("unloaded", state)
    assert.equal(("EINVAL: pipeline twice is not loaded: %s; fix it and resume run %d (its finished stages are kept)")
      :format(problems[1], run), why)
    assert.equal(before, rows("SELECT state FROM runs WHERE id = ?", { run })[1].state, "the run is as it was")
    assert(fs.write(path, good))
    assert.same({}, project.pipelines:load_all())
    fake:script{ complete("two") }
    assert.equal("succeeded", (engine:execute(run)))
    assert.equal(3, fake:count(), "the first stage did not run again")
  end)

  it("asks a human when a run is out of time, and an answer gives it another timeout_s", function()
    start()
    fake:script{ late(complete("req"), 0.3), complete("design") }
    local run = submit("slow")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal("design", esc.stage)
    assert.matches("^time limit: the run has worked %d+ s since it began or a human last answered it %(timeout_s 0.2%)$",
                   esc.reason)
    assert.equal(1, fake:count())
    -- Waiting for the answer does not count against the run's time.
    fiber.sleep(0.3)
    answered_to_the_end(run, esc, "Take another 0.2 s.", 2)
  end)

  it("cancels a run no process executes: its questions close and the work item starts anew", function()
    start()
    fake:script{ { delay = 0.3, content = "not yet" } }
    local run = submit("twice", "to cancel")
    local busy = fiber.spawn(function() return engine:execute(run) end)
    fiber.sleep(0.1)
    local ok, err, code = pipeline.cancel(store, run)
    assert.is_nil(ok)
    assert.equal("EBUSY", code)
    assert.matches("^EBUSY: run " .. run .. " is being executed by process %d+ on .+: stop that process first$", err)
    fake:script{ blocked("a human must choose") }
    local _, state = fiber.join(busy)
    assert.equal("waiting", state)
    assert.equal(1, #hitl.list(store))
    assert(pipeline.cancel(store, run))
    assert.same({}, hitl.list(store), "no question is left open")
    assert.equal("cancelled", (engine:execute(run)))
    assert.equal("cancelled", rows("SELECT state FROM runs WHERE id = ?", { run })[1].state)
    assert.same({ nil, "EINVAL: run " .. run .. " has cancelled already", "EINVAL" }, { pipeline.cancel(store, run) })
    assert.equal("ENOENT", select(3, pipeline.cancel(store, run + 100)))
    local again, earlier = submit("twice", "to cancel")
    assert.truthy(again ~= run and earlier == false)
  end)

  it("waits out a model outage, the wait doubling, and asks again", function()
    start()
    fake:script{ { status = 503 }, { status = 503 }, complete("requirements"), complete("design") }
    local run = submit("short")
    local t0 = time.monotonic()
    assert.equal("succeeded", (engine:execute(run)))
    assert.truthy(time.monotonic() - t0 >= 0.15, "waited 0.05 s, then 0.1 s")
    local waits = {}
    for _, ev in ipairs(events) do
      if ev.kind == "model_unavailable" then waits[#waits + 1] = { ev.data.code, ev.data.wait_s, ev.data.wait } end
    end
    assert.same({ { "EUPSTREAM", 0.05, 1 }, { "EUPSTREAM", 0.1, 2 } }, waits)
    assert.equal(2, #rows("SELECT id FROM events WHERE run_id = ? AND kind = 'model_unavailable'", { run }))
  end)

  it("blocks an objective whose model stays unreachable past its waits, or rejects the request, saying so", function()
    start()
    fake:script{ { status = 503 }, { status = 503 }, { status = 503 } }
    local state, esc = engine:execute(submit("short"))
    assert.equal("waiting", state)
    assert.equal(3, fake:count())
    assert.matches("^BLOCKED: the model could not be reached %(EUPSTREAM%): .*HTTP 503.* %(still, after 2 wait%(s%) "
      .. "for it to come back%)$", esc.reason)
    -- A request the provider refuses is not an outage: no wait.
    fake:reset()
    fake:script{ { status = 400, message = "context too long" } }
    state, esc = engine:execute(submit("short", "a second item"))
    assert.equal("waiting", state)
    assert.equal(1, fake:count())
    assert.matches("^BLOCKED: the model's provider refused the request %(EUPSTREAM%): .*context too long$", esc.reason)
    -- A key it refuses: which setting to check.
    fake:reset()
    fake:script{ { status = 401, message = "invalid x-api-key" } }
    state, esc = engine:execute(submit("short", "a third item"))
    assert.equal("waiting", state)
    assert.equal(1, fake:count())
    assert.matches("^BLOCKED: the model's provider refused the credentials %(EUPSTREAM%): fake/architect: HTTP 401:"
      .. " invalid x%-api%-key: check the api_key of provider fake in factory%.lua %(and the environment variable it"
      .. " reads%), then answer this to try again$", esc.reason)
  end)

  it("blocks an objective whose model answers malformed JSON, saying so", function()
    start()
    fake:script{ { fault = "malformed", text = '{"choices":[{"message":{"content":"x"}}],}' } }
    local run = submit("short")
    local state, esc = engine:execute(run)
    assert.equal("waiting", state)
    assert.equal(1, fake:count())
    assert.matches("^BLOCKED: the model call failed %(EUPSTREAM%): .*malformed", esc.reason)
  end)

  it("hot reload: an edited prompt reaches the next objective, not the running one", function()
    start()
    local logged = {}
    log.set_console({ write = function(_, ...) logged[#logged + 1] = table.concat({ ... }) end })
    local watch = project:watch()
    local file = dir .. "/teams/business_analysis.lua"
    local original = assert(fs.read(file))
    local changed = fiber.cond()
    project.teams:on_change(function(ev) changed:signal(ev) end)
    fake:script{ { delay = 0.3, content = "malformed" }, complete("first"), complete("second") }
    local run = submit("twice")
    local f = fiber.spawn(function() return engine:execute(run) end)
    fiber.sleep(0.05)
    assert(fs.write(file, (original:gsub("You are the business analyst", "You are the NEW analyst"))))
    assert.equal("swapped", changed:wait(2).action)
    local ok, state = fiber.join(f, 5)
    assert.truthy(ok)
    assert.equal("succeeded", state)
    assert.contains("You are the business analyst", request(2).messages[1].content)
    assert.contains("You are the NEW analyst", request(3).messages[1].content)
    -- A syntax error changes nothing and is reported with file:line.
    assert(fs.write(file, "return team \"business_analysis\" {\n  model = = 1,\n}\n"))
    local ev = changed:wait(2)
    assert.equal("rejected", ev.action)
    assert.matches("business_analysis%.lua:2: unexpected symbol near '='$", ev.problem)
    fake:script{ complete("again"), complete("again") }
    assert.equal("succeeded", (engine:execute(submit("twice", "another item"))))
    assert.contains("You are the NEW analyst", request(4).messages[1].content)
    watch:stop()
    log.set_console(nil)
    assert.matches("reload rejected, keeping the previous definition: .*business_analysis%.lua:2:", table.concat(logged))
  end)

  it("packs the context: summarises older material at 80% of the window, keeps the anchor", function()
    start()
    local big = ("The due-date service stores dates in UTC. "):rep(800) -- ~8,000 tokens
    -- Windows of 12,000 tokens: the third stage's inputs (2 x 8,000) do not fit.
    local team_file = dir .. "/teams/backend_engineering.lua"
    local text = assert(fs.read(team_file)):gsub('  model = "factory/coder",', '  model = "factory/coder",\n  context_window = 12000,', 1)
    assert(fs.write(team_file, text))
    local qa = dir .. "/teams/qa_engineering.lua"
    assert(fs.write(qa, (assert(fs.read(qa)):gsub('  model = "factory/fast",', '  model = "factory/fast",\n  context_window = 12000,', 1))))
    assert.same({}, project:load())
    local run = submit("feature")
    fake:script{ complete(big), complete(big), { content = "SUMMARY: dates are UTC." }, complete("# Change"),
                 { content = "SUMMARY: dates are UTC." }, complete("# Report"), complete("# Docs") }
    assert.equal("succeeded", (engine:execute(run)))
    assert.equal("cheap", request(3).model)
    local build = text_of(4)
    assert.contains("Users want a due date on each task.", build)
    assert.contains("SUMMARY: dates are UTC.", build)
    assert.less(12000 * 0.8 * 4, #build)
    local packed = 0
    for _, ev in ipairs(events) do
      if ev.kind == "context_packed" then packed = packed + 1 end
    end
    assert.equal(2, packed)
  end)

  it("retains facts without duplicates and recalls them for later objectives", function()
    start()
    local memory = require "factory.memory"
    assert.equal(2, memory.retain(store, "shared-world", { "Dates are stored in UTC", "Tasks live in tasks.lua" }))
    assert.equal(0, memory.retain(store, "shared-world", { "dates are  stored in utc" }))
    local got = memory.recall(store, { "qa_engineering", "shared-world" }, "how are dates stored?")
    assert.equal("Dates are stored in UTC", got[1].content)
    fake:script(feature_replies())
    assert.equal("succeeded", (engine:execute(submit("feature"))))
    assert.contains("[shared-world] Dates are stored in UTC", text_of(1))
  end)

  it("recalls by what the objective says, not by the words of its repository's path", function()
    start()
    local memory = require "factory.memory"
    local word = dir:match("(%w+)$")
    assert.truthy(word and #word >= 3, "the repository path ends in a word: " .. dir)
    memory.retain(store, "shared-world", { "Dates are stored in UTC", "Builds under " .. word .. " are slow" })
    fake:script(feature_replies())
    assert.equal("succeeded", (engine:execute(submit("feature"))))
    local first = text_of(1)
    assert.contains("Repository: " .. dir, first)
    assert.contains("[shared-world] Dates are stored in UTC", first)
    assert.falsy(first:find("Builds under", 1, true), "the fact about the path was recalled")
  end)
end)
