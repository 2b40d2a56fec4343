-- tests/tools/sample_repo.lua: a git repository made from examples/sample-c-repo,
-- whose `make test` fails until calc_sub subtracts.
--   sample_repo.make(dir) -> dir    copies the example to dir (which must not
--       exist; no build output), then git init and one commit on main by
--       "Base <base@factory.test>"
local git = require "factory.git"
local proc = require "factory.proc"
local fs = require "factory.core.fs"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local SAMPLE = HERE .. "../../examples/sample-c-repo"
local PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"

local M = {}

function M.make(dir)
  local cp = assert(proc.run{ argv = { "cp", "-R", SAMPLE, dir }, env = { PATH = PATH } })
  assert(cp.code == 0, "cp failed: " .. tostring(cp.stderr))
  fs.remove(dir .. "/build", { recursive = true })
  local repo = assert(git.init(dir))
  assert(repo:add_all())
  assert(repo:commit("sample C repository", { author = { name = "Base", email = "base@factory.test" } }))
  repo:close()
  return dir
end

return M
