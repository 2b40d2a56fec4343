-- factory.budgets: a team's daily budget held across processes through the store,
-- on both backends: holds of live, dead and expired processes, the hold going with
-- the call's record, and two `factory serve` processes that together never send
-- more calls than the budget allows.
local budgets = require "factory.budgets"
local router = require "factory.router"
local records = require "factory.records"
local engine_id = require "factory.engine_id"
local db = require "factory.db"
local http = require "factory.http"
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local json = require "factory.json"
local time = require "factory.core.time"
local backends = require "tests.tools.backends"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local fake_model = dofile(HERE .. "../../tools/fake_model.lua")
local BIN = require("factory.core.host").exe

-- Each call reserves and costs 1 USD (one output token at 1 USD; max_tokens = 1).
local PRICE = { input = 0, output = 1000000 }

local function chat(team)
  return router.chat({ model = "factory/coder", max_tokens = 1, messages = { { role = "user", content = "hi" } } },
                     { team = team })
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function count(store, sql, params)
  return tonumber(assert(store:query(sql, params))[1].n)
end

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  describe("team budgets across processes on " .. backend, function()
    local fake, store, url, detach, unhook, process

    before_each(function()
      fake = assert(fake_model.start())
      url = fresh()
      store = assert(db.open(url))
      assert(store:migrate())
      local cfg = fake:router_config{ ["factory/coder"] = "gpt-test" }
      cfg.prices = { ["fake/gpt-test"] = PRICE }
      cfg.budgets = { teams = { poor = { usd_per_day = 5 } } }
      assert(router.configure(cfg))
      unhook = router.on_call(function(r) records.model_call(store, r) end)
      process = engine_id.new()
      detach = budgets.attach(store, process)
    end)

    after_each(function()
      detach()
      unhook()
      router.clear_budget("team", "poor")
      store:close()
      fake:close()
      backends.cleanup()
    end)

    local function hold(process, usd, expires_at)
      assert(store:exec("INSERT INTO budget_holds (team, process, usd, tokens, expires_at) VALUES ('poor', ?, ?, 0, ?)",
                        { process, usd, expires_at or time.now() + 60 }))
    end

    it("counts what a live process holds for its calls in flight, and no more than the budget goes out", function()
      -- Another live process (this one's pid, as another engine) holds 3 of the 5 USD.
      hold(engine_id.new(), 3)
      fake:script{ { content = "a", usage = { prompt = 1, completion = 1 } },
                   { content = "b", usage = { prompt = 1, completion = 1 } } }
      assert(chat("poor"))
      assert(chat("poor"))
      local res, err, code = chat("poor")
      assert.is_nil(res)
      assert.equal("EBUDGET", code)
      assert.contains("team poor has 0.0000 of 5.0000 USD left today (2.0000 spent, 3.0000 held by calls in flight"
        .. " in any process), this call may cost 1.0000", err)
      assert.equal(2, fake:count())
      -- The two calls' holds went with their records; the other process's stays.
      router.flush()
      local left = budgets.holds(store, "poor")
      assert.equal(1, #left)
      assert.equal(3, left[1].usd)
      assert.equal(2, count(store, "SELECT COUNT(*) AS n FROM model_calls WHERE team = 'poor' AND status = 'ok'"))
    end)

    it("holds a streamed call until its record is written at the stream's end", function()
      fake:script{ { content = "one two three", chunk_delay = 0.05, usage = { prompt = 1, completion = 1 } } }
      local s = assert(router.chat({ model = "factory/coder", max_tokens = 1, stream = true,
                                     messages = { { role = "user", content = "hi" } } }, { team = "poor" }))
      assert.equal(1, #budgets.holds(store, "poor"))
      while s:read() do end
      s:close()
      router.flush()
      assert.equal(0, #budgets.holds(store, "poor"))
      assert.equal(1, count(store, "SELECT COUNT(*) AS n FROM model_calls WHERE team = 'poor' AND status = 'ok'"))
    end)

    it("renews the holds of its calls in flight, and lets one whose call is gone expire", function()
      local ttl, renew = budgets.HOLD_TTL, budgets.RENEW_S
      budgets.HOLD_TTL, budgets.RENEW_S = 0.4, 0.1
      detach()
      detach = budgets.attach(store, process)
      -- A hold of this process whose caller went away before its call was sent.
      hold(process, 1, time.now() + budgets.HOLD_TTL)
      fake:script{ { content = "a b c d e f g h", chunk_delay = 0.12, usage = { prompt = 1, completion = 1 } } }
      local s = assert(router.chat({ model = "factory/coder", max_tokens = 1, stream = true,
                                     messages = { { role = "user", content = "hi" } } }, { team = "poor" }))
      fiber.sleep(0.7)
      local now = time.now()
      local live, stale = 0, 0
      for _, h in ipairs(budgets.holds(store, "poor")) do
        if h.expires_at > now then live = live + 1 else stale = stale + 1 end
      end
      assert.same({ 1, 1 }, { live, stale }, "the call's hold was renewed past its first expiry; the other was not")
      while s:read() do end
      s:close()
      budgets.HOLD_TTL, budgets.RENEW_S = ttl, renew
      -- The next reservation drops the expired hold; the finished call's went with its record.
      fake:script{ { content = "a", usage = { prompt = 1, completion = 1 } } }
      assert(chat("poor"))
      router.flush()
      assert.equal(0, #budgets.holds(store, "poor"))
    end)

    it("drops the holds of a process that died on this host, and expired ones", function()
      local dead = assert(proc.spawn{ argv = { "true" } })
      local pid = dead.pid
      dead:wait()
      dead:close()
      hold(("%s:%d:1"):format(engine_id.HOST, pid), 4)
      hold("elsewhere:1:1", 4, time.now() - 1)
      hold("elsewhere:2:1", 1)
      fake:script{ { content = "a", usage = { prompt = 1, completion = 1 } } }
      assert(chat("poor"))
      router.flush()
      local left = budgets.holds(store, "poor")
      assert.equal(1, #left, json.encode(left))
      assert.equal("elsewhere:2:1", left[1].process)
    end)

    it("sees another process's recorded spending at once, not at the next recount", function()
      assert(store:exec("INSERT INTO model_calls (team, provider, model, cost_usd, status, created_at)"
        .. " VALUES ('poor', 'up', 'gpt-test', 4.5, 'ok', ?)", { time.now() }))
      local res, err, code = chat("poor")
      assert.is_nil(res)
      assert.equal("EBUDGET", code)
      assert.contains("team poor has 0.5000 of 5.0000 USD left today (4.5000 spent", err)
      assert.equal(0, fake:count())
      -- A refused call is recorded, and holds nothing.
      router.flush()
      assert.equal(0, #budgets.holds(store))
      assert.equal(1, count(store, "SELECT COUNT(*) AS n FROM model_calls WHERE code = 'EBUDGET'"))
    end)

    it("refuses a call it cannot check, sending nothing", function()
      local closed = assert(db.open(url))
      closed:close()
      local detach_closed = budgets.attach(closed, engine_id.new())
      local res, err, code = chat("poor")
      detach_closed()
      assert.is_nil(res)
      assert.equal("EUNAVAILABLE", code)
      assert.contains("budget: team poor's budget could not be checked in the store (ECLOSED: ", err)
      assert.equal(0, fake:count())
      -- A team without a budget is not asked about.
      fake:script{ { content = "a" } }
      assert(chat("rich"))
    end)

    it("records a call of a run the store does not know, and lets its hold go", function()
      fake:script{ { content = "a", usage = { prompt = 1, completion = 1 } } }
      assert(router.chat({ model = "factory/coder", max_tokens = 1, messages = { { role = "user", content = "hi" } } },
                         { team = "poor", run = 987654 }))
      router.flush()
      assert.equal(0, #budgets.holds(store))
      local rows = assert(store:query("SELECT run_id, cost_usd FROM model_calls WHERE team = 'poor'"))
      assert.equal(1, #rows)
      assert.is_nil(rows[1].run_id)
      assert.equal(1, rows[1].cost_usd)
    end)

    it("two factory serve processes on one store send together no more calls than the budget allows", function()
      local cfg = os.tmpname()
      write(cfg, ([[
providers { up = { base_url = "%s/v1", api_key = "sk-upstream" } }
models { ["factory/coder"] = { "up/gpt-test" } }
prices { ["up/gpt-test"] = { input = 0, output = 1000000 } }
budgets { teams = { poor = { usd_per_day = 10 } } }
keys { ["sk-team-poor"] = { team = "poor" } }
]]):format(fake:url()))
      local servers, urls = {}, {}
      for i = 1, 2 do
        servers[i] = assert(proc.spawn{ argv = { BIN, "serve", "--port", "0", "--config", cfg, "--db", url },
                                        stderr = "null" })
        urls[i] = assert(servers[i]:read_line(), "serve started"):match("(http://%S+)")
      end
      -- Every answer takes a moment, so that calls of both processes are in flight together.
      local replies = {}
      for i = 1, 40 do replies[i] = { content = "x", delay = 0.2, usage = { prompt = 1, completion = 1 } } end
      fake:script(replies)
      local statuses = {}
      local fibers = {}
      for i = 1, 40 do
        fibers[i] = fiber.spawn(function()
          local res = assert(http.request{ method = "POST", url = urls[i % 2 + 1] .. "/v1/chat/completions", timeout = 30,
            headers = { ["Content-Type"] = "application/json", Authorization = "Bearer sk-team-poor" },
            body = json.encode({ model = "factory/coder", max_tokens = 1, messages = { { role = "user", content = "hi" } } }) })
          statuses[res.status] = (statuses[res.status] or 0) + 1
        end)
      end
      assert(fiber.all(fibers))
      for _, p in ipairs(servers) do
        p:kill("TERM")
        p:wait(10)
        p:close()
      end
      os.remove(cfg)
      assert.same({ [200] = 10, [402] = 30 }, statuses)
      assert.equal(10, fake:count())
      assert.equal(10, tonumber(assert(store:query(
        "SELECT SUM(cost_usd) AS usd FROM model_calls WHERE team = 'poor'"))[1].usd))
      assert.equal(0, #budgets.holds(store))
    end)
  end)
end
