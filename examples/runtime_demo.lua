-- The runtime demo (`./factory examples/runtime_demo.lua`). It shows what the pipeline
-- engine stands on: one process, one event loop, many
-- fibers written as straight-line code.
--   1. a local HTTP server (factory.http_server) answering 200 concurrent requests
--      from the HTTP client (factory.http, libcurl) in the same process;
--   2. ten child processes run at once, their output streamed line by line;
--   3. a command that outlives its timeout, killed together with its children.
local fiber = require "factory.fiber"
local http = require "factory.http"
local http_server = require "factory.http_server"
local proc = require "factory.proc"
local time = require "factory.core.time"

local function section(title) print(("\n== %s"):format(title)) end

section("HTTP: a server and 200 concurrent clients in one process")
local srv = assert(http_server.new{ host = "127.0.0.1", port = 0 })
srv:route("GET", "/work/:id", function(req, res)
  fiber.sleep(0.05)  -- pretend to do some I/O-bound work
  res:json(200, { id = tonumber(req.params.id), done = true })
end)
local started = time.monotonic()
local clients = {}
for i = 1, 200 do
  clients[i] = fiber.spawn(function()
    local res = assert(http.get(srv:url() .. "/work/" .. i))
    return res.status
  end)
end
local ok, outcomes = fiber.all(clients, 10)
assert(ok, "a request failed")
local statuses = 0
for _, o in ipairs(outcomes) do statuses = statuses + (o[1] == 200 and 1 or 0) end
print(("%d/200 requests answered 200 in %.0f ms (each handler sleeps 50 ms: they ran concurrently)")
  :format(statuses, (time.monotonic() - started) * 1000))
srv:close()

section("Processes: ten children at once, output streamed as it comes")
started = time.monotonic()
local children = {}
for i = 1, 10 do
  children[i] = fiber.spawn(function()
    local p = assert(proc.spawn{ argv = { "sh", "-c", "sleep 0.2; echo child " .. i .. " says hello from $$" } })
    local line = p:read_line()
    local status = p:wait()
    return line, status.code
  end)
end
ok, outcomes = fiber.all(children, 10)
assert(ok, "a child failed")
for _, o in ipairs(outcomes) do print(("  %s (exit %d)"):format(o[1], o[2])) end
print(("ten 0.2 s children took %.0f ms in total"):format((time.monotonic() - started) * 1000))

section("Timeouts: a command that ignores SIGTERM and starts its own child")
started = time.monotonic()
local r = assert(proc.run{
  argv = { "sh", "-c", "trap '' TERM; sleep 30 & echo started background sleep $!; wait" },
  timeout = 0.5,
})
print(("%s -> killed after %.2f s (timed_out = %s, signal %s); its sleep died with it")
  :format(r.stdout:gsub("\n$", ""), time.monotonic() - started, tostring(r.timed_out), tostring(r.signal)))

