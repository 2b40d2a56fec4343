-- tests/tools/backends.lua: the two store backends the specs run their cases on.
--   backends.sqlite_url()  a fresh SQLite database file in /tmp (removed by cleanup)
--   backends.cleanup()     removes those files; use as after_each(backends.cleanup)
--   backends.LIST          { { "sqlite", sqlite_url }, { "postgres", pg.fresh } }
local pg = require "tests.tools.pg"

local M = {}

local made = {}

function M.sqlite_url()
  local path = os.tmpname()
  os.remove(path)
  made[#made + 1] = path .. ".db"
  return "sqlite:" .. path .. ".db"
end

function M.cleanup()
  for _, p in ipairs(made) do
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(p .. suffix) end
  end
  made = {}
end

M.LIST = { { "sqlite", M.sqlite_url }, { "postgres", pg.fresh } }

return M
