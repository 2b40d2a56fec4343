-- Specs for the PostgreSQL backend (core/db_pg.c through factory.db) against a
-- throwaway server started by tests/tools/pg.sh: the shared store suite, the bad-input
-- acceptance cases, and what only PostgreSQL has (pool, reconnect, LISTEN). If the
-- server cannot be started these specs fail; they never skip.
local db = require "factory.db"
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local log = require "factory.log"
local server = require "tests.tools.pg"

local admin -- a superuser connection, for ending sessions

local function admin_db()
  if not admin then admin = assert(db.open(server.start().admin_url)) end
  return admin
end

local fresh = server.fresh

-- Ends the test role's sessions (those running a statement LIKE pattern), as a
-- server restart would, and waits until they are gone and our side has seen it.
local function terminate_sessions(pattern)
  local adm = admin_db()
  local sql = " FROM pg_stat_activity WHERE usename = ? AND pid <> pg_backend_pid() AND query LIKE ?"
  local params = { "factory", pattern or "%" }
  local rows = assert(adm:query("SELECT pg_terminate_backend(pid) AS ok" .. sql, params))
  for _ = 1, 100 do
    if assert(adm:query("SELECT COUNT(*) AS n" .. sql, params))[1].n == 0 then break end
    fiber.sleep(0.02)
  end
  fiber.sleep(0.05)
  return #rows
end

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
local cases = assert(loadfile(here .. "/db_store_cases.lua"))
setfenv(cases, getfenv(1))
cases()("postgres", fresh)

local function one_line_error(code, pattern, d, err, got)
  assert.is_nil(d)
  assert.equal(code, got)
  assert.matches(pattern, err)
  assert.falsy(err:find("\n"), "one line: " .. err)
end

-- The server goes away for d: its sessions end and the server stops answering, so
-- that reconnecting waits, retrying; the function returned brings it back.
local function away(d, setup_sql)
  assert(d:exec(setup_sql or "SELECT 1"))
  terminate_sessions()
  local pid = server.postmaster_pid()
  os.execute("kill -STOP " .. pid)
  return function() os.execute("kill -CONT " .. pid) end
end

