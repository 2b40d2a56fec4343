-- `make demo` (examples/replay/demo.lua) as a new user runs it: both pipelines end to
-- end on the replayed model, each build stage's branch holds a change whose tests pass
-- there while main is untouched; the stages that read the code read it in a worktree
-- of the run's latest change (verify runs the tests on the build's commit), and the
-- stages that write documentation commit it on top; `factory status` ends it.
local proc = require "factory.proc"
local host = require "factory.core.host"

local ROOT = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../"

-- The verify stage (its progress line `place`) of run `run` read the commit stage
-- `from` left and ran `command` there, which passed.
local function verified(out, place, run, from, command)
  local lit = function(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end
  assert.matches(("\n%s verify: qa_engineering/tester %%(attempt 1%%)\n  worktree factory%%-run%d%%-verify%%-1 to read"
    .. " and run the code from stage %s's commit %%x+ %%(nothing changed there is kept%%)\n  model factory/fast ok:"
    .. " [%%d,]+ tok, %%$0%%.0000\n  tool run_command `%s`: exit 0\n"):format(lit(place), run, from, lit(command)), out)
end

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
    verified(out, "[4/5]", 1, "build", "factory tests/tasks_test.lua")
    assert.matches("\n  analysis +business_analysis/analyst +COMPLETE +attempts 1  read commit %x+\n", out)
    assert.contains("the run's whole change (2 stages changed the code) is on branch factory-run1-docs-1\n", out)
    assert.contains("+## Due dates\n", out)
    assert.contains("+- Added: optional due dates on tasks", out)
    assert.contains("factory tests/tasks_test.lua on the branch: exit 0\ntasks: ok", out)
    assert.contains("run 2 succeeded (bugfix)", out)
    assert.contains("-int calc_sub(int a, int b) { return a + b; }\n+int calc_sub(int a, int b) { return a - b; }", out)
    verified(out, "[3/4]", 2, "fix", "make -s test")
    assert.contains("+- Fixed: `calc_sub` returned the sum of its arguments instead of their difference.", out)
    assert.contains("make -s test on the branch: exit 0\nall checks passed", out)
    assert.contains("make -s test on main (untouched): exit 2", out)
    -- The morning view: nothing left to do, and each team's calls against its budget.
    assert.contains("\nruns: 2 succeeded\nmodel calls today (since ", out)
    assert.matches("\n  backend_engineering +%d+ +[%d,]+ +%$0%.0000 +%- +%$25%.0000 +%$25%.0000\n", out)
  end, { timeout = 150 })
end)
