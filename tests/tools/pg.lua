-- tests/tools/pg.lua: the throwaway PostgreSQL server of the test run (pg.sh), shared
-- by every spec in the process: `require("tests.tools.pg").start()` starts it on first
-- use and returns { dir, port, url, socket_url, admin_url }; fresh() empties the test
-- database and returns its URL. A watchdog stops the server when this process exits,
-- however it exits; stop() stops it now.
-- Failing to start raises: PostgreSQL specs must fail, never skip.
local M = {}

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "tests/tools"
local server

local function own_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("*l"):match("^(%d+)")
  f:close()
  return pid
end

-- Blocks the loop for the second or two initdb takes; fine once per test run.
function M.start()
  if server then return server end
  local p = assert(io.popen(("sh '%s/pg.sh' start %s 2>&1"):format(here, own_pid())))
  local out = p:read("*a")
  p:close()
  local s = {}
  for line in out:gmatch("[^\n]+") do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then s[k] = v end
  end
  if not (s.url and s.dir and s.admin_url) then
    error("cannot start the test PostgreSQL server (tests/tools/pg.sh):\n" .. out, 2)
  end
  server = s
  return s
end

-- The URL of an empty database: the test role's schema dropped and made anew.
function M.fresh()
  local url = M.start().url
  local d = assert(require("factory.db").open(url))
  assert(d:script("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
  d:close()
  return url
end

function M.stop()
  if not server then return end
  os.execute(("sh '%s/pg.sh' stop '%s'"):format(here, server.dir))
  server = nil
end

-- The server's postmaster pid (to pause it with SIGSTOP in a test).
function M.postmaster_pid()
  local f = assert(io.open(M.start().dir .. "/data/postmaster.pid"))
  local pid = f:read("*l")
  f:close()
  return pid
end

return M
