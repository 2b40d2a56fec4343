-- The model router (factory.router over factory.core.router) against the fake model
-- server of tests/tools/fake_model.lua, run in this process.
local router = require "factory.router"
local fiber = require "factory.fiber"
local json = require "factory.json"
local time = require "factory.core.time"
local proc = require "factory.proc"
local host = require "factory.core.host"

local TOOLS = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../tools/"
local fake_model = dofile(TOOLS .. "fake_model.lua")

local KEY_A, KEY_B = "sk-test-key-aaaaaaaaaaaa", "ak-test-key-bbbbbbbbbbbb"
local FAST = { retries = 2, backoff = 0.01, backoff_max = 0.05, timeout = 5, first_token_timeout = 2,
               idle_timeout = 2, breaker_failures = 100 }

local fake, records, unsubscribe

-- Providers "a" (OpenAI format) and "b" (Anthropic format) on the fake, and "dead"
-- on a port nobody listens on. Aliases: solo = a; chain = a then b; dead = dead then a.
local function configure(extra)
  local cfg = {
    providers = {
      a = { base_url = fake:url() .. "/v1", api_key = KEY_A },
      b = { kind = "anthropic", base_url = fake:url(), api_key = KEY_B },
      dead = { base_url = "http://127.0.0.1:9/v1", api_key = "sk-dead-cccccccccccc" },
    },
    models = { solo = { "a/gpt-test" }, chain = { "a/gpt-test", "b/claude-test" }, anth = { "b/claude-test" },
               dead = { "dead/m", "a/gpt-test" } },
    limits = {},
  }
  for k, v in pairs(FAST) do cfg.limits[k] = v end
  for k, v in pairs(extra or {}) do
    if k == "limits" then
      for lk, lv in pairs(v) do cfg.limits[lk] = lv end
    elseif k == "providers" then
      for pk, pv in pairs(v) do cfg.providers[pk] = pv end
    else
      cfg[k] = v
    end
  end
  assert(router.configure(cfg))
end

