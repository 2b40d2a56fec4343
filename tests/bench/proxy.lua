-- Proxy benchmark, sequential part: the same chat request sent to the fake upstream
-- directly and through `factory serve`, one at a time, in interleaved rounds (one
-- direct, one proxied each), so that both see the same moments of a shared machine.
-- Usage: factory tests/bench/proxy.lua DIRECT_URL PROXY_URL N_SEQ
-- Prints the p50/p99 of each and the proxy's added latency. (The concurrent part,
-- throughput and latency at concurrency 64, is wrk's: see bench_proxy.sh.)
local http = require "factory.http"
local time = require "factory.core.time"

local direct, proxy, n_seq = ...
n_seq = tonumber(n_seq) or 2000
assert(direct and proxy, "usage: factory tests/bench/proxy.lua DIRECT_URL PROXY_URL N_SEQ")

local BODY = '{"model":"MODEL","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
local HEADERS = { ["Content-Type"] = "application/json", Authorization = "Bearer sk-bench" }

local function request(url, model)
  local t0 = time.monotonic()
  local res, err = http.request{ method = "POST", url = url, body = BODY:gsub("MODEL", model), headers = HEADERS }
  if not res or res.status ~= 200 then error("request failed: " .. tostring(err or res.status .. " " .. res.body), 0) end
  return time.monotonic() - t0
end

local function pct(list, p)
  table.sort(list)
  return list[math.max(1, math.ceil(#list * p))] * 1000
end

local targets = { direct = { direct .. "/v1/chat/completions", "gpt-bench" },
                  proxy = { proxy .. "/v1/chat/completions", "factory/bench" } }

-- Warm-up: connections open, code paths compiled.
for _ = 1, 200 do
  request(targets.direct[1], targets.direct[2])
  request(targets.proxy[1], targets.proxy[2])
end

local seq = { direct = {}, proxy = {} }
for i = 1, n_seq do
  seq.direct[i] = request(targets.direct[1], targets.direct[2])
  seq.proxy[i] = request(targets.proxy[1], targets.proxy[2])
end
local d50, d99, p50, p99 = pct(seq.direct, 0.5), pct(seq.direct, 0.99), pct(seq.proxy, 0.5), pct(seq.proxy, 0.99)
print(("sequential (%d interleaved rounds): direct p50 %.3f ms p99 %.3f ms; proxy p50 %.3f ms p99 %.3f ms"):format(
  n_seq, d50, d99, p50, p99))
print(("sequential added latency: p50 %.3f ms (goal < 0.3), p99 %.3f ms"):format(p50 - d50, p99 - d99))
