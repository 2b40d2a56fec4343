-- factory.db: the durable store, one API over SQLite and PostgreSQL.
--
--   db.open([url])            -> db | nil, err, code
--       url: "sqlite:PATH" | "postgres://user:pass@host:port/dbname?pool=4" |
--            nil = $FACTORY_DB, else sqlite .factory/factory.db (the directory is
--            created; an explicit sqlite path's directory must exist). See db/url.lua.
--   db.backend                -> "sqlite" | "postgres";  db.url -> the URL without password
--   db:query(sql, params)     -> { row, ... } | nil, err, code
--   db:queries({ { sql, params [, if_rows = k [, min_rows = m]] }, ... }) -> { rows, ... } | nil, err, code
--       (the first error); all read from one snapshot on SQLite. if_rows = k: the read
--       is made only if read k (an earlier one) found at least m rows (default 1),
--       else its rows are {}.
--   db:exec(sql, params)      -> { changes = n, last_id = n? } | nil, err, code
--   db:script(sql)            -> true | nil, err, code     several statements, no parameters (DDL)
--   db:tx(fn, ...)            -> fn's results | nil, err, code
--       fn(tx, ...) runs in one transaction; tx has query/exec/script/notify and
--       .backend. COMMIT when fn returns; ROLLBACK when fn raises or returns nil, err,
--       and then db:tx returns nil, err. On SQLite it is BEGIN IMMEDIATE: the write
--       lock is taken up front, so two writers queue on the busy timeout instead of
--       one failing when it upgrades from reader to writer. SQLite also groups
--       commits: transactions (and db:exec calls) that queue while one runs join its
--       transaction, each under a savepoint of its own (its failure undoes only its
--       work), and all return after their one shared COMMIT is on disk. When the
--       previous group had several members, a group yields once before its COMMIT,
--       for the fibers already woken to join it. The COMMIT itself does not wait for
--       the disk: the writer is free for the next group at once, and the WAL's sync
--       (core/db_sqlite.c, conn:sync) runs meanwhile, one for every commit made
--       before it started; each member, and a db:exec or db:script that committed on
--       its own, waits for it before returning.
--   db:tx_aside(fn, ...)      -> as db:tx, for work a fiber does on another's behalf
--       (the router's budget ledger, factory.budgets): a write the fiber posted and
--       lost is not reported here but to its own next db:tx, db:exec or db:script
--   db:post(fn, ...)          -> nothing; fn(tx, ...) runs in a transaction soon
--       A write nobody waits for. On SQLite fn runs in the writer's next group, before
--       any db:tx, db:exec or db:script that starts after this call (one writer, in
--       order), under a savepoint of its own, and its COMMIT is not waited for: a
--       later db:tx or db:exec that returned implies fn's work is on disk too, while
--       reads may not see it until it commits. A fiber of its own commits it when
--       nobody else comes. fn must only run statements on tx: it runs in whichever
--       fiber holds the writer next. fn failing, or its group's COMMIT, is logged as an
--       error, and the next db:tx, db:exec or db:script of the fiber that posted it
--       returns it, once, without running: nil, "EPOSTED: a write this fiber posted
--       was lost (...)", "EPOSTED". On PostgreSQL fn waits in a queue too, committed
--       in batches by a fiber of its own and before any later db:tx, db:exec or
--       db:script of this db (which fails as they do when the server cannot be
--       reached); while the server is away the queue waits for it, so an outage
--       neither holds up the poster nor loses its writes (past db.max_posted waiting
--       writes, default 20,000, a poster waits for room).
--       Callers outside any fiber: db:tx at once, failures logged and returned alike.
--   db:notify(channel, payload)  db:listen(channel) -> listener
--       listener:wait([timeout]) -> { channel =, payload = } | nil, err, code;  listener:close()
--       PostgreSQL: LISTEN/NOTIFY on a dedicated connection (tx:notify is delivered at
--       COMMIT). A listener whose connection dropped reconnects and returns
--       { channel =, reconnected = true }: anything may have been missed, re-check.
--       SQLite: within this process only (other processes must poll).
--   db:migrate() -> { version =, applied = {...} }   db:schema_status() -> see db/migrations.lua
--   db:tables() -> { name, ... }
--   db:flush()   commits the posted writes (db:post) now: what a process about to end
--       does; in a fiber it first waits for those being committed
--   db:close()   in a fiber, first waits for posted writes being committed (db:post)
--
-- Statements use ? placeholders on both backends; values are only ever bound as
-- parameters, never spliced into SQL. params is a list; holes are NULL (give
-- params.n, or db.null, for a trailing NULL). Lua tables are bound as JSON text.
-- Results: a list of rows, each { column = value }; NULL columns are absent;
-- integers and reals are numbers (integers exact up to 2^53), JSON/JSONB columns are
-- decoded (text that does not decode stays a string), booleans are booleans.
-- exec's last_id: on SQLite the rowid an INSERT inserted; on both backends a
-- statement's RETURNING id fills it (the portable way, and the right id for upserts).
--
-- Connections: SQLite has one writer (every transaction, exec and script queues on it;
-- COMMIT, the WAL's sync, and BEGIN when another process holds the lock, run on the
-- libuv thread pool, where waiting out that lock or the disk ties up a pool thread;
-- statements in between run inline) and, for db:query
-- from fibers, one reader, which sees only committed data. PostgreSQL has a pool of
-- up to `pool` connections, opened on demand; a dropped connection is replaced,
-- reconnecting with exponential backoff for up to 10 s. A transaction pins one
-- connection until it ends, so keep transactions short.
-- Inside db:tx use the tx object: calling db:query from the same fiber raises,
-- because it would run outside the transaction.
-- If a fiber dies holding a connection (cancelled, timed out), the next caller
-- reclaims it: rolled back on SQLite (in a group, only that caller's savepoint),
-- closed and replaced on PostgreSQL.
local sqlite = require "factory.core.db_sqlite"
local pg = require "factory.core.db_pg"
local corefiber = require "factory.core.fiber"
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local json = require "factory.json"
local dburl = require "factory.db.url"
local sqltext = require "factory.db.sql"
local log = require "factory.log"

local M = { null = json.null }

local DB, Tx, Listener = {}, {}, {}
DB.__index, Tx.__index, Listener.__index = DB, Tx, Listener

local MAIN = {} -- the owner of a connection taken outside any fiber
-- Seconds a lost PostgreSQL connection is tried again before a statement fails: a
-- server's restart or a failover, which an overnight run should outlive.
local RECONNECT_FOR = 60
local CLOSE_WAIT = 30 -- seconds db:close waits for the fibers committing posted writes
local CLOSE_FLUSH_PG = 10 -- seconds db:close or db:flush tries to commit PostgreSQL's queue
local CLOSE_WARN_PG = 1 -- seconds of that before it says it is waiting
local CLOSE_FLUSHES = 10 -- and how many times it commits those posted meanwhile
local TRANSIENT = { ECONNREFUSED = true, ECONNRESET = true, ECONNECT = true, ETIMEDOUT = true }

local function pack(...) return { n = select("#", ...), ... } end

local function strip_code(err) return (tostring(err):gsub("^E%u+: ", "")) end

-- ---- statements ---------------------------------------------------------------

-- A list holding a table (JSON) or json.null, as C takes it: a copy with those converted.
local function converted(params, n)
  local out = {}
  for i = 1, n do
    local v = params[i]
    local t = type(v)
    if v == json.null then
      v = nil
    elseif t == "table" then
      local s, err = json.encode(v)
      if not s then error(("db: parameter %d: %s"):format(i, err), 5) end
      v = s
    elseif t ~= "nil" and t ~= "string" and t ~= "number" and t ~= "boolean" then
      error(("db: parameter %d is a %s (expected nil, boolean, number, string or table)"):format(i, t), 5)
    end
    out[i] = v
  end
  return out
end

local function bind_list(params)
  if params == nil then return nil, 0 end
  if type(params) ~= "table" then error("db: params must be a list, got " .. type(params), 4) end
  local n = params.n or table.maxn(params)
  -- Most lists hold only plain values: they go to C as they are, without a copy.
  for i = 1, n do
    local t = type(params[i])
    if t == "table" or t == "userdata" then
      local out = converted(params, n)  -- not a tail call: the error levels count this frame
      return out, n
    end
    if t ~= "nil" and t ~= "string" and t ~= "number" and t ~= "boolean" then
      error(("db: parameter %d is a %s (expected nil, boolean, number, string or table)"):format(i, t), 4)
    end
  end
  return params, n
end

local function decode_json(rows, cols)
  for _, row in ipairs(rows) do
    for _, col in ipairs(cols) do
      local s = row[col]
      if s ~= nil then
        local v = json.decode(s)
        if v ~= nil then row[col] = v end
      end
    end
  end
end

-- Runs one statement on conn. params were checked by the caller (prepare).
local function run(conn, backend, sql, args, n)
  if backend == "postgres" then
    local count
    sql, count = sqltext.to_postgres(sql)
    -- PostgreSQL would accept extra typed parameters silently; SQLite refuses them.
    if count ~= n then
      return nil, ("ESQL: the statement has %d parameter(s), %d given"):format(count, n), "ESQL"
    end
  end
  local rows, meta, code = conn:run(sql, args, n)
  if not rows then return nil, meta, code end
  if meta.json then decode_json(rows, meta.json) end
  return rows, meta
end

local function prepare(sql, params)
  if type(sql) ~= "string" then error("db: sql must be a string, got " .. type(sql), 3) end
  local args, n = bind_list(params)  -- not a tail call: bind_list's error levels count this frame
  return args, n
end

-- meta (the driver's, fresh for each statement) becomes the result.
local function exec_result(rows, meta)
  if meta.last_id == nil and rows[#rows] and type(rows[#rows].id) == "number" then meta.last_id = rows[#rows].id end
  meta.json = nil
  return meta
end

-- ---- connections ----------------------------------------------------------------

local function alive(owner)
  if owner == MAIN then return true end
  local st = owner:status()
  return st == "ready" or st == "running" or st == "waiting"
end

local function connect_error(spec, err, code)
  local msg = strip_code(err)
  if code == "ETIMEDOUT" then msg = ("no answer within %g s"):format(spec.connect_timeout) end
  msg = ("%s: cannot connect to %s: %s"):format(code, spec.display, msg)
  local pw = spec.password
  if pw and pw ~= "" then
    local i, j = msg:find(pw, 1, true)
    while i do
      msg = msg:sub(1, i - 1) .. "***" .. msg:sub(j + 1)
      i, j = msg:find(pw, i + 3, true)
    end
  end
  return msg
end

-- Connects to PostgreSQL, retrying transient failures with backoff for up to
-- retry_for seconds.
local function pg_connect(spec, retry_for)
  local deadline = time.monotonic() + retry_for
  local delay = 0.05
  while true do
    local c, err, code = pg.connect(spec.params, spec.connect_timeout)
    if c then return c end
    if not TRANSIENT[code] or time.monotonic() + delay > deadline then
      return nil, connect_error(spec, err, code), code
    end
    corefiber.sleep(delay * (0.5 + math.random() * 0.5))
    delay = math.min(delay * 2, 2)
  end
end

local function usable(e)
  return e.conn ~= nil and (not e.conn.ok or e.conn:ok())
end

local function remove_entry(self, e)
  for i, x in ipairs(self.entries) do
    if x == e then
      table.remove(self.entries, i)
      break
    end
  end
  if e.conn then e.conn:close() end
end

local function hand_off(self, e)
  while #self.waiters > 0 do
    local w = table.remove(self.waiters, 1)
    e.owner = w
    if w:wake(e) then return true end
    e.owner = nil
  end
  return false
end

-- A write fiber posted was lost: its next write says so (lost_error).
local function lose(self, fiber, err)
  if fiber and not self.lost[fiber] then self.lost[fiber] = tostring(err) end
end

local function lost_error(self, me)
  local err = self.lost[me]
  if not err then return nil end
  self.lost[me] = nil
  return "EPOSTED: a write this fiber posted was lost (" .. err .. ")"
end

local function settle(self, g, ok, err, code)
  -- A failed COMMIT gives nil for ok; a member waits while its ok is nil.
  ok = ok and true or false
  for _, m in ipairs(g.members) do
    m.ok, m.err, m.code = ok, err, code
    if m.fiber ~= MAIN then m.fiber:wake(true) end
  end
  if not ok and g.posted > 0 then
    log.error("db: posted writes were lost: their COMMIT failed", { writes = g.posted, error = tostring(err) })
    for _, fiber in ipairs(g.posters) do lose(self, fiber, err) end
  end
end

-- One COMMIT for every member of the group (each then waits for its sync).
local function commit_group(self, e)
  local g = e.group
  self.last_group = #g.members
  g.committing = true
  e.conn:inline(false)
  local ok, err, code = e.conn:script("COMMIT")
  if not ok then e.conn:script("ROLLBACK") end
  e.group = nil
  settle(self, g, ok, err, code)
end

-- Posted writes (db:post): run into an open group by whoever holds the writer next,
-- and committed by a fiber of their own only when the writer is left idle.
local run_posted, spawn_flusher

-- Hands the connection to the first waiter still parked, else leaves it idle. An
-- open SQLite group passes to the next waiter with the connection; the last one
-- takes in the writes posted meanwhile and commits it (a caller outside any fiber
-- cannot wait for someone else's COMMIT).
local function release(self, e)
  local me = e.owner
  e.owner = nil
  if e.group then
    if me ~= MAIN and not e.group.broken and not self.closed then
      if hand_off(self, e) then return end
      -- Under concurrent writers a COMMIT (every page the group changed written to
      -- the WAL, then one sync of it) is worth sharing: the group yields once, so
      -- that the fibers already woken (by the I/O the loop just polled) run first
      -- and join it. A lone writer (the last group had one member) commits at once.
      -- A fixed wait (1 ms was tried) cost more than it shared where an fsync takes
      -- a fraction of a millisecond: the SQLite queue ran 5.1-5.5k jobs/s with it
      -- and 6.7-6.9k without, the pipeline bench 14% fewer runs/s.
      if not e.group.lingered and (self.last_group or 0) >= 2 then
        e.group.lingered = true
        e.owner = me
        corefiber.yield()
        e.owner = nil
        if not e.group.broken and not self.closed and hand_off(self, e) then return end
      end
    end
    e.owner = me
    if not e.group.broken then run_posted(self, e, me) end
    commit_group(self, e)
    e.owner = nil
  end
  if self.closed or not usable(e) then
    remove_entry(self, e)
    local w = table.remove(self.waiters, 1)
    if w then w:wake(true) end
    return
  end
  if not hand_off(self, e) and #self.posted > 0 then spawn_flusher(self) end
end

-- Frees a connection whose owner died without releasing it (a cancelled fiber
-- unwinds nothing): its open transaction would hold locks. A PostgreSQL connection is
-- closed, which ends the transaction and leaves no one queued behind a statement the
-- dead fiber left running; SQLite's one connection is rolled back and reused. In a
-- SQLite group only the dead member's savepoint is rolled back; a dead committer's
-- COMMIT ran on regardless, and a ROLLBACK queued behind it fails exactly when that
-- COMMIT succeeded. An owner that died while connecting (cancelled during a
-- reconnection's backoff) left an entry without a connection: it just goes.
local function reclaim(self, e, me)
  e.owner = me
  if self.backend == "postgres" then
    if e.conn then e.conn:close() end
  elseif e.group and e.group.committing then
    local g = e.group
    e.group = nil
    if e.conn:script("ROLLBACK") then
      settle(self, g, nil, "EIO: the transaction's COMMIT failed", "EIO")
    else
      settle(self, g, true)
    end
  elseif e.member then
    e.member = false
    if not (e.conn:run("ROLLBACK TO member") and e.conn:run("RELEASE member")) then e.group.broken = true end
  elseif e.in_tx then
    e.in_tx = false
    e.conn:script("ROLLBACK")
  end
  release(self, e)
end

local function misuse(level)
  error("db: called on the database inside db:tx from the same fiber (it would run outside "
    .. "the transaction); use the tx object", level + 1)
end

-- level: of the caller to blame for misuse.
local function acquire(self, level)
  local me = corefiber.current() or MAIN
  if self.tx_owners[me] then misuse(level + 1) end
  while true do
    if self.closed then return nil, "ECLOSED: the database is closed", "ECLOSED" end
    local idle, dead
    for _, e in ipairs(self.entries) do
      if e.owner == nil then
        idle = idle or e
      elseif not alive(e.owner) then
        dead = e
      end
    end
    if dead then
      reclaim(self, dead, me)
    elseif idle and usable(idle) then
      idle.owner = me
      return idle
    elseif idle then
      remove_entry(self, idle)
    elseif self.connect and #self.entries < self.max then
      local e = { owner = me }
      self.entries[#self.entries + 1] = e
      local c, err, code = self.connect()
      if not c then
        release(self, e)
        return nil, err, code
      end
      e.conn = c
      return e
    elseif me == MAIN then
      return nil, "EBUSY: the database is in use by a fiber; call it from a fiber", "EBUSY"
    else
      self.waiters[#self.waiters + 1] = me
      -- The timeout only re-checks for owners that died holding a connection.
      local got = corefiber.park(1)
      for i, w in ipairs(self.waiters) do
        if w == me then
          table.remove(self.waiters, i)
          break
        end
      end
      if type(got) == "table" then return got end
    end
  end
end

-- Runs fn(conn, ...) on a connection of its own.
local function with_conn(self, fn, ...)
  local e, err, code = acquire(self, 3)
  if not e then return nil, err, code end
  local res = pack(pcall(fn, e.conn, ...))
  release(self, e)
  if not res[1] then error(res[2], 0) end
  if self.backend == "sqlite" then
    local sok, serr, scode = e.conn:sync()
    if not sok then return nil, serr, scode end
  end
  return unpack(res, 2, res.n)
end

-- ---- the database ---------------------------------------------------------------

function M.open(url)
  local spec, err, code = dburl.parse(url)
  if not spec then return nil, err, code end
  local self = setmetatable({
    backend = spec.backend, url = spec.display, entries = {}, waiters = {},
    tx_owners = setmetatable({}, { __mode = "k" }), listeners = setmetatable({}, { __mode = "k" }),
    spec = spec, posted = {}, lost = setmetatable({}, { __mode = "k" }), flushing = {},
  }, DB)
  local conn
  if spec.backend == "sqlite" then
    conn, err, code = sqlite.open(spec.path, { create_dir = spec.create_dir })
    self.max = 1
    if conn then
      self.reader, err, code = sqlite.open(spec.path, { reader = true })
      if not self.reader then
        conn:close()
        return nil, err, code
      end
    end
  else
    conn, err, code = pg_connect(spec, 0)
    self.max = spec.pool
    self.connect = function() return pg_connect(spec, RECONNECT_FOR) end
  end
  if not conn then return nil, err, code end
  self.entries[1] = { conn = conn }
  return self
end

local function query_on(conn, backend, sql, args, n)
  local rows, meta, code = run(conn, backend, sql, args, n)
  if not rows then return nil, meta, code end
  return rows
end

local function exec_on(conn, backend, sql, args, n)
  local rows, meta, code = run(conn, backend, sql, args, n)
  if not rows then return nil, meta, code end
  return exec_result(rows, meta)
end

-- SQLite reads from fibers go to a second connection, which WAL lets read the last
-- committed state while the writer's group is open: a read neither waits for a group
-- nor sees work that is not committed yet. Its statements queue in C, one at a time;
-- one that has run before in a few microseconds runs at once, on the loop thread
-- (core/db_sqlite.c, quick reads).
function DB:query(sql, params)
  local args, n = prepare(sql, params)
  local me = corefiber.current()
  if self.reader and me and not self.closed then
    if self.tx_owners[me] then misuse(2) end
    return query_on(self.reader, "sqlite", sql, args, n)
  end
  return with_conn(self, query_on, self.backend, sql, args, n)
end

-- Several reads at once; on SQLite's reader one job, one pool round trip for all.
function DB:queries(list)
  if type(list) ~= "table" then error("db:queries: expected a list of { sql, params }", 2) end
  for i, q in ipairs(list) do
    if q.if_rows ~= nil and not (type(q.if_rows) == "number" and q.if_rows >= 1 and q.if_rows < i) then
      error(("db:queries: read %d: if_rows must name an earlier read"):format(i), 2)
    end
    if q.min_rows ~= nil and not (type(q.min_rows) == "number" and q.min_rows >= 1) then
      error(("db:queries: read %d: min_rows must be a count of at least 1"):format(i), 2)
    end
  end
  local me = corefiber.current()
  if not (self.reader and me and not self.closed) then
    local out = {}
    for i, q in ipairs(list) do
      if q.if_rows and #out[q.if_rows] < (q.min_rows or 1) then
        out[i] = {}
      else
        local rows, err, code = self:query(q[1], q[2])
        if not rows then return nil, err, code end
        out[i] = rows
      end
    end
    return out
  end
  if self.tx_owners[me] then misuse(2) end
  local jobs = {}
  for i, q in ipairs(list) do
    local args, n = prepare(q[1], q[2])
    jobs[i] = { q[1], args or {}, n, if_rows = q.if_rows, min_rows = q.min_rows }
  end
  local out = self.reader:batch(jobs)
  for i, r in ipairs(out) do
    local rows, meta = r[1], r[2]
    if not rows then return nil, r[2], r[3] end
    if meta.json then decode_json(rows, meta.json) end
    out[i] = rows
  end
  return out
end

local function tx_error_text(err)
  if type(err) == "table" then
    return tostring(err.code or "EFAIL") .. ": " .. tostring(err.message), err.code or "EFAIL"
  end
  local text = tostring(err)
  -- "ECODE: ..." as raised by assert(), or after error()'s "file:line: "
  return text, text:match("^(E%u+):") or text:match("^[^:]+:%d+: (E%u+):") or "EFAIL"
end

local function deliver(self, channel, payload)
  for l in pairs(self.listeners) do
    if l.channel == channel and not l.closed then
      l.queue[#l.queue + 1] = { channel = channel, payload = payload }
      if l.waiter then l.waiter:wake(true) end
    end
  end
end

local function tx_failed(res)
  return not res[1] or (res[2] == nil and res[3] ~= nil)
end

-- What db:tx returns for fn's results res (pack(xpcall(fn, ...))) once its work is
-- undone.
local function tx_error(res)
  if res[1] then return nil, res[3], res[4] end
  -- A fiber cancelling itself must stay cancelled.
  if type(res[2]) == "table" and res[2].code == "ECANCELED" then error(res[2], 0) end
  return nil, tx_error_text(res[2])
end

-- tx.memo: what fn's statements learned about the database that stays true while
-- the write lock is held (audit.lua keeps the chain's last record there). A SQLite
-- group's members read through to the group's memo and add theirs to it only when
-- their work is kept (memo: the group's, nil for a transaction of its own).
local function as_is(x) return x end

local function run_fn(self, me, conn, memo, fn, ...)
  self.tx_owners[me] = true
  local tx = setmetatable({ backend = self.backend, _conn = conn, _notes = {},
                            memo = setmetatable({}, memo and { __index = memo }) }, Tx)
  local res = pack(xpcall(fn, as_is, tx, ...))
  tx._conn = nil
  self.tx_owners[me] = nil
  return res, tx._notes, tx.memo
end

local function pg_tx(self, fn, ...)
  local me = corefiber.current() or MAIN
  local e, err, code = acquire(self, 3)
  if not e then return nil, err, code end
  local ok, berr, bcode = e.conn:script("BEGIN")
  if not ok then
    release(self, e)
    return nil, berr, bcode
  end
  e.in_tx = true
  local res = run_fn(self, me, e.conn, nil, fn, ...)
  if tx_failed(res) then
    e.conn:script("ROLLBACK")
    e.in_tx = false
    release(self, e)
    return tx_error(res)
  end
  local cok, cerr, ccode = e.conn:script("COMMIT")
  if not cok then e.conn:script("ROLLBACK") end
  e.in_tx = false
  release(self, e)
  if not cok then return nil, cerr, ccode end
  return unpack(res, 2, res.n)
end

-- PostgreSQL's posted writes (db:post) wait in self.posted and are committed in
-- batches: by a fiber of their own (pg_flusher), and before any db:tx, db:exec or
-- db:script (pg_posted_first), so that none commits before a write posted ahead of
-- it. A batch is one transaction, each write under a savepoint of its own: a write
-- that fails is undone alone, logged and told to its poster (lose). When the
-- database cannot be reached the batch goes back to the front of the queue, to be
-- committed when it can: a caller does not wait for a write it posted (unless
-- MAX_POSTED are waiting already), and an outage shorter than the process's life
-- loses none.
local MAX_POSTED = 20000
local FLUSH_RETRY_MAX = 30 -- seconds between two tries to commit while the database is away

local function requeue(self, list)
  for _, p in ipairs(self.posted) do list[#list + 1] = p end
  self.posted = list
end

-- Runs list's posted writes in order on conn, what each keeps in its memo gathered
-- in memo, until one fails -> whether every one ran.
local function run_together(self, me, conn, memo, list)
  for _, p in ipairs(list) do
    local res, _, m = run_fn(self, me, conn, memo, p.fn, unpack(p.args, 1, p.args.n))
    if tx_failed(res) then return false end
    for k, v in pairs(m) do memo[k] = v end
  end
  return true
end

local function pg_each(self, e, me, list)
  local failures, memo = {}, {}
  for _, p in ipairs(list) do
    local ok, err, code = e.conn:script("SAVEPOINT posted")
    if not ok then return nil, err, code end
    local res, _, m = run_fn(self, me, e.conn, memo, p.fn, unpack(p.args, 1, p.args.n))
    if tx_failed(res) then
      if not usable(e) then return nil, "ECONNRESET: the connection was lost", "ECONNRESET" end
      failures[#failures + 1] = { fiber = p.fiber, err = res[1] and res[3] or tx_error_text(res[2]) }
      ok, err, code = e.conn:script("ROLLBACK TO SAVEPOINT posted")
    else
      for k, v in pairs(m) do memo[k] = v end
      ok, err, code = e.conn:script("RELEASE SAVEPOINT posted")
    end
    if not ok then return nil, err, code end
  end
  return failures
end

-- The writes run together under one savepoint; only when one fails is that undone
-- and each run again under a savepoint of its own (as run_posted does on SQLite).
local function pg_batch(self, e, me, list)
  local ok, err, code = e.conn:script("SAVEPOINT posted")
  if not ok then return nil, err, code end
  if run_together(self, me, e.conn, {}, list) then
    ok, err, code = e.conn:script("RELEASE SAVEPOINT posted")
    if not ok then return nil, err, code end
    return {}
  end
  if not usable(e) then return nil, "ECONNRESET: the connection was lost", "ECONNRESET" end
  ok, err, code = e.conn:script("ROLLBACK TO SAVEPOINT posted; RELEASE SAVEPOINT posted")
  if not ok then return nil, err, code end
  return pg_each(self, e, me, list)
end

-- Commits the queued posted writes (after a batch another fiber has in flight) ->
-- true | nil, err, code (the database could not be reached: the writes are queued
-- again).
local function pg_commit_posted(self)
  while self.in_flight do
    local batch = self.in_flight
    if alive(batch.owner) then
      batch.done:wait(1)
    else
      -- Its fiber was cancelled mid-batch: the connection it held is rolled back
      -- when reclaimed, so the batch is queued again.
      self.in_flight = nil
      requeue(self, batch.list)
    end
  end
  local list = self.posted
  if #list == 0 then return true end
  self.posted = {}
  if self.room then self.room:broadcast() end
  local me = corefiber.current() or MAIN
  local done = fiber.cond()
  self.in_flight = { done = done, owner = me, list = list }
  local e, err, code = acquire(self, 3)
  local failures
  if e then
    local ok
    ok, err, code = e.conn:script("BEGIN")
    if ok then
      e.in_tx = true
      failures, err, code = pg_batch(self, e, me, list)
      if failures then
        ok, err, code = e.conn:script("COMMIT")
        if not ok then failures = nil end
      end
      if not failures then e.conn:script("ROLLBACK") end
      e.in_tx = false
    end
    release(self, e)
  end
  self.in_flight = nil
  done:broadcast()
  if not failures then
    requeue(self, list)
    return nil, err, code
  end
  for _, f in ipairs(failures) do
    log.error("db: a posted write failed; its work was undone", { error = tostring(f.err) })
    lose(self, f.fiber, f.err)
  end
  return true
end

-- Before a write: the writes posted ahead of it commit first, or it fails as they did.
local function pg_posted_first(self)
  if self.backend ~= "postgres" or (#self.posted == 0 and not self.in_flight) then return true end
  if not corefiber.current() then return true end
  return pg_commit_posted(self)
end

local function pg_flusher(self)
  local delay = 0.5
  while #self.posted > 0 and not self.closed do
    local ok, err = pg_commit_posted(self)
    if ok then
      delay = 0.5
    elseif not self.closed then
      log.warn("db: posted writes wait for the database", { writes = #self.posted, error = tostring(err),
                                                             retry_s = delay })
      self.flusher_idle = true
      corefiber.sleep(delay)
      self.flusher_idle = false
      delay = math.min(delay * 2, FLUSH_RETRY_MAX)
    end
  end
  self.flusher = nil
end

-- SQLite group commit. A transaction that finds the connection idle opens a group
-- (BEGIN IMMEDIATE); everyone queued for the connection meanwhile runs inside that
-- same transaction when their turn comes, each db:tx under a SAVEPOINT of its own so
-- that its failure undoes only its work; the last in line COMMITs, and every member
-- returns only after that COMMIT is on disk (conn:sync, which the next group does not
-- wait for). Under load one COMMIT and one sync serve every caller who queued meanwhile.
local function nudge(self, e, g)
  if e.group == g and e.owner ~= nil and not alive(e.owner) then
    local x = acquire(self, 3)
    if x then release(self, x) end
  end
end

-- Runs list's posted writes in e's open group, in order, each under a savepoint of
-- its own so that a failure undoes only its work.
local function run_each(self, e, me, list)
  local conn, g = e.conn, e.group
  for _, p in ipairs(list) do
    local failed, err = true, "EIO: the group's savepoint failed"
    if not g.broken and conn:run("SAVEPOINT posted") then
      local res, _, memo = run_fn(self, me, conn, g.memo, p.fn, unpack(p.args, 1, p.args.n))
      failed = tx_failed(res)
      if failed then
        err = res[1] and res[3] or tx_error_text(res[2])
        if not conn:run("ROLLBACK TO posted") then g.broken = true end
      else
        for k, v in pairs(memo) do g.memo[k] = v end
        g.posted = g.posted + 1
        g.posters[#g.posters + 1] = p.fiber
      end
      if not conn:run("RELEASE posted") then g.broken = true end
    else
      g.broken = true
    end
    if failed then
      log.error("db: a posted write failed; its work was undone", { error = tostring(err) })
      lose(self, p.fiber, err)
    end
  end
end

-- Runs the writes posted so far in e's open group (the caller holds e), in order.
-- Under load a dozen wait at a time: they run together under one savepoint, and
-- only when one of them fails is that undone and each run again under a savepoint
-- of its own (run_each). Running one again is safe: a posted fn only runs
-- statements on its tx, and what it did the first time was undone.
function run_posted(self, e, me)
  local list = self.posted
  if #list == 0 then return end
  self.posted = {}
  local conn, g = e.conn, e.group
  if #list == 1 or g.broken then return run_each(self, e, me, list) end
  if not conn:run("SAVEPOINT posted") then
    g.broken = true
    return run_each(self, e, me, list)
  end
  local memo = setmetatable({}, { __index = g.memo })
  if run_together(self, me, conn, memo, list) then
    for k, v in pairs(memo) do g.memo[k] = v end
    g.posted = g.posted + #list
    for _, p in ipairs(list) do g.posters[#g.posters + 1] = p.fiber end
    if not conn:run("RELEASE posted") then g.broken = true end
    return
  end
  if not (conn:run("ROLLBACK TO posted") and conn:run("RELEASE posted")) then g.broken = true end
  run_each(self, e, me, list)
end

-- user: the call is a db:tx or db:exec, which fails if a write its fiber posted was
-- just lost (in run_posted); false for a posted write db:post runs at once.
local function member(self, e, me, user, fn, ...)
  local conn, g = e.conn, e.group
  run_posted(self, e, me)
  local lost = user and lost_error(self, me)
  if lost then
    release(self, e)
    return nil, lost, "EPOSTED"
  end
  local sok, serr, scode = conn:run("SAVEPOINT member")
  if not sok then
    g.broken = true
    release(self, e)
    return nil, serr, scode
  end
  e.member = true
  local res, notes, memo = run_fn(self, me, conn, g.memo, fn, ...)
  local failed = tx_failed(res)
  if failed and not conn:run("ROLLBACK TO member") then g.broken = true end
  if not conn:run("RELEASE member") then g.broken = true end
  e.member = false
  if failed then
    release(self, e)
    return tx_error(res)
  end
  for k, v in pairs(memo) do g.memo[k] = v end
  local m = { fiber = me }
  g.members[#g.members + 1] = m
  release(self, e)
  while m.ok == nil do
    corefiber.park(1)
    if m.ok == nil then nudge(self, e, g) end
  end
  if not m.ok then return nil, m.err, m.code end
  local sok, serr, scode = e.conn:sync()
  if not sok then return nil, serr, scode end
  for _, note in ipairs(notes) do deliver(self, note[1], note[2]) end
  return unpack(res, 2, res.n)
end

-- Opens a group on e (held by the caller) unless one is open; on failure e is
-- released.
local function open_group(self, e)
  if e.group then return true end
  -- Uncontended, the write lock is taken inline in microseconds; only when another
  -- process holds it does BEGIN queue for the pool, to wait out the busy timeout.
  local ok, err, code = e.conn:try("BEGIN IMMEDIATE")
  if not ok and code == "EBUSY" then
    e.in_tx = true
    ok, err, code = e.conn:script("BEGIN IMMEDIATE")
    e.in_tx = false
  end
  if not ok then
    release(self, e)
    return nil, err, code
  end
  -- Holding the write lock, no statement can wait for another process.
  e.conn:inline(true)
  e.group = { members = {}, memo = {}, posted = 0, posters = {} }
  return true
end

local function sqlite_tx(self, user, fn, ...)
  local me = corefiber.current() or MAIN
  local e, err, code = acquire(self, 3)
  if not e then return nil, err, code end
  local ok, gerr, gcode = open_group(self, e)
  if not ok then return nil, gerr, gcode end
  return member(self, e, me, user, fn, ...)
end

function DB:tx(fn, ...)
  if type(fn) ~= "function" then error("db:tx: expected a function, got " .. type(fn), 2) end
  local pok, perr, pcode = pg_posted_first(self)
  if not pok then return nil, perr, pcode end
  local lost = lost_error(self, corefiber.current() or MAIN)
  if lost then return nil, lost, "EPOSTED" end
  if self.backend == "sqlite" then return sqlite_tx(self, true, fn, ...) end
  return pg_tx(self, fn, ...)
end

function DB:tx_aside(fn, ...)
  if type(fn) ~= "function" then error("db:tx_aside: expected a function, got " .. type(fn), 2) end
  local pok, perr, pcode = pg_posted_first(self)
  if not pok then return nil, perr, pcode end
  if self.backend == "sqlite" then return sqlite_tx(self, false, fn, ...) end
  return pg_tx(self, fn, ...)
end

local function nothing() return true end

-- Commits what was posted when no one else took it into a group meanwhile.
local function flush_posted(self)
  self.flusher = nil
  if #self.posted == 0 or self.closed then return end
  local me = corefiber.current()
  self.flushing[me] = true
  local ok, err = self:tx(nothing)
  self.flushing[me] = nil
  if not ok then log.error("db: posted writes could not be committed", { error = tostring(err) }) end
end

function spawn_flusher(self)
  if not self.flusher and corefiber.current() then
    self.flusher = corefiber.spawn(self.backend == "postgres" and pg_flusher or flush_posted, self)
  end
end

function DB:post(fn, ...)
  if type(fn) ~= "function" then error("db:post: expected a function, got " .. type(fn), 2) end
  local me = corefiber.current()
  if self.tx_owners[me or MAIN] then misuse(2) end
  if not me or self.closed then
    local ok, err
    if self.backend == "sqlite" then ok, err = sqlite_tx(self, false, fn, ...) else ok, err = pg_tx(self, fn, ...) end
    if not ok then
      log.error("db: a posted write failed", { error = tostring(err) })
      lose(self, me or MAIN, err)
    end
    return
  end
  self.posted[#self.posted + 1] = { fn = fn, args = pack(...), fiber = me }
  if self.backend == "postgres" then
    spawn_flusher(self)
    -- Past MAX_POSTED waiting writes a poster waits for room: memory stays bounded
    -- and no write is dropped, however long the server is away or slow.
    while #self.posted >= (self.max_posted or MAX_POSTED) and not self.closed do
      self.room = self.room or fiber.cond()
      self.room:wait(1)
    end
    return
  end
  -- A writer in use takes the write in before it is left idle (release).
  local e = self.entries[1]
  if not e or e.owner == nil then spawn_flusher(self) end
end

local function exec_member(tx, sql, args, n)
  return exec_on(tx._conn, "sqlite", sql, args, n)
end

-- On SQLite a statement that finds a group open joins it (and waits for its COMMIT);
-- one that finds the connection idle commits on its own.
function DB:exec(sql, params)
  local args, n = prepare(sql, params)
  local pok, perr, pcode = pg_posted_first(self)
  if not pok then return nil, perr, pcode end
  local lost = lost_error(self, corefiber.current() or MAIN)
  if lost then return nil, lost, "EPOSTED" end
  if self.backend == "sqlite" then
    local me = corefiber.current() or MAIN
    local e, err, code = acquire(self, 2)
    if not e then return nil, err, code end
    if not e.group and #self.posted > 0 then
      local ok, gerr, gcode = open_group(self, e)
      if not ok then return nil, gerr, gcode end
    end
    if e.group then return member(self, e, me, true, exec_member, sql, args, n) end
    local res = pack(pcall(exec_on, e.conn, "sqlite", sql, args, n))
    release(self, e)
    if not res[1] then error(res[2], 0) end
    local sok, serr, scode = e.conn:sync()
    if not sok then return nil, serr, scode end
    return unpack(res, 2, res.n)
  end
  return with_conn(self, exec_on, self.backend, sql, args, n)
end

-- A script (DDL, its own BEGIN/COMMIT) never runs inside someone else's group, nor
-- before writes posted earlier.
function DB:script(sql)
  prepare(sql)
  local pok, perr, pcode = pg_posted_first(self)
  if not pok then return nil, perr, pcode end
  local lost = lost_error(self, corefiber.current() or MAIN)
  if lost then return nil, lost, "EPOSTED" end
  local e, err, code = acquire(self, 2)
  if not e then return nil, err, code end
  if self.backend == "sqlite" and not e.group and #self.posted > 0 then
    local ok, gerr, gcode = open_group(self, e)
    if not ok then return nil, gerr, gcode end
  end
  local res = pack(pcall(function()
    if e.group then
      run_posted(self, e, corefiber.current() or MAIN)
      commit_group(self, e)
    end
    return e.conn:script(sql)
  end))
  release(self, e)
  if not res[1] then error(res[2], 0) end
  if self.backend == "sqlite" then
    local sok, serr, scode = e.conn:sync()
    if not sok then return nil, serr, scode end
  end
  return unpack(res, 2, res.n)
end

function DB:notify(channel, payload)
  if self.backend == "postgres" then
    local rows, err, code = self:query("SELECT pg_notify(?, ?)", { channel, payload or "" })
    if not rows then return nil, err, code end
  else
    deliver(self, channel, payload)
  end
  return true
end

local TABLES = {
  sqlite = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!' ORDER BY name",
  postgres = "SELECT table_name AS name FROM information_schema.tables"
    .. " WHERE table_schema = current_schema() ORDER BY table_name",
}

function DB:tables()
  local rows, err, code = self:query(TABLES[self.backend])
  if not rows then return nil, err, code end
  local names = {}
  for i, r in ipairs(rows) do names[i] = r.name end
  return names
end

function DB:migrate()
  return require("factory.db.migrations").migrate(self)
end

function DB:schema_status()
  return require("factory.db.migrations").status(self)
end

-- Posted writes being committed by a fiber of their own are on disk before this
-- returns, as those not taken yet are; doing says what for, in the log.
local function commit_posted(self, doing)
  local me = corefiber.current()
  if self.backend == "postgres" then
    -- A flusher waiting out an outage would keep the process alive for its wait.
    if self.flusher and self.flusher_idle then
      self.flusher:cancel("the database is " .. doing)
      self.flusher = nil
    end
    local ok, err = true, nil
    if me and (#self.posted > 0 or self.in_flight) then
      -- A wait that drags (the server is away) is said while it lasts, not only when
      -- it has given up: whoever waits for the process to end knows why.
      local warner = fiber.spawn(function()
        fiber.sleep(CLOSE_WARN_PG)
        log.warn(("db: %s: the server has not taken the writes posted last; waiting up to %g s more for it, then"
          .. " they are lost"):format(doing, CLOSE_FLUSH_PG - CLOSE_WARN_PG),
          { writes = #self.posted + (self.in_flight and #self.in_flight.list or 0) })
      end)
      local done, r1, r2 = fiber.with_timeout(CLOSE_FLUSH_PG, pg_commit_posted, self)
      warner:cancel("done")
      if done then ok, err = r1, r2 else ok, err = false, r1 end
    end
    -- A flusher still reconnecting would keep a closing process alive for as long.
    if self.flusher and (doing == "closing" or not ok) then
      self.flusher:cancel("the database is " .. doing)
      self.flusher = nil
    end
    local left = #self.posted + (self.in_flight and #self.in_flight.list or 0)
    if not ok or left > 0 then
      log.error("db: " .. doing .. " with posted writes not committed", { writes = left,
                                                                         error = err and tostring(err) })
    end
    return
  end
  if me then
    for f in pairs(self.flushing) do
      if f ~= me and fiber.join(f, CLOSE_WAIT) == nil then
        log.error("db: " .. doing .. " while posted writes are still being committed", { waited_s = CLOSE_WAIT })
      end
    end
  end
  -- Writes posted while those commit are taken in turn, a bounded number of times.
  for _ = 1, CLOSE_FLUSHES do
    if #self.posted == 0 then break end
    flush_posted(self)
  end
  if #self.posted > 0 then
    log.error("db: " .. doing .. " with posted writes not committed", { writes = #self.posted })
  end
end

function DB:flush()
  if not self.closed then commit_posted(self, "flushing") end
  return true
end

function DB:close()
  if self.closed then return true end
  commit_posted(self, "closing")
  self.closed = true
  for i = #self.entries, 1, -1 do
    local e = self.entries[i]
    if e.owner == nil or not alive(e.owner) then remove_entry(self, e) end
  end
  if self.reader then self.reader:close() end
  for l in pairs(self.listeners) do l:close() end
  local waiters = self.waiters
  self.waiters = {}
  for _, w in ipairs(waiters) do w:wake(true) end
  return true
end

-- ---- transactions -----------------------------------------------------------------

local function tx_conn(tx)
  local c = tx._conn
  if not c then error("db: the transaction has already ended", 3) end
  return c
end

function Tx:query(sql, params)
  local args, n = prepare(sql, params)
  return query_on(tx_conn(self), self.backend, sql, args, n)
end

function Tx:exec(sql, params)
  local args, n = prepare(sql, params)
  return exec_on(tx_conn(self), self.backend, sql, args, n)
end

function Tx:script(sql)
  prepare(sql)
  return tx_conn(self):script(sql)
end

-- PostgreSQL delivers at COMMIT and drops on ROLLBACK; SQLite's in-process
-- delivery does the same.
function Tx:notify(channel, payload)
  if self.backend == "postgres" then
    local rows, err, code = self:query("SELECT pg_notify(?, ?)", { channel, payload or "" })
    if not rows then return nil, err, code end
  else
    tx_conn(self)
    self._notes[#self._notes + 1] = { channel, payload }
  end
  return true
end

-- ---- notifications -----------------------------------------------------------------

local function pg_listen(l)
  local c, err, code = pg_connect(l.db.spec, l.retry_for)
  if not c then return nil, err, code end
  local ok, lerr, lcode = c:script("LISTEN " .. c:quote_ident(l.channel))
  if not ok then
    c:close()
    return nil, lerr, lcode
  end
  l.conn = c
  return true
end

function DB:listen(channel)
  if type(channel) ~= "string" or channel == "" then
    error("db:listen: expected a channel name, got " .. tostring(channel), 2)
  end
  local l = setmetatable({ db = self, channel = channel, queue = {}, retry_for = 0 }, Listener)
  if self.backend == "postgres" then
    local ok, err, code = pg_listen(l)
    if not ok then return nil, err, code end
  end
  self.listeners[l] = true
  return l
end

local function wait_timeout(timeout)
  return nil, ("ETIMEDOUT: no notification within %g s"):format(timeout), "ETIMEDOUT"
end

function Listener:wait(timeout)
  if self.closed then error("listener:wait: the listener is closed", 2) end
  if self.db.backend == "sqlite" then
    if #self.queue == 0 then
      self.waiter = corefiber.current()
      local woke = corefiber.park(timeout)
      self.waiter = nil
      if self.closed then return nil, "ECLOSED: the listener was closed", "ECLOSED" end
      if not woke and #self.queue == 0 then return wait_timeout(timeout) end
    end
    return table.remove(self.queue, 1)
  end
  if not self.conn:ok() then
    self.conn:close()
    self.retry_for = timeout or RECONNECT_FOR
    local ok, err, code = pg_listen(self)
    if not ok then return nil, err, code end
    return { channel = self.channel, reconnected = true }
  end
  local channel, payload, code = self.conn:wait_notify(timeout)
  if channel then return { channel = channel, payload = payload } end
  if code == "ETIMEDOUT" then return wait_timeout(timeout) end
  if code == "ECONNRESET" then return self:wait(timeout) end
  return nil, payload, code
end

function Listener:close()
  if self.closed then return true end
  self.closed = true
  self.db.listeners[self] = nil
  if self.conn then self.conn:close() end
  if self.waiter then self.waiter:wake(false) end
  return true
end

return M
