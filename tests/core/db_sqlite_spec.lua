-- Specs for the SQLite backend (core/db_sqlite.c through factory.db): the shared
-- store suite, then what only SQLite has.
local db = require "factory.db"
local sqlite = require "factory.core.db_sqlite"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local fs = require "factory.core.fs"
local json = require "factory.json"

local made = {}

-- A path in /tmp for a new database file; removed (with -wal, -shm) at the end.
local function temp_path()
  local path = os.tmpname()
  os.remove(path)
  path = path .. ".db"
  made[#made + 1] = path
  return path
end

local function cleanup()
  for _, p in ipairs(made) do
    for _, suffix in ipairs({ "", "-wal", "-shm", "-journal" }) do os.remove(p .. suffix) end
  end
  made = {}
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- A database (at path, or a new one) whose table t holds i = 1 .. n.
local function numbers(n, path)
  local d = assert(db.open("sqlite:" .. (path or temp_path())))
  assert(d:exec("CREATE TABLE t (i INTEGER)"))
  for i = 1, n do assert(d:exec("INSERT INTO t (i) VALUES (?)", { i })) end
  return d
end

after_each(cleanup)

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
local cases = assert(loadfile(here .. "/db_store_cases.lua"))
setfenv(cases, getfenv(1))
local suite, ticks_during = cases()
suite("sqlite", function() return "sqlite:" .. temp_path() end)

describe("sqlite backend", function()
  it("opens in WAL mode with synchronous=NORMAL (factory syncs the WAL itself) and foreign keys on", function()
    local d = assert(db.open("sqlite:" .. temp_path()))
    assert.equal("wal", d:query("PRAGMA journal_mode")[1].journal_mode)
    assert.equal(1, d:query("PRAGMA synchronous")[1].synchronous)
    assert.equal(1, d:query("PRAGMA foreign_keys")[1].foreign_keys)
    assert(d:script("CREATE TABLE p (id INTEGER PRIMARY KEY); CREATE TABLE c (p INTEGER REFERENCES p (id))"))
    local ok, _, code = d:exec("INSERT INTO c (p) VALUES (?)", { 42 })
    assert.is_nil(ok)
    assert.equal("ECONSTRAINT", code)
    d:close()
  end)

  it("a commit is on disk before its writer returns: db:tx, db:exec and db:script wait for the WAL's sync", function()
    local d = assert(db.open("sqlite:" .. temp_path()))
    local conn = d.entries[1].conn
    local function writes(label, fn)
      local before = conn:sync_stats()
      assert(fn(), label)
      local after = conn:sync_stats()
      assert.truthy(after.commits > before.commits, label .. ": committed")
      assert.equal(after.commits, after.synced, label .. ": synced")
      assert.truthy(after.syncs > before.syncs, label .. ": a sync ran")
    end
    -- Outside any fiber (synced inline) and in one (on the pool).
    writes("script", function() return d:script("CREATE TABLE t (i INTEGER)") end)
    writes("exec", function() return d:exec("INSERT INTO t (i) VALUES (1)") end)
    assert(fiber.join(fiber.spawn(function()
      writes("tx in a fiber", function() return d:tx(function(tx) return tx:exec("INSERT INTO t (i) VALUES (2)") end) end)
      writes("exec in a fiber", function() return d:exec("INSERT INTO t (i) VALUES (3)") end)
      writes("script in a fiber", function() return d:script("CREATE TABLE u (i INTEGER)") end)
      -- PRAGMA wal_autocheckpoint would replace the hook that counts commits.
      assert(d:exec("PRAGMA wal_autocheckpoint = 500"))
      writes("tx after PRAGMA wal_autocheckpoint", function()
        return d:tx(function(tx) return tx:exec("INSERT INTO t (i) VALUES (4)") end)
      end)
      -- A read commits nothing and syncs nothing.
      local before = conn:sync_stats()
      assert(d:query("SELECT COUNT(*) AS n FROM t"))
      assert.same(before, conn:sync_stats())
    end)))
    d:close()
  end)

  it("concurrent transactions share syncs, and each returns with its work on disk", function()
    local d = assert(db.open("sqlite:" .. temp_path()))
    assert(d:script("CREATE TABLE t (i INTEGER)"))
    local conn = d.entries[1].conn
    local before = conn:sync_stats()
    local fibers = {}
    for k = 1, 40 do
      fibers[k] = fiber.spawn(function()
        assert(d:tx(function(tx) return tx:exec("INSERT INTO t (i) VALUES (?)", { k }) end))
        -- This fiber's commit is among those synced when it returns.
        local st = conn:sync_stats()
        return st.synced >= before.commits + 1
      end)
    end
    local ok, outcomes = fiber.all(fibers, 30)
    assert.truthy(ok)
    for _, o in ipairs(outcomes) do assert.equal(true, o[1]) end
    local after = conn:sync_stats()
    assert.equal(after.commits, after.synced)
    assert.truthy(after.syncs - before.syncs < 40, "syncs are shared: " .. (after.syncs - before.syncs))
    assert.equal(40, d:query("SELECT COUNT(*) AS n FROM t")[1].n)
    d:close()
  end)

  it("closing while a sync is in flight settles its writer and frees the connection once it ends", function()
    local path = temp_path()
    local committed = 0
    for round = 1, 10 do
      local d = assert(db.open("sqlite:" .. path))
      assert(d:exec("CREATE TABLE IF NOT EXISTS t (i INTEGER)"))
      local conn = d.entries[1].conn
      local before = conn:sync_stats()
      local writers = {}
      for k = 1, round do
        writers[k] = fiber.spawn(function()
          return d:tx(function(tx) return tx:exec("INSERT INTO t (i) VALUES (?)", { k }) end) ~= nil
        end)
      end
      -- Close as soon as a commit is made and not yet synced: its writer is waiting
      -- for a sync that is running.
      local st = conn:sync_stats()
      while st.commits == before.commits or st.synced == st.commits do
        fiber.yield()
        st = conn:sync_stats()
      end
      d:close()
      local _, outcomes = fiber.all(writers, 30)
      for _, o in ipairs(outcomes) do
        assert.truthy(o.ok, tostring(o[1]))
        if o[1] then committed = committed + 1 end
      end
    end
    -- Every row a writer was told committed is in the file.
    assert.truthy(committed > 0)
    local d = assert(db.open("sqlite:" .. path))
    assert.truthy(d:query("SELECT COUNT(*) AS n FROM t")[1].n >= committed)
    d:close()
  end)

  it("a WAL deleted under the database fails every commit after, saying what may be lost", function()
    local path = temp_path()
    local d = assert(db.open("sqlite:" .. path))
    assert(fiber.join(fiber.spawn(function()
      assert(d:exec("CREATE TABLE t (i INTEGER)"))
      assert(d:tx(function(tx) return tx:exec("INSERT INTO t (i) VALUES (1)") end))
      assert(os.remove(path .. "-wal"))
      local ok, err, code = d:tx(function(tx) return tx:exec("INSERT INTO t (i) VALUES (2)") end)
      assert.is_nil(ok)
      assert.equal("EIO", code)
      assert.contains(path .. "-wal", err)
      assert.contains("may be lost", err)
      ok, err, code = d:exec("INSERT INTO t (i) VALUES (3)")
      assert.is_nil(ok)
      assert.equal("EIO", code)
    end)))
    d:close()
  end)

  it("full-text indexes fed one row per transaction stay a few segments (crisismerge 2)", function()
    local d = assert(db.open("sqlite:" .. temp_path()))
    assert(d:migrate())
    for i = 1, 20 do
      assert(d:exec("INSERT INTO memory_facts (bank, content, created_at, updated_at) VALUES (?, ?, ?, ?)",
        { "b", "fact number " .. i, i, i }))
    end
    assert.same({ { v = 2 } }, d:query("SELECT v FROM memory_facts_fts_config WHERE k = 'crisismerge'"))
    assert.same({ { v = 2 } }, d:query("SELECT v FROM learnings_fts_config WHERE k = 'crisismerge'"))
    -- The averages and structure records, and the leaves of at most a few segments
    -- (FTS5's defaults leave one segment per transaction here, over 20 rows).
    assert.truthy(d:query("SELECT COUNT(*) AS n FROM memory_facts_fts_data")[1].n <= 6)
    assert.equal(20, #d:query("SELECT rowid FROM memory_facts_fts WHERE memory_facts_fts MATCH 'fact'"))
    d:close()
  end)

  it("a transaction whose savepoint saves about 100 KiB of pages keeps that journal in memory, not in a file",
    function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "long readlink(const char *path, char *buf, size_t size);")
    -- The files this process has open that SQLite made as temporary journals.
    local function temp_journals()
      local out, buf = {}, ffi.new("char[4096]")
      for _, name in ipairs(assert(fs.list("/proc/self/fd"))) do
        local n = tonumber(ffi.C.readlink("/proc/self/fd/" .. name, buf, 4096))
        if n > 0 and ffi.string(buf, n):find("etilqs_", 1, true) then out[#out + 1] = ffi.string(buf, n) end
      end
      return out
    end
    local d = numbers(0)
    assert(d:exec("ALTER TABLE t ADD COLUMN v BLOB"))
    assert(d:tx(function(tx)
      for i = 1, 50 do assert(tx:exec("INSERT INTO t (i, v) VALUES (?, randomblob(2000))", { i })) end
      return true
    end))
    assert.same({}, assert(d:tx(function(tx)
      -- About 25 pages that existed before: each is saved (4 KiB) for the member's
      -- savepoint, some 100 KiB; SQLite's default moves that to a file past 64 KiB.
      assert(tx:exec("UPDATE t SET v = randomblob(2000)"))
      return temp_journals()
    end)))
    d:close()
  end)

  it("a transaction that journals megabytes of pages moves that journal to a file and commits", function()
    -- As `factory run --file` stores a work item of a few MiB (a pasted log) and then its
    -- run. A journal held in one chunk larger than SQLite's unix VFS writes at once
    -- (128 KiB) failed there as "ENOSPC: database or disk is full".
    local d = assert(db.open("sqlite:" .. temp_path()))
    assert(d:exec("CREATE TABLE item (id INTEGER PRIMARY KEY, body TEXT)"))
    assert(d:exec("CREATE TABLE run (id INTEGER PRIMARY KEY, item INTEGER REFERENCES item (id), data TEXT)"))
    local big = string.rep("a line of a pasted log\n", 120000)
    local id = assert(d:tx(function(tx)
      local item = assert(tx:exec("INSERT INTO item (body) VALUES (?) RETURNING id", { big })).last_id
      return assert(tx:exec("INSERT INTO run (item, data) VALUES (?, ?) RETURNING id", { item, { anchor = big } }))
        .last_id
    end))
    assert.same({ { n = #big } }, d:query("SELECT length(body) AS n FROM item WHERE id = 1"))
    assert.equal(big, json.decode(d:query("SELECT data FROM run WHERE id = ?", { id })[1].data).anchor)
    d:close()
  end)

  it("a missing directory is a one-line ENOENT naming it, and is not created", function()
    local dir = temp_path() .. ".d"
    local d, err, code = db.open("sqlite:" .. dir .. "/factory.db")
    assert.is_nil(d)
    assert.equal("ENOENT", code)
    assert.equal("ENOENT: " .. dir .. "/factory.db: the directory does not exist", err)
    assert.is_nil(io.open(dir .. "/factory.db"))
    assert.is_nil(io.open(dir))
  end)

  it("a file that is not a SQLite database is a one-line ENOTDB, and is left as it was", function()
    local path = temp_path()
    local junk = ("this is not a database\n"):rep(200)
    local f = assert(io.open(path, "wb"))
    f:write(junk)
    f:close()
    local d, err, code = db.open("sqlite:" .. path)
    assert.is_nil(d)
    assert.equal("ENOTDB", code)
    assert.equal("ENOTDB: " .. path .. ": the file is not a SQLite database", err)
    assert.equal(junk, read_file(path))
  end)

  it("a second connection's write waits for the first one's transaction (busy timeout), off the loop", function()
    local path = temp_path()
    local a = assert(db.open("sqlite:" .. path))
    local b = assert(db.open("sqlite:" .. path))
    assert(a:exec("CREATE TABLE t (x INTEGER)"))
    local holder = fiber.spawn(function()
      return a:tx(function(tx)
        assert(tx:exec("INSERT INTO t (x) VALUES (?)", { 1 }))
        fiber.sleep(0.3)
        return true
      end)
    end)
    fiber.sleep(0.05)
    local ticks = ticks_during(function() assert(b:exec("INSERT INTO t (x) VALUES (?)", { 2 })) end)
    assert.truthy(fiber.join(holder))
    assert.truthy(ticks >= 10, "the loop ran while waiting (" .. ticks .. " ticks)")
    assert.equal(2, #b:query("SELECT x FROM t"))
    a:close()
    b:close()
  end)

  it("a lock still held after the busy timeout is EBUSY naming the file and the wait", function()
    local path = temp_path()
    local a = assert(sqlite.open(path))
    local b = assert(sqlite.open(path, { busy_timeout_ms = 50 }))
    assert(a:script("CREATE TABLE t (x INTEGER); BEGIN IMMEDIATE; INSERT INTO t (x) VALUES (1)"))
    local ok, err, code = b:script("INSERT INTO t (x) VALUES (2)")
    assert.is_nil(ok)
    assert.equal("EBUSY", code)
    assert.equal("EBUSY: " .. path .. ": database is locked (another connection held the lock for over 50 ms)", err)
    assert(a:script("COMMIT"))
    assert(b:script("INSERT INTO t (x) VALUES (2)"))
    a:close()
    b:close()
  end)

  it("runs inline outside a fiber (a plain coroutine)", function()
    local path = temp_path()
    local result
    coroutine.wrap(function()
      local c = assert(sqlite.open(path))
      assert(c:script("CREATE TABLE t (x INTEGER); INSERT INTO t (x) VALUES (5)"))
      result = c:run("SELECT x FROM t", {}, 0)
      c:close()
    end)()
    assert.same({ { x = 5 } }, result)
  end)

  it("a fiber cancelled while its statement runs leaves the connection usable", function()
    local d = assert(db.open("sqlite:" .. temp_path()))
    local f = fiber.spawn(function()
      return d:query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000)"
        .. " SELECT COUNT(*) AS n FROM c")
    end)
    fiber.sleep(0.01)
    f:cancel("test")
    assert.equal(1, d:query("SELECT 1 AS one")[1].one)
    d:close()
  end)

  it("reads queued behind a long one run together, each with its own rows or error; a cancelled one is dropped",
    function()
    local d = numbers(6)
    local slow = fiber.spawn(function()
      return d:query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000)"
        .. " SELECT COUNT(*) AS n FROM c")
    end)
    fiber.yield()
    local readers = {}
    for k = 1, 6 do
      readers[k] = fiber.spawn(function()
        if k == 3 then return d:query("SELECT nope FROM t") end
        if k == 4 then return d:queries({ { "SELECT i FROM t WHERE i > ?", { 9 } },
                                          { "SELECT i FROM t", if_rows = 1 }, { "SELECT COUNT(*) AS n FROM t" } }) end
        return d:query("SELECT i FROM t WHERE i <= ? ORDER BY i", { k })
      end)
    end
    readers[5]:cancel("test")
    local _, outcomes = fiber.all(readers, 10)
    for k, o in ipairs(outcomes) do
      if k == 3 then
        assert.is_nil(o[1])
        assert.equal("ESQL", o[3])
      elseif k == 4 then
        assert.same({ {}, {}, { { n = 6 } } }, o[1])
      elseif k == 5 then
        assert.falsy(o.ok)
      else
        assert.truthy(o.ok, tostring(o[1]))
        assert.equal(k, #o[1])
        assert.equal(k, o[1][k].i)
      end
    end
    local sok, rows = fiber.join(slow)
    assert.truthy(sok)
    assert.equal(300000, rows[1].n)
    d:close()
  end)

  -- Whether fn, run in this fiber, yielded (a fiber spawned before it then ran), and
  -- what it returned.
  local function yielded(fn)
    local ran = false
    local other = fiber.spawn(function() ran = true end)
    local out = { fn() }
    local did = ran
    fiber.join(other)
    return did, out
  end

  -- Runs fn until a run of it does not yield, at most 20 times (a statement's first
  -- runs can be slow: its average has to come down first); returns the last results.
  local function until_inline(fn)
    for _ = 1, 20 do
      local did, out = yielded(fn)
      if not did then return out end
    end
    error("never ran inline in 20 runs", 2)
  end

  it("a read that ran quickly before runs inline, without a pool round trip; a slow one stays on the pool",
    function()
    local d = numbers(3)
    local quick = "SELECT i FROM t WHERE i >= ? ORDER BY i"
    local first, rows = yielded(function() return d:query(quick, { 2 }) end)
    assert.truthy(first, "a statement's first run is on the pool")
    assert.same({ { i = 2 }, { i = 3 } }, rows[1])
    assert.same({ { i = 3 } }, until_inline(function() return d:query(quick, { 3 }) end)[1])
    -- inline, a read still sees what was committed since
    assert(d:exec("INSERT INTO t (i) VALUES (?)", { 4 }))
    assert.same({ { i = 3 }, { i = 4 } }, select(2, yielded(function() return d:query(quick, { 3 }) end))[1])
    local _, bad = yielded(function() return d:query("SELECT nope FROM t") end)
    assert.equal("ESQL", bad[3])
    local slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000)"
      .. " SELECT COUNT(*) AS n FROM c"
    for _ = 1, 2 do
      local on_pool, out = yielded(function() return d:query(slow) end)
      assert.truthy(on_pool, "a read that takes milliseconds never runs inline")
      assert.equal(200000, out[1][1].n)
    end
    d:close()
  end)

  it("a quick batch runs inline until a read of it that never ran has to run: that batch goes to the pool",
    function()
    local d = numbers(3)
    local function batch(min)
      return d:queries({ { "SELECT i FROM t WHERE i > ? ORDER BY i", { min } },
                         { "SELECT COUNT(*) AS n FROM t", if_rows = 1 }, { "SELECT MAX(i) AS m FROM t" } })
    end
    local on_pool, out = yielded(function() return batch(9) end)
    assert.truthy(on_pool)
    assert.same({ {}, {}, { { m = 3 } } }, out[1])
    -- the conditional read that never ran is not needed: inline
    assert.same({ {}, {}, { { m = 3 } } }, until_inline(function() return batch(9) end)[1])
    on_pool, out = yielded(function() return batch(2) end)
    assert.truthy(on_pool, "the conditional read has to run and never ran: on the pool")
    assert.same({ { { i = 3 } }, { { n = 3 } }, { { m = 3 } } }, out[1])
    assert.same({ { { i = 2 }, { i = 3 } }, { { n = 3 } }, { { m = 3 } } },
                until_inline(function() return batch(1) end)[1])
    d:close()
  end)

  it("a fiber making quick reads in a loop still lets the others run", function()
    local d = numbers(1)
    local done, turns = false, 0
    local other = fiber.spawn(function()
      while not done do
        turns = turns + 1
        fiber.yield()
      end
    end)
    local inline = 0
    for _ = 1, 3000 do
      local before = turns
      assert.equal(1, d:query("SELECT i FROM t")[1].i)
      if turns == before then inline = inline + 1 end
    end
    done = true
    fiber.join(other)
    -- the first read ran on the pool; of the others, some had to yield for the
    -- other fiber to run (inline reads share the loop thread's time with it)
    assert.truthy(inline > 0, "reads ran inline")
    assert.truthy(3000 - inline >= 10, (3000 - inline) .. " of the reads let the other fiber run")
    d:close()
  end)

  it("a quick read that finds the database locked goes to the pool and waits there (busy timeout)", function()
    local path = temp_path()
    local d = numbers(1, path)
    local quick = "SELECT COUNT(*) AS n FROM t"
    until_inline(function() return d:query(quick) end)
    -- Another process recovering the WAL index: every read of the others is
    -- SQLITE_BUSY until it lets go.
    local holder = assert(proc.spawn{ argv = { "python3", "tests/tools/wal_recovery_lock.py", path, "0.3" },
                                      env = { PATH = os.getenv("PATH") }, stderr = "inherit" })
    assert.equal("locked", holder:read_line("stdout"))
    local ticks, waited = ticks_during(function() return yielded(function() return d:query(quick) end) end)
    local on_pool, out = waited[1], waited[2]
    assert.equal(0, holder:wait().code)
    assert.truthy(on_pool, "the busy read waited on the pool")
    assert.same({ { n = 1 } }, out[1], tostring(out[2]))
    assert.truthy(ticks >= 10, "the loop ran while the read waited (" .. ticks .. " ticks)")
    assert.same({ { n = 1 } }, until_inline(function() return d:query(quick) end)[1], "and then inline again")
    d:close()
  end)

  it("a read where the fiber cannot wait (in a C call that runs Lua) runs inline, or says why it cannot", function()
    local d = numbers(3)
    -- table.sort's comparator is called from C: no yield there, so the read runs at once.
    local list = { 2, 1 }
    table.sort(list, function(a, b) return a + d:query("SELECT 0 AS z")[1].z < b end)
    assert.same({ 1, 2 }, list)
    -- While another fiber's read holds the connection, it cannot run, nor wait: a
    -- clear error, and the process goes on.
    local slow = fiber.spawn(function()
      return d:query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000)"
        .. " SELECT COUNT(*) AS n FROM c")
    end)
    fiber.sleep(0.005)
    local ok, err = pcall(table.sort, { 2, 1 }, function(a, b) return #d:query("SELECT i FROM t") + a < b end)
    assert.equal(false, ok)
    assert.contains("this call cannot wait for it", err)
    local joined, rows = fiber.join(slow)
    assert.truthy(joined)
    assert.equal(3000000, rows[1].n)
    d:close()
  end)

  it("a closed database refuses further use with ECLOSED", function()
    local d = assert(db.open("sqlite:" .. temp_path()))
    d:close()
    local rows, err, code = d:query("SELECT 1 AS one")
    assert.is_nil(rows)
    assert.equal("ECLOSED", code)
    assert.matches("closed", err)
  end)
end)
