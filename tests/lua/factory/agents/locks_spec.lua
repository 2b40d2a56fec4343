-- Specs for factory.agents.locks on SQLite and on the throwaway PostgreSQL server:
-- acquire / extend / conflict (recorded as an event and as mail to the supervisor) /
-- take-over of expired and dead holders / release; races between fibers and between
-- processes; and the lock hook of the built-in agent's tools (a refused write leaves
-- the file untouched and the model sees ECONFLICT).
local db = require "factory.db"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local time = require "factory.core.time"
local fs = require "factory.core.fs"
local host = require "factory.core.host"
local json = require "factory.json"
local router = require "factory.router"
local locks = require "factory.agents.locks"
local engine_id = require "factory.engine_id"
local tools = require "factory.agents.tools"
local builtin = require "factory.agents.builtin"

local backends = require "tests.tools.backends"
after_each(backends.cleanup)

local TOOLS = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../../tools/"

local function count(d, sql, params)
  return assert(d:query(sql, params))[1].n
end

-- A "host:pid:n" process id of a process that has exited.
local function dead_process()
  local p = assert(proc.spawn{ argv = { "/bin/true" } })
  local pid = p.pid
  p:wait()
  p:close()
  return ("%s:%d:1"):format(engine_id.HOST, pid)
end

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  local function open(pool)
    local url = fresh()
    if pool and backend == "postgres" then url = url .. (url:find("?", 1, true) and "&" or "?") .. "pool=" .. pool end
    local d = assert(db.open(url))
    assert(d:migrate())
    return d, url
  end

  describe("locks on " .. backend, function()
    it("keep extends an owner's file locks while it works, and not after stop", function()
      local d = open()
      local function expires(path)
        return assert(d:query("SELECT expires_at FROM locks WHERE name = ?", { locks.name("r1", path) }))[1].expires_at
      end
      assert(locks.acquire(d, { repo = "r1", path = "a.c", owner = "run:7/build", ttl = 0.6 }))
      assert(locks.acquire(d, { repo = "r1", path = "b.c", owner = "run:8/build", ttl = 0.6 }))
      local stop = locks.keep(d, "run:7/build", 0.6)
      fiber.sleep(1.0)
      local kept, unkept, now = expires("a.c"), expires("b.c"), time.now()
      stop()
      -- run:7's lock outlived its first expiry; run:8's, not kept, expired.
      assert.truthy(kept > now)
      assert.truthy(unkept <= now)
      fiber.sleep(0.7)
      assert.truthy(expires("a.c") <= time.now())
      assert.equal(nil, locks.holder(d, { repo = "r1", path = "a.c" }))
      d:close()
    end)

    it("acquires, extends for the same owner, refuses another owner", function()
      local d = open()
      local ok, how = locks.acquire(d, { repo = "r1", path = "src/x.c", owner = "run:1/build" })
      assert.equal(true, ok)
      assert.equal("acquired", how)
      local first = locks.holder(d, { repo = "r1", path = "src/x.c" })
      assert.equal("run:1/build", first.owner)
      assert.near(time.now() + 3600, first.expires_at, 5)

      fiber.sleep(0.02)
      ok, how = locks.acquire(d, { repo = "r1", path = "./src//x.c", owner = "run:1/build", ttl = 7200 })
      assert.equal(true, ok)
      assert.equal("extended", how)
      local again = locks.holder(d, { repo = "r1", path = "src/x.c" })
      assert.near(time.now() + 7200, again.expires_at, 5)
      assert.equal(first.acquired_at, again.acquired_at)

      local no, err, code, holder = locks.acquire(d, { repo = "r1", path = "src/x.c", owner = "run:2/build" })
      assert.is_nil(no)
      assert.equal("ECONFLICT", code)
      assert.matches("^ECONFLICT: src/x%.c is locked by run:1/build until %d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d %(UTC%)$",
                     err)
      assert.equal("run:1/build", holder.owner)
      -- Another file, or the same path in another repository, is free.
      assert.truthy(locks.acquire(d, { repo = "r1", path = "src/y.c", owner = "run:2/build" }))
      assert.truthy(locks.acquire(d, { repo = "r2", path = "src/x.c", owner = "run:2/build" }))
      d:close()
    end)

    it("records a conflict as an event and as one unread mail to the supervisor", function()
      local d = open()
      assert(locks.acquire(d, { repo = "r", path = "src/x.c", owner = "objective:A" }))
      for _ = 1, 3 do
        local ok, _, code = locks.acquire(d, { repo = "r", path = "src/x.c", owner = "objective:B",
                                               supervisor = "team:backend" })
        assert.is_nil(ok)
        assert.equal("ECONFLICT", code)
      end
      local ev = assert(d:query("SELECT kind, data FROM events WHERE kind = 'file_conflict' ORDER BY id"))
      assert.equal(3, #ev)
      assert.equal("objective:B", ev[1].data.owner)
      assert.equal("objective:A", ev[1].data.holder)
      assert.equal("src/x.c", ev[1].data.path)
      assert.equal("r", ev[1].data.repo)
      local mail = assert(d:query("SELECT sender, recipient, kind, subject, body, data FROM mail ORDER BY id"))
      assert.equal(1, #mail)
      assert.equal("objective:B", mail[1].sender)
      assert.equal("team:backend", mail[1].recipient)
      assert.equal("conflict", mail[1].kind)
      assert.equal("file conflict: src/x.c", mail[1].subject)
      assert.matches("objective:B wants to edit src/x%.c in r, but objective:A holds its lock", mail[1].body)
      assert.equal("objective:A", mail[1].data.holder)
      -- Once read, the next conflict mails again; without a supervisor only the event is written.
      assert(d:exec("UPDATE mail SET read_at = ?", { time.now() }))
      assert.is_nil(locks.acquire(d, { repo = "r", path = "src/x.c", owner = "objective:B", supervisor = "team:backend" }))
      assert.is_nil(locks.acquire(d, { repo = "r", path = "src/x.c", owner = "objective:C" }))
      assert.equal(2, count(d, "SELECT COUNT(*) AS n FROM mail"))
      assert.equal(5, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'file_conflict'"))
      -- The mail is in the audit log too.
      assert.equal(2, count(d, "SELECT COUNT(*) AS n FROM audit WHERE kind = 'mail.conflict'"))
      d:close()
    end)

    it("an expired lock, or one whose engine process is dead, is taken over", function()
      local d = open()
      assert(locks.acquire(d, { repo = "r", path = "a.c", owner = "A", ttl = 0.1 }))
      assert.is_nil(locks.acquire(d, { repo = "r", path = "a.c", owner = "B" }))
      fiber.sleep(0.15)
      assert.is_nil(locks.holder(d, { repo = "r", path = "a.c" }))
      local ok, how = locks.acquire(d, { repo = "r", path = "a.c", owner = "B" })
      assert.equal(true, ok)
      assert.equal("taken over", how)
      assert.equal("B", locks.holder(d, { repo = "r", path = "a.c" }).owner)

      assert(locks.acquire(d, { repo = "r", path = "b.c", owner = "A", process = dead_process() }))
      ok, how = locks.acquire(d, { repo = "r", path = "b.c", owner = "B" })
      assert.equal("taken over", how)
      -- A live holder process keeps its lock.
      local me = ("%s:%d:7"):format(engine_id.HOST, proc.getpid())
      assert(locks.acquire(d, { repo = "r", path = "c.c", owner = "A", process = me }))
      assert.is_nil(locks.acquire(d, { repo = "r", path = "c.c", owner = "B" }))
      assert.equal(2, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'file_lock_taken_over'"))
      d:close()
    end)

    it("releases one lock, all of an owner's, and lists what an owner holds", function()
      local d = open()
      for _, p in ipairs({ "a.c", "src/b.c", "src/c.c" }) do assert(locks.acquire(d, { repo = "r", path = p, owner = "A" })) end
      assert(locks.acquire(d, { repo = "r", path = "z.c", owner = "B" }))
      assert(d:exec("INSERT INTO locks (name, owner, expires_at) VALUES ('run:1', 'A', ?)", { time.now() + 60 }))
      local held = assert(locks.held(d, "A"))
      assert.equal(3, #held)
      assert.equal("a.c", held[1].path)
      assert.equal("r", held[1].repo)
      assert.equal("file:r:src/b.c", held[2].name)

      local ok, err, code = locks.release(d, { repo = "r", path = "z.c", owner = "A" })
      assert.is_nil(ok)
      assert.equal("ENOTHELD", code)
      assert.matches("^ENOTHELD: z%.c is not locked by A", err)
      assert.equal(true, locks.release(d, { repo = "r", path = "a.c", owner = "A" }))
      assert.equal(2, locks.release_all(d, "A"))
      assert.same({}, locks.held(d, "A"))
      -- Only file locks: the owner's other lock stays, and so does B's.
      assert.equal(1, count(d, "SELECT COUNT(*) AS n FROM locks WHERE name = 'run:1'"))
      assert.equal("B", locks.holder(d, { repo = "r", path = "z.c" }).owner)
      assert.truthy(locks.acquire(d, { repo = "r", path = "src/b.c", owner = "C" }))
      assert.error_matches(function() locks.acquire(d, { repo = "r", path = "../x", owner = "A" }) end,
                           "leaves the repository")
      assert.error_matches(function() locks.acquire(d, { repo = "r", path = "x" }) end, "owner is required")
      d:close()
    end)

    it("24 fibers asking at once: exactly one wins, every other gets a recorded conflict", function()
      local d = open(8)
      local fibers = {}
      for i = 1, 24 do
        fibers[i] = fiber.spawn(function()
          return locks.acquire(d, { repo = "r", path = "hot.c", owner = "o" .. i, supervisor = "lead" })
        end)
      end
      local all_ok, outcomes = fiber.all(fibers, 20)
      assert.truthy(all_ok)
      local won, lost, winner = 0, 0, nil
      for i, o in ipairs(outcomes) do
        if o[1] == true then
          won, winner = won + 1, "o" .. i
        else
          assert.equal("ECONFLICT", o[3])
          lost = lost + 1
        end
      end
      assert.equal(1, won)
      assert.equal(23, lost)
      assert.equal(winner, locks.holder(d, { repo = "r", path = "hot.c" }).owner)
      assert.equal(23, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'file_conflict'"))
      assert.equal(23, count(d, "SELECT COUNT(*) AS n FROM mail WHERE kind = 'conflict'"))
      d:close()
    end)

    it("6 processes asking at the same moment: exactly one wins", function()
      local d, url = open()
      local at = time.now() + 1.5
      local ps = {}
      for i = 1, 6 do
        ps[i] = assert(proc.spawn{ argv = { host.exe, TOOLS .. "lock_racer.lua", "--db", url, "--owner", "p" .. i,
                                           "--at", ("%.3f"):format(at), "--rounds", "3" } })
      end
      local won, lost = {}, 0
      for i, p in ipairs(ps) do
        assert.equal("ready", p:read_line())
        local res = p:wait(20)
        local out = p:read() or ""
        assert.equal(0, res.code, "racer " .. i .. ": " .. out .. tostring(p:read("stderr")))
        for line in out:gmatch("[^\n]+") do
          if line:match("^won") then won[i] = (won[i] or 0) + 1
          elseif line == "lost ECONFLICT" then lost = lost + 1
          else error("racer " .. i .. ": " .. line) end
        end
        p:close()
      end
      -- One process won all its rounds (acquired, then extended twice); all others lost.
      local winners = 0
      for _, n in pairs(won) do
        winners = winners + 1
        assert.equal(3, n)
      end
      assert.equal(1, winners)
      assert.equal(15, lost)
      assert.equal(1, count(d, "SELECT COUNT(*) AS n FROM locks WHERE name = 'file:race:src/x.c'"))
      assert.equal(15, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'file_conflict'"))
      assert.equal(5, count(d, "SELECT COUNT(*) AS n FROM mail WHERE kind = 'conflict'"))
      d:close()
    end)
  end)
end

describe("the tools' lock hook", function()
  local dir

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(fs.mkdir_p(dir .. "/src"))
    assert(fs.write(dir .. "/src/x.c", "int x = 1;\n"))
  end)

  after_each(function()
    assert(fs.remove(dir, { recursive = true }))
  end)

  it("asks before write_file and edit_file with the confined relative path; a refusal leaves the file", function()
    local asked = {}
    local refuse = true
    local box = assert(tools.new(dir, { lock = function(rel)
      asked[#asked + 1] = rel
      if refuse then return nil, "ECONFLICT: " .. rel .. " is locked by objective:A until then", "ECONFLICT" end
      return true
    end }))
    local v, err, code = box:write_file("./src/../src/x.c", "int x = 2;\n")
    assert.is_nil(v)
    assert.equal("ECONFLICT", code)
    assert.equal("ECONFLICT: src/x.c is locked by objective:A until then", err)
    v, err, code = box:edit_file("src/x.c", "int x = 1;", "int x = 3;")
    assert.is_nil(v)
    assert.equal("ECONFLICT", code)
    v, err, code = box:call("write_file", { path = "src/new/y.c", text = "y" })
    assert.equal("ECONFLICT", code)
    assert.equal("int x = 1;\n", fs.read(dir .. "/src/x.c"))
    assert.equal(nil, fs.exists(dir .. "/src/new") or nil)
    assert.equal(0, box.changes)
    -- Refused by confinement first: the lock is never asked for a path outside.
    v, err, code = box:write_file("../escape.c", "x")
    assert.equal("EPATH", code)
    -- An edit that cannot apply takes no lock.
    v, err, code = box:edit_file("src/x.c", "not there", "y")
    assert.equal("ENOTFOUND", code)
    assert.same({ "src/x.c", "src/x.c", "src/new/y.c" }, asked)

    refuse = false
    assert.equal("wrote 11 bytes to src/x.c", box:write_file("src/x.c", "int x = 2;\n"))
    assert.equal("edited src/x.c", box:edit_file("src/x.c", "int x = 2;", "int x = 4;"))
    assert.equal("int x = 4;\n", fs.read(dir .. "/src/x.c"))
    assert.equal(2, box.changes)
  end)

  it("a lock function that raises is an ELOCK error; a bare refusal is ECONFLICT", function()
    local box = assert(tools.new(dir, { lock = function() error("store is down") end }))
    local v, err, code = box:write_file("src/x.c", "y")
    assert.is_nil(v)
    assert.equal("ELOCK", code)
    assert.matches("^ELOCK: cannot lock src/x%.c: .*store is down", err)
    box = assert(tools.new(dir, { lock = function() return false end }))
    v, err, code = box:write_file("src/x.c", "y")
    assert.equal("ECONFLICT", code)
    assert.equal("ECONFLICT: src/x.c is locked", err)
    assert.equal("int x = 1;\n", fs.read(dir .. "/src/x.c"))
  end)
end)

describe("the built-in agent and file locks", function()
  local fake, dir, d
  local fake_model = dofile(TOOLS .. "fake_model.lua")

  before_each(function()
    fake = assert(fake_model.start())
    assert(router.configure(fake:router_config{ coder = "gpt-test" }))
    dir = os.tmpname()
    os.remove(dir)
    assert(fs.mkdir_p(dir .. "/src"))
    assert(fs.write(dir .. "/src/x.c", "int x = 1;\n"))
    d = assert(db.open(backends.sqlite_url()))
    assert(d:migrate())
  end)

  after_each(function()
    fake:close()
    d:close()
    assert(fs.remove(dir, { recursive = true }))
  end)

  local n = 0
  local function call(name, args)
    n = n + 1
    return { tool_calls = { { id = "call_" .. n, name = name, arguments = json.encode(args) } } }
  end

  it("sees ECONFLICT as the tool's result, leaves the file, and the conflict reaches the supervisor", function()
    assert(locks.acquire(d, { repo = "calc", path = "src/x.c", owner = "objective:A" }))
    fake:script{
      call("write_file", { path = "src/x.c", text = "int x = 2;\n" }),
      call("finish", { status = "BLOCKED", reasoning = "src/x.c is locked by another objective",
                       blockers = { "src/x.c is locked" } }),
    }
    local result, stats = builtin.run{ root = dir, objective = "change x", model = "coder",
      lock = function(rel)
        return locks.acquire(d, { repo = "calc", path = rel, owner = "objective:B", supervisor = "team:backend" })
      end }
    assert.equal("BLOCKED", result.status)
    assert.equal(0, stats.changes)
    local msgs = json.decode(fake:requests()[#fake:requests()].body).messages
    local seen
    for _, m in ipairs(msgs) do if m.role == "tool" then seen = seen or m.content end end
    assert.matches("^ERROR: ECONFLICT: src/x%.c is locked by objective:A until ", seen)
    assert.equal("int x = 1;\n", fs.read(dir .. "/src/x.c"))
    assert.equal(1, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'file_conflict'"))
    local mail = assert(d:query("SELECT sender, recipient FROM mail"))
    assert.same({ { sender = "objective:B", recipient = "team:backend" } }, mail)
  end)
end)
