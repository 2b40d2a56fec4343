-- OFFLINE REPLAY PROVIDER, for the demo and for tests that kill and restart runs.
-- Not a model: it answers OpenAI-format chat requests with recorded replies
-- (examples/replay/feature.lua), chosen by the team and objective named in the
-- request's system prompt, so it holds no state and a restarted run gets the same
-- answers. Never configured by default; a factory.lua must point at it.
-- A coding agent's turn is chosen by `step` as well: the number of assistant
-- messages already in the conversation; an entry with `tool_call = { name =,
-- arguments = {...} }` replies with that tool call instead of text.
--
-- As a module:  local replay = dofile("examples/replay/server.lua")
--   replay.start{ port = 0, replies = FILE | { FILE, ... }, delay = s, log = FILE } -> server (:url(), :close())
--   log: each request is appended, as it arrives, as a line "time<TAB>team<TAB>objective".
-- As a program: factory examples/replay/server.lua [--port N] [--replies FILE]
--   [--delay S] [--log FILE]   prints its URL, then serves until killed.
local server = require "factory.http_server"
local fiber = require "factory.fiber"
local json = require "factory.json"
local fs = require "factory.core.fs"
local time = require "factory.core.time"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")

local M = {}

local function pick(replies, messages)
  local system = messages[1] and messages[1].content or ""
  local team, objective = system:match("^team: ([%w_]+); operative: [%w_]+; objective: ([^\n]+)")
  local all = {}
  for _, m in ipairs(messages) do all[#all + 1] = type(m.content) == "string" and m.content or "" end
  local text = table.concat(all, "\n")
  local step = 0
  for _, m in ipairs(messages) do
    if m.role == "assistant" then step = step + 1 end
  end
  for _, r in ipairs(replies) do
    if r.team == team and r.objective == objective and (not r.when or text:find(r.when, 1, true))
      and (r.step == nil or r.step == step) then
      return r, team, objective
    end
  end
  return nil, team, objective
end

local function load_replies(files)
  if type(files) ~= "table" then files = { files or (HERE .. "feature.lua") } end
  local all = {}
  for _, f in ipairs(files) do
    for _, r in ipairs(dofile(f)) do all[#all + 1] = r end
  end
  return all
end

local function message_of(entry, step)
  if entry.tool_call then
    return { role = "assistant", content = json.null, tool_calls = { {
      id = ("replay_call_%d"):format(step), type = "function",
      ["function"] = { name = entry.tool_call.name, arguments = assert(json.encode(entry.tool_call.arguments)) },
    } } }, "tool_calls"
  end
  return { role = "assistant", content = assert(json.encode(entry.reply)) }, "stop"
end

function M.start(opts)
  opts = opts or {}
  local replies = load_replies(opts.replies)
  local srv, err = server.new{ host = "127.0.0.1", port = opts.port or 0 }
  if not srv then return nil, err end
  srv:route("POST", "/v1/chat/completions", function(req, res)
    local body = req:json()
    if type(body) ~= "table" or type(body.messages) ~= "table" then return res:error(400, "expected a chat request") end
    local entry, team, objective = pick(replies, body.messages)
    if opts.log then fs.append(opts.log, ("%.6f\t%s\t%s\n"):format(time.now(), tostring(team), tostring(objective))) end
    if opts.delay then fiber.sleep(opts.delay) end
    if not entry then
      return res:error(404, ("no recorded reply for team %s, objective %s"):format(tostring(team), tostring(objective)))
    end
    local message, finish = message_of(entry, #body.messages)
    local out = #(json.encode(message) or "")
    return res:json(200, {
      id = "replay-" .. tostring(time.now()), object = "chat.completion", created = math.floor(time.now()),
      model = body.model,
      choices = { { index = 0, message = message, finish_reason = finish } },
      usage = { prompt_tokens = math.ceil(#req.body / 4), completion_tokens = math.ceil(out / 4),
                total_tokens = math.ceil(#req.body / 4) + math.ceil(out / 4) },
    })
  end)
  return srv
end

-- The router configuration that sends every alias to a replay server at url.
function M.router_config(url)
  local models = {}
  for _, alias in ipairs({ "factory/architect", "factory/coder", "factory/fast", "factory/cheap" }) do
    models[alias] = { "replay/recorded" }
  end
  -- Replayed replies cost nothing, and are priced so: the teams' USD budgets hold.
  return { providers = { replay = { base_url = url .. "/v1", api_key = "replay-no-key" } }, models = models,
           prices = { ["replay/recorded"] = { input = 0, output = 0 } } }
end

if arg and arg[0] and arg[0]:match("replay/server%.lua$") then
  local args, opts = { ... }, {}
  for i = 1, #args, 2 do
    local k, v = args[i]:match("^%-%-(.*)$"), args[i + 1]
    if k == "port" or k == "delay" then v = tonumber(v) end
    if k then opts[k] = v end
  end
  local srv = assert(M.start(opts))
  io.stdout:write(srv:url(), "\n")
  io.stdout:flush()
  fiber.cond():wait()
end

return M
