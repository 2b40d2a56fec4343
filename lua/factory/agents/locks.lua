-- factory.agents.locks: file locks for parallel objectives on one repository, in the
-- store's `locks` table, so that two agents never silently overwrite each other.
--
--   locks.acquire(db, { repo =, path =, owner =, ttl =, supervisor =, run_id =, process = })
--       -> true, "acquired" | "extended" | "taken over"
--        | nil, "ECONFLICT: PATH is locked by OWNER until TIME (UTC)", "ECONFLICT", holder
--     repo: the repository's id or path (the main repository, not a worktree: every
--       worktree of one repository shares its locks); path: relative to the
--       repository's top directory ("./a//b.c" and "a/b.c" are one lock).
--     owner: who holds it, the objective (e.g. "run:12/build", "objective:7").
--     ttl: seconds until the lock expires (default 3600); an expired lock, or one whose
--       `process` (a "host:pid:n" engine process id, as factory.pipeline uses) is dead
--       on this host, may be taken over. The same owner acquiring again extends it.
--     On a conflict the refusal is recorded in the same transaction: an `events` row
--     (kind "file_conflict", data { repo, path, owner = the asker, holder, expires_at })
--     and, when supervisor is given, a `mail` row from the asker to the supervisor
--     (kind "conflict", subject "file conflict: PATH", naming the file and its holder;
--     one unread mail per asker, supervisor and file, not one per attempt).
--     holder: { owner =, expires_at =, acquired_at = }.
--   locks.release(db, { repo =, path =, owner = }) -> true | nil, "ENOTHELD: ...", "ENOTHELD"
--   locks.release_all(db, owner) -> n        every file lock of owner (expired ones too)
--   locks.held(db, owner) -> { { repo, path, name, expires_at, acquired_at }, ... }
--       the owner's unexpired file locks, by name
--   locks.holder(db, { repo =, path = }) -> { owner, expires_at, acquired_at } | nil
--   locks.name(repo, path) -> "file:REPO:PATH"  (the row's name)
--   locks.keep(db, owner [, ttl]) -> stop()
--       while an objective works: every ttl/3 seconds its unexpired file locks are
--       extended to ttl again, so a lock taken early is not lost in a long attempt;
--       stop() ends it (call before release_all)
--
-- Failures are values: nil, "ECODE: message", "ECODE" (a store error keeps the
-- store's code). Misuse (missing repo/path/owner) raises.
--
-- Race-free across fibers and processes: acquisition is one transaction. On SQLite
-- db:tx is BEGIN IMMEDIATE (the write lock is taken first, so transactions queue);
-- on PostgreSQL the row is inserted with ON CONFLICT DO NOTHING and then read
-- FOR UPDATE, so two askers serialise on the row and exactly one wins.
local time = require "factory.core.time"
local fiber = require "factory.fiber"
local log = require "factory.log"
local records = require "factory.records"
local engine_id = require "factory.engine_id"


local M = {}

M.DEFAULT_TTL = 3600


local function normalize(path)
  if type(path) ~= "string" or path == "" then error("locks: path must be a non-empty string", 3) end
  local parts = {}
  for comp in path:gmatch("[^/]+") do
    if comp == ".." then
      if #parts == 0 then error("locks: path leaves the repository: " .. path, 3) end
      parts[#parts] = nil
    elseif comp ~= "." then
      parts[#parts + 1] = comp
    end
  end
  if #parts == 0 then error("locks: path names the repository itself: " .. path, 3) end
  return table.concat(parts, "/")
end

local function key(o, what)
  if type(o) ~= "table" then error(what .. ": expected a table of options", 3) end
  if type(o.repo) ~= "string" or o.repo == "" then error(what .. ": repo is required", 3) end
  local path = normalize(o.path)
  return "file:" .. o.repo .. ":" .. path, path
end

function M.name(repo, path)
  return "file:" .. repo .. ":" .. normalize(path)
end

local function utc(t)
  return os.date("!%Y-%m-%d %H:%M:%S", math.floor(t))
end

local function conflict_text(path, holder)
  return ("ECONFLICT: %s is locked by %s until %s (UTC)"):format(path, holder.owner, utc(holder.expires_at))
end

local MAX_ROUNDS = 5

function M.acquire(db, o)
  local name, path = key(o, "locks.acquire")
  if type(o.owner) ~= "string" or o.owner == "" then error("locks.acquire: owner is required", 2) end
  local ttl = tonumber(o.ttl) or M.DEFAULT_TTL
  local data = { repo = o.repo, path = path, process = o.process }
  local res, err, code = db:tx(function(tx)
    local now = time.now()
    local expires = now + ttl
    -- Bounded: a round only repeats when the row vanished between the insert and the
    -- read (released by its holder meanwhile, PostgreSQL).
    for _ = 1, MAX_ROUNDS do
      local ins = assert(tx:exec("INSERT INTO locks (name, owner, expires_at, acquired_at, data) VALUES (?, ?, ?, ?, ?)"
        .. " ON CONFLICT (name) DO NOTHING", { name, o.owner, expires, now, data }))
      if ins.changes == 1 then return { how = "acquired" } end
      local rows = assert(tx:query("SELECT owner, expires_at, acquired_at, data FROM locks WHERE name = ?"
        .. (tx.backend == "postgres" and " FOR UPDATE" or ""), { name }))
      local held = rows[1]
      if held then
        local how
        if held.owner == o.owner then
          how = "extended"
        elseif held.expires_at <= now
            or engine_id.alive_here(type(held.data) == "table" and held.data.process or nil) == false then
          how = "taken over"
        end
        if how then
          assert(tx:exec("UPDATE locks SET owner = ?, expires_at = ?, acquired_at = ?, data = ? WHERE name = ?",
            { o.owner, expires, how == "extended" and held.acquired_at or now, data, name }))
          if how == "taken over" then
            records.event(tx, o.run_id, "file_lock_taken_over",
              { repo = o.repo, path = path, owner = o.owner, previous = held.owner, expired_at = held.expires_at })
          end
          return { how = how }
        end
        -- Refused: recorded here, committed with this transaction.
        local holder = { owner = held.owner, expires_at = held.expires_at, acquired_at = held.acquired_at }
        records.event(tx, o.run_id, "file_conflict", { repo = o.repo, path = path, owner = o.owner,
          holder = held.owner, expires_at = held.expires_at, supervisor = o.supervisor })
        if o.supervisor then
          local subject = "file conflict: " .. path
          local dup = assert(tx:query("SELECT id FROM mail WHERE sender = ? AND recipient = ? AND kind = 'conflict'"
            .. " AND subject = ? AND read_at IS NULL LIMIT 1", { o.owner, o.supervisor, subject }))
          if not dup[1] then
            records.mail(tx, { sender = o.owner, recipient = o.supervisor, kind = "conflict", run_id = o.run_id,
              subject = subject,
              body = ("%s wants to edit %s in %s, but %s holds its lock until %s (UTC). The file was not"
                .. " changed; decide who goes first."):format(o.owner, path, o.repo, held.owner, utc(held.expires_at)),
              data = { repo = o.repo, path = path, holder = held.owner, expires_at = held.expires_at } })
          end
        end
        return { conflict = holder }
      end
    end
    error("EBUSY: the lock on " .. path .. " kept changing hands", 0)
  end)
  if not res then return nil, err, code end
  if res.conflict then return nil, conflict_text(path, res.conflict), "ECONFLICT", res.conflict end
  return true, res.how
end

function M.keep(db, owner, ttl)
  if type(owner) ~= "string" then error("locks.keep: owner is required", 2) end
  ttl = tonumber(ttl) or M.DEFAULT_TTL
  local beat = fiber.spawn(function()
    while true do
      fiber.sleep(ttl / 3)
      local ok, err = db:exec("UPDATE locks SET expires_at = ? WHERE owner = ? AND name LIKE 'file:%' AND expires_at > ?",
        { time.now() + ttl, owner, time.now() })
      if not ok then log.warn("locks: could not extend the file locks", { owner = owner, error = tostring(err) }) end
    end
  end)
  return function() beat:cancel("released") end
end

function M.release(db, o)
  local name, path = key(o, "locks.release")
  if type(o.owner) ~= "string" then error("locks.release: owner is required", 2) end
  local res, err, code = db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { name, o.owner })
  if not res then return nil, err, code end
  if res.changes == 0 then
    return nil, ("ENOTHELD: %s is not locked by %s"):format(path, o.owner), "ENOTHELD"
  end
  return true
end

function M.release_all(db, owner)
  if type(owner) ~= "string" then error("locks.release_all: owner is required", 2) end
  local res, err, code = db:exec("DELETE FROM locks WHERE owner = ? AND name LIKE 'file:%'", { owner })
  if not res then return nil, err, code end
  return res.changes
end

function M.held(db, owner)
  if type(owner) ~= "string" then error("locks.held: owner is required", 2) end
  local rows, err, code = db:query("SELECT name, expires_at, acquired_at, data FROM locks"
    .. " WHERE owner = ? AND name LIKE 'file:%' AND expires_at > ? ORDER BY name", { owner, time.now() })
  if not rows then return nil, err, code end
  local out = {}
  for i, r in ipairs(rows) do
    local d = type(r.data) == "table" and r.data or {}
    out[i] = { name = r.name, repo = d.repo, path = d.path, expires_at = r.expires_at, acquired_at = r.acquired_at }
  end
  return out
end

function M.holder(db, o)
  local name = key(o, "locks.holder")
  local rows, err, code = db:query("SELECT owner, expires_at, acquired_at FROM locks WHERE name = ? AND expires_at > ?",
    { name, time.now() })
  if not rows then return nil, err, code end
  return rows[1]
end

return M
