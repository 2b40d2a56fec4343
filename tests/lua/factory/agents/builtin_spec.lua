-- The built-in agent (factory.agents.builtin) against the fake model server scripting
-- tool calls: it edits a file in a plain temporary directory and finishes; the
-- iteration cap, the token budget and stuck detection end as BLOCKED with the reason.
local builtin = require "factory.agents.builtin"
local router = require "factory.router"
local json = require "factory.json"
local fs = require "factory.core.fs"

local TOOLS = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../../../tools/"
local fake_model = dofile(TOOLS .. "fake_model.lua")

local fake, dir

before_each(function()
  fake = assert(fake_model.start())
  assert(router.configure(fake:router_config{ coder = "gpt-test" }))
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir .. "/src"))
  assert(fs.write(dir .. "/src/add.c", "int add(int a, int b) { return a - b; }\n"))
end)

after_each(function()
  fake:close()
  assert(fs.remove(dir, { recursive = true }))
end)

local n = 0
local function call(name, args)
  n = n + 1
  return { tool_calls = { { id = "call_" .. n, name = name, arguments = json.encode(args) } } }
end

local FINISH = { status = "COMPLETE", reasoning = "add subtracted; fixed the operator",
                 artifact = "src/add.c: return a + b", verified_facts = { "add(2,3) is 5" } }

