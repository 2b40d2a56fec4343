-- tests/bench/spawn.lua N CONC MB: spawns /bin/true N times, CONC at a time, each
-- with the default options (stdout and stderr piped) and waited for; prints
-- processes per second. MB > 0 first fills the Lua heap with that many MiB of
-- strings, to show the spawn cost does not grow with the engine's memory.
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local n, conc, mb = tonumber((...)), tonumber((select(2, ...))), tonumber((select(3, ...))) or 0
assert(n and conc, "usage: factory spawn.lua N CONC [MB]")

local ballast, body = {}, ("x"):rep(65536 - 16)
for i = 1, mb * 16 do
  -- distinct at both ends, so every 64 KiB string is its own object
  ballast[i] = ("%08d"):format(i) .. body .. ("%08d"):format(i)
end

local started, failures = 0, 0
local t0 = time.monotonic()
local workers = {}
for w = 1, conc do
  workers[w] = fiber.spawn(function()
    while started < n do
      started = started + 1
      local p = assert(proc.spawn { argv = { "/bin/true" } })
      if p:wait().code ~= 0 then failures = failures + 1 end
      p:close()
    end
  end)
end
assert(fiber.all(workers), "a worker failed")
local dt = time.monotonic() - t0
assert(failures == 0, failures .. " children failed")
assert(#ballast == mb * 16)
print(("%.0f"):format(n / dt))
