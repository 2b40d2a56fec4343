-- factory.pipeline: the engine that executes runs, durably.
--
--   pipeline.engine{ db =, project = (factory.dsl project), on_event = fn(ev) | nil,
--                    budgets = the router configuration's budgets | nil,
--                    agents = factory.lua's agents section | nil (factory.agents.pool:
--                      the build stages' coding agents) } -> engine
--   engine:submit{ pipeline =, title =, body =, repo =, source = "cli", external_id =,
--                  again = bool }
--     -> run_id, earlier   (earlier: the state of the run of the same work item and
--        pipeline that is continued rather than started twice (it has not failed or
--        been cancelled), or false for a new run; with again, a run that succeeded
--        is not returned but followed by a new one)
--   engine:execute(run_id) -> state, detail
--       state: "succeeded" | "waiting" (detail: the escalation) | "stopped" (detail:
--              the error that stopped it; the run is kept, to resume) | "busy"
--              (another process executes it) | "unloaded" (its pipeline's file does
--              not load: the run is left as it was) | "failed" (no such run)
--   engine:set_budgets(budgets)   factory.lua's budgets again, after it was reloaded
--   pipeline.cancel(db, run_id) -> true | nil, err, code (ENOENT, EINVAL, EBUSY)
--       ends a run that has not finished and that no live process executes: it is
--       'cancelled', its open escalations are closed, and the same work item gets a
--       new run
--   pipeline.operative_of(team, stage) -> the operative that works on the stage (its
--       `operative`, else the team's first)
--   pipeline.missing(project, name) -> nil when the project defines pipeline name, else
--       "ENOENT: ..." saying which it has (or where none was found), "ENOENT"
--   engine:close()
--
-- Team budgets: a team file's budget (usd_per_day, tokens_per_day) is given to the
-- router when the engine starts and whenever the file is reloaded; where factory.lua
-- also sets one (opts.budgets.teams), the smaller applies. What the team spent
-- today (from midnight of budgets.utc_offset), as the store records it, is counted,
-- so a restarted process does not grant a fresh day; and counted again before an
-- objective, at most every M.RECOUNT_S seconds, so that the spending of processes
-- running at the same time (other `factory run`s, `factory serve`) is seen.
--
-- Durability: a stage's COMPLETE TaskResult is written in the same transaction that
-- advances runs.stage_index, so after a crash execute() starts at the first
-- unfinished stage and never re-runs, or re-pays, a finished one. Every other
-- attempt is recorded too (stage_results, attempt = n), which keeps the iteration
-- cap across restarts. Timeline events and model-call records are posted (db:post):
-- nothing waits for their commit, and they are on disk no later than the stage
-- result recorded after them. One process at a time executes a run: it holds the lock
-- "run:ID" (released at the end; a lock whose process died on this host is taken
-- over at once, any other when it expires).
--
-- The confidence gate, per attempt: COMPLETE advances; NEEDS_CLARIFICATION goes to
-- the broker (factory.clarify) and the objective runs again with the answer; BLOCKED,
-- or a clarification the broker could not get answered, escalates to a human
-- (factory.hitl) and the run waits. Events (ev.kind) given to on_event: run_started,
-- stage_started, objective_started, model_call, task_result, task_result_invalid,
-- context_packed, clarification, clarification_answered, escalated, stage_completed,
-- run_finished; and for a stage with workspace = "worktree" (the agent changes the
-- run's git repository in a worktree and branch: factory.agents.build) or "read"
-- (the agent reads and runs the run's latest change in a worktree that is thrown
-- away) workspace_started, agent_done, workspace_done, or workspace_skipped when the
-- run has no git repository. Each also goes to the events table.
local fiber = require "factory.fiber"
local engine_id = require "factory.engine_id"
local router = require "factory.router"
local budgets = require "factory.budgets"
local dsl = require "factory.dsl"
local time = require "factory.core.time"
local log = require "factory.log"
local records = require "factory.records"
local memory = require "factory.memory"
local objective = require "factory.objective"
local build = require "factory.agents.build"
local agent_pool = require "factory.agents.pool"
local confidence = require "factory.confidence"
local clarify = require "factory.clarify"
local hitl = require "factory.hitl"


local M = {}

local FINISHED = { succeeded = true, failed = true, cancelled = true }
local LOCK_TTL, LOCK_BEAT = 30, 10
M.RECOUNT_S = 5

local Engine = {}
Engine.__index = Engine

function M.engine(opts)
  local self = setmetatable({ db = assert(opts.db, "pipeline.engine: db is required"), project = opts.project,
                              on_event = opts.on_event, active = {}, totals = {}, counted = {} }, Engine)
  self.owner = engine_id.new()
  local agents = opts.agents or {}
  self.pool = agent_pool.new{ db = self.db, max_concurrent = agents.max_concurrent, cooldown = agents.cooldown,
                              daily_iterations = agents.daily_iterations }
  self.unhook = router.on_call(function(r) self:_model_call(r) end)
  self.detach_ledger = budgets.attach(self.db, self.owner)
  self:set_budgets(opts.budgets)
  self.unwatch_teams = self.project.teams:on_change(function(ev)
    if ev.action == "swapped" then self:_team_budget(ev.name) end
  end)
  return self
end

function Engine:set_budgets(budgets)
  self.config_budgets = type(budgets) == "table" and type(budgets.teams) == "table" and budgets.teams or {}
  for _, name in ipairs(self.project.teams:names()) do self:_team_budget(name) end
end

function Engine:close()
  self.detach_ledger()
  self.unhook()
  self.unwatch_teams()
end

function Engine:_team_budget(name)
  local usd, tokens = dsl.team_limits(self.project.teams:get(name), self.config_budgets[name])
  -- No budget (any more): the limit an earlier version of the file set goes too.
  if usd == nil and tokens == nil then
    self.counted[name] = nil
    return router.set_budget("team", name, {})
  end
  router.set_budget("team", name, { usd = usd, tokens = tokens })
  self:_count_spent(name)
end

function Engine:_count_spent(name)
  self.counted[name] = time.monotonic()
  local spent = records.team_spending(self.db, router.day_start(), name)[1]
  if spent then router.count_spent("team", name, spent) end
end

-- Router records arrive in whichever fiber next passes through the router, so the
-- operative is found by run and team, not by fiber. The record is posted, not
-- waited for: it commits before (or with) the stage's result that follows it.
function Engine:_model_call(r)
  local run_id = tonumber(r.run)
  local totals = run_id and self.totals[run_id]
  if not totals then return end
  local operative = self.active[run_id .. "\0" .. tostring(r.team)]
  self.db:post(records.model_call, r, operative)
  totals.tokens = totals.tokens + (r.prompt_tokens or 0) + (r.completion_tokens or 0)
  totals.cost = totals.cost + (r.cost_usd or 0)
  self:_notify(run_id, "model_call", { team = r.team, operative = operative, alias = r.alias, status = r.status,
    prompt_tokens = r.prompt_tokens, completion_tokens = r.completion_tokens, cost_usd = r.cost_usd, code = r.code })
end

function Engine:_notify(run_id, kind, data)
  if not self.on_event then return end
  local t = self.totals[run_id] or {}
  local ok, err = pcall(self.on_event, { kind = kind, run_id = run_id, data = data, tokens = t.tokens, cost = t.cost,
                                         started = t.started })
  if not ok then log.warn("pipeline: on_event failed", { error = tostring(err) }) end
end

-- An event for the timeline and for whoever watches the run. Posted: nothing waits
-- for its commit, which comes before (or with) the run's next recorded step.
function Engine:_emit(run_id, kind, data)
  self.db:post(records.event, run_id, kind, data)
  self:_notify(run_id, kind, data)
end

-- The anchor ends with the repository's path, which says nothing about what the
-- objective is about: memory recall leaves it out of its words (a path's "home",
-- "src" or "tmp" would recall facts that merely share them, and each word costs the
-- full-text search).
local REPOSITORY = "\n\nRepository: "

local function recall_subject(run)
  local anchor, repo = run.data.anchor, run.data.repo
  if type(repo) ~= "string" then return anchor end
  local suffix = REPOSITORY .. repo
  if anchor:sub(-#suffix) ~= suffix then return anchor end
  return anchor:sub(1, -#suffix - 1)
end

-- Every request of a run holds its whole work item (the anchor, never cut), so one
-- that cannot fit in a stage operative's context window with room for the reply
-- would fail at that stage, after the stages before it were paid for.
local function oversized(project, pipe, anchor)
  local need = objective.tokens(anchor)
  for _, st in ipairs(pipe.stages) do
    local team = project.teams:get(st.team)
    local op = team and M.operative_of(team, st)
    local window = op and objective.window(team, op)
    if window and need + (op.max_tokens or 0) > window then
      return ("EINVAL: the work item (%d bytes, about %d tokens) does not fit in the context window of stage %s"
        .. " (%s/%s: %d tokens%s), and every request of the run holds all of it: shorten it (keep the part of a"
        .. " log that shows the failure), or set context_window in the team's file if its model's window is"
        .. " larger"):format(#anchor, need, st.name, team.name, op.name, window,
          op.max_tokens and (", %d of them kept for the reply"):format(op.max_tokens) or "")
    end
  end
end

function M.missing(project, name)
  if project.pipelines:get(name) then return nil end
  local names = project.pipelines:names()
  if #names > 0 then
    return ("ENOENT: no pipeline %q (pipelines: %s)"):format(name, table.concat(names, ", ")), "ENOENT"
  end
  return ("ENOENT: no pipeline %q: no pipelines/*.lua in %s; --project DIR names where teams/ and pipelines/"
    .. " are"):format(name, project.dir == "." and "the current directory" or project.dir), "ENOENT"
end

function Engine:submit(w)
  assert(type(w.pipeline) == "string" and type(w.title) == "string", "engine:submit: pipeline and title are required")
  local missing, code = M.missing(self.project, w.pipeline)
  if missing then return nil, missing, code end
  if not w.title:find("%S") then return nil, "EINVAL: the work item has no title: its text is empty", "EINVAL" end
  local anchor = w.title .. (w.body and w.body ~= "" and ("\n\n" .. w.body) or "")
  if w.repo then anchor = anchor .. REPOSITORY .. w.repo end
  local too_big = oversized(self.project, self.project.pipelines:get(w.pipeline), anchor)
  if too_big then return nil, too_big, "EINVAL" end
  return self.db:tx(function(tx)
    local now = time.now()
    local rows = assert(tx:query("SELECT id FROM work_items WHERE source = ? AND external_id = ?",
      { w.source or "cli", w.external_id, n = 2 }))
    local item = rows[1] and rows[1].id
    if item then
      -- The same work item again continues its run, and a run that already succeeded
      -- (e.g. killed between its last commit and its exit) is not paid for twice.
      -- Again: anew after a success, but an unfinished run is still continued, never doubled.
      rows = assert(tx:query("SELECT id, state FROM runs WHERE work_item_id = ? AND pipeline = ? AND state NOT IN"
        .. " ('failed', 'cancelled') ORDER BY id DESC LIMIT 1", { item, w.pipeline }))
      if rows[1] and not (w.again and rows[1].state == "succeeded") then return rows[1].id, rows[1].state end
    else
      item = assert(tx:exec("INSERT INTO work_items (source, external_id, title, body, state, data, created_at,"
        .. " updated_at) VALUES (?, ?, ?, ?, 'accepted', ?, ?, ?) RETURNING id",
        { w.source or "cli", w.external_id, w.title, w.body, { repo = w.repo }, now, now, n = 7 })).last_id
    end
    local stages = {}
    for i, st in ipairs(self.project.pipelines:get(w.pipeline).stages) do stages[i] = st.name end
    local run = assert(tx:exec("INSERT INTO runs (work_item_id, pipeline, state, stage_index, data, created_at,"
      .. " updated_at) VALUES (?, ?, 'pending', 0, ?, ?, ?) RETURNING id",
      { item, w.pipeline, { anchor = anchor, repo = w.repo, stages = stages }, now, now })).last_id
    records.event(tx, run, "run_created", { pipeline = w.pipeline, title = w.title })
    return run, false
  end)
end

-- The stages a run goes through are those its pipeline had when the run was
-- submitted (runs.data.stages), each as its file defines it now: an edit that adds,
-- removes or reorders stages applies to the runs submitted after it, so a run never
-- runs a finished stage again, or loses its place, because the list moved. A stage
-- removed before the run reached it is skipped; a finished one keeps its place.
local function pinned(run, pipe)
  local names = type(run.data) == "table" and run.data.stages
  if not pipe or type(names) ~= "table" then return pipe end
  local stages, by_name = {}, {}
  for i, name in ipairs(names) do
    local st = pipe.stage[name]
    if st or i <= run.stage_index then
      local at = #stages + 1
      stages[at] = setmetatable({ index = at }, { __index = st or { name = name, inputs = {} } })
      by_name[name] = stages[at]
    end
  end
  return setmetatable({ stages = stages, stage = by_name }, { __index = pipe })
end

-- ---- the run lock ----------------------------------------------------------------

-- The process that holds a run's lock, as its owner reads ("process PID on HOST"),
-- or nil when none does (no lock, an expired one, or its process died here).
local function executor(tx, run_id, except)
  local held = assert(tx:query("SELECT owner, expires_at FROM locks WHERE name = ?", { "run:" .. run_id }))[1]
  if not held or held.owner == except or held.expires_at <= time.now() or engine_id.alive_here(held.owner) == false then
    return nil
  end
  local host, pid = tostring(held.owner):match("^(.*):(%d+):%d+$")
  return host and ("process %s on %s"):format(pid, host) or tostring(held.owner)
end

function M.cancel(db, run_id)
  return db:tx(function(tx)
    local run = assert(tx:query("SELECT state FROM runs WHERE id = ?", { run_id }))[1]
    if not run then return nil, ("ENOENT: no run %s"):format(tostring(run_id)), "ENOENT" end
    if FINISHED[run.state] then return nil, ("EINVAL: run %d has %s already"):format(run_id, run.state), "EINVAL" end
    local who = executor(tx, run_id)
    if who then
      return nil, ("EBUSY: run %d is being executed by %s: stop that process first"):format(run_id, who), "EBUSY"
    end
    local now = time.now()
    assert(tx:exec("UPDATE runs SET state = 'cancelled', updated_at = ?, finished_at = ? WHERE id = ?", { now, now, run_id }))
    hitl.close_open(tx, run_id, "the run was cancelled")
    records.event(tx, run_id, "run_finished", { state = "cancelled" })
    return true
  end)
end

-- In the transaction that takes the lock, wanted(tx) says first whether to take it
-- (false: not, and nothing is written), then start(tx) runs once it is taken.
-- -> unlock function | false (not wanted) | nil, err
function Engine:_lock(run_id, wanted, start)
  local name = "run:" .. run_id
  local ok, err = self.db:tx(function(tx)
    if not wanted(tx) then return "unwanted" end
    local now = time.now()
    local who = executor(tx, run_id, self.owner)
    if who then
      return nil, ("EBUSY: run %d is being executed by %s: wait for it to finish, or stop that process and"
        .. " run `factory resume %d`"):format(run_id, who, run_id), "EBUSY"
    end
    assert(tx:exec("DELETE FROM locks WHERE name = ?", { name }))
    assert(tx:exec("INSERT INTO locks (name, owner, expires_at, acquired_at) VALUES (?, ?, ?, ?)",
      { name, self.owner, now + LOCK_TTL, now }))
    start(tx)
    return true
  end)
  if ok == "unwanted" then return false end
  if not ok then return nil, err end
  local beat = fiber.spawn(function()
    while true do
      fiber.sleep(LOCK_BEAT)
      self.db:exec("UPDATE locks SET expires_at = ? WHERE name = ? AND owner = ?", { time.now() + LOCK_TTL, name, self.owner })
    end
  end)
  -- released: the lock was already deleted, with the run's last stage.
  return function(released)
    beat:cancel("released")
    if not released then self.db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { name, self.owner }) end
  end
end

-- ---- execution -------------------------------------------------------------------

local function load_run(db, run_id)
  local rows = assert(db:query("SELECT r.*, w.title FROM runs r JOIN work_items w ON w.id = r.work_item_id"
    .. " WHERE r.id = ?", { run_id }))
  return rows[1]
end

-- What the run's stages need to know, read once under the run lock: while this
-- process holds it, only this process adds stage results, escalations or answers to
-- the run (a human answers only a run that waits), and it keeps these up to date.
local function load_state(tx, run)
  run.spent = assert(tx:query("SELECT COALESCE(SUM(cost_usd), 0) AS usd FROM model_calls WHERE run_id = ?",
    { run.id }))[1].usd
  run.results = assert(tx:query("SELECT stage, team, status, result, created_at FROM stage_results WHERE run_id = ?"
    .. " ORDER BY id", { run.id }))
  local open = assert(tx:query("SELECT e.id FROM mail e LEFT JOIN mail a ON a.in_reply_to = e.id"
    .. " AND a.kind = 'answer' WHERE e.run_id = ? AND e.kind = 'escalation' AND a.id IS NULL ORDER BY e.id LIMIT 1",
    { run.id }))
  run.escalation = open[1] and open[1].id
  run.answers = hitl.answers(tx, run.id)
end

function Engine:execute(run_id)
  -- The run is read in the transaction that locks it: one round trip less than a
  -- read before it, and no change can come between the two.
  local run, pipe
  local unlock, err = self:_lock(run_id, function(tx)
    run = load_run(tx, run_id)
    if not run or FINISHED[run.state] then return false end
    pipe = pinned(run, self.project.pipelines:get(run.pipeline))
    return pipe ~= nil
  end, function(tx)
    load_state(tx, run)
    assert(tx:exec("UPDATE runs SET state = 'running', updated_at = ? WHERE id = ?", { time.now(), run.id }))
    records.event(tx, run.id, "run_started", self:_started(run, pipe))
  end)
  if unlock == false then
    if not run then return "failed", ("no run %s"):format(tostring(run_id)) end
    -- A pipeline file that does not load (now) leaves the run as it is, to resume.
    if not pipe and not FINISHED[run.state] then
      return "unloaded", ("EINVAL: pipeline %s is not loaded: %s; fix it and resume run %d (its finished stages"
        .. " are kept)"):format(run.pipeline, self:_definition_problem(self.project.pipelines, run.pipeline), run.id)
    end
    return run.state, run.error
  end
  if not unlock then return "busy", err end
  self.totals[run_id] = { tokens = 0, cost = run.spent, started = time.monotonic() }
  -- What the run's objectives are given to report with, made once for all of them.
  run.emit = function(kind, data) self:_emit(run_id, kind, data) end
  run.notify = function(kind, data) self:_notify(run_id, kind, data) end
  local ok, state, detail = pcall(self._execute, self, run, pipe)
  -- The store has every call of this execution: a resumed run starts from it.
  router.clear_budget("run", run_id)
  unlock(run.unlocked)
  self.totals[run_id] = nil
  if not ok then
    -- An error (a write the store refused, a bug) stops the run as a crash would: its
    -- finished stages are kept, and resuming it (or the same `factory run`) goes on
    -- from the first unfinished one once the cause is fixed.
    local why = tostring(state)
    log.error("pipeline: run stopped by an error", { run = run_id, error = why })
    self:_stopped(run, why)
    return "stopped", why
  end
  return state, detail
end

function Engine:_finish(run, state, why)
  local now = time.now()
  local finished = { state = state, error = why }
  assert(self.db:tx(function(tx)
    assert(tx:exec("UPDATE runs SET state = ?, error = ?, updated_at = ?, finished_at = ? WHERE id = ?",
      { state, why, now, now, run.id, n = 5 }))
    records.event(tx, run.id, "run_finished", finished)
    return true
  end))
  self:_notify(run.id, "run_finished", finished)
end

function Engine:_stopped(run, why)
  local recorded, err = self.db:tx(function(tx)
    assert(tx:exec("UPDATE runs SET state = 'stopped', error = ?, updated_at = ? WHERE id = ?", { why, time.now(), run.id }))
    records.event(tx, run.id, "run_stopped", { error = why })
    return true
  end)
  if not recorded then log.error("pipeline: the run's stop could not be recorded", { run = run.id, error = tostring(err) }) end
  self:_notify(run.id, "run_stopped", { error = why })
end

function Engine:_started(run, pipe)
  return { pipeline = pipe.name, stage_index = run.stage_index, stages = #pipe.stages,
           resumed = run.stage_index > 0 or run.state ~= "pending" }
end

-- Where the run's time limit counts from: its creation, or the last answer a human
-- gave it, so a run that waited overnight for an answer is not out of time for that.
local function clock_start(run)
  local start = run.created_at
  for _, a in ipairs(run.answers) do
    if a.human and a.at > start then start = a.at end
  end
  return start
end

function Engine:_execute(run, pipe)
  -- Router budgets live in memory, from the start of this execution (execute clears
  -- the account when it returns): what is left is what the store has not seen spent.
  router.set_budget("run", run.id, { usd = math.max(0, pipe.limits.budget_usd - run.spent) })
  self:_notify(run.id, "run_started", self:_started(run, pipe))
  for i = run.stage_index + 1, #pipe.stages do
    local st, limit = pipe.stages[i], pipe.limits.timeout_s
    local worked = time.now() - clock_start(run)
    -- Out of time: a human decides. Failing the run would lose its finished stages to
    -- the next run of the work item, which pays for them again.
    if worked > limit and not run.escalation then
      return self:_escalate(run, st, { name = st.team }, { name = st.operative or "-" },
        ("Answer to give the run another %g s, or leave it stopped."):format(limit),
        ("time limit: the run has worked %.0f s since it began or a human last answered it (timeout_s %g)")
          :format(worked, limit))
    end
    local state, detail = self:_stage(run, pipe, st)
    if state ~= "complete" then return state, detail end
  end
  -- The last stage's commit records the success; with none left to run (they were
  -- removed from the pipeline while the run waited) it is recorded here.
  if not run.unlocked then
    self:_finish(run, "succeeded")
    return "succeeded"
  end
  self:_notify(run.id, "run_finished", { state = "succeeded" })
  return "succeeded"
end

-- Why a team or pipeline is not loaded, as its file's load said.
function Engine:_definition_problem(registry, name)
  for _, problem in ipairs(registry:problems()) do
    if problem:find("/" .. name .. ".lua:", 1, true) or problem:find("^" .. name .. "%.lua:") then return problem end
  end
  return ("no %s.lua"):format(name)
end

function M.operative_of(team, st)
  return team.operative[st.operative or ""] or team.operatives[1]
end

-- Runs an objective with the operative recorded as active for its model calls.
function Engine:_objective(run, team, op, o)
  local counted = self.counted[team.name]
  if counted and time.monotonic() - counted >= M.RECOUNT_S then self:_count_spent(team.name) end
  local key = run.id .. "\0" .. team.name
  local previous = self.active[key]
  self.active[key] = op.name
  o.run_id, o.team, o.operative, o.pipeline = run.id, team, op, run.pipeline
  o.anchor = run.data.anchor
  local topic = o.question and o.question.text or (o.stage.objective or o.stage.name)
  run.recall_subject = run.recall_subject or recall_subject(run)
  local about = run.recall_subject .. " " .. topic
  local vector = memory.embed({ about }, { team = team.name, run = run.id })
  o.memory, o.learnings = memory.context(self.db, { team.name, memory.SHARED }, team.name, about, team.recall,
                                          vector and vector[1])
  o.db, o.process, o.pool = self.db, self.owner, self.pool
  o.emit, o.notify = run.emit, run.notify
  local result
  if o.stage and o.stage.workspace and not o.question then
    o.repo = run.data.repo
    -- Asked once a run: most of a pipeline's stages have a workspace.
    if run.workspace_ok == nil then
      local ok, why = build.applies(o)
      run.workspace_ok, run.workspace_why = ok, why
    end
    if run.workspace_ok then
      result = build.run(o)
    else
      -- A run given no repository has nothing for a stage to read: said only where
      -- code was to be changed, or where the repository given cannot be used.
      if o.repo or o.stage.workspace == "worktree" then
        self:_emit(run.id, "workspace_skipped", { stage = o.stage.name, reason = run.workspace_why,
                                                  read = o.stage.workspace == "read" or nil })
      end
      result = objective.run(o)
    end
  else
    result = objective.run(o)
  end
  self.active[key] = previous
  return result
end

-- A build stage's change as the later stages read it: where it is and the patch, so
-- that a verify stage reviews the code, not only the agent's account of it.
local function change_text(result)
  local ws = type(result.workspace) == "table" and result.workspace
  if not ws or type(ws.commit) ~= "string" then return "" end
  local ds = type(ws.diff_stats) == "table" and ws.diff_stats or {}
  return ("\n\n### The change: branch %s, commit %s, %d file(s) +%d -%d\n```diff\n%s\n```"):format(
    tostring(ws.branch or "(deleted)"), ws.commit:sub(1, 10), ds.files or 0, ds.insertions or 0, ds.deletions or 0,
    ((type(ws.diff) == "string" and ws.diff or "(not recorded)"):gsub("\n$", "")))
end

local function inputs_of(run, st, pipe)
  local wanted
  if #st.inputs > 0 then
    wanted = {}
    for _, name in ipairs(st.inputs) do wanted[name] = true end
  end
  local out = {}
  for _, r in ipairs(run.results) do
    if r.status == "COMPLETE" and pipe.stage[r.stage] and pipe.stage[r.stage].index < st.index
        and (not wanted or wanted[r.stage]) then
      out[#out + 1] = { stage = r.stage, team = r.team, text = confidence.artifact_text(r.result)
        .. change_text(r.result) }
    end
  end
  return out
end

-- The attempts so far, and those since the last human answer (the iteration cap
-- counts those: a human who answers grants a fresh set of iterations).
local function attempts(run, stage, answers)
  local since = 0
  for _, a in ipairs(answers) do
    if a.human then since = math.max(since, a.at) end
  end
  local total, recent = 0, 0
  for _, r in ipairs(run.results) do
    if r.stage == stage then
      total = total + 1
      if r.created_at > since then recent = recent + 1 end
    end
  end
  return total, recent
end

local function questions_asked(db, run_id, stage, team)
  local rows = assert(db:query("SELECT data FROM mail WHERE run_id = ? AND kind = 'clarification' AND sender = ?",
    { run_id, team }))
  local n = 0
  for _, r in ipairs(rows) do
    if type(r.data) == "table" and r.data.stage == stage and r.data.depth == 1 then n = n + 1 end
  end
  return n
end

function Engine:_escalate(run, st, team, op, question, reason)
  local id = self.db:tx(function(tx)
    return hitl.escalate(tx, { run_id = run.id, stage = st.name, team = team.name, operative = op.name,
                               question = question, reason = reason })
  end)
  self:_notify(run.id, "escalated", { id = id, stage = st.name, team = team.name, reason = reason, question = question })
  return "waiting", hitl.get(self.db, id)
end

function Engine:_stage(run, pipe, st)
  local db, limits = self.db, pipe.limits
  -- stage_started is written with the first objective_started (one write), unless
  -- the stage ends before that.
  local started = { stage = st.name, index = st.index, team = st.team }
  while true do
    if run.escalation then
      if started then self:_emit(run.id, "stage_started", started) end
      assert(db:exec("UPDATE runs SET state = 'waiting', updated_at = ? WHERE id = ?", { time.now(), run.id }))
      return "waiting", hitl.get(db, run.escalation)
    end
    -- The definitions as they are now; this objective keeps them even if a file is
    -- reloaded while it runs.
    local team = self.project.teams:get(st.team)
    if not team then
      -- Its file does not load (or is gone): a human fixes it, the file reloads, and
      -- the answer lets the stage go on; the stages done so far stay done.
      if started then self:_emit(run.id, "stage_started", started) end
      return self:_escalate(run, st, { name = st.team }, { name = st.operative or "-" },
        ("Fix the team's file (it is reloaded when saved; `factory check` shows the problem), then answer to go"
         .. " on."), ("team %s is not loaded: %s"):format(st.team, self:_definition_problem(self.project.teams, st.team)))
    end
    local op = M.operative_of(team, st)
    local answers = {}
    for _, a in ipairs(run.answers) do
      if a.stage == st.name then answers[#answers + 1] = a end
    end
    local total, recent = attempts(run, st.name, answers)
    if recent >= limits.max_iterations then
      if started then self:_emit(run.id, "stage_started", started) end
      return self:_escalate(run, st, team, op, "The stage made no progress: decide how to continue, or answer what it "
        .. "keeps missing.", ("iteration limit reached: %d attempts (max_iterations)"):format(recent))
    end
    local objective_started = { stage = st.name, team = team.name, operative = op.name, attempt = total + 1 }
    local events = started and { { "stage_started", started }, { "objective_started", objective_started } }
      or { { "objective_started", objective_started } }
    -- Posted: the objective need not wait for its timeline's commit, which comes
    -- before (or with) the attempt's result.
    db:post(records.events, run.id, events)
    if started then self:_notify(run.id, "stage_started", started) end
    started = nil
    self:_notify(run.id, "objective_started", objective_started)
    local result = self:_objective(run, team, op, { stage = st, inputs = inputs_of(run, st, pipe), answers = answers,
                                                    retries = limits.retries, attempt = total + 1,
                                                    outage_retries = limits.outage_retries,
                                                    outage_wait_s = limits.outage_wait_s })
    local gate = confidence.gate(result)
    local attempt = total + 1
    local last = st.index == #pipe.stages
    local now
    local vectors = gate == "advance" and memory.embed(result.verified_facts, { team = team.name, run = run.id })
    -- The same data is recorded and then notified (the record is written first).
    local task_result = { stage = st.name, team = team.name, operative = op.name, attempt = attempt,
                          status = result.status }
    local completed = gate == "advance" and { stage = st.name, team = team.name, attempt = attempt }
    local decision
    if gate == "advance" then
      decision = "advance"
    elseif gate == "clarify" then
      decision = "ask " .. tostring(result.clarification_needed and result.clarification_needed.team)
    else
      decision = "escalate to a human"
    end
    local recorded, unrecorded = db:tx(function(tx)
      now = time.now()
      assert(tx:exec("INSERT INTO stage_results (run_id, stage, attempt, team, operative, status, result, created_at)"
        .. " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", { run.id, st.name, attempt, team.name, op.name, result.status, result, now }))
      records.decision(tx, { run_id = run.id, stage = st.name, team = team.name, operative = op.name,
        decision = decision .. " (" .. result.status .. ")",
        reasoning = result.reasoning, data = { blockers = result.blockers, assumptions = result.assumptions_made } })
      -- The run's events of this commit go in one statement, at the end.
      local events = { { "task_result", task_result } }
      if gate ~= "advance" then
        records.events(tx, run.id, events)
        return true
      end
      local changed = assert(tx:exec("UPDATE runs SET stage_index = ?, stage = ?, state = ?, updated_at = ?,"
        .. " finished_at = ? WHERE id = ? AND stage_index = ?",
        { st.index, st.name, last and "succeeded" or "running", now, last and now or nil, run.id, st.index - 1, n = 7 }))
      if changed.changes ~= 1 then error("run " .. run.id .. " advanced behind this process's back") end
      memory.retain(tx, team.name, result.verified_facts, { source = st.name, run_id = run.id, vectors = vectors })
      memory.retain(tx, memory.SHARED, result.verified_facts, { source = team.name .. "/" .. st.name, run_id = run.id,
                                                                vectors = vectors })
      memory.learn(tx, team.name, run.id, result.learnings,
        { repo = run.data.repo, objective = run.data.anchor:match("^[^\n]*") })
      events[#events + 1] = { "stage_completed", completed }
      if last then
        events[#events + 1] = { "run_finished", { state = "succeeded" } }
        assert(tx:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { "run:" .. run.id, self.owner }))
      end
      records.events(tx, run.id, events)
      return true
    end)
    -- A run whose records cannot be written stops here, saying why.
    if not recorded then
      error(("stage %s: the objective's result could not be recorded: %s"):format(st.name, tostring(unrecorded)), 0)
    end
    run.results[#run.results + 1] = { stage = st.name, team = team.name, status = result.status, result = result,
                                       created_at = now }
    run.unlocked = gate == "advance" and last
    self:_notify(run.id, "task_result", task_result)
    if gate == "advance" then
      self:_notify(run.id, "stage_completed", completed)
      run.stage_index = st.index
      return "complete"
    end
    if gate == "escalate" then
      return self:_escalate(run, st, team, op, result.reasoning, "BLOCKED: " .. table.concat(result.blockers, "; "))
    end
    local c = result.clarification_needed
    local answer, why = clarify.ask({
      db = db, run_id = run.id, stage = st.name, limits = limits, asker = team,
      count = questions_asked(db, run.id, st.name, team.name),
      team = function(name) return self.project.teams:get(name) end,
      answer = function(target, question, got)
        return self:_objective(run, target, target.operative[target.responder],
                               { question = question, answers = got, retries = limits.retries,
                                 outage_retries = limits.outage_retries, outage_wait_s = limits.outage_wait_s })
      end,
      emit = run.emit,
    }, c.team, c.question)
    if not answer then
      return self:_escalate(run, st, team, op, ("%s (asked of %s)"):format(c.question, c.team), why)
    end
    run.answers = hitl.answers(db, run.id)
  end
end

return M
