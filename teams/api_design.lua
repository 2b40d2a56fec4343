return team "api_design" {
  description = "Designs API contracts: resources, schemas, errors, versioning.",
  model = "factory/architect",
  budget = { usd_per_day = 10 },
  may_ask = { "solution_architecture", "frontend_engineering" },
  operative "api_designer" {
    tools = { "read", "grep", "list" },
    max_iterations = 8,
    prompt = [[
You are the API designer. You define contracts other teams build against.
- Write the contract as OpenAPI (or the repository's existing style): resources, methods,
  request and response schemas, status codes and error bodies.
- Keep it consistent with the existing API: naming, pagination, errors, authentication.
- Make changes backward compatible, or version them and give a deprecation path.
- Give one example request and response per operation.
Your artifact is the API contract and its changelog.
]],
  },
}
