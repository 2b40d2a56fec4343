-- Proxy benchmark client: the same chat request sent to the fake upstream directly
-- and through `factory serve`.
-- Usage: factory tests/bench/proxy.lua DIRECT_URL PROXY_URL N_SEQ N_CONC C
-- Sequential: N_SEQ interleaved rounds (one direct, one proxied request each), one at
-- a time. Concurrent: N_CONC requests by C fibers, direct, then proxied. Prints the
-- p50/p99 of each and the proxy's added latency and throughput ratio.
local http = require "factory.http"
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local direct, proxy, n_seq, n_conc, c = ...
n_seq, n_conc, c = tonumber(n_seq) or 2000, tonumber(n_conc) or 20000, tonumber(c) or 64
assert(direct and proxy, "usage: factory tests/bench/proxy.lua DIRECT_URL PROXY_URL N_SEQ N_CONC C")

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

local function concurrent(which)
  local lat, per = {}, math.ceil(n_conc / c)
  local t0 = time.monotonic()
  local fibers = {}
  for k = 1, c do
    fibers[k] = fiber.spawn(function()
      for _ = 1, per do
        local d = request(targets[which][1], targets[which][2])   -- yields: index after
        lat[#lat + 1] = d
      end
    end)
  end
  local ok, outcomes = fiber.all(fibers)
  if not ok then
    for _, o in ipairs(outcomes) do if not o.ok then error(o[1], 0) end end
  end
  local secs = time.monotonic() - t0
  return #lat / secs, pct(lat, 0.5), pct(lat, 0.99)
end

local drps, dc50, dc99 = concurrent("direct")
local prps, pc50, pc99 = concurrent("proxy")
print(("concurrency %d: direct %.0f req/s p50 %.3f ms p99 %.3f ms; proxy %.0f req/s p50 %.3f ms p99 %.3f ms"):format(
  c, drps, dc50, dc99, prps, pc50, pc99))
print(("concurrency %d added latency: p50 %.3f ms, p99 %.3f ms; throughput ratio proxy/direct: %.2f (goal >= 0.6)"):format(
  c, pc50 - dc50, pc99 - dc99, prps / drps))
