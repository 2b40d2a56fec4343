-- tests/tools/lock_racer.lua: one contender of the cross-process file-lock race
-- (tests/lua/factory/agents/locks_spec.lua).
--
--   factory tests/tools/lock_racer.lua --db URL --owner NAME --at EPOCH_SECONDS [--rounds N]
--
-- Prints "ready", waits until the wall clock reaches --at (so that every contender
-- asks at the same moment), then asks for the lock on file:race:src/x.c --rounds
-- times (default 1) and prints one line per answer: "won HOW" or "lost CODE".
local db = require "factory.db"
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local locks = require "factory.agents.locks"

local opts = { rounds = 1 }
local args = { ... }
for i = 1, #args, 2 do
  local name = args[i]:match("^%-%-(.+)$")
  assert(name and args[i + 1], "usage: lock_racer.lua --db URL --owner NAME --at EPOCH [--rounds N]")
  opts[name] = tonumber(args[i + 1]) or args[i + 1]
end

local d = assert(db.open(opts.db))
io.stdout:write("ready\n")
io.stdout:flush()
local wait = opts.at - time.now()
if wait > 0 then fiber.sleep(wait) end
for _ = 1, opts.rounds do
  local ok, how_or_err, code = locks.acquire(d, { repo = "race", path = "src/x.c", owner = opts.owner,
                                                  supervisor = "lead" })
  if ok then
    io.stdout:write("won ", how_or_err, "\n")
  elseif code == "ECONFLICT" then
    io.stdout:write("lost ", code, "\n")
  else
    io.stdout:write("error ", tostring(how_or_err), "\n")
  end
end
io.stdout:flush()
d:close()
return 0
