-- factory.run_cli: `factory run`, `factory resume`, `factory hitl`, `factory runs`.
--
--   run_cli.main(command, args [, opts]) -> exit code   (inside a fiber)
--       command: "run" | "resume" | "hitl" | "runs"; args: what follows it.
--       opts.router: a router configuration to use instead of factory.lua (the
--       offline replay demo passes one); opts.agents: factory.lua's agents section
--       to go with it.
--   run_cli.HELP[command]: the help text.
-- Exit codes: 0 the run succeeded (or the command did its job), 1 the run failed or
-- the command could not do it, 2 usage error, 3 the run waits for a human
-- (--no-wait). While waiting, `factory run` polls the store for the answer, which
-- `factory hitl answer` may give from any process.
local ffi = require "ffi"
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local fs = require "factory.core.fs"
local db = require "factory.db"
local router = require "factory.router"
local config = require "factory.config"
local dsl = require "factory.dsl"
local pipeline = require "factory.pipeline"
local hitl = require "factory.hitl"
local git = require "factory.git"
local signal = require "factory.core.signal"
local proc = require "factory.proc"
local json = require "factory.json"
local build = require "factory.agents.build"
local agent_cli = require "factory.agents.cli"
local orchestrator = require "factory.agents.orchestrator"
local notify = require "factory.notify"
local utf8_error = require("factory.core.text").utf8_error

ffi.cdef "int isatty(int fd);"
pcall(ffi.cdef, "int kill(int pid, int sig);")

local M = {}

