-- Runs the Lua spec files given as arguments inside the factory binary.
-- Usage: factory tests/run.lua [--filter TEXT] FILE_spec.lua...
local testing = require "factory.testing"

local args, files, filter = { ... }, {}, nil
local i = 1
while i <= #args do
  if args[i] == "--filter" then
    filter = args[i + 1]
    i = i + 2
  else
    files[#files + 1] = args[i]
    i = i + 1
  end
end

local _, failed = testing.run(files, filter)
return failed > 0 and 1 or 0
