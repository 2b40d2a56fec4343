-- Specs for the backend-independent parts of factory.db: URL parsing, placeholder
-- translation, the default database location and `factory db migrate|status`
-- (run as a child process, as a user would).
local dburl = require "factory.db.url"
local sqltext = require "factory.db.sql"
local env = require "factory.core.env"
local host = require "factory.core.host"

-- The schema's migrations as the db command lists them ("1 initial schema, ..."),
-- and the newest version.
local ALL_MIGRATIONS, LATEST = {}, 0
for i, m in ipairs(require "factory.db.schema") do
  ALL_MIGRATIONS[i] = ("%d %s"):format(m.version, m.name)
  LATEST = math.max(LATEST, m.version)
end

local function temp_dir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir '" .. dir .. "'") == 0)
  return dir
end

-- Runs a shell command; returns stdout, stderr, exit status.
local function sh(cmd)
  local errfile = os.tmpname()
  local p = assert(io.popen(cmd .. " 2>'" .. errfile .. "'; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  local f = assert(io.open(errfile))
  local err = f:read("*a")
  f:close()
  os.remove(errfile)
  local status = tonumber(out:match("exit=(%d+)\n$"))
  return out:gsub("exit=%d+\n$", ""), err, status
end

-- `factory db ARGS` the way cli.lua runs it (inside a fiber, exit code returned).
local function factory_db(args, prefix)
  return sh(("%s'%s' -e 'return require(\"factory.db.cli\").run({...})' %s"):format(prefix or "", host.exe, args))
end

describe("db url", function()
  it("parses the accepted forms", function()
    local good = {
      { "sqlite:/tmp/x.db", { backend = "sqlite", path = "/tmp/x.db", create_dir = false, display = "sqlite:/tmp/x.db" } },
      { "sqlite:rel/x.db", { backend = "sqlite", path = "rel/x.db", create_dir = false, display = "sqlite:rel/x.db" } },
      { "sqlite:///abs/x.db", { backend = "sqlite", path = "/abs/x.db", create_dir = false, display = "sqlite:/abs/x.db" } },
      { "postgres://u:p%40ss@db.example:6543/factory?sslmode=disable&pool=8&connect_timeout=2.5", {
        backend = "postgres", pool = 8, connect_timeout = 2.5, password = "p@ss",
        display = "postgres://u@db.example:6543/factory",
        params = { user = "u", password = "p@ss", host = "db.example", port = "6543", dbname = "factory",
          sslmode = "disable", connect_timeout = "2.5" },
      } },
      { "postgresql://%2Ftmp%2Fpg:5433/db", {
        backend = "postgres", pool = 4, connect_timeout = 10, display = "postgres:///tmp/pg:5433/db",
        params = { host = "/tmp/pg", port = "5433", dbname = "db" },
      } },
      { "postgres://[::1]:5432/db", {
        backend = "postgres", pool = 4, connect_timeout = 10, display = "postgres://[::1]:5432/db",
        params = { host = "::1", port = "5432", dbname = "db" },
      } },
      { "postgres:///db?host=/var/run/postgresql", {
        backend = "postgres", pool = 4, connect_timeout = 10, display = "postgres:///var/run/postgresql/db",
        params = { host = "/var/run/postgresql", dbname = "db" },
      } },
      { "postgres://", { backend = "postgres", pool = 4, connect_timeout = 10, display = "postgres:///", params = {} } },
      { "postgres://u@%2Ftmp%2Fpg/db", {
        backend = "postgres", pool = 4, connect_timeout = 10, display = "postgres://u@/tmp/pg/db",
        params = { user = "u", host = "/tmp/pg", dbname = "db" },
      } },
      { "postgres:///db?host=/tmp/pg&port=5433", {
        backend = "postgres", pool = 4, connect_timeout = 10, display = "postgres:///tmp/pg:5433/db",
        params = { host = "/tmp/pg", port = "5433", dbname = "db" },
      } },
      { "postgres://u:pw@[::1]:5433/db", {
        backend = "postgres", pool = 4, connect_timeout = 10, password = "pw", display = "postgres://u@[::1]:5433/db",
        params = { user = "u", password = "pw", host = "::1", port = "5433", dbname = "db" },
      } },
      -- every character that must be encoded in the user info, and a raw '?' in the
      -- password (libpq ends the user info at the '@')
      { "postgres://us%65r%40x%3A:p%2Fa%3Fs%23s%25%40?@h/db", {
        backend = "postgres", pool = 4, connect_timeout = 10, password = "p/a?s#s%@?",
        display = "postgres://user@x:@h/db",
        params = { user = "user@x:", password = "p/a?s#s%@?", host = "h", dbname = "db" },
      } },
      -- pool, anywhere in the query, is factory's and never reaches libpq
      { "postgres://h/db?sslmode=require&pool=2&application_name=factory%20worker&password=pw", {
        backend = "postgres", pool = 2, connect_timeout = 10, password = "pw", display = "postgres://h/db",
        params = { host = "h", dbname = "db", sslmode = "require", application_name = "factory worker",
          password = "pw" },
      } },
    }
    for _, c in ipairs(good) do assert.same(c[2], assert(dburl.parse(c[1])), c[1]) end
  end)

  it("refuses malformed URLs in one line naming the problem, never showing the password", function()
    local bad = {
      { "postgres://u:s3cret@h:x/db", "port 'x' is not a number from 1 to 65535" },
      { "postgres://u:s3cret@h:0/db", "port '0' is not a number" },
      { "postgres://u:s3cret@h/db#frag", "a fragment %(#%) is not allowed" },
      { "postgres://u:s3%2cret@h/db", nil },
      { "postgres://u:s3cret@h:99999/db", "port '99999' is not a number" },
      { "postgres://u:s3cret@h:5432,5433/db", "several hosts are not supported" },
      { "postgres://u:s3cret@h/db?host=h1,h2", "several hosts are not supported" },
      { "postgres://u:s3cret@h/d%zb", 'invalid percent%-encoded token: "d%%zb"' },
      { "postgres://u:s3cret%zz@h/db", 'invalid percent%-encoded token: "%*%*%*"' },
      { "postgres://u:s3cret%@h/db", 'invalid percent%-encoded token: "%*%*%*"' },
      { "postgres://u:s3cret%00@h/db", 'forbidden value %%00 in percent%-encoded value: "%*%*%*"' },
      { "postgres://u@h/db?password=s3cret%zz", 'invalid percent%-encoded token: "%*%*%*"' },
      { "postgres://u:s3%63ret@h:x/db", "port 'x' is not a number" },
      { "postgres://u:s3c@ret@h/db", "unencoded '@' after the user info: write '@' as %%40" },
      { "postgres://u:s3/cret@h:5432/db", "unencoded '@' after the user info" },
      { "postgres://u:s3/c?ret@h/db", 'missing key/value separator "=" in URI query parameter: "%*%*%*"' },
      { "postgres://u:s3cret@h/db?bogus=1&pool=2", 'invalid URI query parameter: "bogus"' },
      { "postgres://u:s3cret@h/db?pool=", "pool must be a number from 1 to 64" },
      { "postgres://u:s3cret@[::1]x/db", 'unexpected character "x" at position %d+ in URI %(expected ":" or "/"%)$' },
      { "postgres://u:s3cret@h1,h2/db", "several hosts are not supported" },
      { "postgres://u:s3cret@[::1/db", 'end of string reached when looking for matching "%]" in IPv6 host address in URI$' },
      { "postgres://u:s3cret@h/db?pool=100", "pool must be a number from 1 to 64" },
      { "postgres://u:s3cret@h/db?connect_timeout=-1", "connect_timeout must be a positive number" },
      { "postgres://u:s3cret@h/db?novalue", 'missing key/value separator "=" in URI query parameter: "novalue"' },
      { "sqlite:", "no file path after 'sqlite:'" },
      { "mysql://u:s3cret@h/db", "unsupported database URL 'mysql://u:%*%*%*@h/db' %(use sqlite:PATH or postgres://" },
      { "factory.db", "unsupported database URL 'factory.db'" },
    }
    for _, c in ipairs(bad) do
      local spec, err, code = dburl.parse(c[1])
      if c[2] then
        assert.is_nil(spec, c[1])
        assert.equal("EURL", code)
        assert.matches("^EURL: ", err)
        assert.matches(c[2], err)
        -- the password raw, decoded, or in part
        assert.falsy(err:find("cret", 1, true), "password shown: " .. err)
        assert.falsy(err:find("\n"))
      else
        assert.equal("s3,ret", spec.password)
      end
    end
  end)

  it("no URL means $FACTORY_DB, else .factory/factory.db (created on first use)", function()
    local saved = env.get("FACTORY_DB")
    env.set("FACTORY_DB", nil)
    local default = dburl.parse(nil)
    env.set("FACTORY_DB", "")
    local empty = dburl.parse("")
    env.set("FACTORY_DB", "sqlite:/tmp/from-env.db")
    local from_env = dburl.parse(nil)
    env.set("FACTORY_DB", saved)
    local want = { backend = "sqlite", path = ".factory/factory.db", create_dir = true, display = "sqlite:.factory/factory.db" }
    assert.same(want, default)
    assert.same(want, empty)
    assert.equal("/tmp/from-env.db", from_env.path)
    assert.falsy(from_env.create_dir)
  end)

  it("redacts passwords", function()
    assert.equal("postgres://u:***@h/db", dburl.redact("postgres://u:pw@h/db"))
    assert.equal("postgres://u@h/db", dburl.redact("postgres://u@h/db"))
    assert.equal("postgres://u:***@h/db?sslmode=disable&password=***&pool=2",
      dburl.redact("postgres://u:pw@h/db?sslmode=disable&password=pw2&pool=2"))
    assert.equal("postgres://u:***@h/db?user=a@b", dburl.redact("postgres://u:p?w@h/db?user=a@b"))
    -- a raw '@' or '/' in the password: all of it is hidden
    assert.equal("postgres://u:***@h/db", dburl.redact("postgres://u:p@w@h/db"))
    assert.equal("postgres://u:***@h/db", dburl.redact("postgres://u:p/w@h/db"))
    assert.equal("postgres://[::1]:5432/db", dburl.redact("postgres://[::1]:5432/db"))
  end)
end)

describe("db placeholders for PostgreSQL", function()
  it("numbers ? in order and leaves quoted text, identifiers and comments alone", function()
    local cases = {
      { "SELECT ?, ?", "SELECT $1, $2", 2 },
      { "SELECT '?', ?", "SELECT '?', $1", 1 },
      { "SELECT 'it''s ?' || ?", "SELECT 'it''s ?' || $1", 1 },
      { "SELECT E'\\'?' , ?", "SELECT E'\\'?' , $1", 1 },
      { "SELECT \"a?\" FROM t WHERE x = ?", "SELECT \"a?\" FROM t WHERE x = $1", 1 },
      { "SELECT 1 -- what?\n, ?", "SELECT 1 -- what?\n, $1", 1 },
      { "SELECT /* ? /* nested ? */ still ? */ ?", "SELECT /* ? /* nested ? */ still ? */ $1", 1 },
      { "SELECT $$ ? $$, $tag$ ? $tag$, ?", "SELECT $$ ? $$, $tag$ ? $tag$, $1", 1 },
      { "SELECT 1", "SELECT 1", 0 },
      { "SELECT 'unterminated ?", "SELECT 'unterminated ?", 0 },
    }
    for _, c in ipairs(cases) do
      local sql, n = sqltext.to_postgres(c[1])
      assert.equal(c[2], sql, c[1])
      assert.equal(c[3], n, c[1])
    end
  end)
end)

describe("db default location and the db command", function()
  it("creates .factory/factory.db under the working directory on first use", function()
    local dir = temp_dir()
    local out, err, status = sh(("cd '%s' && env -u FACTORY_DB '%s' -e '"
      .. "local d = assert(require(\"factory.db\").open()) print(d.url) d:close()'"):format(dir, host.exe))
    assert.equal(0, status, err)
    assert.equal("sqlite:.factory/factory.db\n", out)
    assert.truthy(io.open(dir .. "/.factory/factory.db"), "the database file")
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("status, migrate, migrate again", function()
    local dir = temp_dir()
    local url = "sqlite:" .. dir .. "/f.db"
    local all, latest = table.concat(ALL_MIGRATIONS, ", "), LATEST
    local out, err, status = factory_db("status --db " .. url)
    assert.equal(0, status, err)
    assert.equal(("database: %s\nschema:   version 0 of %d, %d pending: %s\n"):format(url, latest, #ALL_MIGRATIONS, all),
                 out)
    out, err, status = factory_db("migrate --db=" .. url)
    assert.equal(0, status, err)
    assert.equal(("database: %s\napplied:  %s\nschema:   version %d (up to date)\n"):format(url, all, latest), out)
    out, err, status = factory_db("migrate", "FACTORY_DB=" .. url .. " ")
    assert.equal(0, status, err)
    assert.equal(("database: %s\napplied:  nothing (already up to date)\nschema:   version %d (up to date)\n")
                 :format(url, latest), out)
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("usage errors exit 2 with one line", function()
    for _, c in ipairs({
      { "", "missing subcommand: migrate or status" },
      { "bogus", "unknown subcommand 'bogus'" },
      { "status --verbose", "unknown flag '--verbose'" },
      { "status extra", "unexpected argument 'extra'" },
      { "status --db", "--db needs a URL" },
    }) do
      local out, err, status = factory_db(c[1])
      assert.equal(2, status, c[1])
      assert.equal("", out)
      assert.contains(c[2], err)
      assert.matches("^factory db: [^\n]*\n$", err)
    end
  end)

  it("bad input exits 1 with one line naming what is wrong, and changes nothing", function()
    local dir = temp_dir()
    local f = assert(io.open(dir .. "/junk.db", "w"))
    f:write(("not a database\n"):rep(100))
    f:close()
    local newer = dir .. "/newer.db"
    local _, err, status = factory_db("migrate --db sqlite:" .. newer)
    assert.equal(0, status, err)
    _, err, status = sh(("'%s' -e 'local d = assert(require(\"factory.db\").open(...))"
      .. " assert(d:exec(\"INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)\","
      .. " { %d, \"future\", 0 })) d:close()' sqlite:%s"):format(host.exe, LATEST + 1, newer))
    assert.equal(0, status, err)
    local NEWER = ("ESCHEMA: schema version %d is newer than this factory (knows %d)"):format(LATEST + 1, LATEST)
    for _, c in ipairs({
      { "status --db sqlite:" .. dir .. "/missing/f.db", "ENOENT: " .. dir .. "/missing/f.db: the directory does not exist" },
      { "migrate --db sqlite:" .. dir .. "/junk.db", "ENOTDB: " .. dir .. "/junk.db: the file is not a SQLite database" },
      { "migrate --db 'postgres://u:s3cret@h:x/db'", "EURL: malformed database URL 'postgres://u:***@h:x/db': port 'x'" },
      { "status --db sqlite:" .. newer, NEWER },
      { "migrate --db sqlite:" .. newer, NEWER },
    }) do
      local _, e, st = factory_db(c[1])
      assert.equal(1, st, c[1])
      assert.contains("factory db: " .. c[2], e)
      assert.matches("^[^\n]*\n$", e)
    end
    assert.is_nil(io.open(dir .. "/missing"))
    local j = assert(io.open(dir .. "/junk.db"))
    assert.equal(("not a database\n"):rep(100), j:read("*a"))
    j:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)
end)
