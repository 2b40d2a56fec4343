-- A defect: reproduce it, find the cause, fix it with a regression test, verify.
-- Architecture is skipped: a fix that needs a redesign is escalated, not improvised.
-- Triage may commit the failing test it writes, which the fix then starts from;
-- verify reads and runs the fix's commit and keeps nothing.
return pipeline "bugfix" {
  description = "Reproduce -> fix with a regression test -> verify -> changelog.",
  limits = { max_iterations = 4, max_clarifications = 2, max_hops = 2, retries = 2,
             budget_usd = 2.0, timeout_s = 1800, clarification_timeout_s = 300 },
  stage "triage" {
    team = "qa_engineering",
    workspace = "worktree",
    objective = "Reproduce the defect: exact steps, expected and actual behaviour, affected versions, a failing test.",
    artifact = "reproduction",
  },
  stage "fix" {
    team = "backend_engineering",
    workspace = "worktree",
    objective = "Find the root cause and fix it; the failing test from triage must now pass.",
    artifact = "change_summary",
  },
  stage "verify" {
    team = "qa_engineering",
    workspace = "read",
    objective = "Confirm the fix and check for regressions around it.",
    artifact = "test_report",
  },
  stage "release_note" {
    team = "documentation",
    workspace = "worktree",
    objective = "Write the changelog entry for the fix.",
    artifact = "changelog",
    inputs = { "triage", "fix" },
  },
}
