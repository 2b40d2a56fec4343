-- factory.fiber: fibers for Lua code.
--
-- spawn, sleep, yield, current, run and stats come from the C scheduler
-- (factory.core.fiber); this module adds the ways to wait for fibers:
--   join(f [, timeout])            -> true, results... | false, err [, traceback]
--   all(fibers [, timeout])        -> ok, outcomes      | nil, "ETIMEDOUT: ...", "ETIMEDOUT"
--   any(fibers [, timeout])        -> index, true, results... | index, false, err
--                                     | nil, "ETIMEDOUT: ...", "ETIMEDOUT"
--   with_timeout(secs, fn, ...)    -> like join, and fn's fiber is cancelled on timeout
--   cond()                         -> c:wait([timeout]), c:signal(v), c:broadcast(v)
-- current() is the running fiber, also inside a C call that runs Lua (dofile,
-- require, a table.sort comparator), where it cannot yield: waiting there raises.
-- Failures are values, like pcall: err is what the fiber raised, or for a cancelled
-- fiber { code = "ECANCELED", message = reason }. A timed-out wait leaves the fibers
-- waited on running (except with_timeout, which cancels its own).
local core = require "factory.core.fiber"
local time = require "factory.core.time"

local M = {
  spawn = core.spawn,
  sleep = core.sleep,
  yield = core.yield,
  current = core.current,
  run = core.run,
  stats = core.stats,
}

local function outcome(status, ...)
  if status == "done" then return true, ... end
  return false, ...
end

local function finished(f)
  local st = f:status()
  return st == "done" or st == "failed" or st == "cancelled"
end

local function me(what)
  local f = core.current()
  if not f then error(what .. ": must be called from a fiber", 3) end
  return f
end

local function timeout_error(timeout)
  return nil, ("ETIMEDOUT: timed out after %g s"):format(timeout), "ETIMEDOUT"
end

-- Parks the current fiber until one of `fibers` finishes, the deadline passes
-- (returns false) or it is woken for another reason (returns true to re-check).
local function park_on(self, fibers, deadline)
  local remaining
  if deadline then
    remaining = deadline - time.monotonic()
    if remaining <= 0 then return false end
  end
  for i = 1, #fibers do fibers[i]:subscribe(self) end
  local woke = core.park(remaining)
  for i = 1, #fibers do fibers[i]:unsubscribe(self) end
  return woke ~= nil
end

function M.join(f, timeout)
  if finished(f) then return outcome(f:result()) end
  local self = me("fiber.join")
  local deadline = timeout and time.monotonic() + timeout
  local targets = { f }
  while not finished(f) do
    if not park_on(self, targets, deadline) and not finished(f) then return timeout_error(timeout) end
  end
  return outcome(f:result())
end

-- Waits for every fiber. outcomes[i] = { ok = bool, n = count, ... } with the
-- fiber's results (or its error and traceback); ok is true when all succeeded.
function M.all(fibers, timeout)
  local self = me("fiber.all")
  local deadline = timeout and time.monotonic() + timeout
  -- Subscribed to all at once, so a failure is seen as observed (not reported as
  -- unhandled) even while an earlier fiber is still being waited for.
  for i = 1, #fibers do fibers[i]:subscribe(self) end
  local timed_out = false
  local i = 1
  while i <= #fibers and not timed_out do
    if finished(fibers[i]) then
      i = i + 1
    else
      local remaining = deadline and deadline - time.monotonic()
      if remaining and remaining <= 0 then
        timed_out = true
      else
        core.park(remaining)
      end
    end
  end
  for k = 1, #fibers do fibers[k]:unsubscribe(self) end
  if timed_out then return timeout_error(timeout) end
  local outcomes, all_ok = {}, true
  for i = 1, #fibers do
    local r = { n = 0 }
    local function pack(ok, ...)
      r.ok = ok
      r.n = select("#", ...)
      for k = 1, r.n do r[k] = select(k, ...) end
    end
    pack(outcome(fibers[i]:result()))
    all_ok = all_ok and r.ok
    outcomes[i] = r
  end
  return all_ok, outcomes
end

-- Waits for the first fiber to finish and returns its index and outcome.
function M.any(fibers, timeout)
  local self = me("fiber.any")
  local deadline = timeout and time.monotonic() + timeout
  while true do
    for i = 1, #fibers do
      if finished(fibers[i]) then return i, outcome(fibers[i]:result()) end
    end
    if not park_on(self, fibers, deadline) then
      local first
      for i = 1, #fibers do first = first or (finished(fibers[i]) and i) end
      if not first then return timeout_error(timeout) end
    end
  end
end

function M.with_timeout(secs, fn, ...)
  local f = core.spawn(fn, ...)
  local function settle(ok, ...)
    if ok == nil then f:cancel("timed out") end
    return ok, ...
  end
  return settle(M.join(f, secs))
end

local Cond = {}
Cond.__index = Cond

-- A condition: fibers wait on it until another signals. Not a queue of values:
-- a signal with nobody waiting is lost.
function M.cond()
  return setmetatable({ waiters = {} }, Cond)
end

local function remove(list, x)
  for i = 1, #list do
    if list[i] == x then return table.remove(list, i) end
  end
end

-- Returns the signalled value (true by default), or nil, "ETIMEDOUT: ...".
function Cond:wait(timeout)
  local self_fiber = me("cond:wait")
  self.waiters[#self.waiters + 1] = self_fiber
  local v, err, code = core.park(timeout)
  if v == nil then
    remove(self.waiters, self_fiber)
    return nil, err, code
  end
  return v
end

function Cond:signal(v)
  while #self.waiters > 0 do
    local f = table.remove(self.waiters, 1)
    if f:wake(v == nil and true or v) then return true end
  end
  return false
end

function Cond:broadcast(v)
  local waiters = self.waiters
  self.waiters = {}
  local n = 0
  for i = 1, #waiters do
    if waiters[i]:wake(v == nil and true or v) then n = n + 1 end
  end
  return n
end

return M
