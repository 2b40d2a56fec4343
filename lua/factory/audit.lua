-- factory.audit: the append-only audit log, a hash chain in the `audit` table.
--
--   audit.append(q, record) -> { seq =, hash = } | nil, err, code
--       q: a factory.db database, or a transaction (db:tx's tx) to append in the
--       caller's transaction, so the record commits or rolls back with its work.
--       record: { kind = s (required), actor = s, run_id = n, payload = string | table }
--       (a table is stored as its JSON text).
--   audit.verify(db) -> true, count | nil, "first broken link at seq N: ...", "EBROKEN"
--   audit.search(db, text [, limit]) -> { row, ... } newest first: records whose kind,
--       actor or payload contain text (case-insensitive for ASCII).
--
-- hash = SHA-256 (libcrypto, factory.core.hash) of the record's fields, each
-- length-prefixed so no two records encode alike: seq, prev_hash, kind, actor,
-- run_id, payload, created_at; prev_hash is the previous record's hash (GENESIS for
-- seq 1). Appends are serialized so the chain never forks, across processes too: the
-- previous record is read inside the appending transaction, under a lock taken first
-- (PostgreSQL: a transaction-level advisory lock; SQLite: BEGIN IMMEDIATE already
-- holds the database's write lock), once per transaction (SQLite: per commit group),
-- later appends continuing from the one before. seq is the primary key besides;
-- hash has no index (schema 6 dropped its UNIQUE one, a random page per append):
-- records are found by seq, never by hash.
local hash = require "factory.core.hash"
local json = require "factory.json"
local time = require "factory.core.time"

local M = {}

local GENESIS = ("0"):rep(64)
-- Arbitrary, fixed: the advisory lock every factory takes to append.
local LOCK_KEY = 0x41554454
local PAGE = 1000

local function text(v)
  if v == nil then return "" end
  return tostring(v)
end

-- created_at is hashed as %.17g so the double read back from either backend gives
-- the same text as the one written.
local function digest(r)
  local seq, prev, kind, actor = text(r.seq), text(r.prev_hash), text(r.kind), text(r.actor)
  local run, payload, at = text(r.run_id), text(r.payload), ("%.17g"):format(r.created_at)
  return hash.sha256(("%d:%s\n%d:%s\n%d:%s\n%d:%s\n%d:%s\n%d:%s\n%d:%s"):format(#seq, seq, #prev, prev, #kind, kind,
    #actor, actor, #run, run, #payload, payload, #at, at))
end

local function append_tx(tx, record)
  -- Under the lock the chain's end moves only by appends through here: a transaction
  -- (or SQLite commit group) takes the lock and reads the end once, and keeps the end
  -- in its memo.
  local last = tx.memo.audit_last
  if last == nil then
    if tx.backend == "postgres" then
      local ok, err, code = tx:query("SELECT pg_advisory_xact_lock(?)", { LOCK_KEY })
      if not ok then return nil, err, code end
    end
    local rows, err, code = tx:query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    if not rows then return nil, err, code end
    last = rows[1] or false
  end
  local payload = record.payload
  if type(payload) == "table" then payload = assert(json.encode(payload)) end
  local r = {
    seq = last and last.seq + 1 or 1, prev_hash = last and last.hash or GENESIS, kind = record.kind,
    actor = record.actor, run_id = record.run_id, payload = payload or "", created_at = time.now(),
  }
  r.hash = digest(r)
  local ok, err, code = tx:exec("INSERT INTO audit (seq, prev_hash, hash, kind, actor, run_id, payload, created_at)"
    .. " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    { r.seq, r.prev_hash, r.hash, r.kind, r.actor, r.run_id, r.payload, r.created_at, n = 8 })
  if not ok then return nil, err, code end
  tx.memo.audit_last = { seq = r.seq, hash = r.hash }
  return { seq = r.seq, hash = r.hash }
end

function M.append(q, record)
  if type(record) ~= "table" or type(record.kind) ~= "string" then
    error("audit.append: expected a record with a kind", 2)
  end
  if q.tx then return q:tx(append_tx, record) end
  return append_tx(q, record)
end

local function broken(seq, why)
  return nil, ("EBROKEN: first broken link at seq %d: %s"):format(seq, why), "EBROKEN"
end

function M.verify(db)
  local prev = { seq = 0, hash = GENESIS }
  while true do
    local rows, err, code = db:query("SELECT seq, prev_hash, hash, kind, actor, run_id, payload, created_at"
      .. " FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", { prev.seq, PAGE })
    if not rows then return nil, err, code end
    for _, r in ipairs(rows) do
      if r.seq ~= prev.seq + 1 then
        return broken(prev.seq + 1, ("the record is missing (the next is seq %d)"):format(r.seq))
      end
      if r.prev_hash ~= prev.hash then
        return broken(r.seq, "prev_hash does not match the hash of seq " .. prev.seq)
      end
      if digest(r) ~= r.hash then return broken(r.seq, "the record does not match its hash") end
      prev = r
    end
    if #rows < PAGE then return true, prev.seq end
  end
end

function M.search(db, text, limit)
  if type(text) ~= "string" then error("audit.search: expected a text", 2) end
  local pattern = "%" .. text:lower():gsub("[\\%%_]", "\\%0") .. "%"
  return db:query("SELECT seq, hash, kind, actor, run_id, payload, created_at FROM audit"
    .. " WHERE lower(kind) LIKE ? ESCAPE '\\' OR lower(coalesce(actor, '')) LIKE ? ESCAPE '\\'"
    .. " OR lower(payload) LIKE ? ESCAPE '\\' ORDER BY seq DESC LIMIT ?", { pattern, pattern, pattern, limit or 100 })
end

return M
