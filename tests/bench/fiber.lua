-- Benchmark: create and join N fibers (default 100,000); prints the time and the
-- peak resident set size. Usage: factory tests/bench/fiber.lua [N]
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local n = tonumber((...)) or 100000

local function peak_rss_mb()
  local f = io.open("/proc/self/status", "r")
  if not f then return 0 end
  local text = f:read("*a")
  f:close()
  return (tonumber(text:match("VmHWM:%s*(%d+)")) or 0) / 1024
end

local started = time.monotonic()
local fibers = {}
for i = 1, n do fibers[i] = fiber.spawn(function() return i end) end
local sum = 0
for i = 1, n do
  local ok, v = fiber.join(fibers[i])
  if not ok then error("fiber " .. i .. " failed: " .. tostring(v)) end
  sum = sum + v
end
local secs = time.monotonic() - started
assert(sum == n * (n + 1) / 2, "wrong results")
print(("fibers: %d created and joined in %.3f s (%.0f fibers/s), peak RSS %.1f MB (goal < 1 s, < 200 MB)")
  :format(n, secs, n / secs, peak_rss_mb()))

-- Also the acceptance figure: N/10 fibers each sleeping 10 ms.
local sleepers = math.max(1, math.floor(n / 10))
started = time.monotonic()
local fs = {}
for i = 1, sleepers do fs[i] = fiber.spawn(function() fiber.sleep(0.01) end) end
local ok = fiber.all(fs)
assert(ok, "a sleeper failed")
print(("fibers: %d sleeping 10 ms each finished in %.3f s wall (goal < 1 s for 10,000)")
  :format(sleepers, time.monotonic() - started))
