-- tests/tools/sample_repo.lua: a git repository made from one of the examples:
-- examples/sample-c-repo (the default), whose `make test` fails until calc_sub
-- subtracts, or examples/sample-repo (the task list of the `feature` replay).
--   sample_repo.make(dir [, example]) -> dir    copies the example to dir (which must
--       not exist; no build output), then git init and one commit on main by
--       "Base <base@factory.test>"
local git = require "factory.git"
local proc = require "factory.proc"
local fs = require "factory.core.fs"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local EXAMPLES = HERE .. "../../examples/"
local PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"

local M = {}

function M.make(dir, example)
  local cp = assert(proc.run{ argv = { "cp", "-R", EXAMPLES .. (example or "sample-c-repo"), dir },
                              env = { PATH = PATH } })
  assert(cp.code == 0, "cp failed: " .. tostring(cp.stderr))
  fs.remove(dir .. "/build", { recursive = true })
  local repo = assert(git.init(dir))
  assert(repo:add_all())
  assert(repo:commit("sample repository " .. (example or "sample-c-repo"),
                     { author = { name = "Base", email = "base@factory.test" } }))
  repo:close()
  return dir
end

return M
