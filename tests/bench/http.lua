-- HTTP client benchmark: N GETs of URL by C fibers, each looping over its share.
-- Usage: factory tests/bench/http.lua URL [N] [C]
-- Prints one line: requests, seconds, requests/sec, p50 and p99 latency; the last
-- field, "rps=...", is what tests/bench/bench_http.sh reads.
local http = require "factory.http"
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local url, n, c = ...
n, c = tonumber(n) or 20000, tonumber(c) or 64
assert(url, "usage: factory tests/bench/http.lua URL [N] [C]")

local function run(worker, arg)
  local fibers = {}
  for i = 1, c do fibers[i] = fiber.spawn(worker, arg(i)) end
  local ok, outcomes = fiber.all(fibers)
  if not ok then
    for _, o in ipairs(outcomes) do
      if not o.ok then error(o[1], 0) end
    end
  end
end

-- A warm-up round opens the connections, so the run measures kept-alive ones.
run(function()
  local res, err = http.get(url)
  if not res or res.status ~= 200 then error("warm-up failed: " .. tostring(err or res.status)) end
end, function() end)

local latencies, errors = {}, 0
local function worker(count)
  for _ = 1, count do
    local t0 = time.monotonic()
    local res = http.get(url)
    latencies[#latencies + 1] = time.monotonic() - t0
    if not res or res.status ~= 200 then errors = errors + 1 end
  end
end

local started = time.monotonic()
run(worker, function(i) return math.floor(n / c) + (i <= n % c and 1 or 0) end)
local secs = time.monotonic() - started
if errors > 0 then error(("%d of %d requests failed"):format(errors, n), 0) end

table.sort(latencies)
local function pct(p) return latencies[math.max(1, math.ceil(#latencies * p))] * 1000 end
print(("engine: %d GETs, concurrency %d, %.2f s, p50 %.3f ms, p99 %.3f ms, rps=%.0f"):format(
  n, c, secs, pct(0.50), pct(0.99), n / secs))
