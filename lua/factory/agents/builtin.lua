-- factory.agents.builtin: the built-in coding agent, a tool-use loop over the
-- model router with the tools of factory.agents.tools, confined to one worktree.
--
--   builtin.run(o) -> result, stats
--   o: { root = DIR (or box = a toolbox), objective = text, model = alias,
--        max_tokens =, temperature = (of each model call; the operative's),
--        context_window = tokens (default dsl.DEFAULT_WINDOW): past 80% of it the oldest
--          tool results and tool-call arguments are left out, the last 6 messages kept
--          (event "agent_context_fitted", { messages =, bytes =, iteration = }),
--        team =, run =, pipeline = the run's (named when a spent budget stops the agent),
--        system = extra instructions | nil,
--        instructions = the agent's own instructions (default M.SYSTEM, a coding
--          agent's; M.READ_SYSTEM for a stage whose worktree is thrown away),
--        messages = the conversation to start from (e.g. factory.objective.pack's:
--                   the operative's system prompt, the anchor, earlier stages' results)
--                   instead of the objective alone; the agent's instructions are
--                   appended to its system message,
--        tools = { "read_file", ..., "finish" } the tools offered (default: all),
--        secrets = { NAME }, timeout = SECONDS, max_output = BYTES,
--        lock = fn(relpath) -> true | nil, err, code, on_command = fn(process) -> fn()
--          (the toolbox's: tools.new),
--        max_iterations = n (default 30), token_budget = n | nil,
--        retries = n (default 2): a TaskResult that is not valid (in `finish`, or
--          written as a JSON object) is sent back with what is wrong that many times,
--          then the result is BLOCKED (event "task_result_invalid", { attempt, error }),
--        stuck_repeats = n (default 3: the same call that many times in a row),
--        stuck_idle = n (default 8: iterations that changed no file and made no call
--          not made before in the session: reading new files is exploring, not stuck),
--        max_result = BYTES of one tool result shown to the model (default 16 KiB),
--        outage_retries =, outage_wait_s = (a model out of reach is waited out:
--          factory.objective.outlast),
--        emit = fn(kind, data) | nil }
--   result: a TaskResult (factory.confidence), from the model's `finish` call, or
--   BLOCKED made here with the reason (model error, iteration cap, token budget,
--   stuck). stats: { iterations, tokens, tool_calls, changes }.
-- Tool failures are not the loop's: the model sees "ERROR: ECODE: ..." and decides.
local router = require "factory.router"
local json = require "factory.json"
local confidence = require "factory.confidence"
local objective = require "factory.objective"
local dsl = require "factory.dsl"
local tools = require "factory.agents.tools"

local M = {}

M.SYSTEM = [[
You are a coding agent working in a git worktree. Use the tools to read, search,
edit files and run commands (paths are relative to the worktree; you cannot leave it).
Make the smallest change that meets the objective, check it by running the tests,
then call `finish` with your TaskResult: status COMPLETE (with the artifact: a short
summary of the change), NEEDS_CLARIFICATION, or BLOCKED (with blockers).]]

M.READ_SYSTEM = [[
You are working in a git worktree: a checkout of the repository at the run's latest
change. Use the tools to read and search its files and to run commands (paths are
relative to the worktree; you cannot leave it), so that what you report rests on what
you saw and ran. Nothing you change here is kept: the worktree is removed when you
finish. Then call `finish` with your TaskResult: status COMPLETE (with your stage's
artifact), NEEDS_CLARIFICATION, or BLOCKED (with blockers).]]

-- A command's outcome as a terminal would show it, stderr first: a long result
-- keeps its beginning (the first compiler errors) and its end (the test run's
-- verdict, on stdout).
local function command_text(r)
  local head
  if r.timed_out then
    head = r.timeout and ("timed out after %g s: killed (a team's operative sets the limit: command_timeout)")
      :format(r.timeout) or "timed out: killed"
  else
    head = r.signal and ("killed by signal " .. r.signal) or ("exit code " .. tostring(r.code))
  end
  local parts = { head }
  if r.stderr and r.stderr ~= "" then parts[#parts + 1] = "[stderr]\n" .. r.stderr end
  if r.stdout and r.stdout ~= "" then parts[#parts + 1] = "[stdout]\n" .. r.stdout end
  return table.concat(parts, "\n")
end

-- A tool call as its event records it; a command with what it was (its start) and
-- how it ended, which is what a reader of the run wants to know of it.
local function command_event(name, args, v, verr)
  local ev = { name = name, ok = v ~= nil, error = verr }
  if name == "run_command" and type(args) == "table" then
    local cmd = type(args.command) == "table" and table.concat(args.command, " ") or tostring(args.command)
    ev.command = #cmd > 120 and (cmd:sub(1, 117) .. "...") or cmd
    if type(v) == "table" then ev.exit, ev.signal, ev.timed_out = v.code, v.signal, v.timed_out or nil end
  end
  return ev
end

-- A tool's result for the model, at most max bytes. A longer command outcome keeps
-- its first quarter and its last three, with a line saying what was cut between
-- them; anything else (a file) its beginning, with a line saying how to read on.
local function as_text(v, err, max, tool)
  local text
  if v == nil then
    text = "ERROR: " .. tostring(err)
  elseif type(v) == "string" then
    text = v
  elseif tool == "run_command" then
    text = command_text(v)
  else
    text = json.encode(v) or tostring(v)
  end
  if tool == "run_command" then
    text = tools.middle_cut(text, max)
  elseif #text > max then
    text = text:sub(1, max) .. ("\n[cut: %d bytes in all; read further with run_command, e.g. sed -n '400,600p' FILE,"
      .. " or grep]"):format(#text)
  end
  return text
end

-- The conversation grows by every tool result and every file written, and each
-- model call sends all of it: past the model's window the provider refuses the
-- call, after the iterations before it were paid for. Once it passes FIT_AT of the
-- window (by the packing's estimate, 4 bytes a token), the oldest tool results and
-- tool-call arguments give way to a line saying so, newest kept; the last
-- KEEP_RECENT messages, the system prompt and the objective always stay.
local FIT_AT, KEEP_RECENT = 0.8, 6
local ELIDED = "[an earlier tool result, left out to fit the context window: run the tool again if you need it]"

local function size_of(m)
  local n = type(m.content) == "string" and #m.content or 0
  for _, call in ipairs(type(m.tool_calls) == "table" and m.tool_calls or {}) do
    local fn = type(call["function"]) == "table" and call["function"] or {}
    n = n + (type(fn.arguments) == "string" and #fn.arguments or 0)
  end
  return n
end

local function fit(messages, window)
  local limit = window * FIT_AT * 4
  local total = 0
  for _, m in ipairs(messages) do total = total + size_of(m) end
  local elided = 0
  for i = 3, #messages - KEEP_RECENT do
    if total <= limit then break end
    local m = messages[i]
    local before = size_of(m)
    if m.role == "tool" and type(m.content) == "string" and #m.content > #ELIDED then
      m.content = ELIDED
    elseif m.role == "assistant" and type(m.tool_calls) == "table" then
      for _, call in ipairs(m.tool_calls) do
        local fn = type(call["function"]) == "table" and call["function"]
        if fn and type(fn.arguments) == "string" and #fn.arguments > 200 then
          fn.arguments = json.encode{ left_out = ("%d bytes of arguments, to fit the context window"):format(
            #fn.arguments) }
        end
      end
    end
    if size_of(m) < before then
      total, elided = total - before + size_of(m), elided + 1
    end
  end
  return elided, total
end

local function usage_tokens(res)
  local u = type(res.usage) == "table" and res.usage or {}
  return tonumber(u.total_tokens) or ((tonumber(u.prompt_tokens) or 0) + (tonumber(u.completion_tokens) or 0))
end

local function initial_messages(o)
  local own = (o.instructions or M.SYSTEM) .. (o.system and ("\n\n" .. o.system) or "")
  if not o.messages then
    return { { role = "system", content = own }, { role = "user", content = o.objective } }
  end
  local out = {}
  for i, m in ipairs(o.messages) do out[i] = { role = m.role, content = m.content } end
  if out[1] and out[1].role == "system" then
    out[1].content = out[1].content .. "\n\n" .. own
  else
    table.insert(out, 1, { role = "system", content = own })
  end
  return out
end

-- Told before the last model call of the loop, so that the work done so far ends
-- in a TaskResult (COMPLETE, or BLOCKED saying what is left) rather than in the cap.
local function last_call_notice(messages, max_iter)
  local text = ("[Iteration %d of %d, the last: call `finish` now with your TaskResult. If the work is not"
    .. " done, say what is done and what is left.]"):format(max_iter, max_iter)
  local last = messages[#messages]
  if last.role == "tool" or (last.role == "user" and type(last.content) == "string") then
    last.content = (last.content or "") .. "\n\n" .. text
  else
    messages[#messages + 1] = { role = "user", content = text }
  end
end

local function offered_tools(names)
  local offered, schemas = {}, {}
  if not names then
    for _, s in ipairs(tools.SCHEMAS) do offered[s["function"].name] = true end
    return tools.SCHEMAS, offered
  end
  for _, n in ipairs(names) do offered[n] = true end
  for _, s in ipairs(tools.SCHEMAS) do
    if offered[s["function"].name] then schemas[#schemas + 1] = s end
  end
  return schemas, offered
end

function M.run(o)
  if type(o) ~= "table" or type(o.objective) ~= "string" then error("builtin.run: expected { objective =, root = }", 2) end
  local box = o.box
  if not box then
    local err
    box, err = tools.new(o.root, { secrets = o.secrets, timeout = o.timeout, max_output = o.max_output,
                                  lock = o.lock, on_command = o.on_command })
    if not box then return confidence.blocked("cannot open the worktree: " .. tostring(err)), {} end
  end
  local max_iter, budget = o.max_iterations or 30, o.token_budget
  local stuck_repeats, stuck_idle = o.stuck_repeats or 3, o.stuck_idle or 8
  local max_result = o.max_result or 16 * 1024
  local emit = o.emit or function() end
  local stats = { iterations = 0, tokens = 0, tool_calls = 0, changes = 0 }
  local messages = initial_messages(o)
  local schemas, offered = offered_tools(o.tools)
  local last_call, repeats, idle = nil, 0, 0
  local seen = {}

  -- A TaskResult that is not valid is sent back with what is wrong, `retries` times
  -- (the pipeline's limit, as for an objective), then the stage is BLOCKED.
  local invalid, retries = 0, o.retries or 2
  local function malformed(problem)
    invalid = invalid + 1
    emit("task_result_invalid", { attempt = invalid, error = problem })
    if invalid > retries then
      return confidence.blocked(("no valid TaskResult after %d attempts: %s"):format(invalid, problem))
    end
  end

  local function done(result)
    stats.changes = box.changes
    emit("agent_done", { status = result.status, iterations = stats.iterations, tokens = stats.tokens })
    return result, stats
  end

  for iter = 1, max_iter do
    stats.iterations = iter
    if iter == max_iter and iter > 1 then last_call_notice(messages, max_iter) end
    local elided, size = fit(messages, o.context_window or dsl.DEFAULT_WINDOW)
    if elided > 0 then emit("agent_context_fitted", { messages = elided, bytes = size, iteration = iter }) end
    local res, err, code, waits = objective.outlast(o, function()
      return router.chat({ model = o.model, messages = messages, tools = schemas, max_tokens = o.max_tokens,
                           temperature = o.temperature }, { team = o.team, run = o.run })
    end)
    if not res then return done(objective.unreachable(err, code, waits, o.pipeline)) end
    stats.tokens = stats.tokens + usage_tokens(res)
    local choice = type(res.choices) == "table" and res.choices[1]
    local msg = choice and choice.message
    if type(msg) ~= "table" then return done(confidence.blocked("the model's reply has no message")) end
    local calls = msg.tool_calls
    if calls == json.null then calls = nil end
    local cut_off = choice.finish_reason == "length"
    messages[#messages + 1] = { role = "assistant", content = msg.content ~= json.null and msg.content or nil,
                                tool_calls = calls }
    local changes_before = box.changes
    local fresh = false
    if not calls or #calls == 0 then
      -- A TaskResult written as text is accepted like a finish call; one that tried
      -- to be one (a JSON object) is told what is wrong with it.
      local r, problem
      if type(msg.content) == "string" then r, problem = confidence.parse(msg.content) end
      if r then return done(r) end
      local tried = problem and not problem:find("^the reply is not a JSON object") and problem ~= "the reply was empty"
      local given_up = tried and malformed(problem)
      if given_up then return done(given_up) end
      messages[#messages + 1] = { role = "user", content = (tried and ("Your reply is not a valid TaskResult: "
        .. problem .. ". ") or "") .. "Use the tools to do the work; when it is done, call `finish` with your"
        .. " TaskResult." }
    else
      for _, call in ipairs(calls) do
        stats.tool_calls = stats.tool_calls + 1
        local fn = type(call["function"]) == "table" and call["function"] or {}
        local name, argtext = tostring(fn.name), fn.arguments
        local key = name .. "\0" .. tostring(argtext)
        if key == last_call then repeats = repeats + 1 else last_call, repeats = key, 1 end
        if not seen[key] then seen[key], fresh = true, true end
        if repeats >= stuck_repeats then
          return done(confidence.blocked(("stuck: the same call %s(%s) was repeated %d times"):format(
            name, as_text(argtext, nil, 200), repeats)))
        end
        local args = type(argtext) == "string" and json.decode(argtext) or argtext
        local v, verr
        if not offered[name] then
          v, verr = nil, ("ETOOL: %s is not one of this operative's tools"):format(name)
        elseif type(args) ~= "table" and cut_off then
          -- The reply hit its output limit in the middle of the arguments (a whole
          -- file in write_file): the same call again would be cut the same way.
          v, verr = nil, ("EINVAL: your reply was cut off at its output limit (max_tokens%s) inside the arguments"
            .. " of %s, so they are incomplete: nothing was done. Make the change in smaller steps: edit_file for"
            .. " part of a file, or write_file with a first part and edit_file to add the rest"):format(
            o.max_tokens and (" " .. o.max_tokens) or "", name)
        elseif type(args) ~= "table" then
          v, verr = nil, "EINVAL: the arguments are not a JSON object"
        else
          v, verr = box:call(name, args)
        end
        emit("tool_call", command_event(name, args, v, verr))
        if name == "finish" and box.result then
          local r, problem = confidence.parse(json.encode(box.result))
          if r then return done(r) end
          local given_up = malformed(problem)
          if given_up then return done(given_up) end
          box.result = nil
          v, verr = nil, "EINVAL: not a valid TaskResult: " .. problem
        end
        messages[#messages + 1] = { role = "tool", tool_call_id = call.id,
                                    content = as_text(v, verr, max_result, name) }
      end
    end
    if budget and stats.tokens >= budget then
      return done(confidence.blocked(("token budget exhausted: %d of %d tokens used after %d iterations"):format(
        stats.tokens, budget, iter)))
    end
    if box.changes ~= changes_before then idle = 0 elseif not fresh then idle = idle + 1 end
    if idle >= stuck_idle then
      return done(confidence.blocked(("stuck: %d iterations since the last file change made no call that was"
        .. " not made before"):format(idle)))
    end
  end
  return done(confidence.blocked(("iteration cap reached: %d iterations without finish"):format(max_iter)))
end

return M
