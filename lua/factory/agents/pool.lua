-- factory.agents.pool: how many coding agents one engine runs at once, how soon one
-- may start after another, and how many agent iterations a day may pay for (the
-- `agents { ... }` section of factory.lua). Pipeline build stages pass through it;
-- the orchestrator keeps its own pool and shares the daily count (pool.charge).
--
--   pool.new{ db =, max_concurrent = n (default 4), cooldown = SECONDS between two
--             starts (default 0), daily_iterations = n | nil (no daily cap) } -> pool
--   pool:enter() -> leave()      waits (in the calling fiber) for a free place and for
--                                the cooldown since the last start; leave() gives the
--                                place back (a second call does nothing)
--   pool:charge(run_id, data) -> true | nil, "EBUDGET: ...", "EBUDGET"
--                                counts one agent iteration: an "agent_iteration" event
--                                of the run with data
--   pool.charge(db, budget, run_id, data) -> the same, for a budget of budget (nil: no
--       cap) iterations per UTC day: every "agent_iteration" event since 00:00 UTC,
--       whichever engine or orchestrator recorded it, counts. The check and the record
--       are one transaction (on PostgreSQL under an advisory lock), so two engines
--       cannot both take the last iteration.
--   pool.check(agents) -> true | nil, "agents.FIELD: message"   (factory.lua's section)
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local records = require "factory.records"

local M = {}

local BUDGET_LOCK = 0x4f524348   -- advisory lock key (PostgreSQL) of the budget check
local DAY = 86400

M.DEFAULTS = { max_concurrent = 4, cooldown = 0 }

local FIELDS = { max_concurrent = "a whole number of at least 1", cooldown = "a number of seconds, 0 or more",
                 daily_iterations = "a whole number, 0 or more" }

function M.check(agents)
  for k, v in pairs(agents) do
    if not FIELDS[k] then return nil, ("agents.%s: unknown setting (max_concurrent, cooldown, daily_iterations)"):format(k) end
    local whole = k ~= "cooldown"
    if type(v) ~= "number" or v ~= v or v < (k == "max_concurrent" and 1 or 0) or (whole and v % 1 ~= 0)
        or v == math.huge then
      return nil, ("agents.%s: expected %s, got %s"):format(k, FIELDS[k], tostring(v))
    end
  end
  return true
end

function M.charge(db, budget, run_id, data)
  local day = math.floor(time.now() / DAY) * DAY
  local res, err, code = db:tx(function(tx)
    if budget then
      if tx.backend == "postgres" then assert(tx:query("SELECT pg_advisory_xact_lock(?)", { BUDGET_LOCK })) end
      local used = assert(tx:query("SELECT COUNT(*) AS n FROM events WHERE kind = 'agent_iteration'"
        .. " AND created_at >= ?", { day }))[1].n
      if used >= budget then return { exhausted = used } end
    end
    records.event(tx, run_id, "agent_iteration", data)
    return { ok = true }
  end)
  if not res then return nil, err, code end
  if res.exhausted then
    return nil, ("EBUDGET: the daily budget of %d agent iterations is used up (%d today, UTC)"):format(budget,
      res.exhausted), "EBUDGET"
  end
  return true
end

local Pool = {}
Pool.__index = Pool

function M.new(o)
  assert(type(o) == "table" and o.db, "pool.new: expected { db = }")
  local ok, err = M.check{ max_concurrent = o.max_concurrent, cooldown = o.cooldown,
                           daily_iterations = o.daily_iterations }
  if not ok then error(err, 2) end
  return setmetatable({ db = o.db, max_concurrent = o.max_concurrent or M.DEFAULTS.max_concurrent,
                        cooldown = o.cooldown or M.DEFAULTS.cooldown, daily_iterations = o.daily_iterations,
                        running = 0, last_start = nil, changed = fiber.cond() }, Pool)
end

function Pool:enter()
  while true do
    if self.running < self.max_concurrent then
      local wait = self.last_start and (self.last_start + self.cooldown - time.monotonic()) or 0
      if wait <= 0 then break end
      fiber.sleep(wait)
    else
      self.changed:wait()
    end
  end
  self.running = self.running + 1
  self.last_start = time.monotonic()
  local left = false
  return function()
    if left then return end
    left = true
    self.running = self.running - 1
    self.changed:broadcast()
  end
end

function Pool:charge(run_id, data)
  return M.charge(self.db, self.daily_iterations, run_id, data)
end

return M
