-- factory.queue: the durable work queue over factory.db (the `queue` table).
--
--   queue.new(db) -> q
--   q:enqueue(payload, opts)   -> id, new | nil, err, code
--       opts: kind (default "job"), priority = "critical"|"high"|"medium"|"low"
--       (default medium), delay = s, max_attempts = n (default 5), dedupe_key = s
--       (an item with that key already there: its id, new = false), run_id.
--   q:enqueue_many(list)       -> { id, ... } | nil, err, code
--       list: { { payload =, kind =, priority =, ... }, ... }, all in one transaction.
--   q:claim(owner, opts)       -> { item, ... } (maybe empty) | nil, err, code
--       opts: lease = s (default 30), batch = n (default 1), wait = s (block up to
--       that long for work; default 0). Takes the best ready items: priority
--       critical > high > medium > low, then age; an item whose lease expired is
--       ready again (and dead-lettered instead if it has used up max_attempts).
--       item: { id, kind, payload, priority (name), attempts, max_attempts,
--       lease_owner, lease_expires_at, created_at, run_id }; item.attempts is the
--       lease's fencing token: a later claim of the same item changes it.
--   q:heartbeat(item, owner, lease) -> expires_at | nil, "ELEASE: ...", "ELEASE"
--   q:complete(item, owner, result [, fn]) -> true, fn's results... | nil, err, code
--       Marks the item done with result (JSON) in one transaction; fn(tx, item), if
--       given, runs in that same transaction to write the caller's own rows: fn
--       raising or returning nil, err rolls back both. Refused (ELEASE) when owner no
--       longer holds this lease, so an item is never completed twice.
--   q:fail(item, owner, err)   -> "retry", run_after | "dead" | nil, err, code
--       Ready again after an exponential backoff (1 s, 2 s, 4 s ... capped at 1 h;
--       q.backoff = base seconds) until max_attempts, then dead (the dead letter),
--       keeping err as last_error.
--   q:cancel(id)               -> true | nil, "ESTATE: ...", code   (ready or leased items)
--   q:get(id)                  -> row | nil
--   q:stats()                  -> { ready, delayed, leased, expired, done, dead, cancelled }
--   q:close()                  ends this object's listener
--
-- Transactions. A claim is one statement: on PostgreSQL the candidates are taken
-- with FOR UPDATE SKIP LOCKED, so concurrent claimers never wait on each other's
-- rows; on SQLite it runs inside BEGIN IMMEDIATE (one writer at a time, across
-- processes too). complete/fail/heartbeat check owner AND attempts in their UPDATE's
-- WHERE, so a worker whose lease expired and was re-claimed changes nothing.
--
-- Waking claimers. PostgreSQL: a claimer with nothing to do records itself as a
-- `workers` row in state "claim-wait" and LISTENs; an enqueue NOTIFYs only when such a row exists (one
-- NOTIFY per enqueue_many), because a NOTIFY in every write transaction serializes
-- commits on a global lock. One narrow race remains (an enqueue whose statement
-- began before the claimer registered and committed after its re-check), so an idle
-- PostgreSQL claimer also re-checks every MAX_IDLE seconds. SQLite: enqueues wake
-- claimers in the same process; other processes are seen by re-checking every
-- SQLITE_POLL seconds.
--
-- Durability on SQLite: factory.db returns from a commit only once the WAL holding
-- it is fsynced (core/db_sqlite.c, conn:sync), so a committed completion survives a
-- crash of the process (SIGKILL) and a power loss or OS crash.
local time = require "factory.core.time"
local fiber = require "factory.fiber"
local proc = require "factory.core.proc"
local json = require "factory.json"

local M = {}

local Q = {}
Q.__index = Q

local PRIORITY = { critical = 0, high = 1, medium = 2, low = 3 }
local PRIORITY_NAME = { [0] = "critical", "high", "medium", "low" }
local CHANNEL = "factory_queue"
local MAX_IDLE = 2
local IDLE_TTL = MAX_IDLE + 5
local SQLITE_POLL = 0.25
local MAX_BACKOFF = 3600

