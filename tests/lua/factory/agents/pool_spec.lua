-- factory.agents.pool: places, cooldown and the daily iteration budget of the build
-- stages' coding agents; and factory.lua's agents section that configures it.
local pool = require "factory.agents.pool"
local config = require "factory.config"
local db = require "factory.db"
local fiber = require "factory.fiber"
local fs = require "factory.core.fs"
local time = require "factory.core.time"

local dir, store

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir))
  store = assert(db.open("sqlite:" .. dir .. "/factory.db"))
  assert(store:migrate())
end)

after_each(function()
  store:close()
  assert(fs.remove(dir, { recursive = true }))
end)

describe("agent pool", function()
  it("runs at most max_concurrent agents at once; the others wait for a place", function()
    local p = pool.new{ db = store, max_concurrent = 2 }
    local inside, most, order = 0, 0, {}
    local fibers = {}
    for i = 1, 5 do
      fibers[i] = fiber.spawn(function()
        local leave = p:enter()
        inside = inside + 1
        most = math.max(most, inside)
        order[#order + 1] = i
        fiber.sleep(0.02)
        inside = inside - 1
        leave()
        leave() -- a second call gives nothing back twice
      end)
    end
    assert(fiber.all(fibers))
    assert.equal(2, most)
    assert.equal(5, #order)
    assert.equal(0, p.running)
  end)

  it("spaces starts by the cooldown", function()
    local p = pool.new{ db = store, max_concurrent = 3, cooldown = 0.05 }
    local starts, fibers = {}, {}
    for i = 1, 3 do
      fibers[i] = fiber.spawn(function()
        local leave = p:enter()
        starts[#starts + 1] = time.monotonic()
        leave()
      end)
    end
    assert(fiber.all(fibers))
    for i = 2, 3 do assert.truthy(starts[i] - starts[i - 1] >= 0.045, "start " .. i .. " came too soon") end
  end)

  it("pays iterations from a daily budget shared through the store, then refuses with EBUDGET", function()
    local p = pool.new{ db = store, daily_iterations = 3 }
    local other = pool.new{ db = store, daily_iterations = 3 }
    assert.equal(true, p:charge(nil, { stage = "fix" }))
    assert.equal(true, other:charge(nil, { stage = "fix" }))
    assert.equal(true, p:charge(nil, { stage = "fix" }))
    local ok, err, code = other:charge(nil, { stage = "fix" })
    assert.equal(nil, ok)
    assert.equal("EBUDGET", code)
    assert.equal("EBUDGET: the daily budget of 3 agent iterations is used up (3 today, UTC)", err)
    local n = assert(store:query("SELECT COUNT(*) AS n FROM events WHERE kind = 'agent_iteration'"))[1].n
    assert.equal(3, n)
    -- Without a cap every iteration is counted and paid.
    assert.equal(true, pool.new{ db = store }:charge(nil, { stage = "fix" }))
  end)

  it("refuses bad settings, naming the field", function()
    local cases = {
      { { max_concurrent = 0 }, "agents.max_concurrent: expected a whole number of at least 1, got 0" },
      { { max_concurrent = 1.5 }, "agents.max_concurrent: expected a whole number of at least 1, got 1.5" },
      { { cooldown = -1 }, "agents.cooldown: expected a number of seconds, 0 or more, got -1" },
      { { daily_iterations = "ten" }, "agents.daily_iterations: expected a whole number, 0 or more, got ten" },
      { { max_agents = 2 }, "agents.max_agents: unknown setting (max_concurrent, cooldown, daily_iterations)" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pool.check(c[1])
      assert.equal(nil, ok)
      assert.equal(c[2], err)
    end
    assert.equal(true, pool.check{ max_concurrent = 2, cooldown = 0.5, daily_iterations = 0 })
  end)

  it("comes from factory.lua's agents section, a bad one reported at its line", function()
    local path = dir .. "/factory.lua"
    assert(fs.write(path, 'providers { fake = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'agents { max_concurrent = 2, daily_iterations = 50 }\n'))
    local cfg = assert(config.load(path))
    assert.same({ max_concurrent = 2, daily_iterations = 50 }, cfg.agents)
    assert(fs.write(path, 'providers { fake = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'agents { max_concurrent = 0 }\n'))
    local none, err = config.load(path)
    assert.equal(nil, none)
    assert.contains("factory.lua:2:", err)
    assert.contains("agents.max_concurrent: expected a whole number of at least 1, got 0", err)
  end)
end)
