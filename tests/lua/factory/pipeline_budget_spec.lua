-- Team budgets in the pipeline engine: a team file's budget reaches the router, the
-- smaller of it and factory.lua's applies, what the store says the team spent today
-- is counted, and a reloaded team file changes the budget; a spent budget makes the
-- objective BLOCKED (escalated) before anything is sent.
local pipeline = require "factory.pipeline"
local dsl = require "factory.dsl"
local db = require "factory.db"
local router = require "factory.router"
local json = require "factory.json"
local time = require "factory.core.time"
local fs = require "factory.core.fs"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local fake_model = dofile(HERE .. "../../tools/fake_model.lua")

local TEAM = [[
return team "budget_probe" {
  description = "Requirements.",
  model = "factory/architect",
  budget = { usd_per_day = %s },
  operative "analyst" { prompt = "Write requirements." },
}]]

local PIPE = [[
return pipeline "one" {
  stage "analysis" { team = "budget_probe" },
}]]

local dir, fake, store, project, engine
local RECOUNT_S = pipeline.RECOUNT_S

local function start(usd_per_day, budgets)
  assert(fs.write(dir .. "/teams/budget_probe.lua", TEAM:format(usd_per_day)))
  project = dsl.project(dir)
  assert.same({}, project:load())
  engine = pipeline.engine{ db = store, project = project, budgets = budgets }
end

local function complete()
  return { content = json.encode{ status = "COMPLETE", reasoning = "done", artifact = "requirements",
                                  blockers = {}, assumptions_made = {}, verified_facts = {} } }
end

local n = 0
local function run_once()
  n = n + 1
  local id = assert(engine:submit{ pipeline = "one", title = "t" .. n, external_id = "t" .. n })
  return id, engine:execute(id)
end

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir .. "/teams"))
  assert(fs.mkdir_p(dir .. "/pipelines"))
  assert(fs.write(dir .. "/pipelines/one.lua", PIPE))
  fake = assert(fake_model.start())
  assert(router.configure(fake:router_config({ ["factory/architect"] = "architect", ["factory/cheap"] = "cheap" },
                                              { prices = { ["fake/architect"] = { input = 1, output = 1 } } })))
  store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
  assert(store:migrate())
end)

after_each(function()
  if engine then engine:close() end
  engine = nil
  -- The router's accounts live as long as the process: each case starts a fresh day.
  router.clear_budget("team", "budget_probe")
  pipeline.RECOUNT_S = RECOUNT_S
  store:close()
  fake:close()
  assert(fs.remove(dir, { recursive = true }))
end)

-- A run that the team's budget stops before its first call is sent: the escalation
-- says so (its reason starts with `reason`), and the fake has had `sent` requests.
-- beyond: one call would cost more than the whole budget, which waiting does not cure.
local function blocked_by_budget(reason, sent, beyond)
  local _, state, esc = run_once()
  assert.equal("waiting", state)
  assert.equal(sent, fake:count())
  assert.matches("^BLOCKED: budget exhausted: team budget_probe" .. (reason or ""), esc.reason)
  if beyond then
    assert.matches("^One call of team budget_probe may cost [%d.]+ USD %(its prompt, and max_tokens at the dearest price"
      .. " of its model's chain%), more than the team's whole daily budget of 0%.0000 USD: raise budget%.usd_per_day %(or"
      .. " tokens_per_day%) in teams/budget_probe%.lua, or budgets%.teams%.budget_probe in factory%.lua, above it, or lower"
      .. " the operative's max_tokens; then answer this to go on%.$", esc.question)
    return
  end
  assert.equal("Team budget_probe's budget for today is spent. Raise budget.usd_per_day (or tokens_per_day) in"
    .. " teams/budget_probe.lua, or budgets.teams.budget_probe in factory.lua, or wait until its day starts again"
    .. " (budgets.utc_offset); then answer this to go on.", esc.question)
end

local function limit()
  return router.stats().budgets["team:budget_probe"].limit_usd
end

