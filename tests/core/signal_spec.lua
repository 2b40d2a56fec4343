-- factory.core.signal: a fiber waits for signals, delivered through libuv.
local signal = require "factory.core.signal"
local fiber = require "factory.fiber"
local proc = require "factory.proc"

local function send(name)
  assert(proc.run{ argv = { "kill", "-" .. name, tostring(proc.getpid()) } })
end

describe("signal", function()
  it("wakes the waiting fiber with the name of the signal that came", function()
    local waiter = fiber.spawn(signal.wait, "USR1", "USR2")
    fiber.sleep(0.01)
    send("USR2")
    local ok, res = fiber.all({ waiter }, 5)
    assert.truthy(ok)
    assert.equal("USR2", res[1][1])
  end)

  it("lets go of the signals when the wait is cancelled", function()
    local waiter = fiber.spawn(signal.wait, "USR1")
    fiber.sleep(0.01)
    waiter:cancel("no longer needed")
    fiber.sleep(0.01)
    -- A later wait gets its own signal; the cancelled one saw nothing.
    local again = fiber.spawn(signal.wait, "USR1")
    fiber.sleep(0.01)
    send("USR1")
    local ok, res = fiber.all({ again }, 5)
    assert.truthy(ok)
    assert.equal("USR1", res[1][1])
  end)

  it("rejects unknown names and a call without any", function()
    assert.error_matches(function() signal.wait("KILL") end, "expected \"INT\"")
    assert.error_matches(function() signal.wait() end, "one to five")
  end)
end)
