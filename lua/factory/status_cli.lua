-- factory.status_cli: `factory status [--db URL] [--config FILE] [--project DIR]`,
-- the morning look at an overnight batch: the runs that have not finished, each with
-- the command that moves it on, agents a dead `factory run` left running on this host,
-- and what each team spent today against its budget.
--
--   run(args) -> exit code: 0 shown, 1 failure (one line on stderr), 2 usage error.
--   args: what follows `status`. Runs in a fiber.
--   USAGE: the help text for `factory status --help`.
-- The budgets are the engine's: the smaller of a team file's own (teams/*.lua under
-- --project, default .) and factory.lua's (--config, default ./factory.lua), each
-- read when it is there; the budget day starts at midnight of factory.lua's
-- budgets.utc_offset. "in flight" is what the calls being made now hold of a team's
-- budget (factory.budgets), in every process. Teams that made no call today are
-- counted, not listed.
local db = require "factory.db"
local config = require "factory.config"
local dsl = require "factory.dsl"
local hitl = require "factory.hitl"
local router = require "factory.router"
local records = require "factory.records"
local engine_id = require "factory.engine_id"
local orchestrator = require "factory.agents.orchestrator"
local time = require "factory.core.time"
local fs = require "factory.core.fs"
local cli_args = require "factory.cli_args"

local M = {}

M.USAGE = [[
usage: factory status [--db URL] [--config FILE] [--project DIR]

The runs that have not finished, each with what moves it on (a question for a human,
`factory resume RUN`), and each team's model calls today: calls, tokens, what they
cost, what calls in flight hold, its budget and what is left of it.

--config FILE  factory.lua, for its budgets and the day's start (default ./factory.lua)
--project DIR  where teams/ is, for the teams' own budgets (default .)
--db URL       sqlite:PATH or postgres://user:password@host:port/dbname
               (default: $FACTORY_DB, else .factory/factory.db in this directory)
]]

local FLAGS = { ["--db"] = "db", ["--config"] = "config", ["--project"] = "project" }

-- Unfinished runs listed one per line, at most this many.
local MAX_LISTED = 20

local fail, usage_error = cli_args.reporters("status")

local function parse(args)
  local opts, words = cli_args.flags(args, FLAGS)
  if opts and words[1] then return nil, ("unexpected argument '%s'"):format(words[1]) end
  return opts, words
end

local commas = cli_args.commas

-- factory.lua's router configuration (budgets, utc_offset), if there is one: the
-- default file that does not load is said, and the rest is shown without it; one
-- given with --config must load.
local function router_config(opts)
  local path = config.find(opts.config)
  if not path then return {} end
  local cfg, err = config.load(path)
  if cfg then return cfg.router end
  if opts.config then return nil, err end
  io.stderr:write(("factory status: %s (budgets from it are not shown)\n"):format(tostring(err)))
  return {}
end

-- { team = { usd =, tokens = } }: each team's daily limits, as the engine sets them.
local function budgets_of(opts, router_cfg)
  local out = {}
  for name, b in pairs((router_cfg.budgets or {}).teams or {}) do
    out[name] = { usd = b.usd_per_day, tokens = b.tokens_per_day }
  end
  local dir = opts.project or "."
  if not fs.stat(dir .. "/teams") then return out end
  local project = dsl.project(dir, { aliases = router_cfg.models and dsl.aliases_of(router_cfg) or nil })
  project:load()
  local configured = (router_cfg.budgets or {}).teams or {}
  for _, name in ipairs(project.teams:names()) do
    local usd, tokens = dsl.team_limits(project.teams:get(name), configured[name])
    out[name] = (usd or tokens) and { usd = usd, tokens = tokens } or nil
  end
  return out
end

-- Why a run that has not finished is where it is, and what moves it on.
local function run_line(d, r, asked)
  local head = ("  run %d (%s) %s"):format(r.id, r.pipeline, r.state)
  if r.state == "waiting" then
    local n = asked[r.id] or 0
    return ("%s: %d question(s) for a human (factory hitl list, then factory hitl answer ID TEXT)"):format(head, n)
  elseif r.state == "stopped" then
    return ("%s: %s (factory resume %d once that is fixed)"):format(head, tostring(r.error or "?"):gsub("\n.*", ""),
      r.id)
  end
  local lock = assert(d:query("SELECT owner, expires_at FROM locks WHERE name = ?", { "run:" .. r.id }))[1]
  if lock and lock.expires_at > time.now() and engine_id.alive_here(lock.owner) ~= false then
    return ("%s, stage %d done, by process %s"):format(head, r.stage_index, lock.owner)
  end
  return ("%s, stage %d done: no process executes it (factory resume %d)"):format(head, r.stage_index, r.id)
end

-- Agents whose `factory run` died on this host (kill -9, the OOM killer) and that
-- still run: the next run or resume on this host stops them.
local function show_orphans(d)
  local agents = assert(orchestrator.orphaned_agents(d))
  if #agents == 0 then return end
  local list = {}
  for _, a in ipairs(agents) do
    list[#list + 1] = ("pid %d (run %s, stage %s)"):format(a.pid, tostring(a.run or "?"), tostring(a.stage or "?"))
  end
  print(("agents still running whose factory process died: %s; the next factory run or resume here stops them")
    :format(table.concat(list, ", ")))
end

local function show_runs(d)
  local counts = assert(d:query("SELECT state, COUNT(*) AS n FROM runs GROUP BY state ORDER BY state"))
  if #counts == 0 then return print("runs: none") end
  local parts = {}
  for _, c in ipairs(counts) do parts[#parts + 1] = ("%d %s"):format(c.n, c.state) end
  print("runs: " .. table.concat(parts, ", "))
  local asked = {}
  for _, q in ipairs(hitl.list(d)) do asked[q.run_id] = (asked[q.run_id] or 0) + 1 end
  local open = assert(d:query("SELECT id, pipeline, state, stage_index, error FROM runs WHERE state IN"
    .. " ('pending', 'running', 'waiting', 'stopped') ORDER BY id LIMIT ?", { MAX_LISTED + 1 }))
  for i = 1, math.min(#open, MAX_LISTED) do print(run_line(d, open[i], asked)) end
  if #open > MAX_LISTED then print(("  (the first %d unfinished runs: factory runs lists them all)"):format(MAX_LISTED)) end
end

local function money(usd) return usd and ("$%.4f"):format(usd) or "-" end

-- Each team's day since since: spent = { team = { usd, tokens, calls } } (calls a
-- budget refused, never sent, apart: refused = { "team n", ... }), and held = { team =
-- { usd, tokens } } by calls in flight.
local function today(d, since)
  local spent = {}
  for _, t in ipairs(records.team_spending(d, since)) do spent[t.team] = t end
  local calls = assert(d:query("SELECT team, SUM(CASE WHEN code = 'EBUDGET' THEN 0 ELSE 1 END) AS n,"
    .. " SUM(CASE WHEN code = 'EBUDGET' THEN 1 ELSE 0 END) AS refused FROM model_calls WHERE created_at >= ?"
    .. " AND team IS NOT NULL GROUP BY team", { since }))
  local refused = {}
  for _, c in ipairs(calls) do
    if spent[c.team] then spent[c.team].calls = tonumber(c.n) end
    if tonumber(c.refused) > 0 then refused[#refused + 1] = ("%s %d"):format(c.team, tonumber(c.refused)) end
  end
  table.sort(refused)
  local held = {}
  for _, h in ipairs(assert(d:query("SELECT team, COALESCE(SUM(usd), 0) AS usd, COALESCE(SUM(tokens), 0) AS tokens"
      .. " FROM budget_holds WHERE expires_at > ? GROUP BY team", { time.now() }))) do
    held[h.team] = { usd = tonumber(h.usd), tokens = tonumber(h.tokens) }
  end
  return spent, refused, held
end

-- A team's budget and what is left of it, as the table shows them.
local function budget_cells(b, s, h)
  if b.usd then return money(b.usd), money(math.max(0, b.usd - s.usd - (h and h.usd or 0))) end
  if b.tokens then
    return commas(b.tokens) .. " tok", commas(math.max(0, b.tokens - s.tokens - (h and h.tokens or 0))) .. " tok"
  end
  return "-", "-"
end

local function show_spending(d, budgets)
  local since = router.day_start()
  local spent, refused, held = today(d, since)
  -- The teams that called today or are calling now; the others are only counted.
  local names, seen, idle = {}, {}, 0
  for _, t in ipairs({ spent, held }) do
    for name in pairs(t) do
      if not seen[name] then seen[name], names[#names + 1] = true, name end
    end
  end
  for name in pairs(budgets) do if not seen[name] then idle = idle + 1 end end
  table.sort(names)
  local total = { calls = 0, tokens = 0, usd = 0 }
  for _, s in pairs(spent) do
    total.calls, total.tokens, total.usd = total.calls + (s.calls or 0), total.tokens + s.tokens, total.usd + s.usd
  end
  print(("model calls today (since %s): %s calls, %s tokens, %s"):format(time.iso8601(since), commas(total.calls),
    commas(total.tokens), money(total.usd)))
  if #names > 0 then
    print(("  %-24s %7s %12s %11s %11s %14s %13s"):format("TEAM", "CALLS", "TOKENS", "SPENT", "IN FLIGHT",
      "BUDGET/DAY", "LEFT"))
  end
  for _, name in ipairs(names) do
    local s, h = spent[name] or { usd = 0, tokens = 0 }, held[name]
    local budget, left = budget_cells(budgets[name] or {}, s, h)
    print(("  %-24s %7s %12s %11s %11s %14s %13s"):format(name, commas(s.calls or 0), commas(s.tokens), money(s.usd),
      h and money(h.usd) or "-", budget, left))
  end
  if idle > 0 then print(("  (%d more team(s) with a budget made no call today)"):format(idle)) end
  if #refused > 0 then
    print(("  calls a budget refused today (not sent): %s"):format(table.concat(refused, ", ")))
  end
end

function M.run(args)
  local opts, err = parse(args)
  if not opts then return usage_error(err) end
  local router_cfg
  router_cfg, err = router_config(opts)
  if not router_cfg then return fail(err) end
  -- Only for the day's start: budgets.utc_offset.
  local configured = router.configure{ providers = {}, models = {}, budgets = router_cfg.budgets }
  if not configured then router.configure{ providers = {}, models = {} } end
  local conn
  conn, err = db.open(opts.db)
  if not conn then return fail(err) end
  local ok
  ok, err = conn:migrate()
  if ok then
    ok, err = pcall(function()
      show_runs(conn)
      show_orphans(conn)
      show_spending(conn, budgets_of(opts, router_cfg))
    end)
  end
  conn:close()
  if not ok then return fail(tostring(err)) end
  return 0
end

return M