describe("postgres backend", function()
  it("a malformed postgres:// URL is a one-line EURL naming what is wrong", function()
    local bad = {
      { "postgres://factory:s3cret@127.0.0.1:port/factory", "port 'port' is not a number" },
      { "postgres://factory:s3cret@127.0.0.1:99999/factory", "port '99999' is not a number from 1 to 65535" },
      { "postgres://factory:s3%ZZcret@127.0.0.1/factory", 'invalid percent%-encoded token: "%*%*%*"' },
      { "postgres://factory@127.0.0.1/factory?sslmode", 'missing key/value separator "=" in URI query parameter: "sslmode"' },
      { "postgres://factory@127.0.0.1/factory?pool=0", "pool must be a number from 1 to 64" },
      { "postgres://factory@127.0.0.1/fac/tory", "the database name contains '/'" },
      { "mysql://factory@127.0.0.1/factory", "unsupported database URL" },
    }
    for _, c in ipairs(bad) do
      local d, err, code = db.open(c[1])
      one_line_error("EURL", c[2], d, err, code)
      assert.falsy(err:find("s3cret", 1, true), "the password leaked: " .. err)
    end
  end)

  it("a wrong password is a one-line EAUTH that does not show the password", function()
    local s = server.start()
    local url = ("postgres://factory:Wr0ngPassw0rd@127.0.0.1:%s/factory"):format(s.port)
    local d, err, code = db.open(url)
    one_line_error("EAUTH", "^EAUTH: cannot connect to postgres://factory@127%.0%.0%.1:%d+/factory: .*"
      .. "password authentication failed for user \"factory\"", d, err, code)
    assert.falsy(err:find("Wr0ngPassw0rd", 1, true), "the password leaked: " .. err)
  end)

  it("an unknown option is refused by libpq's URI parser; a bad option value when connecting", function()
    local s = server.start()
    local d, err, code = db.open(s.url .. "?bogus_option=1")
    one_line_error("EURL", 'invalid URI query parameter: "bogus_option"$', d, err, code)
    assert.falsy(err:find("factory-test", 1, true), "the password leaked: " .. err)
    d, err, code = db.open(s.url .. "?sslmode=bogus")
    one_line_error("EINVAL", 'invalid sslmode value: "bogus"', d, err, code)
  end)

  it("conninfo returns the keywords a URI sets, or libpq's message", function()
    local pg = require "factory.core.db_pg"
    assert.same({ user = "u", password = "p@ss", host = "/tmp/pg", port = "5433", dbname = "db", sslmode = "disable" },
      pg.conninfo("postgresql://u:p%40ss@%2Ftmp%2Fpg:5433/db?sslmode=disable"))
    assert.same({}, pg.conninfo("postgres://"))
    local t, err = pg.conninfo("postgres://h/db?nope=1")
    assert.is_nil(t)
    assert.equal('invalid URI query parameter: "nope"', err)
    t, err = pg.conninfo("postgres://h/d\0b")
    assert.is_nil(t)
    assert.equal("the URI contains a NUL byte", err)
  end)

  it("a refused connection and an unknown database are one-line errors", function()
    local s = server.start()
    local d, err, code = db.open("postgres://factory:pw@127.0.0.1:1/factory")
    one_line_error("ECONNREFUSED", "^ECONNREFUSED: cannot connect to postgres://factory@127%.0%.0%.1:1/factory: "
      .. ".*Connection refused", d, err, code)
    d, err, code = db.open(s.url:gsub("/factory$", "/nosuchdb"))
    one_line_error("ECONNECT", "database \"nosuchdb\" does not exist", d, err, code)
  end)

  it("a server that does not answer times out after connect_timeout", function()
    local s = server.start()
    local pid = server.postmaster_pid()
    os.execute("kill -STOP " .. pid)
    local ok, d, err, code = pcall(db.open, s.url .. "?connect_timeout=0.3")
    os.execute("kill -CONT " .. pid)
    assert.truthy(ok, d)
    one_line_error("ETIMEDOUT", "^ETIMEDOUT: cannot connect to postgres://factory@127%.0%.0%.1:%d+/factory: "
      .. "no answer within 0%.3 s$", d, err, code)
  end)

  it("connects over the UNIX socket and resolves host names", function()
    local s = server.start()
    local d = assert(db.open(s.socket_url))
    assert.equal(1, d:query("SELECT 1 AS one")[1].one)
    d:close()
    d = assert(db.open(("postgres://factory:factory-test@localhost:%s/factory"):format(s.port)))
    assert.equal(1, d:query("SELECT 1 AS one")[1].one)
    d:close()
  end)

  it("typed results by column type", function()
    local d = assert(db.open(fresh()))
    local row = assert(d:query("SELECT 1::int2 AS i2, 2::int4 AS i4, 3::int8 AS i8, 1.5::float4 AS f4,"
      .. " 2.25::float8 AS f8, 10.125::numeric AS n, true AS t, false AS f, 'x'::text AS s,"
      .. " '{\"a\":[1]}'::json AS j, '{\"b\":2}'::jsonb AS jb, NULL::int AS missing,"
      .. " '2024-01-02'::date AS day"))[1]
    assert.same({ i2 = 1, i4 = 2, i8 = 3, f4 = 1.5, f8 = 2.25, n = 10.125, t = true, f = false, s = "x",
      j = { a = { 1 } }, jb = { b = 2 }, day = "2024-01-02" }, row)
    d:close()
  end)

  it("the pool opens up to `pool` connections and queues the rest", function()
    local d = assert(db.open(fresh() .. "?pool=3"))
    local fibers = {}
    for i = 1, 8 do
      fibers[i] = fiber.spawn(function()
        return assert(d:query("SELECT pg_backend_pid() AS pid, pg_sleep(0.05) AS z"))[1].pid
      end)
    end
    local ok, outcomes = fiber.all(fibers, 10)
    assert.truthy(ok)
    local pids, n = {}, 0
    for _, o in ipairs(outcomes) do
      if not pids[o[1]] then n = n + 1 end
      pids[o[1]] = true
    end
    assert.equal(3, n)
    d:close()
  end)

  it("connections the server dropped are replaced; a query in flight gets ECONNRESET", function()
    local d = assert(db.open(fresh() .. "?pool=2"))
    assert(d:query("SELECT 1 AS one"))
    terminate_sessions()
    assert.equal(1, assert(d:query("SELECT 1 AS one"))[1].one)

    local slow = fiber.spawn(function() return d:query("SELECT pg_sleep(30) AS z") end)
    fiber.sleep(0.2)
    assert.truthy(terminate_sessions("SELECT pg_sleep(30)%") >= 1)
    local _, rows, err, code = fiber.join(slow, 5)
    assert.is_nil(rows)
    assert.equal("ECONNRESET", code)
    assert.falsy(err:find("\n"))
    assert.equal(1, assert(d:query("SELECT 1 AS one"))[1].one)
    d:close()
  end)

  it("nobody waits behind a statement left running by a cancelled fiber", function()
    local d = assert(db.open(fresh() .. "?pool=1"))
    local slow = fiber.spawn(function() return d:query("SELECT pg_sleep(10) AS z") end)
    fiber.sleep(0.1)
    slow:cancel("test")
    local ok, rows = fiber.with_timeout(3, function() return d:query("SELECT 2 AS two") end)
    assert.truthy(ok, "the next query waited behind the abandoned one")
    assert.equal(2, rows[1].two)
    d:close()
  end)

  it("a fiber cancelled while it reconnects leaves no broken connection behind", function()
    local d = assert(db.open(fresh() .. "?pool=1&connect_timeout=0.2"))
    -- The next query's reconnection waits, retrying, until its fiber is cancelled
    -- (a stage's timeout, say).
    local back = away(d)
    local ok = fiber.with_timeout(0.5, function() return d:query("SELECT 2 AS two") end)
    back()
    assert.falsy(ok, "the reconnection was still retrying")
    local rows = assert(d:query("SELECT 3 AS three"))
    assert.equal(3, rows[1].three)
    d:close()
  end)

  it("posted writes wait out a server that is away: the poster does not wait, and none is lost", function()
    local d = assert(db.open(fresh() .. "?pool=2&connect_timeout=0.2"))
    local function insert(tx, i) return tx:exec("INSERT INTO t (i) VALUES (?)", { i }) end
    local back = away(d, "CREATE TABLE t (i INTEGER PRIMARY KEY)")
    -- Up to max_posted writes wait; past them the poster waits for room.
    d.max_posted = 4
    local ok, took = fiber.join(fiber.spawn(function()
      local t0 = time.monotonic()
      for i = 1, 3 do d:post(insert, i) end
      return time.monotonic() - t0
    end), 5)
    local fourth = fiber.spawn(function() d:post(insert, 4) end)
    fiber.sleep(0.5)
    local waited = fourth:status() ~= "dead"
    back()
    assert.truthy(ok, tostring(took))
    assert.less(0.1, took, "seconds the poster waited")
    assert.truthy(waited, "the poster past max_posted waits")
    assert.truthy(fiber.join(fourth, 20))
    local n = 0
    local deadline = time.monotonic() + 20
    while n < 4 and time.monotonic() < deadline do
      fiber.sleep(0.1)
      local rows = d:query("SELECT COUNT(*) AS n FROM t")
      n = rows and rows[1].n or 0
    end
    assert.equal(4, n)
    -- A write after them commits after them, and the store closes with none waiting.
    d:post(insert, 5)
    assert(d:exec("INSERT INTO t (i) VALUES (?)", { 6 }))
    assert.equal(6, assert(d:query("SELECT COUNT(*) AS n FROM t"))[1].n)
    d:close()
  end, { timeout = 30 })

  it("closing while the server is away gives up on the waiting writes after 10 s, saying how many", function()
    local d = assert(db.open(fresh() .. "?pool=1&connect_timeout=0.2"))
    local back = away(d, "CREATE TABLE t (i INTEGER PRIMARY KEY)")
    local logged = {}
    log.set_console({ write = function(_, ...) logged[#logged + 1] = table.concat({ ... }) end })
    local t0 = time.monotonic()
    local ok, err = fiber.join(fiber.spawn(function()
      for i = 1, 2 do d:post(function(tx) return tx:exec("INSERT INTO t (i) VALUES (?)", { i }) end) end
      fiber.sleep(0.3)
      return d:close()
    end), 30)
    local took = time.monotonic() - t0
    log.set_console(nil)
    back()
    assert.truthy(ok, tostring(err))
    assert.less(12, took, "seconds close took")
    assert.contains("db: closing: the server has not taken the writes posted last; waiting up to 9 s more for it,"
      .. " then they are lost writes=2", table.concat(logged))
    assert.contains("db: closing with posted writes not committed", table.concat(logged))
    assert.contains("writes=2", table.concat(logged))
  end, { timeout = 30 })

  it("LISTEN delivers notifications sent from another connection and survives a reconnect", function()
    local url = fresh()
    local a, b = assert(db.open(url)), assert(db.open(url))
    local l = assert(a:listen("work"))
    assert(b:notify("work", "first"))
    assert.same({ channel = "work", payload = "first" }, assert(l:wait(5)))
    terminate_sessions()
    local n = assert(l:wait(5))
    assert.truthy(n.reconnected)
    assert(b:notify("work", "after"))
    assert.same({ channel = "work", payload = "after" }, assert(l:wait(5)))
    a:close()
    b:close()
  end)

  it("a script that ends without closing its database still exits", function()
    local host = require "factory.core.host"
    local p = assert(io.popen(("timeout 10 '%s' -e 'local d = assert(require(\"factory.db\").open(...))"
      .. " assert(d:query(\"SELECT 1 AS one\")) print(\"queried\")' '%s' 2>&1; echo \"exit=$?\"")
      :format(host.exe, fresh())))
    local out = p:read("*a")
    p:close()
    assert.equal("queried\nexit=0\n", out)
  end)

  it("stops the throwaway server at the end", function()
    if admin then admin:close() end
    admin = nil
    local dir = server.start().dir
    server.stop()
    assert.is_nil(io.open(dir .. "/data/PG_VERSION"))
  end)
end)
