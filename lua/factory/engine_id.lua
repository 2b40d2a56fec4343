-- factory.engine_id: who an engine process is, as the store records it in locks
-- and leases ("host:pid:n"), and whether such a process is still alive.
--
--   engine_id.HOST                 this machine's host name
--   engine_id.new() -> "host:pid:n" an id for this process (n tells apart two
--                                  engines of one process)
--   engine_id.alive_here(id) -> true | false | nil
--       whether the process of id runs on this host; nil when id is not of this
--       host (or not an id at all): nobody here can tell.
local ffi = require "ffi"
local proc = require "factory.proc"

pcall(ffi.cdef, "int kill(int pid, int sig);")

local M = {}

-- Read once at load, synchronously: fs.read would yield, and a module may be
-- required outside any fiber.
M.HOST = (function()
  local f = io.open("/proc/sys/kernel/hostname")
  local name = f and f:read("*l")
  if f then f:close() end
  return name or "localhost"
end)()

function M.new()
  return ("%s:%d:%d"):format(M.HOST, proc.getpid(), math.random(1, 1e9))
end

function M.alive_here(id)
  if type(id) ~= "string" then return nil end
  local host, pid = id:match("^(.*):(%d+):%d+$")
  if host ~= M.HOST then return nil end
  return ffi.C.kill(tonumber(pid), 0) == 0 or ffi.errno() == 1 -- EPERM: it exists
end

return M
