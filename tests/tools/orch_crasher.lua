-- tests/tools/orch_crasher.lua: an engine process that dies with its agent running,
-- for the start-up cleanup test of factory.agents.orchestrator
-- (tests/lua/factory/agents/orchestrator_spec.lua).
--
--   factory tests/tools/orch_crasher.lua --db URL --repo DIR --root DIR
--
-- Runs one objective whose agent takes the file lock of src/x.c, then starts an agent
-- process (a shell with a background grandchild, both sleeping) and prints
-- "ready PGID GRANDCHILD_PID WORKTREE" once the process is recorded in the store. It
-- then waits for ever: the test kills it with SIGKILL, leaving the agent's process
-- group, its worktree, the records and the file lock behind.
local db = require "factory.db"
local fiber = require "factory.fiber"
local orchestrator = require "factory.agents.orchestrator"

local opts = {}
local args = { ... }
for i = 1, #args, 2 do
  local name = args[i]:match("^%-%-(.+)$")
  assert(name and args[i + 1], "usage: orch_crasher.lua --db URL --repo DIR --root DIR")
  opts[name] = args[i + 1]
end

local d = assert(db.open(opts.db))
local orch = assert(orchestrator.new{ db = d, repo = opts.repo, worktree_root = opts.root, max_concurrent = 1 })
orch:submit{ id = "doomed", objective = "die with the engine", supervisor = "lead", agent = function(ctx)
  assert(ctx.lock("src/x.c"))
  local p = assert(ctx.spawn{ argv = { "/bin/sh", "-c", "sleep 60 & echo $$ $!; exec sleep 61" } })
  local line = p:read_line()
  io.stdout:write("ready ", line, " ", ctx.worktree, "\n")
  io.stdout:flush()
  p:wait()
  return true
end }
while true do fiber.sleep(60) end
