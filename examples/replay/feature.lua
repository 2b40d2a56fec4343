-- Recorded model replies for the `feature` pipeline over examples/work-items/due-dates.md,
-- replayed by examples/replay/server.lua. Each request takes the first entry whose
-- team and objective match its system prompt ("team: T; operative: O; objective: X")
-- and, if `when` is given, whose messages contain that text, and, if `step` is given,
-- that many assistant messages so far. Every stage's agent works in a worktree of (a
-- git copy of) examples/sample-repo and its tool calls really run there: analysis and
-- architecture read the code, the build stage (once the architect has answered its
-- question) writes the feature and its tests, verify runs the tests on the build's
-- commit, and docs writes the README section and changelog entry on top of it. The
-- files written are those under examples/replay/due-dates/.
local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")

local function result(t)
  t.blockers = t.blockers or {}
  t.assumptions_made = t.assumptions_made or {}
  t.verified_facts = t.verified_facts or {}
  return t
end

local function written(path)
  local f = assert(io.open(HERE .. "due-dates/" .. path, "rb"))
  local text = f:read("*a")
  f:close()
  return text
end

local ANSWERED = "## Answer from solution_architecture"
-- Words of this work item: examples/replay/bugfix.lua, served by the same replay
-- server, has a verify stage of the same team, and each reply is chosen by its run's.
local FEATURE = "due date"

local function build_step(n, name, arguments)
  return { team = "backend_engineering", objective = "stage build", when = ANSWERED, step = n,
           tool_call = { name = name, arguments = arguments } }
end

local function step(team, stage, n, name, arguments)
  return { team = team, objective = "stage " .. stage, step = n, when = FEATURE,
           tool_call = { name = name, arguments = arguments } }
end

return {
  step("business_analysis", "analysis", 0, "read_file", { path = "src/tasks.lua" }),
  step("solution_architecture", "architecture", 0, "grep", { pattern = "^function M%.", path = "src" }),
  step("qa_engineering", "verify", 0, "run_command", { command = "factory tests/tasks_test.lua" }),
  step("documentation", "docs", 0, "read_file", { path = "README.md" }),
  step("documentation", "docs", 1, "write_file", { path = "README.md", text = written("README.md") }),
  step("documentation", "docs", 2, "write_file", { path = "CHANGELOG.md", text = written("CHANGELOG.md") }),
  { team = "business_analysis", objective = "stage analysis", reply = result{
    status = "COMPLETE",
    reasoning = "The work item names the user need and the ordering rule; the date format is a safe default.",
    assumptions_made = { "A due date is a calendar day (YYYY-MM-DD), without a time or time zone." },
    verified_facts = { "Tasks are kept in memory by src/tasks.lua (add, complete, list)." },
    artifact = [[
# Requirements: tasks can have a due date
1. `tasks.add(title, due)` accepts an optional due date "YYYY-MM-DD"; an invalid date is an error.
2. `tasks.set_due(id, due)` sets or clears (nil) the due date of an existing task.
3. `tasks.list(today)` returns overdue open tasks first (oldest due first), then the rest in id order.
4. Tasks without a due date behave exactly as before.
Out of scope: reminders, times of day, time zones.]],
  } },
  { team = "solution_architecture", objective = "stage architecture", reply = result{
    status = "COMPLETE",
    reasoning = "The change fits the existing module: one field, one setter, one ordering rule.",
    verified_facts = { "src/tasks.lua has no persistence; list() returns tasks in id order." },
    artifact = [[
# Design
- Task gains `due` (string "YYYY-MM-DD" or nil); ISO dates compare correctly as strings.
- `validate_due(s)`: pattern ^%d%d%d%d%-%d%d%-%d%d$ plus month/day ranges.
- `list(today)`: stable partition into overdue-open (sorted by due, then id) and the rest (id order).
ADR-1: store dates as ISO strings, not os.time values: no time-zone ambiguity, trivially comparable.]],
  } },
  build_step(0, "read_file", { path = "src/tasks.lua" }),
  build_step(1, "write_file", { path = "src/tasks.lua", text = written("src/tasks.lua") }),
  build_step(2, "write_file", { path = "tests/tasks_test.lua", text = written("tests/tasks_test.lua") }),
  build_step(3, "finish", result{
    status = "COMPLETE",
    reasoning = "Implemented as designed; list() without `today` keeps the old order, as the architect answered.",
    verified_facts = { "tests/tasks_test.lua has a case for each requirement (run it: factory tests/tasks_test.lua)." },
    learnings = { "In this repository, ISO date strings are compared directly; never convert to os.time." },
    artifact = [[
# Change summary
- src/tasks.lua: `add(title, due)`, `set_due(id, due)`, `validate_due`, `list(today)` ordering.
- tests/tasks_test.lua: new cases (invalid dates, set and clear a date, overdue first, unchanged order without today).
Tests: `factory tests/tasks_test.lua` -> "tasks: ok".]],
  }),
  { team = "backend_engineering", objective = "stage build", reply = result{
    status = "NEEDS_CLARIFICATION",
    reasoning = "The design does not say what list() does when the caller gives no date.",
    clarification_needed = { team = "solution_architecture",
                             question = "When list() is called without `today`, should it use the system date or keep the old order?" },
  } },
  { team = "solution_architecture", objective = "clarification", reply = result{
    status = "COMPLETE",
    reasoning = "Reading the clock inside list() would make it untestable and change existing callers.",
    artifact = "Keep the old id order when `today` is nil; callers that want overdue-first pass the date.",
  } },
  { team = "qa_engineering", objective = "stage verify", when = FEATURE, reply = result{
    status = "COMPLETE",
    reasoning = "Every acceptance criterion maps to a test that ran and passed.",
    verified_facts = { "`factory tests/tasks_test.lua` on the build's commit: exit code 0, \"tasks: ok\".",
                       "Criteria 1-4 each have at least one passing test in tests/tasks_test.lua." },
    artifact = [[
# Test report
| criterion | test | result |
| 1 add with due / invalid due | add_due, add_invalid_due | pass |
| 2 set and clear due | set_due, clear_due | pass |
| 3 overdue first | list_overdue_first | pass |
| 4 unchanged without dates | list_without_today | pass |
No defects found.]],
  } },
  step("documentation", "docs", 3, "finish", result{
    status = "COMPLETE",
    reasoning = "README documents the API; the changelog records the feature.",
    artifact = [[
README.md: "Due dates" section: `add(title, due)`, `set_due(id, due)`, `list(today)` with an example.
CHANGELOG.md (new): Added optional due dates on tasks; `list(today)` shows overdue tasks first.]],
  }),
}
