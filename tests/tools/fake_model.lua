-- A fake model server for tests: OpenAI (POST /v1/chat/completions, /v1/embeddings)
-- and Anthropic (POST /v1/messages) wire formats, streaming included, with the
-- event shapes the real APIs send. Never used outside tests.
--
-- As a module:  local fake = require("fake_model").start{ port = 0, embed = fn(text) -> vector | nil }
--   (embed: what /v1/embeddings answers for each input, taking no scripted reply;
--   without it embeddings requests take the next scripted reply and answer a constant vector)
--   fake:url(), fake:script{ reply, ... }, fake:requests(), fake:count(), fake:reset(),
--   fake:close(), fake:router_config{ [alias] = "model" } (a router configuration for it)
-- As a program: factory tests/tools/fake_model.lua [--port N] prints its URL, then
--   serves until killed; it is scripted over HTTP:
--   POST /_fake/script  [reply, ...]   appends to the queue of replies
--   POST /_fake/reset                  empties the queue and the request log
--   GET  /_fake/requests               { count =, requests = [{ path, headers, body }] }
--
-- A reply (each request takes the next one; an empty queue gives a short text):
--   { content = "text", tool_calls = { { id =, name =, arguments = "json" } },
--     finish = "stop"|"length"|..., usage = { prompt =, completion = },
--     delay = seconds before answering, chunk_delay = seconds between stream chunks,
--     status = 429|500|503|400..., retry_after = seconds (header Retry-After),
--     message = the error message of a status reply,
--     fault = "reset" (connection cut mid-response) | "hang" (never answers) |
--             "truncate" (stream cut before its end) | "no_done" (an OpenAI stream
--             that ends after its last chunk without "data: [DONE]", as some
--             compatible servers do) | "malformed" (bad JSON: text =
--             the body, or a stream's one event; without it, an object cut short) |
--             "content_type" (text/html) }
-- A request whose Authorization (OpenAI) or x-api-key (Anthropic) header is
-- missing gets 401, and one whose body is not UTF-8 gets 400, as from the real services.
local server = require "factory.http_server"
local utf8_error = require("factory.core.text").utf8_error
local fiber = require "factory.fiber"
local json = require "factory.json"

local M = {}

local Fake = {}
Fake.__index = Fake

local MAX_LOG = 1000

M.API_KEY = "sk-test-fake-0000000000"


local function tokens_of(body)
  local n = 0
  local function add(content)
    if type(content) == "string" then
      n = n + #content
    elseif type(content) == "table" then
      for _, part in ipairs(content) do
        if type(part) == "table" then add(part.text or part.content) end
      end
    end
  end
  if type(body.system) == "string" then add(body.system) end
  for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do add(m.content) end
  if type(body.input) == "string" then add(body.input) end
  return math.max(1, math.ceil(n / 4))
end

-- The text of a reply split in a few pieces, as a model streams it.
local function pieces(text)
  local out = {}
  for word in text:gmatch("%S+%s*") do out[#out + 1] = word end
  if #out == 0 then out[1] = text end
  return out
end

local function null_or(v) if v == nil then return json.null end return v end

local function error_body(kind, status, message)
  if kind == "anthropic" then
    local types = { [400] = "invalid_request_error", [401] = "authentication_error", [429] = "rate_limit_error",
                    [500] = "api_error", [503] = "overloaded_error", [529] = "overloaded_error" }
    return { type = "error", error = { type = types[status] or "api_error", message = message } }
  end
  return { error = { message = message, type = server.error_type(status), param = json.null, code = json.null } }
end

local function usage_of(reply, body)
  local u = reply.usage or {}
  local text = reply.content or ""
  return u.prompt or tokens_of(body), u.completion or math.max(1, math.ceil(#text / 4))
end

local counter = 0
local function next_id(prefix)
  counter = counter + 1
  return ("%s%06d"):format(prefix, counter)
end

-- ---- OpenAI ------------------------------------------------------------------------

local function openai_tool_calls(reply)
  if not reply.tool_calls then return nil end
  local calls = {}
  for i, tc in ipairs(reply.tool_calls) do
    calls[i] = { id = tc.id or ("call_" .. i), type = "function",
                 ["function"] = { name = tc.name, arguments = tc.arguments or "{}" } }
  end
  return calls
end

local function openai_reply(res, reply, body, stream)
  local id, created, model = next_id("chatcmpl-fake"), os.time(), body.model
  local prompt, completion = usage_of(reply, body)
  local finish = reply.finish or (reply.tool_calls and "tool_calls" or "stop")
  local usage = { prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion }
  local text = reply.content or (not reply.tool_calls and "Hello from the fake.") or nil
  if not stream then
    return res:json(200, {
      id = id, object = "chat.completion", created = created, model = model,
      system_fingerprint = "fp_fake",
      choices = { { index = 0, logprobs = json.null, finish_reason = finish,
                    message = { role = "assistant", content = null_or(text), refusal = json.null,
                                tool_calls = openai_tool_calls(reply) } } },
      usage = usage,
    })
  end
  local include_usage = type(body.stream_options) == "table" and body.stream_options.include_usage
  local function chunk(delta, fin)
    local c = { id = id, object = "chat.completion.chunk", created = created, model = model,
                system_fingerprint = "fp_fake",
                choices = { { index = 0, delta = delta, logprobs = json.null, finish_reason = null_or(fin) } } }
    if include_usage then c.usage = json.null end
    return json.encode(c)
  end
  local events = { chunk({ role = "assistant", content = "", refusal = json.null }) }
  if text then
    for _, p in ipairs(pieces(text)) do events[#events + 1] = chunk({ content = p }) end
  end
  for i, tc in ipairs(openai_tool_calls(reply) or {}) do
    events[#events + 1] = chunk({ tool_calls = { { index = i - 1, id = tc.id, type = "function",
                                                   ["function"] = { name = tc["function"].name, arguments = "" } } } })
    local args = tc["function"].arguments
    local half = math.floor(#args / 2)
    for _, part in ipairs({ args:sub(1, half), args:sub(half + 1) }) do
      events[#events + 1] = chunk({ tool_calls = { { index = i - 1, ["function"] = { arguments = part } } } })
    end
  end
  events[#events + 1] = chunk({}, finish)
  if include_usage then
    events[#events + 1] = json.encode({ id = id, object = "chat.completion.chunk", created = created, model = model,
                                        system_fingerprint = "fp_fake", choices = json.empty_array, usage = usage })
  end
  events[#events + 1] = "[DONE]"
  return events
end

-- ---- Anthropic ----------------------------------------------------------------------

local STOP = { stop = "end_turn", length = "max_tokens", tool_calls = "tool_use" }

local function anthropic_blocks(reply)
  local blocks = {}
  local text = reply.content or (not reply.tool_calls and "Hello from the fake.") or nil
  if text then blocks[#blocks + 1] = { type = "text", text = text } end
  for i, tc in ipairs(reply.tool_calls or {}) do
    blocks[#blocks + 1] = { type = "tool_use", id = tc.id or ("toolu_" .. i), name = tc.name,
                            input = json.decode(tc.arguments or "{}") }
  end
  return blocks
end

local function anthropic_reply(res, reply, body, stream)
  local id, model = next_id("msg_fake"), body.model
  local prompt, completion = usage_of(reply, body)
  local stop = STOP[reply.finish or (reply.tool_calls and "tool_calls" or "stop")] or "end_turn"
  local blocks = anthropic_blocks(reply)
  if not stream then
    return res:json(200, { id = id, type = "message", role = "assistant", model = model, content = blocks,
                           stop_reason = stop, stop_sequence = json.null,
                           usage = { input_tokens = prompt, output_tokens = completion } })
  end
  local events = {}
  local function ev(name, data) events[#events + 1] = { event = name, data = json.encode(data) } end
  ev("message_start", { type = "message_start", message = {
    id = id, type = "message", role = "assistant", content = json.empty_array, model = model,
    stop_reason = json.null, stop_sequence = json.null, usage = { input_tokens = prompt, output_tokens = 1 } } })
  ev("ping", { type = "ping" })
  for i, b in ipairs(blocks) do
    local index = i - 1
    if b.type == "text" then
      ev("content_block_start", { type = "content_block_start", index = index, content_block = { type = "text", text = "" } })
      for _, p in ipairs(pieces(b.text)) do
        ev("content_block_delta", { type = "content_block_delta", index = index, delta = { type = "text_delta", text = p } })
      end
    else
      ev("content_block_start", { type = "content_block_start", index = index,
                                  content_block = { type = "tool_use", id = b.id, name = b.name, input = {} } })
      local args = json.encode(b.input)
      local half = math.floor(#args / 2)
      for _, part in ipairs({ args:sub(1, half), args:sub(half + 1) }) do
        ev("content_block_delta", { type = "content_block_delta", index = index,
                                    delta = { type = "input_json_delta", partial_json = part } })
      end
    end
    ev("content_block_stop", { type = "content_block_stop", index = index })
  end
  ev("message_delta", { type = "message_delta", delta = { stop_reason = stop, stop_sequence = json.null },
                        usage = { output_tokens = completion } })
  ev("message_stop", { type = "message_stop" })
  return events
end

-- ---- serving -----------------------------------------------------------------------------

local function send_events(res, events, reply)
  for i, e in ipairs(events) do
    if reply.fault == "truncate" and i > math.max(2, math.floor(#events / 2)) then return end
    if reply.chunk_delay then fiber.sleep(reply.chunk_delay) end
    if not res:sse(e) then return end
  end
  res:finish()
end

-- The queue runs from head to tail: a bench scripts thousands of replies, and
-- shifting them all down for each request made the fake slower as they grew.
function Fake:next_reply()
  if self.head > self.tail then return nil end
  local reply = self.queue[self.head]
  self.queue[self.head] = nil
  self.head = self.head + 1
  return reply
end

function Fake:handle(kind, req, res)
  self.n = self.n + 1
  local entry = { path = req.path, headers = req.headers, body = req.body }
  if #self.log < MAX_LOG then self.log[#self.log + 1] = entry end
  -- With an embed function, embeddings are computed, never scripted: the queue is
  -- left to the chat requests around them.
  local reply = (kind == "embeddings" and self.embed) and {} or self:next_reply() or {}
  if reply.delay then fiber.sleep(reply.delay) end
  local auth = kind == "anthropic" and req.headers["x-api-key"] or req.headers["authorization"]
  if not auth then return res:json(401, error_body(kind, 401, "missing API key")) end
  if reply.status then
    if reply.retry_after then res:header("Retry-After", tostring(reply.retry_after)) end
    return res:json(reply.status, error_body(kind, reply.status, reply.message or ("fake fault " .. reply.status)))
  end
  if reply.fault == "hang" then
    fiber.sleep(reply.seconds or 3600)
    return res:json(200, {})
  elseif reply.fault == "reset" then
    res:status(200):header("Content-Type", "application/json"):start()
    res:write('{"id": "cut')
    return  -- the server cuts a response its handler left unfinished
  elseif reply.fault == "malformed" and not req.body:find('"stream":true') then
    return res:status(200):header("Content-Type", "application/json"):send(reply.text or '{"id": "x", "choices": [')
  elseif reply.fault == "content_type" then
    return res:status(200):header("Content-Type", "text/html"):send("<html>gateway</html>")
  end
  -- As the real services: JSON that is not UTF-8 is no JSON.
  if utf8_error(req.body) then
    return res:json(400, error_body(kind, 400, "The request body is not valid JSON: invalid UTF-8"))
  end
  local body, err = json.decode(req.body)
  if type(body) ~= "table" then return res:json(400, error_body(kind, 400, "invalid JSON: " .. tostring(err))) end
  if type(body.model) ~= "string" then return res:json(400, error_body(kind, 400, "model is required")) end
  if kind == "embeddings" then
    local inputs = type(body.input) == "table" and body.input or { body.input }
    local data = {}
    for i = 1, #inputs do
      data[i] = { object = "embedding", index = i - 1,
                  embedding = self.embed and self.embed(inputs[i]) or { 0.1, 0.2, 0.3 } }
    end
    local p = tokens_of(body)
    return res:json(200, { object = "list", data = data, model = body.model,
                           usage = { prompt_tokens = p, total_tokens = p } })
  end
  if kind == "anthropic" then
    if type(body.max_tokens) ~= "number" then
      return res:json(400, error_body(kind, 400, "max_tokens: Field required"))
    end
    for i, m in ipairs(body.messages or {}) do
      if m.role ~= "user" and m.role ~= "assistant" then
        return res:json(400, error_body(kind, 400, ("messages.%d.role: unexpected role %s"):format(i - 1, tostring(m.role))))
      end
      if i > 1 and body.messages[i - 1].role == m.role then
        return res:json(400, error_body(kind, 400, "messages: roles must alternate between user and assistant"))
      end
    end
    for i, t in ipairs(type(body.tools) == "table" and body.tools or {}) do
      if type(t.input_schema) ~= "table" then
        return res:json(400, error_body(kind, 400, ("tools.%d.custom.input_schema: Field required"):format(i - 1)))
      end
    end
    if type(body.temperature) == "number" and (body.temperature < 0 or body.temperature > 1) then
      return res:json(400, error_body(kind, 400, "temperature: Input should be less than or equal to 1"))
    end
  end
  local stream = body.stream == true
  local events = (kind == "anthropic" and anthropic_reply or openai_reply)(res, reply, body, stream)
  if not stream then return end
  if reply.fault == "malformed" then events = { reply.text or "{\"id\": [" } end
  if reply.fault == "no_done" and kind == "openai" then events[#events] = nil end
  send_events(res, events, reply)
end

function M.start(opts)
  opts = opts or {}
  local self = setmetatable({ queue = {}, head = 1, tail = 0, log = {}, n = 0, embed = opts.embed }, Fake)
  local srv, err = server.new{ host = "127.0.0.1", port = opts.port or 0 }
  if not srv then return nil, err end
  self.srv = srv
  srv:route("POST", "/v1/chat/completions", function(req, res) return self:handle("openai", req, res) end)
  srv:route("POST", "/v1/embeddings", function(req, res) return self:handle("embeddings", req, res) end)
  srv:route("POST", "/v1/messages", function(req, res) return self:handle("anthropic", req, res) end)
  srv:route("POST", "/_fake/script", function(req, res)
    local replies = req:json()
    if type(replies) ~= "table" then return res:error(400, "expected a JSON array of replies") end
    self:script(replies)
    return res:json(200, { queued = self.tail - self.head + 1 })
  end)
  srv:route("POST", "/_fake/reset", function(_, res)
    self:reset()
    return res:json(200, { ok = true })
  end)
  srv:route("GET", "/_fake/requests", function(_, res)
    return res:json(200, { count = self.n, requests = #self.log > 0 and self.log or json.empty_array })
  end)
  return self
end

function Fake:url() return self.srv:url() end

-- A router configuration sending each alias to this fake (provider "fake", key
-- M.API_KEY), with the tests' short limits and no retries.
--   models: { [alias] = "model" }; extra: more top-level fields (prices, budgets...)
function Fake:router_config(models, extra)
  local cfg = {
    providers = { fake = { base_url = self:url() .. "/v1", api_key = M.API_KEY } },
    models = {},
    limits = { retries = 0, timeout = 5, first_token_timeout = 2, idle_timeout = 2, breaker_failures = 1000 },
  }
  for alias, model in pairs(models) do cfg.models[alias] = { "fake/" .. model } end
  for k, v in pairs(extra or {}) do cfg[k] = v end
  return cfg
end
function Fake:count() return self.n end
function Fake:requests() return self.log end
function Fake:close() self.srv:close() end

function Fake:script(replies)
  for _, r in ipairs(replies) do
    self.tail = self.tail + 1
    self.queue[self.tail] = r
  end
  return self
end

function Fake:reset()
  self.queue, self.head, self.tail, self.log, self.n = {}, 1, 0, {}, 0
end

-- Run as a program, not loaded as a module (by dofile).
if arg and arg[0] and arg[0]:match("fake_model%.lua$") then
  local port = 0
  local args = { ... }
  for i = 1, #args do
    if args[i] == "--port" then port = tonumber(args[i + 1]) end
  end
  local fake = assert(M.start{ port = port })
  io.stdout:write(fake:url(), "\n")
  io.stdout:flush()
  fiber.cond():wait()
end

return M
