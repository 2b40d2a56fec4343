-- The queue benchmark's workload through factory.queue (tests/bench/bench_queue.sh):
--   factory tests/bench/queue.lua URL JOBS LATENCY_JOBS CONCURRENCY [BATCH]
-- The same two phases as tests/bench/graphile/bench.mjs:
-- 1. throughput: JOBS jobs enqueued (enqueue_many, 1000 a transaction), then
--    CONCURRENCY fibers claim BATCH at a time and complete each; prints jobs/s from
--    the first claim to the last completion, and "jobs/s N" alone on a line.
-- 2. latency: LATENCY_JOBS jobs enqueued one at a time, paced, from another
--    connection (PostgreSQL) to CONCURRENCY idle claimers; prints enqueue-to-start p50/p99 and
--    "p50_ms N" alone on a line.
local db = require "factory.db"
local queue = require "factory.queue"
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local url, jobs, latency_jobs, conc, batch = ...
jobs, latency_jobs, conc, batch = tonumber(jobs), tonumber(latency_jobs), tonumber(conc), tonumber(batch or 8)

local d = assert(db.open(url))
assert(d:migrate())
local q = queue.new(d)
local name = d.backend == "postgres" and "factory-pg" or "factory-sqlite"

local function pct(xs, p)
  table.sort(xs)
  return xs[math.min(#xs, math.floor(#xs * p) + 1)]
end

for i = 1, jobs, 1000 do
  local list = {}
  for k = i, math.min(jobs, i + 999) do list[#list + 1] = { kind = "bench", payload = { i = k } } end
  assert(q:enqueue_many(list))
end

local done, first, last = 0, nil, nil
local function worker(n)
  local owner = "bench/" .. n
  while true do
    local items = assert(q:claim(owner, { batch = batch, lease = 60 }))
    if #items == 0 then return end
    first = first or time.monotonic()
    for _, item in ipairs(items) do
      assert(q:complete(item, owner, true))
      done = done + 1
    end
    last = time.monotonic()
  end
end
local fibers = {}
for n = 1, conc do fibers[n] = fiber.spawn(worker, n) end
assert(fiber.all(fibers))
assert(done == jobs, "completed " .. done .. " of " .. jobs)
local secs = last - first
local rate = jobs / secs
print(("%s: %d jobs in %.3f s = %d jobs/s (concurrency %d, claim batch %d)"):format(name, jobs, secs, rate, conc, batch))

-- Latency: idle claimers, jobs arriving one at a time; on PostgreSQL from another
-- connection (as from another machine), on SQLite from this process's connection
-- (processes sharing a SQLite file only see each other by polling).
local other = d.backend == "postgres" and assert(db.open(url)) or d
local producer = queue.new(other)
local lat, stop = {}, false
local function claimer(n)
  local owner = "probe/" .. n
  while not stop do
    local items = assert(q:claim(owner, { wait = 0.5, lease = 60 }))
    local started = time.now()
    for _, item in ipairs(items) do
      lat[#lat + 1] = (started - item.created_at) * 1000
      assert(q:complete(item, owner, true))
    end
  end
end
for n = 1, conc do fibers[n] = fiber.spawn(claimer, n) end
fiber.sleep(0.2)
for i = 1, latency_jobs do
  assert(producer:enqueue({ probe = i }, { kind = "probe" }))
  fiber.sleep(0.002)
end
while #lat < latency_jobs do fiber.sleep(0.01) end
stop = true
assert(fiber.all(fibers))
print(("%s: enqueue-to-start p50 %.2f ms, p99 %.2f ms (%d jobs, one every ~2 ms)"):format(
  name, pct(lat, 0.5), pct(lat, 0.99), latency_jobs))
print("jobs/s " .. math.floor(rate))
print("p50_ms " .. pct(lat, 0.5))
q:close()
producer:close()
other:close()
if other ~= d then d:close() end
