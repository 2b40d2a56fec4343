-- Specs for factory.agents.orchestrator on a tiny git repository: two objectives in
-- parallel wanting one file (the second gets a recorded conflict); 200 agent
-- processes with grandchildren, some killed and retried, leaving no zombie, no
-- process and no worktree behind (issue 6, acceptance 4); start-up cleanup after an
-- engine process died with its agent running; the daily iteration budget; the
-- cooldown and the pool limit; retries and close.
local db = require "factory.db"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local git = require "factory.git"
local time = require "factory.core.time"
local fs = require "factory.core.fs"
local host = require "factory.core.host"
local tools = require "factory.agents.tools"
local locks = require "factory.agents.locks"
local engine_id = require "factory.engine_id"
local orchestrator = require "factory.agents.orchestrator"

local backends = require "tests.tools.backends"

local TOOLS = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../../tools/"
local PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"
local AUTHOR = { name = "Base", email = "base@factory.test" }

local root, repo_dir, wt_root

local function count(d, sql, params)
  return assert(d:query(sql, params))[1].n
end

local function git_cli(args)
  local argv = { "git" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return assert(proc.run{ argv = argv, cwd = repo_dir, env = { PATH = PATH, HOME = root, GIT_CONFIG_NOSYSTEM = "1" } })
end

before_each(function()
  root = os.tmpname()
  os.remove(root)
  repo_dir = root .. "/repo"
  wt_root = root .. "/wt"
  assert(fs.mkdir_p(repo_dir .. "/src"))
  assert(fs.write(repo_dir .. "/src/x.c", "int x = 0;\n"))
  assert(fs.write(repo_dir .. "/README", "tiny\n"))
  local r = assert(git.init(repo_dir))
  assert(r:add_all())
  assert(r:commit("tiny repository", { author = AUTHOR }))
  r:close()
end)

after_each(function()
  backends.cleanup()
  assert(fs.remove(root, { recursive = true }))
end)

-- Live (not zombie) processes in any of the groups; zombie children of this process.
local function leftovers(pgids)
  local me = proc.getpid()
  local live, zombies = {}, {}
  for _, st in ipairs(orchestrator.processes()) do
    if pgids[st.pgrp] and st.state ~= "Z" then live[#live + 1] = st.pid end
    if st.ppid == me and st.state == "Z" then zombies[#zombies + 1] = st.pid end
  end
  return live, zombies
end

local function alive(pid)
  local st = orchestrator.stat(pid)
  return st ~= nil and st.state ~= "Z"
end

local function no_worktrees()
  local r = assert(git.open(repo_dir))
  local wts = r:worktrees()
  r:close()
  assert.same({}, wts)
  assert.same({}, fs.list(wt_root) or {})
end

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  describe("orchestrator on " .. backend, function()
    it("two objectives in parallel on one repository: the second gets a recorded conflict", function()
      local d = assert(db.open(fresh()))
      assert(d:migrate())
      local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root, max_concurrent = 2 })
      local a_holds, b_tried = fiber.cond(), fiber.cond()
      local a_ready, b_done = false, false
      local seen = {}
      local function wait_for(flag_fn, c)
        for _ = 1, 100 do
          if flag_fn() then return end
          c:wait(0.1)
        end
        error("timed out waiting")
      end
      local jobs = assert(orch:run({
        { id = "A", objective = "make x one", supervisor = "team:A", agent = function(ctx)
            local box = assert(tools.new(ctx.worktree, { lock = ctx.lock }))
            assert(box:write_file("src/x.c", "int x = 1; /* A */\n"))
            a_ready = true
            a_holds:broadcast()
            wait_for(function() return b_done end, b_tried)
            seen.a_locks = locks.held(d, ctx.owner)
            return "A changed x"
          end },
        { id = "B", objective = "make x two", supervisor = "team:B", agent = function(ctx)
            wait_for(function() return a_ready end, a_holds)
            local box = assert(tools.new(ctx.worktree, { lock = ctx.lock }))
            local ok, err, code = box:write_file("src/x.c", "int x = 2; /* B */\n")
            seen.b = { ok = ok, err = err, code = code, file = fs.read(ctx.worktree .. "/src/x.c"),
                       a_file = fs.read(wt_root .. "/" .. orch.jobs[1].branch .. "/src/x.c") }
            b_done = true
            b_tried:broadcast()
            return "B blocked by A"
          end },
      }, 30))
      assert.equal("succeeded", jobs[1].status)
      assert.equal("succeeded", jobs[2].status)
      assert.equal("B blocked by A", jobs[2].value)

      -- B was refused, its copy untouched; A's file kept A's text.
      assert.is_nil(seen.b.ok)
      assert.equal("ECONFLICT", seen.b.code)
      assert.matches("^ECONFLICT: src/x%.c is locked by objective:A until ", seen.b.err)
      assert.equal("int x = 0;\n", seen.b.file)
      assert.equal("int x = 1; /* A */\n", seen.b.a_file)
      assert.equal(1, #seen.a_locks)
      assert.equal("src/x.c", seen.a_locks[1].path)
      assert.equal(repo_dir, seen.a_locks[1].repo)

      -- Recorded: the event and the mail to B's supervisor.
      local ev = assert(d:query("SELECT data FROM events WHERE kind = 'file_conflict'"))
      assert.equal(1, #ev)
      assert.equal("objective:B", ev[1].data.owner)
      assert.equal("objective:A", ev[1].data.holder)
      local mail = assert(d:query("SELECT sender, recipient, kind, subject FROM mail"))
      assert.same({ { sender = "objective:B", recipient = "team:B", kind = "conflict",
                      subject = "file conflict: src/x.c" } }, mail)

      -- A's change is committed on its branch; B's branch has no commit; main is untouched.
      assert.truthy(jobs[1].commit)
      assert.is_nil(jobs[2].commit)
      assert.equal("int x = 1; /* A */\n", git_cli({ "show", jobs[1].branch .. ":src/x.c" }).stdout)
      assert.equal("int x = 0;\n", fs.read(repo_dir .. "/src/x.c"))
      -- Locks released, worktrees and records gone.
      assert.same({}, locks.held(d, "objective:A"))
      assert.equal(0, count(d, "SELECT COUNT(*) AS n FROM locks"))
      no_worktrees()
      orch:close()
      d:close()
    end)

    it("an agent that raises, returns nil or whose process dies is retried in a fresh worktree", function()
      local d = assert(db.open(fresh()))
      assert(d:migrate())
      local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root, max_concurrent = 3,
                                            max_attempts = 3 })
      local paths = {}
      local jobs = assert(orch:run({
        { id = "raises", agent = function(ctx)
            paths[#paths + 1] = ctx.worktree
            assert.truthy(fs.exists(ctx.worktree .. "/src/x.c"))
            if ctx.attempt < 3 then error("boom " .. ctx.attempt) end
            return "third time"
          end },
        { id = "nil", agent = function(ctx)
            if ctx.attempt == 1 then return nil, "EMODEL: the model is down", "EMODEL" end
            return { ok = true }
          end },
        { id = "signal", agent = function(ctx)
            local res = assert(ctx.run{ argv = { "/bin/sh", "-c", ctx.attempt == 1 and "kill -9 $$" or "exit 0" } })
            return res
          end },
        { id = "hopeless", agent = function(ctx)
            ctx.run{ argv = { "/bin/sh", "-c", "exit 3" } }
            return "ignored: the process failed"
          end },
      }, 30))
      assert.equal("succeeded", jobs[1].status)
      assert.equal(3, jobs[1].attempts)
      assert.equal("third time", jobs[1].value)
      assert.matches("^EAGENT: the agent raised: .*boom 1", jobs[1].history[1].error)
      assert.equal(3, #paths)
      assert.truthy(paths[1] ~= paths[2] and paths[2] ~= paths[3])
      assert.equal("succeeded", jobs[2].status)
      assert.equal(2, jobs[2].attempts)
      assert.equal("EMODEL", jobs[2].history[1].code)
      assert.equal("succeeded", jobs[3].status)
      assert.equal(2, jobs[3].attempts)
      assert.matches("^EAGENT: agent process %d+ killed by signal 9$", jobs[3].history[1].error)
      assert.equal(0, jobs[3].value.code)
      assert.equal("failed", jobs[4].status)
      assert.equal(3, jobs[4].attempts)
      assert.equal("EAGENT", jobs[4].code)
      assert.matches("exited with code 3$", jobs[4].error)
      assert.equal(7, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'objective_attempt_failed'"))
      assert.equal(6, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'objective_retry'"))
      assert.equal(10, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'agent_iteration'"))
      assert.equal(4, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'objective_finished'"))
      assert.equal(0, count(d, "SELECT COUNT(*) AS n FROM locks"))
      no_worktrees()
      orch:close()
      d:close()
    end)
  end)
end

describe("orchestrator", function()
  local d

  before_each(function()
    d = assert(db.open(backends.sqlite_url()))
    assert(d:migrate())
  end)

  after_each(function()
    d:close()
  end)

  it("200 agent processes with grandchildren, some killed and retried: no zombie, no process, no worktree left",
    function()
      local started = time.monotonic()
      local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root, max_concurrent = 8,
                                            max_attempts = 3 })
      local pgids, grandchildren = {}, {}
      local running, peak = 0, 0
      local list = {}
      for i = 1, 180 do
        -- 20 objectives fail their first attempt: 10 killed by SIGKILL, 10 exit 1.
        local fail = i % 9 == 0 and ((i / 9) % 2 == 0 and "kill -9 $$" or "exit 1") or nil
        list[i] = { id = i, objective = "objective " .. i, agent = function(ctx)
          running = running + 1
          if running > peak then peak = running end
          local script = "sleep 30 & echo $$ $!; sleep 0.05; " .. ((ctx.attempt == 1 and fail) or "exit 0")
          local res, err = ctx.run{ argv = { "/bin/sh", "-c", script }, timeout = 10 }
          running = running - 1
          if not res then return nil, err end
          local pg, gc = res.stdout:match("^(%d+) (%d+)")
          pgids[tonumber(pg)] = true
          grandchildren[#grandchildren + 1] = tonumber(gc)
          return res
        end }
      end
      local jobs = assert(orch:run(list, 60))
      local retried, once = 0, 0
      for i, job in ipairs(jobs) do
        assert.equal("succeeded", job.status, "objective " .. i .. ": " .. tostring(job.error))
        if i % 9 == 0 then
          assert.equal(2, job.attempts)
          assert.matches(i / 9 % 2 == 0 and "killed by signal 9" or "exited with code 1", job.history[1].error)
          retried = retried + 1
        else
          assert.equal(1, job.attempts)
          once = once + 1
        end
      end
      assert.equal(20, retried)
      assert.equal(160, once)
      assert.truthy(peak <= 8 and peak > 1, "peak of concurrent agents: " .. peak)

      -- 200 agent processes, each its own group, each with a grandchild.
      local n = 0
      for _ in pairs(pgids) do n = n + 1 end
      assert.equal(200, n)
      assert.equal(200, #grandchildren)
      assert.equal(200, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'agent_iteration'"))
      assert.equal(20, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'objective_attempt_failed'"))

      local live, zombies = leftovers(pgids)
      assert.same({}, live)
      assert.same({}, zombies)
      for _, pid in ipairs(grandchildren) do assert.falsy(alive(pid), "grandchild " .. pid) end
      no_worktrees()
      assert.equal(0, count(d, "SELECT COUNT(*) AS n FROM locks"))
      -- The branches left: main and one per objective; the 20 failed attempts' are gone.
      local r = assert(git.open(repo_dir))
      assert.equal(181, #r:branches())
      r:close()
      orch:close()
      assert.less(40, time.monotonic() - started)
    end, { timeout = 90 })

  it("start-up cleanup kills the agents of a dead engine process and removes its worktrees", function()
    local url = backends.sqlite_url()
    local d2 = assert(db.open(url))
    assert(d2:migrate())
    -- An engine process starts an agent (with a grandchild), then dies by SIGKILL.
    local crasher = assert(proc.spawn{ argv = { host.exe, TOOLS .. "orch_crasher.lua", "--db", url, "--repo", repo_dir,
                                                "--root", wt_root } })
    local line = crasher:read_line()
    local pgid, gc, wt = tostring(line):match("^ready (%d+) (%d+) (%S+)$")
    if not pgid then
      crasher:kill(9)
      crasher:wait()
      error("the crasher said: " .. tostring(line) .. " " .. tostring(crasher:read("stderr")))
    end
    pgid, gc = tonumber(pgid), tonumber(gc)
    crasher:kill(9)
    crasher:wait()
    crasher:close()
    assert.truthy(alive(pgid))
    assert.truthy(alive(gc))
    assert.truthy(fs.exists(wt .. "/src/x.c"))
    assert.equal(1, count(d2, "SELECT COUNT(*) AS n FROM locks WHERE name LIKE 'agent:%'"))
    assert.equal(1, count(d2, "SELECT COUNT(*) AS n FROM locks WHERE name LIKE 'file:%'"))

    -- An agent group whose leader has exited but whose member lives on, recorded by a
    -- dead engine process.
    local dead_owner
    do
      local p = assert(proc.spawn{ argv = { "/bin/true" } })
      dead_owner = ("%s:%d:1"):format(engine_id.HOST, p.pid)
      p:wait()
      p:close()
    end
    local res = assert(proc.run{ argv = { "/bin/sh", "-c",
      "setsid /bin/sh -c 'sleep 60 >/dev/null 2>&1 & echo $$ $!' </dev/null" }, env = { PATH = PATH } })
    local lone_pgid, lone = res.stdout:match("^(%d+) (%d+)")
    lone_pgid, lone = tonumber(lone_pgid), tonumber(lone)
    for _ = 1, 40 do
      if not alive(lone_pgid) then break end
      fiber.sleep(0.05)
    end
    assert.falsy(alive(lone_pgid))
    assert.truthy(alive(lone))
    assert(d2:exec("INSERT INTO locks (name, owner, expires_at, data) VALUES (?, ?, ?, ?)",
      { "agent:" .. engine_id.HOST .. ":" .. lone_pgid, dead_owner, time.now() + 3600,
        { host = engine_id.HOST, pid = lone_pgid, pgid = lone_pgid, start = 1 } }))
    -- A record whose pid now names another process (different start time) spares it.
    local bystander = assert(proc.spawn{ argv = { "sleep", "30" }, env = { PATH = PATH } })
    assert(d2:exec("INSERT INTO locks (name, owner, expires_at, data) VALUES (?, ?, ?, ?)",
      { "agent:" .. engine_id.HOST .. ":" .. bystander.pid, dead_owner, time.now() + 3600,
        { host = engine_id.HOST, pid = bystander.pid, pgid = bystander.pid, start = 1 } }))

    -- Worktrees: one no record names (removed), one of a live engine (kept), one
    -- outside the root (kept), one whose directory is gone (pruned).
    local r = assert(git.open(repo_dir))
    assert(r:worktree_add("stray", wt_root .. "/stray"))
    assert(r:worktree_add("live", wt_root .. "/live"))
    assert(d2:exec("INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?)",
      { "worktree:" .. wt_root .. "/live", ("%s:%d:5"):format(engine_id.HOST, proc.getpid()), time.now() + 3600 }))
    assert(r:worktree_add("elsewhere", root .. "/elsewhere"))
    assert(r:worktree_add("gone", root .. "/gone"))
    assert(fs.remove(root .. "/gone", { recursive = true }))
    r:close()

    local orch = assert(orchestrator.new{ db = d2, repo = repo_dir, worktree_root = wt_root })
    local report = assert(orch:start())
    table.sort(report.killed)
    local want = { pgid, lone_pgid }
    table.sort(want)
    assert.same(want, report.killed)
    assert.falsy(alive(pgid))
    assert.falsy(alive(gc))
    assert.falsy(alive(lone))
    assert.truthy(alive(bystander.pid))
    table.sort(report.worktrees)
    local real_root = fs.realpath(wt_root)
    assert.same({ real_root .. "/" .. wt:match("[^/]+$"), real_root .. "/stray" }, report.worktrees)
    assert.same({ "gone" }, report.pruned)
    assert.equal(1, report.locks)
    assert.equal(4, report.records)
    assert.equal(nil, fs.exists(wt) or nil)
    local names = {}
    r = assert(git.open(repo_dir))
    for _, w in ipairs(r:worktrees()) do names[#names + 1] = w.name end
    r:close()
    table.sort(names)
    assert.same({ "elsewhere", "live" }, names)
    assert.equal(0, count(d2, "SELECT COUNT(*) AS n FROM locks WHERE name LIKE 'agent:%' OR name LIKE 'file:%'"))
    assert.equal(1, count(d2, "SELECT COUNT(*) AS n FROM events WHERE kind = 'orchestrator_cleanup'"))
    -- A second start finds nothing more to do.
    report = assert(orch:start())
    assert.same({}, report.killed)
    assert.same({}, report.worktrees)
    bystander:kill(9)
    bystander:wait()
    bystander:close()
    orch:close()
    d2:close()
  end)

  it("the daily iteration budget: an objective it cannot pay for is not started", function()
    local day = math.floor(time.now() / 86400) * 86400
    -- One iteration already spent today, one yesterday (not counted).
    assert(d:exec("INSERT INTO events (kind, data, created_at) VALUES ('agent_iteration', ?, ?)", { {}, time.now() }))
    assert(d:exec("INSERT INTO events (kind, data, created_at) VALUES ('agent_iteration', ?, ?)", { {}, day - 60 }))
    local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root, max_concurrent = 1,
                                          daily_iterations = 4, max_attempts = 3 })
    local ran = {}
    local jobs = assert(orch:run({
      { id = "one", agent = function(ctx) ran[#ran + 1] = ctx.id return true end },
      { id = "flaky", agent = function(ctx) ran[#ran + 1] = ctx.id error("flaky") end },
      { id = "three", agent = function(ctx) ran[#ran + 1] = ctx.id return true end },
    }, 30))
    -- Budget 4: one spent earlier, then "one", "flaky" (attempt 1), "three"; the retry
    -- of "flaky" finds the budget used up.
    assert.same({ "one", "flaky", "three" }, ran)
    assert.equal("succeeded", jobs[1].status)
    assert.equal("failed", jobs[2].status)
    assert.equal("EBUDGET", jobs[2].code)
    assert.equal(1, jobs[2].attempts)
    assert.equal("succeeded", jobs[3].status)

    local more = assert(orch:run({ { id = "late", agent = function() error("must not run") end } }, 30))
    assert.equal("not_started", more[1].status)
    assert.equal("EBUDGET", more[1].code)
    assert.equal(0, more[1].attempts)
    assert.matches("^EBUDGET: the daily budget of 4 agent iterations is used up %(4 today, UTC%); objective late"
      .. " not started$", more[1].error)
    assert.same({}, more[1].history)
    assert.equal(1, count(d, "SELECT COUNT(*) AS n FROM events WHERE kind = 'objective_not_started'"))
    no_worktrees()

    -- An agent process past the budget is refused too.
    local orch2 = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root, daily_iterations = 6 })
    local second
    local j = assert(orch2:run({ { id = "loop", agent = function(ctx)
      assert(ctx.run{ argv = { "/bin/true" } })        -- paid for when the attempt started
      assert(ctx.run{ argv = { "/bin/true" } })        -- the 6th iteration today
      second = { ctx.run{ argv = { "/bin/true" } } }   -- the 7th: refused
      return true
    end } }, 30))[1]
    assert.equal("succeeded", j.status)
    assert.is_nil(second[1])
    assert.equal("EBUDGET", second[3])
    orch:close()
    orch2:close()
  end)

  it("refuses bad pool limits with the setting named, instead of a silent default", function()
    for _, case in ipairs{
      { { max_concurrent = 0 }, "max_concurrent" }, { { max_concurrent = "4" }, "max_concurrent" },
      { { cooldown = -1 }, "cooldown" }, { { daily_iterations = 1.5 }, "daily_iterations" },
      { { max_attempts = 0 }, "max_attempts" },
    } do
      local o = { db = d, repo = repo_dir, worktree_root = wt_root }
      for k, v in pairs(case[1]) do o[k] = v end
      local ok, err = pcall(orchestrator.new, o)
      assert.equal(false, ok)
      assert.matches("orchestrator.new: " .. case[2], tostring(err))
    end
  end)

  it("keeps the cooldown between starts and the pool limit", function()
    local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root, max_concurrent = 2,
                                          cooldown = 0.25 })
    local starts, running, peak = {}, 0, 0
    local list = {}
    for i = 1, 5 do
      list[i] = { id = i, agent = function()
        starts[#starts + 1] = time.monotonic()
        running = running + 1
        if running > peak then peak = running end
        fiber.sleep(0.4)
        running = running - 1
        return true
      end }
    end
    local jobs = assert(orch:run(list, 30))
    for _, job in ipairs(jobs) do assert.equal("succeeded", job.status) end
    assert.equal(5, #starts)
    for i = 2, #starts do
      assert.truthy(starts[i] - starts[i - 1] >= 0.22, ("start %d came %.3f s after the one before"):format(
        i, starts[i] - starts[i - 1]))
    end
    for i = 2, #jobs do assert.truthy(jobs[i].history[1].started_at - jobs[i - 1].history[1].started_at >= 0.245) end
    assert.equal(2, peak)
    orch:close()
  end)

  it("runs the built-in agent in the objective's worktree; its change is committed on the branch", function()
    local router = require "factory.router"
    local json = require "factory.json"
    local fake = assert(dofile(TOOLS .. "fake_model.lua").start())
    assert(router.configure(fake:router_config{ coder = "gpt-test" }))
    local function call(id, name, args)
      return { tool_calls = { { id = id, name = name, arguments = json.encode(args) } } }
    end
    fake:script{
      call("c0", "write_file", { path = "README", text = "mine now\n" }),
      call("c1", "edit_file", { path = "src/x.c", old = "int x = 0;", new = "int x = 42;" }),
      call("c2", "finish", { status = "COMPLETE", reasoning = "x is 42 now", artifact = "src/x.c" }),
    }
    -- Another objective holds README: the agent is told so when it tries to write it.
    assert(locks.acquire(d, { repo = repo_dir, path = "README", owner = "objective:other" }))
    local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root })
    local job = assert(orch:run({ { id = "b1", objective = "Set x to 42", supervisor = "team:backend",
                                    agent = orchestrator.builtin{ model = "coder", max_iterations = 5 } } }, 30))[1]
    local msgs = json.decode(fake:requests()[#fake:requests()].body).messages
    fake:close()
    local first_tool
    for _, m in ipairs(msgs) do if m.role == "tool" then first_tool = first_tool or m.content end end
    assert.matches("^ERROR: ECONFLICT: README is locked by objective:other until ", first_tool)
    assert.same({ { sender = "objective:b1", recipient = "team:backend" } },
                assert(d:query("SELECT sender, recipient FROM mail")))
    assert.equal("succeeded", job.status)
    assert.equal("COMPLETE", job.value.status)
    assert.truthy(job.commit)
    assert.equal("int x = 42;\n", git_cli({ "show", job.branch .. ":src/x.c" }).stdout)
    assert.equal("tiny\n", git_cli({ "show", job.branch .. ":README" }).stdout)
    assert.equal("factory: Set x to 42\n", git_cli({ "log", "-1", "--format=%s", job.branch }).stdout)
    assert.equal("objective:other", locks.holder(d, { repo = repo_dir, path = "README" }).owner)
    assert.same({}, locks.held(d, "objective:b1"))
    no_worktrees()
    orch:close()
  end)

  it("close() kills running agents, releases their locks and removes their worktrees", function()
    local orch = assert(orchestrator.new{ db = d, repo = repo_dir, worktree_root = wt_root })
    local pid
    local job = orch:submit{ id = "long", agent = function(ctx)
      assert(ctx.lock("src/x.c"))
      local p = assert(ctx.spawn{ argv = { "/bin/sh", "-c", "sleep 30 & echo $$; wait" } })
      pid = tonumber(p:read_line())
      p:wait()
      return true
    end }
    for _ = 1, 100 do
      if pid then break end
      fiber.sleep(0.05)
    end
    assert.truthy(pid and alive(pid))
    assert.equal(1, #locks.held(d, "objective:long"))
    assert.equal(1, count(d, "SELECT COUNT(*) AS n FROM locks WHERE name LIKE 'agent:%'"))
    orch:close()
    assert.equal("failed", job.status)
    assert.equal("ECANCELED", job.code)
    for _ = 1, 40 do
      if not alive(pid) then break end
      fiber.sleep(0.05)
    end
    assert.falsy(alive(pid))
    local live = leftovers({ [pid] = true })
    assert.same({}, live)
    assert.equal(0, count(d, "SELECT COUNT(*) AS n FROM locks"))
    no_worktrees()
  end)
end)
