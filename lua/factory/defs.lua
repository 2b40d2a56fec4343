-- factory.defs: definition files (teams/*.lua, pipelines/*.lua, factory.lua) are
-- loaded, validated and swapped in one step, and reloaded when they change.
--
--   defs.registry{ kind =, dir =, pattern = "%.lua$", dsl = fn(collect, line) -> env,
--                  validate = fn(def, name) -> true | nil, message [, where],
--                  optional = false }   optional: a file may return nothing (its
--                                       definition is then true; the DSL collects it)
--     reg:load_all() -> problems      reg:get(name)      reg:names()
--     reg:version(name) -> swaps so far (0: never)      reg:problems()
--     reg:on_change(fn) -> unsubscribe; fn{ action = "swapped"|"rejected"|"removed",
--                          name =, file =, version =, problem = }
--     reg:watch([opts]) -> handle with :stop()  (opts go to fs.watch: debounce);
--                          changes are logged: "reloaded" (info), rejections (warn)
--   defs.check(dir) -> problems of a project directory (teams, pipelines, factory.lua),
--       warnings (valid, but failing on this machine: a CLI agent not installed; or
--       not doing what it seems to: factory.lua's warnings, a USD budget its teams'
--       unpriced models would spend nothing of (dsl.unpriced_budgets)),
--       checked = { config = whether there is a factory.lua, teams =, pipelines = (how
--       many loaded) }
-- A problem is "file:line: message". The name of a definition is its file name
-- without the extension (pipelines/feature.lua defines "feature").
--
-- Each file runs in a fresh environment holding only the DSL's functions and safe
-- standard functions; reading an undefined global or setting one is an error, so no
-- state leaks between loads. The new definition replaces the old one only when it
-- loaded and validated; the swap replaces the reference, never the table, so whoever
-- holds the old definition (a running objective) keeps it unchanged.
--
-- dsl(collect, line) returns the DSL's functions for one load. line() is the line the
-- file is executing; collect(t [, line]) records where t was defined (by default that
-- line) and returns t. A DSL of the form `kind "name" { body }` should take line() in
-- the outer call: `return kind "x" {...}` is a tail call, which erases the file's
-- frame before the body reaches the DSL. A validation failure points at `where` (a
-- line, or a collected table), else at the definition's line, else line 1.
local fs = require "factory.core.fs"
local time = require "factory.core.time"
local fiber = require "factory.fiber"
local log = require "factory.log"

local M = {}

-- Running a definition file is expected to take milliseconds; an endless loop in one
-- must not freeze the engine.
local RUN_BUDGET = 2

local SAFE = { "assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget",
  "select", "setmetatable", "tonumber", "tostring", "type", "unpack", "xpcall" }
local SAFE_LIBS = {
  string = string, table = table, math = math,
  os = { clock = os.clock, date = os.date, difftime = os.difftime, time = os.time },
}

local function join(dir, name)
  if dir == "." then return name end
  return dir .. "/" .. name
end

local function sandbox(dsl_env)
  local env = {}
  for _, k in ipairs(SAFE) do env[k] = _G[k] end
  -- Copies, so that a file cannot change the engine's libraries.
  for lib, fns in pairs(SAFE_LIBS) do
    local copy = {}
    for k, v in pairs(fns) do copy[k] = v end
    env[lib] = copy
  end
  env.string.dump = nil
  for k, v in pairs(dsl_env or {}) do env[k] = v end
  return setmetatable(env, {
    __index = function(_, k) error(("undefined global '%s'"):format(tostring(k)), 2) end,
    __newindex = function(_, k)
      error(("assignment to global '%s' (definition files may only use locals)"):format(tostring(k)), 2)
    end,
  })
end

-- The text of an error value, without the position Lua prefixed it with (the
-- caller reports the line in the definition file instead), and a line it names.
local function error_message(err)
  if type(err) == "table" and err.message ~= nil then return tostring(err.message), tonumber(err.line) end
  return (tostring(err):gsub("^[^\n]-:%d+: ", "", 1))
end

local function at(path, line, msg)
  return ("%s:%d: %s"):format(path, line or 1, msg)
end

-- One run of a definition file, in a coroutine of its own.
local function new_run(chunk, source)
  local run = { co = coroutine.create(chunk), source = source }
  -- The line the file is executing: its innermost frame on the stack or, when a tail
  -- call erased that frame, the last line the hook saw it execute.
  function run.line()
    for level = 0, 200 do
      local info = debug.getinfo(run.co, level, "Sl")
      if not info then break end
      if info.source == source and info.currentline > 0 then return info.currentline end
    end
    return run.last
  end
  return run
end

-- Resumes the run under a hook that tracks run.last and stops the file once its
-- time budget is spent; from then on it fires on every instruction, so a pcall in
-- the file cannot swallow the stop. LuaJIT has one hook for all coroutines: it is
-- installed only while the file runs. Returns ok, value.
local function run_limited(run)
  local co, source = run.co, run.source
  local deadline = time.monotonic() + RUN_BUDGET
  local function hook(event, line)
    if coroutine.running() ~= co then return end
    if event == "line" then
      if debug.getinfo(2, "S").source == source then run.last = line end
    elseif time.monotonic() > deadline then
      debug.sethook(hook, "l", 1)
      error(("still running after %g s (endless loop?)"):format(RUN_BUDGET))
    end
  end
  local saved = { debug.gethook() }
  debug.sethook(hook, "l", 1000)
  local ok, res = coroutine.resume(co)
  debug.sethook(unpack(saved, 1, 3))
  if ok and coroutine.status(co) ~= "dead" then return false, "a definition file must not yield" end
  return ok, res
end

-- Loads the source of one definition file in a fresh sandbox and validates what it
-- returns. spec: kind, dsl, validate; optional: whether returning nothing is fine.
-- Returns the definition, or nil and a problem.
local function load_definition(spec, path, src, name)
  local source = "@" .. path
  local chunk, serr = loadstring(src, source)
  if not chunk then
    -- The chunk name in the message may be shortened ("...tail"); rebuild it.
    local line, msg = serr:match("^[^\n]-:(%d+): (.*)$")
    return nil, at(path, tonumber(line), msg or serr)
  end
  jit.off(chunk, true)    -- compiled code does not call hooks
  local run = new_run(chunk, source)
  local lines = setmetatable({}, { __mode = "k" })
  local function collect(t, line)
    lines[t] = line or run.line()
    return t
  end
  setfenv(chunk, sandbox(spec.dsl and spec.dsl(collect, run.line)))
  local ok, def = run_limited(run)
  if not ok then
    local msg, line = error_message(def)
    return nil, at(path, line or run.line(), msg)
  end
  if def == nil then
    if spec.optional then return true end
    return nil, at(path, 1, ("must return a %s definition (it returned nothing)"):format(spec.kind))
  end
  if spec.validate then
    local vok, valid, msg, where = pcall(spec.validate, def, name)
    if not vok then valid, msg, where = nil, error_message(valid) end
    if not valid then
      local line = type(where) == "number" and where or lines[where] or lines[def]
      return nil, at(path, line, tostring(msg or "invalid " .. spec.kind .. " definition"))
    end
  end
  return def
end

local Registry = {}
Registry.__index = Registry

function M.registry(spec)
  assert(type(spec) == "table", "defs.registry: expects a table")
  assert(type(spec.kind) == "string", "defs.registry: kind must be a string")
  assert(type(spec.dir) == "string", "defs.registry: dir must be a string")
  return setmetatable({
    spec = { kind = spec.kind, dsl = spec.dsl, validate = spec.validate, optional = spec.optional },
    dir = spec.dir:gsub("(.)/+$", "%1"),
    pattern = spec.pattern or "%.lua$",
    defs = {},          -- name -> the current definition
    versions = {},      -- name -> swaps so far; survives removal so it only grows
    files = {},         -- file name -> { src =, problem = } of its last load
    listeners = {},
  }, Registry)
end

function Registry:get(name) return self.defs[name] end
function Registry:version(name) return self.versions[name] or 0 end

function Registry:names()
  local out = {}
  for name in pairs(self.defs) do out[#out + 1] = name end
  table.sort(out)
  return out
end

function Registry:problems()
  local files = {}
  for file, st in pairs(self.files) do
    if st.problem then files[#files + 1] = file end
  end
  table.sort(files)
  for i, file in ipairs(files) do files[i] = self.files[file].problem end
  return files
end

function Registry:on_change(fn)
  self.listeners[#self.listeners + 1] = fn
  return function()
    for i, g in ipairs(self.listeners) do
      if g == fn then return table.remove(self.listeners, i) end
    end
  end
end

function Registry:_matches(file)
  return file:sub(1, 1) ~= "." and file:find(self.pattern) ~= nil
end

function Registry:_emit(ev)
  if self.watching then
    if ev.action == "swapped" then
      log.info("reloaded", { file = ev.file, version = ev.version })
    elseif ev.action == "removed" then
      log.info("definition removed", { file = ev.file })
    else
      log.warn("reload rejected, keeping the previous definition: " .. ev.problem)
    end
  end
  for _, fn in ipairs({ unpack(self.listeners) }) do
    local ok, err = pcall(fn, ev)
    if not ok then log.error("defs: on_change listener failed", { error = tostring(err) }) end
  end
end

-- Brings one file's definition up to date with the disk.
function Registry:_sync(file)
  local path = join(self.dir, file)
  local name = file:gsub("%.[^.]*$", "")
  local last = self.files[file]
  local src, err, code = fs.read(path)
  if not src and (code == "ENOENT" or code == "ENOTDIR") then
    if not last then return end
    self.files[file] = nil
    if self.defs[name] == nil then return end
    self.defs[name] = nil
    return self:_emit{ action = "removed", name = name, file = path }
  end
  -- Editors touch files and write them in several steps: unchanged text is no change.
  if src and last and src == last.src then return end
  local def, problem
  if src then
    def, problem = load_definition(self.spec, path, src, name)
  else
    problem = at(path, 1, "cannot read: " .. err)
  end
  self.files[file] = { src = src, problem = problem }
  if not def then
    return self:_emit{ action = "rejected", name = name, file = path, problem = problem }
  end
  self.defs[name] = def
  self.versions[name] = self:version(name) + 1
  self:_emit{ action = "swapped", name = name, file = path, version = self.versions[name] }
end

-- Loads every matching file and forgets the ones that are gone. A missing directory
-- holds no definitions. Returns the problems.
function Registry:load_all()
  local list, err, code = fs.list(self.dir)
  if not list then
    if code ~= "ENOENT" then return { self.dir .. ": " .. err } end
    list = {}
  end
  local present = {}
  for _, file in ipairs(list) do
    if self:_matches(file) then
      present[file] = true
      self:_sync(file)
    end
  end
  for file in pairs(self.files) do
    if not present[file] then self:_sync(file) end
  end
  return self:problems()
end

-- Watches the directory and reloads what changes, from a fiber of its own. The watch
-- starts before this returns; the fiber first catches up with changes made since the
-- last load_all. Returns a handle with :stop(), or nil, err, code.
function Registry:watch(opts)
  if self.watching then error("defs: this registry is already being watched", 2) end
  local w, err, code = fs.watch(self.dir, opts)
  if not w then return nil, err, code end
  local stopped = false
  self.watching = true
  local f = fiber.spawn(function()
    self:load_all()
    while not stopped do
      local changed, werr, wcode = w:next()
      if stopped or wcode == "ECANCELED" then return end
      if changed then
        for _, file in ipairs(changed) do
          if self:_matches(file) then self:_sync(file) end
        end
      else
        log.warn("defs: watching failed, reloading everything", { dir = self.dir, error = werr })
        self:load_all()
      end
    end
  end)
  return {
    stop = function()
      if stopped then return end
      stopped = true
      self.watching = false
      w:close()
      if fiber.current() ~= f then f:cancel("stopped") end
    end,
  }
end

-- factory check: every teams/*.lua and pipelines/*.lua must load and validate with
-- the real DSL (factory.dsl), against the model aliases factory.lua configures (the
-- canonical factory/* ones without a factory.lua); factory.lua must load.
-- What is valid but would fail on this machine: a CLI agent whose program is not
-- installed (where the agent would look for it), found before a batch is started.
local function missing_agents(dir, project)
  local cli, proc = require "factory.agents.cli", require "factory.proc"
  local out = {}
  for _, name in ipairs(project.teams:names()) do
    for _, op in ipairs(project.teams:get(name).operatives) do
      if type(op.agent) == "table" then
        local program, path = cli.program(op.agent)
        if program and not proc.which(program, path) then
          out[#out + 1] = ("%s: operative %s's agent runs %s, which is not installed here (not found in PATH %s)")
            :format(join(dir, "teams/" .. name .. ".lua"), op.name, program, path)
        end
      end
    end
  end
  return out
end

-- factory.lua's team budgets that name neither a team of the project nor a virtual
-- key's team (factory serve's external agents): a misspelt name limits nothing.
local function unknown_budget_teams(project, cfg)
  local out, keyed = {}, {}
  for _, entry in pairs(cfg.keys or {}) do
    if type(entry) == "table" and entry.team then keyed[entry.team] = true end
  end
  local teams = (cfg.router.budgets or {}).teams or {}
  local names = {}
  for name in pairs(teams) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    if not project.teams:get(name) and not keyed[name] then
      out[#out + 1] = ("budgets.teams[%q] names no team of teams/*.lua and no key's team: it limits nothing (teams: %s)")
        :format(name, table.concat(project.teams:names(), ", "))
    end
  end
  return out
end

function M.check(dir)
  dir = dir:gsub("(.)/+$", "%1")
  local st = fs.stat(dir, true)
  if not st or st.type ~= "directory" then
    return { dir .. (st and ": not a directory" or ": no such directory") }
  end
  local dsl = require "factory.dsl"
  local problems, aliases, cfg = {}, nil, nil
  local config = join(dir, "factory.lua")
  if fs.stat(config) then
    local err
    cfg, err = require("factory.config").load(config)
    if cfg then
      aliases = dsl.aliases_of(cfg.router)
    else
      -- The message names the file by a chunk name Lua may have shortened; rebuild it.
      local line, msg = tostring(err):match("^.-:(%d+): (.*)$")
      problems[#problems + 1] = at(config, tonumber(line), msg or tostring(err))
    end
  end
  local project = dsl.project(dir, { aliases = aliases })
  local found = project:load()
  for i, p in ipairs(found) do table.insert(problems, i, p) end
  local warnings = missing_agents(dir, project)
  if cfg then
    for _, w in ipairs(cfg.warnings) do warnings[#warnings + 1] = config .. ": " .. w end
    warnings[#warnings + 1] = dsl.unpriced_budgets(project, cfg.router)
    for _, w in ipairs(unknown_budget_teams(project, cfg)) do warnings[#warnings + 1] = config .. ": " .. w end
    local told = cfg.notify and cfg.notify.command[1]
    if told and not require("factory.proc").which(told) then
      warnings[#warnings + 1] = ("%s: notify.command runs %s, which is not installed here (not found in PATH)")
        :format(config, told)
    end
  end
  return problems, warnings, { config = fs.stat(config) ~= nil,
    teams = #project.teams:names(), pipelines = #project.pipelines:names() }
end

return M
