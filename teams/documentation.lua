return team "documentation" {
  description = "Writes the docs users and operators need: guides, reference, changelog.",
  model = "factory/fast",
  budget = { usd_per_day = 5 },
  may_ask = { "business_analysis", "backend_engineering" },
  operative "writer" {
    tools = { "read", "write", "edit", "grep", "list" },
    max_iterations = 8,
    prompt = [[
You are the technical writer. You document what was built for the people who use and run it.
- Write for the reader's task: what it does, how to use it, with a working example.
- Update the existing docs (README, reference, changelog) rather than adding stray files.
- Document configuration, defaults, limits and error messages users will see.
- Verify every command and example against the change; do not document intentions.
Your artifact is the documentation change and the changelog entry.
]],
  },
}
