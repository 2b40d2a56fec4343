-- Every team of the factory in delivery order: product framing to operations.
-- One stage per team, seventeen in all. Reviews and designs read the run's latest
-- change in a worktree and keep nothing (workspace = "read"); the stages that change
-- code, data, models, delivery or docs commit on branches that build on one another.
return pipeline "full" {
  description = "All 17 teams: product -> analysis -> ... -> operations -> docs.",
  limits = { max_iterations = 6, max_clarifications = 4, max_hops = 3, retries = 2,
             budget_usd = 25.0, timeout_s = 14400, clarification_timeout_s = 600 },
  stage "product" {
    team = "product_management",
    workspace = "read",
    objective = "Frame the work item: problem, users, scope in and out, success metric.",
    artifact = "product_brief",
  },
  stage "analysis" {
    team = "business_analysis",
    workspace = "read",
    objective = "Turn the brief into requirements with numbered, testable acceptance criteria.",
    artifact = "requirements",
  },
  stage "compliance" {
    team = "compliance",
    workspace = "read",
    objective = "Check the requirements for privacy, licensing and retention obligations.",
    artifact = "compliance_review",
  },
  stage "ux" {
    team = "ux_design",
    workspace = "read",
    objective = "Design the user flows, states, copy and accessibility.",
    artifact = "ux_spec",
  },
  stage "architecture" {
    team = "solution_architecture",
    workspace = "read",
    objective = "Design the change: components, interfaces, data flow, ADRs, file-level plan.",
    artifact = "design",
  },
  stage "api" {
    team = "api_design",
    workspace = "read",
    objective = "Define the API contracts the design needs.",
    artifact = "api_contract",
  },
  stage "database" {
    team = "database_engineering",
    workspace = "worktree",
    objective = "Design the schema changes and migrations with a rollback plan.",
    artifact = "migrations",
  },
  stage "backend" {
    team = "backend_engineering",
    workspace = "worktree",
    objective = "Implement the server side with tests.",
    artifact = "backend_change",
  },
  stage "frontend" {
    team = "frontend_engineering",
    workspace = "worktree",
    objective = "Implement the user interface with tests.",
    artifact = "frontend_change",
  },
  stage "integration" {
    team = "feature_engineering",
    workspace = "worktree",
    objective = "Wire the layers together end to end and test the whole flow.",
    artifact = "integration_change",
  },
  stage "data" {
    team = "data_engineering",
    workspace = "worktree",
    objective = "Add the data pipelines, quality checks and backfills the feature needs.",
    artifact = "data_change",
  },
  stage "ml" {
    team = "ml_engineering",
    workspace = "worktree",
    objective = "Build or adapt the models the feature needs, with evaluation.",
    artifact = "model_card",
  },
  stage "qa" {
    team = "qa_engineering",
    workspace = "read",
    objective = "Verify every acceptance criterion; report defects.",
    artifact = "test_report",
  },
  stage "security_review" {
    team = "security_engineering",
    workspace = "read",
    objective = "Review the implementation for vulnerabilities; give a verdict.",
    artifact = "security_review",
  },
  stage "devops" {
    team = "devops",
    workspace = "worktree",
    objective = "Make it build, deploy and roll back through CI/CD.",
    artifact = "delivery_change",
  },
  stage "operations" {
    team = "sre",
    workspace = "read",
    objective = "Review operational readiness: SLOs, alerts, runbook.",
    artifact = "readiness_review",
  },
  stage "docs" {
    team = "documentation",
    workspace = "worktree",
    objective = "Document the feature for users and operators, with a changelog entry.",
    artifact = "documentation",
  },
}
