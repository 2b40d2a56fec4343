-- factory.serve_responses: the OpenAI Responses endpoint of `factory serve`
-- (POST /v1/responses), the only wire protocol current Codex speaks, so that Codex
-- (a model provider with base_url = the proxy's /v1) and the SDKs' responses.create
-- go through the router like any other call. A request is translated to the
-- router's chat form, routed (aliases, fallbacks, budgets, records), and the answer
-- translated back: a response object, or the Responses event stream
-- (response.created, response.in_progress, response.output_item.added,
-- response.content_part.added, response.output_text.delta / .done,
-- response.function_call_arguments.delta / .done, response.content_part.done,
-- response.output_item.done, then response.completed, response.incomplete when the
-- output limit cut it, or response.failed when the stream fails midway).
--
-- Translated: instructions and developer/system messages (as system messages), user
-- and assistant messages (text, images), function tools and calls with their
-- outputs, custom (free-form) tools as functions taking { input = text } and their
-- calls back as custom_tool_call items, tool_choice, parallel_tool_calls,
-- max_output_tokens, temperature, top_p, a JSON text format, and usage. Dropped:
-- reasoning items and options (the chat form has no place for them), and the tools
-- a provider runs itself (web search, file search...) or that name other tools
-- (namespaces): a chat model cannot call them. Refused (400): previous_response_id
-- (this proxy keeps no responses: send the conversation, as store = false clients
-- do), an input item or content part it cannot pass on (a file).
--
--   responses.handle(req, res, opts)   opts: { team =, run = } (the proxy's choice),
--       router_error = fn(res, err, code): the answer to a call the router refused (the
--       proxy's, shared with its chat endpoint)
--   responses.to_openai(request) -> chat request table, custom tool names | nil, message
--   responses.from_openai(chat response, model, custom) -> Responses response table
-- Errors have OpenAI's shape: {"error":{"message":...,"type":...,"param":...,"code":...}}.
local router = require "factory.router"
local json = require "factory.json"
local time = require "factory.core.time"

local M = {}

local function send_error(res, status, message, param)
  return res:json(status, { error = { message = message, type = "invalid_request_error", param = param or json.null,
                                      code = json.null } })
end

local TEXT_PARTS = { input_text = true, output_text = true, text = true, refusal = true }
-- Items a client sends back from earlier turns that the chat form has no place for.
local DROPPED_ITEMS = { reasoning = true, web_search_call = true, file_search_call = true, compaction = true }

-- A message item's content as chat content: a string, or parts when it has images.
local function content_of(content, where)
  if type(content) == "string" then return content end
  if type(content) ~= "table" then return nil, where .. ".content: a string or a list of parts is required" end
  local parts, texts, images = {}, {}, false
  for i, p in ipairs(content) do
    if type(p) ~= "table" then return nil, ("%s.content.%d: parts must be objects"):format(where, i - 1) end
    if TEXT_PARTS[p.type] then
      local text = p.text or p.refusal
      if type(text) == "string" then
        parts[#parts + 1] = { type = "text", text = text }
        texts[#texts + 1] = text
      end
    elseif p.type == "input_image" then
      local url = type(p.image_url) == "table" and p.image_url.url or p.image_url
      if type(url) ~= "string" then
        return nil, ("%s.content.%d: an input_image needs an image_url (a file_id cannot be passed on)"):format(where,
          i - 1)
      end
      parts[#parts + 1] = { type = "image_url", image_url = { url = url, detail = p.detail } }
      images = true
    else
      return nil, ("%s.content.%d: a %s part is not supported here (the proxy passes text and images)"):format(where,
        i - 1, type(p.type) == "string" and ("%q"):format(p.type) or "typeless")
    end
  end
  if images then return parts end
  return table.concat(texts, "\n\n")
end

local function output_text(output)
  if type(output) == "string" then return output end
  if type(output) == "table" then
    local texts = {}
    for _, p in ipairs(output) do
      if type(p) == "table" and type(p.text) == "string" then texts[#texts + 1] = p.text end
    end
    return table.concat(texts, "\n\n")
  end
  return json.encode(output) or ""
end

-- The chat message a tool call joins: the assistant message just before, unless a
-- tool's output or another turn came after it.
local function call_holder(msgs)
  local last = msgs[#msgs]
  if last and last.role == "assistant" then return last end
  last = { role = "assistant", content = json.null }
  msgs[#msgs + 1] = last
  return last
end

local function add_item(msgs, item, i)
  local where = ("input.%d"):format(i - 1)
  if type(item) ~= "table" then return nil, where .. ": items must be objects" end
  local kind = item.type or (item.role and "message")
  if kind == "message" then
    local role = item.role
    if role == "developer" then role = "system" end
    if role ~= "system" and role ~= "user" and role ~= "assistant" then
      return nil, where .. ': role must be "user", "assistant", "system" or "developer"'
    end
    local content, err = content_of(item.content, where)
    if content == nil then return nil, err end
    msgs[#msgs + 1] = { role = role, content = content }
  elseif kind == "function_call" or kind == "custom_tool_call" then
    if type(item.call_id) ~= "string" or type(item.name) ~= "string" then
      return nil, where .. ": a " .. kind .. " needs call_id and name"
    end
    local arguments = kind == "function_call" and item.arguments or json.encode{ input = tostring(item.input or "") }
    local holder = call_holder(msgs)
    holder.tool_calls = holder.tool_calls or {}
    holder.tool_calls[#holder.tool_calls + 1] = { id = item.call_id, type = "function",
                                                  ["function"] = { name = item.name, arguments = arguments or "{}" } }
  elseif kind == "function_call_output" or kind == "custom_tool_call_output" then
    if type(item.call_id) ~= "string" then return nil, where .. ": a " .. kind .. " needs call_id" end
    msgs[#msgs + 1] = { role = "tool", tool_call_id = item.call_id, content = output_text(item.output) }
  elseif not DROPPED_ITEMS[kind] then
    return nil, ("%s: a %s item is not supported here (the proxy passes messages, function and custom tool calls and"
      .. " their outputs)"):format(where, type(kind) == "string" and ("%q"):format(kind) or "typeless")
  end
  return true
end

-- Tools as chat functions; a custom tool takes its free-form text as { input }.
local function tools_of(list)
  local out, custom = {}, {}
  for _, t in ipairs(type(list) == "table" and list or {}) do
    if type(t) == "table" and t.type == "function" and type(t.name) == "string" then
      out[#out + 1] = { type = "function", ["function"] = { name = t.name, description = t.description,
                                                            parameters = t.parameters,
                                                            strict = t.strict == true or nil } }
    elseif type(t) == "table" and t.type == "custom" and type(t.name) == "string" then
      custom[t.name] = true
      local format = type(t.format) == "table" and type(t.format.definition) == "string"
        and ("\n\nThe input follows this grammar:\n" .. t.format.definition) or ""
      out[#out + 1] = { type = "function", ["function"] = { name = t.name,
        description = (t.description or "") .. format,
        parameters = { type = "object", properties = { input = { type = "string",
          description = "the tool's free-form input" } }, required = { "input" } } } }
    end
  end
  return out, custom
end

local function tool_choice(tc)
  if type(tc) == "string" then return tc end
  if type(tc) == "table" and (tc.type == "function" or tc.type == "custom") and type(tc.name) == "string" then
    return { type = "function", ["function"] = { name = tc.name } }
  end
end

local function response_format(text)
  local f = type(text) == "table" and type(text.format) == "table" and text.format
  if not f then return nil end
  if f.type == "json_schema" then
    return { type = "json_schema", json_schema = { name = f.name or "response", schema = f.schema, strict = f.strict } }
  elseif f.type == "json_object" then
    return { type = "json_object" }
  end
end

-- A number a client set; null (what some clients send for "unset") is left out.
local function number(v) return type(v) == "number" and v or nil end

function M.to_openai(r)
  if type(r) ~= "table" then return nil, "the request must be a JSON object" end
  if type(r.model) ~= "string" or r.model == "" then return nil, "model: a model name is required", "model" end
  if r.previous_response_id ~= nil and r.previous_response_id ~= json.null then
    return nil, "previous_response_id: this proxy keeps no responses; send the whole conversation in input"
      .. " (store: false)", "previous_response_id"
  end
  local msgs = {}
  if type(r.instructions) == "string" and r.instructions ~= "" then
    msgs[1] = { role = "system", content = r.instructions }
  end
  if type(r.input) == "string" then
    msgs[#msgs + 1] = { role = "user", content = r.input }
  elseif type(r.input) == "table" then
    for i, item in ipairs(r.input) do
      local ok, err = add_item(msgs, item, i)
      if not ok then return nil, err, "input" end
    end
  else
    return nil, "input: a string or a list of items is required", "input"
  end
  local out = { model = r.model, messages = msgs, max_tokens = number(r.max_output_tokens),
                temperature = number(r.temperature), top_p = number(r.top_p), response_format = response_format(r.text) }
  local tools, custom = tools_of(r.tools)
  if #tools > 0 then
    out.tools, out.tool_choice = tools, tool_choice(r.tool_choice)
    if r.parallel_tool_calls == false then out.parallel_tool_calls = false end
  end
  if r.stream then
    out.stream = true
    out.stream_options = { include_usage = true }
  end
  return out, custom
end

local function usage_of(input, output)
  return { input_tokens = input, output_tokens = output, total_tokens = input + output,
           input_tokens_details = { cached_tokens = 0 }, output_tokens_details = { reasoning_tokens = 0 } }
end

local function message_item(id, text, status)
  return { type = "message", id = id, status = status, role = "assistant",
           content = text and { { type = "output_text", text = text, annotations = json.empty_array } }
             or json.empty_array }
end

-- A chat tool call as a Responses output item (a custom tool's { input } unwrapped).
local function call_item(id, call_id, name, arguments, custom, status)
  if custom[name] then
    local args = json.decode(arguments or "")
    return { type = "custom_tool_call", id = id, call_id = call_id, name = name, status = status,
             input = type(args) == "table" and type(args.input) == "string" and args.input or (arguments or "") }
  end
  return { type = "function_call", id = id, call_id = call_id, name = name, arguments = arguments or "",
           status = status }
end

local function response_of(id, model, created, status, output, usage, cut)
  return { id = id, object = "response", created_at = created, status = status, model = model,
           output = #output > 0 and output or json.empty_array, usage = usage or json.null,
           error = json.null, incomplete_details = cut and { reason = "max_output_tokens" } or json.null,
           parallel_tool_calls = true }
end

function M.from_openai(resp, model, custom)
  custom = custom or {}
  local choice = type(resp.choices) == "table" and resp.choices[1] or {}
  local msg = type(choice.message) == "table" and choice.message or {}
  local rid = "resp_" .. tostring(resp.id or "")
  local output = {}
  if type(msg.content) == "string" and msg.content ~= "" then
    output[1] = message_item("msg_" .. tostring(resp.id or ""), msg.content, "completed")
  end
  for i, tc in ipairs(type(msg.tool_calls) == "table" and msg.tool_calls or {}) do
    local fn = type(tc["function"]) == "table" and tc["function"] or {}
    output[#output + 1] = call_item(("fc_%s_%d"):format(tostring(resp.id or ""), i), tc.id, fn.name, fn.arguments,
                                    custom, "completed")
  end
  local usage = type(resp.usage) == "table" and resp.usage or {}
  local cut = choice.finish_reason == "length"
  return response_of(rid, resp.model or model, resp.created or math.floor(time.now()),
                     cut and "incomplete" or "completed", output,
                     usage_of(usage.prompt_tokens or 0, usage.completion_tokens or 0), cut)
end

-- The stream of chat chunks s as Responses events. Output items are opened as their
-- first delta arrives and closed (with their whole text or arguments) when the next
-- one opens or the stream ends; a custom tool's call is sent whole at its end, its
-- input being known only then.
local function stream_reply(res, s, model, custom)
  local seq = -1
  local function event(name, data)
    seq = seq + 1
    data.type, data.sequence_number = name, seq
    return res:sse{ event = name, data = assert(json.encode(data)) }
  end
  local created = math.floor(time.now())
  local rid, base = nil, nil
  local output, open, cut = {}, nil, false
  local function start(id)
    base = tostring(id or ("proxy" .. created))
    rid = "resp_" .. base
    local r = response_of(rid, model, created, "in_progress", {}, nil, false)
    return event("response.created", { response = r }) and event("response.in_progress", { response = r })
  end
  local function close()
    if not open then return true end
    local o = open
    open = nil
    local idx = o.index
    if o.kind == "text" then
      local item = message_item(o.id, o.text, "completed")
      output[idx + 1] = item
      local part = item.content[1]
      return event("response.output_text.done", { item_id = o.id, output_index = idx, content_index = 0,
                                                  text = o.text })
        and event("response.content_part.done", { item_id = o.id, output_index = idx, content_index = 0, part = part })
        and event("response.output_item.done", { output_index = idx, item = item })
    end
    local item = call_item(o.id, o.call_id, o.name, o.arguments, custom, "completed")
    output[idx + 1] = item
    if custom[o.name] then
      return event("response.output_item.added", { output_index = idx, item = item })
        and event("response.output_item.done", { output_index = idx, item = item })
    end
    return event("response.function_call_arguments.done", { item_id = o.id, output_index = idx,
                                                            arguments = o.arguments })
      and event("response.output_item.done", { output_index = idx, item = item })
  end
  local function open_text()
    if open and open.kind == "text" then return true end
    if not close() then return nil end
    open = { kind = "text", index = #output, id = ("msg_%s_%d"):format(base, #output), text = "" }
    output[#output + 1] = false
    return event("response.output_item.added", { output_index = open.index,
                                                 item = message_item(open.id, nil, "in_progress") })
      and event("response.content_part.added", { item_id = open.id, output_index = open.index, content_index = 0,
                                                 part = { type = "output_text", text = "",
                                                          annotations = json.empty_array } })
  end
  local function open_call(key, tc)
    if open and open.kind == "call" and open.key == key then return true end
    if not close() then return nil end
    local fn = type(tc["function"]) == "table" and tc["function"] or {}
    open = { kind = "call", key = key, index = #output, id = ("fc_%s_%d"):format(base, #output),
             call_id = tc.id, name = fn.name, arguments = "" }
    output[#output + 1] = false
    if custom[open.name] then return true end
    return event("response.output_item.added", { output_index = open.index,
      item = call_item(open.id, open.call_id, open.name, "", custom, "in_progress") })
  end
  while true do
    local chunk, err = s:read()
    if not chunk then
      if err then
        if not rid and not start() then return s:close() end
        local r = response_of(rid, model, created, "failed", {}, nil, false)
        r.error = { code = "server_error", message = (tostring(err):gsub("^E%u+: ", "")) }
        event("response.failed", { response = r })
        return res:finish()
      end
      break
    end
    if not rid and not start(chunk.id) then return s:close() end
    local ok = true
    for _, c in ipairs(type(chunk.choices) == "table" and chunk.choices or {}) do
      local d = type(c.delta) == "table" and c.delta or {}
      if ok and type(d.content) == "string" and d.content ~= "" then
        ok = open_text()
        if ok then
          open.text = open.text .. d.content
          ok = event("response.output_text.delta", { item_id = open.id, output_index = open.index, content_index = 0,
                                                     delta = d.content })
        end
      end
      for _, tc in ipairs(type(d.tool_calls) == "table" and d.tool_calls or {}) do
        local fn = type(tc["function"]) == "table" and tc["function"] or {}
        ok = ok and open_call(tc.index or 0, tc)
        if ok and type(fn.arguments) == "string" and fn.arguments ~= "" then
          open.arguments = open.arguments .. fn.arguments
          if not custom[open.name] then
            ok = event("response.function_call_arguments.delta", { item_id = open.id, output_index = open.index,
                                                                   delta = fn.arguments })
          end
        end
      end
      if c.finish_reason == "length" then cut = true end
    end
    if not ok then return s:close() end
  end
  if not rid and not start() then return res:finish() end
  if not close() then return res:finish() end
  local input, out_tokens = s:usage()
  local done = {}
  for _, item in ipairs(output) do if item then done[#done + 1] = item end end
  local r = response_of(rid, model, created, cut and "incomplete" or "completed", done, usage_of(input, out_tokens),
                        cut)
  event(cut and "response.incomplete" or "response.completed", { response = r })
  return res:finish()
end

function M.handle(req, res, opts)
  local body, derr = json.decode(req.body)
  if not body then return send_error(res, 400, "the request body is not valid JSON: " .. tostring(derr)) end
  local request, custom, param = M.to_openai(body)
  if not request then return send_error(res, 400, custom, param) end
  local out, cerr, code = router.chat(request, { team = opts.team, run = opts.run })
  if not out then return opts.router_error(res, cerr, code) end
  if request.stream then return stream_reply(res, out, request.model, custom) end
  return res:json(200, M.from_openai(out, request.model, custom))
end

return M