before_each(function()
  fake = assert(fake_model.start())
  configure()
  records = {}
  unsubscribe = router.on_call(function(r) records[#records + 1] = r end)
end)

after_each(function()
  unsubscribe()
  fake:close()
end)

local function hello(model, extra)
  local req = { model = model, messages = { { role = "user", content = "Say hello" } } }
  for k, v in pairs(extra or {}) do req[k] = v end
  return req
end

local function read_all(s)
  local chunks = {}
  while true do
    local c, err, code = s:read()
    if not c then return chunks, err, code end
    chunks[#chunks + 1] = c
  end
end

local function text_of(chunks)
  local parts = {}
  for _, c in ipairs(chunks) do
    local d = c.choices[1] and c.choices[1].delta
    if d and type(d.content) == "string" then parts[#parts + 1] = d.content end
  end
  return table.concat(parts)
end

local function no_secrets(value)
  local text = json.encode(value)
  assert.falsy(text:find(KEY_A, 1, true), "key A leaked: " .. text)
  assert.falsy(text:find(KEY_B, 1, true), "key B leaked: " .. text)
end

describe("router", function()
  it("routes an alias to an OpenAI-format provider and records the call", function()
    local res = assert(router.chat(hello("solo"), { team = "t1", run = 7 }))
    assert.equal("Hello from the fake.", res.choices[1].message.content)
    assert.equal(1, #records)
    local r = records[1]
    assert.equal("solo", r.alias)
    assert.equal("a", r.provider)
    assert.equal("gpt-test", r.model)
    assert.equal("t1", r.team)
    assert.equal("7", r.run)
    assert.equal("ok", r.status)
    assert.truthy(r.prompt_tokens > 0 and r.completion_tokens > 0)
    assert.truthy(r.latency_ms > 0)
    assert.equal(1, #r.attempts)
    local sent = fake:requests()[1]
    assert.equal("Bearer " .. KEY_A, sent.headers.authorization)
    assert.equal("gpt-test", json.decode(sent.body).model)
    no_secrets(records)
  end)

  it("lists the aliases and accepts provider/model directly", function()
    local models = router.models()
    table.sort(models)
    assert.same({ "anth", "chain", "dead", "solo" }, models)
    local res = assert(router.chat(hello("a/other-model")))
    assert.equal("other-model", res.model)
  end)

  it("names the aliases and providers there are to a caller who named neither", function()
    local _, err, code = router.chat(hello("sol"))
    assert.equal("EALIAS", code)
    assert.contains("unknown model 'sol': not an alias nor provider/model (aliases: ", err)
    for _, name in ipairs({ "solo", "chain", "anth", "dead" }) do assert.contains(name, err:match("aliases: ([^;]*)")) end
    for _, name in ipairs({ "a", "b", "dead" }) do assert.truthy(err:match("providers: (.*)%)$"):find(name, 1, true)) end
  end)

  it("rejects bad requests with a clear error", function()
    local cases = {
      { "{not json", "EINVAL" },
      { json.encode({ messages = { { role = "user", content = "x" } } }), "EINVAL" },
      { json.encode({ model = "solo", messages = {} }), "EINVAL" },
      { json.encode(hello("no/such")), "EALIAS" },
      { json.encode(hello("nope")), "EALIAS" },
    }
    -- Text a lax reader would take: the request must be one JSON object, as RFC 8259 has it.
    local msgs = '"messages":[{"role":"user","content":"x"}]'
    for _, text in ipairs({
      '{"model":"solo",' .. msgs .. ',}', '{"model" "solo",' .. msgs .. '}', '{"model":"solo",' .. msgs .. '} {}',
      '{} {}', '{"model":"solo",' .. msgs .. ',"max_tokens":01}', '{"model":"solo",' .. msgs .. ',"stream":tru}',
      '{"model":"solo",' .. msgs .. ',"x":"unterminated}', '{"model":"solo",' .. msgs .. [[,"x":"a\qb"}]],
      '{"model":"solo",' .. msgs .. [[,"x":"\u12G4"}]], '{"model":"solo",' .. msgs .. ',"x":"tab\tin a string"}',
      '{"model":"solo",' .. msgs .. ',"x":-}', '{"model":"solo",' .. msgs .. ',"x":1.}', '[{"model":"solo"}]',
      '"solo"', "", '{"model":"solo",' .. msgs .. ',"x":' .. ("["):rep(300) .. ("]"):rep(300) .. "}",
      '{"model":"solo",' .. msgs .. ',"x":' .. ("["):rep(257) .. ("]"):rep(257) .. "}",
    }) do
      cases[#cases + 1] = { text, "EINVAL" }
    end
    -- A limit the reservation could not count on (a negative one would reserve less
    -- than nothing and let other calls through a spent budget).
    for _, n in ipairs({ '0', '-1', '2.5', '129', '"2"' }) do
      cases[#cases + 1] = { '{"model":"solo",' .. msgs .. ',"n":' .. n .. '}', "EINVAL", "'n' must be a whole number" }
    end
    for _, limit in ipairs({ '-5', '0', '1.5', '"100"', 'true', '[1]', '99999999999' }) do
      for _, member in ipairs({ "max_tokens", "max_completion_tokens" }) do
        cases[#cases + 1] = { '{"model":"solo",' .. msgs .. ',"' .. member .. '":' .. limit .. '}', "EINVAL",
                              "must be a whole number >= 1" }
      end
    end
    for _, c in ipairs(cases) do
      local res, err, code = router.chat(c[1])
      assert.is_nil(res, c[1])
      assert.equal(c[2], code, c[1])
      assert.matches("^" .. c[2] .. ": ", err)
      if c[3] then assert.contains(c[3], err, c[1]) end
    end
    assert.equal(0, fake:count())
  end)

  it("passes a request's members upstream as they came, nested up to 256 deep", function()
    -- Escapes stay as written (bytes that are not UTF-8 pass as they are too: see the
    -- UTF-8 case below, which the fake refuses as the real services do).
    local content = [[caf\u00e9 \"q\" \ud83d\ude00 ]] .. "\226\130\172"
    local members = '"x":[[{"y":[]}],{}],"k":-1.5e3,"t":true,"f":false,"z":null,"max_tokens":7'
    local text = '{ "model" : "solo" , "messages":[{"role":"user","content":"' .. content .. '"}],\n'
      .. members .. ' }\n'
    assert(router.chat(text))
    local sent = fake:requests()[1].body
    assert.matches('^{"model":"gpt%-test",', sent)
    assert.contains('"messages":[{"role":"user","content":"' .. content .. '"}],' .. members, sent)
    -- More members than the router notes when the call starts: it reads them again.
    local many = {}
    for i = 1, 20 do many[i] = ('"m%d":[%d]'):format(i, i) end
    many = table.concat(many, ",")
    assert(router.chat('{"stream":true,"model":"solo",' .. many .. ',"messages":[{"role":"user","content":"x"}],'
                       .. '"stream_options":{"include_usage":true}}', { stream = false }))
    assert.equal('{"model":"gpt-test",' .. many .. ',"messages":[{"role":"user","content":"x"}],"stream":false}',
                 fake:requests()[2].body)
    -- The fake (lua-cjson) refuses more than 200 levels: the router sent it this.
    local deep = ("["):rep(256) .. ("]"):rep(256)
    local _, err = router.chat('{"model":"solo","messages":[{"role":"user","content":"x"}],"x":' .. deep .. '}')
    assert.contains("HTTP 400", err)
    assert.contains('"x":' .. deep, fake:requests()[3].body)
  end)

  it("sends a request it encodes as UTF-8, each malformed byte a U+FFFD, and JSON text as it came", function()
    -- A Latin-1 file an agent read: a provider refuses a request that is not UTF-8.
    assert(router.chat({ model = "solo", messages = { { role = "user", content = "caf\233 \255 ok \226\130\172" } } }))
    assert.contains('"caf\239\191\189 \239\191\189 ok \226\130\172"', fake:requests()[1].body)
    assert(router.chat_parts({ model = "solo", messages = { json.encode{ role = "user", content = "na\239ve" } } }))
    assert.contains('"na\239\191\189ve"', fake:requests()[2].body)
    local text = '{"model":"solo","messages":[{"role":"user","content":"as it came \255"}]}'
    local ok, err = router.chat(text)
    assert.is_nil(ok)
    assert.contains("HTTP 400: The request body is not valid JSON: invalid UTF-8", err)
    assert.contains("as it came \255", fake:requests()[3].body)
  end)

  it("chat_parts sends what chat sends for the same request, and budgets by its max_tokens", function()
    local messages = { json.encode{ role = "system", content = "Be brief." },
                       json.encode{ role = "user", content = "Say \"hi\"" } }
    local members = '"max_tokens":7,"temperature":0.5'
    local text = '{"model":"solo",' .. members .. ',"messages":[' .. table.concat(messages, ",") .. "]}"
    local a = assert(router.chat(text, { team = "t" }))
    local b = assert(router.chat_parts({ model = "solo", members = members, messages = messages }, { team = "t" }))
    assert.equal(fake:requests()[1].body, fake:requests()[2].body)
    assert.equal(a.choices[1].message.content, b.choices[1].message.content)
    -- No other members; streamed; through an Anthropic-format provider.
    assert(router.chat_parts({ model = "solo", messages = messages }))
    assert.equal('{"model":"gpt-test","messages":[' .. table.concat(messages, ",") .. '],"stream":false}',
                 fake:requests()[3].body)
    local s = assert(router.chat_parts({ model = "solo", messages = messages }, { stream = true }))
    local chunks = 0
    while s:read(5) do chunks = chunks + 1 end
    assert.truthy(chunks > 0)
    assert.contains('"stream":true', fake:requests()[4].body)
    assert(router.chat_parts({ model = "anth", members = members, messages = messages }))
    local sent = json.decode(fake:requests()[5].body)
    assert.equal("Be brief.", sent.system)
    assert.equal(7, sent.max_tokens)
    -- The reservation counts max_tokens: a budget of 5 tokens refuses it before sending.
    router.set_budget("run", "parts", { tokens = 5 })
    local ok, err, code = router.chat_parts({ model = "solo", members = members, messages = messages }, { run = "parts" })
    assert.is_nil(ok)
    assert.equal("EBUDGET", code, err)
    -- n completions may each take max_tokens: 3 x 7 = 21 tokens do not fit in 20.
    router.set_budget("run", "parts", { tokens = 20 })
    ok, err, code = router.chat_parts({ model = "solo", members = members .. ',"n":3', messages = messages },
                                      { run = "parts" })
    assert.is_nil(ok)
    assert.equal("EBUDGET", code, err)
    ok, err, code = router.chat(text:gsub('"max_tokens":7', '"max_tokens":7,"n":3'), { run = "parts" })
    assert.is_nil(ok)
    assert.equal("EBUDGET", code, err)
    router.clear_budget("run", "parts")
    assert.equal(5, fake:count())
    -- Members that are not JSON, or that the router sets itself, are refused.
    for _, bad in ipairs({ '"max_tokens":', '"model":"x"', '"stream":true', '"messages":[]' }) do
      ok, err, code = router.chat_parts({ model = "solo", members = bad, messages = messages })
      assert.is_nil(ok, bad)
      assert.equal("EINVAL", code, bad)
    end
    ok, err, code = router.chat_parts({ model = "solo", messages = {} })
    assert.equal("EINVAL", code)
    assert.contains("messages", err)
    ok, err, code = router.chat_parts({ messages = messages })
    assert.equal("EINVAL", code)
    assert.equal(5, fake:count())
  end)

  it("says where a 404 went, and to check base_url, without the URL's host part", function()
    configure{ providers = { a = { base_url = "http://user:pw-secret@" .. fake:url():match("^http://(.*)$"),
                                   api_key = KEY_A } } }
    local res, err, code = router.chat(hello("solo"))
    assert.is_nil(res)
    assert.equal("EUPSTREAM", code)
    assert.contains("a/gpt-test: HTTP 404: ", err)
    assert.contains("(the request went to /chat/completions: is providers.a.base_url right?)", err)
    assert.falsy(err:find("pw-secret", 1, true), "credentials in the URL stay out of the message")
    -- A 404 about the model came from the right place: no hint about base_url.
    configure()
    for _, alias in ipairs({ "solo", "anth" }) do
      fake:script{ { status = 404, message = "The model `gpt-tset` does not exist or you do not have access to it." } }
      res, err = router.chat(hello(alias))
      assert.is_nil(res)
      assert.contains("HTTP 404: The model `gpt-tset` does not exist", err)
      assert.falsy(err:find("base_url", 1, true), err)
    end
  end)

  it("reaches an Anthropic provider whose base URL was written with /v1 at /v1/messages still", function()
    for _, base in ipairs({ fake:url(), fake:url() .. "/v1", fake:url() .. "/v1/" }) do
      configure{ providers = { b = { kind = "anthropic", base_url = base, api_key = KEY_B } } }
      fake:script{ { content = "ok" } }
      assert(router.chat({ model = "anth", messages = { { role = "user", content = "x" } } }))
      assert.equal("/v1/messages", fake:requests()[#fake:requests()].path, base)
    end
  end)

  it("translates to and from the Anthropic Messages API, tools included", function()
    fake:script{ { tool_calls = { { id = "toolu_1", name = "get_weather", arguments = '{"city":"Paris"}' } } },
                 { content = "It is sunny.", finish = "length" } }
    local tools = { { type = "function", ["function"] = { name = "get_weather", description = "weather",
                      parameters = { type = "object", properties = { city = { type = "string" } } } } } }
    local res = assert(router.chat({ model = "anth", max_tokens = 50, tools = tools, tool_choice = "required", stop = "END",
      messages = { { role = "system", content = "Be brief." }, { role = "user", content = "Weather in Paris?" } } }))
    local msg = res.choices[1].message
    assert.equal("tool_calls", res.choices[1].finish_reason)
    assert.equal("toolu_1", msg.tool_calls[1].id)
    assert.equal("get_weather", msg.tool_calls[1]["function"].name)
    assert.same({ city = "Paris" }, json.decode(msg.tool_calls[1]["function"].arguments))
    assert.truthy(res.usage.prompt_tokens > 0)
    local sent = json.decode(fake:requests()[1].body)
    assert.equal("Be brief.", sent.system)
    assert.equal("claude-test", sent.model)
    assert.equal(50, sent.max_tokens)
    assert.same({ "END" }, sent.stop_sequences)
    assert.same({ type = "any" }, sent.tool_choice)
    assert.equal("get_weather", sent.tools[1].name)
    assert.equal("object", sent.tools[1].input_schema.type)
    assert.equal(KEY_B, fake:requests()[1].headers["x-api-key"])
    assert.equal("2023-06-01", fake:requests()[1].headers["anthropic-version"])
    -- The tool result goes back as a tool_result block of a user turn.
    res = assert(router.chat({ model = "anth", tools = tools, messages = {
      { role = "user", content = "Weather in Paris?" }, msg,
      { role = "tool", tool_call_id = "toolu_1", content = "sunny" } } }))
    assert.equal("It is sunny.", res.choices[1].message.content)
    assert.equal("length", res.choices[1].finish_reason)
    sent = json.decode(fake:requests()[2].body)
    assert.equal("assistant", sent.messages[2].role)
    assert.equal("tool_use", sent.messages[2].content[1].type)
    assert.same({ city = "Paris" }, sent.messages[2].content[1].input)
    assert.equal("user", sent.messages[3].role)
    assert.same({ type = "tool_result", tool_use_id = "toolu_1", content = "sunny" }, sent.messages[3].content[1])
    no_secrets(records)
  end)

  it("reserves an inline image as what providers bill for it, not as its base64 bytes", function()
    router.set_budget("run", "pics", { tokens = 5000 })
    local picture = "data:image/png;base64," .. ("A"):rep(1000000)
    local request = hello("solo", { max_tokens = 10 })
    request.messages[1].content = { { type = "text", text = "What is this?" },
                                    { type = "image_url", image_url = { url = picture } } }
    assert(router.chat(request, { run = "pics" }))
    assert.truthy(router.prompt_tokens(json.encode(request)) < 1700)
    assert.truthy(router.prompt_tokens(("x"):rep(4000)) >= 1000)
    router.clear_budget("run", "pics")
  end)

  it("asks again without stream_options a server that refuses them, and from then on", function()
    fake:script{ { status = 400, message = "Unrecognized request argument supplied: stream_options" } }
    local s = assert(router.chat(hello("solo", { stream = true })))
    local chunks, err = read_all(s)
    assert.is_nil(err)
    assert.equal("Hello from the fake.", text_of(chunks))
    assert(read_all(assert(router.chat(hello("solo", { stream = true })))))
    local sent = fake:requests()
    assert.equal(3, #sent)
    assert.truthy(json.decode(sent[1].body).stream_options)
    for i = 2, 3 do
      local body = json.decode(sent[i].body)
      assert.same({ true, nil }, { body.stream, body.stream_options })
    end
    router.flush()
    local r = records[#records]
    assert.equal("ok", r.status)
    assert.truthy(r.prompt_tokens > 0 and r.completion_tokens > 0, "usage estimated")
    assert.contains("asked again without stream_options", records[#records - 1].attempts[1].outcome)
  end)

  it("skips an Anthropic provider for n > 1 completions, and refuses them when nothing else is left", function()
    local res, err, code = router.chat(hello("anth", { n = 2 }))
    assert.is_nil(res)
    assert.equal("EINVAL", code)
    assert.contains("no provider of 'anth' can serve n = 2 completions", err)
    assert.equal(0, fake:count())
    configure{ models = { back = { "b/claude-test", "a/gpt-test" } } }
    assert(router.chat(hello("back", { n = 2 })))
    assert.equal(1, fake:count())
    assert.equal("/v1/chat/completions", fake:requests()[1].path)
    assert.contains("skipped", records[#records].attempts[1].outcome)
  end)

  it("keeps a stream whose read timed out, and stops one whose reader was cancelled", function()
    fake:script{ { chunk_delay = 0.3, content = "one two three" }, { chunk_delay = 1, content = "one two three four" } }
    local s = assert(router.chat(hello("solo", { stream = true })))
    assert(s:read())
    local none, err, code = s:read(0.05)
    assert.is_nil(none)
    assert.equal("ETIMEDOUT", code, err)
    local rest = read_all(s)
    assert.equal("one two three", text_of(rest))
    router.flush()
    assert.equal("ok", records[#records].status)
    local t0 = time.monotonic()
    local reader = fiber.spawn(function()
      local s2 = assert(router.chat(hello("solo", { stream = true })))
      return read_all(s2)
    end)
    fiber.sleep(0.2)
    reader:cancel("the reader went away")
    local deadline = time.monotonic() + 2
    repeat
      fiber.sleep(0.01)
      router.flush()
    until records[#records].status ~= "ok" or time.monotonic() > deadline
    assert.same({ "cancelled", "ECANCELED" }, { records[#records].status, records[#records].code })
    assert.less(1, time.monotonic() - t0, "seconds until the call stopped")
  end)

  it("gives Anthropic what it accepts for OpenAI's looser fields: tools without parameters, temperature, parallel_tool_calls", function()
    local tools = { { type = "function", ["function"] = { name = "now", description = "the time" } },
                    { type = "function", ["function"] = { name = "later", parameters = json.null } } }
    assert(router.chat({ model = "anth", tools = tools, parallel_tool_calls = false, temperature = 1.6,
                         messages = { { role = "user", content = "x" } } }))
    local sent = json.decode(fake:requests()[1].body)
    for i = 1, 2 do assert.same({ type = "object", properties = {} }, sent.tools[i].input_schema) end
    assert.equal(1, sent.temperature)
    assert.same({ type = "auto", disable_parallel_tool_use = true }, sent.tool_choice)
    assert(router.chat({ model = "anth", tools = tools, tool_choice = "required", parallel_tool_calls = false,
                         temperature = 0.3, messages = { { role = "user", content = "x" } } }))
    sent = json.decode(fake:requests()[2].body)
    assert.equal(0.3, sent.temperature)
    assert.same({ type = "any", disable_parallel_tool_use = true }, sent.tool_choice)
    -- "none" takes no such flag, and a request without tools gets no tool_choice.
    assert(router.chat({ model = "anth", tools = tools, tool_choice = "none", parallel_tool_calls = false,
                         messages = { { role = "user", content = "x" } } }))
    assert.same({ type = "none" }, json.decode(fake:requests()[3].body).tool_choice)
    assert(router.chat({ model = "anth", parallel_tool_calls = false, messages = { { role = "user", content = "x" } } }))
    assert.is_nil(json.decode(fake:requests()[4].body).tool_choice)
  end)

  it("streams from both formats as OpenAI chunks, tool calls included", function()
    for _, alias in ipairs({ "solo", "anth" }) do
      local s = assert(router.chat(hello(alias, { stream = true })))
      local chunks, err = read_all(s)
      assert.is_nil(err)
      assert.equal("Hello from the fake.", text_of(chunks), alias)
      assert.equal("stop", chunks[#chunks].choices[1].finish_reason, alias)
      fake:script{ { tool_calls = { { id = "c1", name = "lookup", arguments = '{"q":"x"}' } } } }
      s = assert(router.chat(hello(alias, { stream = true })))
      chunks = read_all(s)
      local name, args = nil, {}
      for _, c in ipairs(chunks) do
        for _, tc in ipairs(c.choices[1] and c.choices[1].delta.tool_calls or {}) do
          name = name or tc["function"].name
          args[#args + 1] = tc["function"].arguments
        end
      end
      assert.equal("lookup", name, alias)
      assert.same({ q = "x" }, json.decode(table.concat(args)), alias)
      assert.equal("tool_calls", chunks[#chunks].choices[1].finish_reason, alias)
    end
    assert.equal(4, #records)
    for _, r in ipairs(records) do
      assert.equal("ok", r.status)
      assert.truthy(r.first_token_ms and r.first_token_ms <= r.latency_ms)
      assert.truthy(r.completion_tokens > 0)
    end
  end)

  it("gives the usage chunk only to a caller that asked for it", function()
    local chunks = read_all(assert(router.chat(hello("solo", { stream = true }))))
    for _, c in ipairs(chunks) do assert.truthy(#c.choices > 0) end
    chunks = read_all(assert(router.chat(hello("anth", { stream = true, stream_options = { include_usage = true } }))))
    assert.truthy(chunks[#chunks].usage.total_tokens > 0)
  end)

  it("tells a stream's reader its token counts: reported, else estimated, then as recorded", function()
    -- Anthropic reports the input tokens before the content.
    fake:script{ { content = "abcdefgh", usage = { prompt = 21, completion = 3 } } }
    local s = assert(router.chat(hello("anth", { stream = true })))
    assert.truthy(s:read())
    local prompt, _, reported = s:usage()
    assert.same({ 21, true }, { prompt, reported })
    read_all(s)
    assert.same({ 21, 3, true }, { s:usage() })
    s:close()
    -- An OpenAI upstream reports in its last chunk: until then, the router's estimate.
    local body = json.encode({ model = "solo", messages = { { role = "user", content = "Say hello" } }, stream = true })
    fake:script{ { content = "abcdefgh", chunk_delay = 0.02 } }
    local rec
    local unsubscribe = router.on_call(function(r) rec = r end)
    s = assert(router.chat(body))
    assert.truthy(s:read())
    prompt, _, reported = s:usage()
    assert.same({ math.floor(#body / 4) + 1, false }, { prompt, reported })
    read_all(s)
    local p2, c2, reported2 = s:usage()
    s:close()
    router.flush()
    unsubscribe()
    assert.same({ rec.prompt_tokens, rec.completion_tokens, true }, { p2, c2, reported2 })
  end)

  it("serves embeddings from OpenAI-format providers only", function()
    local res = assert(router.embeddings({ model = "chain", input = { "a", "b" } }))
    assert.equal(2, #res.data)
    assert.equal("/v1/embeddings", fake:requests()[1].path)
    local _, _, code = router.embeddings({ model = "anth", input = "a" })
    assert.equal("EUNAVAILABLE", code)
  end)

  -- Each fault: what the caller sees, how many requests reached the fake, and that
  -- nothing took longer than its bound.
  local faults = {
    { name = "429 with Retry-After is retried after the delay", script = { { status = 429, retry_after = 1 } },
      alias = "solo", ok = true, sent = 2, min = 0.9, max = 3 },
    { name = "429 with Retry-After as an HTTP-date is retried at that time", alias = "solo", ok = true, sent = 2,
      script = function() return { { status = 429, retry_after = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 2) } } end,
      min = 0.9, max = 3.5 },
    { name = "429 with Retry-After as an obsolete RFC 850 date is read too", alias = "solo", ok = true, sent = 2,
      script = function() return { { status = 429, retry_after = os.date("!%A, %d-%b-%y %H:%M:%S GMT", os.time() + 2) } } end,
      min = 0.9, max = 3.5 },
    { name = "500 is retried", script = { { status = 500 } }, alias = "solo", ok = true, sent = 2 },
    { name = "503 three times falls back to the next entry", alias = "chain", ok = true, provider = "b",
      script = { { status = 503 }, { status = 503 }, { status = 503 } }, sent = 4 },
    { name = "400 is not retried", script = { { status = 400, message = "bad thing" } }, alias = "solo",
      code = "EUPSTREAM", err = "HTTP 400: bad thing", sent = 1 },
    { name = "a connection reset is retried", script = { { fault = "reset" } }, alias = "solo", ok = true, sent = 2 },
    { name = "malformed JSON is retried", script = { { fault = "malformed" } }, alias = "solo", ok = true, sent = 2 },
    { name = "a reply with a trailing comma is malformed and retried", alias = "solo", ok = true, sent = 2,
      script = { { fault = "malformed", text = '{"id":"x","choices":[{"message":{"content":"hi"}}],}' } } },
    { name = "a reply of two objects is malformed every time", alias = "solo", code = "EUPSTREAM", err = "malformed",
      script = { { fault = "malformed", text = '{"choices":[]} {}' }, { fault = "malformed", text = '{"choices":[]} {}' },
                 { fault = "malformed", text = '{"choices":[]} {}' } }, sent = 3 },
    { name = "a wrong content type is retried", script = { { fault = "content_type" } }, alias = "solo", ok = true,
      sent = 2 },
    { name = "malformed JSON every time surfaces a clear error", alias = "solo", code = "EUPSTREAM",
      err = "malformed", script = { { fault = "malformed" }, { fault = "malformed" }, { fault = "malformed" } },
      sent = 3 },
    { name = "a refused connection falls back", alias = "dead", ok = true, provider = "a", sent = 1 },
    { name = "a hang times out, then falls back", alias = "chain", ok = true, provider = "b",
      limits = { timeout = 0.3, retries = 0 }, script = { { fault = "hang" } }, sent = 2, max = 2 },
    { name = "a hang with nothing to fall back to times out", alias = "solo", code = "ETIMEDOUT",
      limits = { timeout = 0.3, retries = 0 }, script = { { fault = "hang" } }, sent = 1, max = 2 },
    { name = "a stream without a first token falls back", alias = "chain", stream = true, ok = true, provider = "b",
      limits = { first_token_timeout = 0.3, retries = 0 }, script = { { fault = "hang" } }, sent = 2, max = 2 },
    { name = "a slow stream within the idle timeout completes", alias = "solo", stream = true, ok = true,
      limits = { idle_timeout = 0.5 }, script = { { chunk_delay = 0.05 } }, sent = 1 },
    { name = "a stream stalling after its first token fails the reader", alias = "solo", stream = true,
      code = "ETIMEDOUT", err = "stalled", limits = { idle_timeout = 0.3 }, script = { { chunk_delay = 0.6 } },
      sent = 1, max = 3 },
    { name = "a truncated stream fails the reader", alias = "solo", stream = true, code = "ECONNRESET",
      err = "a/gpt-test", script = { { fault = "truncate" } }, sent = 1 },
    { name = "a stream that ends after its finish_reason without [DONE] completes", alias = "solo", stream = true,
      ok = true, script = { { fault = "no_done" } }, sent = 1 },
    { name = "a malformed stream before its first token is retried", alias = "solo", stream = true, ok = true,
      script = { { fault = "malformed" } }, sent = 2 },
    { name = "a stream event with a trailing comma is malformed", alias = "solo", stream = true, ok = true, sent = 2,
      script = { { fault = "malformed", text = '{"choices":[{"index":0,"delta":{"content":"hi"}}],}' } } },
  }
  for _, f in ipairs(faults) do
    it("fault: " .. f.name, function()
      if f.limits then configure{ limits = f.limits } end
      -- A script that names a moment (an HTTP-date) is made when its test starts.
      fake:script(type(f.script) == "function" and f.script() or f.script or {})
      local t0 = time.monotonic()
      local res, err, code = router.chat(hello(f.alias, { stream = f.stream or nil }))
      if res and f.stream then
        local chunks
        chunks, err, code = read_all(res)
        res = not err and chunks or nil
      end
      local elapsed = time.monotonic() - t0
      if f.ok then
        assert.truthy(res, "expected success, got " .. tostring(err))
      else
        assert.is_nil(res)
        assert.equal(f.code, code, err)
        if f.err then assert.contains(f.err, err) end
      end
      assert.equal(f.sent, fake:count(), "requests sent upstream")
      assert.less(f.max or 1.5, elapsed, "seconds")
      if f.min then assert.truthy(elapsed >= f.min, ("waited only %.2f s"):format(elapsed)) end
      local r = records[#records]
      assert.equal(f.ok and "ok" or "error", r.status)
      if f.provider then assert.equal(f.provider, r.provider) end
      no_secrets({ err, records })
    end)
  end

  it("records the attempt chain and the first-token latency of each call", function()
    configure{ limits = { retries = 1 } }
    fake:script{ { status = 429, retry_after = 0.05 }, { status = 503, message = "down: " .. KEY_A },
                 { delay = 0.05 } }
    assert(router.chat(hello("chain"), { team = "t", run = "r9" }))
    local r = records[#records]
    assert.equal("b", r.provider)
    assert.equal(3, #r.attempts)
    local a1, a2, a3 = r.attempts[1], r.attempts[2], r.attempts[3]
    assert.same({ "a", "gpt-test", 429, "EUPSTREAM", 0.05 }, { a1.provider, a1.model, a1.status, a1.code, a1.retry_after_s })
    assert.same({ "a", "gpt-test", 503, "EUPSTREAM" }, { a2.provider, a2.model, a2.status, a2.code })
    assert.contains("[REDACTED]", a2.outcome)
    assert.same({ "b", "claude-test", 200, "ok" }, { a3.provider, a3.model, a3.status, a3.outcome })
    assert.is_nil(a3.code)
    for _, a in ipairs(r.attempts) do assert.truthy(a.latency_ms >= 0 and a.latency_ms <= r.latency_ms) end
    assert.truthy(a3.latency_ms >= 50, a3.latency_ms)
    assert.truthy(r.first_token_ms >= 50 and r.first_token_ms <= r.latency_ms)
    -- A stream's first token comes before its end.
    fake:script{ { chunk_delay = 0.05 } }
    read_all(assert(router.chat(hello("solo", { stream = true }))))
    r = records[#records]
    assert.truthy(r.first_token_ms < r.latency_ms - 40, ("%g / %g"):format(r.first_token_ms, r.latency_ms))
    assert.same({ "a", 200, "ok" }, { r.attempts[1].provider, r.attempts[1].status, r.attempts[1].outcome })
    -- A call refused before sending has no first token and an empty chain.
    configure{ budgets = { run = { tokens = 1 } } }
    assert.is_nil(router.chat(hello("solo"), { run = "r9" }))
    r = records[#records]
    assert.same({ "error", "EBUDGET", {} }, { r.status, r.code, r.attempts })
    assert.is_nil(r.first_token_ms)
    no_secrets(records)
  end)

  it("never shows an API key, even when the provider echoes it", function()
    fake:script{ { status = 401, message = "Incorrect API key provided: " .. KEY_A } }
    local res, err = router.chat(hello("solo"))
    assert.is_nil(res)
    assert.contains("[REDACTED]", err)
    no_secrets({ err, records, router.stats() })
  end)

  it("opens a provider's circuit after repeated failures and tries it again after the cooldown", function()
    configure{ limits = { breaker_failures = 2, breaker_cooldown = 0.3, retries = 0 } }
    fake:script{ { status = 500 }, {}, { status = 500 }, {} }
    assert(router.chat(hello("chain")))     -- a fails, b answers
    assert(router.chat(hello("chain")))     -- a fails again: open
    local n = fake:count()
    assert(router.chat(hello("chain")))     -- a is skipped
    assert.equal(n + 1, fake:count())
    assert.equal("b", records[#records].provider)
    assert.equal("skipped: circuit open", records[#records].attempts[1].outcome)
    assert.equal("open", router.stats().providers.a.breaker)
    fiber.sleep(0.35)
    assert(router.chat(hello("chain")))     -- the trial call goes to a, and succeeds
    assert.equal("a", records[#records].provider)
    assert.equal("closed", router.stats().providers.a.breaker)
  end)

  it("queues callers beyond a provider's max_concurrency instead of failing them", function()
    configure{ providers = { a = { base_url = fake:url() .. "/v1", api_key = KEY_A, max_concurrency = 2 } } }
    local replies = {}
    for i = 1, 6 do replies[i] = { delay = 0.1 } end
    fake:script(replies)
    local peak = 0
    local fibers = {}
    for i = 1, 6 do
      fibers[i] = fiber.spawn(function()
        local res, err = router.chat(hello("solo"))
        peak = math.max(peak, router.stats().providers.a.inflight)
        return res, err
      end)
    end
    fiber.sleep(0.02)
    assert.equal(2, router.stats().providers.a.inflight)
    assert.equal(4, router.stats().providers.a.queued)
    local ok, outcomes = fiber.all(fibers, 5)
    assert.truthy(ok)
    for _, o in ipairs(outcomes) do assert.truthy(o[1], tostring(o[2])) end
    assert.truthy(peak <= 2)
  end)

  it("queues callers beyond a provider's requests per minute instead of failing them", function()
    -- 60 requests a minute: a full bucket of 60, then one more each second.
    configure{ providers = { a = { base_url = fake:url() .. "/v1", api_key = KEY_A, rpm = 60 } } }
    local t0, done, fibers = time.monotonic(), {}, {}
    for i = 1, 61 do
      fibers[i] = fiber.spawn(function()
        local res, err = router.chat(hello("solo"))
        done[#done + 1] = time.monotonic() - t0
        return res, err
      end)
    end
    fiber.sleep(0.5)
    assert.equal(60, #done)
    assert.equal(1, router.stats().providers.a.queued)
    local ok, outcomes = fiber.all(fibers, 5)
    assert.truthy(ok)
    for _, o in ipairs(outcomes) do assert.truthy(o[1], tostring(o[2])) end
    assert.truthy(done[61] >= 0.8, "the 61st call waited for the bucket: " .. done[61])
    assert.equal(61, fake:count())
  end)

  it("queues callers beyond a provider's tokens per minute until estimates are settled", function()
    -- Each call reserves its estimate (max_tokens + prompt bytes / 4) from a bucket of
    -- 6000; the real usage gives back the rest when the call ends.
    configure{ providers = { a = { base_url = fake:url() .. "/v1", api_key = KEY_A, tpm = 6000 } } }
    fake:script{ { delay = 0.3 }, { delay = 0.3 }, { delay = 0.3 } }
    local t0, fibers = time.monotonic(), {}
    for i = 1, 3 do
      fibers[i] = fiber.spawn(function()
        local res, err = router.chat(hello("solo", { max_tokens = 2900 }))
        return res, err, time.monotonic() - t0
      end)
    end
    fiber.sleep(0.1)
    assert.equal(2, router.stats().providers.a.inflight)
    assert.equal(1, router.stats().providers.a.queued)
    local ok, outcomes = fiber.all(fibers, 5)
    assert.truthy(ok)
    for _, o in ipairs(outcomes) do assert.truthy(o[1], tostring(o[2])) end
    assert.truthy(outcomes[3][3] >= 0.55, "the third call started after the first ended: " .. outcomes[3][3])
    assert.truthy(outcomes[3][3] < 2, "it did not wait for the bucket to refill: " .. outcomes[3][3])
  end)

  it("holds 200 concurrent calls to a budget that allows 10", function()
    -- 1 USD per completion token, 10 tokens asked for: each call reserves 10 USD.
    configure{ prices = { ["a/gpt-test"] = { input = 0, output = 1e6 } },
               budgets = { teams = { t = { usd_per_day = 100 } } } }
    local replies = {}
    for i = 1, 200 do replies[i] = { delay = 0.05, content = "five tokens of text here", usage = { completion = 6 } } end
    fake:script(replies)
    local fibers = {}
    for i = 1, 200 do
      fibers[i] = fiber.spawn(function()
        return router.chat(hello("solo", { max_tokens = 10 }), { team = "t" })
      end)
    end
    local _, outcomes = fiber.all(fibers, 10)
    local ok, budget = 0, 0
    for _, o in ipairs(outcomes) do
      if o[1] then ok = ok + 1 elseif o[3] == "EBUDGET" then budget = budget + 1 end
    end
    assert.equal(10, ok)
    assert.equal(190, budget)
    assert.equal(10, fake:count())
    local spent = 0
    for _, r in ipairs(records) do spent = spent + r.cost_usd end
    assert.equal(60, spent)
    local acc = router.stats().budgets["team:t"]
    assert.equal(60, acc.spent_usd)
    assert.equal(0, acc.reserved_usd)
    assert.contains("budget exhausted", outcomes[200][2])
    -- What is left is used up one call at a time, never beyond the limit.
    local more = 0
    while router.chat(hello("solo", { max_tokens = 10 }), { team = "t" }) do more = more + 1 end
    acc = router.stats().budgets["team:t"]
    assert.truthy(more > 0 and acc.spent_usd <= 100 and acc.spent_usd + 10 > 100, acc.spent_usd)
  end)

  it("asks a ledger before it sends a call of a team with a budget, and records its hold", function()
    configure{ prices = { ["a/gpt-test"] = { input = 0, output = 1e6 } },
               budgets = { teams = { led = { usd_per_day = 100 }, free = { tokens_per_day = 1e6 } } } }
    local asked = {}
    local answer = { 41 }
    local detach = router.use_ledger(function(ask)
      asked[#asked + 1] = ask
      return unpack(answer, 1, 3)
    end)
    fake:script{ { content = "ok", usage = { completion = 2 } }, { content = "ok" }, { content = "ok" } }
    assert(router.chat(hello("solo", { max_tokens = 10 }), { team = "led" }))
    assert.same({ team = "led", usd = 10, tokens = asked[1].tokens, limit_usd = 100 }, asked[1])
    router.flush()
    assert.equal(41, records[#records].hold)
    -- Refused: nothing is sent, the error is the ledger's, the reservation comes back.
    answer = { nil, "EBUDGET: budget exhausted: team led has nothing left across processes", "EBUDGET" }
    local res, err, code = router.chat(hello("solo", { max_tokens = 10 }), { team = "led" })
    assert.is_nil(res)
    assert.same({ "EBUDGET", "EBUDGET: budget exhausted: team led has nothing left across processes" }, { code, err })
    assert.equal(1, fake:count())
    -- A ledger that fails is named, and the call is not sent either.
    answer = { nil, "ECLOSED: the database is closed", "ECLOSED" }
    res, err, code = router.chat(hello("solo", { max_tokens = 10 }), { team = "led" })
    assert.same({ "EUNAVAILABLE", "EUNAVAILABLE: budget: team led's budget could not be checked in the store (ECLOSED:"
      .. " the database is closed)" }, { code, err })
    assert.equal(1, fake:count())
    -- A team without a budget, and an unpriced call against a USD budget, are not asked about;
    -- a token budget always is.
    local n = #asked
    assert(router.chat(hello("solo"), { team = "nobody" }))
    configure{ budgets = { teams = { led = { usd_per_day = 100 }, free = { tokens_per_day = 1e6 } } } }
    assert(router.chat(hello("solo"), { team = "led" }))
    assert.equal(n, #asked)
    answer = { 42 }
    assert(router.chat(hello("solo"), { team = "free" }))
    assert.equal(n + 1, #asked)
    detach()
    router.flush()
    local acc = router.stats().budgets["team:led"]
    assert.same({ 2, 0 }, { acc.spent_usd, acc.reserved_usd })
    router.clear_budget("team", "led")
    router.clear_budget("team", "free")
  end)

  it("ends a call unsent, its reservation returned, when its caller goes away while the ledger is asked", function()
    configure{ prices = { ["a/gpt-test"] = { input = 0, output = 1e6 } },
               budgets = { teams = { gone = { usd_per_day = 100 } } } }
    local detach = router.use_ledger(function()
      fiber.sleep(10)
      return 1
    end)
    local f = fiber.spawn(function() return router.chat(hello("solo", { max_tokens = 10 }), { team = "gone" }) end)
    fiber.sleep(0.05)
    assert.equal(10, router.stats().budgets["team:gone"].reserved_usd)
    f:cancel("gone")
    f = nil
    collectgarbage()
    collectgarbage()
    router.flush()
    detach()
    assert.equal(0, router.stats().budgets["team:gone"].reserved_usd)
    local r = records[#records]
    assert.same({ "cancelled", "ECANCELED", "the call was never sent: its caller went away" }, { r.status, r.code, r.error })
    assert.equal(0, fake:count())
    router.clear_budget("team", "gone")
  end)

  it("applies run budgets in tokens and set_budget overrides", function()
    configure{ budgets = { run = { tokens = 100 } } }
    local _, err, code = router.chat(hello("solo", { max_tokens = 200 }), { run = "r1" })
    assert.equal("EBUDGET", code)
    assert.contains("run r1", err)
    router.set_budget("run", "r1", { tokens = 1000 })
    assert(router.chat(hello("solo", { max_tokens = 200 }), { run = "r1" }))
    assert(router.chat(hello("solo", { max_tokens = 200 }), { run = "other" }) == nil)
  end)

  it("holds a team to its tokens per day, and starts afresh the next day", function()
    -- The day is UTC-12's: switching to UTC+12 moves it on by exactly one.
    configure{ budgets = { teams = { daily = { tokens_per_day = 300 } }, utc_offset = -12 } }
    assert(router.chat(hello("solo", { max_tokens = 100 }), { team = "daily" }))
    local spent = router.stats().budgets["team:daily"].spent_tokens
    assert.truthy(spent > 0 and spent < 150, spent)
    local _, err, code = router.chat(hello("solo", { max_tokens = 290 }), { team = "daily" })
    assert.equal("EBUDGET", code)
    assert.contains("team daily has", err)
    assert.contains("tokens left", err)
    assert.equal(1, fake:count())
    configure{ budgets = { teams = { daily = { tokens_per_day = 300 } }, utc_offset = 12 } }
    assert(router.chat(hello("solo", { max_tokens = 250 }), { team = "daily" }))
    -- The same day again after a reload: nothing starts afresh.
    configure{ budgets = { teams = { daily = { tokens_per_day = 300 } }, utc_offset = 12 } }
    _, _, code = router.chat(hello("solo", { max_tokens = 290 }), { team = "daily" })
    assert.equal("EBUDGET", code)
    assert.equal(2, fake:count())
    local none, cerr = router.configure{ providers = {}, models = {}, budgets = { utc_offset = 15 } }
    assert.is_nil(none)
    assert.contains("utc_offset", cerr)
  end)

  it("holds a run to its USD budget", function()
    configure{ prices = { ["a/gpt-test"] = { input = 0, output = 1e6 } }, budgets = { run = { usd = 20 } } }
    -- Each call reserves 10 USD (10 tokens at 1 USD) and spends 6.
    fake:script{ { usage = { completion = 6 } }, { usage = { completion = 6 } }, { usage = { completion = 6 } } }
    assert(router.chat(hello("solo", { max_tokens = 10 }), { run = "usd-1" }))
    assert(router.chat(hello("solo", { max_tokens = 10 }), { run = "usd-1" }))
    local _, err, code = router.chat(hello("solo", { max_tokens = 10 }), { run = "usd-1" })
    assert.equal("EBUDGET", code)
    assert.contains("run usd-1 has 8.0000 of 20.0000 USD left", err)
    assert(router.chat(hello("solo", { max_tokens = 10 }), { run = "usd-2" }))
  end)

  it("clear_budget forgets an account; a call in flight settles into the old one", function()
    for name in pairs(router.stats().budgets) do router.clear_budget(name:match("^(%a+):(.*)$")) end
    -- A run without a budget needs no account at all.
    assert(router.chat(hello("solo"), { run = "free" }))
    assert.same({}, router.stats().budgets)
    configure{ budgets = { run = { tokens = 10000 } } }
    assert(router.chat(hello("solo"), { run = "r1" }))
    router.set_budget("run", "r2", { tokens = 1 })
    assert.truthy(router.stats().budgets["run:r1"].spent_tokens > 0)
    router.clear_budget("run", "r1")
    router.clear_budget("run", "r2")
    router.clear_budget("run", "never-seen")
    assert.same({}, router.stats().budgets)
    -- r2 lost its override with its account.
    assert(router.chat(hello("solo"), { run = "r2" }))
    fake:script{ { delay = 0.2 } }
    local f = fiber.spawn(function() return router.chat(hello("solo"), { run = "r3" }) end)
    fiber.sleep(0.05)
    assert.truthy(router.stats().budgets["run:r3"].reserved_tokens > 0)
    router.clear_budget("run", "r3")
    assert.is_nil(router.stats().budgets["run:r3"])
    local ok, res = fiber.join(f, 5)
    assert.truthy(ok and res)
    assert.is_nil(router.stats().budgets["run:r3"])
    assert.truthy(router.stats().budgets["run:r2"])
    router.clear_budget("run", "r2")
    assert.same({}, router.stats().budgets)
    assert.falsy(pcall(router.clear_budget, "nope", "x"))
  end)

  it("cancels the upstream request when the caller goes away", function()
    fake:script{ { fault = "hang" } }
    local f = fiber.spawn(function() return router.chat(hello("solo")) end)
    fiber.sleep(0.05)
    f:cancel("not needed")
    router.flush()
    assert.equal(0, router.stats().calls)
    assert.equal(0, router.stats().providers.a.inflight)
    assert.equal("cancelled", records[#records].status)
    -- The provider had the request: its prompt is charged, as the provider charges it.
    assert.truthy(records[#records].prompt_tokens > 0)
    -- One still waiting for its turn (max_concurrency) never reached the provider.
    configure{ providers = { a = { base_url = fake:url() .. "/v1", api_key = KEY_A, max_concurrency = 1 } } }
    fake:script{ { fault = "hang" } }
    local first = fiber.spawn(function() return router.chat(hello("solo")) end)
    local queued = fiber.spawn(function() return router.chat(hello("solo")) end)
    fiber.sleep(0.05)
    queued:cancel("not needed")
    router.flush()
    assert.same({ "cancelled", 0 }, { records[#records].status, records[#records].prompt_tokens })
    first:cancel("not needed")
  end)

  it("closing a stream early stops it and settles the call", function()
    fake:script{ { chunk_delay = 0.05 } }
    local s = assert(router.chat(hello("solo", { stream = true })))
    assert(s:read())
    s:close()
    assert.equal(0, router.stats().calls)
    assert.equal("cancelled", records[#records].status)
  end)
end)

-- router.stop stops the router for good, so it runs in a process of its own
-- (tests/tools/router_stop.lua), as it does in a `factory run` about to end.
describe("router.stop", function()
  it("ends the calls in flight as cancelled, recorded, the one the provider had charged its prompt; wakes no caller",
     function()
    local p = assert(proc.spawn{ argv = { host.exe, TOOLS .. "router_stop.lua" }, stderr = "stdout" })
    local status = p:wait(20)
    local seen, out = {}, {}
    for line in function() return p:read_line() end do
      out[#out + 1] = line
      local name, value = line:match("^(%S+) (.*)$")
      if name then seen[name] = value end
    end
    p:close()
    assert.equal(0, status.code, table.concat(out, "\n"))
    assert.same({ stopped = "3", records = "3", record = "cancelled|ECANCELED|the process is ending|qa|7",
                  charged = "true", queued_charged = "false cancelled", first_waits = "true", later_waits = "true",
                  pending_waits = "true", upstream_requests = "1", records_after = "3" }, seen)
  end)
end)
