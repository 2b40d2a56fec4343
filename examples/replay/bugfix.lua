-- Recorded model replies for the `bugfix` pipeline over examples/sample-c-repo (its
-- `make test` fails: calc_sub adds). Replayed by examples/replay/server.lua: every
-- stage's agent works in a worktree, its turns chosen by `step` (assistant messages
-- so far), and each tool call really runs there: triage runs the failing tests, the
-- fix stage fixes the code, verify runs the tests on the fix's commit, and
-- release_note adds the changelog entry on top of it.
local function result(t)
  t.blockers = t.blockers or {}
  t.assumptions_made = t.assumptions_made or {}
  t.verified_facts = t.verified_facts or {}
  return t
end

-- Words of this work item: examples/replay/feature.lua, served by the same replay
-- server, has a verify stage of the same team, and each reply is chosen by its run's.
local BUGFIX = "calc_sub"

local function step(n, name, arguments, team, stage)
  return { team = team or "backend_engineering", objective = "stage " .. (stage or "fix"), step = n, when = BUGFIX,
           tool_call = { name = name, arguments = arguments } }
end

local CHANGELOG = [[
# Changelog

## Unreleased
- Fixed: `calc_sub` returned the sum of its arguments instead of their difference.
]]

return {
  step(0, "run_command", { command = "make -s test" }, "qa_engineering", "triage"),
  step(0, "run_command", { command = "make -s test" }, "qa_engineering", "verify"),
  step(0, "write_file", { path = "CHANGELOG.md", text = CHANGELOG }, "documentation", "release_note"),
  { team = "qa_engineering", objective = "stage triage", reply = result{
    status = "COMPLETE",
    reasoning = "The report names the function and the case; tests/test_calc.c already checks it and fails.",
    verified_facts = { "tests/test_calc.c checks calc_sub(2, 3) == -1 and calc_sub(7, 3) == 4." },
    artifact = [[
# Reproduction
1. `make test` in the repository.
Expected: "all checks passed". Actual: `FAIL tests/test_calc.c: calc_sub(2, 3): expected -1, got 5`
and `calc_sub(7, 3): expected 4, got 10`. The failing test is tests/test_calc.c.]],
  } },
  step(0, "run_command", { command = "make -s test" }),
  step(1, "read_file", { path = "tests/test_calc.c" }),
  step(2, "read_file", { path = "src/calc.c" }),
  step(3, "edit_file", { path = "src/calc.c", old = "int calc_sub(int a, int b) { return a + b; }",
                         new = "int calc_sub(int a, int b) { return a - b; }" }),
  step(4, "run_command", { command = "make -s test" }),
  step(5, "finish", {
    status = "COMPLETE",
    reasoning = "calc_sub returned a + b; it now returns a - b and the repository's tests pass.",
    verified_facts = { "`make test` passes on the branch: all checks passed." },
    learnings = { "examples/sample-c-repo: `make test` builds build/test_calc and runs every check." },
    artifact = "src/calc.c: calc_sub returns a - b (was a + b). `make test`: all checks passed.",
  }),
  { team = "qa_engineering", objective = "stage verify", when = BUGFIX, reply = result{
    status = "COMPLETE",
    reasoning = "The fix is one operator; the checks around it (add, mul) still pass.",
    verified_facts = { "`make -s test` on the fix's commit: exit code 0, all checks passed.",
                       "The branch's change touches only calc_sub in src/calc.c." },
    artifact = "# Test report\ncalc_sub: 2 checks pass; calc_add and calc_mul unchanged and passing. No regressions.",
  } },
  { team = "documentation", objective = "stage release_note", reply = result{
    status = "COMPLETE",
    reasoning = "A user-visible behaviour changed: subtraction now gives the right result.",
    artifact = "CHANGELOG.md (new): Fixed: `calc_sub` returned the sum of its arguments instead of their difference.",
  } },
}
