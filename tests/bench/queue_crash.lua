-- The crash test of factory.queue at benchmark size (tests/bench/bench_queue.sh):
--   factory tests/bench/queue_crash.lua URL ROUNDS MAX_RUN
-- ROUNDS SIGKILLs of a worker that ran up to MAX_RUN seconds each; see
-- tests/tools/queue_crash.lua for what is checked after every kill.
local db = require "factory.db"
local time = require "factory.core.time"
local crash = require "tests.tools.queue_crash"

local url, rounds, max_run = ...
local d = assert(db.open(url))
assert(d:migrate())
local backend = d.backend
d:close()
local t = time.monotonic()
local res = crash.run(url, { rounds = tonumber(rounds), max_run = tonumber(max_run) })
print(("crash test on %s: %d SIGKILLs, %d items completed, %d leases lost to kills and all claimed again,"
  .. " nothing lost or completed twice, audit chain intact (%.1f s)"):format(
  backend, res.rounds, res.completed, res.lost_leases, time.monotonic() - t))
