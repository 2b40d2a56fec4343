-- factory.db.migrations: brings a database's schema up to date.
--
--   migrate(db [, list]) -> { version =, applied = { {version=, name=}, ... } } | nil, err, code
--   status(db [, list])  -> { version =, latest =, pending = { {version=, name=}, ... },
--                             newer = bool } | nil, err, code
--   list: the migrations (default factory.db.schema).
--
-- Each migration runs in its own transaction together with its row in
-- schema_migrations, so a failure leaves the database exactly as before that
-- migration (DDL is transactional on both backends). Each transaction re-reads the
-- version under a lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so
-- processes migrating at once apply every migration exactly once. A database whose
-- version is newer than the newest migration known here is left untouched:
-- "ESCHEMA: schema version N is newer than this factory (knows M)".
local schema = require "factory.db.schema"
local time = require "factory.core.time"

local M = {}

-- Arbitrary, fixed: the advisory lock all factories take to migrate.
local LOCK_KEY = 0x46414354

local CREATE = {
  sqlite = "CREATE TABLE IF NOT EXISTS schema_migrations"
    .. " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)",
  postgres = "CREATE TABLE IF NOT EXISTS schema_migrations"
    .. " (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
}

local function latest(list)
  local v = 0
  for _, m in ipairs(list) do v = math.max(v, m.version) end
  return v
end

local function newer_error(version, known)
  return nil, ("ESCHEMA: schema version %d is newer than this factory (knows %d)"):format(version, known), "ESCHEMA"
end

local function recorded_version(q)
  local rows, err, code = q:query("SELECT MAX(version) AS version FROM schema_migrations")
  if not rows then return nil, err, code end
  return rows[1].version or 0
end

-- One migration's transaction: true if applied, false if already there.
local function apply_one(tx, m, known)
  if tx.backend == "postgres" then
    local ok, err, code = tx:query("SELECT pg_advisory_xact_lock(?)", { LOCK_KEY })
    if not ok then return nil, err, code end
  end
  local ok, err, code = tx:script(CREATE[tx.backend])
  if not ok then return nil, err, code end
  local version
  version, err, code = recorded_version(tx)
  if not version then return nil, err, code end
  if version > known then return newer_error(version, known) end
  if version >= m.version then return false end
  ok, err = tx:script(m[tx.backend])
  if not ok then
    return nil, ("ESCHEMA: migration %d (%s) failed, nothing applied: %s"):format(m.version, m.name, err), "ESCHEMA"
  end
  ok, err, code = tx:exec("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
    { m.version, m.name, time.now() })
  if not ok then return nil, err, code end
  return true
end

function M.migrate(db, list)
  list = list or schema
  local known = latest(list)
  local applied = {}
  for _, m in ipairs(list) do
    local done, err, code = db:tx(apply_one, m, known)
    if done == nil then return nil, err, code end
    if done then applied[#applied + 1] = { version = m.version, name = m.name } end
  end
  local status, err, code = M.status(db, list)
  if not status then return nil, err, code end
  if status.newer then return newer_error(status.version, known) end
  return { version = status.version, applied = applied }
end

function M.status(db, list)
  list = list or schema
  local tables, err, code = db:tables()
  if not tables then return nil, err, code end
  local version = 0
  for _, name in ipairs(tables) do
    if name == "schema_migrations" then
      version, err, code = recorded_version(db)
      if not version then return nil, err, code end
    end
  end
  local pending = {}
  for _, m in ipairs(list) do
    if m.version > version then pending[#pending + 1] = { version = m.version, name = m.name } end
  end
  local known = latest(list)
  return { version = version, latest = known, pending = pending, newer = version > known }
end

return M
