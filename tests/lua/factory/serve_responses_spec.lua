-- The Responses endpoint of the proxy (lua/factory/serve_responses.lua): what it
-- translates, drops and refuses, and the items a stream carries, through a proxy
-- (factory.serve.local_proxy) in front of the fake model. The official SDK's view is
-- in serve_spec.lua; Codex's requests have the shapes used here (developer
-- messages, custom tools, reasoning items, hosted and namespace tools).
local responses = require "factory.serve_responses"
local serve = require "factory.serve"
local router = require "factory.router"
local http = require "factory.http"
local json = require "factory.json"

local TOOLS = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../tools/"
local fake_model = dofile(TOOLS .. "fake_model.lua")

local fake, proxy

before_each(function()
  fake = assert(fake_model.start())
  assert(router.configure(fake:router_config{ ["factory/coder"] = "gpt-test" }))
  proxy = assert(serve.local_proxy{ ["sk-codex"] = { team = "backend_engineering" } })
end)

after_each(function()
  proxy:close()
  fake:close()
end)

local function post(body, raw)
  return assert(http.post(proxy:url() .. "/v1/responses", raw or assert(json.encode(body)), {
    headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-codex" } }))
end

local function events_of(res)
  local out = {}
  for ev in http.sse({ read = function(self)
    if self.done then return nil end
    self.done = true
    return res.body
  end }) do
    out[#out + 1] = json.decode(ev.data)
  end
  return out
end

describe("the Responses endpoint", function()
  it("translates Codex's request: developer messages, calls and outputs, custom tools; drops what chat cannot carry",
    function()
    local chat, custom = assert(responses.to_openai{
      model = "factory/coder", instructions = "You are Codex.", stream = true, store = false,
      reasoning = { summary = "auto" }, include = { "reasoning.encrypted_content" }, max_output_tokens = 900,
      temperature = json.null,
      input = {
        { type = "message", role = "developer", content = { { type = "input_text", text = "Sandbox: workspace-write" } } },
        { type = "message", role = "user", content = { { type = "input_text", text = "Fix the bug" },
                                                       { type = "input_image", image_url = "data:image/png;base64,AA" } } },
        { type = "reasoning", id = "rs_1", summary = {}, encrypted_content = "xyz" },
        { type = "message", role = "assistant", content = { { type = "output_text", text = "Looking." } } },
        { type = "function_call", call_id = "call_1", name = "exec_command", arguments = '{"cmd":"make test"}' },
        { type = "custom_tool_call", call_id = "call_2", name = "apply_patch", input = "*** Begin Patch" },
        { type = "function_call_output", call_id = "call_1", output = "exit 2" },
        { type = "custom_tool_call_output", call_id = "call_2", output = "Done!" },
      },
      tools = {
        { type = "function", name = "exec_command", description = "Run", strict = false,
          parameters = { type = "object", properties = { cmd = { type = "string" } } } },
        { type = "custom", name = "apply_patch", description = "Patch files",
          format = { type = "grammar", syntax = "lark", definition = "start: patch" } },
        { type = "web_search", external_web_access = false },
        { type = "namespace", name = "multi_agent_v1", tools = {} },
      },
      tool_choice = "auto", parallel_tool_calls = true,
    })
    assert.same({ apply_patch = true }, custom)
    assert.equal(900, chat.max_tokens)
    assert.is_nil(chat.temperature, "a null is left out, not sent upstream")
    assert.same({ include_usage = true }, chat.stream_options)
    local roles = {}
    for i, m in ipairs(chat.messages) do roles[i] = m.role end
    assert.same({ "system", "system", "user", "assistant", "tool", "tool" }, roles)
    assert.equal("Sandbox: workspace-write", chat.messages[2].content)
    assert.same({ { type = "text", text = "Fix the bug" },
                  { type = "image_url", image_url = { url = "data:image/png;base64,AA" } } }, chat.messages[3].content)
    -- The assistant's text and both of its calls are one chat message, as chat needs.
    assert.equal("Looking.", chat.messages[4].content)
    assert.same({ { id = "call_1", type = "function", ["function"] = { name = "exec_command", arguments = '{"cmd":"make test"}' } },
                  { id = "call_2", type = "function", ["function"] = { name = "apply_patch",
                                                                       arguments = '{"input":"*** Begin Patch"}' } } },
                chat.messages[4].tool_calls)
    assert.same({ role = "tool", tool_call_id = "call_2", content = "Done!" }, chat.messages[6])
    -- Two tools a chat model can call; the custom one takes its text as { input }.
    assert.equal(2, #chat.tools)
    assert.equal("exec_command", chat.tools[1]["function"].name)
    assert.is_nil(chat.tools[1]["function"].strict)
    assert.same({ "input" }, chat.tools[2]["function"].parameters.required)
    assert.contains("start: patch", chat.tools[2]["function"].description)
  end)

  it("refuses what it cannot pass on, naming the field", function()
    local res = post({ model = "factory/coder", input = "hi", previous_response_id = "resp_1" })
    assert.equal(400, res.status)
    assert.equal("previous_response_id: this proxy keeps no responses; send the whole conversation in input"
      .. " (store: false)", json.decode(res.body).error.message)
    assert.equal("previous_response_id", json.decode(res.body).error.param)
    res = post({ model = "factory/coder", input = { { role = "user", content = { { type = "input_file", file_id = "f" } } } } })
    assert.equal(400, res.status)
    assert.equal('input.0.content.0: a "input_file" part is not supported here (the proxy passes text and images)',
      json.decode(res.body).error.message)
    res = post({ model = "factory/coder", input = { { type = "local_shell_call", call_id = "c" } } })
    assert.equal(400, res.status)
    assert.contains('input.0: a "local_shell_call" item is not supported here', json.decode(res.body).error.message)
    res = post(nil, "{not json")
    assert.equal(400, res.status)
    assert.contains("the request body is not valid JSON", json.decode(res.body).error.message)
    res = post({ model = "no-such-alias", input = "hi" })
    assert.equal(404, res.status)
    assert.equal("model_not_found", json.decode(res.body).error.code)
    assert.equal(0, fake:count())
  end)

  it("answers a spent budget as OpenAI's insufficient_quota, as the chat endpoint does", function()
    local cfg = fake:router_config{ ["factory/coder"] = "gpt-test" }
    cfg.budgets = { teams = { backend_engineering = { tokens_per_day = 10 } } }
    assert(router.configure(cfg))
    local res = post({ model = "factory/coder", input = "a question longer than ten tokens, surely" })
    assert.equal(402, res.status)
    local err = json.decode(res.body).error
    assert.same({ "insufficient_quota", "budget_exhausted" }, { err.type, err.code })
    assert.contains("budget exhausted: team backend_engineering", err.message)
    assert.equal(0, fake:count())
  end)

  it("answers a custom tool's call as a custom_tool_call, streamed or not, and a cut reply as incomplete", function()
    local tools = { { type = "custom", name = "apply_patch", description = "Patch" } }
    local call = { tool_calls = { { id = "call_p", name = "apply_patch", arguments = '{"input":"*** Begin Patch\\n"}' } } }
    fake:script{ call, call, { content = "partial", finish = "length" } }
    local res = post({ model = "factory/coder", input = "patch it", tools = tools })
    assert.equal(200, res.status)
    local body = json.decode(res.body)
    assert.equal("completed", body.status)
    assert.same({ type = "custom_tool_call", call_id = "call_p", name = "apply_patch", input = "*** Begin Patch\n",
                  status = "completed" }, { type = body.output[1].type, call_id = body.output[1].call_id,
                  name = body.output[1].name, input = body.output[1].input, status = body.output[1].status })
    res = post({ model = "factory/coder", input = "patch it", tools = tools, stream = true })
    local evs = events_of(res)
    local done
    for _, ev in ipairs(evs) do
      if ev.type == "response.output_item.done" then done = ev.item end
      assert.is_nil(ev.type:find("function_call_arguments", 1, true), "no argument deltas of a custom tool")
    end
    assert.equal("custom_tool_call", done.type)
    assert.equal("*** Begin Patch\n", done.input)
    assert.equal("response.completed", evs[#evs].type)
    for i, ev in ipairs(evs) do assert.equal(i - 1, ev.sequence_number) end
    res = post({ model = "factory/coder", input = "write a lot", stream = true })
    evs = events_of(res)
    assert.equal("response.incomplete", evs[#evs].type)
    assert.same({ reason = "max_output_tokens" }, evs[#evs].response.incomplete_details)
    assert.equal("partial", evs[#evs].response.output[1].content[1].text)
  end)

  it("ends a stream that fails midway with response.failed", function()
    fake:script{ { content = "one two three", fault = "truncate" } }
    local evs = events_of(post({ model = "factory/coder", input = "hi", stream = true }))
    assert.equal("response.created", evs[1].type)
    assert.equal("response.failed", evs[#evs].type)
    assert.equal("failed", evs[#evs].response.status)
    assert.truthy(evs[#evs].response.error.message ~= "")
  end)
end)