local COLUMNS = "id, kind, payload, priority, state, attempts, max_attempts, lease_owner,"
  .. " lease_expires_at, created_at, run_id, last_error"

local INSERT = "INSERT INTO queue (kind, payload, priority, run_after, max_attempts, dedupe_key, run_id,"
  .. " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING"

-- PostgreSQL: one statement that inserts and, only if a claimer is idle, notifies.
-- Idle claimers are rows of `workers` in state WAITING, live while heartbeat_at is
-- newer than the ? bound to it (now - IDLE_TTL).
local WAITING = "claim-wait"
local IDLE_ROW = "FROM workers WHERE state = '" .. WAITING .. "' AND heartbeat_at > ? LIMIT 1"
local PG_ENQUEUE = "WITH ins AS (" .. INSERT .. " RETURNING id) SELECT id, (SELECT COUNT(*) FROM"
  .. " (SELECT pg_notify('" .. CHANNEL .. "', '') " .. IDLE_ROW .. ") w) AS woke FROM ins"
local PG_WAKE = "SELECT COUNT(*) AS n FROM (SELECT pg_notify('" .. CHANNEL .. "', '') " .. IDLE_ROW .. ") w"

-- Candidates: ready items whose time has come, and leased items whose lease
-- expired. Two separate scans, each on its partial index, so neither sorts the queue.
local CLAIM = {
  sqlite = [[
WITH c AS (
  SELECT id, priority FROM (SELECT id, priority FROM queue WHERE state = 'ready' AND run_after <= ?
                            ORDER BY priority, id LIMIT ?)
  UNION ALL
  SELECT id, priority FROM (SELECT id, priority FROM queue WHERE state = 'leased' AND lease_expires_at <= ?
                            ORDER BY lease_expires_at LIMIT ?))
UPDATE queue SET
  state = CASE WHEN state = 'leased' AND attempts >= max_attempts THEN 'dead' ELSE 'leased' END,
  last_error = CASE WHEN state = 'leased' THEN 'lease of ' || lease_owner || ' expired' ELSE last_error END,
  finished_at = CASE WHEN state = 'leased' AND attempts >= max_attempts THEN ? ELSE NULL END,
  attempts = CASE WHEN state = 'leased' AND attempts >= max_attempts THEN attempts ELSE attempts + 1 END,
  lease_owner = ?, lease_expires_at = ?, updated_at = ?
WHERE id IN (SELECT id FROM c ORDER BY priority, id LIMIT ?)
RETURNING ]] .. COLUMNS,
  postgres = [[
WITH r AS (SELECT id, priority FROM queue WHERE state = 'ready' AND run_after <= ?
           ORDER BY priority, id LIMIT ? FOR UPDATE SKIP LOCKED),
     x AS (SELECT id, priority FROM queue WHERE state = 'leased' AND lease_expires_at <= ?
           ORDER BY lease_expires_at LIMIT ? FOR UPDATE SKIP LOCKED)
UPDATE queue SET
  state = CASE WHEN state = 'leased' AND attempts >= max_attempts THEN 'dead' ELSE 'leased' END,
  last_error = CASE WHEN state = 'leased' THEN 'lease of ' || lease_owner || ' expired' ELSE last_error END,
  finished_at = CASE WHEN state = 'leased' AND attempts >= max_attempts THEN ?::double precision ELSE NULL END,
  attempts = CASE WHEN state = 'leased' AND attempts >= max_attempts THEN attempts ELSE attempts + 1 END,
  lease_owner = ?, lease_expires_at = ?, updated_at = ?
WHERE id IN (SELECT id FROM (SELECT * FROM r UNION ALL SELECT * FROM x) c ORDER BY priority, id LIMIT ?)
RETURNING ]] .. COLUMNS,
}

local FENCE = " WHERE id = ? AND state = 'leased' AND lease_owner = ? AND attempts = ?"

local function lease_error(item, owner)
  return nil, ("ELEASE: item %s is no longer leased by %s (attempt %s)"):format(
    tostring(item.id), tostring(owner), tostring(item.attempts)), "ELEASE"
end

