-- factory serve: the OpenAI-compatible proxy (factory.serve) in front of the fake
-- model server (tests/tools/fake_model.lua), both in this process; the official
-- openai npm SDK (tests/npm) and raw clients (tests/tools/raw_http.py) from outside.
local serve = require "factory.serve"
local router = require "factory.router"
local http = require "factory.http"
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local json = require "factory.json"
local time = require "factory.core.time"
local log = require "factory.log"
local db = require "factory.db"
local fs = require "factory.core.fs"
local backends = require "tests.tools.backends"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local TESTS = HERE .. "../../"
local fake_model = dofile(TESTS .. "tools/fake_model.lua")
local BIN = arg and arg[-1] or "./factory"

local fake, srv, cfg_path, base

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function start(extra_cfg, opts)
  cfg_path = os.tmpname()
  write(cfg_path, ([[
providers {
  up = { base_url = "%s/v1", api_key = "sk-upstream-secret-1" },
  anthropic = { base_url = "%s", api_key = "ak-upstream-secret-2" },
}
models { ["factory/coder"] = { "up/gpt-test" }, ["factory/claude"] = { "anthropic/claude-test" } }
limits { retries = 1, backoff = 0.01 }
%s
]]):format(fake:url(), fake:url(), extra_cfg or ""))
  local o = { port = 0, config = cfg_path }
  for k, v in pairs(opts or {}) do o[k] = v end
  srv = assert(serve.start(o))
  base = srv:url()
end

before_each(function()
  fake = assert(fake_model.start())
end)

after_each(function()
  if srv then srv:close() end
  srv = nil
  fake:close()
  if cfg_path then os.remove(cfg_path) end
end)

