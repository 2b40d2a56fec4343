-- Specs for lua/factory/fiber.lua (and the scheduler under it, core/fiber.c).
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local function elapsed(since) return time.monotonic() - since end

describe("spawn and join", function()
  it("returns a fiber's results", function()
    local f = fiber.spawn(function(a, b) return a + b, "x" end, 2, 3)
    local ok, sum, x = fiber.join(f)
    assert.equal(true, ok)
    assert.equal(5, sum)
    assert.equal("x", x)
  end)

  it("returns false, err and a traceback for a failed fiber", function()
    local f = fiber.spawn(function() error("broken here") end)
    local ok, err, tb = fiber.join(f)
    assert.equal(false, ok)
    assert.matches("fiber_spec%.lua:%d+: broken here", err)
    assert.contains("stack traceback", tb)
    assert.equal("failed", f:status())
  end)

  it("keeps table errors as values, and writes their traceback as code: message (or the code)", function()
    local f = fiber.spawn(function() error({ code = "EBAD", message = "nope" }) end)
    local ok, err, tb = fiber.join(f)
    assert.equal(false, ok)
    assert.equal("EBAD", err.code)
    assert.matches("^EBAD: nope\n", tb)
    ok, err, tb = fiber.join(fiber.spawn(function() error({ code = "EBUDGET" }) end))
    assert.equal("EBUDGET", err.code)
    assert.matches("^EBUDGET\n", tb)
    ok, err, tb = fiber.join(fiber.spawn(function() error({ 1, 2 }) end))
    assert.matches("^%(error object is a table value%)\n", tb)
  end)

  it("times out a join and leaves the fiber running", function()
    local f = fiber.spawn(function() fiber.sleep(0.2) return "late" end)
    local ok, err, code = fiber.join(f, 0.02)
    assert.is_nil(ok)
    assert.equal("ETIMEDOUT", code)
    assert.matches("^ETIMEDOUT", err)
    assert.equal("waiting", f:status())
    assert.same({ true, "late" }, { fiber.join(f) })
  end)

  it("lets many fibers join one", function()
    local target = fiber.spawn(function() fiber.sleep(0.01) return 7 end)
    local joiners = {}
    for i = 1, 20 do
      joiners[i] = fiber.spawn(function() return select(2, fiber.join(target)) end)
    end
    local ok, outcomes = fiber.all(joiners)
    assert.truthy(ok)
    for i = 1, 20 do assert.equal(7, outcomes[i][1]) end
  end)
end)

describe("all and any", function()
  it("waits for all and reports each outcome", function()
    local fs = {
      fiber.spawn(function() fiber.sleep(0.01) return 1 end),
      fiber.spawn(function() error("two failed") end),
      fiber.spawn(function() return 3 end),
    }
    local ok, outcomes = fiber.all(fs)
    assert.equal(false, ok)
    assert.equal(true, outcomes[1].ok)
    assert.equal(1, outcomes[1][1])
    assert.equal(false, outcomes[2].ok)
    assert.matches("two failed", outcomes[2][1])
    assert.equal(3, outcomes[3][1])
  end)

  it("all times out", function()
    local slow = fiber.spawn(function() fiber.sleep(1) end)
    local ok, err = fiber.all({ slow }, 0.02)
    assert.is_nil(ok)
    assert.matches("ETIMEDOUT", err)
    slow:cancel()
  end)

  it("any returns the first to finish", function()
    local fs = {
      fiber.spawn(function() fiber.sleep(0.2) return "slow" end),
      fiber.spawn(function() fiber.sleep(0.01) return "fast" end),
    }
    local i, ok, v = fiber.any(fs)
    assert.equal(2, i)
    assert.equal(true, ok)
    assert.equal("fast", v)
    fs[1]:cancel()
  end)

  it("any times out", function()
    local f = fiber.spawn(function() fiber.sleep(1) end)
    local i, err = fiber.any({ f }, 0.02)
    assert.is_nil(i)
    assert.matches("ETIMEDOUT", err)
    f:cancel()
  end)
end)

describe("cancellation", function()
  it("cancels a sleeping fiber with a reason", function()
    local f = fiber.spawn(function() fiber.sleep(10) end)
    fiber.sleep(0.001)
    assert.equal(true, f:cancel("operator said stop"))
    local ok, err = fiber.join(f)
    assert.equal(false, ok)
    assert.equal("ECANCELED", err.code)
    assert.equal("operator said stop", err.message)
    assert.equal("cancelled", f:status())
  end)

  it("cancels a fiber that has not started yet", function()
    local ran = false
    local f = fiber.spawn(function() ran = true end)
    assert.equal(true, f:cancel())
    fiber.sleep(0.005)
    assert.equal(false, ran)
  end)

  it("cancelling a finished fiber is a no-op", function()
    local f = fiber.spawn(function() return 1 end)
    fiber.join(f)
    assert.equal(false, f:cancel())
    assert.equal("done", f:status())
  end)

  it("a fiber can cancel itself", function()
    local f
    f = fiber.spawn(function()
      fiber.sleep(0.001)
      f:cancel("giving up")
      error("not reached")
    end)
    local ok, err = fiber.join(f)
    assert.equal(false, ok)
    assert.equal("giving up", err.message)
    assert.equal("cancelled", f:status())
  end)

  it("wakes the joiners of a cancelled fiber", function()
    local f = fiber.spawn(function() fiber.sleep(10) end)
    local joiner = fiber.spawn(function() return fiber.join(f) end)
    fiber.sleep(0.001)
    f:cancel("bye")
    local ok, inner_ok = fiber.join(joiner)
    assert.equal(true, ok)
    assert.equal(false, inner_ok)
  end)
end)

