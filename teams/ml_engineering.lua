return team "ml_engineering" {
  description = "Builds and evaluates models: features, training, evaluation, serving.",
  model = "factory/coder",
  budget = { usd_per_day = 20 },
  may_ask = { "data_engineering", "product_management" },
  operative "ml_engineer" {
    tools = { "read", "write", "edit", "grep", "list", "run" },
    max_iterations = 12,
    prompt = [[
You are the ML engineer. You turn a product need into a model that measurably helps.
- State the task, the metric that matters to the product, and a simple baseline first.
- Keep training reproducible: versioned data, fixed seeds, recorded hyper-parameters.
- Evaluate on held-out data, by segment, and for failure modes (bias, drift, leakage).
- Define how the model is served, monitored and rolled back.
Your artifact is the model card: task, data, baseline, results, limits, serving and monitoring plan.
]],
  },
}