describe("team budgets", function()
  it("a team file's budget is the router's limit for that team", function()
    start("10")
    assert.equal(10, limit())
  end)

  it("a spent team budget blocks the objective before anything is sent", function()
    start("0.000001")
    blocked_by_budget(" has 0.0000 of 0.0000 USD left", 0, true)
  end)

  it("factory.lua's smaller budget for the team wins", function()
    start("10", { teams = { budget_probe = { usd_per_day = 0.5 } } })
    assert.equal(0.5, limit())
  end)

  it("what the store says the team spent today is counted, from midnight where budgets.utc_offset says", function()
    -- Days start at midnight UTC+5:30 here; a call recorded a minute before that
    -- midnight was yesterday's.
    assert(router.configure(fake:router_config({ ["factory/architect"] = "architect" },
      { prices = { ["fake/architect"] = { input = 1, output = 1 } }, budgets = { utc_offset = 5.5 } })))
    local midnight = router.day_start()
    local now = time.now()
    assert.truthy(midnight <= now and now - midnight < 86400)
    assert.equal(0, (midnight + 5.5 * 3600) % 86400)
    for _, row in ipairs{ { 9.75, midnight }, { 100, midnight - 60 }, { 100, now - 2 * 86400 } } do
      assert(store:exec("INSERT INTO model_calls (team, provider, model, prompt_tokens, completion_tokens, cost_usd,"
        .. " status, created_at) VALUES ('budget_probe', 'fake', 'architect', 40, 2, ?, 'ok', ?)", row))
    end
    start("10")
    local account = router.stats().budgets["team:budget_probe"]
    assert.same({ 10, 9.75, 42 }, { account.limit_usd, account.spent_usd, account.spent_tokens })
    -- Reloading the team file counts the store again, without counting a call twice.
    assert(fs.write(dir .. "/teams/budget_probe.lua", TEAM:format("9.7501")))
    assert.same({}, project.teams:load_all())
    account = router.stats().budgets["team:budget_probe"]
    assert.same({ 9.7501, 9.75, 42 }, { account.limit_usd, account.spent_usd, account.spent_tokens })
    blocked_by_budget(" has 0.0001 of 9.7501 USD left", 0)
  end)

  it("sees what another process spends from the team's budget meanwhile, before the next objective", function()
    start("10")
    fake:script{ complete() }
    assert.equal("succeeded", select(2, run_once()))
    -- Another process spends nearly all of the day's budget.
    assert(store:exec("INSERT INTO model_calls (team, provider, model, cost_usd, status, created_at)"
      .. " VALUES ('budget_probe', 'fake', 'architect', 9.9999, 'ok', ?)", { time.now() }))
    pipeline.RECOUNT_S = 0
    blocked_by_budget(nil, 1)
  end)

  it("reloading the team file changes its budget", function()
    start("10")
    assert(fs.write(dir .. "/teams/budget_probe.lua", TEAM:format("3")))
    assert.same({}, project.teams:load_all())
    assert.equal(3, limit())
    fake:script{ complete() }
    local _, state = run_once()
    assert.equal("succeeded", state)
  end)

  it("a team file reloaded without a budget leaves the team unlimited", function()
    start("0.000001")
    assert.equal("waiting", select(2, run_once()))
    assert(fs.write(dir .. "/teams/budget_probe.lua", (TEAM:gsub("\n  budget = [^\n]*", ""))))
    assert.same({}, project.teams:load_all())
    fake:script{ complete() }
    assert.equal("succeeded", select(2, run_once()))
  end)

  it("factory.lua's budgets set again (after a reload) apply to the next objective", function()
    start("10", { teams = { budget_probe = { usd_per_day = 0.5 } } })
    engine:set_budgets({ teams = { budget_probe = { usd_per_day = 2 } } })
    assert.equal(2, limit())
    engine:set_budgets({ teams = { budget_probe = { usd_per_day = 0.000001 } } })
    blocked_by_budget(nil, 0, true)
    engine:set_budgets(nil)
    assert.equal(10, limit())
  end)
end)