local function check_item(item, owner, what)
  if type(item) ~= "table" or type(item.id) ~= "number" or type(item.attempts) ~= "number" then
    error(what .. ": expected an item returned by claim", 3)
  end
  if type(owner) ~= "string" or owner == "" then error(what .. ": expected an owner name", 3) end
end

-- JSON text, so scalars are stored as JSON too (a bare number would bind as an
-- integer, which a JSONB column refuses).
local function to_json(v, what)
  if v == nil then return nil end
  local s, err = json.encode(v)
  if not s then error(("queue: %s: %s"):format(what, err), 4) end
  return s
end

local function insert_params(payload, opts, now)
  opts = opts or {}
  payload = to_json(payload, "payload")
  local prio = PRIORITY[opts.priority or "medium"]
  if not prio then error("queue: unknown priority " .. tostring(opts.priority), 4) end
  local delay = opts.delay or 0
  return { opts.kind or "job", payload, prio, now + delay, opts.max_attempts or 5, opts.dedupe_key,
    opts.run_id, now, now, n = 9 }
end

local function existing_id(q, key)
  local rows, err, code = q:query("SELECT id FROM queue WHERE dedupe_key = ?", { key })
  if not rows then return nil, err, code end
  return rows[1] and rows[1].id, false
end

-- Inserts one item through q (a db or a tx); no wake-up.
local function insert(q, payload, opts, now)
  local params = insert_params(payload, opts, now)
  local rows, err, code = q:query(INSERT .. " RETURNING id", params)
  if not rows then return nil, err, code end
  if rows[1] then return rows[1].id, true end
  return existing_id(q, params[6])
end

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local name = f and f:read("*l")
  if f then f:close() end
  return name or "?"
end

function M.new(db)
  if type(db) ~= "table" or not db.tx then error("queue.new: expected a factory.db database", 2) end
  return setmetatable({
    db = db, pg = db.backend == "postgres", backoff = 1, cond = fiber.cond(), idle = 0,
    waiter_id = ("queue-claimer:%s:%d:%08x"):format(hostname(), proc.getpid(), math.random(0, 0x7fffffff)),
  }, Q)
end

function Q:enqueue(payload, opts)
  local now = time.now()
  if not self.pg then
    local id, new, code = insert(self.db, payload, opts, now)
    if not id then return nil, new, code end
    if new then self.db:notify(CHANNEL, "") end
    return id, new
  end
  local params = insert_params(payload, opts, now)
  params[10], params.n = now - IDLE_TTL, 10
  local rows, err, code = self.db:query(PG_ENQUEUE, params)
  if not rows then return nil, err, code end
  if rows[1] then return rows[1].id, true end
  return existing_id(self.db, params[6])
end

function Q:enqueue_many(list)
  if type(list) ~= "table" then error("queue:enqueue_many: expected a list of items", 2) end
  local pg = self.pg
  local ids, err, code = self.db:tx(function(tx)
    local now = time.now()
    local out = {}
    for i, it in ipairs(list) do
      local id, e, c = insert(tx, it.payload, it, now)
      if not id then return nil, e, c end
      out[i] = id
    end
    if pg then
      local ok, e, c = tx:query(PG_WAKE, { now - IDLE_TTL })
      if not ok then return nil, e, c end
    else
      tx:notify(CHANNEL, "")
    end
    return out
  end)
  return ids, err, code
end