local function post(path, body, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return assert(http.request{ method = "POST", url = base .. path, body = body, headers = h, timeout = 10 })
end

local function chat_body(model, extra)
  local t = { model = model, messages = { { role = "user", content = "Say hello" } } }
  for k, v in pairs(extra or {}) do t[k] = v end
  return json.encode(t)
end

-- A team with 5 USD a day, whose key is sk-team-poor; each output token costs 1 USD.
local POOR_TEAM = [[
keys { ["sk-team-poor"] = { team = "poor" } }
prices { ["up/gpt-test"] = { input = 0, output = 1000000 } }
budgets { teams = { poor = { usd_per_day = 5 } } }
]]

local function openai_error(res, status)
  assert.equal(status, res.status, res.body)
  local doc = assert(json.decode(res.body))
  assert.truthy(type(doc.error) == "table" and type(doc.error.message) == "string", res.body)
  assert.truthy(type(doc.error.type) == "string", res.body)
  return doc.error
end

describe("factory serve", function()
  it("proxies chat, streamed chat, embeddings and lists models", function()
    start()
    local res = post("/v1/chat/completions", chat_body("factory/coder"))
    assert.equal(200, res.status)
    assert.equal("Hello from the fake.", json.decode(res.body).choices[1].message.content)
    res = post("/v1/chat/completions", chat_body("factory/claude", { stream = true }))
    assert.equal(200, res.status)
    assert.matches("^text/event%-stream", res.headers["content-type"])
    assert.contains('"content":"Hello "', res.body)
    assert.matches("data: %[DONE%]\n\n$", res.body)
    res = post("/v1/embeddings", json.encode({ model = "factory/coder", input = "x" }))
    assert.equal(200, res.status)
    assert.equal(1, #json.decode(res.body).data)
    res = assert(http.get(base .. "/v1/models"))
    local ids = {}
    for _, m in ipairs(json.decode(res.body).data) do ids[#ids + 1] = m.id end
    table.sort(ids)
    assert.same({ "factory/claude", "factory/coder" }, ids)
  end)

  it("answers bad requests with OpenAI-shaped 4xx errors and keeps serving", function()
    start(nil, { max_body_bytes = 1048576, header_timeout = 0.5 })
    -- A slowloris client holds a connection open while the others are served.
    local slow = fiber.spawn(function()
      local spec = { port = srv:port(), steps = { { send = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" },
                                                 { sleep = 0.3 }, { send = "X-A: 1\r\n" }, { read = 3, want = "\r\n\r\n" } } }
      local r = assert(proc.run{ argv = { "python3", TESTS .. "tools/raw_http.py", json.encode(spec) }, timeout = 10 })
      local out = json.decode(r.stdout)
      local parts = {}
      for i, c in ipairs(out.chunks) do parts[i] = c[2] end
      return table.concat(parts)
    end)
    local cases = {
      { body = "{not json", status = 400, code = "einval" },
      { body = json.encode({ messages = { { role = "user", content = "x" } } }), status = 400 },
      { body = chat_body("factory/nope"), status = 404, code = "model_not_found" },
      { body = ("x"):rep(2 * 1024 * 1024), status = 413 },
    }
    -- JSON a lax reader would take is refused too.
    local head = '{"model":"factory/coder","messages":[{"role":"user","content":"x"}]'
    for _, body in ipairs({ head .. ",}", '{"model" "factory/coder"}', head .. "} {}", "{} {}", head .. ',"n":01}',
                            head .. ',"stream":tru}', head .. ',"x":"unterminated}',
                            head .. ',"x":' .. ("["):rep(300) .. ("]"):rep(300) .. "}" }) do
      cases[#cases + 1] = { body = body, status = 400, code = "einval" }
    end
    for _, c in ipairs(cases) do
      local err = openai_error(post("/v1/chat/completions", c.body), c.status)
      if c.code then assert.equal(c.code, err.code) end
      -- and the next well-formed request is served
      assert.equal(200, post("/v1/chat/completions", chat_body("factory/coder")).status)
    end
    local ok, text = fiber.join(slow, 10)
    assert.truthy(ok)
    assert.matches("^HTTP/1.1 408 ", text)
    assert.contains('"error"', text)
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/coder")).status)
  end)

  it("maps upstream failures to OpenAI errors", function()
    start()
    fake:script{ { status = 400, message = "context too long" } }
    local err = openai_error(post("/v1/chat/completions", chat_body("factory/coder")), 400)
    assert.contains("context too long", err.message)
    fake:script{ { status = 503 }, { status = 503 } }
    openai_error(post("/v1/chat/completions", chat_body("factory/coder")), 502)
    -- An upstream 404 stays a 404, and says where the request went; one about the model needs no hint.
    fake:script{ { status = 404, message = "Not Found" } }
    err = openai_error(post("/v1/chat/completions", chat_body("factory/coder")), 404)
    assert.contains("Not Found (the request went to /v1/chat/completions: is providers.up.base_url right?)",
      err.message)
    fake:script{ { status = 404, message = "The model `gpt-test` does not exist" } }
    err = openai_error(post("/v1/chat/completions", chat_body("factory/coder")), 404)
    assert.equal("up/gpt-test: HTTP 404: The model `gpt-test` does not exist", err.message)
  end)

  it("takes request bodies up to 32 MiB by default, as the Anthropic API does", function()
    start()
    openai_error(post("/v1/chat/completions", ("x"):rep(20 * 1024 * 1024)), 400)
    openai_error(post("/v1/chat/completions", ("x"):rep(33 * 1024 * 1024)), 413)
  end)

  it("holds virtual keys to their team's budget", function()
    start([[
keys { ["sk-team-rich"] = { team = "rich" }, ["sk-team-poor"] = { team = "poor" } }
prices { ["up/gpt-test"] = { input = 0, output = 1000000 } }
budgets { teams = { poor = { usd_per_day = 5 } } }
]])
    local body = chat_body("factory/coder", { max_tokens = 10 })
    openai_error(post("/v1/chat/completions", body, { Authorization = "Bearer sk-wrong" }), 401)
    assert.equal(200, post("/v1/chat/completions", body, { Authorization = "Bearer sk-team-rich" }).status)
    local err = openai_error(post("/v1/chat/completions", body, { Authorization = "Bearer sk-team-poor" }), 402)
    assert.equal("budget_exhausted", err.code)
    assert.equal("insufficient_quota", err.type)
    assert.contains("team poor", err.message)
    assert.equal(1, fake:count())
    -- Naming a model of the provider without a price does not get around the budget.
    err = openai_error(post("/v1/chat/completions", chat_body("up/unpriced", { max_tokens = 10 }),
                            { Authorization = "Bearer sk-team-poor" }), 402)
    assert.equal("budget_exhausted", err.code)
    assert.contains("team poor is limited in USD and up/unpriced has no price", err.message)
    assert.equal(200, post("/v1/chat/completions", chat_body("up/gpt-test", { max_tokens = 1 }),
                           { Authorization = "Bearer sk-team-rich" }).status)
    assert.equal(2, fake:count())
  end)

  it("lets virtual keys and the operator's token in beyond loopback, and nothing else", function()
    local keys = [[keys { ["sk-team-a"] = { team = "a" }, ["sk-team-b"] = { team = "b" } }]]
    start(keys, { host = "0.0.0.0", token = "sk-operator" })
    base = ("http://127.0.0.1:%d"):format(srv:port())
    local team
    local unsubscribe = router.on_call(function(r) team = r.team end)
    for _, case in ipairs{
      { key = "sk-team-a", team = "a" }, { key = "sk-team-b", team = "b" },
      { key = "sk-operator", team = "ops", header = "ops" }, { key = "sk-team-c" }, {},
    } do
      local res = post("/v1/chat/completions", chat_body("factory/coder"),
                       { Authorization = case.key and "Bearer " .. case.key, ["X-Factory-Team"] = case.header })
      if case.team then
        assert.equal(200, res.status, res.body)
        assert.equal(case.team, team)
      else
        openai_error(res, 401)
      end
    end
    unsubscribe()
    srv:close()
    os.remove(cfg_path)
    -- The keys alone are enough to bind beyond loopback; without any, it is refused.
    start(keys, { host = "0.0.0.0" })
    srv:close()
    srv = nil
    write(cfg_path, "providers {}")
    local none, _, code = serve.start{ host = "0.0.0.0", port = 0, config = cfg_path }
    assert.is_nil(none)
    assert.equal("EACCES", code)
  end)

  it("reports a bad factory.lua at its line, and stops one that runs away", function()
    for _, case in ipairs{
      { src = 'providers { up = { base_url = "http://x" } }\n\nmodels { m = { "nope/x" } }', err = ":3: models%[\"m\"%]: unknown provider" },
      { src = 'keys { [""] = { team = "a" } }', err = ":1: keys: expected" },
      { src = 'providers {}\nlocal f = io.open("/etc/passwd")', err = ":2: undefined global 'io'" },
      { src = 'providers {}\nwhile true do end', err = ":2: still running after" },
    } do
      cfg_path = os.tmpname()
      write(cfg_path, case.src)
      local none, err, code = serve.start{ port = 0, config = cfg_path }
      os.remove(cfg_path)
      assert.is_nil(none)
      assert.equal("EINVAL", code)
      assert.matches(case.err, err)
    end
  end)

  it("reloads an edited factory.lua while serving; a broken edit keeps the last good one", function()
    local logged = {}
    log.set_console({ write = function(_, ...) logged[#logged + 1] = table.concat({ ... }) end })
    start([[keys { ["sk-one"] = { team = "one" } }]])
    local one, two = { Authorization = "Bearer sk-one" }, { Authorization = "Bearer sk-two" }
    local team
    local unsubscribe = router.on_call(function(r) team = r.team end)
    local function models(headers)
      local res = assert(http.request{ url = base .. "/v1/models", headers = headers, timeout = 5 })
      if res.status ~= 200 then return nil end
      local ids = {}
      for _, m in ipairs(json.decode(res.body).data) do ids[#ids + 1] = m.id end
      table.sort(ids)
      return table.concat(ids, " ")
    end
    local function eventually(what, fn)
      local deadline = time.monotonic() + 5
      while not fn() do
        if time.monotonic() > deadline then error("never happened: " .. what, 2) end
        fiber.sleep(0.02)
      end
    end
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/coder"), one).status)
    -- A new model alias and provider, and a key that replaces the old one.
    write(cfg_path, ([[
providers { up = { base_url = "%s/v1", api_key = "sk-upstream-secret-1" },
            other = { base_url = "%s/v1", api_key = "sk-other" } }
models { ["factory/coder"] = { "up/gpt-test" }, ["factory/fast"] = { "other/gpt-fast" } }
keys { ["sk-two"] = { team = "two" } }
]]):format(fake:url(), fake:url()))
    eventually("the new models are served", function() return models(two) == "factory/coder factory/fast" end)
    openai_error(post("/v1/chat/completions", chat_body("factory/coder"), one), 401)
    local res = post("/v1/chat/completions", chat_body("factory/fast"), two)
    assert.equal(200, res.status, res.body)
    assert.equal("gpt-fast", json.decode(fake:requests()[#fake:requests()].body).model)
    assert.equal("two", team)
    -- A broken edit is reported at its line and changes nothing.
    write(cfg_path, ('providers { up = { base_url = "%s/v1" } }\n\nmodels { m = { "nope/x" } }\n'):format(fake:url()))
    eventually("the rejection is logged", function() return table.concat(logged):find("reload rejected", 1, true) end)
    assert.contains(cfg_path .. ":3: models[\"m\"]: unknown provider", table.concat(logged))
    assert.equal("factory/coder factory/fast", models(two))
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/fast"), two).status)
    -- So is one the router refuses.
    logged = {}
    write(cfg_path, ([[
providers { up = { base_url = "%s/v1", api_key = "sk-up" } }
models { ["factory/coder"] = { "up/gpt-test" } }
budgets { utc_offset = 99 }
]]):format(fake:url()))
    eventually("the rejection is logged", function() return table.concat(logged):find("reload rejected", 1, true) end)
    assert.contains("utc_offset", table.concat(logged))
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/fast"), two).status)
    -- Without keys, the proxy is open again (on loopback).
    write(cfg_path, ('providers { up = { base_url = "%s/v1" } }\nmodels { ["factory/coder"] = { "up/gpt-test" } }\n')
      :format(fake:url()))
    eventually("the keys are gone", function() return models() == "factory/coder" end)
    unsubscribe()
    log.set_console(nil)
    for _, line in ipairs(logged) do assert.falsy(line:find("secret", 1, true), line) end
  end)

  -- The events of a Server-Sent Events body: { { event =, data = decoded }, ... }.
  local function sse_events(body)
    local out = {}
    for block in body:gmatch("(.-)\n\n") do
      local name, data = block:match("^event: ([^\n]*)\ndata: (.*)$")
      out[#out + 1] = { event = name, data = json.decode(data) }
    end
    return out
  end

  local function anthropic_error(res, status, type_)
    assert.equal(status, res.status, res.body)
    local doc = assert(json.decode(res.body))
    assert.equal("error", doc.type, res.body)
    if type_ then assert.equal(type_, doc.error.type, res.body) end
    assert.truthy(type(doc.error.message) == "string", res.body)
    return doc.error
  end

  it("answers /v1/messages/count_tokens with an estimate, without calling a model", function()
    start([[keys { ["sk-team-ant"] = { team = "ant" } }]])
    local key = { ["x-api-key"] = "sk-team-ant", ["anthropic-version"] = "2023-06-01" }
    local short = post("/v1/messages/count_tokens", json.encode({ model = "factory/coder",
      messages = { { role = "user", content = "Say hello" } } }), key)
    assert.equal(200, short.status, short.body)
    local long = post("/v1/messages/count_tokens", json.encode({ model = "factory/coder", system = "Be brief.",
      messages = { { role = "user", content = ("many words "):rep(400) } } }), key)
    local a, b = json.decode(short.body).input_tokens, json.decode(long.body).input_tokens
    assert.truthy(a > 0 and b > 1000, a .. " " .. b)
    -- An image counts as what providers bill it (1,600 at most), not as its base64 bytes.
    local image = post("/v1/messages/count_tokens", json.encode({ model = "factory/coder", messages = { { role = "user",
      content = { { type = "image", source = { type = "base64", media_type = "image/png", data = ("A"):rep(400000) } },
                  { type = "text", text = "What is this?" } } } } }), key)
    local c = json.decode(image.body).input_tokens
    assert.truthy(c > 1600 and c < 1700, c)
    assert.equal(0, fake:count())
    local bad = post("/v1/messages/count_tokens", "{not json", key)
    assert.equal(400, bad.status)
    assert.equal("invalid_request_error", json.decode(bad.body).error.type)
    assert.equal(401, post("/v1/messages/count_tokens", "{}", {}).status)
  end)

  it("serves Anthropic's Messages API: text, system, tools, both upstream formats", function()
    start([[keys { ["sk-team-ant"] = { team = "ant" } }]])
    local team
    local unsubscribe = router.on_call(function(r) team = r.team end)
    local key = { ["x-api-key"] = "sk-team-ant", ["anthropic-version"] = "2023-06-01" }
    local tools = { { name = "get_weather", description = "The weather", input_schema = { type = "object",
                      properties = { city = { type = "string" } }, required = { "city" } } } }
    for _, model in ipairs({ "factory/coder", "factory/claude" }) do
      fake:reset()
      local res = post("/v1/messages", json.encode({ model = model, max_tokens = 100, system = "Be brief.",
        messages = { { role = "user", content = { { type = "text", text = "Say hello" } } } } }), key)
      assert.equal(200, res.status, res.body)
      local msg = json.decode(res.body)
      assert.same({ "message", "assistant", "end_turn" }, { msg.type, msg.role, msg.stop_reason }, model)
      -- An Anthropic upstream's message id is passed on as it is, a chat id prefixed.
      assert.matches("^msg_", msg.id)
      assert.is_nil(msg.id:find("^msg_msg_"), msg.id)
      assert.same({ { type = "text", text = "Hello from the fake." } }, msg.content)
      assert.truthy(msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, model)
      assert.equal("ant", team)
      local sent = json.decode(fake:requests()[1].body)
      if model == "factory/coder" then
        assert.same({ role = "system", content = "Be brief." }, sent.messages[1])
      else
        assert.equal("Be brief.", sent.system)
      end
      -- Claude Code (2.1) also sends system messages among the turns.
      res = post("/v1/messages", json.encode({ model = model, max_tokens = 100, system = { { type = "text",
        text = "Be brief." } }, messages = { { role = "user", content = "Say hello" },
        { role = "system", content = "Agent types: claude, Explore." } } }), key)
      assert.equal(200, res.status, res.body)
      sent = json.decode(fake:requests()[2].body)
      if model == "factory/coder" then
        assert.same({ role = "system", content = "Agent types: claude, Explore." }, sent.messages[3])
      else
        assert.contains("Agent types: claude, Explore.", sent.system)
        assert.same({ "user" }, { sent.messages[1].role, sent.messages[2] and sent.messages[2].role })
      end
      -- A tool call, and its result sent back.
      fake:script{ { tool_calls = { { id = "call_1", name = "get_weather", arguments = '{"city":"Paris"}' } } },
                   { content = "Sunny." } }
      res = post("/v1/messages", json.encode({ model = model, max_tokens = 100, tools = tools,
        tool_choice = { type = "any", disable_parallel_tool_use = true }, messages = { { role = "user", content = "Weather in Paris?" } } }), key)
      msg = json.decode(res.body)
      assert.equal("tool_use", msg.stop_reason, res.body)
      assert.same({ type = "tool_use", id = "call_1", name = "get_weather", input = { city = "Paris" } }, msg.content[1])
      sent = json.decode(fake:requests()[3].body)
      if model == "factory/coder" then
        assert.equal("required", sent.tool_choice)
        assert.equal(false, sent.parallel_tool_calls)
        assert.equal("get_weather", sent.tools[1]["function"].name)
        assert.equal("object", sent.tools[1]["function"].parameters.type)
      else
        assert.same({ type = "any", disable_parallel_tool_use = true }, sent.tool_choice)
      end
      res = post("/v1/messages", json.encode({ model = model, max_tokens = 100, tools = tools, messages = {
        { role = "user", content = "Weather in Paris?" },
        { role = "assistant", content = msg.content },
        { role = "user", content = { { type = "tool_result", tool_use_id = "call_1", content = "sunny, 24C" } } } } }),
        key)
      assert.equal("Sunny.", json.decode(res.body).content[1].text, res.body)
      sent = json.decode(fake:requests()[4].body)
      if model == "factory/coder" then
        assert.equal("call_1", sent.messages[2].tool_calls[1].id)
        assert.same({ city = "Paris" }, json.decode(sent.messages[2].tool_calls[1]["function"].arguments))
        assert.same({ role = "tool", tool_call_id = "call_1", content = "sunny, 24C" }, sent.messages[3])
      else
        assert.same({ type = "tool_result", tool_use_id = "call_1", content = "sunny, 24C" }, sent.messages[3].content[1])
      end
    end
    unsubscribe()
  end)

  it("streams Anthropic's Messages events, tool use included", function()
    start()
    for _, model in ipairs({ "factory/coder", "factory/claude" }) do
      local res = post("/v1/messages", json.encode({ model = model, max_tokens = 100, stream = true,
        messages = { { role = "user", content = "Say hello" } } }))
      assert.equal(200, res.status, res.body)
      assert.matches("^text/event%-stream", res.headers["content-type"])
      local evs = sse_events(res.body)
      local names, text = {}, {}
      for i, ev in ipairs(evs) do
        assert.equal(ev.event, ev.data.type)
        if names[#names] ~= ev.event then names[#names + 1] = ev.event end
        if ev.event == "content_block_delta" then text[#text + 1] = ev.data.delta.text end
        if i == 1 then assert.equal("assistant", ev.data.message.role) end
      end
      assert.same({ "message_start", "content_block_start", "content_block_delta", "content_block_stop",
                    "message_delta", "message_stop" }, names, model)
      assert.equal("Hello from the fake.", table.concat(text))
      local delta = evs[#evs - 1].data
      assert.equal("end_turn", delta.delta.stop_reason)
      assert.truthy(delta.usage.output_tokens > 0, model)
      -- Text, then a tool call: two blocks, the second a tool_use with its input in pieces.
      fake:script{ { content = "Let me look.", tool_calls = { { id = "c9", name = "lookup", arguments = '{"q":"x"}' } } } }
      evs = sse_events(post("/v1/messages", json.encode({ model = model, max_tokens = 100, stream = true,
        tools = { { name = "lookup", input_schema = { type = "object" } } },
        messages = { { role = "user", content = "Find x" } } })).body)
      local starts, args = {}, {}
      for _, ev in ipairs(evs) do
        if ev.event == "content_block_start" then starts[#starts + 1] = ev.data end
        if ev.event == "content_block_delta" and ev.data.delta.type == "input_json_delta" then
          args[#args + 1] = ev.data.delta.partial_json
          assert.equal(1, ev.data.index)
        end
      end
      assert.equal(2, #starts, model)
      assert.same({ 0, "text" }, { starts[1].index, starts[1].content_block.type })
      assert.same({ 1, "tool_use", "c9", "lookup" }, { starts[2].index, starts[2].content_block.type,
                                                       starts[2].content_block.id, starts[2].content_block.name })
      assert.same({ q = "x" }, json.decode(table.concat(args)))
      assert.equal("tool_use", evs[#evs - 1].data.delta.stop_reason)
      assert.equal("message_stop", evs[#evs].event)
    end
  end)

  it("streams a message's input tokens in message_start and its final counts in message_delta", function()
    start()
    local recorded
    local unsubscribe = router.on_call(function(r) recorded = r end)
    for _, model in ipairs({ "factory/coder", "factory/claude" }) do
      -- Slow chunks: an OpenAI upstream's usage, in its last chunk, comes well after message_start.
      fake:script{ { content = "Counted tokens.", usage = { prompt = 37, completion = 5 }, chunk_delay = 0.02 } }
      local res = post("/v1/messages", json.encode({ model = model, max_tokens = 100, stream = true,
        messages = { { role = "user", content = "Say hello" } } }))
      assert.equal(200, res.status, res.body)
      local evs = sse_events(res.body)
      assert.equal("message_start", evs[1].event)
      local first = evs[1].data.message.usage
      if model == "factory/claude" then
        assert.equal(37, first.input_tokens)    -- the upstream's own count, sent before the content
      else
        assert.truthy(first.input_tokens > 0, model)   -- the router's estimate
      end
      assert.equal("message_delta", evs[#evs - 1].event)
      assert.same({ input_tokens = 37, output_tokens = 5 }, evs[#evs - 1].data.usage, model)
      router.flush()
      assert.same({ 37, 5 }, { recorded.prompt_tokens, recorded.completion_tokens }, model)
    end
    unsubscribe()
  end)

  it("answers bad Messages requests with Anthropic-shaped errors", function()
    start([[keys { ["sk-team-ant"] = { team = "ant" } }
budgets { teams = { ant = { tokens_per_day = 10 } } }]])
    local key = { ["x-api-key"] = "sk-team-ant" }
    local err = anthropic_error(post("/v1/messages", "{nope", key), 400, "invalid_request_error")
    anthropic_error(post("/v1/messages", json.encode({ model = "factory/coder", max_tokens = 5 }), key), 400)
    err = anthropic_error(post("/v1/messages", json.encode({ model = "factory/coder", max_tokens = 5,
      messages = { { role = "system", content = "x" } } }), key), 400)
    assert.equal("messages: at least one user or assistant message is required", err.message)
    err = anthropic_error(post("/v1/messages", json.encode({ model = "claude-nope", max_tokens = 5,
      messages = { { role = "user", content = "x" } } }), key), 404, "not_found_error")
    assert.contains("claude-nope", err.message)
    err = anthropic_error(post("/v1/messages", json.encode({ model = "factory/coder", max_tokens = 500,
      messages = { { role = "user", content = "x" } } }), key), 402, "billing_error")
    assert.contains("budget exhausted", err.message)
    -- A block the proxy cannot pass on is refused, not dropped; the model's thinking is dropped.
    err = anthropic_error(post("/v1/messages", json.encode({ model = "factory/coder", max_tokens = 5, messages = {
      { role = "user", content = { { type = "text", text = "Summarise:" },
        { type = "document", source = { type = "text", media_type = "text/plain", data = "doc" } } } } } }), key), 400)
    assert.contains('messages.0.content.1: a "document" block is not supported here', err.message)
    -- The core server's 401 comes first for a wrong key.
    assert.equal(401, post("/v1/messages", "{}", { ["x-api-key"] = "sk-wrong" }).status)
    assert.equal(0, fake:count())
  end)

  it("records every call in the store with --db", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(proc.run{ argv = { "mkdir", "-p", dir } })
    start([[
keys { ["sk-team-qa"] = { team = "qa" } }
budgets { teams = { qa = { tokens_per_day = 100000 } } }
]], { db = "sqlite:" .. dir .. "/factory.db" })
    local auth = { Authorization = "Bearer sk-team-qa" }
    fake:script{ { status = 503, message = "overloaded, key sk-upstream-secret-1" } }
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/coder"), auth).status)
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/claude", { stream = true }), auth).status)
    openai_error(post("/v1/chat/completions", chat_body("factory/nope"), auth), 404)
    openai_error(post("/v1/chat/completions", chat_body("factory/coder", { max_tokens = 200000 }), auth), 402)
    local db = assert(require("factory.db").open("sqlite:" .. dir .. "/factory.db"))
    local rows
    local deadline = time.monotonic() + 5
    repeat
      fiber.sleep(0.02)
      rows = assert(db:query("SELECT team, alias, provider, model, status, code, prompt_tokens, latency_ms,"
        .. " first_token_ms, attempts FROM model_calls ORDER BY id"))
    until #rows >= 3 or time.monotonic() > deadline
    local audited = assert(db:query("SELECT COUNT(*) AS n FROM audit WHERE kind = 'model_call'"))[1].n
    db:close()
    proc.run{ argv = { "rm", "-rf", dir } }
    assert.equal(3, #rows)
    assert.equal(3, audited)
    local coder, claude, broke = rows[1], rows[2], rows[3]
    assert.same({ "qa", "factory/coder", "up", "gpt-test", "ok" },
                { coder.team, coder.alias, coder.provider, coder.model, coder.status })
    assert.truthy(coder.prompt_tokens > 0 and coder.first_token_ms > 0 and coder.first_token_ms <= coder.latency_ms)
    assert.equal(2, #coder.attempts)
    assert.same({ "up", 503, "EUPSTREAM" }, { coder.attempts[1].provider, coder.attempts[1].status, coder.attempts[1].code })
    assert.contains("[REDACTED]", coder.attempts[1].outcome)
    assert.same({ "up", 200, "ok" }, { coder.attempts[2].provider, coder.attempts[2].status, coder.attempts[2].outcome })
    assert.same({ "qa", "anthropic", "claude-test", "ok", 1 },
                { claude.team, claude.provider, claude.model, claude.status, #claude.attempts })
    assert.truthy(claude.first_token_ms < claude.latency_ms)
    assert.same({ "qa", "error", "EBUDGET", "-", {} }, { broke.team, broke.status, broke.code, broke.provider, broke.attempts })
    -- No key reached the store.
    for _, r in ipairs(rows) do
      local text = json.encode(r)
      assert.falsy(text:find("secret", 1, true), text)
    end
  end)

  it("with --db, sees what other processes spend from a team's budget while it serves", function()
    local url = backends.sqlite_url()
    local recount = serve.RECOUNT_S
    serve.RECOUNT_S = 0.05
    start(POOR_TEAM, { db = url })
    local key = { Authorization = "Bearer sk-team-poor" }
    fake:script{ { content = "a", usage = { prompt = 1, completion = 2 } } }
    assert.equal(200, post("/v1/chat/completions", chat_body("factory/coder", { max_tokens = 2 }), key).status)
    -- Another process (a `factory run`) spends 2.5 USD of the team's day.
    local store = assert(db.open(url))
    assert(store:exec("INSERT INTO model_calls (team, provider, model, cost_usd, status, created_at)"
      .. " VALUES ('poor', 'up', 'gpt-test', 2.5, 'ok', ?)", { time.now() }))
    store:close()
    fiber.sleep(0.3)
    local err = openai_error(post("/v1/chat/completions", chat_body("factory/coder", { max_tokens = 1 }), key), 402)
    assert.contains("team poor has 0.5000 of 5.0000 USD left", err.message)
    serve.RECOUNT_S = recount
    srv:close()
    srv = nil
    router.clear_budget("team", "poor")
    backends.cleanup()
  end)

  it("stops a call upstream as soon as its client gives up, streamed or not", function()
    start()
    local seen = {}
    local unsubscribe = router.on_call(function(r) seen[#seen + 1] = r end)
    fake:script{ { delay = 3 }, { chunk_delay = 1, content = "one two three four five six" } }
    for _, case in ipairs({ { stream = false, wait = 0.3 }, { stream = true, wait = 1.2 } }) do
      local t0 = time.monotonic()
      local res, err = http.request{ method = "POST", url = base .. "/v1/chat/completions", timeout = case.wait,
        body = chat_body("factory/coder", { stream = case.stream }), headers = { ["Content-Type"] = "application/json" } }
      assert.is_nil(res, "the client gave up")
      assert.matches("^ETIMEDOUT", err)
      local deadline = time.monotonic() + 5
      -- Records reach the hooks through the next fiber that passes the router.
      while not seen[1] and time.monotonic() < deadline do
        fiber.sleep(0.01)
        router.flush()
      end
      local r = table.remove(seen, 1)
      assert.truthy(r, "the call ended")
      assert.same({ "cancelled", "ECANCELED" }, { r.status, r.code })
      assert.less(case.wait + 0.5, time.monotonic() - t0, "seconds until the call upstream stopped")
    end
    unsubscribe()
  end)

  it("with --db, what a team spent today before serve started counts against its budget", function()
    local url = backends.sqlite_url()
    local store = assert(db.open(url))
    assert(store:migrate())
    -- A restarted serve: the team spent 4.5 of its 5 USD today, and more yesterday.
    for _, row in ipairs{ { 4.5, time.now() - 60 }, { 50, time.now() - 2 * 86400 } } do
      assert(store:exec("INSERT INTO model_calls (team, provider, model, cost_usd, status, created_at)"
        .. " VALUES ('poor', 'up', 'gpt-test', ?, 'ok', ?)", row))
    end
    store:close()
    start(POOR_TEAM, { db = url })
    local err = openai_error(post("/v1/chat/completions", chat_body("factory/coder", { max_tokens = 1 }),
                                  { Authorization = "Bearer sk-team-poor" }), 402)
    assert.contains("team poor has 0.5000 of 5.0000 USD left, this call may cost 1.0000", err.message)
    assert.equal(0, fake:count())
    srv:close()
    srv = nil
    router.clear_budget("team", "poor")
    backends.cleanup()
    -- Without a store, serve says that a restart starts the day afresh.
    local logged = {}
    log.set_console({ write = function(_, ...) logged[#logged + 1] = table.concat({ ... }) end })
    start([[budgets { teams = { poor = { usd_per_day = 5 } } }]])
    log.set_console(nil)
    assert.contains("with no store, a team's budget counts only this process's calls", table.concat(logged))
  end)

  it("with --db, a burst of concurrent calls is recorded in full, the last ones when the server stops", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(proc.run{ argv = { "mkdir", "-p", dir } })
    start("", { db = "sqlite:" .. dir .. "/factory.db" })
    local N = 300
    local callers = {}
    for k = 1, N do
      callers[k] = fiber.spawn(function() return post("/v1/chat/completions", chat_body("factory/coder")).status end)
    end
    local ok, outcomes = fiber.all(callers, 30)
    assert.truthy(ok)
    for _, o in ipairs(outcomes) do assert.equal(200, o[1]) end
    -- Stopped at once, with records still waiting to be written.
    srv:close(5)
    srv = nil
    local db = assert(require("factory.db").open("sqlite:" .. dir .. "/factory.db"))
    local calls = assert(db:query("SELECT COUNT(*) AS n FROM model_calls WHERE status = 'ok'"))[1].n
    local audited = assert(db:query("SELECT COUNT(*) AS n FROM audit WHERE kind = 'model_call'"))[1].n
    local verified, why = require("factory.audit").verify(db)
    db:close()
    proc.run{ argv = { "rm", "-rf", dir } }
    assert.equal(N, calls)
    assert.equal(N, audited)
    assert.truthy(verified, why)
  end)

  it("with --db, records a call that was still running when the server stopped, as cancelled", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(proc.run{ argv = { "mkdir", "-p", dir } })
    start([[prices { ["up/gpt-test"] = { input = 3, output = 15 } }]], { db = "sqlite:" .. dir .. "/factory.db" })
    fake:script{ { fault = "hang" } }
    local caller = fiber.spawn(function()
      return http.request{ method = "POST", url = base .. "/v1/chat/completions", body = chat_body("factory/coder"),
                           headers = { ["Content-Type"] = "application/json" }, timeout = 10 }
    end)
    local deadline = time.monotonic() + 5
    while fake:count() < 1 and time.monotonic() < deadline do fiber.sleep(0.01) end
    srv:close(0.1)
    srv = nil
    local _, res, err = fiber.join(caller, 5)
    assert.is_nil(res, "no answer after the grace")
    assert.matches("^ECONNRESET", err)
    local db = assert(require("factory.db").open("sqlite:" .. dir .. "/factory.db"))
    local calls = assert(db:query("SELECT status, code, prompt_tokens, cost_usd FROM model_calls"))
    db:close()
    proc.run{ argv = { "rm", "-rf", dir } }
    assert.equal(1, #calls)
    assert.same({ "cancelled", "ECANCELED" }, { calls[1].status, calls[1].code })
    assert.truthy(calls[1].prompt_tokens > 0 and calls[1].cost_usd > 0, "its prompt is charged")
  end)

  -- tests/npm with the official SDKs installed (npm ci, once), and the environment
  -- node runs them in.
  local function sdks()
    local npm_dir = TESTS .. "npm"
    local env = { PATH = os.getenv("PATH"), HOME = os.getenv("HOME") }
    if not (io.open(npm_dir .. "/node_modules/openai/package.json")
            and io.open(npm_dir .. "/node_modules/@anthropic-ai/sdk/package.json")) then
      local r = assert(proc.run{ argv = { "npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund" }, cwd = npm_dir,
                                 env = env, timeout = 120 })
      assert.equal(0, r.code, "npm ci failed: " .. r.stderr)
    end
    return npm_dir, env
  end

  it("serves the official openai npm SDK: chat, stream, tool call, for both upstream formats", function()
    local npm_dir, env = sdks()
    start()
    for _, model in ipairs({ "factory/coder", "factory/claude" }) do
      fake:script{ {}, {}, { tool_calls = { { id = "call_w1", name = "get_weather", arguments = '{"city":"Paris"}' } } },
                   { content = "It is sunny in Paris." } }
      local r = assert(proc.run{ argv = { "node", npm_dir .. "/sdk_test.mjs", base, "sk-anything", model },
                                 env = env, timeout = 60 })
      assert.equal(0, r.code, r.stderr)
      local out = assert(json.decode(r.stdout))
      assert.equal("Hello from the fake.", out.chat, model)
      assert.equal("Hello from the fake.", out.stream, model)
      assert.truthy(out.stream_usage and out.stream_usage.total_tokens > 0, model)
      assert.same({ name = "get_weather", args = { city = "Paris" }, finish = "tool_calls" }, out.tool)
      assert.equal("It is sunny in Paris.", out.after_tool)
      assert.equal(404, out.unknown.status)
      if model == "factory/claude" then
        local sent = json.decode(fake:requests()[#fake:requests()].body)
        assert.equal("Use tools.", sent.system)
        assert.equal("tool_result", sent.messages[3].content[1].type)
      end
      fake:reset()
    end
  end, { timeout = 180 })

  it("serves the official openai npm SDK's Responses API (Codex's): response, stream, function call, both upstreams",
    function()
    local npm_dir, env = sdks()
    start()
    for _, model in ipairs({ "factory/coder", "factory/claude" }) do
      fake:script{ {}, {}, { tool_calls = { { id = "call_w1", name = "get_weather", arguments = '{"city":"Paris"}' } } },
                   { content = "It is sunny in Paris." } }
      local r = assert(proc.run{ argv = { "node", npm_dir .. "/responses_sdk_test.mjs", base, "sk-anything", model },
                                 env = env, timeout = 60 })
      assert.equal(0, r.code, r.stderr)
      local out = assert(json.decode(r.stdout))
      assert.equal("Hello from the fake.", out.text, model)
      assert.equal("completed", out.status, model)
      assert.truthy(out.usage.input_tokens > 0 and out.usage.output_tokens > 0, model)
      assert.equal("Hello from the fake.", out.stream, model)
      assert.equal("Hello from the fake.", out.stream_final.text, model)
      assert.same({ "response.created", "response.in_progress", "response.output_item.added",
                    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                    "response.content_part.done", "response.output_item.done", "response.completed" }, out.events, model)
      assert.same({ name = "get_weather", args = { city = "Paris" }, call_id = "call_w1" }, out.tool, model)
      assert.equal("It is sunny in Paris.", out.after_tool, model)
      assert.equal(404, out.unknown.status, model)
      local sent = json.decode(fake:requests()[#fake:requests()].body)
      if model == "factory/claude" then
        assert.equal("Use tools.", sent.system)
        assert.equal("tool_result", sent.messages[3].content[1].type)
      else
        assert.same({ "system", "user", "assistant", "tool" }, { sent.messages[1].role, sent.messages[2].role,
                                                                  sent.messages[3].role, sent.messages[4].role })
        assert.equal("call_w1", sent.messages[4].tool_call_id)
      end
      fake:reset()
    end
  end, { timeout = 180 })

  it("serves the official Anthropic npm SDK on /v1/messages: message, stream, tool call, both upstreams", function()
    local npm_dir, env = sdks()
    start([[keys { ["sk-ant-team"] = { team = "ant" } }]])
    for _, model in ipairs({ "factory/coder", "factory/claude" }) do
      fake:script{ {}, {}, { tool_calls = { { id = "call_w1", name = "get_weather", arguments = '{"city":"Paris"}' } } },
                   { content = "It is sunny in Paris." } }
      local r = assert(proc.run{ argv = { "node", npm_dir .. "/anthropic_sdk_test.mjs", base, "sk-ant-team", model },
                                 env = env, timeout = 60 })
      assert.equal(0, r.code, r.stderr)
      local out = assert(json.decode(r.stdout))
      assert.equal("Hello from the fake.", out.chat, model)
      assert.truthy(out.usage.input_tokens > 0 and out.usage.output_tokens > 0, model)
      assert.equal("Hello from the fake.", out.stream, model)
      assert.same({ text = "Hello from the fake.", stop = "end_turn", output_tokens = out.stream_final.output_tokens },
                  out.stream_final, model)
      assert.same({ name = "get_weather", args = { city = "Paris" }, stop = "tool_use" }, out.tool, model)
      assert.equal("It is sunny in Paris.", out.after_tool, model)
      assert.same({ 404, "not_found_error" }, { out.unknown.status, out.unknown.type }, model)
      fake:reset()
    end
  end, { timeout = 180 })
end)

describe("factory serve (command line)", function()
  it("rejects unknown flags with one line and exit 2, and has --help", function()
    local r = assert(proc.run{ argv = { BIN, "serve", "--bogus" } })
    assert.equal(2, r.code)
    assert.matches("^factory: unknown flag '%-%-bogus' for 'serve'", r.stderr)
    r = assert(proc.run{ argv = { BIN, "serve", "--help" } })
    assert.equal(0, r.code)
    assert.matches("^usage: factory serve", r.stdout)
  end)

  it("prints the URL it listens on and refuses other hosts without a token", function()
    fake:close()
    fake = assert(fake_model.start())
    local cfg = os.tmpname()
    write(cfg, ('providers { up = { base_url = "%s/v1" } }\nmodels { m = { "up/x" } }\n'):format(fake:url()))
    local r = assert(proc.run{ argv = { BIN, "serve", "--host", "0.0.0.0", "--port", "0", "--config", cfg, "--no-db" } })
    assert.equal(1, r.code)
    assert.contains("EACCES", r.stderr)
    assert.contains("--token T or $FACTORY_TOKEN, or keys { } in factory.lua", r.stderr)
    local p = assert(proc.spawn{ argv = { BIN, "serve", "--port", "0", "--config", cfg, "--no-db" } })
    local line = p:read_line()
    assert.matches("^factory serve: listening on http://127%.0%.0%.1:%d+$", line)
    local res = assert(http.get(line:match("(http://.*)$") .. "/v1/models"))
    assert.equal(200, res.status)
    p:kill()
    p:wait()
    p:close()
    os.remove(cfg)
  end)

  it("records every call in the default store, as every command uses it; --no-db records none", function()
    local cfg = os.tmpname()
    write(cfg, ('providers { up = { base_url = "%s/v1", api_key = "sk-x" } }\nmodels { m = { "up/x" } }\n')
      :format(fake:url()))
    for _, no_db in ipairs({ false, true }) do
      local here = os.tmpname()
      os.remove(here)
      assert(fs.mkdir_p(here))
      local argv = { require("factory.core.host").exe, "serve", "--port", "0", "--config", cfg }
      if no_db then argv[#argv + 1] = "--no-db" end
      local p = assert(proc.spawn{ argv = argv, cwd = here, stderr = "null" })
      local url = p:read_line():match("(http://.*)$")
      assert.equal(no_db and "factory serve: recording no call (--no-db)"
        or "factory serve: recording every call in sqlite:.factory/factory.db", p:read_line())
      assert.equal(200, assert(http.request{ method = "POST", url = url .. "/v1/chat/completions",
                                             body = chat_body("m") }).status)
      p:kill("TERM")
      assert.equal(0, p:wait(5).code)
      p:close()
      if no_db then
        assert.is_nil(fs.stat(here .. "/.factory"), "--no-db made no store")
      else
        local store = assert(db.open("sqlite:" .. here .. "/.factory/factory.db"))
        local calls = assert(store:query("SELECT alias, status FROM model_calls"))
        store:close()
        assert.same({ { alias = "m", status = "ok" } }, calls)
      end
      assert(fs.remove(here, { recursive = true }))
    end
    os.remove(cfg)
    local r = assert(proc.run{ argv = { BIN, "serve", "--no-db", "--db", "sqlite:x.db" } })
    assert.equal(2, r.code)
    assert.contains("--db and --no-db exclude each other", r.stderr)
  end)

  for _, sig in ipairs{ "TERM", "INT" } do
    it("on SIG" .. sig .. " stops accepting, finishes the request in flight and exits 0", function()
      local cfg = os.tmpname()
      write(cfg, ('providers { up = { base_url = "%s/v1", api_key = "sk-x" } }\nmodels { m = { "up/x" } }\n'):format(fake:url()))
      fake:script{ { delay = 0.5, content = "late but whole" } }
      local p = assert(proc.spawn{ argv = { BIN, "serve", "--port", "0", "--config", cfg, "--no-db" }, stderr = "null" })
      local url = p:read_line():match("(http://.*)$") .. "/v1/chat/completions"
      local call = fiber.spawn(http.request, { method = "POST", url = url, body = chat_body("m"), timeout = 10 })
      local deadline = time.monotonic() + 5
      while fake:count() == 0 and time.monotonic() < deadline do fiber.sleep(0.01) end
      assert.truthy(p:kill(sig))
      fiber.sleep(0.1)
      local refused = http.request{ method = "POST", url = url, body = chat_body("m"), timeout = 2 }
      assert.is_nil(refused)
      local ok, res = fiber.all({ call }, 5)
      assert.truthy(ok)
      assert.equal(200, res[1][1].status)
      assert.equal("late but whole", json.decode(res[1][1].body).choices[1].message.content)
      local st = p:wait(5)
      p:close()
      os.remove(cfg)
      assert.equal(0, st.code)
      assert.equal(1, fake:count())
    end)
  end
end)