local DB_HELP = [[
--db URL       sqlite:PATH or postgres://... (default: $FACTORY_DB, else .factory/factory.db)]]
local ENGINE_HELP = [[
--config FILE  the installation's providers and models (default ./factory.lua)
--project DIR  where teams/ and pipelines/ are (default .)
--no-wait      when the run needs a human, exit (code 3) instead of waiting
]] .. DB_HELP

M.HELP = {
  run = [[
usage: factory run PIPELINE --repo DIR (--issue TEXT | --file F) [OPTIONS]

Runs one work item through PIPELINE to the end, showing its progress (a status
line on a terminal, plain lines otherwise) and a summary. The run is durable:
run the same command again, or `factory resume RUN`, after a crash or kill and it
continues from the first unfinished stage. When an objective is BLOCKED or a
clarification cannot be answered, the question goes to a human and the run waits
for `factory hitl answer ID TEXT` (from any terminal).

--again        run the work item anew even though a run of it has succeeded (one
               that has not finished is continued, never run twice at once)
]] .. ENGINE_HELP .. "\n",
  resume = "usage: factory resume RUN [OPTIONS]\n\nContinues run RUN from its first unfinished stage.\n\n"
    .. ENGINE_HELP .. "\n",
  hitl = [[
usage: factory hitl list [--all] [--db URL]
       factory hitl answer ID TEXT [--db URL]

  list          the open escalations (questions waiting for a human); --all: answered ones too
  answer ID T   answer escalation ID; the run waiting on it continues

]] .. DB_HELP .. "\n",
  runs = [[
usage: factory runs [--limit N] [--db URL]
       factory runs show RUN [--db URL]
       factory runs cancel RUN [--db URL]

  runs          the latest runs (20, or N): state, stages done, what their model
                calls cost, when they last changed
  show RUN      the run's timeline: stages, objectives, model calls, clarifications,
                escalations and answers, in order
  cancel RUN    end a run that has not finished (and that no process is executing):
                its open questions are closed, and the work item, run again, starts anew

]] .. DB_HELP .. "\n",
}

local FLAGS = {
  run = { ["--repo"] = 1, ["--issue"] = 1, ["--file"] = 1, ["--db"] = 1, ["--config"] = 1, ["--project"] = 1,
          ["--no-wait"] = 0, ["--again"] = 0 },
  resume = { ["--db"] = 1, ["--config"] = 1, ["--project"] = 1, ["--no-wait"] = 0 },
  hitl = { ["--db"] = 1, ["--all"] = 0 },
  runs = { ["--db"] = 1, ["--limit"] = 1 },
}

local function usage_error(msg)
  io.stderr:write("factory: ", msg, " (see 'factory --help')\n")
  return 2
end

local function fail(msg)
  io.stderr:write("factory: ", msg, "\n")
  return 1
end

local function parse(command, args)
  local flags, words = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local takes = FLAGS[command][a]
    if takes == 1 then
      if args[i + 1] == nil then return nil, a .. " needs a value" end
      flags[a:sub(3)] = args[i + 1]
      i = i + 2
    elseif takes == 0 then
      flags[a:sub(3)] = true
      i = i + 1
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return nil, ("unknown flag '%s' for '%s'"):format(a, command)
    else
      words[#words + 1] = a
      i = i + 1
    end
  end
  return flags, words
end

local function open_db(url)
  local d, err = db.open(url)
  if not d then return nil, err end
  local ok, merr = d:migrate()
  if not ok then
    d:close()
    return nil, merr
  end
  return d
end

-- ---- progress ---------------------------------------------------------------------

local commas = require("factory.cli_args").commas

local function unavailable_text(d)
  return ("  model unreachable (%s): waiting %gs before asking again (%d of %d)"):format(d.code, d.wait_s, d.wait,
    d.waits)
end

-- A build stage's worktree starts from the repository's last commit.
local function uncommitted_note(d)
  if not d.uncommitted then return "" end
  return (" from the last commit: the repository's %d uncommitted change(s) are not in it"):format(d.uncommitted)
end

-- Which earlier attempt left the work an attempt goes on from, by how it ended.
local LEFT_BY = { NEEDS_CLARIFICATION = "the attempt that asked a question", BLOCKED = "the attempt that was BLOCKED" }

-- Where a build stage's branch starts when an earlier build stage of the run left a change.
local function from_note(d)
  local from = type(d.from) == "table" and d.from
  if not from then return "" end
  if from.gone then
    return (" from the repository's HEAD: branch %s of stage %s no longer holds that stage's commit"):format(
      tostring(from.branch), tostring(from.stage))
  end
  if from.continued then
    return (" going on from commit %s, which %s of this stage left on branch %s"):format(
      tostring(from.commit):sub(1, 10), LEFT_BY[from.after] or "a stopped attempt", tostring(from.branch))
  end
  return (" from stage %s's commit %s"):format(tostring(from.stage), tostring(from.commit):sub(1, 10))
end

-- An agent that changed nothing leaves no branch (events recorded before that have
-- no `kept`); a stage that read the code keeps nothing.
local function workspace_outcome(d)
  if d.read then
    return ("read commit %s, worktree removed%s"):format(tostring(d.base):sub(1, 10), (d.discarded or 0) > 0
      and (", %d changed path(s) not kept"):format(d.discarded) or "")
  end
  if not d.commit and d.kept == false then return ("no change: branch %s deleted"):format(d.branch) end
  return ("branch %s: %s, %d file(s) +%d -%d"):format(d.branch, d.commit and ("commit " .. d.commit:sub(1, 10))
    or "no change", d.files, d.insertions, d.deletions)
end

-- A command shows what it was and how it ended.
local function tool_text(d)
  if not d.ok then return ("tool %s failed: %s"):format(d.name, tostring(d.error)) end
  if d.command == nil then return ("tool %s ok"):format(d.name) end
  local ended = d.timed_out and "timed out" or d.signal and ("killed by signal " .. tostring(d.signal))
    or ("exit " .. tostring(d.exit))
  return ("tool %s `%s`: %s"):format(d.name, d.command, ended)
end

local function worktree_text(d, lead)
  return d.read and ("  worktree %s to read and run the code%s (nothing changed there is kept)%s"):format(d.branch,
      from_note(d), uncommitted_note(d))
    or ("  %s %s%s%s"):format(lead or "worktree: branch", d.branch, from_note(d), uncommitted_note(d))
end

local function skipped_text(d)
  return ("  no worktree for stage %s: %s; it runs %s"):format(d.stage, d.reason,
    d.read and "without the repository's files" or "without changing code")
end

-- Returns the run's event handler and, for a terminal, a redraw of the status line
-- (called every second so the elapsed time moves during a long model call).
local function progress(tty)
  -- The run's own count of stages (run_started): a run keeps the stages it began with.
  local current = { stage = "-", index = 0, who = "-", stages = 0 }
  local last
  local function status(ev)
    local elapsed = ev.started and (time.monotonic() - ev.started) or 0
    return ("[%d/%d %s] %s  %s tok  $%.4f  %.1fs"):format(current.index, current.stages, current.stage, current.who,
      commas(ev.tokens), ev.cost or 0, elapsed)
  end
  local function line(text)
    if tty then io.stdout:write("\r\27[K") end
    io.stdout:write(text, "\n")
    io.stdout:flush() -- a log file or pipe shows progress as it happens
  end
  local function redraw()
    if tty and last then io.stdout:write("\r\27[K", status(last)) io.stdout:flush() end
  end
  return function(ev)
    last = ev
    local d = ev.data or {}
    local k = ev.kind
    if k == "run_started" then
      current.stages = d.stages
      line(("run %d: %s, %d stages%s"):format(ev.run_id, d.pipeline, d.stages,
        d.resumed and (", resuming at stage " .. (d.stage_index + 1)) or ""))
    elseif k == "stage_started" then
      current.stage, current.index, current.who = d.stage, d.index, d.team
    elseif k == "objective_started" then
      current.who = d.team .. "/" .. d.operative
      if not tty then line(("[%d/%d] %s: %s (attempt %d)"):format(current.index, current.stages, d.stage, current.who, d.attempt)) end
    elseif k == "model_call" then
      if not tty then
        line(("  model %s %s: %s tok, $%.4f"):format(d.alias, d.status, commas((d.prompt_tokens or 0)
          + (d.completion_tokens or 0)), d.cost_usd or 0))
      end
    elseif k == "task_result" then
      line(("[%d/%d] %s: %s -> %s"):format(current.index, current.stages, d.stage, current.who, d.status))
    elseif k == "task_result_invalid" then
      line(("  malformed TaskResult (attempt %d): %s"):format(d.attempt, d.error))
    elseif k == "context_packed" then
      line(("  context %s tokens -> %s (window %s)%s"):format(commas(d.before), commas(d.after), commas(d.window),
        d.summarised and ", older material summarised" or ", cut"))
    elseif k == "clarification" then
      line(("  clarification %s -> %s: %s"):format(d.from, d.to, d.question))
    elseif k == "clarification_answered" then
      line(("  answered by %s"):format(d.from))
    elseif k == "escalated" then
      line(("  escalated to a human (#%d): %s"):format(d.id, d.reason))
    elseif k == "workspace_started" then
      line(worktree_text(d))
    elseif k == "model_unavailable" then
      line(unavailable_text(d))
    elseif k == "tool_call" then
      line("  " .. tool_text(d))
    elseif k == "agent_iteration" then
      line(("  agent iteration %d%s"):format(d.iteration, d.attempt > 1 and (" (retry " .. (d.attempt - 1) .. ")") or ""))
    elseif k == "agent_progress" then
      if not tty then line("    " .. d.text) end
    elseif k == "agent_killed" then
      line(("  agent killed in iteration %d: %s"):format(d.iteration, d.reason))
    elseif k == "agent_learning" then
      line(("  learning: %s"):format(d.text))
    elseif k == "agent_done" then
      line(("  agent %s after %d iteration(s)"):format(d.status, d.iterations))
    elseif k == "workspace_done" then
      line("  " .. workspace_outcome(d))
    elseif k == "workspace_skipped" then
      line(skipped_text(d))
    end
    redraw()
  end, redraw
end

-- What a build stage left in the repository, for the summary: where the change is,
-- or that there is none (a COMPLETE fix that changed nothing is worth a look).
local function change_of(result)
  local ws = type(result) == "table" and type(result.workspace) == "table" and result.workspace
  if not ws then return "" end
  if ws.read then return ws.base and ("  read commit %s"):format(tostring(ws.base):sub(1, 10)) or "" end
  local stats = type(ws.diff_stats) == "table" and ws.diff_stats or {}
  if not ws.commit then return "  no change to the repository" end
  return ("  branch %s (commit %s, %d file(s) +%d -%d)"):format(tostring(ws.branch), tostring(ws.commit):sub(1, 10),
    stats.files or 0, stats.insertions or 0, stats.deletions or 0)
end

-- outcome, detail: what engine:execute returned. A run stopped by a store that took
-- no more writes (a full disk) is still 'running' in it: the stop is told from here.
local function summary(d, run_id, started, outcome, detail)
  local run = d:query("SELECT r.*, w.title FROM runs r JOIN work_items w ON w.id = r.work_item_id WHERE r.id = ?",
    { run_id })[1]
  if outcome == "stopped" and run.state ~= "stopped" then
    run.state, run.error = "stopped", tostring(detail) .. " (the store could not record the stop either)"
  end
  local calls = d:query("SELECT COUNT(*) AS n, COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS tokens,"
    .. " COALESCE(SUM(cost_usd), 0) AS usd FROM model_calls WHERE run_id = ?", { run_id })[1]
  local stages = d:query("SELECT stage, team, operative, status, attempt, result FROM stage_results WHERE run_id = ?"
    .. " ORDER BY id", { run_id })
  local last = {}
  local order = {}
  for _, s in ipairs(stages) do
    if not last[s.stage] then order[#order + 1] = s.stage end
    last[s.stage] = s
  end
  print(("\nrun %d %s (%s) in %.1f s: %d stage(s) done, %d model calls, %s tokens, $%.4f"):format(run_id, run.state,
    run.pipeline, time.monotonic() - started, run.stage_index, calls.n, commas(calls.tokens), calls.usd))
  local wide_stage, wide_who = 14, 34
  for _, name in ipairs(order) do
    wide_stage = math.max(wide_stage, #name)
    wide_who = math.max(wide_who, #last[name].team + 1 + #last[name].operative)
  end
  local changed = {}
  for _, name in ipairs(order) do
    local s = last[name]
    local change = change_of(s.result)
    if change:find("^  branch") then changed[#changed + 1] = s.result.workspace.branch end
    print(("  %-" .. wide_stage .. "s %-" .. wide_who .. "s %-20s attempts %d%s"):format(name,
      s.team .. "/" .. s.operative, s.status, s.attempt, change))
  end
  -- Each build stage starts from the one before it: the last branch holds them all.
  if #changed > 1 then
    print(("the run's whole change (%d stages changed the code) is on branch %s"):format(#changed, changed[#changed]))
  end
  if run.error then print("  error: " .. run.error) end
  if run.state == "stopped" then
    print(("its finished stages are kept: once the cause is fixed, continue it with: factory resume %d"):format(run_id))
  end
  print(("details: factory runs show %d"):format(run_id))
end

-- ---- run / resume -----------------------------------------------------------------

-- pipeline_name (factory run's): a project without it is refused before the store is
-- opened, which would make one (.factory/) in a directory that holds no project.
local function engine_for(flags, opts, on_event, redraw, pipeline_name)
  local router_cfg, agents = opts.router, opts.agents
  local engine, config_watch, project
  -- factory.lua's notify { }: told of each event the progress shows; an edit applies
  -- to the events after it.
  local notifier = notify.new(nil)
  -- A budget that limits nothing (its teams' models unpriced) is said before the run
  -- spends, and again after an edit of factory.lua; for the pipeline run (resume
  -- knows it once it has read the run: e.pipeline(name)).
  local function warn_unpriced()
    if not (project and pipeline_name) then return end
    local free = dsl.unpriced_budgets(project, router_cfg, pipeline_name)
    if free then io.stderr:write("factory: warning: ", free, "\n") end
  end
  if not router_cfg then
    local path = config.find(flags.config)
    if not path then return nil, "no factory.lua here: give --config FILE (providers and models for the router)" end
    -- An edit of factory.lua applies to the model calls and objectives that start
    -- after it (an edit that does not load is reported by the loader, file:line).
    local cfg, watcher = config.load(path, function(new)
      local ok, rerr = router.configure(new.router)
      if not ok then
        io.stderr:write(("factory: %s: reload rejected, keeping the previous configuration: %s\n"):format(path, rerr))
        return
      end
      for _, w in ipairs(new.warnings) do io.stderr:write(("factory: warning: %s: %s\n"):format(path, w)) end
      router_cfg = new.router
      notifier = notify.new(new.notify)
      if engine then
        engine:set_budgets(new.router.budgets)
        warn_unpriced()
      end
    end)
    if not cfg then return nil, watcher end
    config_watch = watcher
    for _, w in ipairs(cfg.warnings) do io.stderr:write(("factory: warning: %s: %s\n"):format(path, w)) end
    router_cfg, agents = cfg.router, cfg.agents
    notifier = notify.new(cfg.notify)
  end
  local function unwatch()
    if config_watch then config_watch.stop() end
  end
  local ok, err = router.configure(router_cfg)
  if not ok then
    unwatch()
    return nil, err
  end
  project = dsl.project(flags.project or ".", { aliases = dsl.aliases_of(router_cfg) })
  for _, p in ipairs(project:load()) do io.stderr:write("factory: ", p, "\n") end
  local missing = pipeline_name and pipeline.missing(project, pipeline_name)
  if missing then
    unwatch()
    return nil, missing
  end
  warn_unpriced()
  local d
  d, err = open_db(flags.db)
  if not d then
    unwatch()
    return nil, err
  end
  local watch = project:watch()
  local function told(ev)
    on_event(ev)
    notifier.event(ev)
  end
  engine = pipeline.engine{ db = d, project = project, on_event = told, budgets = router_cfg.budgets,
                            agents = agents }
  return { db = d, engine = engine, redraw = redraw, pipeline = function(name)
    pipeline_name = name
    warn_unpriced()
  end, close = function()
    engine:close()
    watch:stop()
    unwatch()
    d:close()
  end }
end

-- Executes the run; while it waits for a human, polls the store for the answer.
local function drive_run(e, run_id, flags, tty)
  local started = time.monotonic()
  while true do
    local ticker = tty and fiber.spawn(function()
      while true do
        fiber.sleep(1)
        e.redraw()
      end
    end)
    local state, detail = e.engine:execute(run_id)
    if ticker then
      ticker:cancel("done")
      io.stdout:write("\r\27[K")
    end
    if state == "busy" or state == "unloaded" then return fail(detail) end
    if state ~= "waiting" then
      summary(e.db, run_id, started, state, detail)
      return state == "succeeded" and 0 or 1
    end
    print(("run %d waits for a human: escalation #%d from %s (%s)\n  question: %s\n  answer with: factory hitl answer"
      .. " %d \"...\""):format(run_id, detail.id, detail.team, detail.reason, detail.question, detail.id))
    if flags["no-wait"] then return 3 end
    io.stdout:flush()
    repeat fiber.sleep(0.5) until hitl.get(e.db, detail.id).answer
    print(("answer received for #%d; continuing"):format(detail.id))
  end
end

local SIGNALS = { INT = 2, TERM = 15, HUP = 1 }

-- Ctrl-C (or a kill) says what becomes of the run, then ends the process by the same
-- signal: what a kill -9 would do, which a run is built to survive; the process
-- groups of its agents and gates go with it (factory.core.proc's guard). First the
-- model calls in flight end, and are recorded with the writes still waiting: the
-- provider bills a call it had, so the run's and its team's spending (what a resumed
-- run's budget starts from) must count it.
local function on_interrupt(d, run_id)
  return fiber.spawn(function()
    local name = signal.wait("INT", "TERM", "HUP")
    io.stderr:write(("\nfactory: interrupted (SIG%s): run %d stops here; its finished stages are kept."
      .. " Continue it with: factory resume %d\n"):format(name, run_id, run_id))
    local stopped = router.stop(("the run was interrupted (SIG%s)"):format(name))
    d:flush()
    if stopped > 0 then
      io.stderr:write(("factory: %d model call(s) in flight stopped, recorded as cancelled with what they cost\n")
        :format(stopped))
    end
    -- The wait's handles close on the next turn of the loop; then the guard is back.
    fiber.sleep(0.01)
    ffi.C.kill(proc.getpid(), SIGNALS[name])
  end)
end

-- What a `factory run` killed on this host (kill -9, the OOM killer) left running:
-- its CLI agents' process groups, recorded in the store, are killed before a run
-- starts, so that none goes on working in a worktree the new attempt replaces.
local function reap_agents(d)
  local killed = orchestrator.reap_agents(d)
  if killed and #killed > 0 then
    print(("killed %d agent process(es) left running by a factory process that died: %s"):format(#killed,
      table.concat(killed, ", ")))
  end
end

local function drive(e, run_id, flags, tty)
  reap_agents(e.db)
  local interrupt = on_interrupt(e.db, run_id)
  local code = drive_run(e, run_id, flags, tty)
  interrupt:cancel("the run's execution ended")
  return code
end

-- Why a pipeline with a build stage (or one that reads the code) cannot work on
-- repo, found before any stage is paid for: the stage's agent works in a worktree of
-- a git repository, branched from HEAD, which a repository without a commit lacks.
-- (Run anyway, the stage would be a plain model call that neither sees nor changes
-- the code: a night's batch paid for and no code written.)
local function unready_repo(pipe, repo, given)
  local build_stage, reading_stage
  for _, st in ipairs(pipe and pipe.stages or {}) do
    if st.workspace == "worktree" then build_stage = build_stage or st.name end
    if st.workspace == "read" then reading_stage = reading_stage or st.name end
  end
  local what = build_stage and "changes" or "reads"
  build_stage = build_stage or reading_stage
  if not build_stage then return nil end
  local usable, why, top = build.applies({ repo = repo })
  if top then
    return ("%s: %s is not a git repository but a directory inside %s, and stage %s %s the code in a"
      .. " git worktree: give --repo %s"):format(given, repo, top, build_stage, what, top)
  elseif not usable then
    return ("%s: %s, and stage %s %s the code in a git worktree: give a git repository (git init,"
      .. " then commit the code)"):format(given, why, build_stage, what)
  end
  local r = git.open(repo)
  if not r then return nil end
  local head = r:head()
  r:close()
  if head and head.oid then return nil end
  return ("%s: the repository has no commit yet, and the pipeline's stage %s works in a worktree branched from"
    .. " HEAD: commit something first"):format(given, build_stage)
end

-- A stage whose team did not load (its problem was printed as the project loaded),
-- found before the stages ahead of it are paid for.
local function unloaded_team(pipe, project)
  for _, st in ipairs(pipe and pipe.stages or {}) do
    if not project.teams:get(st.team) then
      return ("stage %s needs team %s, which did not load (above; `factory check` shows every problem): fix it"
        .. " and run again"):format(st.name, st.team)
    end
  end
end

-- A build stage whose CLI agent's program is not installed, found before the stages
-- ahead of it are paid for (only for a repository a worktree can be made of: the
-- agent runs nowhere else).
local function missing_agent(pipe, project, repo)
  if not build.applies({ repo = repo }) then return nil end
  for _, st in ipairs(pipe and pipe.stages or {}) do
    local team = st.workspace and project.teams:get(st.team)
    local op = team and pipeline.operative_of(team, st)
    if op and type(op.agent) == "table" then
      local program, path = agent_cli.program(op.agent)
      if program and not proc.which(program, path) then
        return ("stage %s: the agent of %s/%s runs %s, which is not installed (not found in PATH %s): install it,"
          .. " or give the agent's command in the team's file, and run again"):format(st.name, team.name, op.name,
          program, path)
      end
    end
  end
end

-- The stages of a run that have no COMPLETE result yet, as a pipeline (for the
-- checks made before paying).
local function stages_ahead(db, run_id, pipe)
  local done = {}
  for _, r in ipairs(db:query("SELECT stage FROM stage_results WHERE run_id = ? AND status = 'COMPLETE'",
                              { run_id })) do
    done[r.stage] = true
  end
  local ahead = {}
  for _, st in ipairs(pipe and pipe.stages or {}) do
    if not done[st.name] then ahead[#ahead + 1] = st end
  end
  return { stages = ahead }
end

-- Why text a human gave cannot be taken: it goes into model requests, whose JSON
-- is UTF-8 (and into the store, which PostgreSQL keeps as UTF-8).
local function not_utf8(what, text, fix)
  local bad = utf8_error(text)
  if not bad then return nil end
  local before = text:sub(1, bad - 1)
  local _, newlines = before:gsub("\n", "")
  return ("%s is not UTF-8 text: byte 0x%02X at line %d, column %d (Latin-1 or Windows-1252?): %s"):format(
    what, text:byte(bad), newlines + 1, #before:match("[^\n]*$") + 1, fix)
end

local function cmd_run(flags, words, opts)
  if #words ~= 1 then return usage_error("factory run needs one PIPELINE") end
  if not flags.repo then return usage_error("factory run needs --repo DIR") end
  if (flags.issue == nil) == (flags.file == nil) then return usage_error("factory run needs --issue TEXT or --file F") end
  local st = fs.stat(flags.repo)
  if not st or st.type ~= "directory" then return fail(("--repo %s: not a directory"):format(flags.repo)) end
  local text = flags.issue
  if flags.file then
    local err
    text, err = fs.read(flags.file)
    if not text then return fail(err) end
  end
  -- A file saved on Windows or with a byte-order mark is the same work item.
  text = text:gsub("^\239\187\191", ""):gsub("\r\n", "\n")
  local bad = not_utf8(flags.file and ("--file " .. flags.file) or "--issue", text,
                       flags.file and "save it as UTF-8 and run again" or "give it as UTF-8")
  if bad then return fail(bad) end
  local title, body = text:match("^%s*#*%s*([^\n]*)\n?(.*)$")
  title = title:gsub("%s+$", "")
  local repo = fs.realpath(flags.repo) or flags.repo
  local tty = ffi.C.isatty(1) == 1
  local on_event, redraw = progress(tty)
  local e, err = engine_for(flags, opts, on_event, redraw, words[1])
  if not e then return fail(err) end
  local pipe = e.engine.project.pipelines:get(words[1])
  local unready = unloaded_team(pipe, e.engine.project) or unready_repo(pipe, repo, "--repo " .. flags.repo)
    or missing_agent(pipe, e.engine.project, repo)
  if unready then
    e.close()
    return fail(unready)
  end
  local run_id, earlier = e.engine:submit{ pipeline = words[1], title = title, body = body, repo = repo,
    source = "cli", external_id = table.concat({ words[1], repo, text }, "\n"), again = flags.again }
  local code
  if not run_id then
    code = fail(earlier)
  else
    if earlier == "succeeded" then
      print(("run %d of this work item has succeeded already: it is not run or paid for again (--again runs"
        .. " it anew)"):format(run_id))
    elseif earlier then
      print(("continuing run %d of this work item%s"):format(run_id, flags.again
        and " (it has not finished: --again runs a work item anew only after its run has succeeded)" or ""))
    end
    code = drive(e, run_id, flags, tty)
  end
  e.close()
  return code
end

local function cmd_resume(flags, words, opts)
  local run_id = tonumber(words[1])
  if #words ~= 1 or not run_id then return usage_error("factory resume needs one RUN id") end
  local tty = ffi.C.isatty(1) == 1
  local on_event, redraw = progress(tty)
  local e, err = engine_for(flags, opts, on_event, redraw)
  if not e then return fail(err) end
  local run = e.db:query("SELECT pipeline, state, data FROM runs WHERE id = ?", { run_id })[1]
  local code
  if not run then
    code = fail(("no run %d"):format(run_id))
  else
    if run.state ~= "succeeded" then e.pipeline(run.pipeline) end
    local ahead = stages_ahead(e.db, run_id, e.engine.project.pipelines:get(run.pipeline))
    local repo = type(run.data) == "table" and run.data.repo
    local missing = (repo and unready_repo(ahead, repo, ("run %d's repository %s"):format(run_id, repo)))
      or missing_agent(ahead, e.engine.project, repo)
    code = missing and fail(missing) or drive(e, run_id, flags, tty)
  end
  e.close()
  return code
end

-- ---- hitl / runs ------------------------------------------------------------------

local function with_db(flags, fn)
  local d, err = open_db(flags.db)
  if not d then return fail(err) end
  local ok, code = pcall(fn, d)
  d:close()
  if not ok then return fail(tostring(code)) end
  return code
end

local function cmd_hitl(flags, words)
  local sub = words[1]
  if sub == "list" then
    if #words ~= 1 then return usage_error("factory hitl list takes no arguments") end
    return with_db(flags, function(d)
      local list = hitl.list(d, { all = flags.all })
      if #list == 0 then print("no open escalations") end
      for _, e in ipairs(list) do
        print(("#%d  run %d  stage %s  team %s  %s"):format(e.id, e.run_id, e.stage or "-", e.team,
          time.iso8601(e.created_at)))
        print("    reason:   " .. e.reason)
        print("    question: " .. e.question)
        if e.answer then print(("    answer (%s): %s"):format(e.answered_by, e.answer)) end
      end
      return 0
    end)
  elseif sub == "answer" then
    local id = tonumber(words[2])
    if #words ~= 3 or not id then return usage_error("usage: factory hitl answer ID TEXT") end
    local bad = not_utf8("the answer", words[3], "give it as UTF-8")
    if bad then return fail(bad) end
    return with_db(flags, function(d)
      local ok, err = hitl.answer(d, id, words[3], "human")
      if not ok then return fail(err) end
      local esc = hitl.get(d, id)
      print(("answered #%d: run %d goes on (a factory run waiting for it takes the answer; if none is, continue"
        .. " it with: factory resume %d)"):format(id, esc.run_id, esc.run_id))
      return 0
    end)
  end
  return usage_error(sub and ("unknown hitl subcommand '%s' (list or answer)"):format(sub)
    or "factory hitl needs a subcommand: list or answer")
end

-- One line of the timeline for an event row.
local DESCRIBE = {
  run_created = function(d) return ("run created: pipeline %s, %q"):format(d.pipeline, d.title) end,
  run_started = function(d) return d.resumed and ("resumed at stage %d/%d"):format(d.stage_index + 1, d.stages)
    or ("started: %d stages"):format(d.stages) end,
  stage_started = function(d) return ("stage %d %s (%s)"):format(d.index, d.stage, d.team) end,
  objective_started = function(d) return ("  objective: %s/%s, attempt %d"):format(d.team, d.operative, d.attempt) end,
  task_result = function(d) return ("  TaskResult %s"):format(d.status) end,
  task_result_invalid = function(d) return ("  malformed TaskResult, sent back: %s"):format(d.error) end,
  context_packed = function(d) return ("  context %d -> %d tokens%s"):format(d.before, d.after,
    d.summarised and " (summarised)" or " (cut)") end,
  clarification = function(d) return ("  clarification %s -> %s: %s"):format(d.from, d.to, d.question) end,
  clarification_answered = function(d) return ("  answer %s -> %s"):format(d.from, d.to) end,
  escalated = function(d) return ("  ESCALATED #%d to a human: %s"):format(d.id, d.reason) end,
  model_unavailable = unavailable_text,
  workspace_started = function(d) return worktree_text(d, "worktree and branch") end,
  tool_call = function(d) return "    " .. tool_text(d) end,
  -- The built-in agent is charged once per attempt, a CLI agent per iteration.
  agent_iteration = function(d)
    if d.iteration then return ("  agent iteration %d (attempt %d)"):format(d.iteration, d.attempt or 1) end
    return ("  agent started (attempt %d)"):format(d.attempt or 1)
  end,
  agent_usage = function(d) return ("    agent usage: %d+%d tok, $%.4f%s"):format(d.input_tokens or 0,
    d.output_tokens or 0, d.cost_usd or 0, d.estimate and " by the agent's own estimate (the proxy's records above"
      .. " are what was charged)" or "") end,
  agent_context_fitted = function(d) return ("    context fitted to the window: %d earlier tool message(s) left out,"
    .. " %d bytes sent"):format(d.messages or 0, d.bytes or 0) end,
  agent_killed = function(d) return ("  agent killed in iteration %d: %s"):format(d.iteration, d.reason) end,
  agent_learning = function(d) return ("  learning: %s"):format(d.text) end,
  agent_done = function(d) return ("  agent %s after %d iteration(s), %d tokens"):format(d.status, d.iterations,
    d.tokens or 0) end,
  workspace_done = function(d) return "  " .. workspace_outcome(d) end,
  workspace_skipped = skipped_text,
  human_answered = function(d) return ("  human answered #%d: %s"):format(d.id, d.answer) end,
  stage_completed = function(d) return ("stage %s COMPLETE"):format(d.stage) end,
  run_finished = function(d) return ("run %s%s"):format(d.state, d.error and (": " .. d.error) or "") end,
  run_stopped = function(d) return ("run stopped by an error (its finished stages are kept): %s"):format(d.error) end,
}

-- An event another version recorded, or one missing a field, still gets a line: its
-- kind and its data as recorded.
local function describe(kind, data)
  local f = DESCRIBE[kind]
  local ok, text = false, nil
  if f and type(data) == "table" then ok, text = pcall(f, data) end
  if ok and type(text) == "string" then return text end
  if data == nil then return kind end
  local encoded = type(data) == "table" and json.encode(data) or tostring(data)
  return ("  %s %s"):format(kind, encoded or "")
end

local function show_run(d, run_id)
  local run = d:query("SELECT r.*, w.title FROM runs r JOIN work_items w ON w.id = r.work_item_id WHERE r.id = ?",
    { run_id })[1]
  if not run then return fail(("no run %d"):format(run_id)) end
  print(("run %d  %s  %s  %q"):format(run.id, run.pipeline, run.state, run.title))
  local items = {}
  for _, e in ipairs(d:query("SELECT kind, data, created_at FROM events WHERE run_id = ? ORDER BY id", { run_id })) do
    items[#items + 1] = { at = e.created_at, text = describe(e.kind, e.data) }
  end
  for _, c in ipairs(d:query("SELECT team, alias, provider, model, prompt_tokens, completion_tokens, cost_usd,"
    .. " latency_ms, status, created_at FROM model_calls WHERE run_id = ? ORDER BY id", { run_id })) do
    items[#items + 1] = { at = c.created_at, text = ("    model %s (%s/%s) for %s: %s, %d+%d tok, $%.4f, %d ms"):format(
      c.alias or "-", c.provider, c.model, c.team or "-", c.status, c.prompt_tokens, c.completion_tokens, c.cost_usd,
      c.latency_ms or 0) }
  end
  for i, it in ipairs(items) do it.i = i end
  table.sort(items, function(a, b)
    if a.at ~= b.at then return a.at < b.at end
    return a.i < b.i
  end)
  local t0 = items[1] and items[1].at or 0
  for _, it in ipairs(items) do print(("%+9.3fs  %s"):format(it.at - t0, it.text)) end
  return 0
end

local RUNS_HEADER = "  RUN  PIPELINE   STATE      STAGES   COST       TOKENS  UPDATED                   TITLE"

local function list_runs(d, limit)
  local total = d:query("SELECT COUNT(*) AS n FROM runs")[1].n
  if total == 0 then return print("no runs") end
  local rows = d:query("SELECT r.id, r.pipeline, r.state, r.stage_index, r.updated_at, w.title,"
    .. " (SELECT COALESCE(SUM(cost_usd), 0) FROM model_calls m WHERE m.run_id = r.id) AS cost,"
    .. " (SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM model_calls m WHERE m.run_id = r.id) AS tokens"
    .. " FROM runs r JOIN work_items w ON w.id = r.work_item_id ORDER BY r.id DESC LIMIT ?", { limit })
  print(RUNS_HEADER)
  for _, r in ipairs(rows) do
    print(("%5d  %-10s %-10s %2d done  %-9s %7s  %s  %s"):format(r.id, r.pipeline, r.state, r.stage_index,
      ("$%.4f"):format(tonumber(r.cost)), commas(tonumber(r.tokens)), time.iso8601(r.updated_at), r.title))
  end
  if total > #rows then
    print(("(the latest %d of %d runs: factory runs --limit N shows more)"):format(#rows, total))
  end
end

local function cmd_runs(flags, words)
  if words[1] == nil then
    local limit = tonumber(flags.limit or 20)
    if not limit or limit < 1 or limit % 1 ~= 0 then return usage_error("--limit needs a whole number of runs, 1 or more") end
    return with_db(flags, function(d)
      list_runs(d, limit)
      return 0
    end)
  end
  local id = tonumber(words[2])
  if (words[1] ~= "show" and words[1] ~= "cancel") or #words ~= 2 or not id then
    return usage_error("usage: factory runs [show RUN | cancel RUN]")
  end
  if words[1] == "show" then return with_db(flags, function(d) return show_run(d, id) end) end
  return with_db(flags, function(d)
    local ok, err = pipeline.cancel(d, id)
    if not ok then return fail(err) end
    print(("run %d cancelled: the same work item, run again, starts a new run"):format(id))
    return 0
  end)
end

local COMMANDS = { run = cmd_run, resume = cmd_resume, hitl = cmd_hitl, runs = cmd_runs }

function M.main(command, args, opts)
  local flags, words = parse(command, args)
  if not flags then return usage_error(words) end
  return COMMANDS[command](flags, words, opts or {})
end

return M
