-- factory.budgets: teams' daily budgets kept across processes, through the store.
--
-- The router reserves each call's estimate in its own process, which is exact among
-- that process's calls. Processes sharing a store also share each team's day: a
-- `factory serve` proxying external agents and `factory run`s, or several runs side
-- by side. With a ledger attached, a call whose team has a budget is held in the
-- store before it is sent: in one transaction, what the team's recorded calls cost
-- today, plus what every process holds for its calls in flight, plus this call's
-- estimate must fit the limit, or the call is refused (EBUDGET). The hold goes in the
-- transaction that writes the call's record (records.model_call), so between them
-- the call is always counted, and together the processes can never overspend.
-- A hold lasts HOLD_TTL seconds; its process renews the holds of its calls in flight
-- every RENEW_S seconds. So a hold whose call ended without a record, or whose caller
-- went away while the hold was being taken, or whose process died (on any host), stops
-- counting within HOLD_TTL; one of a process that died on this host goes at the next
-- reservation for its team.
--
--   budgets.attach(db, process) -> detach()
--       process: the "host:pid:n" id the holds are taken under (factory.engine_id).
--       The router asks this ledger until detach(); the last attached is asked. In a
--       fiber, a fiber of its own renews the holds until detach().
--   budgets.reserve(db, { team =, usd =, tokens =, limit_usd =, limit_tokens =,
--                         since =, process = })
--       -> hold id | nil, "EBUDGET: budget exhausted: ...", "EBUDGET" | nil, err, code
--       since: when the team's budget day began (router.day_start()).
--   budgets.holds(db [, team]) -> { { id, team, process, usd, tokens, expires_at }, ... }
--   budgets.renew(db, process)   what the keeper fiber does every RENEW_S seconds
--
-- Failures are values, as the store gives them; misuse raises.
local router = require "factory.router"
local records = require "factory.records"
local engine_id = require "factory.engine_id"
local time = require "factory.core.time"
local fiber = require "factory.fiber"
local log = require "factory.log"

local M = {}

-- A live call's hold is renewed well before it expires; a dead one's lingers at most this.
M.HOLD_TTL = 120
M.RENEW_S = 40
-- Holds renewed by one statement, at most.
local RENEW_BATCH = 500

-- The team's row that PostgreSQL transactions lock to take turns (SQLite's BEGIN
-- IMMEDIATE already lets one writer in at a time).
local function take_turn(tx, team)
  if tx.backend ~= "postgres" then return end
  assert(tx:exec("INSERT INTO budget_teams (team) VALUES (?) ON CONFLICT (team) DO NOTHING", { team }))
  assert(tx:query("SELECT team FROM budget_teams WHERE team = ? FOR UPDATE", { team }))
end

-- What the team's live holds add up to; the holds of dead processes, and expired
-- ones, are dropped.
local function held(tx, team, now)
  local usd, tokens = 0, 0
  for _, h in ipairs(assert(tx:query("SELECT id, process, usd, tokens, expires_at FROM budget_holds WHERE team = ?",
                                     { team }))) do
    if h.expires_at <= now or engine_id.alive_here(h.process) == false then
      assert(tx:exec("DELETE FROM budget_holds WHERE id = ?", { h.id }))
    else
      usd, tokens = usd + h.usd, tokens + h.tokens
    end
  end
  return usd, tokens
end

local function refusal(o, spent, usd, tokens)
  if o.limit_usd and spent.usd + usd + o.usd > o.limit_usd + 1e-12 then
    return ("budget exhausted: team %s has %.4f of %.4f USD left today (%.4f spent, %.4f held by calls in flight"
      .. " in any process), this call may cost %.4f"):format(o.team, math.max(0, o.limit_usd - spent.usd - usd),
      o.limit_usd, spent.usd, usd, o.usd)
  end
  if o.limit_tokens and spent.tokens + tokens + o.tokens > o.limit_tokens then
    return ("budget exhausted: team %s has %.0f of %.0f tokens left today (%.0f used, %.0f held by calls in flight"
      .. " in any process), this call may use %.0f"):format(o.team, math.max(0, o.limit_tokens - spent.tokens - tokens),
      o.limit_tokens, spent.tokens, tokens, o.tokens)
  end
end

function M.reserve(db, o)
  if type(o) ~= "table" or type(o.team) ~= "string" or type(o.process) ~= "string" or type(o.since) ~= "number"
      or type(o.usd) ~= "number" or type(o.tokens) ~= "number" then
    error("budgets.reserve: expected { team =, process =, since =, usd =, tokens = }", 2)
  end
  -- Aside: a record the caller's fiber posted and lost is for its own next
  -- transaction to report (a run stops on it), not for this one to swallow.
  local res, err, code = db:tx_aside(function(tx)
    local now = time.now()
    take_turn(tx, o.team)
    -- Holds before spending: on PostgreSQL a call's record (which deletes its hold)
    -- may commit between the two reads, and read in this order the call is then
    -- counted twice, never not at all.
    local usd, tokens = held(tx, o.team, now)
    local spent = records.team_spending(tx, o.since, o.team)[1] or { usd = 0, tokens = 0 }
    local refused = refusal(o, spent, usd, tokens)
    if refused then return { refused = refused } end
    return { id = assert(tx:exec("INSERT INTO budget_holds (team, process, usd, tokens, expires_at, created_at)"
      .. " VALUES (?, ?, ?, ?, ?, ?) RETURNING id", { o.team, o.process, o.usd, o.tokens, now + M.HOLD_TTL, now })).last_id }
  end)
  if not res then return nil, err, code end
  if res.refused then return nil, "EBUDGET: " .. res.refused, "EBUDGET" end
  return res.id
end

function M.holds(db, team)
  return assert(db:query("SELECT id, team, process, usd, tokens, expires_at FROM budget_holds"
    .. (team and " WHERE team = ?" or "") .. " ORDER BY id", { team, n = team and 1 or 0 }))
end

-- The holds of this process's calls in flight get another HOLD_TTL.
function M.renew(db, process)
  local ids = router.live_holds()
  for first = 1, #ids, RENEW_BATCH do
    local params, marks = { time.now() + M.HOLD_TTL, process }, {}
    for i = first, math.min(#ids, first + RENEW_BATCH - 1) do
      params[#params + 1] = ids[i]
      marks[#marks + 1] = "?"
    end
    local ok, err = db:exec("UPDATE budget_holds SET expires_at = ? WHERE process = ? AND id IN ("
      .. table.concat(marks, ", ") .. ")", params)
    if not ok then log.warn("budgets: the holds of the calls in flight could not be renewed", { error = tostring(err) }) end
  end
end

function M.attach(db, process)
  if type(process) ~= "string" then error("budgets.attach: expected a process id", 2) end
  local detach = router.use_ledger(function(ask)
    ask.process, ask.since = process, router.day_start()
    return M.reserve(db, ask)
  end)
  local keeper = fiber.current() and fiber.spawn(function()
    while true do
      fiber.sleep(M.RENEW_S)
      M.renew(db, process)
    end
  end)
  return function()
    if keeper then keeper:cancel("detached") end
    detach()
  end
end

return M
