-- `make demo` (examples/replay/demo.lua) as a new user runs it: both pipelines end to
-- end on the replayed model, each build stage's branch holds a change whose tests pass
-- there while main is untouched.
local proc = require "factory.proc"
local host = require "factory.core.host"

local ROOT = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../"

describe("make demo", function()
  it("runs feature and bugfix to the end, and each agent's branch passes the repository's tests", function()
    local res = assert(proc.run{ argv = { host.exe, ROOT .. "examples/replay/demo.lua" }, cwd = ROOT,
                                 env = { PATH = os.getenv("PATH"), HOME = os.getenv("HOME") },
                                 stderr = "stdout", timeout = 120 })
    local out = res.stdout
    assert.equal(0, res.code, out)
    assert.contains("run 1 succeeded (feature)", out)
    assert.matches("build +backend_engineering/implementer +COMPLETE +attempts 2 +branch factory%-run1%-build%-2 "
      .. "%(commit %x+, 2 file%(s%) %+%d+ %-%d+%)", out)
    assert.contains("+function M.set_due(id, due)", out)
    assert.contains("factory tests/tasks_test.lua on the branch: exit 0\ntasks: ok", out)
    assert.contains("run 2 succeeded (bugfix)", out)
    assert.contains("-int calc_sub(int a, int b) { return a + b; }\n+int calc_sub(int a, int b) { return a - b; }", out)
    assert.contains("make -s test on the branch: exit 0\nall checks passed", out)
    assert.contains("make -s test on main (untouched): exit 2", out)
  end, { timeout = 150 })
end)
