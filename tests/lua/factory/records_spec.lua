-- Specs for factory.records on SQLite and on the throwaway PostgreSQL server: a
-- router record (router.on_call) is stored whole, attempt chain included; events
-- written together keep their order.
local db = require "factory.db"
local records = require "factory.records"

local backends = require "tests.tools.backends"
after_each(backends.cleanup)

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  describe("records.model_call on " .. backend, function()
    it("stores the call's fields, first-token latency and attempt chain, and audits it", function()
      local d = assert(db.open(fresh()))
      assert(d:migrate())
      local attempts = {
        { provider = "cloud", model = "big", status = 429, code = "EUPSTREAM", outcome = "cloud/big: HTTP 429: slow down",
          latency_ms = 3.5, retry_after_s = 2 },
        { provider = "local", model = "small", status = 200, outcome = "ok", latency_ms = 40.25 },
      }
      local id = records.model_call(d, { kind = "chat", alias = "factory/coder", provider = "local", model = "small",
        team = "qa", prompt_tokens = 12, completion_tokens = 5, cost_usd = 0.001, latency_ms = 45.5,
        first_token_ms = 20.5, status = "ok", attempts = attempts }, "tester")
      records.model_call(d, { alias = "factory/coder", provider = "", model = "", team = "qa", status = "error",
        code = "EBUDGET", error = "EBUDGET: budget exhausted", latency_ms = 0.1, attempts = {} })
      local rows = assert(d:query("SELECT id, team, operative, alias, provider, model, prompt_tokens, completion_tokens,"
        .. " latency_ms, first_token_ms, status, code, error, attempts FROM model_calls ORDER BY id"))
      assert.equal(2, #rows)
      assert.same({ id = id, team = "qa", operative = "tester", alias = "factory/coder", provider = "local",
                    model = "small", prompt_tokens = 12, completion_tokens = 5, latency_ms = 45.5,
                    first_token_ms = 20.5, status = "ok", attempts = attempts }, rows[1])
      assert.same({ "-", "-", "EBUDGET", {} }, { rows[2].provider, rows[2].model, rows[2].code, rows[2].attempts })
      assert.is_nil(rows[2].first_token_ms)
      assert.equal(2, d:query("SELECT COUNT(*) AS n FROM audit WHERE kind = 'model_call'")[1].n)
      d:close()
    end)
  end)

  describe("records.events on " .. backend, function()
    it("stores several events in order in one statement, and an empty list as nothing", function()
      local d = assert(db.open(fresh()))
      assert(d:migrate())
      records.event(d, nil, "first", { n = 1 })
      assert(d:tx(function(tx)
        records.events(tx, nil, { { "second", { n = 2 } }, { "third" }, { "fourth", { n = 4 } } })
        records.events(tx, nil, {})
        return true
      end))
      local rows = assert(d:query("SELECT kind, data FROM events ORDER BY id"))
      assert.same({ { kind = "first", data = { n = 1 } }, { kind = "second", data = { n = 2 } },
                    { kind = "third", data = {} }, { kind = "fourth", data = { n = 4 } } }, rows)
      d:close()
    end)
  end)

  describe("records.team_spending on " .. backend, function()
    it("sums each team's cost and tokens since a moment, one team or all", function()
      local d = assert(db.open(fresh()))
      assert(d:migrate())
      local since = 1000000
      for _, row in ipairs{ { "a", 0.5, 10, since }, { "a", 0.25, 5, since + 1 }, { "b", 2, 7, since + 2 },
                            { "a", 100, 1000, since - 1 } } do
        records.model_call(d, { team = row[1], alias = "x", provider = "p", model = "m", prompt_tokens = row[3],
                                completion_tokens = 1, cost_usd = row[2], status = "ok" })
        assert(d:exec("UPDATE model_calls SET created_at = ? WHERE id = (SELECT MAX(id) FROM model_calls)", { row[4] }))
      end
      local all = records.team_spending(d, since)
      table.sort(all, function(x, y) return x.team < y.team end)
      assert.same({ { team = "a", usd = 0.75, tokens = 17 }, { team = "b", usd = 2, tokens = 8 } }, all)
      assert.same({ { team = "b", usd = 2, tokens = 8 } }, records.team_spending(d, since, "b"))
      assert.same({}, records.team_spending(d, since, "nobody"))
      d:close()
    end)
  end)
end
