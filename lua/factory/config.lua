-- factory.config: the installation's factory.lua, loaded in the sandbox of
-- factory.defs (safe functions only, a time limit on the file's run).
--
--   config.load(path [, on_reload]) -> cfg [, watcher] | nil, "file:line: message"
--       with on_reload, the file is watched too: on_reload(cfg) runs (in the
--       watcher's fiber) after each edit that loads and validates; an edit that does
--       not is logged ("reload rejected ... file:line: message") and changes nothing.
--       watcher:stop() ends the watch.
--   cfg.router   the table for router.configure
--   cfg.keys     { [bearer key] = { team = NAME } }  (virtual keys of the proxy)
--   cfg.agents   the agents section ({} when absent), for factory.agents.pool
--   cfg.notify   the notify section, or nil (factory.notify)
--   cfg.warnings what loaded but may not be meant: a variable env "VAR" read unset; a
--                model of a chain without a price while a budget is in USD
--
-- factory.lua calls these functions (each at most once), nothing else runs:
--   providers { NAME = { base_url =, api_key = env "VAR", kind = "openai"|"anthropic",
--                        rpm =, tpm =, max_concurrency = } }
--       kind defaults to "openai" ("anthropic" for a provider named anthropic);
--       base_url defaults for the well-known names openai, anthropic, ollama,
--       openrouter.
--   models { ["factory/coder"] = { "provider/model", ... } }   ordered fallback chains
--   prices { ["provider/model"] = { input = USD, output = USD } }  per 1M tokens
--       (a bare ["model"] prices that model at every provider)
--   budgets { teams = { NAME = { usd_per_day =, tokens_per_day = } },
--             run = { usd =, tokens = }, utc_offset = hours }  (days start at midnight
--             utc_offset hours east of UTC; default 0)
--   limits { retries =, backoff =, timeout =, first_token_timeout =, ... }  (core/router.c)
--   keys { ["sk-factory-..."] = { team = "backend_engineering" } }
--   agents { max_concurrent = 4, cooldown = SECONDS, daily_iterations = n }
--       coding agents of pipeline build stages (factory.agents.pool): how many run at
--       once, how long between two starts, how many agent iterations a UTC day pays for
--   notify { command = { argv with "{message}" }, on = { "escalated", ... }, timeout =,
--            env = { "VAR", ... } }   a command run when a run needs a human, stops or
--       ends (factory.notify)
--   env "VAR" -> the variable's value, or nil
local fs = require "factory.core.fs"
local defs = require "factory.defs"
local pool = require "factory.agents.pool"
local notify = require "factory.notify"

local M = {}

local DEFAULT_URLS = {
  openai = "https://api.openai.com/v1",
  anthropic = "https://api.anthropic.com",
  ollama = "http://127.0.0.1:11434/v1",
  openrouter = "https://openrouter.ai/api/v1",
}

local SECTIONS = { "providers", "models", "prices", "budgets", "limits", "keys", "agents", "notify" }

local function fail(msg) error(msg, 0) end

-- A misspelt or mistyped field must not pass unnoticed: a budget or a price the
-- router never sees lets calls spend without limit.
local function only(t, where, fields)
  for k in pairs(t) do
    if not fields[k] then
      local names = {}
      for name in pairs(fields) do names[#names + 1] = name end
      table.sort(names)
      fail(("%s: unknown field %s (expected %s)"):format(where, tostring(k), table.concat(names, ", ")))
    end
  end
end

local function number_at_least(v, where, min, whole)
  if v == nil then return end
  if type(v) ~= "number" or v ~= v or v == math.huge or v < min or (whole and v % 1 ~= 0) then
    fail(("%s: expected %s >= %g, got %s"):format(where, whole and "a whole number" or "a number", min,
      type(v) == "string" and ("%q"):format(v) or tostring(v)))
  end
end

local function table_at(v, where)
  if type(v) ~= "table" then fail(("%s: expected a table, got a %s"):format(where, type(v))) end
  return v
end

local PROVIDER_FIELDS = { base_url = true, api_key = true, kind = true, rpm = true, tpm = true,
                          max_concurrency = true }

local function check_providers(t)
  for name, p in pairs(t) do
    if type(name) ~= "string" or name:find("/", 1, true) then fail("providers: names must be strings without '/'") end
    if type(p) ~= "table" then fail(("providers.%s: expected a table"):format(name)) end
    p.kind = p.kind or (name == "anthropic" and "anthropic" or "openai")
    if p.kind ~= "openai" and p.kind ~= "anthropic" then
      fail(("providers.%s: kind must be \"openai\" or \"anthropic\""):format(name))
    end
    p.base_url = p.base_url or DEFAULT_URLS[name]
    if p.base_url == nil then fail(("providers.%s: base_url is required"):format(name)) end
    if type(p.base_url) ~= "string" then
      fail(("providers.%s: base_url must be a string (a URL), got a %s"):format(name, type(p.base_url)))
    end
    if not p.base_url:find("^[Hh][Tt][Tt][Pp][Ss]?://[^/%s]") then
      fail(("providers.%s: base_url must be an http:// or https:// URL such as \"http://127.0.0.1:11434/v1\", got %q")
        :format(name, p.base_url))
    end
    if p.api_key ~= nil and type(p.api_key) ~= "string" then
      fail(("providers.%s: api_key must be a string (env \"VAR\")"):format(name))
    end
    only(p, "providers." .. name, PROVIDER_FIELDS)
    number_at_least(p.rpm, ("providers.%s.rpm"):format(name), 0)
    number_at_least(p.tpm, ("providers.%s.tpm"):format(name), 0)
    number_at_least(p.max_concurrency, ("providers.%s.max_concurrency"):format(name), 0, true)
  end
end

local function check_prices(t)
  for model, price in pairs(t) do
    local where = ("prices[%q]"):format(tostring(model))
    -- The router looks a model up as "provider/model", then as "model" alone.
    if type(model) ~= "string" or model == "" then
      fail(where .. ': expected ["provider/model"] (or ["model"]) = { input = USD, output = USD } (per 1M tokens)')
    end
    only(table_at(price, where), where, { input = true, output = true })
    number_at_least(price.input, where .. ".input", 0)
    number_at_least(price.output, where .. ".output", 0)
  end
end

local function check_budgets(t)
  only(t, "budgets", { teams = true, run = true, utc_offset = true })
  for team, b in pairs(t.teams and table_at(t.teams, "budgets.teams") or {}) do
    local where = ("budgets.teams.%s"):format(tostring(team))
    only(table_at(b, where), where, { usd_per_day = true, tokens_per_day = true })
    number_at_least(b.usd_per_day, where .. ".usd_per_day", 0)
    number_at_least(b.tokens_per_day, where .. ".tokens_per_day", 0)
  end
  if t.run then
    only(table_at(t.run, "budgets.run"), "budgets.run", { usd = true, tokens = true })
    number_at_least(t.run.usd, "budgets.run.usd", 0)
    number_at_least(t.run.tokens, "budgets.run.tokens", 0)
  end
  number_at_least(t.utc_offset, "budgets.utc_offset", -14)
  if t.utc_offset and t.utc_offset > 14 then fail("budgets.utc_offset: expected hours from -14 to 14") end
end

-- The router's limits (core/router.c): seconds, or a whole number of something.
local LIMITS = { retries = "whole", backoff = "s", backoff_max = "s", retry_after_max = "s",
                 breaker_failures = "whole", breaker_cooldown = "s", connect_timeout = "s", timeout = "s",
                 first_token_timeout = "s", idle_timeout = "s", default_max_tokens = "whole" }

local function check_limits(t)
  only(t, "limits", LIMITS)
  for name, unit in pairs(LIMITS) do number_at_least(t[name], "limits." .. name, 0, unit == "whole") end
end

local function check_models(t, providers)
  for alias, chain in pairs(t) do
    if type(chain) ~= "table" or #chain == 0 then
      fail(("models[%q]: expected a list of \"provider/model\""):format(tostring(alias)))
    end
    for _, spec in ipairs(chain) do
      local p = type(spec) == "string" and spec:match("^([^/]+)/.+$")
      if not p then fail(("models[%q]: %q is not \"provider/model\""):format(alias, tostring(spec))) end
      if not providers[p] then
        fail(("models[%q]: unknown provider %q (declare it in providers {})"):format(alias, p))
      end
    end
  end
end

local function check_keys(t)
  for key, entry in pairs(t) do
    if type(key) ~= "string" or key == "" or type(entry) ~= "table" or type(entry.team) ~= "string"
        or entry.team == "" then
      fail('keys: expected { ["sk-..."] = { team = NAME } }')
    end
    -- The key itself is a secret: the message names its team only.
    only(entry, ("keys (the key of team %s)"):format(entry.team), { team = true, run = true })
  end
end

local function check_agents(t)
  local ok, err = pool.check(t)
  if not ok then fail(err) end
end

local function check_notify(t)
  local ok, err = notify.check(t)
  if not ok then fail(err) end
end

local CHECKS = { providers = check_providers, prices = check_prices, budgets = check_budgets, limits = check_limits,
                 keys = check_keys, agents = check_agents, notify = check_notify }

-- The DSL of one load: one function per section, collecting into cfg.
local function dsl(cfg)
  cfg.unset = {}
  local env = { env = function(name)
    local value = os.getenv(name)
    if value == nil then cfg.unset[#cfg.unset + 1] = tostring(name) end
    return value
  end }
  for _, section in ipairs(SECTIONS) do
    env[section] = function(t)
      if type(t) ~= "table" then fail(section .. " expects a table: " .. section .. " { ... }") end
      if cfg[section] then fail(section .. " is given twice") end
      if section == "models" then check_models(t, cfg.providers or fail("declare providers before models")) end
      if CHECKS[section] then CHECKS[section](t) end
      cfg[section] = t
    end
  end
  return env
end

-- Whether prices {} gives spec ("provider/model") a price (a bare "model" entry
-- prices that model at every provider).
function M.priced(prices, spec)
  return prices ~= nil and (prices[spec] ~= nil or prices[spec:match("^[^/]+/(.+)$") or ""] ~= nil)
end

-- Whether factory.lua itself sets a USD budget (then result() warns of every
-- unpriced model of every alias).
function M.usd_limited(budgets)
  if not budgets then return false end
  if budgets.run and budgets.run.usd then return true end
  for _, b in pairs(budgets.teams or {}) do
    if b.usd_per_day then return true end
  end
  return false
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function result(cfg)
  local warnings = {}
  for _, name in ipairs(cfg.unset) do
    -- A provider's key read from an unset variable is simply absent: say so now, not
    -- with the first 401.
    warnings[#warnings + 1] = ("environment variable %s is not set (env %q gives nil)"):format(name, name)
  end
  if M.usd_limited(cfg.budgets) then
    for _, alias in ipairs(sorted_keys(cfg.models or {})) do
      for _, spec in ipairs(cfg.models[alias]) do
        if not M.priced(cfg.prices, spec) then
          warnings[#warnings + 1] = ("models[%q]: %s has no price in prices {}: its calls count as $0 against the"
            .. " USD budgets"):format(alias, spec)
        end
      end
    end
  end
  return {
    warnings = warnings,
    router = { providers = cfg.providers or {}, models = cfg.models or {}, prices = cfg.prices,
               budgets = cfg.budgets, limits = cfg.limits },
    keys = cfg.keys or {},
    agents = cfg.agents or {},
    notify = cfg.notify,
  }
end

function M.load(path, on_reload)
  local dir, file = path:match("^(.*)/([^/]*)$")
  if not dir then dir, file = ".", path end
  local cfg
  local reg = defs.registry{ kind = "configuration", dir = dir == "" and "/" or dir, optional = true,
                             pattern = "^" .. file:gsub("%p", "%%%0") .. "$",
                             dsl = function() cfg = {}; return dsl(cfg) end }
  local problem = reg:load_all()[1]
  if problem then return nil, problem end
  if not cfg then return nil, path .. ":1: cannot read the file" end
  local loaded = result(cfg)
  if not on_reload then return loaded end
  -- The registry swaps only a file that loaded: cfg is then what that load collected
  -- (a rejected load is logged by the registry, file:line, and changes nothing).
  reg:on_change(function(ev)
    if ev.action == "swapped" then on_reload(result(cfg)) end
  end)
  local handle, werr, wcode = reg:watch()
  if not handle then return nil, werr, wcode end
  return loaded, handle
end

-- The configuration file to use: the one given, else ./factory.lua if it exists.
function M.find(path)
  if path then return path end
  if fs.stat("factory.lua") then return "factory.lua" end
end

return M
