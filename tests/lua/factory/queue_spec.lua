-- Specs for factory.queue, run on SQLite and on the throwaway PostgreSQL server
-- (tests/tools/pg.lua): ordering, delay, leases, completion, retries, cancel,
-- wake-ups, the SIGKILL crash test (acceptance 2) and 4 processes sharing one
-- PostgreSQL queue (acceptance 3).
local db = require "factory.db"
local queue = require "factory.queue"
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local crash = require "tests.tools.queue_crash"

local backends = require "tests.tools.backends"
after_each(backends.cleanup)



local function ids(items)
  local out = {}
  for i, it in ipairs(items) do out[i] = it.id end
  return out
end

local function count(d, sql, params)
  return assert(d:query(sql, params))[1].n
end

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  local function open()
    local url = fresh()
    local d = assert(db.open(url))
    assert(d:migrate())
    return d, queue.new(d), url
  end

  describe("queue on " .. backend, function()
    it("claims by priority, then age", function()
      local d, q = open()
      local order = { "low", "medium", "critical", "high", "critical", "low" }
      local want = {}
      for i, p in ipairs(order) do want[i] = { id = assert(q:enqueue({ n = i }, { priority = p })), p = p } end
      local items = assert(q:claim("w", { batch = 4 }))
      assert.same({ want[3].id, want[5].id, want[4].id, want[2].id }, ids(items))
      assert.same({ n = 3 }, items[1].payload)
      assert.equal("critical", items[1].priority)
      assert.equal(1, items[1].attempts)
      items = assert(q:claim("w", { batch = 4 }))
      assert.same({ want[1].id, want[6].id }, ids(items))
      assert.same({}, assert(q:claim("w")))
      assert.error_matches(function() q:enqueue(1, { priority = "urgent" }) end, "unknown priority urgent")
      d:close()
    end)

    it("a delayed item waits; a dedupe key enqueues once", function()
      local d, q = open()
      local id = assert(q:enqueue("later", { delay = 0.3 }))
      assert.same({}, assert(q:claim("w")))
      assert.equal(1, assert(q:stats()).delayed)
      fiber.sleep(0.35)
      assert.same({ id }, ids(assert(q:claim("w"))))
      local a, new = q:enqueue("x", { dedupe_key = "k1" })
      assert.truthy(new)
      local again, new2 = q:enqueue("y", { dedupe_key = "k1" })
      assert.equal(a, again)
      assert.equal(false, new2)
      d:close()
    end)

    it("an expired lease is claimable again; the old owner can neither heartbeat nor complete", function()
      local d, q = open()
      local id = assert(q:enqueue("job"))
      local mine = assert(q:claim("a", { lease = 0.2 }))[1]
      assert.same({}, assert(q:claim("b")))
      fiber.sleep(0.25)
      assert.equal(1, assert(q:stats()).expired)
      local theirs = assert(q:claim("b", { lease = 5 }))[1]
      assert.equal(id, theirs.id)
      assert.equal(2, theirs.attempts)
      local ok, err, code = q:complete(mine, "a", "late")
      assert.is_nil(ok)
      assert.equal("ELEASE", code)
      assert.matches("no longer leased by a", err)
      assert.equal("ELEASE", select(3, q:heartbeat(mine, "a", 5)))
      assert.truthy(q:complete(theirs, "b", "ok"))
      ok, _, code = q:complete(theirs, "b", "twice")
      assert.is_nil(ok)
      assert.equal("ELEASE", code)
      local row = q:get(id)
      assert.equal("done", row.state)
      assert.equal("ok", row.result)
      d:close()
    end)

    it("heartbeat extends the lease", function()
      local d, q = open()
      assert(q:enqueue("job"))
      local item = assert(q:claim("a", { lease = 0.3 }))[1]
      fiber.sleep(0.2)
      local expires = assert(q:heartbeat(item, "a", 0.5))
      assert.near(time.now() + 0.5, expires, 0.1)
      fiber.sleep(0.2)
      assert.same({}, assert(q:claim("b")))
      assert.truthy(q:complete(item, "a", "done"))
      d:close()
    end)

    it("complete commits the result and the caller's rows together, or neither", function()
      local d, q = open()
      assert(d:script("CREATE TABLE side (item BIGINT, note TEXT)"))
      local id = assert(q:enqueue("job"))
      local item = assert(q:claim("a", { lease = 5 }))[1]
      local function write(tx, it) assert(tx:exec("INSERT INTO side (item, note) VALUES (?, ?)", { it.id, "x" })) end
      local ok, err = q:complete(item, "a", { r = 1 }, function(tx, it)
        write(tx, it)
        error("EBOOM: the caller failed")
      end)
      assert.is_nil(ok)
      assert.matches("EBOOM", err)
      ok, err = q:complete(item, "a", { r = 1 }, function(tx, it)
        write(tx, it)
        return nil, "ENOPE: refused"
      end)
      assert.is_nil(ok)
      assert.equal("ENOPE: refused", err)
      assert.equal(0, count(d, "SELECT COUNT(*) AS n FROM side"))
      assert.equal("leased", q:get(id).state)
      local res = { q:complete(item, "a", { r = 2 }, function(tx, it)
        write(tx, it)
        return "extra"
      end) }
      assert.same({ true, "extra" }, res)
      assert.equal(1, count(d, "SELECT COUNT(*) AS n FROM side"))
      local row = q:get(id)
      assert.equal("done", row.state)
      assert.same({ r = 2 }, row.result)
      d:close()
    end)

    it("fail retries with exponential backoff, then dead-letters with the last error", function()
      local d, q = open()
      q.backoff = 0.1
      local id = assert(q:enqueue("job", { max_attempts = 3 }))
      for attempt = 1, 3 do
        local item = assert(q:claim("a"))[1]
        assert.equal(id, item.id)
        assert.equal(attempt, item.attempts)
        local verdict, at = q:fail(item, "a", "error " .. attempt)
        if attempt < 3 then
          assert.equal("retry", verdict)
          assert.near(time.now() + 0.1 * 2 ^ (attempt - 1), at, 0.05)
          assert.same({}, assert(q:claim("a")))
          fiber.sleep(0.1 * 2 ^ (attempt - 1) + 0.02)
        else
          assert.equal("dead", verdict)
        end
      end
      local row = q:get(id)
      assert.equal("dead", row.state)
      assert.equal("error 3", row.last_error)
      assert.same({}, assert(q:claim("a")))
      assert.equal(1, assert(q:stats()).dead)
      d:close()
    end)

    it("a lease that expires on the last attempt dead-letters the item", function()
      local d, q = open()
      local id = assert(q:enqueue("job", { max_attempts = 1 }))
      assert(q:claim("a", { lease = 0.1 }))
      fiber.sleep(0.15)
      assert.same({}, assert(q:claim("b")))
      local row = q:get(id)
      assert.equal("dead", row.state)
      assert.equal("lease of a expired", row.last_error)
      d:close()
    end)

    it("cancel: a ready item is never claimed, a leased one cannot complete", function()
      local d, q = open()
      local a = assert(q:enqueue("a"))
      assert.truthy(q:cancel(a))
      assert.same({}, assert(q:claim("w")))
      local _, _, code = q:cancel(a)
      assert.equal("ESTATE", code)
      assert.equal("ENOTFOUND", select(3, q:cancel(999999)))
      assert(q:enqueue("b"))
      local item = assert(q:claim("w", { lease = 5 }))[1]
      assert.truthy(q:cancel(item))
      assert.equal("ELEASE", select(3, q:complete(item, "w", "r")))
      assert.equal(2, assert(q:stats()).cancelled)
      d:close()
    end)

    it("a waiting claimer is woken by an enqueue from another connection", function()
      local d, q, url = open()
      local other = assert(db.open(url))
      local q2 = queue.new(other)
      local got
      local f = fiber.spawn(function()
        local items = assert(q:claim("w", { wait = 10 }))
        got = time.monotonic()
        return items
      end)
      fiber.sleep(0.5)
      local sent = time.monotonic()
      local id = assert(q2:enqueue("wake"))
      local ok, items = fiber.join(f, 5)
      assert.truthy(ok, items)
      assert.same({ id }, ids(items))
      -- SQLite sees another connection's enqueue on its poll; PostgreSQL is told.
      assert.less(backend == "postgres" and 0.1 or 0.3, got - sent, "enqueue to claim")
      q:close()
      q2:close()
      other:close()
      d:close()
    end)

    if backend == "postgres" then
      it("enqueues NOTIFY only while a claimer is idle, once per batch", function()
        local d, q, url = open()
        local watcher = assert(db.open(url))
        local l = assert(watcher:listen("factory_queue"))
        assert(q:enqueue("nobody waits"))
        assert(q:enqueue_many({ { payload = 1 }, { payload = 2 } }))
        assert.equal("ETIMEDOUT", select(3, l:wait(0.2)))
        assert.equal(3, #assert(q:claim("w", { batch = 5 })))
        local f = fiber.spawn(function() return q:claim("w", { wait = 10 }) end)
        fiber.sleep(0.3)
        local q2 = queue.new(watcher)
        assert(q2:enqueue_many({ { payload = 3 }, { payload = 4 } }))
        assert.truthy(l:wait(2))
        assert.equal("ETIMEDOUT", select(3, l:wait(0.2)), "one NOTIFY for the batch")
        assert.truthy(fiber.join(f, 5))
        l:close()
        q:close()
        watcher:close()
        d:close()
      end)
    end

    it("crash test: 50 SIGKILLs lose and repeat nothing, re-claim expired leases, keep the audit chain", function()
      local url = fresh()
      local d = assert(db.open(url))
      assert(d:migrate())
      d:close()
      local res = crash.run(url, { rounds = 50 })
      assert.truthy(res.lost_leases > 0, "no kill left a lease behind")
    end, { timeout = 120 })

    if backend == "postgres" then
      it("4 processes drain one queue of 5,000 items into disjoint sets covering all", function()
        local d, q, url = open()
        assert(d:script(crash.LOG_TABLE))
        local list = {}
        for i = 1, 5000 do list[i] = { payload = i } end
        local all = assert(q:enqueue_many(list))
        local ps = {}
        for i = 1, 4 do
          ps[i] = crash.spawn(url, "p" .. i, { "--mode", "drain", "--batch", 10, "--lease", 10, "--fibers", 2 })
        end
        local seen, total = {}, 0
        for i, p in ipairs(ps) do
          local res = p:wait(60)
          assert.equal(0, res.code, p:read("stderr"))
          local done = crash.done_lines(p)
          assert.truthy(#done > 0, "process " .. i .. " completed nothing")
          for _, id in ipairs(done) do
            assert.is_nil(seen[id], ("item %d completed by p%s and p%d"):format(id, tostring(seen[id]), i))
            seen[id] = i
            total = total + 1
          end
          p:close()
        end
        assert.equal(5000, total)
        for _, id in ipairs(all) do assert.truthy(seen[id], "item " .. id .. " was never completed") end
        assert.equal(5000, count(d, "SELECT COUNT(DISTINCT item_id) AS n FROM crash_log"))
        assert.equal(5000, count(d, "SELECT COUNT(*) AS n FROM crash_log"))
        q:close()
        d:close()
      end, { timeout = 120 })
    end
  end)
end
