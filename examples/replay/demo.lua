-- `make demo`: the `feature` pipeline end to end, offline. The model is the
-- REPLAY provider (examples/replay/server.lua): recorded replies, no model runs.
-- A fresh store under /tmp; the run, a clarification between teams, the summary,
-- then the run's timeline.
local fs = require "factory.core.fs"
local run_cli = require "factory.run_cli"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local ROOT = HERE .. "../../"
local replay = dofile(HERE .. "server.lua")

print("== OFFLINE DEMO: model replies are REPLAYED from examples/replay/feature.lua (no model is called)\n")
local srv = assert(replay.start{ delay = 0.3 }) -- paced like a fast model, to watch
local tmp = os.tmpname()
os.remove(tmp)
assert(fs.mkdir_p(tmp))
local url = "sqlite:" .. tmp .. "/demo.db"
local code = run_cli.main("run", { "feature", "--repo", ROOT .. "examples/sample-repo",
  "--file", ROOT .. "examples/work-items/due-dates.md", "--project", ROOT, "--db", url },
  { router = replay.router_config(srv:url()) })
print("\n== the run's timeline: factory runs show 1\n")
run_cli.main("runs", { "show", "1", "--db", url })
srv:close()
fs.remove(tmp, { recursive = true })
return code