describe("timeouts", function()
  it("with_timeout returns the results in time", function()
    assert.same({ true, 42 }, { fiber.with_timeout(1, function() fiber.sleep(0.01) return 42 end) })
  end)

  it("with_timeout cancels a slow function", function()
    local started = time.monotonic()
    local ok, err, code = fiber.with_timeout(0.05, function() fiber.sleep(5) end)
    assert.is_nil(ok)
    assert.equal("ETIMEDOUT", code)
    assert.matches("ETIMEDOUT", err)
    assert.less(0.5, elapsed(started))
  end)
end)

describe("conditions", function()
  it("signal wakes one waiter with a value", function()
    local c = fiber.cond()
    local got = {}
    local function waiter()
      local v = c:wait()
      got[#got + 1] = v
    end
    local a, b = fiber.spawn(waiter), fiber.spawn(waiter)
    fiber.sleep(0.001)
    assert.equal(true, c:signal("first"))
    fiber.sleep(0.001)
    assert.same({ "first" }, got)
    assert.equal(1, c:broadcast("rest"))
    fiber.all({ a, b })
    assert.same({ "first", "rest" }, got)
  end)

  it("a wait times out", function()
    local v, err = fiber.cond():wait(0.01)
    assert.is_nil(v)
    assert.matches("ETIMEDOUT", err)
  end)
end)

describe("the scheduler", function()
  it("runs 10,000 fibers sleeping 10 ms in under 1 s", function()
    local started = time.monotonic()
    local fs = {}
    for i = 1, 10000 do fs[i] = fiber.spawn(function() fiber.sleep(0.01) return i end) end
    local ok, outcomes = fiber.all(fs)
    assert.truthy(ok)
    assert.equal(10000, outcomes[10000][1])
    assert.less(1.0, elapsed(started))
  end)

  it("yield lets other fibers run", function()
    local order = {}
    local a = fiber.spawn(function() for i = 1, 3 do order[#order + 1] = "a" .. i; fiber.yield() end end)
    local b = fiber.spawn(function() for i = 1, 3 do order[#order + 1] = "b" .. i; fiber.yield() end end)
    fiber.all({ a, b })
    assert.same({ "a1", "b1", "a2", "b2", "a3", "b3" }, order)
  end)

  it("a busy yielding fiber does not starve timers", function()
    local stop = false
    local spinner = fiber.spawn(function() while not stop do fiber.yield() end end)
    local started = time.monotonic()
    fiber.sleep(0.02)
    stop = true
    fiber.join(spinner)
    assert.less(0.5, elapsed(started))
  end)

  it("async calls outside a fiber are refused clearly", function()
    local co = coroutine.wrap(function() return pcall(fiber.sleep, 0.01) end)
    local ok, err = co()
    assert.equal(false, ok)
    assert.matches("must be called from a fiber", err)
  end)

  it("inside a C call that runs Lua (dofile, table.sort, gsub), I/O runs inline and a wait is refused clearly", function()
    local fs = require "factory.core.fs"
    local chunk, text = os.tmpname(), os.tmpname()
    assert(fs.write(text, "hello"))
    -- Reading a file in a chunk run by dofile (as a config file may): this crashed
    -- the process (the read was queued, then the yield failed); now it reads inline.
    assert(fs.write(chunk, ("return require('factory.core.fs').read(%q)"):format(text)))
    assert.equal("hello", dofile(chunk))
    local list = { chunk, text }
    table.sort(list, function(a, b) return #assert(fs.read(a)) < #assert(fs.read(b)) end)
    assert.same({ text, chunk }, list)
    assert.equal("HELLO", (("hello"):gsub("hello", function() return assert(fs.read(text)):upper() end)))
    -- A wait there fails with an error that says why, and the fiber goes on.
    assert(fs.write(chunk, "require('factory.fiber').sleep(0.01)"))
    local ok, err = pcall(dofile, chunk)
    assert.equal(false, ok)
    assert.contains("fiber.sleep: cannot wait inside a C call that runs Lua code", err)
    fiber.sleep(0.01)
    assert.equal("hello", fs.read(text))
    os.remove(chunk)
    os.remove(text)
  end)

  it("counts live fibers", function()
    local before = fiber.stats().live
    local f = fiber.spawn(function() fiber.sleep(0.01) end)
    assert.equal(before + 1, fiber.stats().live)
    fiber.join(f)
    assert.equal(before, fiber.stats().live)
  end)
end)