local function to_items(rows)
  local items = {}
  for _, r in ipairs(rows) do
    if r.state == "leased" then
      r.state = nil
      r.priority = PRIORITY_NAME[r.priority]
      items[#items + 1] = r
    end
  end
  table.sort(items, function(a, b)
    if a.priority ~= b.priority then return PRIORITY[a.priority] < PRIORITY[b.priority] end
    return a.id < b.id
  end)
  return items
end

local function claim_once(self, owner, lease, batch)
  local now = time.now()
  local params = { now, batch, now, batch, now, owner, now + lease, now, batch }
  local rows, err, code
  if self.pg then
    rows, err, code = self.db:query(CLAIM.postgres, params)
  else
    rows, err, code = self.db:tx(function(tx) return tx:query(CLAIM.sqlite, params) end)
  end
  if not rows then return nil, err, code end
  return to_items(rows)
end

-- Records that this queue object has an idle claimer (PostgreSQL), as a `workers`
-- row. It goes stale after IDLE_TTL (renewed every MAX_IDLE while idle), so a
-- process that dies idle stops drawing NOTIFYs.
local function register(self)
  local now = time.now()
  local sql = "INSERT INTO workers (id, pid, state, heartbeat_at) VALUES (?, ?, ?, ?)"
    .. " ON CONFLICT (id) DO UPDATE SET state = excluded.state, heartbeat_at = excluded.heartbeat_at"
  local ok, err, code = self.db:exec(sql, { self.waiter_id, proc.getpid(), WAITING, now })
  if ok then self.registered_until = now + IDLE_TTL end
  return ok, err, code
end

local function unregister(self)
  self.registered_until = nil
  return self.db:exec("DELETE FROM workers WHERE state = ? AND (id = ? OR heartbeat_at < ?)",
    { WAITING, self.waiter_id, time.now() - IDLE_TTL })
end

-- Waits for a wake-up. One fiber per queue object listens; the others wait on its
-- condition and are released with it. A listener that was cancelled mid-wait
-- is replaced.
local function wait_wake(self, timeout)
  local st = self.leader and self.leader:status()
  if st == "running" or st == "ready" or st == "waiting" then
    self.cond:wait(timeout)
    return true
  end
  self.leader = fiber.current()
  -- A stale wake-up (sent before the last re-check) just costs another re-check.
  local ok, err, code = true, nil, nil
  local got, werr, wcode = self.listener:wait(timeout)
  if not got and wcode ~= "ETIMEDOUT" then ok, err, code = nil, werr, wcode end
  self.leader = nil
  self.cond:broadcast(true)
  return ok, err, code
end

function Q:claim(owner, opts)
  if type(owner) ~= "string" or owner == "" then error("queue:claim: expected an owner name", 2) end
  opts = opts or {}
  local lease, batch = opts.lease or 30, opts.batch or 1
  local deadline = time.monotonic() + (opts.wait or 0)
  local items, err, code = claim_once(self, owner, lease, batch)
  if not items or #items > 0 or not opts.wait or opts.wait <= 0 then return items, err, code end
  if not self.listener then
    -- LISTEN before re-checking, so nothing enqueued after the re-check is missed.
    local l
    l, err, code = self.db:listen(CHANNEL)
    if not l then return nil, err, code end
    self.listener = l
  end
  self.idle = self.idle + 1
  local ok
  while true do
    if self.pg and (self.registered_until or 0) < time.now() + 5 then
      ok, err, code = register(self)
      if not ok then break end
    end
    items, err, code = claim_once(self, owner, lease, batch)
    if not items or #items > 0 then break end
    local left = deadline - time.monotonic()
    if left <= 0 then break end
    ok, err, code = wait_wake(self, math.min(left, self.pg and MAX_IDLE or SQLITE_POLL))
    if not ok then break end
  end
  self.idle = self.idle - 1
  if self.idle == 0 and self.registered_until then unregister(self) end
  if items == nil and err == nil then items = {} end
  return items, err, code
end

function Q:heartbeat(item, owner, lease)
  check_item(item, owner, "queue:heartbeat")
  local expires = time.now() + (lease or 30)
  local r, err, code = self.db:exec("UPDATE queue SET lease_expires_at = ?, updated_at = ?" .. FENCE,
    { expires, time.now(), item.id, owner, item.attempts })
  if not r then return nil, err, code end
  if r.changes == 0 then return lease_error(item, owner) end
  item.lease_expires_at = expires
  return expires
end

-- fn's results after true; its nil, err rolls the transaction back.
local function finish(...)
  if select(1, ...) == nil and select(2, ...) ~= nil then return ... end
  return true, ...
end

local COMPLETE = "UPDATE queue SET state = 'done', result = ?, lease_owner = NULL, lease_expires_at = NULL,"
  .. " finished_at = ?, updated_at = ?" .. FENCE

function Q:complete(item, owner, result, fn)
  check_item(item, owner, "queue:complete")
  if fn ~= nil and type(fn) ~= "function" then error("queue:complete: fn must be a function", 2) end
  local now = time.now()
  local params = { to_json(result, "result"), now, now, item.id, owner, item.attempts, n = 6 }
  if not fn then
    local r, err, code = self.db:exec(COMPLETE, params)
    if not r then return nil, err, code end
    if r.changes == 0 then return lease_error(item, owner) end
    return true
  end
  return self.db:tx(function(tx)
    local r, err, code = tx:exec(COMPLETE, params)
    if not r then return nil, err, code end
    if r.changes == 0 then return lease_error(item, owner) end
    return finish(fn(tx, item))
  end)
end

function Q:fail(item, owner, reason)
  check_item(item, owner, "queue:fail")
  reason = tostring(reason)
  local now = time.now()
  local dead = item.attempts >= (item.max_attempts or math.huge)
  local r, err, code
  local run_after
  if dead then
    r, err, code = self.db:exec("UPDATE queue SET state = 'dead', last_error = ?, lease_owner = NULL,"
      .. " lease_expires_at = NULL, finished_at = ?, updated_at = ?" .. FENCE,
      { reason, now, now, item.id, owner, item.attempts })
  else
    run_after = now + math.min(self.backoff * 2 ^ (item.attempts - 1), MAX_BACKOFF)
    r, err, code = self.db:exec("UPDATE queue SET state = 'ready', last_error = ?, lease_owner = NULL,"
      .. " lease_expires_at = NULL, run_after = ?, updated_at = ?" .. FENCE,
      { reason, run_after, now, item.id, owner, item.attempts })
  end
  if not r then return nil, err, code end
  if r.changes == 0 then return lease_error(item, owner) end
  if dead then return "dead" end
  return "retry", run_after
end

function Q:cancel(id)
  if type(id) == "table" then id = id.id end
  if type(id) ~= "number" then error("queue:cancel: expected an item id", 2) end
  local now = time.now()
  local r, err, code = self.db:exec("UPDATE queue SET state = 'cancelled', lease_owner = NULL,"
    .. " lease_expires_at = NULL, finished_at = ?, updated_at = ? WHERE id = ? AND state IN ('ready', 'leased')",
    { now, now, id })
  if not r then return nil, err, code end
  if r.changes == 0 then
    local row = self:get(id)
    if not row then return nil, ("ENOTFOUND: no queue item %d"):format(id), "ENOTFOUND" end
    return nil, ("ESTATE: queue item %d is %s"):format(id, row.state), "ESTATE"
  end
  return true
end

function Q:get(id)
  local rows, err, code = self.db:query("SELECT " .. COLUMNS .. ", result, run_after, finished_at"
    .. " FROM queue WHERE id = ?", { id })
  if not rows then return nil, err, code end
  local r = rows[1]
  if r then r.priority = PRIORITY_NAME[r.priority] end
  return r
end

function Q:stats()
  local now = time.now()
  local rows, err, code = self.db:query("SELECT state, COUNT(*) AS n,"
    .. " SUM(CASE WHEN state = 'ready' AND run_after > ? THEN 1 ELSE 0 END) AS delayed,"
    .. " SUM(CASE WHEN state = 'leased' AND lease_expires_at <= ? THEN 1 ELSE 0 END) AS expired"
    .. " FROM queue GROUP BY state", { now, now })
  if not rows then return nil, err, code end
  local s = { ready = 0, delayed = 0, leased = 0, expired = 0, done = 0, dead = 0, cancelled = 0 }
  for _, r in ipairs(rows) do
    s[r.state] = r.n
    s.delayed = s.delayed + (r.delayed or 0)
    s.expired = s.expired + (r.expired or 0)
  end
  s.ready = s.ready - s.delayed
  return s
end

function Q:close()
  if self.listener then self.listener:close() end
  self.listener = nil
  return true
end

M.PRIORITIES = PRIORITY_NAME
return M
