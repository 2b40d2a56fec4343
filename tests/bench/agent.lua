-- The agent-loop benchmark (tests/bench/bench_agent.sh; issue 6, acceptance 6):
--   factory tests/bench/agent.lua FAKE_URL RUNS CALLS
-- FAKE_URL: tests/tools/fake_model.lua as its own process, answering at once.
-- For each tool mix, RUNS runs of the built-in agent (factory.agents.builtin) in a
-- 20-file directory, each making CALLS tool calls and then `finish`; the fake's
-- replies are scripted ahead. The agent loop's own overhead per tool call is the
-- wall time minus the time spent waiting on the model (the router's latency_ms of
-- every call: request on the wire to reply received, the fake's work included),
-- divided by the tool calls: what remains is building the conversation, encoding
-- and decoding JSON, the router's bookkeeping, the loop's checks and the tool's own
-- work. Mixes: read_file only, edit_file only (each edit a real file write),
-- run_command only (`true`: a process spawned, waited for, its output captured).
-- Prints a table, then machine-readable lines "overhead_us MIX N".
local builtin = require "factory.agents.builtin"
local router = require "factory.router"
local json = require "factory.json"
local http = require "factory.http"
local fs = require "factory.core.fs"
local time = require "factory.core.time"

local fake_url, runs, calls = ...
runs, calls = tonumber(runs), tonumber(calls)
assert(fake_url and runs and calls, "usage: factory tests/bench/agent.lua FAKE_URL RUNS CALLS")

local FILES = 20

local function post(path, body)
  local res = assert(http.request{ method = "POST", url = fake_url .. path, body = assert(json.encode(body)),
                                   headers = { ["content-type"] = "application/json" } })
  assert(res.status == 200, "fake model: " .. tostring(res.status) .. " " .. tostring(res.body))
end

local n = 0
local function call(name, args)
  n = n + 1
  return { tool_calls = { { id = "c" .. n, name = name, arguments = assert(json.encode(args)) } } }
end

local MIXES = {
  { name = "read_file", make = function(i) return call("read_file", { path = ("src/f%02d.c"):format(i % FILES) }) end },
  { name = "edit_file", make = function(i)
      local f = ("src/f%02d.c"):format(i % FILES)
      return call("write_file", { path = f, content = ("int f%d(void) { return %d; }\n"):format(i % FILES, i) })
    end },
  { name = "run_command", make = function(i) return call("run_command", { command = { "true", tostring(i) } }) end },
}

local FINISH = call("finish", { status = "COMPLETE", reasoning = "benchmark", artifact = "done" })

local root = os.tmpname()
os.remove(root)
assert(fs.mkdir_p(root .. "/src"))

assert(router.configure{
  providers = { fake = { base_url = fake_url .. "/v1", api_key = "sk-bench-agent-0000" } },
  models = { ["factory/coder"] = { "fake/coder" } },
  limits = { retries = 0, timeout = 10, first_token_timeout = 10, idle_timeout = 10, breaker_failures = 1000000 },
})
local waited = 0
local unhook = router.on_call(function(r) waited = waited + (r.latency_ms or 0) end)

local function one_mix(mix)
  for i = 0, FILES - 1 do
    assert(fs.write(root .. ("/src/f%02d.c"):format(i), ("int f%d(void) { return 0; }\n"):format(i)))
  end
  post("/_fake/reset", {})
  local script = {}
  for _ = 1, runs do
    for i = 1, calls do script[#script + 1] = mix.make(i) end
    script[#script + 1] = FINISH
  end
  post("/_fake/script", script)
  waited = 0
  local tool_calls = 0
  local t0 = time.monotonic()
  for _ = 1, runs do
    local result, stats = builtin.run{ root = root, objective = "benchmark: " .. mix.name, model = "factory/coder",
                                       max_iterations = calls + 1, stuck_repeats = calls + 2,
                                       stuck_idle = calls + 2 }
    assert(result.status == "COMPLETE", "agent: " .. tostring(result.blockers and result.blockers[1]))
    tool_calls = tool_calls + stats.tool_calls
  end
  local wall = time.monotonic() - t0
  local model = waited / 1000
  return { name = mix.name, calls = tool_calls, wall = wall, model = model,
           per_call_ms = wall * 1000 / tool_calls, overhead_us = (wall - model) * 1e6 / tool_calls }
end

local results = {}
for _, mix in ipairs(MIXES) do one_mix(mix) end -- warm-up: JIT traces, the connection to the fake
for _, mix in ipairs(MIXES) do results[#results + 1] = one_mix(mix) end
unhook()
fs.remove(root, { recursive = true })

print(("%-12s %8s %12s %14s %18s"):format("tools", "calls", "wall/call", "model/call", "agent overhead"))
for _, r in ipairs(results) do
  print(("%-12s %8d %9.3f ms %11.3f ms %15.1f us"):format(r.name, r.calls, r.per_call_ms,
    r.model * 1000 / r.calls, r.overhead_us))
end
for _, r in ipairs(results) do print(("overhead_us %s %.1f"):format(r.name, r.overhead_us)) end
