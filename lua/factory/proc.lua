-- factory.proc: child processes for fibers.
--
--   spawn{...} -> process | nil, err, code        (from factory.core.proc)
--     options: argv = {...} (required; argv[1] without a slash is looked up in the
--     child's PATH), cwd = DIR, env = {NAME = value, ...} (explicit, never
--     inherited; nil gives only a default PATH), stdin = STRING | "pipe" | nil
--     (/dev/null), stdout = "pipe" (default) | "null" | "inherit",
--     stderr = "pipe" (default) | "null" | "inherit" | "stdout" (merged),
--     timeout = SECONDS (then the process group is killed), kill_grace = SECONDS
--     (SIGTERM that long before the SIGKILL; default 0), max_output = BYTES kept
--     per stream (default 16 MiB; the rest is discarded, truncated = true).
--     process: p:read_line([stream]), p:read([stream]) (stream "stdout" | "stderr"),
--     p:write(data), p:close_stdin(), p:wait([timeout]) -> { code, signal,
--     timed_out, truncated }, p:kill([signal]), p.pid, p:close().
--     A fiber cancelled while waiting on a process kills its process group; a
--     process still running when the engine exits is killed.
--   run{...same options..., started = fn(process) -> fn() | nil} -> { code, signal,
--     timed_out, truncated, stdout = STRING, stderr = STRING } | nil, err, code
--     stdout/stderr are nil for a stream that is not piped. started is told of the
--     process once it runs (to record it somewhere); what it returns is called when
--     the process has ended.
--   getpid() -> this process's pid
--   which(name [, PATH]) -> the file spawn would run as argv[1] = name | nil
local core = require "factory.core.proc"

local M = {
  spawn = core.spawn,
  getpid = core.getpid,
  which = core.which,
}

local function collect(p, stream)
  local parts = {}
  while true do
    local chunk = p:read(stream)
    if not chunk then return table.concat(parts) end
    parts[#parts + 1] = chunk
  end
end

-- The core reads both streams into its buffers as the child writes them, so
-- waiting first never blocks the child on a full pipe.
function M.run(opts)
  if type(opts) ~= "table" then error("proc.run: expected a table of options", 2) end
  if opts.stdin == "pipe" then error('proc.run: stdin = "pipe" needs proc.spawn (run writes nothing)', 2) end
  local p, err, code = core.spawn(opts)
  if not p then return nil, err, code end
  local ended = opts.started and opts.started(p)
  local res = p:wait()
  if ended then ended() end
  if (opts.stdout or "pipe") == "pipe" then res.stdout = collect(p, "stdout") end
  if (opts.stderr or "pipe") == "pipe" then res.stderr = collect(p, "stderr") end
  p:close()
  return res
end

return M
