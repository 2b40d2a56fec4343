-- factory.config: factory.lua's providers and models sections, each mistake
-- reported with the file, the line and the field.
local config = require "factory.config"
local fs = require "factory.core.fs"

local dir, path

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir))
  path = dir .. "/factory.lua"
end)

after_each(function()
  fs.remove(dir, { recursive = true })
end)

local function load(text)
  assert(fs.write(path, text))
  return config.load(path)
end

describe("factory.lua", function()
  it("gives the router its providers and models, kind openai by default", function()
    local cfg = assert(load('providers { local_llm = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'models { ["factory/coder"] = { "local_llm/qwen" } }\n'))
    assert.equal("openai", cfg.router.providers.local_llm.kind)
    assert.same({ "local_llm/qwen" }, cfg.router.models["factory/coder"])
  end)

  it("tells a missing base_url from one that is not a string", function()
    local none, err = load('providers {\n  mine = { api_key = "k" },\n}\n')
    assert.equal(nil, none)
    assert.contains("factory.lua:", err)
    assert.contains("providers.mine: base_url is required", err)
    none, err = load('providers {\n  mine = { base_url = 8080 },\n}\n')
    assert.equal(nil, none)
    assert.contains("providers.mine: base_url must be a string (a URL), got a number", err)
    none, err = load('providers {\n  mine = { base_url = "127.0.0.1:11434/v1" },\n}\n')
    assert.is_nil(none)
    assert.contains('factory.lua:1: providers.mine: base_url must be an http:// or https:// URL such as '
      .. '"http://127.0.0.1:11434/v1", got "127.0.0.1:11434/v1"', err)
  end)

  it("reports a model chain naming an undeclared provider", function()
    local none, err = load('providers { a = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'models { ["factory/fast"] = { "b/gpt" } }\n')
    assert.equal(nil, none)
    assert.contains("factory.lua:2:", err)
    assert.contains('models["factory/fast"]: unknown provider "b"', err)
  end)

  it("refuses a misspelt or mistyped budget, price, limit, provider field or key", function()
    local P = 'providers { up = { base_url = "http://127.0.0.1:9/v1" } }\n'
    local cases = {
      { 'budgets { teams = { qa = { usd_per_dya = 5 } } }', "budgets.teams.qa: unknown field usd_per_dya" },
      { 'budgets { teams = { qa = { usd_per_day = "5" } } }', 'budgets.teams.qa.usd_per_day: expected a number >= 0, got "5"' },
      { 'budgets { teams = 5 }', "budgets.teams: expected a table, got a number" },
      { 'budgets { run = { usd = -1 } }', "budgets.run.usd: expected a number >= 0, got -1" },
      { 'budgets { run = { dollars = 1 } }', "budgets.run: unknown field dollars (expected tokens, usd)" },
      { 'budgets { team = {} }', "budgets: unknown field team (expected run, teams, utc_offset)" },
      { 'budgets { utc_offset = 99 }', "budgets.utc_offset: expected hours from -14 to 14" },
      { 'prices { ["up/m"] = { input = "3" } }', 'prices["up/m"].input: expected a number >= 0, got "3"' },
      { 'prices { ["up/m"] = { inputs = 3 } }', 'prices["up/m"]: unknown field inputs (expected input, output)' },
      { 'prices { [""] = { input = 3 } }', 'prices[""]: expected ["provider/model"]' },
      { 'prices { 5 }', 'prices["1"]: expected ["provider/model"]' },
      { 'limits { timout = 3 }', "limits: unknown field timout (expected backoff, backoff_max," },
      { 'limits { retries = 2.5 }', "limits.retries: expected a whole number >= 0, got 2.5" },
      { 'limits { timeout = 1/0 }', "limits.timeout: expected a number >= 0, got inf" },
      { 'providers { x = { base_url = "http://h", apikey = "k" } }', "providers.x: unknown field apikey" },
      { 'providers { x = { base_url = "http://h", rpm = "60" } }', 'providers.x.rpm: expected a number >= 0, got "60"' },
      { 'keys { ["sk-secret-1"] = { tema = "qa" } }', 'keys: expected { ["sk-..."] = { team = NAME } }' },
      { 'keys { ["sk-secret-1"] = { team = "qa", runn = 1 } }', "keys (the key of team qa): unknown field runn" },
    }
    for _, case in ipairs(cases) do
      local text = case[1]:find("^providers") and case[1] or (P .. case[1])
      local none, err = load(text .. "\n")
      assert.equal(nil, none, case[1])
      assert.contains(case[2], err, case[1])
      assert.matches("factory%.lua:%d+: ", err, case[1])
      assert.falsy(err:find("sk-secret", 1, true), "the key stays out of the message")
    end
    local cfg = assert(load(P .. 'prices { ["up/m"] = { input = 3, output = 15 } }\n'
      .. 'budgets { teams = { qa = { usd_per_day = 5, tokens_per_day = 100000 } }, run = { usd = 1 }, utc_offset = -5 }\n'
      .. 'limits { retries = 3, backoff = 0.25, timeout = 120 }\n'
      .. 'keys { ["sk-qa"] = { team = "qa" } }\n'))
    assert.equal(5, cfg.router.budgets.teams.qa.usd_per_day)
    assert.equal(3, cfg.router.limits.retries)
    assert.equal("qa", cfg.keys["sk-qa"].team)
  end)

  it("warns of a variable env reads unset, and of none that is set", function()
    local cfg = assert(load('providers {\n  a = { base_url = "http://127.0.0.1:9/v1", api_key = env "FACTORY_SPEC_UNSET_KEY" },\n'
      .. '  b = { base_url = "http://127.0.0.1:9/v1", api_key = env "PATH" },\n}\n'))
    assert.same({ 'environment variable FACTORY_SPEC_UNSET_KEY is not set (env "FACTORY_SPEC_UNSET_KEY" gives nil)' },
      cfg.warnings)
    assert.is_nil(cfg.router.providers.a.api_key)
    assert.equal(os.getenv("PATH"), cfg.router.providers.b.api_key)
  end)

  it("warns of a chain's model without a price when a budget is in USD", function()
    local P = 'providers { up = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'models { ["factory/fast"] = { "up/priced", "up/free" }, ["factory/cheap"] = { "up/bare" } }\n'
      .. 'prices { ["up/priced"] = { input = 1, output = 2 }, free = { input = 0, output = 0 } }\n'
    assert.same({}, assert(load(P)).warnings)
    assert.same({}, assert(load(P .. 'budgets { teams = { qa = { tokens_per_day = 10 } } }\n')).warnings)
    assert.same({ 'models["factory/cheap"]: up/bare has no price in prices {}: its calls count as $0 against the'
                  .. ' USD budgets' },
      assert(load(P .. 'budgets { teams = { qa = { usd_per_day = 1 } } }\n')).warnings)
  end)

  it("reports a syntax error with its line", function()
    local none, err = load('providers { a = { base_url = "http://x" }\nmodels {')
    assert.equal(nil, none)
    assert.contains("factory.lua:2:", err)
  end)
end)
