-- factory.serve_messages: the Anthropic Messages endpoint of `factory serve`
-- (POST /v1/messages), so that Claude Code and the Anthropic SDKs can point
-- ANTHROPIC_BASE_URL at the proxy. A request is translated to the router's OpenAI
-- form, routed like any other call (aliases, fallbacks, budgets, records), and the
-- answer translated back: a message, or the Messages event stream (message_start,
-- content_block_start, content_block_delta, content_block_stop, message_delta,
-- message_stop, and error if the stream fails midway). Text, images, system
-- prompts, tool definitions, tool_use / tool_result blocks, stop sequences and
-- reasons, and usage are translated; thinking blocks are dropped (the router's form
-- has no place for them), and other blocks of a user turn (documents) refused (400).
--
--   messages.handle(req, res, opts)   opts: { team =, run = } (the proxy's choice)
--   messages.count_tokens(req, res)   POST /v1/messages/count_tokens: an estimate
--   messages.to_openai(request) -> OpenAI chat request table | nil, message
--   messages.from_openai(response, model) -> Messages response table
-- Errors have Anthropic's shape: {"type":"error","error":{"type":...,"message":...}}.
local router = require "factory.router"
local json = require "factory.json"

local M = {}

local ERROR_TYPES = { [400] = "invalid_request_error", [401] = "authentication_error", [402] = "billing_error",
                      [403] = "permission_error", [404] = "not_found_error", [408] = "timeout_error",
                      [413] = "request_too_large", [429] = "rate_limit_error", [529] = "overloaded_error" }

local function error_body(status, message)
  return { type = "error", error = { type = ERROR_TYPES[status] or "api_error", message = message } }
end

local function send_error(res, status, message)
  return res:json(status, error_body(status, message))
end

local STOP_REASONS = { stop = "end_turn", length = "max_tokens", tool_calls = "tool_use",
                       function_call = "tool_use", content_filter = "refusal" }

local function text_of(content)
  if type(content) == "string" then return content end
  local parts = {}
  for _, b in ipairs(type(content) == "table" and content or {}) do
    if b.type == "text" and type(b.text) == "string" then parts[#parts + 1] = b.text end
  end
  return table.concat(parts, "\n\n")
end

local function image_part(b)
  local src = type(b.source) == "table" and b.source or {}
  local url = src.type == "base64" and ("data:%s;base64,%s"):format(tostring(src.media_type), tostring(src.data))
              or src.url
  if type(url) ~= "string" then return nil end
  return { type = "image_url", image_url = { url = url } }
end

-- Blocks the router's form has no place for, dropped: the model's own reasoning.
local DROPPED = { thinking = true, redacted_thinking = true }

-- One Messages turn as OpenAI messages, appended to out: a user turn's tool results
-- become tool messages (before its other content), an assistant turn's tool_use
-- blocks become tool_calls. Any other block of a user turn (a document, a search
-- result) is refused rather than dropped: the model would answer without it.
local function add_turn(out, m)
  local content = m.content
  if type(content) == "string" then
    out[#out + 1] = { role = m.role, content = content }
    return true
  end
  if type(content) ~= "table" then return nil, "each message needs content: a string or a list of blocks" end
  local parts, calls, has_image = {}, {}, false
  for i, b in ipairs(content) do
    if type(b) ~= "table" then return nil, "content blocks must be objects" end
    if b.type == "text" then
      parts[#parts + 1] = { type = "text", text = b.text }
    elseif b.type == "image" and m.role == "user" then
      local part = image_part(b)
      if part then
        parts[#parts + 1] = part
        has_image = true
      end
    elseif b.type == "tool_use" and m.role == "assistant" then
      calls[#calls + 1] = { id = b.id, type = "function",
                            ["function"] = { name = b.name, arguments = json.encode(b.input or {}) or "{}" } }
    elseif b.type == "tool_result" then
      local text = text_of(b.content)
      if b.is_error then text = "Error: " .. text end
      out[#out + 1] = { role = "tool", tool_call_id = b.tool_use_id, content = text }
    elseif m.role == "user" and not DROPPED[b.type] then
      return nil, ("content.%d: a %s block is not supported here (the proxy passes text, images, tool_use and"
        .. " tool_result)"):format(i - 1, type(b.type) == "string" and ("%q"):format(b.type) or "typeless")
    end
  end
  if #parts == 0 and #calls == 0 then return true end
  local msg = { role = m.role }
  if has_image then
    msg.content = parts
  elseif #parts > 0 then
    msg.content = text_of(parts)
  else
    msg.content = json.null
  end
  if #calls > 0 then msg.tool_calls = calls end
  out[#out + 1] = msg
  return true
end

local function tool_choice(tc)
  if type(tc) ~= "table" then return nil end
  if tc.type == "any" then return "required" end
  if tc.type == "none" then return "none" end
  if tc.type == "tool" then return { type = "function", ["function"] = { name = tc.name } } end
  return "auto"
end

function M.to_openai(r)
  if type(r) ~= "table" then return nil, "the request must be a JSON object" end
  if type(r.model) ~= "string" or r.model == "" then return nil, "model: a model name is required" end
  if type(r.messages) ~= "table" or #r.messages == 0 then return nil, "messages: a non-empty list is required" end
  local msgs = {}
  local system = text_of(r.system)
  if system ~= "" then msgs[1] = { role = "system", content = system } end
  local turns = 0
  for i, m in ipairs(r.messages) do
    if type(m) == "table" and m.role == "system" then
      -- Claude Code (2.1) sends instructions as system messages among the turns; the
      -- router gives them to an Anthropic upstream as its system prompt.
      msgs[#msgs + 1] = { role = "system", content = text_of(m.content) }
    else
      if type(m) ~= "table" or (m.role ~= "user" and m.role ~= "assistant") then
        return nil, ("messages.%d: role must be \"user\", \"assistant\" or \"system\""):format(i - 1)
      end
      local ok, err = add_turn(msgs, m)
      if not ok then return nil, ("messages.%d%s%s"):format(i - 1, err:find("^content%.") and "." or ": ", err) end
      turns = turns + 1
    end
  end
  if turns == 0 then return nil, "messages: at least one user or assistant message is required" end
  local out = { model = r.model, messages = msgs, max_tokens = r.max_tokens, temperature = r.temperature,
                top_p = r.top_p, stop = r.stop_sequences, tool_choice = tool_choice(r.tool_choice) }
  if type(r.tools) == "table" and #r.tools > 0 then
    out.tools = {}
    for i, t in ipairs(r.tools) do
      out.tools[i] = { type = "function", ["function"] = { name = t.name, description = t.description,
                                                           parameters = t.input_schema } }
    end
    -- OpenAI refuses parallel_tool_calls in a request without tools.
    if type(r.tool_choice) == "table" and r.tool_choice.disable_parallel_tool_use == true then
      out.parallel_tool_calls = false
    end
  end
  if r.stream then
    out.stream = true
    out.stream_options = { include_usage = true }
  end
  return out
end

-- A Messages id: an Anthropic upstream's own ("msg_..."), else the chat id prefixed.
local function message_id(id)
  id = tostring(id or "")
  return id:find("^msg_") and id or ("msg_" .. id)
end

function M.from_openai(resp, model)
  local choice = type(resp.choices) == "table" and resp.choices[1] or {}
  local msg = choice.message or {}
  local content = {}
  if type(msg.content) == "string" and msg.content ~= "" then
    content[1] = { type = "text", text = msg.content }
  end
  for _, tc in ipairs(type(msg.tool_calls) == "table" and msg.tool_calls or {}) do
    local fn = tc["function"] or {}
    local input = type(fn.arguments) == "string" and json.decode(fn.arguments)
    -- An empty table encodes as {}, the object input must be.
    content[#content + 1] = { type = "tool_use", id = tc.id, name = fn.name,
                              input = type(input) == "table" and input or {} }
  end
  local usage = type(resp.usage) == "table" and resp.usage or {}
  return { id = message_id(resp.id), type = "message", role = "assistant", model = resp.model or model,
           content = #content > 0 and content or json.empty_array,
           stop_reason = STOP_REASONS[choice.finish_reason] or "end_turn", stop_sequence = json.null,
           usage = { input_tokens = usage.prompt_tokens or 0, output_tokens = usage.completion_tokens or 0 } }
end

-- The stream of OpenAI chunks s, as Messages events. Like Anthropic's, message_start
-- carries the input tokens and message_delta the final counts. An Anthropic upstream
-- reports its input tokens before any content; an OpenAI one only in its last chunk,
-- so message_start has the router's estimate then. message_delta has what the router
-- charged and recorded: the upstream's counts, or its estimate if it sent none.
local function stream_reply(res, s, model)
  local function event(name, data)
    data.type = name
    return res:sse{ event = name, data = assert(json.encode(data)) }
  end
  local started, block, index, tools = false, nil, -1, {}
  local stop = "end_turn"
  local function start(id)
    started = true
    local input = s:usage()
    return event("message_start", { message = { id = message_id(id), type = "message",
      role = "assistant", model = model, content = json.empty_array, stop_reason = json.null,
      stop_sequence = json.null, usage = { input_tokens = input, output_tokens = 0 } } })
  end
  local function close_block()
    if block then
      block = nil
      return event("content_block_stop", { index = index })
    end
    return true
  end
  -- Opens a block of kind ("text" or the tool call's index) unless it is open.
  local function open(kind, content_block)
    if block == kind then return true end
    if not close_block() then return nil end
    block, index = kind, index + 1
    return event("content_block_start", { index = index, content_block = content_block })
  end
  while true do
    local chunk, err = s:read()
    if not chunk then
      if err then
        if not started then start() end
        event("error", { error = { type = "api_error", message = (tostring(err):gsub("^E%u+: ", "")) } })
        return res:finish()
      end
      break
    end
    if not started and not start(chunk.id) then return s:close() end
    local ok = true
    for _, c in ipairs(type(chunk.choices) == "table" and chunk.choices or {}) do
      local d = type(c.delta) == "table" and c.delta or {}
      if type(d.content) == "string" and d.content ~= "" and ok then
        ok = open("text", { type = "text", text = "" })
             and event("content_block_delta", { index = index, delta = { type = "text_delta", text = d.content } })
      end
      for _, tc in ipairs(type(d.tool_calls) == "table" and d.tool_calls or {}) do
        local fn = tc["function"] or {}
        local key = tc.index or 0
        if ok and not tools[key] then
          tools[key] = true
          ok = open(key, { type = "tool_use", id = tc.id, name = fn.name, input = {} })
        end
        if ok and type(fn.arguments) == "string" and fn.arguments ~= "" then
          ok = event("content_block_delta", { index = index,
                                              delta = { type = "input_json_delta", partial_json = fn.arguments } })
        end
      end
      if c.finish_reason ~= nil and c.finish_reason ~= json.null then
        stop = STOP_REASONS[c.finish_reason] or "end_turn"
      end
    end
    if not ok then return s:close() end
  end
  if not started then start() end
  local input, output = s:usage()
  local _ = close_block()
    and event("message_delta", { delta = { stop_reason = stop, stop_sequence = json.null },
                                 usage = { input_tokens = input, output_tokens = output } })
    and event("message_stop", {})
  return res:finish()
end

local STATUS = { EINVAL = 400, EALIAS = 404, EBUDGET = 402, ENOCONFIG = 503, EUNAVAILABLE = 529,
                 ETIMEDOUT = 504 }

function M.handle(req, res, opts)
  local body, derr = json.decode(req.body)
  if not body then return send_error(res, 400, "the request body is not valid JSON: " .. derr) end
  local request, err = M.to_openai(body)
  if not request then return send_error(res, 400, err) end
  local out, cerr, code = router.chat(request, { team = opts.team, run = opts.run })
  if not out then
    local status = STATUS[code] or 502
    local upstream = code == "EUPSTREAM" and tonumber(tostring(cerr):match("HTTP (4%d%d):"))
    return send_error(res, upstream or status, (tostring(cerr):gsub("^E%u+: ", "")))
  end
  if request.stream then return stream_reply(res, out, request.model) end
  return res:json(200, M.from_openai(out, request.model))
end

-- POST /v1/messages/count_tokens: what Claude Code asks before a long request. The
-- providers behind the router have no common token counter, so this is the router's
-- own estimate (a token per 4 bytes of the translated request, an image at most
-- 1,600, as its budget reservations count), not a tokenizer's exact figure.
function M.count_tokens(req, res)
  local body, derr = json.decode(req.body)
  if not body then return send_error(res, 400, "the request body is not valid JSON: " .. derr) end
  body.max_tokens = body.max_tokens or 1
  local request, err = M.to_openai(body)
  if not request then return send_error(res, 400, err) end
  request.max_tokens, request.stream = nil, nil
  return res:json(200, { input_tokens = math.ceil(router.prompt_tokens(json.encode(request.messages))) })
end

return M
