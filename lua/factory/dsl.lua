-- factory.dsl: the team and pipeline definition languages, their validation, and
-- the project (teams/ + pipelines/) as two hot-reloadable registries.
--
--   return team "backend_engineering" {
--     description = "...", model = "factory/coder", may_ask = { "solution_architecture" },
--     budget = { usd_per_day = 20 }, recall = 8, context_window = 32000,
--     responder = "implementer",                 -- answers clarifications (default: first)
--     operative "implementer" { prompt = [[...]], tools = { "read", ... }, max_iterations = 20,
--                               model =, agent = "builtin" | { cli = "claude" }, max_tokens =,
--                               temperature =, context_window =,
--                               command_timeout = seconds a built-in agent's run_command
--                                 may take (default 120: a slow test suite needs more) },
--   }
--   return pipeline "feature" {
--     description = "...",
--     limits = { max_iterations =, max_clarifications =, max_hops =, retries =, budget_usd =,
--                timeout_s =, clarification_timeout_s =, outage_retries =, outage_wait_s = },
--     stage "analysis" { team = "business_analysis", objective = "...", artifact = "requirements",
--                        acceptance = { "..." }, inputs = { "earlier stage", ... }, operative =,
--                        workspace = "worktree" },   -- a coding agent changes the run's
--                                                    -- repository on its own branch;
--                                                    -- "read": the operative reads and
--                                                    -- runs the run's latest change with
--                                                    -- its tools, in a worktree thrown away
--   }
-- Validation normalises a definition in place: team.operatives is the list,
-- team.operative[name] the index; pipeline.stages the list with defaults filled in.
--
--   dsl.project(dir, { aliases = set | nil }) -> project
--     project.teams, project.pipelines   defs registries
--     project:load() -> problems         project:watch() -> handle with :stop()
-- aliases: the model names a team may use (nil: the canonical factory/* aliases).
local defs = require "factory.defs"
local config = require "factory.config"
local fs = require "factory.core.fs"

local M = {}

M.CANONICAL_ALIASES = { ["factory/architect"] = true, ["factory/coder"] = true, ["factory/fast"] = true,
                        ["factory/cheap"] = true, ["local/embed"] = true }
M.TOOLS = { read = true, write = true, edit = true, grep = true, list = true, run = true }
M.LIMITS = { max_iterations = 6, max_clarifications = 3, max_hops = 2, retries = 2, budget_usd = 5,
             timeout_s = 3600, clarification_timeout_s = 300, outage_retries = 3, outage_wait_s = 30 }
M.DEFAULT_WINDOW = 32000
M.DEFAULT_RECALL = 8

-- Which constructor made a table: "operative" or "stage".
local made_by = setmetatable({}, { __mode = "k" })

local function named(kind, collect, line, post)
  return function(name)
    if type(name) ~= "string" or name == "" then
      error(("%s needs a name: %s \"name\" { ... }"):format(kind, kind), 2)
    end
    local at = line()
    return function(body)
      if type(body) ~= "table" then error(("%s %q needs a body: %s %q { ... }"):format(kind, name, kind, name), 2) end
      body.name = name
      if post then post(body) end
      return collect(body, at)
    end
  end
end

local function team_dsl(collect, line)
  return {
    team = named("team", collect, line),
    operative = named("operative", collect, line, function(t) made_by[t] = "operative" end),
  }
end

local function pipeline_dsl(collect, line)
  return {
    pipeline = named("pipeline", collect, line),
    stage = named("stage", collect, line, function(t) made_by[t] = "stage" end),
  }
end

-- Validation raises { message =, where = } through fail(); the validators catch it.
local function fail(where, fmt, ...)
  error({ message = fmt:format(...), where = where }, 0)
end

local function check_fields(t, allowed, what)
  for k in pairs(t) do
    if type(k) ~= "number" and not allowed[k] then fail(t, "%s: unknown field '%s'", what, tostring(k)) end
  end
end

-- A value as the file wrote it: "5" (a string) is not 5.
local function shown(v)
  return type(v) == "string" and ("%q"):format(v) or tostring(v)
end

local function positive_int(t, key, what)
  local v = t[key]
  if v ~= nil and (type(v) ~= "number" or v ~= math.floor(v) or v < 1) then
    fail(t, "%s: %s must be a positive integer, got %s", what, key, shown(v))
  end
end

local function number_in(t, key, lo, hi, what)
  local v = t[key]
  if v ~= nil and (type(v) ~= "number" or v < lo or v > hi) then
    local range = hi == math.huge and ("%g or more"):format(lo) or ("from %g to %g"):format(lo, hi)
    fail(t, "%s: %s must be a number %s, got %s", what, key, range, shown(v))
  end
end

local function string_list(t, key, what)
  local v = t[key]
  if v == nil then return {} end
  if type(v) ~= "table" then fail(t, "%s: %s must be a list of strings", what, key) end
  for _, s in ipairs(v) do
    if type(s) ~= "string" then fail(t, "%s: %s must be a list of strings", what, key) end
  end
  return v
end

local function alias_ok(aliases, model)
  if aliases[model] then return true end
  local provider = type(model) == "string" and model:match("^([^/]+)/.+$")
  return provider ~= nil and aliases["provider:" .. provider] == true
end

local function check_model(t, aliases, what)
  if t.model == nil then return end
  if type(t.model) ~= "string" or not alias_ok(aliases, t.model) then
    local known = {}
    for a in pairs(aliases) do
      if not a:find("^provider:") then known[#known + 1] = a end
    end
    table.sort(known)
    fail(t, "%s: unknown model alias %s (%s)", what, ("%q"):format(tostring(t.model)), #known == 0
      and "factory.lua declares no model aliases: add it to its models {}"
      or "known: " .. table.concat(known, ", ") .. "; or add it to models {} in factory.lua")
  end
end

local OPERATIVE_FIELDS = { name = true, prompt = true, model = true, tools = true, max_iterations = true,
                           agent = true, max_tokens = true, temperature = true, context_window = true,
                           command_timeout = true }

-- A CLI agent's options: those of factory.agents.cli.run a team file may set.
local CLI_AGENT_FIELDS = { cli = true, command = true, format = true, prompt = true, max_iterations = true,
                           stuck_idle = true, max_retries = true, heartbeat_timeout = true, iteration_timeout = true,
                           kill_grace = true, env = true }
M.CLI_PRESETS = { claude = true, codex = true, aider = true }
local CLI_FORMATS = { claude = true, codex = true, plain = true }

-- Problems are reported at the operative's line (the agent table has none).
local function check_cli_agent(op, agent, what)
  what = what .. " agent"
  for k in pairs(agent) do
    if not CLI_AGENT_FIELDS[k] then fail(op, "%s: unknown field '%s'", what, tostring(k)) end
  end
  if agent.command ~= nil then
    local ok = type(agent.command) == "table" and #agent.command > 0
    for _, a in ipairs(ok and agent.command or {}) do ok = ok and type(a) == "string" end
    if not ok then fail(op, "%s: command must be a non-empty list of strings (argv)", what) end
  elseif not M.CLI_PRESETS[agent.cli] then
    fail(op, "%s: cli %q is not a preset (claude, codex, aider): give its command = { ... }", what, agent.cli)
  end
  if agent.format ~= nil and not CLI_FORMATS[agent.format] then
    fail(op, "%s: format must be \"claude\", \"codex\" or \"plain\", got %s", what, shown(agent.format))
  end
  if agent.prompt ~= nil and type(agent.prompt) ~= "string" then fail(op, "%s: prompt must be a string", what) end
  for _, k in ipairs({ "max_iterations", "stuck_idle", "max_retries" }) do
    local v = agent[k]
    if v ~= nil and (type(v) ~= "number" or v ~= math.floor(v) or v < 1) then
      fail(op, "%s: %s must be a positive integer, got %s", what, k, shown(v))
    end
  end
  for _, k in ipairs({ "heartbeat_timeout", "iteration_timeout", "kill_grace" }) do
    local v = agent[k]
    if v ~= nil and (type(v) ~= "number" or v <= 0) then
      fail(op, "%s: %s must be a number of seconds above 0, got %s", what, k, shown(v))
    end
  end
  if agent.env ~= nil then
    local ok = type(agent.env) == "table"
    for k, v in pairs(ok and agent.env or {}) do ok = ok and type(k) == "string" and type(v) == "string" end
    if not ok then fail(op, "%s: env must map names to strings", what) end
  end
end

local function check_operative(op, team, aliases)
  local what = ("operative %q"):format(op.name)
  check_fields(op, OPERATIVE_FIELDS, what)
  if type(op.prompt) ~= "string" or not op.prompt:find("%S") then
    fail(op, "%s of team %q has no prompt (prompt = [[...]])", what, team.name)
  end
  check_model(op, aliases, what)
  for _, tool in ipairs(string_list(op, "tools", what)) do
    if not M.TOOLS[tool] then fail(op, "%s: unknown tool %q", what, tool) end
  end
  positive_int(op, "max_iterations", what)
  positive_int(op, "max_tokens", what)
  positive_int(op, "context_window", what)
  number_in(op, "temperature", 0, 2, what)
  number_in(op, "command_timeout", 1, math.huge, what)
  local agent = op.agent or "builtin"
  if agent ~= "builtin" and not (type(agent) == "table" and type(agent.cli) == "string") then
    fail(op, "%s: agent must be \"builtin\" or { cli = \"name\", ... }", what)
  end
  if type(agent) == "table" then check_cli_agent(op, agent, what) end
  op.agent = agent
end

local TEAM_FIELDS = { name = true, description = true, model = true, budget = true, may_ask = true, recall = true,
                      context_window = true, responder = true }

-- has_team(name) -> whether a team of that name exists in the project.
local function team_validator(aliases, has_team)
  return function(def, name)
    local ok, err = pcall(function()
      if type(def) ~= "table" or def.name == nil then fail(nil, "a team file must return team \"name\" { ... }") end
      local what = ("team %q"):format(def.name)
      if def.name ~= name then fail(def, "%s must be defined in %s.lua", what, def.name) end
      local ops, by_name = {}, {}
      for k, v in pairs(def) do
        if type(k) == "number" then
          if made_by[v] ~= "operative" then fail(def, "%s: list entries must be operative \"name\" { ... }", what) end
        end
      end
      check_fields(def, TEAM_FIELDS, what)
      if type(def.description) ~= "string" or def.description == "" then
        fail(def, "%s: description must be a non-empty string", what)
      end
      if def.model == nil then fail(def, "%s: model is required (an alias such as \"factory/coder\")", what) end
      check_model(def, aliases, what)
      for i, op in ipairs(def) do
        if by_name[op.name] then fail(op, "%s: operative %q is defined twice", what, op.name) end
        check_operative(op, def, aliases)
        ops[i], by_name[op.name] = op, op
      end
      if #ops == 0 then fail(def, "%s has no operative (operative \"name\" { prompt = ... })", what) end
      for i = 1, #ops do def[i] = nil end
      for _, other in ipairs(string_list(def, "may_ask", what)) do
        if other == def.name then fail(def, "%s: may_ask names the team itself", what) end
        if not has_team(other) then fail(def, "%s: may_ask names no team: %q", what, other) end
      end
      local budget = def.budget
      if budget ~= nil then
        if type(budget) ~= "table" then fail(def, "%s: budget must be { usd_per_day =, tokens_per_day = }", what) end
        check_fields(budget, { usd_per_day = true, tokens_per_day = true }, what .. " budget")
        number_in(budget, "usd_per_day", 0, math.huge, what .. " budget")
        positive_int(budget, "tokens_per_day", what .. " budget")
      end
      positive_int(def, "recall", what)
      positive_int(def, "context_window", what)
      if def.responder ~= nil and not by_name[def.responder] then
        fail(def, "%s: responder names no operative of the team: %q", what, tostring(def.responder))
      end
      def.may_ask = def.may_ask or {}
      def.operatives, def.operative = ops, by_name
      def.responder = def.responder or ops[1].name
      def.recall = def.recall or M.DEFAULT_RECALL
    end)
    if ok then return true end
    if type(err) ~= "table" then error(err, 0) end
    return nil, err.message, err.where
  end
end

local STAGE_FIELDS = { name = true, team = true, objective = true, artifact = true, acceptance = true, inputs = true,
                       operative = true, workspace = true }

local function pipeline_validator(has_team)
  return function(def, name)
    local ok, err = pcall(function()
      if type(def) ~= "table" or def.name == nil then fail(nil, "a pipeline file must return pipeline \"name\" { ... }") end
      local what = ("pipeline %q"):format(def.name)
      if def.name ~= name then fail(def, "%s must be defined in %s.lua", what, def.name) end
      for k, v in pairs(def) do
        if type(k) == "number" and made_by[v] ~= "stage" then
          fail(def, "%s: list entries must be stage \"name\" { ... }", what)
        end
      end
      check_fields(def, { name = true, description = true, limits = true }, what)
      local limits = def.limits or {}
      if type(limits) ~= "table" then fail(def, "%s: limits must be a table", what) end
      for k in pairs(limits) do
        if M.LIMITS[k] == nil then fail(def, "%s: unknown limit '%s'", what, tostring(k)) end
      end
      for _, k in ipairs({ "max_iterations", "max_clarifications", "max_hops" }) do positive_int(limits, k, what .. " limits") end
      number_in(limits, "retries", 0, 2, what .. " limits")
      number_in(limits, "outage_retries", 0, 10, what .. " limits")
      for _, k in ipairs({ "budget_usd", "timeout_s", "clarification_timeout_s", "outage_wait_s" }) do
        number_in(limits, k, 0, math.huge, what .. " limits")
      end
      local merged = {}
      for k, v in pairs(M.LIMITS) do merged[k] = limits[k] == nil and v or limits[k] end
      local stages, seen = {}, {}
      for i, st in ipairs(def) do
        local swhat = ("stage %q"):format(st.name)
        if seen[st.name] then fail(st, "%s: stage %q is defined twice", what, st.name) end
        check_fields(st, STAGE_FIELDS, swhat)
        if type(st.team) ~= "string" then fail(st, "%s: team is required (team = \"name\")", swhat) end
        if not has_team(st.team) then fail(st, "%s: unknown team %q", swhat, st.team) end
        for _, k in ipairs({ "objective", "artifact", "operative" }) do
          if st[k] ~= nil and type(st[k]) ~= "string" then fail(st, "%s: %s must be a string", swhat, k) end
        end
        if st.workspace ~= nil and st.workspace ~= "worktree" and st.workspace ~= "read" then
          fail(st, "%s: workspace must be \"worktree\" (the agent changes the repository in its own worktree)"
            .. " or \"read\" (the agent reads and runs the run's latest change; nothing it changes is kept)", swhat)
        end
        string_list(st, "acceptance", swhat)
        for _, input in ipairs(string_list(st, "inputs", swhat)) do
          if not seen[input] then fail(st, "%s: inputs names no earlier stage: %q", swhat, input) end
        end
        st.artifact = st.artifact or "artifact"
        st.acceptance = st.acceptance or {}
        st.inputs = st.inputs or {}
        st.index = i
        seen[st.name] = st
        stages[i] = st
      end
      if #stages == 0 then fail(def, "%s has no stages (stage \"name\" { team = ... })", what) end
      for i = 1, #stages do def[i] = nil end
      def.stages, def.stage, def.limits = stages, seen, merged
    end)
    if ok then return true end
    if type(err) ~= "table" then error(err, 0) end
    return nil, err.message, err.where
  end
end

local Project = {}
Project.__index = Project

function M.project(dir, opts)
  opts = opts or {}
  dir = dir:gsub("(.)/+$", "%1")
  local teams_dir = dir == "." and "teams" or dir .. "/teams"
  local self = setmetatable({ dir = dir }, Project)
  -- A team whose file exists but does not load is still a team: a pipeline naming
  -- it reports the team's own problem, not a second "unknown team".
  local function has_team(name)
    return self.teams:get(name) ~= nil or fs.stat(teams_dir .. "/" .. name .. ".lua") ~= nil
  end
  self.teams = defs.registry{ kind = "team", dir = teams_dir, dsl = team_dsl,
                              validate = team_validator(opts.aliases or M.CANONICAL_ALIASES, has_team) }
  self.pipelines = defs.registry{ kind = "pipeline", dir = dir == "." and "pipelines" or dir .. "/pipelines",
                                  dsl = pipeline_dsl, validate = pipeline_validator(has_team) }
  return self
end

function Project:load()
  local problems = self.teams:load_all()
  for _, p in ipairs(self.pipelines:load_all()) do problems[#problems + 1] = p end
  return problems
end

-- Watches both directories; a watch that cannot start (no such directory) is skipped.
function Project:watch()
  local handles = {}
  for _, reg in ipairs({ self.teams, self.pipelines }) do
    handles[#handles + 1] = reg:watch()
  end
  return { stop = function() for _, h in ipairs(handles) do h:stop() end end }
end

-- A team's daily limits as the engine applies them: the smaller of its file's own
-- budget and factory.lua's budgets.teams[name] (configured), each where given.
-- team: its definition or nil. -> usd_per_day | nil, tokens_per_day | nil
function M.team_limits(team, configured)
  local own = team and team.budget or {}
  configured = configured or {}
  local function smaller(a, b)
    if a == nil then return b end
    if b == nil then return a end
    return math.min(a, b)
  end
  return smaller(own.usd_per_day, configured.usd_per_day), smaller(own.tokens_per_day, configured.tokens_per_day)
end

-- The teams held to a USD budget: their own or factory.lua's (configured), or their
-- pipeline's limits.budget_usd; of pipeline_name's stages only, when it is given.
local function usd_limited_teams(project, configured, pipeline_name)
  local limited, order = {}, {}
  local function add(name)
    if not limited[name] then limited[name], order[#order + 1] = true, name end
  end
  local names = pipeline_name and {} or project.teams:names()
  for _, pname in ipairs(pipeline_name and { pipeline_name } or project.pipelines:names()) do
    local pipe = project.pipelines:get(pname)
    for _, st in ipairs(pipe and pipe.stages or {}) do
      if pipeline_name then names[#names + 1] = st.team end
      if pipe.limits and pipe.limits.budget_usd then add(st.team) end
    end
  end
  for _, name in ipairs(names) do
    local team = project.teams:get(name)
    if team and M.team_limits(team, configured[name]) then add(name) end
  end
  return order
end

-- The provider/model entries without a price that team's calls may go to (its
-- aliases' chains, its operatives' too).
local function unpriced_models(team, router_cfg)
  local out = {}
  local aliases = { team.model }
  for _, op in ipairs(team.operatives or {}) do aliases[#aliases + 1] = op.model end
  for _, alias in pairs(aliases) do
    for _, spec in ipairs((router_cfg.models or {})[alias] or { alias }) do
      if type(spec) == "string" and spec:find("/", 1, true) and not config.priced(router_cfg.prices, spec) then
        out[#out + 1] = spec
      end
    end
  end
  return out
end

-- What would count as $0 against a USD budget: the models without a price in prices
-- {} of the teams held to one (usd_limited_teams). -> one warning line, or nil (also
-- when factory.lua sets a USD budget: its loader warns of each unpriced model then).
function M.unpriced_budgets(project, router_cfg, pipeline_name)
  if config.usd_limited(router_cfg.budgets) then return nil end
  local configured = type(router_cfg.budgets) == "table" and type(router_cfg.budgets.teams) == "table"
    and router_cfg.budgets.teams or {}
  local teams, specs, seen = {}, {}, {}
  for _, name in ipairs(usd_limited_teams(project, configured, pipeline_name)) do
    local team = project.teams:get(name)
    local free = team and unpriced_models(team, router_cfg) or {}
    if #free > 0 then teams[#teams + 1] = name end
    for _, spec in ipairs(free) do
      if not seen[spec] then seen[spec], specs[#specs + 1] = true, spec end
    end
  end
  if #teams == 0 then return nil end
  table.sort(teams)
  table.sort(specs)
  return ("%s ha%s a USD budget, but %s ha%s no price in factory.lua's prices {}: %s calls count as $0 against it,"
    .. " so it limits nothing (give each a price; 0 for a free local model)"):format(table.concat(teams, ", "),
    #teams == 1 and "s" or "ve", table.concat(specs, ", "), #specs == 1 and "s" or "ve",
    #specs == 1 and "its" or "their")
end

-- The aliases a router configuration offers: its models, and provider/model for
-- each of its providers.
function M.aliases_of(router_cfg)
  local set = {}
  for alias in pairs(router_cfg.models or {}) do set[alias] = true end
  for provider in pairs(router_cfg.providers or {}) do set["provider:" .. provider] = true end
  return set
end

return M
