-- factory.core.proc and factory.proc: spawning, streams, limits, timeouts,
-- cancellation, and that no child is ever left behind (running or as a zombie).
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local env = require "factory.core.env"
local time = require "factory.core.time"
local host = require "factory.core.host"

local DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

-- State letter of a process ("R", "S", "Z", ...) and its parent pid, or nil if gone.
local function stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  local state, ppid = s:match("^.*%) (%S) (%d+)")
  return state, tonumber(ppid)
end

-- A killed process takes a moment to die; a zombie is dead (its reaper is not us).
local function gone_soon(pid, secs)
  local deadline = time.monotonic() + (secs or 2)
  while time.monotonic() < deadline do
    local state = stat(pid)
    if state == nil or state == "Z" then return true end
    fiber.sleep(0.01)
  end
  return false
end

local function sh(script, opts)
  opts = opts or {}
  opts.argv = { "sh", "-c", script }
  return assert(proc.run(opts))
end

describe("proc.run", function()
  it("reports exit codes", function()
    for _, case in ipairs {
      { { "true" }, 0 },
      { { "false" }, 1 },
      { { "sh", "-c", "exit 7" }, 7 },
    } do
      local r = assert(proc.run { argv = case[1] })
      assert.equal(case[2], r.code, case[1][1])
      assert.is_nil(r.signal)
      assert.equal(false, r.timed_out)
      assert.equal(false, r.truncated)
    end
  end)

  it("tells started of the process once it runs, and calls what it returns when it has ended", function()
    local order = {}
    local res = assert(proc.run{ argv = { "sh", "-c", "echo $$" }, started = function(p)
      order[#order + 1] = p.pid
      return function() order[#order + 1] = "ended" end
    end })
    assert.same({ tonumber(res.stdout), "ended" }, order)
  end)

  it("reports the signal that ended the process", function()
    local r = sh("kill -KILL $$")
    assert.is_nil(r.code)
    assert.equal(9, r.signal)
  end)

  it("captures stdout and stderr separately, or merged", function()
    local r = sh("echo out; echo err >&2")
    assert.equal("out\n", r.stdout)
    assert.equal("err\n", r.stderr)
    r = sh("echo out; echo err >&2", { stderr = "stdout" })
    assert.equal("out\nerr\n", r.stdout)
    assert.is_nil(r.stderr)
    r = sh("head -c 5000000 /dev/zero")
    assert.equal(5000000, #r.stdout)
    r = sh("echo out; echo err >&2", { stdout = "null", stderr = "null" })
    assert.is_nil(r.stdout)
    assert.equal(0, r.code)
  end)

  it("feeds a string to stdin, of any size", function()
    assert.equal("hello\nworld", assert(proc.run { argv = { "cat" }, stdin = "hello\nworld" }).stdout)
    assert.equal("", assert(proc.run { argv = { "cat" }, stdin = "" }).stdout)
    local big = ("0123456789abcdef"):rep(2 ^ 16) .. "end"   -- 1 MiB: far more than a pipe holds
    local r = assert(proc.run { argv = { "cat" }, stdin = big })
    assert.equal(#big, #r.stdout)
    assert.truthy(r.stdout == big, "the bytes came back unchanged")
  end)

  it("gives the child /dev/null as stdin by default", function()
    assert.equal("", assert(proc.run { argv = { "cat" } }).stdout)
  end)

  it("does not pass the engine's environment on", function()
    assert.truthy(env.set("FACTORY_PROC_SECRET", "leaked"))
    local r = assert(proc.run { argv = { "env" } })
    env.set("FACTORY_PROC_SECRET", nil)
    assert.equal("PATH=" .. DEFAULT_PATH .. "\n", r.stdout)
    r = assert(proc.run { argv = { "env" }, env = { FOO = "bar" } })
    assert.equal("FOO=bar\n", r.stdout)
    r = assert(proc.run { argv = { "sh", "-c", 'echo "$A-$B"' }, env = { A = "x", B = 2, PATH = "/bin" } })
    assert.equal("x-2\n", r.stdout)
  end)

  it("looks programs up in the child's PATH", function()
    local r, err, code = proc.run { argv = { "true" }, env = { PATH = "/nonexistent" } }
    assert.is_nil(r)
    assert.equal("ENOENT: program not found: true", err)
    assert.equal("ENOENT", code)
  end)

  it("runs in the given directory", function()
    assert.equal("/tmp\n", assert(proc.run { argv = { "pwd" }, cwd = "/tmp" }).stdout)
    local r, err, code = proc.run { argv = { "pwd" }, cwd = "/nonexistent-dir" }
    assert.is_nil(r)
    assert.equal("ENOENT", code)
    assert.matches("/nonexistent%-dir", err)
  end)

  it("fails clearly for a program that cannot run", function()
    local plain = os.tmpname()   -- mode 0600: not executable
    for _, case in ipairs {
      { "no-such-program-xyz", "ENOENT", "^ENOENT: program not found: no%-such%-program%-xyz$" },
      { "/nonexistent/prog", "ENOENT", "^ENOENT: cannot run /nonexistent/prog" },
      { plain, "EACCES", "^EACCES: cannot run " .. plain:gsub("%p", "%%%0") },
    } do
      local p, err, code = proc.spawn { argv = { case[1] } }
      assert.is_nil(p, case[1])
      assert.equal(case[2], code, case[1])
      assert.matches(case[3], err)
    end
    os.remove(plain)
  end)

  it("keeps at most max_output bytes per stream", function()
    local r = sh("head -c 100000 /dev/zero; head -c 10 /dev/zero >&2", { max_output = 1000 })
    assert.equal(0, r.code)
    assert.equal(1000, #r.stdout)
    assert.equal(10, #r.stderr)
    assert.equal(true, r.truncated)
    assert.equal(false, sh("head -c 1000 /dev/zero", { max_output = 1000 }).truncated)
  end)

  it("runs 200 processes at once", function()
    local started = time.monotonic()
    local fibers = {}
    for i = 1, 200 do
      fibers[i] = fiber.spawn(function()
        return assert(proc.run { argv = { "sh", "-c", 'sleep 0.2; echo "$0"', tostring(i) } })
      end)
    end
    local ok, outcomes = fiber.all(fibers)
    assert.truthy(ok, "every run succeeded")
    for i = 1, 200 do
      assert.equal(i .. "\n", outcomes[i][1].stdout)
      assert.equal(0, outcomes[i][1].code)
    end
    assert.less(10, time.monotonic() - started, "seconds for 200 x 0.2 s run concurrently")
  end, { timeout = 60 })

  it("rejects misuse with an error", function()
    assert.error_matches(function() proc.run("ls") end, "expected a table")
    assert.error_matches(function() proc.spawn {} end, "argv must be a non%-empty list")
    assert.error_matches(function() proc.spawn { argv = { "true", {} } } end, "argv item must be a string")
    assert.error_matches(function() proc.spawn { argv = { "true" }, stdout = "bogus" } end, "stdout must be one of")
    assert.error_matches(function() proc.spawn { argv = { "true" }, stderr = 1 } end, "stderr must be one of")
    assert.error_matches(function() proc.spawn { argv = { "true" }, timeout = -1 } end, "timeout must be")
    assert.error_matches(function() proc.spawn { argv = { "true" }, env = { ["A=B"] = "x" } } end, "env names")
    assert.error_matches(function() proc.run { argv = { "cat" }, stdin = "pipe" } end, "needs proc.spawn")
    local p = assert(proc.spawn { argv = { "true" }, stdout = "null" })
    assert.error_matches(function() p:read_line("stdout") end, "not a pipe")
    assert.error_matches(function() p:read_line("stdin") end, "invalid option")
    assert.error_matches(function() p:write("x") end, "stdin is not a pipe")
    p:wait()
    p:close()
    assert.error_matches(function() p:wait() end, "closed")
  end)

  it("must be called from a fiber", function()
    local co = coroutine.create(function() return proc.spawn { argv = { "true" } } end)
    local ok, err = coroutine.resume(co)
    assert.falsy(ok)
    assert.matches("proc%.spawn: must be called from a fiber", err)
  end)
end)

describe("a process", function()
  it("streams lines while the child runs", function()
    local started = time.monotonic()
    local p = assert(proc.spawn { argv = { "sh", "-c", "echo one; sleep 0.4; echo two; sleep 0.4; printf three" } })
    assert.equal("one", p:read_line())
    assert.less(0.3, time.monotonic() - started, "seconds to the first line")
    assert.equal("two", p:read_line())
    assert.less(0.7, time.monotonic() - started, "seconds to the second line")
    assert.equal("three", p:read_line(), "the last line has no newline")
    assert.is_nil(p:read_line())
    assert.is_nil(p:read_line("stderr"))
    assert.equal(0, p:wait().code)
    assert.truthy(time.monotonic() - started >= 0.8)
    p:close()
  end)

  it("talks over a stdin pipe", function()
    local p = assert(proc.spawn { argv = { "cat" }, stdin = "pipe" })
    assert.truthy(p:write("ping\n"))
    assert.equal("ping", p:read_line())
    assert.truthy(p:write("last"))
    p:close_stdin()
    assert.equal("last", p:read("stdout"))
    assert.is_nil(p:read("stdout"))
    assert.equal(0, p:wait().code)
    local ok, err, code = p:write("more")
    assert.is_nil(ok)
    assert.equal("EPIPE", code)
    assert.matches("stdin is closed", err)
    p:close()
  end)

  it("is signalled as a whole group by kill", function()
    local p = assert(proc.spawn { argv = { "sh", "-c", "sleep 30 & echo $!; wait" } })
    local grandchild = tonumber(p:read_line())
    assert.truthy(p:kill("TERM"))
    local r = p:wait()
    assert.equal(15, r.signal)
    assert.truthy(gone_soon(grandchild), "the grandchild is gone")
    assert.equal(false, p:kill(), "nothing left to signal")
    p:close()
  end)

  it("leaves no stray children once the leader exits", function()
    local p = assert(proc.spawn { argv = { "sh", "-c", "sleep 30 & echo $!" } })
    local grandchild = tonumber(p:read_line())
    local started = time.monotonic()
    assert.equal(0, p:wait().code)
    assert.less(2, time.monotonic() - started)
    assert.truthy(gone_soon(grandchild), "the background sleep was killed")
    p:close()
  end)

  it("times out: kills a child that ignores SIGTERM together with its children", function()
    local started = time.monotonic()
    local p = assert(proc.spawn { argv = { "sh", "-c", 'trap "" TERM; sleep 30 & echo $!; wait' }, timeout = 0.5 })
    local grandchild = tonumber(p:read_line())
    assert.truthy(stat(grandchild), "the grandchild runs")
    local r = p:wait()
    local elapsed = time.monotonic() - started
    assert.equal(true, r.timed_out)
    assert.equal(9, r.signal)
    assert.near(0.5, elapsed, 0.3, "seconds")
    assert.truthy(gone_soon(grandchild), "the grandchild is gone")
    p:close()
  end)

  it("times out with a grace period: SIGTERM first, then SIGKILL", function()
    local started = time.monotonic()
    local r = sh('trap "echo term; exit 3" TERM; sleep 30 & wait', { timeout = 0.3, kill_grace = 5 })
    assert.equal(true, r.timed_out)
    assert.equal(3, r.code, "the child handled SIGTERM")
    assert.equal("term\n", r.stdout)
    assert.less(2, time.monotonic() - started)
    started = time.monotonic()
    r = sh('trap "" TERM; sleep 30 & wait', { timeout = 0.3, kill_grace = 0.3 })
    assert.equal(9, r.signal)
    assert.near(0.6, time.monotonic() - started, 0.3, "seconds")
  end)

  it("times out in wait(timeout) like the spawn option", function()
    local p = assert(proc.spawn { argv = { "sleep", "30" } })
    local r = p:wait(0.2)
    assert.equal(true, r.timed_out)
    assert.equal(9, r.signal)
    p:close()
  end)

  it("is killed when a fiber waiting on it is cancelled", function()
    local big = ("x"):rep(2 ^ 20)   -- more than the pipe holds: the write waits
    for _, case in ipairs {
      { "wait", function(p) return p:wait() end },
      { "read_line", function(p) return p:read_line() end },
      { "read", function(p) return p:read("stderr") end },
      { "write", function(p) return p:write(big) end },
    } do
      local p = assert(proc.spawn { argv = { "sleep", "30" }, stdin = "pipe" })
      local f = fiber.spawn(case[2], p)
      fiber.sleep(0.05)
      assert.equal("waiting", f:status(), case[1])
      assert.truthy(f:cancel())
      local r = p:wait()
      assert.equal(9, r.signal, case[1])
      p:close()
    end
  end)

  it("wakes fibers waiting on it when closed", function()
    local p = assert(proc.spawn { argv = { "sleep", "30" } })
    local pid = p.pid
    local reader = fiber.spawn(function() return p:read_line() end)
    local waiter = fiber.spawn(function() return p:wait() end)
    fiber.sleep(0.05)
    p:close()
    p:close()
    for _, f in ipairs { reader, waiter } do
      local ok, v, err, code = fiber.join(f)
      assert.truthy(ok)
      assert.is_nil(v)
      assert.equal("ECANCELED", code)
      assert.matches("closed", err)
    end
    assert.truthy(gone_soon(pid), "the child was killed")
  end)

  it("is killed and reaped when garbage-collected", function()
    local pid = assert(proc.spawn { argv = { "sleep", "30" } }).pid
    assert.truthy(stat(pid))
    collectgarbage()
    collectgarbage()
    local deadline = time.monotonic() + 2
    while stat(pid) and time.monotonic() < deadline do fiber.sleep(0.01) end
    assert.is_nil(stat(pid), "the child is reaped, not a zombie")
  end)

  it("does not keep the engine alive once forgotten, and dies with it", function()
    local started = time.monotonic()
    local script = "P = require('factory.proc').spawn{ argv = { 'sh', '-c', 'echo $$; exec sleep 30' } }"
      .. "; print(P:read_line())"
    local r = assert(proc.run { argv = { host.exe, "-e", script }, timeout = 10 })
    assert.equal(0, r.code)
    assert.less(5, time.monotonic() - started)
    assert.truthy(gone_soon(assert(tonumber(r.stdout))), "the engine killed its child on exit")
  end)

  it("takes its children's process groups with it when INT, TERM or HUP kills the engine", function()
    -- The engine's child leads its own session, with a child of its own: neither a
    -- terminal's Ctrl-C nor a kill of the engine would reach them by themselves.
    local script = "P = require('factory.proc').spawn{ argv = { 'sh', '-c', 'sleep 31 & echo $$ $!; wait' } }"
      .. "; print(P:read_line()); io.stdout:flush(); require('factory.fiber').sleep(30)"
    for _, sig in ipairs({ "INT", "TERM", "HUP" }) do
      local engine = assert(proc.spawn { argv = { host.exe, "-e", script }, timeout = 20 })
      local child, grandchild = assert(engine:read_line()):match("^(%d+) (%d+)$")
      assert.truthy(stat(tonumber(grandchild)), sig)
      assert(proc.run { argv = { "kill", "-" .. sig, tostring(engine.pid) } })
      local r = engine:wait()
      engine:close()
      assert.equal(({ INT = 2, TERM = 15, HUP = 1 })[sig], r.signal, sig .. ": the engine dies by the signal")
      assert.truthy(gone_soon(tonumber(child)), sig .. ": the child died with the engine")
      assert.truthy(gone_soon(tonumber(grandchild)), sig .. ": so did the child's own child")
    end
  end)

  it("leaves a signal that a fiber waits for to that fiber, children alive", function()
    local script = "local signal = require('factory.core.signal')"
      .. "; P = require('factory.proc').spawn{ argv = { 'sleep', '32' } }"
      .. "; print(P.pid); io.stdout:flush(); signal.wait('TERM'); print(io.open('/proc/' .. P.pid .. '/stat') and 'alive')"
    local engine = assert(proc.spawn { argv = { host.exe, "-e", script }, timeout = 20 })
    local child = tonumber(engine:read_line())
    fiber.sleep(0.05)
    assert(proc.run { argv = { "kill", "-TERM", tostring(engine.pid) } })
    assert.equal("alive", engine:read_line())
    local r = engine:wait()
    engine:close()
    assert.equal(0, r.code)
    assert.truthy(gone_soon(child), "then the engine's exit killed it")
  end)

  it("has a pid and knows the engine's", function()
    local p = assert(proc.spawn { argv = { "sh", "-c", "echo $$ $PPID" } })
    assert.equal(p.pid .. " " .. proc.getpid(), p:read_line())
    p:wait()
    p:close()
    assert.equal("number", type(p.pid))
  end)
end)

describe("after all the tests", function()
  it("no child of this process is a zombie", function()
    local me = proc.getpid()
    local ls = assert(proc.run { argv = { "ls", "/proc" } })
    local zombies = {}
    for pid in ls.stdout:gmatch("%d+") do
      local state, ppid = stat(pid)
      if state == "Z" and ppid == me then zombies[#zombies + 1] = pid end
    end
    assert.same({}, zombies)
  end)
end)

describe("proc.which", function()
  it("finds the program spawn would run, in the PATH given or the default one", function()
    local fs = require "factory.core.fs"
    local dir = os.tmpname()
    os.remove(dir)
    assert(fs.mkdir_p(dir .. "/bin"))
    assert(fs.write(dir .. "/bin/tool", "#!/bin/sh\necho tool\n"))
    assert(fs.write(dir .. "/bin/plain", "not a program\n"))
    assert.equal(0, assert(proc.run{ argv = { "chmod", "755", dir .. "/bin/tool" } }).code)
    assert.equal(dir .. "/bin/tool", proc.which("tool", "/nonexistent:" .. dir .. "/bin"))
    assert.equal(nil, proc.which("plain", dir .. "/bin"))     -- not executable
    assert.equal(nil, proc.which("tool"))                      -- not in the default PATH
    assert.equal("/bin/sh", proc.which("/bin/sh"))              -- a path is checked as it is
    assert.equal(nil, proc.which(dir .. "/bin/plain"))
    assert.equal(nil, proc.which(""))
    assert.truthy(proc.which("sh"))
    local p = assert(proc.spawn{ argv = { "tool" }, env = { PATH = "/nonexistent:" .. dir .. "/bin" } })
    assert.equal("tool", p:read_line())
    p:wait()
    p:close()
    assert(fs.remove(dir, { recursive = true }))
  end)
end)
