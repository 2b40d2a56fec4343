-- factory.notify: factory.lua's `notify { }`: a command run when a run needs a human,
-- stops, or ends, so that whoever left a batch overnight hears of it (a desktop
-- notification, a chat webhook through curl, a mail).
--
--   notify {
--     command = { "notify-send", "factory", "{message}" },   -- argv; {message} anywhere
--     on = { "escalated", "run_stopped", "run_finished" },   -- the default: all three
--     timeout = 10,                                          -- seconds (default 10)
--     env = { "SLACK_WEBHOOK" },                             -- variables passed on
--   }
--   notify.check(t) -> true | nil, "notify...: what is wrong"   (factory.config's check)
--   notify.new(section | nil) -> notifier
--     notifier.event(ev): an engine event ({ kind, run_id, data }); one of the kinds in
--       `on` starts the command in a fiber of its own and returns at once
--     notifier.wait(): waits for the commands started (each bounded by its timeout).
--       A `factory` command need not: a script that returns lets its fibers finish,
--       so the last notice (the run's end, the question --no-wait leaves) is told.
-- The command gets the event's one line of text in place of {message}, the event as
-- JSON ({ kind, run, text, data }) on its stdin, and FACTORY_EVENT set to its kind.
-- It runs with only PATH, HOME, LANG and the variables `env` names (a webhook URL,
-- say): never the provider keys in the engine's environment. Its output is dropped;
-- a failure is logged and never touches the run.
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local json = require "factory.json"
local log = require "factory.log"

local M = {}

M.KINDS = { escalated = true, run_stopped = true, run_finished = true }
local DEFAULT_ON = { "escalated", "run_stopped", "run_finished" }
local DEFAULT_TIMEOUT = 10
local FIELDS = { command = true, on = true, timeout = true, env = true }

local function strings(v)
  if type(v) ~= "table" or #v == 0 then return false end
  for k, s in pairs(v) do
    if type(k) ~= "number" or type(s) ~= "string" then return false end
  end
  return true
end

function M.check(t)
  for k in pairs(t) do
    if not FIELDS[k] then return nil, ("notify: unknown field %s (expected command, env, on, timeout)"):format(tostring(k)) end
  end
  if not strings(t.command) then
    return nil, 'notify.command: expected a list of strings, the argv: { "notify-send", "factory", "{message}" }'
  end
  if t.on ~= nil then
    if not strings(t.on) then return nil, "notify.on: expected a list of event kinds" end
    for _, kind in ipairs(t.on) do
      if not M.KINDS[kind] then
        return nil, ("notify.on: unknown event %q (expected escalated, run_stopped, run_finished)"):format(kind)
      end
    end
  end
  if t.timeout ~= nil and (type(t.timeout) ~= "number" or t.timeout <= 0 or t.timeout ~= t.timeout) then
    return nil, "notify.timeout: expected a number of seconds > 0"
  end
  if t.env ~= nil and not strings(t.env) then return nil, "notify.env: expected a list of variable names" end
  return true
end

-- The event's one line: what happened and what moves the run on.
local function text_of(ev)
  local d = type(ev.data) == "table" and ev.data or {}
  if ev.kind == "escalated" then
    return ("factory: run %s needs a human: escalation #%s from %s: %s (factory hitl answer %s TEXT)"):format(
      tostring(ev.run_id), tostring(d.id), tostring(d.team), tostring(d.reason or d.question), tostring(d.id))
  elseif ev.kind == "run_stopped" then
    return ("factory: run %s stopped: %s (factory resume %s)"):format(tostring(ev.run_id),
      tostring(d.error):gsub("\n.*", ""), tostring(ev.run_id))
  end
  return ("factory: run %s %s"):format(tostring(ev.run_id), tostring(d.state or "ended"))
end

local function environment(names)
  local env = {}
  for _, name in ipairs({ "PATH", "HOME", "LANG" }) do env[name] = os.getenv(name) end
  for _, name in ipairs(names or {}) do env[name] = os.getenv(name) end
  return env
end

local function run(section, ev)
  local text = text_of(ev)
  local argv = {}
  for i, a in ipairs(section.command) do argv[i] = (a:gsub("{message}", function() return text end)) end
  local env = environment(section.env)
  env.FACTORY_EVENT = ev.kind
  local res, err = proc.run{ argv = argv, env = env, stdout = "null", stderr = "null",
                             timeout = section.timeout or DEFAULT_TIMEOUT,
                             stdin = json.encode({ kind = ev.kind, run = ev.run_id, text = text, data = ev.data }) }
  if not res then
    log.warn("notify: the command could not run", { command = section.command[1], error = tostring(err) })
  elseif res.code ~= 0 then
    log.warn("notify: the command failed", { command = section.command[1], code = res.code, signal = res.signal,
                                             timed_out = res.timed_out })
  end
end

function M.new(section)
  local on, running = {}, {}
  for _, kind in ipairs(section and (section.on or DEFAULT_ON) or {}) do on[kind] = true end
  local notifier = {}
  function notifier.event(ev)
    if not (section and on[ev.kind]) then return end
    local f
    f = fiber.spawn(function()
      run(section, ev)
      running[f] = nil
    end)
    running[f] = true
  end
  function notifier.wait()
    for f in pairs(running) do fiber.join(f) end
  end
  return notifier
end

return M
