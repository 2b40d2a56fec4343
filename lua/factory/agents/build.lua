-- factory.agents.build: a pipeline stage that works on the code. The stage's
-- objective is given to an agent in its own git worktree and branch of the run's
-- repository (factory.agents.workspace). For workspace = "worktree" the branch keeps
-- the agent's commit and the stage's TaskResult records where it is; for
-- workspace = "read" (a review, a test run, an analysis of the code) the worktree is
-- a checkout of the run's latest change, the agent has its operative's tools there
-- but no file locks, and nothing it changes is kept: worktree and branch are removed,
-- and result.workspace = { base = the commit it read, read = true, discarded = the
-- number of paths it changed }.
--
--   build.run(o) -> result
--   o: the objective of factory.objective.run (run_id, team, operative, anchor, stage,
--      inputs, memory, learnings, answers, emit) plus
--      notify = fn(kind, data): for the agent's frequent events (a CLI agent's
--        agent_progress and agent_heartbeat), shown live but not stored,
--      repo = DIR (the run's repository), attempt = n (the stage's attempt number),
--      db = the store: the built-in agent takes a file lock (factory.agents.locks,
--        owner "run:RUN/stage", supervisor the team) before it changes a file, kept
--        from expiring while the agent works and all released at the end; a CLI agent stores the learnings it leaves there,
--      process = the engine process's "host:pid:n" (a lock of a dead one is taken over),
--      pool = a factory.agents.pool | nil: the stage waits for a place in it before its
--        worktree is made, and pays its agent iterations from the pool's daily budget
--        (the built-in agent one per stage attempt, a CLI agent one per process); a
--        spent budget gives BLOCKED with the reason,
--      agent = fn(args) -> result, stats   (default: by the operative's `agent`:
--        "builtin" -> factory.agents.builtin.run; { cli = "claude"|"codex"|"aider"|NAME,
--        command = argv, format =, heartbeat_timeout =, max_iterations = ... } ->
--        factory.agents.cli.run with those options (cli names a preset, or command is
--        given), SPEC.md listing the team's learnings, and a model proxy of this
--        process (factory.serve.local_proxy) with a key of its own for the team and
--        run in the agent's environment)
--   result: the agent's TaskResult with result.workspace = { branch, base, commit,
--   diff_stats = { files, insertions, deletions, per_file }, diff = the patch (its first
--   32 KiB) }; the later stages of the run read the patch with the artifact; when the
--   agent changed nothing there is no commit, and no branch either (it is deleted); a git failure gives a
--   BLOCKED result that names it. Never raises for the repository's or the agent's
--   trouble.
--
--   build.applies(o) -> true | false, why [, top]
--       whether a worktree can be made: the run names a repository that is a git
--       repository (opened as given: never a repository found further up; top is
--       that repository when o.repo is a directory inside one).
--
-- The branch starts from the commit of the run's latest earlier build stage (so a
-- run's build stages build on one another), else from the repository's HEAD (an
-- attempt killed while its agent worked leaves a worktree, whose changes are then
-- committed on its branch: the same attempt, run again, goes on from that branch's
-- commit, told so, and its change is still counted from the stage's start: from =
-- { stage, branch, commit, continued = true }; the same for the attempt after one that
-- changed files and then asked a question or ended BLOCKED, with after = its status;
-- the agent is told the stage's own start too, to start over from); when
-- that stage's branch no longer holds its commit (deleted, moved), from HEAD, and the
-- workspace_started event says so (from = { stage, branch, commit } | { stage, branch,
-- gone = true }).
-- The branch (and worktree) is named factory-run<RUN>-<stage>-<attempt>. A run killed
-- during the stage leaves that worktree behind: the next attempt removes it, and its
-- branch too when that holds no commit of its own (it is where the new one would
-- start); a branch with a commit is kept, and the next free name (-2, -3, ...) taken.
local git = require "factory.git"
local fs = require "factory.core.fs"
local workspace = require "factory.agents.workspace"
local builtin = require "factory.agents.builtin"
local cli = require "factory.agents.cli"
local serve = require "factory.serve"
local locks = require "factory.agents.locks"
local orchestrator = require "factory.agents.orchestrator"
local proc = require "factory.proc"
local objective = require "factory.objective"
local confidence = require "factory.confidence"

local M = {}

local MAX_NAMES = 9

-- What an agent of a workspace = "read" stage is told beside its objective (a CLI
-- agent has no other way to learn it).
local READ_NOTE = "\n\nYou work in a checkout of the run's latest change. Read, search and run what you need;"
  .. " nothing you change in it is kept."

-- What the agent of an attempt that goes on from a killed one's commit is told.
local CONTINUED_NOTE = "This stage was stopped before it finished, after its agent had changed files: this"
  .. " worktree starts from the commit that holds that work (%s). Check what is there, complete the objective,"
  .. " and finish."

-- ... and, by the status the previous attempt ended with, when it goes on from that one.
local AFTER_NOTE = {}
AFTER_NOTE.NEEDS_CLARIFICATION = "The previous attempt of this stage changed files, then asked a question: this"
  .. " worktree starts from the commit that holds its work (%s). With the answer, check what is there, complete the"
  .. " objective, and finish."
AFTER_NOTE.BLOCKED = "The previous attempt of this stage changed files, then ended BLOCKED: this worktree starts from"
  .. " the commit that holds its work (%s). With the human's answer, check what is there, complete the objective,"
  .. " and finish."
local START_NOTE = " The stage itself started from commit %s: to start over, restore the files from it"
  .. " (git checkout <that commit> -- .)."

-- The operative's tools as the built-in agent names them; `finish` always.
local TOOL_NAMES = { read = "read_file", write = "write_file", edit = "edit_file", grep = "grep",
                     list = "list_dir", run = "run_command" }

-- The top of the git repository dir is inside, if it is inside one.
local function enclosing_repo(dir)
  local d = dir:gsub("/+$", "")
  while true do
    d = d:match("^(.*)/[^/]*$")
    if not d or d == "" then return nil end
    if fs.stat(d .. "/.git") then return d end
  end
end

function M.applies(o)
  if not o.repo then return false, "the run names no repository (--repo)" end
  local r, err, code = git.open(o.repo)
  if not r then
    if code == "ENOTFOUND" then
      local top = enclosing_repo(o.repo)
      if top then
        return false, ("%s is not a git repository but a directory inside %s (give --repo %s for a worktree)")
          :format(o.repo, top, top), top
      end
      return false, ("%s is not a git repository"):format(o.repo)
    end
    return false, ("cannot open the repository %s: %s"):format(o.repo, err)
  end
  r:close()
  return true
end

local function tool_list(op)
  if not op.tools then return nil end
  local out = { "finish" }
  for _, t in ipairs(op.tools) do out[#out + 1] = TOOL_NAMES[t] end
  return out
end

local function of_family(name, base_name)
  return name == base_name or name:sub(1, #base_name + 1) == base_name .. "-"
end

-- What a killed attempt's agent left in its worktree, committed on its branch before
-- the worktree goes: the work of hours of an agent is not thrown away with it. The
-- CLI loop's own files (SPEC.md, .ai/) are left out.
local function salvage(w, stage)
  local wt = git.open(w.path)
  if not wt then return end
  local head = wt:head() or {}
  local paths = {}
  for _, change in ipairs(head.branch == w.name and wt:status() or {}) do
    if change.path ~= "SPEC.md" and not change.path:find("^%.ai/") then paths[#paths + 1] = change.path end
  end
  if #paths > 0 and wt:add(paths) then
    wt:commit(("factory: the work a stopped attempt of stage %s left uncommitted"):format(stage),
              { author = workspace.DEFAULT_AUTHOR })
  end
  wt:close()
end

-- The branches this run's workspaces were given, as its workspace_started events
-- say (nil without a store: all of a name's family count). Only those are its own: a
-- branch of the same name made by another store's run of the same number (an earlier
-- .factory, or a `factory run` from another directory, maybe working there now) is
-- neither gone on from, nor salvaged, nor removed.
local function own_branches(o)
  if not o.db then return nil end
  local own = {}
  local rows = o.db:query("SELECT data FROM events WHERE run_id = ? AND kind = 'workspace_started'", { o.run_id })
  for _, row in ipairs(rows or {}) do
    if type(row.data) == "table" and type(row.data.branch) == "string" then own[row.data.branch] = true end
  end
  return own
end

-- A free branch name: a leftover worktree of a killed attempt is removed first (what
-- its agent changed committed on its branch, unless the stage only reads), and a
-- leftover branch with nothing on it beyond the commit the new one starts from is
-- deleted (else every resumed run would leave an empty branch beside its real one).
-- Returns the name and, when the same attempt was killed after its agent changed
-- something, the last branch it left ({ branch =, commit = }): its work, to go on from.
-- own: the run's own branches (own_branches); names that are not are only skipped.
local function free_name(r, base_name, start, stage, reading, own)
  local function mine(name) return own == nil or own[name] == true end
  for _, w in ipairs(r:worktrees()) do
    if of_family(w.name, base_name) and mine(w.name) then
      if not reading then salvage(w, stage) end
      r:worktree_remove(w.name, { force = true })
    end
  end
  local taken = {}
  for _, b in ipairs(r:branches()) do
    if not (of_family(b.name, base_name) and mine(b.name) and b.oid == start and not b.head
            and r:branch_delete(b.name)) then
      taken[b.name] = b.oid
    end
  end
  local left
  for i = 1, MAX_NAMES do
    local name = i == 1 and base_name or (base_name .. "-" .. i)
    if not taken[name] then return name, nil, left end
    if mine(name) then left = { branch = name, commit = taken[name] } end
  end
  return nil, ("EEXISTS: branches %s to %s-%d exist already"):format(base_name, base_name, MAX_NAMES)
end

-- A run's build stages follow one another: each starts from the commit the latest
-- build stage before it left (integration sees what backend and frontend wrote), the
-- first from the repository's latest commit. Returns that stage's { stage, branch,
-- commit } while its branch still holds the commit, or the stage and why not.
local function earlier_change(o, r)
  if not o.db then return nil end
  local rows = o.db:query("SELECT stage, result FROM stage_results WHERE run_id = ? AND stage <> ?"
    .. " AND status = 'COMPLETE' ORDER BY id DESC", { o.run_id, o.stage.name }) or {}
  for _, row in ipairs(rows) do
    local ws = type(row.result) == "table" and row.result.workspace
    if type(ws) == "table" and type(ws.commit) == "string" then
      for _, b in ipairs(r:branches()) do
        if b.name == ws.branch and b.oid == ws.commit then
          return { stage = row.stage, branch = ws.branch, commit = ws.commit }
        end
      end
      return nil, { stage = row.stage, branch = ws.branch, gone = true }
    end
  end
end

-- The work this stage's previous attempt left when it changed files and then asked
-- a question (NEEDS_CLARIFICATION) or ended BLOCKED (a human has answered since):
-- the next attempt goes on from it rather than doing it again.
-- { stage, branch, commit, continued = true, after = "NEEDS_CLARIFICATION"|"BLOCKED" } | nil.
local function earlier_work(o, r)
  if not o.db then return nil end
  local last = (o.db:query("SELECT status, result FROM stage_results WHERE run_id = ? AND stage = ? ORDER BY id DESC"
    .. " LIMIT 1", { o.run_id, o.stage.name }) or {})[1]
  if not last or (last.status ~= "NEEDS_CLARIFICATION" and last.status ~= "BLOCKED") then return nil end
  local ws = type(last.result) == "table" and last.result.workspace
  if type(ws) ~= "table" or type(ws.commit) ~= "string" then return nil end
  for _, b in ipairs(r:branches()) do
    if b.name == ws.branch and b.oid == ws.commit then
      return { stage = o.stage.name, branch = ws.branch, commit = ws.commit, continued = true, after = last.status }
    end
  end
end

-- The agent function and the options it takes beyond workspace.run's own.
local function agent_of(o)
  local spec = o.operative.agent
  if o.agent or type(spec) ~= "table" then
    return o.agent or builtin.run, { tools = tool_list(o.operative), max_iterations = o.operative.max_iterations,
                                     timeout = o.operative.command_timeout, retries = o.retries,
                                     instructions = o.stage.workspace == "read" and builtin.READ_SYSTEM or nil,
                                     messages = objective.pack(o) }
  end
  local acceptance = o.stage.acceptance
  local extra = { learnings = o.learnings, db = o.db, checklist = #acceptance > 0 and acceptance or nil }
  for k, v in pairs(spec) do
    if k ~= "cli" then extra[k] = v end
  end
  if cli.PRESETS[spec.cli] and not spec.command then extra.preset = spec.cli end
  return cli.run, extra
end

local function random_key()
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(16)
  f:close()
  return "sk-factory-" .. bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
end

function M.run(o)
  local st, op, team = o.stage, o.operative, o.team
  local r, err = git.open(o.repo)
  if not r then return confidence.blocked(("cannot open the repository %s: %s"):format(o.repo, err)) end
  local from, missing = earlier_change(o, r)
  local start = from and from.commit or (r:head() or {}).oid
  local reading = st.workspace == "read"
  local name, nerr, left = free_name(r, ("factory-run%d-%s-%d"):format(o.run_id, st.name, o.attempt or 1), start,
                                     st.name, reading, own_branches(o))
  -- A killed attempt's work (committed, or saved by free_name) is gone on from, not
  -- done and paid for again; so is the work of an attempt that stopped to ask or was BLOCKED.
  local continued = not reading and (left and { stage = st.name, branch = left.branch, commit = left.commit,
                                                continued = true } or earlier_work(o, r)) or nil
  if not name then
    r:close()
    return confidence.blocked(nerr)
  end
  local emit = o.emit or function() end
  local notify = o.notify or function() end
  local agent, args = agent_of(o)
  local leave = o.pool and o.pool:enter()
  local function blocked(why)
    if leave then leave() end
    r:close()
    return confidence.blocked(why)
  end
  if o.pool then
    -- A CLI agent pays per process, from inside its loop; the pool records each
    -- iteration, so the loop's own agent_iteration events are only shown.
    if agent == cli.run then
      args.charge = function(iteration, attempt)
        return o.pool:charge(o.run_id, { stage = st.name, iteration = iteration, attempt = attempt })
      end
    else
      local paid, why = o.pool:charge(o.run_id, { stage = st.name, attempt = o.attempt or 1 })
      if not paid then return blocked((tostring(why):gsub("^E%u+: ", ""))) end
    end
  end
  args.repo, args.branch, args.agent, args.base = r, name, agent, from and from.commit
  args.commit = not reading
  args.objective = o.anchor .. "\n\n# Your stage: " .. st.name .. "\n" .. (st.objective or "")
    .. (reading and READ_NOTE or "")
  if continued then
    local note = (AFTER_NOTE[continued.after] or CONTINUED_NOTE):format(continued.commit:sub(1, 10))
      .. START_NOTE:format(start or "HEAD")
    args.base, args.diff_base = continued.commit, start
    args.objective = args.objective .. "\n\n" .. note
    args.system = args.system and (args.system .. "\n\n" .. note) or note
  end
  args.message = ("factory: %s (run %d, stage %s)"):format(o.anchor:match("^[^\n]*"), o.run_id, st.name)
  args.model, args.team, args.run, args.pipeline = op.model or team.model, team.name, o.run_id, o.pipeline
  args.max_tokens, args.temperature, args.context_window = op.max_tokens, op.temperature, objective.window(team, op)
  args.outage_retries, args.outage_wait_s = o.outage_retries, o.outage_wait_s
  args.emit = function(kind, data)
    if kind == "agent_progress" or kind == "agent_heartbeat" or (kind == "agent_iteration" and args.charge) then
      return notify(kind, data)
    end
    if kind == "tool_call" then data.stage = st.name end
    emit(kind, data)
  end
  -- A CLI agent's model calls go through a proxy of this process with a key of its
  -- own: held to, and counted against, its team and run like the built-in agent's.
  local proxy, recorded = nil, {}
  if agent == cli.run then
    local key = random_key()
    local perr
    proxy, perr = serve.local_proxy{ [key] = { team = team.name, run = o.run_id } }
    if not proxy then return blocked("cannot start the model proxy for the CLI agent: " .. tostring(perr)) end
    args.proxy_url, args.virtual_key = proxy:url(), key
    -- Each agent process is recorded while the stage runs: if this process is killed
    -- (kill -9, the OOM killer), the next `factory run` or `resume` kills what it left
    -- running, which would otherwise go on with its commands in a removed worktree.
    if o.db and o.process then
      args.spawn = function(opts)
        local p, serr, scode = proc.spawn(opts)
        if p then
          recorded[#recorded + 1] = orchestrator.record_agent(o.db, o.process, p, { run = o.run_id, stage = st.name })
        end
        return p, serr, scode
      end
    end
  elseif o.db and o.process then
    -- The same for each command the built-in agent runs (a dev server it started would
    -- otherwise outlive its timeout, which this process enforces), for as long as it runs.
    args.on_command = function(p)
      local rec = orchestrator.record_agent(o.db, o.process, p, { run = o.run_id, stage = st.name })
      return function() orchestrator.forget_agent(o.db, o.process, rec) end
    end
  end
  -- The built-in agent locks each file before it changes it; a file another
  -- objective holds is a conflict its team is told of, never an overwrite.
  local owner = ("run:%d/%s"):format(o.run_id, st.name)
  if o.db and agent ~= cli.run and not reading then
    args.lock = function(rel)
      return locks.acquire(o.db, { repo = o.repo, path = rel, owner = owner, supervisor = team.name, run_id = o.run_id,
                                   process = o.process })
    end
  end
  local stop_keeping = args.lock and locks.keep(o.db, owner)
  -- The worktree starts from the last commit: what is changed and not committed in
  -- the repository is not in it, and whoever runs this should know.
  local uncommitted = 0
  for _, change in ipairs(r:status() or {}) do
    if change.status ~= "??" then uncommitted = uncommitted + 1 end
  end
  emit("workspace_started", { stage = st.name, branch = name, uncommitted = uncommitted > 0 and uncommitted or nil,
                               from = continued or from or missing, read = reading or nil })
  -- Whatever happens in there (a cancelled fiber raises), the place, the proxy, the
  -- locks and the repository are given back.
  local ran, ws, werr = pcall(workspace.run, args)
  if leave then leave() end
  if proxy then proxy:close() end
  for _, rec in ipairs(recorded) do orchestrator.forget_agent(o.db, o.process, rec) end
  if stop_keeping then
    stop_keeping()
    locks.release_all(o.db, owner)
  end
  -- A branch without a commit is the base under another name: kept, every attempt
  -- that changed nothing would leave one more in the repository.
  local kept = ran and ws and (ws.commit ~= nil or not ws.removed or not r:branch_delete(ws.branch))
  r:close()
  if not ran then error(ws, 0) end
  if not ws then return confidence.blocked(("the worktree for stage %s failed: %s"):format(st.name, werr)) end
  local result = ws.result
  if reading then
    result.workspace = { base = ws.base, read = true, discarded = ws.discarded }
    emit("workspace_done", { stage = st.name, branch = ws.branch, kept = false, read = true, base = ws.base,
                             discarded = ws.discarded })
    return result
  end
  result.workspace = { branch = kept and ws.branch or nil, base = ws.base, commit = ws.commit,
                       diff_stats = ws.diff_stats, diff = ws.diff }
  local ds = ws.diff_stats or {}
  emit("workspace_done", { stage = st.name, branch = ws.branch, kept = kept, commit = ws.commit,
                           files = ds.files or 0, insertions = ds.insertions or 0, deletions = ds.deletions or 0 })
  return result
end

return M
