-- OFFLINE REPLAY PROVIDER, for the demo and for tests that kill and restart runs.
-- Not a model: it answers OpenAI-format chat requests with recorded replies
-- (examples/replay/feature.lua), chosen by the team and objective named in the
-- request's system prompt, so it holds no state and a restarted run gets the same
-- answers. Never configured by default; a factory.lua must point at it.
--
-- As a module:  local replay = dofile("examples/replay/server.lua")
--   replay.start{ port = 0, replies = FILE, delay = s, log = FILE } -> server (:url(), :close())
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
  for _, r in ipairs(replies) do
    if r.team == team and r.objective == objective and (not r.when or text:find(r.when, 1, true)) then
      return r.reply, team, objective
    end
  end
  return nil, team, objective
end

function M.start(opts)
  opts = opts or {}
  local replies = dofile(opts.replies or (HERE .. "feature.lua"))
  local srv, err = server.new{ host = "127.0.0.1", port = opts.port or 0 }
  if not srv then return nil, err end
  srv:route("POST", "/v1/chat/completions", function(req, res)
    local body = req:json()
    if type(body) ~= "table" or type(body.messages) ~= "table" then return res:error(400, "expected a chat request") end
    local reply, team, objective = pick(replies, body.messages)
    if opts.log then fs.append(opts.log, ("%.6f\t%s\t%s\n"):format(time.now(), tostring(team), tostring(objective))) end
    if opts.delay then fiber.sleep(opts.delay) end
    if not reply then
      return res:error(404, ("no recorded reply for team %s, objective %s"):format(tostring(team), tostring(objective)))
    end
    local content = assert(json.encode(reply))
    return res:json(200, {
      id = "replay-" .. tostring(time.now()), object = "chat.completion", created = math.floor(time.now()),
      model = body.model,
      choices = { { index = 0, message = { role = "assistant", content = content }, finish_reason = "stop" } },
      usage = { prompt_tokens = math.ceil(#req.body / 4), completion_tokens = math.ceil(#content / 4),
                total_tokens = math.ceil(#req.body / 4) + math.ceil(#content / 4) },
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
  return { providers = { replay = { base_url = url .. "/v1", api_key = "replay-no-key" } }, models = models }
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
