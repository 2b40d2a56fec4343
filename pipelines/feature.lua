-- A new feature, the five-team sequence of phase 1: requirements, design, build,
-- verification, documentation. Each stage sees every earlier stage's artifact. Each
-- works in a worktree of the run's repository: "read" stages read and run the run's
-- latest change and keep nothing; "worktree" stages commit on a branch of their own,
-- from the latest change (docs commits on top of the build).
return pipeline "feature" {
  description = "Business analysis -> architecture -> backend -> QA -> documentation.",
  limits = { max_iterations = 6, max_clarifications = 3, max_hops = 2, retries = 2,
             budget_usd = 5.0, timeout_s = 3600, clarification_timeout_s = 300 },
  stage "analysis" {
    team = "business_analysis",
    workspace = "read",
    objective = "Turn the work item into requirements with numbered, testable acceptance criteria.",
    artifact = "requirements",
  },
  stage "architecture" {
    team = "solution_architecture",
    workspace = "read",
    objective = "Design the change: components, interfaces, data flow, ADRs and a file-level plan.",
    artifact = "design",
  },
  stage "build" {
    team = "backend_engineering",
    workspace = "worktree",
    objective = "Implement the design with tests; report what changed and what the tests showed.",
    artifact = "change_summary",
  },
  stage "verify" {
    team = "qa_engineering",
    workspace = "read",
    objective = "Verify the change against every acceptance criterion; report defects.",
    artifact = "test_report",
    acceptance = { "every acceptance criterion maps to a test that ran" },
  },
  stage "docs" {
    team = "documentation",
    workspace = "worktree",
    objective = "Document the change for users and operators, with a changelog entry.",
    artifact = "documentation",
  },
}
