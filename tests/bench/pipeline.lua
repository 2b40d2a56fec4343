-- The pipeline benchmark's Factory side (tests/bench/bench_pipeline.sh):
--   factory tests/bench/pipeline.lua FAKE_URL DB_PATH RUNS CONCURRENCY SHARED_JSON
-- FAKE_URL: tests/tools/fake_model.lua running as its own process (the same one
-- LangGraph calls afterwards). DB_PATH: a fresh SQLite file (durable state).
-- 1. one warm-up run alone, whose five model requests (the exact prompts the engine
--    built) and five replies are written to SHARED_JSON for the LangGraph side;
-- 2. RUNS runs of the shipped 5-stage `feature` pipeline, CONCURRENCY fibers each
--    submitting and executing runs, every model call answered at once by the fake
--    with a valid COMPLETE TaskResult. The runs name no repository, so no stage makes a
--    worktree (the engine's own work is measured: LangGraph's graph has none of that;
--    tests/bench/bench_worktree.sh measures worktrees).
-- Prints runs/s, per-stage wall time, model round-trip time and engine overhead
-- (wall minus model), CPU per stage (and the fake's per call, given FAKE_PID), and
-- this process's peak RSS (VmHWM); then machine-readable lines "runs/s N",
-- "overhead_ms N", "cpu_ms N", "fake_ms N" (with FAKE_PID), "vmhwm_kb N".
local pipeline = require "factory.pipeline"
local dsl = require "factory.dsl"
local db = require "factory.db"
local router = require "factory.router"
local fiber = require "factory.fiber"
local json = require "factory.json"
local http = require "factory.http"
local fs = require "factory.core.fs"
local time = require "factory.core.time"

local fake_url, db_path, runs, conc, shared_path = ...
runs, conc = tonumber(runs), tonumber(conc)
assert(fake_url and db_path and runs and conc and shared_path,
  "usage: factory tests/bench/pipeline.lua FAKE_URL DB_PATH RUNS CONCURRENCY SHARED_JSON")

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local ROOT = HERE .. "../../"

local ffi = require "ffi"
ffi.cdef [[
struct pb_timeval { long tv_sec; long tv_usec; };
struct pb_rusage { struct pb_timeval ru_utime, ru_stime; long rest[14]; };
int getrusage(int who, struct pb_rusage *usage);
]]
-- user + system CPU seconds of this process, every thread (the SQLite work runs on
-- libuv's thread pool)
-- who: 0 the process, 1 the calling thread (RUSAGE_THREAD: the one Lua thread).
local function cpu(who)
  local ru = ffi.new("struct pb_rusage")
  ffi.C.getrusage(who or 0, ru)
  return tonumber(ru.ru_utime.tv_sec) + tonumber(ru.ru_utime.tv_usec) / 1e6
       + tonumber(ru.ru_stime.tv_sec) + tonumber(ru.ru_stime.tv_usec) / 1e6,
         tonumber(ru.ru_stime.tv_sec) + tonumber(ru.ru_stime.tv_usec) / 1e6
end

-- BENCH_PROFILE=1: LuaJIT's sampling profiler over the measured runs; the top
-- functions (and their callers' lines) go to stderr.
local profile = os.getenv("BENCH_PROFILE") == "1" and require("jit.profile")
local samples = {}

-- FAKE_PID (and FAKE_HZ, the kernel's clock ticks per second): the fake model's
-- process, whose CPU over the measured runs is reported per call.
local fake_pid, fake_hz = tonumber(os.getenv("FAKE_PID")), tonumber(os.getenv("FAKE_HZ") or "100")
local function fake_cpu()
  if not fake_pid then return 0 end
  local f = io.open("/proc/" .. fake_pid .. "/stat")
  if not f then return 0 end
  local text = f:read("*a")
  f:close()
  -- utime and stime are the 14th and 15th fields; the 2nd, (comm), may hold spaces.
  local after = text:match("%) (.*)$")
  local fields = {}
  for x in after:gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / fake_hz
end

local function vmhwm()
  local f = io.open("/proc/self/status")
  local text = f:read("*a")
  f:close()
  return tonumber(text:match("VmHWM:%s*(%d+)")), tonumber(text:match("VmRSS:%s*(%d+)"))
end

-- ---- the fake model, over its control endpoints ------------------------------------

local function fake(method, path, body)
  local res = assert(http.request{ method = method, url = fake_url .. path, body = body and json.encode(body),
                                   headers = body and { ["Content-Type"] = "application/json" } or nil, timeout = 30 })
  assert(res.status == 200, "fake model " .. path .. ": " .. res.status .. " " .. res.body)
  return json.decode(res.body)
end

local function complete(artifact, facts)
  return { content = json.encode{ status = "COMPLETE", reasoning = "done", artifact = artifact,
                                   verified_facts = facts or {}, assumptions_made = {}, blockers = {},
                                   clarification_needed = json.null } }
end

-- One per stage, in stage order; runs interleave at the fake, so any COMPLETE fits
-- any stage (the artifact is free text).
local REPLIES = {
  complete("# Requirements\n1. a task has an optional due date", { "tasks live in tasks.lua" }),
  complete("# Design\nadd due_date to the task table"),
  complete("# Change\nadded due_date"),
  complete("# Test report\nall criteria pass"),
  complete("# Docs\nchangelog entry"),
}

local function script(n)
  -- in chunks, to keep each control request small
  local i = 0
  while i < n do
    local list = {}
    for k = i + 1, math.min(n, i + 500) do list[#list + 1] = REPLIES[(k - 1) % #REPLIES + 1] end
    fake("POST", "/_fake/script", list)
    i = i + #list
  end
end

-- ---- the project: the shipped teams and the feature pipeline -----------------------

local dir = os.tmpname()
os.remove(dir)
assert(fs.mkdir_p(dir .. "/teams"))
assert(fs.mkdir_p(dir .. "/pipelines"))
for _, f in ipairs(assert(fs.list(ROOT .. "teams"))) do
  if f:find("%.lua$") then assert(fs.write(dir .. "/teams/" .. f, assert(fs.read(ROOT .. "teams/" .. f)))) end
end
assert(fs.write(dir .. "/pipelines/feature.lua", assert(fs.read(ROOT .. "pipelines/feature.lua"))))
local project = dsl.project(dir)
local problems = project:load()
assert(#problems == 0, "project: " .. json.encode(problems))

local models = {}
for _, alias in ipairs({ "factory/architect", "factory/coder", "factory/fast", "factory/cheap" }) do
  models[alias] = { "fake/" .. alias:match("/(.*)") }
end
assert(router.configure{
  providers = { fake = { base_url = fake_url .. "/v1", api_key = "sk-bench-pipeline-0000" } },
  models = models,
  limits = { retries = 0, timeout = 30, first_token_timeout = 30, idle_timeout = 30, breaker_failures = 1e9 },
})

local store = assert(db.open("sqlite:" .. db_path))
assert(store:migrate())
-- BENCH_SYNC=FULL|OFF: a what-if for profiling (FULL: SQLite fsyncs inside each COMMIT
-- as well, holding the write lock; OFF: no sync of SQLite's own). Not what the
-- benchmark reports by default.
if os.getenv("BENCH_SYNC") then
  assert(store:exec("PRAGMA synchronous = " .. assert(({ NORMAL = "NORMAL", FULL = "FULL", OFF = "OFF" })[os.getenv("BENCH_SYNC")])))
  print("factory: WHAT-IF run with PRAGMA synchronous = " .. os.getenv("BENCH_SYNC"))
end

-- ---- timing, from the engine's events ---------------------------------------------

local stage_names = {}
for _, st in ipairs(project.pipelines:get("feature").stages) do stage_names[#stage_names + 1] = st.name end
local stage_wall, stage_model, stage_n = {}, {}, {}
for _, s in ipairs(stage_names) do stage_wall[s], stage_model[s], stage_n[s] = 0, 0, 0 end
local open = {} -- run_id -> { stage =, t0 = }
local model_ms = {} -- run_id -> ms of model calls during its current stage
local calls, failed_calls = 0, 0
local measuring = false

local function on_event(ev)
  local id = ev.run_id
  if ev.kind == "stage_started" then
    open[id] = { stage = ev.data.stage, t0 = time.monotonic() }
    model_ms[id] = 0
  elseif ev.kind == "model_call" then
    calls = calls + 1
    if ev.data.status ~= "ok" then failed_calls = failed_calls + 1 end
  elseif ev.kind == "stage_completed" then
    local o = open[id]
    if o and measuring then
      local s = o.stage
      stage_wall[s] = stage_wall[s] + (time.monotonic() - o.t0) * 1000
      stage_model[s] = stage_model[s] + (model_ms[id] or 0)
      stage_n[s] = stage_n[s] + 1
    end
    open[id] = nil
  end
end

local engine = pipeline.engine{ db = store, project = project, on_event = on_event }
-- The router's own record of each call carries its round-trip time (the fake's
-- answer time as the engine sees it: HTTP, the fake's work, JSON).
local total_model_ms = 0
local unhook = router.on_call(function(r)
  local id = tonumber(r.run)
  if id and model_ms[id] then model_ms[id] = model_ms[id] + (r.latency_ms or 0) end
  if measuring then total_model_ms = total_model_ms + (r.latency_ms or 0) end
end)

local function one(n)
  local run = assert(engine:submit{ pipeline = "feature", title = "Add due dates to tasks " .. n,
                                    body = "Users want a due date on each task.",
                                    external_id = "bench-" .. n })
  local state, detail = engine:execute(run)
  assert(state == "succeeded", ("run %d: %s %s"):format(run, tostring(state), tostring(detail)))
end

-- ---- 1. the warm-up run, whose prompts LangGraph sends too --------------------------

fake("POST", "/_fake/reset")
script(#REPLIES)
one(0)
local sent = fake("GET", "/_fake/requests")
assert(sent.count == #REPLIES, "warm-up: expected 5 model calls, got " .. sent.count)
local bodies = {}
for i, r in ipairs(sent.requests) do bodies[i] = json.decode(r.body) end
assert(fs.write(shared_path, json.encode{ requests = bodies, replies = REPLIES, stages = stage_names }))

-- ---- 2. the measured runs -----------------------------------------------------------

fake("POST", "/_fake/reset")
script(runs * #REPLIES)
collectgarbage()
measuring = true
local next_n, done = 0, 0
if profile then
  profile.start("fi", function(thread, n)
    local k = profile.dumpstack(thread, "pl;", -6)
    samples[k] = (samples[k] or 0) + n
  end)
end
local cpu0, sys0 = cpu()
local fake0 = fake_cpu()
local main0 = cpu(1)
local t0 = time.monotonic()
local function worker()
  while next_n < runs do
    next_n = next_n + 1
    one(next_n)
    done = done + 1
  end
end
local fibers = {}
for k = 1, conc do fibers[k] = fiber.spawn(worker) end
assert(fiber.all(fibers))
local secs = time.monotonic() - t0
local cpu1, sys1 = cpu()
local fake1 = fake_cpu()
local main1 = cpu(1)
if profile then
  profile.stop()
  local list, total = {}, 0
  for k, n in pairs(samples) do list[#list + 1] = { k, n }; total = total + n end
  table.sort(list, function(a, b) return a[2] > b[2] end)
  io.stderr:write(("profile: %d samples (1 ms), top stacks (innermost first):\n"):format(total))
  for i = 1, math.min(25, #list) do
    io.stderr:write(("%5.1f%%  %s\n"):format(100 * list[i][2] / total, list[i][1]))
  end
end
measuring = false
unhook()
engine:close()
local served = fake("GET", "/_fake/requests").count
assert(done == runs, ("completed %d of %d runs"):format(done, runs))
assert(served == runs * #REPLIES, ("the fake answered %d calls, expected %d"):format(served, runs * #REPLIES))

local rows = assert(store:query("SELECT COUNT(*) AS n FROM runs WHERE state = 'succeeded'"))
local results = assert(store:query("SELECT COUNT(*) AS n FROM stage_results WHERE status = 'COMPLETE'"))
store:close()
local size = fs.stat and fs.stat(db_path)
local hwm, rss = vmhwm()

local rate = runs / secs
print(("factory: %d runs of `feature` (5 stages) in %.3f s = %.1f runs/s (concurrency %d; SQLite %s: %d runs"
  .. " succeeded, %d stage results)"):format(runs, secs, rate, conc, db_path:match("[^/]*$"),
  rows[1].n, results[1].n))
print(("factory: per stage (mean over %d runs)   wall ms   model ms   engine ms"):format(runs))
local wall_all, model_all, n_all = 0, 0, 0
for _, s in ipairs(stage_names) do
  local n = math.max(1, stage_n[s])
  print(("  %-14s %22.2f %10.2f %11.2f"):format(s, stage_wall[s] / n, stage_model[s] / n,
    (stage_wall[s] - stage_model[s]) / n))
  wall_all, model_all, n_all = wall_all + stage_wall[s], model_all + stage_model[s], n_all + stage_n[s]
end
local overhead = (wall_all - model_all) / math.max(1, n_all)
print(("  %-14s %22.2f %10.2f %11.2f"):format("all stages", wall_all / n_all, model_all / n_all, overhead))
local cpu_ms = (cpu1 - cpu0) * 1000 / (runs * 5)
print(("factory: stage wall minus model %.2f ms at concurrency %d (with %d runs in flight a stage also waits"
  .. " for its group's commit on the one SQLite writer, and its turn on the one Lua thread)"):format(overhead, conc,
  conc))
print(("factory: engine CPU per stage %.3f ms (user+sys of the whole process, %.3f ms of it system);"
  .. " wall per stage at this throughput %.3f ms"):format(cpu_ms, (sys1 - sys0) * 1000 / (runs * 5),
  secs * 1000 / (runs * 5)))
print(("factory: of that, the Lua thread (all Lua code, and SQLite statements inside a transaction) %.3f ms,"
  .. " busy %.0f%% of the wall time"):format((main1 - main0) * 1000 / (runs * 5), 100 * (main1 - main0) / secs))
if fake_pid then
  print(("factory: the fake model's own CPU per call %.3f ms (its process, over the measured runs)"):format(
    (fake1 - fake0) * 1000 / (runs * 5)))
end
print(("factory: peak RSS (VmHWM) %d kB (%.1f MiB), RSS at end %d kB; %d model calls, %d failed"):format(
  hwm, hwm / 1024, rss, calls, failed_calls))
fs.remove(dir, { recursive = true })
print(("runs/s %.3f"):format(rate))
print(("overhead_ms %.3f"):format(overhead))
print(("cpu_ms %.3f"):format(cpu_ms))
if fake_pid then print(("fake_ms %.4f"):format((fake1 - fake0) * 1000 / (runs * 5))) end
print(("vmhwm_kb %d"):format(hwm))