describe("builtin agent", function()
  it("shows a long command's first errors and its verdict, cutting the middle to max_result", function()
    local script = "i=0; while [ $i -lt 3000 ]; do echo \"warning $i\" >&2; echo \"test $i ok\"; i=$((i+1)); done;"
      .. " echo 'src/a.c:1: error: first' >&2; echo '1 test FAILED'; exit 2"
    fake:script{ call("run_command", { command = script }), call("finish", FINISH) }
    assert.equal("COMPLETE", (builtin.run{ root = dir, objective = "Run the tests", model = "coder", max_result = 4096 }).status)
    local last = json.decode(fake:requests()[2].body).messages
    local seen = last[#last].content
    assert.equal("tool", last[#last].role)
    assert.matches("^exit code 2\n%[stderr%]\nwarning 0\nwarning 1\n", seen)
    assert.matches("\n%[%.%.%. %d+ bytes cut here %.%.%.%]\n", seen)
    assert.matches("test 2999 ok\n1 test FAILED\n$", seen)
    assert.truthy(#seen <= 4096 + 40, #seen)
  end)

  it("shows the beginning of a long file, and how to read on", function()
    local lines = {}
    for i = 1, 2000 do lines[i] = ("line %d of the file"):format(i) end
    assert(fs.write(dir .. "/big.txt", table.concat(lines, "\n")))
    fake:script{ call("read_file", { path = "big.txt" }), call("finish", FINISH) }
    builtin.run{ root = dir, objective = "Read it", model = "coder", max_result = 4096 }
    local last = json.decode(fake:requests()[2].body).messages
    local seen = last[#last].content
    assert.matches("^line 1 of the file\nline 2 of", seen)
    assert.matches("\n%[cut: %d+ bytes in all; read further with run_command, e%.g%. sed %-n '400,600p' FILE, or grep%]$",
      seen)
  end)

  it("edits a file with tool calls and finishes with the TaskResult", function()
    fake:script{
      call("list_dir", { path = "src" }),
      call("read_file", { path = "src/add.c" }),
      call("edit_file", { path = "src/add.c", old = "a - b", new = "a + b" }),
      call("run_command", { command = "grep -c 'a + b' src/add.c" }),
      call("finish", FINISH),
    }
    local events = {}
    local result, stats = builtin.run{ root = dir, objective = "Fix add() in src/add.c", model = "coder",
                                       emit = function(kind, data) events[#events + 1] = { kind, data } end }
    assert.equal("COMPLETE", result.status)
    assert.equal("src/add.c: return a + b", result.artifact)
    assert.same({ "add(2,3) is 5" }, result.verified_facts)
    assert.equal("int add(int a, int b) { return a + b; }\n", fs.read(dir .. "/src/add.c"))
    assert.equal(5, stats.iterations)
    assert.equal(5, stats.tool_calls)
    assert.equal(1, stats.changes)
    assert.truthy(stats.tokens > 0)
    -- The model was sent the tool schemas and saw each tool's result.
    local reqs = fake:requests()
    assert.equal(5, #reqs)
    local first = json.decode(reqs[1].body)
    assert.equal(7, #first.tools)
    assert.equal("Fix add() in src/add.c", first.messages[2].content)
    local last = json.decode(reqs[5].body).messages
    local seen = {}
    for _, m in ipairs(last) do if m.role == "tool" then seen[#seen + 1] = m.content end end
    assert.equal('["add.c"]', seen[1])
    assert.equal("int add(int a, int b) { return a - b; }\n", seen[2])
    assert.equal("edited src/add.c", seen[3])
    assert.equal("exit code 0\n[stdout]\n1\n", seen[4])
    assert.equal("agent_done", events[#events][1])
  end)

  it("shows tool errors to the model and carries on", function()
    fake:script{
      call("read_file", { path = "../../etc/passwd" }),
      call("edit_file", { path = "src/add.c", old = "nothing like this", new = "x" }),
      call("finish", FINISH),
    }
    local result = builtin.run{ root = dir, objective = "Fix add()", model = "coder" }
    assert.equal("COMPLETE", result.status)
    local msgs = json.decode(fake:requests()[3].body).messages
    local tool_msgs = {}
    for _, m in ipairs(msgs) do if m.role == "tool" then tool_msgs[#tool_msgs + 1] = m.content end end
    assert.matches("^ERROR: EPATH: %.%./%.%./etc/passwd: '%.%.' leaves the worktree", tool_msgs[1])
    assert.matches("^ERROR: ENOTFOUND: ", tool_msgs[2])
  end)

  it("asks with the operative's max_tokens, and says so when a reply cut off there left a tool call incomplete",
    function()
    fake:script{
      { tool_calls = { { id = "call_cut", name = "write_file", arguments = '{"path": "src/big.c", "text": "int main(' } },
        finish = "length" },
      { tool_calls = { { id = "call_bad", name = "write_file", arguments = '{"path": ' } } },
      call("finish", FINISH),
    }
    local result = builtin.run{ root = dir, objective = "Write big.c", model = "coder", max_tokens = 2048,
                                temperature = 0.1 }
    assert.equal("COMPLETE", result.status)
    local first = json.decode(fake:requests()[1].body)
    assert.same({ 2048, 0.1 }, { first.max_tokens, first.temperature })
    local msgs = json.decode(fake:requests()[3].body).messages
    local tool_msgs = {}
    for _, m in ipairs(msgs) do if m.role == "tool" then tool_msgs[#tool_msgs + 1] = m.content end end
    assert.equal("ERROR: EINVAL: your reply was cut off at its output limit (max_tokens 2048) inside the arguments of"
      .. " write_file, so they are incomplete: nothing was done. Make the change in smaller steps: edit_file for part"
      .. " of a file, or write_file with a first part and edit_file to add the rest", tool_msgs[1])
    -- Arguments that are simply not JSON (the reply was not cut) say so.
    assert.equal("ERROR: EINVAL: the arguments are not a JSON object", tool_msgs[2])
    assert.is_nil(fs.stat(dir .. "/src/big.c"))
  end)

  it("leaves the oldest tool results out once the conversation nears the model's window, keeping the newest",
    function()
    -- A window of 3,000 tokens: about 9,600 bytes before results give way.
    local line = string.rep("x", 99) .. "\n"
    for i = 1, 8 do assert(fs.write(dir .. "/src/part" .. i .. ".c", string.rep(line, 20))) end
    local script = {}
    for i = 1, 8 do script[i] = call("read_file", { path = "src/part" .. i .. ".c" }) end
    script[9] = call("write_file", { path = "src/all.c", text = string.rep(line, 30) })
    script[10] = call("finish", FINISH)
    fake:script(script)
    local fitted = {}
    local result = builtin.run{ root = dir, objective = "Merge the parts", model = "coder", context_window = 3000,
                                stuck_idle = 20,
                                emit = function(kind, data) if kind == "agent_context_fitted" then fitted[#fitted + 1] = data end end }
    assert.equal("COMPLETE", result.status)
    local sizes = {}
    for i, req in ipairs(fake:requests()) do sizes[i] = #req.body end
    local last = json.decode(fake:requests()[10].body).messages
    -- The system prompt, the objective and the last six messages are as they were.
    assert.equal("Merge the parts", last[2].content)
    local elided, kept = 0, 0
    for i = 3, #last do
      if last[i].role == "tool" then
        if last[i].content:find("left out to fit the context window", 1, true) then elided = elided + 1
        else kept = kept + 1 end
      end
    end
    assert.truthy(elided >= 3, "old results left out: " .. elided)
    assert.equal(string.rep(line, 20), last[#last - 2].content, "the newest read is whole")
    assert.equal(9, elided + kept)
    assert.truthy(#fitted > 0)
    for _, f in ipairs(fitted) do assert.truthy(f.bytes <= 3000 * 0.8 * 4, f.bytes) end
    -- Without that, the last request would have carried every result.
    assert.truthy(sizes[10] < 8 * #string.rep(line, 20), sizes[10])
  end)

  it("rejects an invalid TaskResult in finish and lets the model retry", function()
    fake:script{ call("finish", { status = "DONE", reasoning = "x" }), call("finish", FINISH) }
    local result, stats = builtin.run{ root = dir, objective = "Fix add()", model = "coder" }
    assert.equal("COMPLETE", result.status)
    assert.equal(2, stats.iterations)
  end)

  it("a TaskResult that stays invalid is sent back `retries` times, then BLOCKED with what is wrong", function()
    fake:script{ call("finish", { status = "DONE", reasoning = "x" }), { content = '{"status": "COMPLETE"}' },
                 call("finish", { status = "COMPLETE", reasoning = "" }), call("finish", FINISH) }
    local events = {}
    local result, stats = builtin.run{ root = dir, objective = "Fix add()", model = "coder", retries = 2,
                                       emit = function(kind, data) events[#events + 1] = { kind, data } end }
    assert.equal("BLOCKED", result.status)
    assert.equal("no valid TaskResult after 3 attempts: reasoning must be a non-empty string", result.blockers[1])
    assert.equal(3, stats.iterations)
    local invalid = {}
    for _, e in ipairs(events) do
      if e[1] == "task_result_invalid" then invalid[#invalid + 1] = e[2].attempt .. ": " .. e[2].error end
    end
    assert.same({ '1: status must be COMPLETE, NEEDS_CLARIFICATION or BLOCKED, got "DONE"',
                  "2: reasoning must be a non-empty string", "3: reasoning must be a non-empty string" }, invalid)
  end)

  it("stops at the iteration cap with BLOCKED", function()
    local script = {}
    for i = 1, 5 do script[i] = call("write_file", { path = "f" .. i, text = tostring(i) }) end
    fake:script(script)
    local result = builtin.run{ root = dir, objective = "loop", model = "coder", max_iterations = 3 }
    assert.equal("BLOCKED", result.status)
    assert.equal("iteration cap reached: 3 iterations without finish", result.blockers[1])
    assert.equal(3, fake:count())
    -- The last call was told it was the last; the ones before were not.
    local notice = "[Iteration 3 of 3, the last: call `finish` now with your TaskResult. If the work is not done,"
      .. " say what is done and what is left.]"
    local sent = json.decode(fake:requests()[3].body).messages
    assert.equal("tool", sent[#sent].role)
    assert.equal("wrote 1 bytes to f2\n\n" .. notice, sent[#sent].content)
    for i = 1, 2 do assert.falsy(fake:requests()[i].body:find("the last: call", 1, true)) end
  end)

  it("told at its last iteration, the model finishes with what it has", function()
    fake:script{ call("read_file", { path = "src/add.c" }),
                 call("finish", { status = "BLOCKED", reasoning = "out of iterations",
                                  blockers = { "read src/add.c; the fix is left" } }) }
    local result = builtin.run{ root = dir, objective = "fix it", model = "coder", max_iterations = 2 }
    assert.equal("BLOCKED", result.status)
    assert.same({ "read src/add.c; the fix is left" }, result.blockers)
    local sent = json.decode(fake:requests()[2].body).messages
    assert.matches("%[Iteration 2 of 2, the last: call `finish` now", sent[#sent].content)
  end)

  it("detects the same call repeated", function()
    local script = {}
    for i = 1, 5 do script[i] = call("read_file", { path = "src/add.c" }) end
    fake:script(script)
    local result, stats = builtin.run{ root = dir, objective = "loop", model = "coder", stuck_repeats = 3 }
    assert.equal("BLOCKED", result.status)
    assert.matches('^stuck: the same call read_file%(.*src.-add%.c.*%) was repeated 3 times', result.blockers[1])
    assert.equal(3, stats.iterations)
  end)

  it("detects iterations that change no file and only repeat earlier calls; exploring is not stuck", function()
    -- Reading around a repository first, a new call each time, as models do.
    local script = {}
    for i = 1, 6 do script[i] = call("grep", { pattern = "add" .. i }) end
    script[7] = call("finish", FINISH)
    fake:script(script)
    local result = builtin.run{ root = dir, objective = "explore", model = "coder", stuck_idle = 4 }
    assert.equal("COMPLETE", result.status, result.blockers and result.blockers[1])
    -- Going round the same calls.
    fake:reset()
    script = {}
    for i = 1, 8 do script[i] = call("grep", { pattern = "add" .. (i % 2) }) end
    fake:script(script)
    result = builtin.run{ root = dir, objective = "loop", model = "coder", stuck_idle = 4 }
    assert.equal("BLOCKED", result.status)
    assert.equal("stuck: 4 iterations since the last file change made no call that was not made before",
      result.blockers[1])
    assert.equal(6, fake:count())
  end)

  it("stops at a spent run budget before calling, saying which pipeline file raises it", function()
    router.set_budget("run", "77", { tokens = 100000 })
    router.count_spent("run", "77", { tokens = 99999 })
    local result = builtin.run{ root = dir, objective = "x", model = "coder", run = 77, pipeline = "bugfix" }
    router.clear_budget("run", "77")
    assert.equal("BLOCKED", result.status)
    assert.matches("^budget exhausted: run 77 has 1 of 100000 tokens left", result.blockers[1])
    assert.equal("The run's budget is spent. Raise limits.budget_usd in pipelines/bugfix.lua, then answer this to go"
      .. " on; or end the run: factory runs cancel 77.", result.reasoning)
    -- A budget that one call would overrun by itself: waiting for it is no use.
    router.set_budget("run", "77", { tokens = 1 })
    result = builtin.run{ root = dir, objective = "x", model = "coder", run = 77, pipeline = "bugfix" }
    router.clear_budget("run", "77")
    assert.matches("^One call may cost %d+ tokens %(its prompt, and max_tokens at the dearest price of its model's"
      .. " chain%), more than all the run's budget had left %(1 tokens%): raise limits%.budget_usd in"
      .. " pipelines/bugfix%.lua, or lower the operative's max_tokens; then answer this to go on%.$", result.reasoning)
    assert.equal(0, fake:count())
  end)

  it("stops when the token budget is spent", function()
    local script = {}
    for i = 1, 5 do
      local r = call("write_file", { path = "g" .. i, text = "x" })
      r.usage = { prompt = 60, completion = 10 }
      script[i] = r
    end
    fake:script(script)
    local result, stats = builtin.run{ root = dir, objective = "loop", model = "coder", token_budget = 200 }
    assert.equal("BLOCKED", result.status)
    assert.matches("^token budget exhausted: 210 of 200 tokens used after 3 iterations", result.blockers[1])
    assert.equal(210, stats.tokens)
  end)

  it("returns BLOCKED when the model cannot be reached", function()
    local result = builtin.run{ root = dir, objective = "x", model = "no-such-alias" }
    assert.equal("BLOCKED", result.status)
    assert.matches("^the model call failed %(EALIAS%): unknown model", result.blockers[1])
  end)

  it("waits out a model outage, then carries on; one that lasts ends BLOCKED, saying so", function()
    local seen = {}
    local function emit(kind, data) if kind == "model_unavailable" then seen[#seen + 1] = data.wait_s end end
    fake:script{ { status = 503 }, { fault = "reset" }, { content = json.encode(FINISH) } }
    local result = builtin.run{ root = dir, objective = "x", model = "coder", outage_retries = 2, outage_wait_s = 0.02,
                                emit = emit }
    assert.equal("COMPLETE", result.status)
    assert.same({ 0.02, 0.04 }, seen)
    fake:script{ { status = 503 }, { status = 503 } }
    result = builtin.run{ root = dir, objective = "x", model = "coder", outage_retries = 1, outage_wait_s = 0.02 }
    assert.equal("BLOCKED", result.status)
    assert.matches("^the model could not be reached %(EUPSTREAM%): .*%(still, after 1 wait%(s%)", result.blockers[1])
  end)

  it("accepts a TaskResult written as text", function()
    fake:script{ { content = json.encode(FINISH) } }
    local result = builtin.run{ root = dir, objective = "x", model = "coder" }
    assert.equal("COMPLETE", result.status)
  end)

  it("tells the model what is wrong with a TaskResult written as text; plain prose is asked to use the tools", function()
    fake:script{ { content = '{"status": "DONE", "reasoning": "all good"}' }, { content = "I looked at the code." },
                 { content = json.encode(FINISH) } }
    local result = builtin.run{ root = dir, objective = "x", model = "coder" }
    assert.equal("COMPLETE", result.status)
    local told = json.decode(fake:requests()[2].body).messages
    assert.equal('Your reply is not a valid TaskResult: status must be COMPLETE, NEEDS_CLARIFICATION or BLOCKED,'
      .. ' got "DONE". Use the tools to do the work; when it is done, call `finish` with your TaskResult.',
      told[#told].content)
    told = json.decode(fake:requests()[3].body).messages
    assert.equal("Use the tools to do the work; when it is done, call `finish` with your TaskResult.", told[#told].content)
  end)

  it("offers only the operative's tools and refuses any other by name", function()
    fake:script{
      call("edit_file", { path = "src/add.c", old = "a - b", new = "a + b" }),
      call("finish", FINISH),
    }
    local result = builtin.run{ root = dir, objective = "x", model = "coder", tools = { "read_file", "grep", "finish" } }
    assert.equal("COMPLETE", result.status)
    assert.equal("int add(int a, int b) { return a - b; }\n", fs.read(dir .. "/src/add.c"))
    local first = json.decode(fake:requests()[1].body)
    local names = {}
    for _, t in ipairs(first.tools) do names[#names + 1] = t["function"].name end
    assert.equal("read_file grep finish", table.concat(names, " "))
    local msgs = json.decode(fake:requests()[2].body).messages
    assert.equal("ERROR: ETOOL: edit_file is not one of this operative's tools", msgs[#msgs].content)
  end)

  it("starts from given messages, its own instructions appended to their system message", function()
    fake:script{ { content = json.encode(FINISH) } }
    builtin.run{ root = dir, objective = "x", model = "coder", messages = {
      { role = "system", content = "team: backend; operative: implementer" },
      { role = "user", content = "# Objective\nfix add" },
      { role = "user", content = "## From stage design\nuse +" } } }
    local msgs = json.decode(fake:requests()[1].body).messages
    assert.equal(3, #msgs)
    assert.matches("^team: backend; operative: implementer\n\nYou are a coding agent", msgs[1].content)
    assert.equal("## From stage design\nuse +", msgs[3].content)
  end)
end)
