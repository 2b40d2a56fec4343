-- factory.agents.orchestrator: runs objectives' agents in parallel on one repository,
-- each attempt in a fresh git worktree and branch, within a pool.
--
--   orchestrator.new{ db =, repo = PATH,
--       max_concurrent = n (default 4: attempts running at once),
--       cooldown = SECONDS between two attempt starts (default 0),
--       daily_iterations = n | nil (budget of agent iterations per UTC day, counted
--         in the store across processes and engines: every event of kind
--         "agent_iteration" since 00:00 UTC, including those pipeline runs record for
--         their CLI agents' iterations),
--       max_attempts = n (default 3), worktree_root = DIR (default
--         REPO/../.factory-worktrees; a directory for the orchestrator's worktrees only),
--       base = "main" | oid | revspec (default HEAD), prefix = worktree/branch name
--         prefix (default "agent"), timeout = SECONDS (default for agent processes),
--       lock_ttl = SECONDS (file locks, default 3600), commit = false (do not commit
--         what a successful attempt changed), author = { name =, email = },
--       on_event = fn(kind, data) | nil }
--     -> orch | nil, err, code
--   orch:start() -> report          start-up cleanup (orchestrator.cleanup) for this
--                                   repository and worktree_root
--   orch:submit{ id =, objective = TEXT, agent = fn(ctx) -> value | nil, err,
--                supervisor = NAME, owner = lock owner (default "objective:ID"),
--                run_id = n (a runs row, for events and mail) } -> job
--   orch:wait([job] [, timeout]) -> job | jobs  (all submitted jobs when job is nil)
--                                   | nil, "ETIMEDOUT: ...", "ETIMEDOUT"
--   orch:run({ objective, ... } [, timeout]) -> jobs    submit each, wait for all
--   orch:close()     cancels what runs: agent processes killed, locks released,
--                    worktrees removed
--   orchestrator.cleanup{ db =, repo = PATH, worktree_root = DIR } -> report
--   orchestrator.record_agent(db, owner, process, data) -> record name | nil
--   orchestrator.forget_agent(db, owner, name)
--   orchestrator.reap_agents(db) -> { pid killed, ... }, records forgotten | nil, err, code
--       the agent part of cleanup, for any engine that starts agent processes
--       (factory run's CLI agents record theirs too)
--   orchestrator.orphaned_agents(db) -> { { pid, run, stage }, ... } | nil, err, code
--       the agents reap_agents would kill now, left alone (what `factory status` shows)
--   orchestrator.builtin(opts) -> agent fn running factory.agents.builtin in the
--       attempt's worktree with the objective's file locks (opts: model, team, ...)
--   orchestrator.processes() -> { { pid, ppid, pgrp, sid, state, start }, ... }  (/proc)
--   orchestrator.stat(pid) -> { pid, ppid, pgrp, sid, state, start } | nil     (one of them)
--
-- A job: { id, objective, owner, supervisor, status = "pending" | "running" |
--   "succeeded" | "failed" | "not_started", attempts = n, value = what the agent
--   returned, error = "ECODE: ..." of the last failure, code, branch (of the last
--   attempt), commit = oid | nil, history = { { attempt, branch, ok, error, code,
--   started_at, finished_at }, ... } }.
--
-- The agent: agent(ctx) runs in its own fiber. ctx: { id, objective, attempt,
--   worktree = DIR, branch, repo = PATH, owner, supervisor, run_id, db,
--   lock(relpath) -> true | nil, "ECONFLICT: ...", "ECONFLICT"  (factory.agents.locks),
--   spawn(opts) -> process (factory.proc.spawn; cwd defaults to the worktree and
--     timeout to the orchestrator's; the process is recorded in the store while it
--     runs, so a later start-up can kill it if this engine dies),
--   run(opts) -> { code, signal, timed_out, stdout, stderr, pid } (spawn + wait) }.
--   Each agent process counts one iteration of the daily budget (the first of an
--   attempt was counted when the attempt started; a further spawn past the budget is
--   nil, "EBUDGET: ...").
--   The attempt failed, and the objective is retried in a fresh worktree while
--   attempts < max_attempts, when the agent raised, returned nil (, err), or an agent
--   process of ctx.spawn/ctx.run ended with a signal, a non-zero exit or a timeout
--   (give check = false to spawn/run for a process whose failure is the agent's own
--   business). Processes the agent left running are killed (their whole group).
--   After every attempt: the objective's file locks are released, its worktree is
--   removed (a successful attempt's branch stays, its changes committed on it; a failed
--   attempt's branch is deleted).
--   An attempt the daily budget cannot pay for is not started: the job ends
--   "not_started" (no attempt yet) or "failed" (a retry), error "EBUDGET: ...".
--
-- In the store (table locks, owner = this engine process "host:pid:n"):
--   "agent:HOST:PID" { host, pid, pgid, start, boot, objective, attempt, worktree }
--   "worktree:PATH"  { name, repo, objective, attempt }  (written before the worktree)
-- cleanup: for each record whose engine process is dead on this host, the agent's
-- process group is killed (when its leader is the process recorded: same start time
-- and boot, or when the leader is gone but members of its group remain) and the
-- worktree removed; then every worktree under worktree_root that no live engine
-- owns, every directory left there that holds a worktree's .git file, git's stale
-- worktree entries (prune) and the file locks of dead engine processes go.
-- report: { killed = { pid, ... }, worktrees = { path, ... }, pruned = { name, ... },
--   locks = n, records = n }.
--
-- Events (table events; also given to on_event): agent_iteration, objective_attempt_failed,
-- objective_retry, objective_finished, objective_not_started, orchestrator_cleanup.
-- Failures are values: nil, "ECODE: message", "ECODE". Misuse raises.
local ffi = require "ffi"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local git = require "factory.git"
local fs = require "factory.core.fs"
local time = require "factory.core.time"
local log = require "factory.log"
local records = require "factory.records"
local locks = require "factory.agents.locks"
local engine_id = require "factory.engine_id"
local workspace = require "factory.agents.workspace"
local pool = require "factory.agents.pool"

pcall(ffi.cdef, "int kill(int pid, int sig);")

local M = {}

local HOST = engine_id.HOST
local SIGKILL = 9
local FOREVER = 10 * 365 * 86400 -- records are removed, not expired

M.DEFAULT_AUTHOR = { name = "Factory Agent", email = "agent@factory.local" }

local BOOT = (function()
  local f = io.open("/proc/sys/kernel/random/boot_id")
  local id = f and f:read("*l")
  if f then f:close() end
  return id or ""
end)()

-- ---- processes (/proc) ---------------------------------------------------------------

local function read_stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  local rest = s and s:match("^%d+ %(.*%) (.*)$")
  if not rest then return nil end
  local v = {}
  for w in rest:gmatch("%S+") do v[#v + 1] = w end
  return { pid = tonumber(pid), state = v[1], ppid = tonumber(v[2]), pgrp = tonumber(v[3]), sid = tonumber(v[4]),
           start = tonumber(v[20]) }
end
M.stat = read_stat

function M.processes()
  local out = {}
  for _, name in ipairs(fs.list("/proc") or {}) do
    if name:match("^%d+$") then
      local st = read_stat(name)
      if st then out[#out + 1] = st end
    end
  end
  return out
end

-- Live (not zombie) members of process group pgid.
local function group_members(pgid)
  local n = 0
  for _, st in ipairs(M.processes()) do
    if st.pgrp == pgid and st.state ~= "Z" then n = n + 1 end
  end
  return n
end

-- Kills the process group of an agent record when it is still the one recorded.
-- Returns true when a signal was sent.
-- The recorded agent's process group, while it still runs (and is the one recorded):
-- its id, else nil.
local function recorded_group(d)
  local pid, pgid = tonumber(d.pid), tonumber(d.pgid or d.pid)
  if not pid or not pgid or pgid <= 1 then return nil end
  if d.boot and d.boot ~= "" and BOOT ~= "" and d.boot ~= BOOT then return nil end
  local leader = read_stat(pid)
  local ours
  if leader then
    ours = d.start ~= nil and leader.start == tonumber(d.start) and leader.pgrp == pgid
  else
    -- The leader is gone; while members of its group live, the id cannot have been reused.
    ours = group_members(pgid) > 0
  end
  return ours and pgid or nil
end

local function kill_recorded_group(d)
  local pgid = recorded_group(d)
  if not pgid then return false end
  ffi.C.kill(-pgid, SIGKILL)
  -- Bounded: SIGKILL takes effect at once; this only waits for the kernel to show it.
  for _ = 1, 40 do
    if group_members(pgid) == 0 then break end
    fiber.sleep(0.05)
  end
  return true
end

-- ---- helpers ----------------------------------------------------------------------

local function strip(p) return (p:gsub("/+$", "")) end

-- Records process p (which leads its own group) as an agent of engine process owner,
-- so that a start-up after that engine died can kill its group. Returns the record's
-- name, or nil when the store refused it (logged: the process runs all the same).
function M.record_agent(db, owner, p, data)
  local st = read_stat(p.pid)
  local name = "agent:" .. HOST .. ":" .. p.pid
  local d = { host = HOST, pid = p.pid, pgid = p.pid, start = st and st.start, boot = BOOT }
  for k, v in pairs(data or {}) do d[k] = v end
  db:exec("DELETE FROM locks WHERE name = ?", { name })
  local ok, err = db:exec("INSERT INTO locks (name, owner, expires_at, acquired_at, data) VALUES (?, ?, ?, ?, ?)",
    { name, owner, time.now() + FOREVER, time.now(), d })
  if not ok then
    log.warn("cannot record an agent process", { pid = p.pid, error = tostring(err) })
    return nil
  end
  return name
end

function M.forget_agent(db, owner, name)
  if name then db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { name, owner }) end
end

function M.orphaned_agents(db)
  local rows, err, code = db:query("SELECT name, owner, data FROM locks WHERE name LIKE 'agent:%' ORDER BY name")
  if not rows then return nil, err, code end
  local out = {}
  for _, row in ipairs(rows) do
    local d = type(row.data) == "table" and row.data or {}
    if d.host == HOST and engine_id.alive_here(row.owner) == false and recorded_group(d) then
      out[#out + 1] = { pid = tonumber(d.pid), run = d.run, stage = d.stage }
    end
  end
  return out
end

-- Kills the process groups of the agents that engine processes which died on this
-- host left running (their records say which; a group is killed only while its
-- leader is the process recorded), and forgets those records. Returns the pids
-- killed and the number of records forgotten, or nil, err, code.
function M.reap_agents(db)
  local rows, err, code = db:query("SELECT name, owner, data FROM locks WHERE name LIKE 'agent:%' ORDER BY name")
  if not rows then return nil, err, code end
  local killed, forgotten = {}, 0
  for _, row in ipairs(rows) do
    local d = type(row.data) == "table" and row.data or {}
    if d.host == HOST and engine_id.alive_here(row.owner) == false then
      if kill_recorded_group(d) then killed[#killed + 1] = tonumber(d.pid) end
      db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { row.name, row.owner })
      forgotten = forgotten + 1
    end
  end
  return killed, forgotten
end

local function dirname(p)
  p = strip(p)
  return p:match("^(.*)/[^/]*$") or "."
end

local function inside(root, p)
  p = strip(p)
  return p:sub(1, #root + 1) == root .. "/"
end

local function code_of(err)
  return tostring(err):match("^(E%u+):") or tostring(err):match("^[^:\n]*:%d+: (E%u+):")
end

local function event(db, run_id, kind, data, on_event)
  local ok, err = pcall(records.event, db, run_id, kind, data)
  if not ok then log.warn("orchestrator: cannot record an event", { kind = kind, error = tostring(err) }) end
  if on_event then
    local eok, eerr = pcall(on_event, kind, data)
    if not eok then log.warn("orchestrator: on_event failed", { error = tostring(eerr) }) end
  end
end

local function open_repo(repo)
  if type(repo) ~= "string" or repo == "" then error("orchestrator: repo must be a repository path", 3) end
  return git.open(repo)
end

-- ---- start-up cleanup ----------------------------------------------------------------

function M.cleanup(o)
  if type(o) ~= "table" or not o.db then error("orchestrator.cleanup: expected { db =, repo =, worktree_root = }", 2) end
  local db = o.db
  local report = { killed = {}, worktrees = {}, pruned = {}, locks = 0, records = 0 }
  local r, err, code = open_repo(o.repo)
  if not r then return nil, err, code end
  local root = o.worktree_root and strip(fs.realpath(o.worktree_root) or o.worktree_root)
    or dirname(r:path()) .. "/.factory-worktrees"

  local function finish(e, c)
    r:close()
    if e then return nil, e, c end
    return report
  end

  -- Agent processes of engine processes that died on this host.
  local killed, forgotten, kcode = M.reap_agents(db)
  if not killed then return finish(forgotten, kcode) end
  report.killed, report.records = killed, forgotten

  -- Worktrees: those of dead engine processes go; those of live ones are kept.
  local protected = {}
  local rows, qerr, qcode = db:query("SELECT name, owner, data FROM locks WHERE name LIKE 'worktree:%' ORDER BY name")
  if not rows then return finish(qerr, qcode) end
  local dead = {}
  for _, row in ipairs(rows) do
    local path = strip(row.name:sub(#"worktree:" + 1))
    if engine_id.alive_here(row.owner) == false then
      dead[#dead + 1] = row
    else
      protected[path] = true
    end
  end
  local removed = {}
  local function remove_wt(name, path)
    if removed[path] then return end
    local ok = r:worktree_remove(name, { force = true })
    if not ok and fs.exists(path) then fs.remove(path, { recursive = true }) end
    removed[path] = true
    report.worktrees[#report.worktrees + 1] = path
  end
  local wts = r:worktrees() or {}
  for _, row in ipairs(dead) do
    local path = strip(row.name:sub(#"worktree:" + 1))
    for _, w in ipairs(wts) do
      if strip(w.path) == path then remove_wt(w.name, path) end
    end
    db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { row.name, row.owner })
    report.records = report.records + 1
  end
  for _, w in ipairs(wts) do
    local path = strip(w.path)
    if inside(root, path) and not protected[path] and not w.prunable then remove_wt(w.name, path) end
  end
  -- Directories left under the root that still hold a worktree's .git file.
  for _, name in ipairs(fs.list(root) or {}) do
    local path = root .. "/" .. name
    local st = fs.stat(path .. "/.git")
    if not protected[path] and not removed[path] and st and st.type == "file" then
      fs.remove(path, { recursive = true })
      removed[path] = true
      report.worktrees[#report.worktrees + 1] = path
    end
  end
  report.pruned = r:prune_worktrees() or {}

  -- File locks of dead engine processes.
  rows, qerr, qcode = db:query("SELECT name, owner, data FROM locks WHERE name LIKE 'file:%'")
  if not rows then return finish(qerr, qcode) end
  for _, row in ipairs(rows) do
    local d = type(row.data) == "table" and row.data or {}
    if engine_id.alive_here(d.process) == false then
      local res = db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { row.name, row.owner })
      if res then report.locks = report.locks + res.changes end
    end
  end
  return finish()
end

-- ---- the orchestrator ----------------------------------------------------------------

local Orch = {}
Orch.__index = Orch

function M.new(o)
  if type(o) ~= "table" or not o.db then error("orchestrator.new: expected { db =, repo = }", 2) end
  -- The same limits as factory.lua's agents section, refused the same way rather
  -- than silently replaced by a default.
  local valid, why = pool.check{ max_concurrent = o.max_concurrent, cooldown = o.cooldown,
                                 daily_iterations = o.daily_iterations }
  if not valid then error("orchestrator.new: " .. why:gsub("^agents%.", ""), 2) end
  if o.max_attempts ~= nil and (type(o.max_attempts) ~= "number" or o.max_attempts < 1 or o.max_attempts % 1 ~= 0) then
    error("orchestrator.new: max_attempts: expected a whole number of at least 1, got " .. tostring(o.max_attempts), 2)
  end
  local r, err, code = open_repo(o.repo)
  if not r then return nil, err, code end
  local repo_path = strip(r:path())
  local root = o.worktree_root or (dirname(repo_path) .. "/.factory-worktrees")
  local ok
  ok, err, code = workspace.root(root)
  if not ok and not fs.exists(root) then
    r:close()
    return nil, err, code
  end
  root = strip(fs.realpath(root) or root)
  local pid = proc.getpid()
  local rand = math.random(1, 1e9)
  local self = setmetatable({
    db = o.db, repo = r, repo_path = repo_path, root = root,
    max_concurrent = o.max_concurrent or pool.DEFAULTS.max_concurrent,
    cooldown = o.cooldown or pool.DEFAULTS.cooldown,
    daily_iterations = o.daily_iterations,
    max_attempts = o.max_attempts or 3,
    base = o.base, prefix = o.prefix or "agent", timeout = o.timeout, lock_ttl = o.lock_ttl,
    commit = o.commit ~= false, author = o.author or M.DEFAULT_AUTHOR, on_event = o.on_event,
    owner = ("%s:%d:%d"):format(HOST, pid, rand),
    tag = ("%x%x"):format(pid, rand % 0x10000),
    jobs = {}, pending = {}, active = {}, running = 0, last_start = nil,
    changed = fiber.cond(), serial = 0,
  }, Orch)
  return self
end

function Orch:_event(run_id, kind, data)
  event(self.db, run_id, kind, data, self.on_event)
end

function Orch:start()
  local report, err, code = M.cleanup{ db = self.db, repo = self.repo_path, worktree_root = self.root }
  if not report then return nil, err, code end
  if #report.killed + #report.worktrees + #report.pruned + report.locks + report.records > 0 then
    self:_event(nil, "orchestrator_cleanup", report)
  end
  return report
end

function Orch:submit(j)
  if self.closed then error("orch:submit: the orchestrator is closed", 2) end
  if type(j) ~= "table" or (type(j.id) ~= "string" and type(j.id) ~= "number") then
    error("orch:submit: expected { id =, agent = fn(ctx), objective = }", 2)
  end
  if type(j.agent) ~= "function" then error("orch:submit: agent must be a function", 2) end
  local id = tostring(j.id)
  local job = { id = id, objective = j.objective, agent = j.agent, supervisor = j.supervisor, run_id = j.run_id,
                owner = j.owner or ("objective:" .. id), status = "pending", attempts = 0, history = {} }
  self.jobs[#self.jobs + 1] = job
  self.pending[#self.pending + 1] = job
  self:_dispatch()
  return job
end

-- Starts the dispatcher if it is not running; it ends when nothing is left to do.
function Orch:_dispatch()
  self.changed:broadcast()
  if self.dispatcher then return end
  self.dispatcher = fiber.spawn(function()
    local ok, err = pcall(self._dispatch_loop, self)
    self.dispatcher = nil
    if not ok then
      log.error("orchestrator: dispatcher failed", { error = tostring(err) })
      for _, job in ipairs(self.pending) do self:_finish(job, "failed", "EFAIL: dispatcher failed: " .. tostring(err)) end
      self.pending = {}
    end
  end)
end

function Orch:_dispatch_loop()
  while not self.closed and (#self.pending > 0 or self.running > 0) do
    if #self.pending > 0 and self.running < self.max_concurrent then
      local wait = self.last_start and (self.last_start + self.cooldown - time.monotonic()) or 0
      if wait > 0 then
        fiber.sleep(wait)
      else
        local job = table.remove(self.pending, 1)
        local ok, err, code = self:_charge(job, 1)
        if self.closed then return end
        if ok then
          self.running = self.running + 1
          self:_begin(job)
        else
          if code == "EBUDGET" and job.attempts == 0 then
            self:_event(job.run_id, "objective_not_started", { objective = job.id, error = err })
            self:_finish(job, "not_started", err, code)
          else
            self:_finish(job, "failed", err, code)
          end
        end
      end
    else
      self.changed:wait(1)
    end
  end
end

-- Counts one agent iteration against the daily budget (factory.agents.pool).
function Orch:_charge(job, attempt)
  local ok, err, code = pool.charge(self.db, self.daily_iterations, job.run_id,
    { objective = job.id, attempt = job.attempts + attempt, owner = job.owner })
  if not ok and code == "EBUDGET" then return nil, ("%s; objective %s not started"):format(err, job.id), code end
  return ok, err, code
end

function Orch:_finish(job, status, err, code)
  job.status, job.error, job.code = status, err, code or (err and code_of(err))
  self:_event(job.run_id, "objective_finished", { objective = job.id, status = status, attempts = job.attempts,
                                                  error = err, branch = job.branch, commit = job.commit })
  self.changed:broadcast()
end

local function safe_name(s)
  s = tostring(s):gsub("[^%w_.]", "_")
  return s:sub(1, 40)
end

function Orch:_begin(job)
  job.attempts = job.attempts + 1
  job.status = "running"
  self.serial = self.serial + 1
  local name = ("%s-%s-%d-%s%d"):format(self.prefix, safe_name(job.id), job.attempts, self.tag, self.serial)
  local att = { job = job, n = job.attempts, name = name, path = self.root .. "/" .. name, procs = {} }
  job.branch = name
  self.active[att] = true
  -- The worktree is made here, in the dispatcher (git work on the repository is
  -- serialised anyway), so the cooldown separates the agents' starts themselves.
  local ok, err, code = self:_make_worktree(att)
  if self.closed then return end
  self.last_start = time.monotonic()
  att.started_at = time.now()
  att.fiber = fiber.spawn(self._attempt, self, att, ok, err, code)
end

-- The agent process wrapper: records the exit status seen by wait.
local Agent = {}
Agent.__index = Agent

function Agent:wait(timeout)
  local st, err, code = self.p:wait(timeout)
  if st then self.status = st end
  return st, err, code
end
function Agent:read_line(stream) return self.p:read_line(stream) end
function Agent:read(stream) return self.p:read(stream) end
function Agent:write(data) return self.p:write(data) end
function Agent:close_stdin() return self.p:close_stdin() end
function Agent:kill(sig) return self.p:kill(sig) end
function Agent:close()
  if self.closed then return end
  self.closed = true
  self.p:close()
end

local function died(st)
  if st.timed_out then return "timed out" end
  if st.signal then return "killed by signal " .. st.signal end
  if st.code and st.code ~= 0 then return "exited with code " .. st.code end
end

function Orch:_ctx(att)
  local job, orch = att.job, self
  local ctx = { id = job.id, objective = job.objective, attempt = att.n, worktree = att.path, branch = att.name,
                repo = self.repo_path, owner = job.owner, supervisor = job.supervisor, run_id = job.run_id,
                db = self.db }
  local spawned = 0
  function ctx.lock(relpath)
    return locks.acquire(orch.db, { repo = orch.repo_path, path = relpath, owner = job.owner, ttl = orch.lock_ttl,
                                    supervisor = job.supervisor, run_id = job.run_id, process = orch.owner })
  end
  function ctx.spawn(opts)
    if type(opts) ~= "table" then error("ctx.spawn: expected the options of factory.proc.spawn", 2) end
    if att.closed then return nil, "ECANCELED: the attempt is over", "ECANCELED" end
    spawned = spawned + 1
    if spawned > 1 then
      local ok, err, code = orch:_charge(job, 0)
      if not ok then return nil, err, code end
    end
    local o2 = {}
    for k, v in pairs(opts) do o2[k] = v end
    o2.check = nil
    o2.cwd = o2.cwd or att.path
    if o2.timeout == nil then o2.timeout = orch.timeout end
    local p, err, code = proc.spawn(o2)
    if not p then return nil, err, code end
    local w = setmetatable({ p = p, pid = p.pid, check = opts.check ~= false }, Agent)
    att.procs[#att.procs + 1] = w
    w.record = M.record_agent(orch.db, orch.owner, p, { objective = job.id, attempt = att.n, worktree = att.path })
    return w
  end
  function ctx.run(opts)
    local w, err, code = ctx.spawn(opts)
    if not w then return nil, err, code end
    local st
    st, err, code = w:wait()
    if not st then return nil, err, code end
    local res = { code = st.code, signal = st.signal, timed_out = st.timed_out, truncated = st.truncated, pid = w.pid }
    local function collect(stream)
      local parts = {}
      for _ = 1, 1e9 do
        local chunk = w:read(stream)
        if not chunk then break end
        parts[#parts + 1] = chunk
      end
      return table.concat(parts)
    end
    if (opts.stdout or "pipe") == "pipe" then res.stdout = collect("stdout") end
    if (opts.stderr or "pipe") == "pipe" then res.stderr = collect("stderr") end
    w:close()
    orch:_forget(w)
    return res
  end
  return ctx
end

function Orch:_forget(w)
  if w.forgotten then return end
  w.forgotten = true
  M.forget_agent(self.db, self.owner, w.record)
end

-- Ends what the agent left running and notes agent processes that died.
function Orch:_reap(att)
  for _, w in ipairs(att.procs) do
    if not w.closed then
      if not w.status then
        w.p:kill(SIGKILL)
        pcall(w.p.wait, w.p)
      end
      w:close()
    end
    if w.check and w.status and not att.died then
      local why = died(w.status)
      if why then att.died = ("EAGENT: agent process %d %s"):format(w.pid, why) end
    end
    self:_forget(w)
  end
end

function Orch:_make_worktree(att)
  local job = att.job
  local rec = "worktree:" .. att.path
  local ok, err, code = self.db:exec("INSERT INTO locks (name, owner, expires_at, acquired_at, data) VALUES (?, ?, ?, ?, ?)",
    { rec, self.owner, time.now() + FOREVER, time.now(),
      { name = att.name, repo = self.repo_path, objective = job.id, attempt = att.n } })
  if not ok then return nil, err, code end
  att.record = rec
  att.made = "maybe" -- until worktree_add answers (close() may come meanwhile)
  ok, err, code = self.repo:worktree_add(att.name, att.path, { base = self.base })
  att.made = ok and true or false
  if not ok then return nil, err, code end
  return true
end

-- Commits what a successful attempt changed on its branch.
function Orch:_commit(att)
  local wt, err, code = git.open(att.path)
  if not wt then return nil, err, code end
  local function done(...) wt:close() return ... end
  local st
  st, err, code = wt:status()
  if not st then return done(nil, err, code) end
  if #st == 0 then return done(true) end
  local ok
  ok, err, code = wt:add_all()
  if not ok then return done(nil, err, code) end
  local first = tostring(att.job.objective or ("objective " .. att.job.id)):match("^[^\n]*")
  local oid
  oid, err, code = wt:commit("factory: " .. first, { author = self.author, committer = self.author })
  if not oid then return done(nil, err, code) end
  att.commit = oid
  return done(true)
end

-- Everything an attempt leaves behind goes; safe to call twice.
function Orch:_cleanup_attempt(att)
  if att.cleaned then return end
  att.closed = true
  self:_reap(att)
  local ok, err = locks.release_all(self.db, att.job.owner)
  if not ok then log.warn("orchestrator: cannot release file locks", { owner = att.job.owner, error = tostring(err) }) end
  if att.made then
    local rok, rerr = self.repo:worktree_remove(att.name, { force = true })
    if not rok then
      log.warn("orchestrator: cannot remove a worktree", { path = att.path, error = tostring(rerr) })
      if fs.exists(att.path) then fs.remove(att.path, { recursive = true }) end
      self.repo:prune_worktrees()
    end
  end
  if att.record then self.db:exec("DELETE FROM locks WHERE name = ? AND owner = ?", { att.record, self.owner }) end
  att.cleaned = true
end

local function traceback(e)
  if type(e) == "table" then return e end
  return debug.traceback(tostring(e), 2)
end

function Orch:_attempt(att, ok, err, code)
  local job = att.job
  if ok then
    local ctx = self:_ctx(att)
    local fine, v, verr, vcode = xpcall(job.agent, traceback, ctx)
    if not fine then
      local text = type(v) == "table" and tostring(v.message or v.code) or tostring(v)
      log.warn("orchestrator: the agent raised", { objective = job.id, attempt = att.n, error = text })
      err, code = "EAGENT: the agent raised: " .. text:match("^[^\n]*"), "EAGENT"
    elseif v == nil then
      err = verr and tostring(verr) or "EAGENT: the agent returned no result"
      code = vcode or code_of(err) or "EAGENT"
    else
      att.value = v
    end
    att.closed = true
    self:_reap(att)
    if not err and att.died then err, code = att.died, "EAGENT" end
    if not err and self.commit then
      local cok, cerr, ccode = self:_commit(att)
      if not cok then err, code = cerr, ccode end
    end
  end
  self:_cleanup_attempt(att)
  -- A failed attempt's branch holds no commit of its own: it goes with its worktree.
  if err and att.made then
    local dok, derr = self.repo:branch_delete(att.name)
    if not dok then log.warn("orchestrator: cannot delete a failed attempt's branch", { branch = att.name,
                                                                                        error = tostring(derr) }) end
  end
  self:_attempt_done(att, err, code)
end

function Orch:_attempt_done(att, err, code)
  local job = att.job
  self.active[att] = nil
  local h = { attempt = att.n, branch = att.name, ok = err == nil, error = err, code = code,
              started_at = att.started_at, finished_at = time.now(), commit = att.commit }
  job.history[#job.history + 1] = h
  -- The slot is given back only once the job is queued again or finished, with no
  -- yield in between: a dispatcher seeing nothing pending and nothing running ends.
  if err then
    self:_event(job.run_id, "objective_attempt_failed", { objective = job.id, attempt = att.n, error = err,
                                                          code = code, branch = att.name })
    if job.attempts < self.max_attempts and not self.closed then
      self:_event(job.run_id, "objective_retry", { objective = job.id, attempt = att.n + 1 })
      if self.closed then return end
      job.status = "pending"
      self.pending[#self.pending + 1] = job
      self.running = self.running - 1
      self:_dispatch()
    else
      self:_finish(job, "failed", err, code)
      self.running = self.running - 1
    end
  else
    job.value, job.commit = att.value, att.commit
    self:_finish(job, "succeeded")
    self.running = self.running - 1
  end
  self.changed:broadcast()
end

local DONE = { succeeded = true, failed = true, not_started = true }

function Orch:wait(job, timeout)
  if type(job) == "number" and timeout == nil then job, timeout = nil, job end
  local deadline = timeout and time.monotonic() + timeout
  local function done()
    if job then return DONE[job.status] end
    for _, j in ipairs(self.jobs) do
      if not DONE[j.status] then return false end
    end
    return true
  end
  while not done() do
    local remaining = deadline and deadline - time.monotonic()
    if remaining and remaining <= 0 then
      return nil, ("ETIMEDOUT: objectives still running after %g s"):format(timeout), "ETIMEDOUT"
    end
    self.changed:wait(math.min(remaining or 1, 1))
  end
  self:_settle()
  return job or self.jobs
end

-- With nothing left to do, lets the dispatcher see it and end, so no fiber outlives
-- the wait that saw the last objective finish.
function Orch:_settle()
  local d = self.dispatcher
  if d and #self.pending == 0 and self.running == 0 then
    self.changed:broadcast()
    fiber.join(d, 2)
  end
end

function Orch:run(list, timeout)
  local jobs = {}
  for i, j in ipairs(list) do jobs[i] = self:submit(j) end
  local deadline = timeout and time.monotonic() + timeout
  for _, job in ipairs(jobs) do
    local ok, err, code = self:wait(job, deadline and math.max(0, deadline - time.monotonic()))
    if not ok then return nil, err, code end
  end
  return jobs
end

function Orch:close()
  if self.closed then return true end
  self.closed = true
  if self.dispatcher then
    self.dispatcher:cancel("orchestrator closed")
    self.dispatcher = nil
  end
  local list = {}
  for att in pairs(self.active) do
    list[#list + 1] = att
    if att.fiber and att.fiber ~= fiber.current() then att.fiber:cancel("orchestrator closed") end
  end
  self.active = {}
  for _, att in ipairs(list) do
    self:_cleanup_attempt(att)
    self.running = self.running - 1
    att.job.history[#att.job.history + 1] = { attempt = att.n, branch = att.name, ok = false,
      error = "ECANCELED: the orchestrator was closed", code = "ECANCELED", started_at = att.started_at,
      finished_at = time.now() }
  end
  for _, job in ipairs(self.jobs) do
    if not DONE[job.status] then
      job.status, job.error, job.code = "failed", "ECANCELED: the orchestrator was closed", "ECANCELED"
    end
  end
  self.pending = {}
  self.changed:broadcast()
  self.repo:close()
  return true
end

function M.builtin(opts)
  local builtin = require "factory.agents.builtin"
  opts = opts or {}
  return function(ctx)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.root, o.box = ctx.worktree, nil
    o.objective = o.objective or ctx.objective
    o.lock = ctx.lock
    o.run = o.run or ctx.run_id
    return builtin.run(o)
  end
end

return M
