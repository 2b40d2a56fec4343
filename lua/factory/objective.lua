-- factory.objective: one objective, executed by one operative: its context packed
-- into the model's window, the model called through the router, the reply checked
-- as a TaskResult and sent back with the error when it is malformed.
--
--   objective.run(o) -> result        (a TaskResult; never raises for model trouble)
--   o: { run_id, team (definition), operative (definition), anchor = text,
--        stage = { name, objective, acceptance, artifact } | nil,
--        question = { from =, text = } | nil    (a clarification asked of this team),
--        inputs = { { stage, team, text } }, memory = { { bank, content } },
--        learnings = { text }, answers = { { from, question, answer } },
--        retries = n (corrective retries, default 2), summarizer = alias ("factory/cheap"),
--        outage_retries = n (default 3), outage_wait_s = s (default 30),
--        emit = fn(kind, data) }
--   objective.pack(o) -> messages, { tokens =, window =, summarised = bool }
--   objective.window(team, operative) -> the operative's context window in tokens
--   objective.tokens(text) -> the estimate of text's tokens that packing uses
--   objective.outlast(o, call), objective.unreachable(err, code, waits [, pipeline]): the outage
--       wait and the BLOCKED result of a failed model call, for the built-in agent too
-- A budget the router refuses (EBUDGET), a provider that cannot answer, and a reply
-- that stays malformed all end as a BLOCKED result that says why.
-- An outage is waited out first: when the model cannot be reached (refused, timed
-- out, reset, not resolved, every circuit open, a 5xx or 429 after the router's own
-- retries and fallbacks), the objective emits "model_unavailable", waits and asks
-- again, outage_retries times, the wait doubling from outage_wait_s; an overnight
-- run then survives a provider's bad minutes instead of waiting for a human.
local router = require "factory.router"
local fiber = require "factory.fiber"
local confidence = require "factory.confidence"
local dsl = require "factory.dsl"
local json = require "factory.json"

local M = {}

local SUMMARY_AT = 0.8

local function tokens(text) return math.ceil(#text / 4) + 4 end
M.tokens = tokens

function M.window(team, op)
  return op.context_window or team.context_window or dsl.DEFAULT_WINDOW
end

local function bullets(list)
  local out = {}
  for _, s in ipairs(list) do out[#out + 1] = "- " .. s end
  return table.concat(out, "\n")
end

-- System prompts depend only on the definitions and on what the objective is (a
-- stage, or a clarification), so each is built once, with its message's JSON, per
-- operative definition and team (a reload makes new tables: the old entries go with
-- them).
local prompts = setmetatable({}, { __mode = "k" })

local function build_system_prompt(o)
  local team, op = o.team, o.operative
  local parts = {
    ("team: %s; operative: %s; objective: %s"):format(team.name, op.name,
      o.question and "clarification" or ("stage " .. o.stage.name)),
    op.prompt,
    ("You work in the %s team (%s)."):format(team.name, team.description),
  }
  if #team.may_ask > 0 and not o.question then
    parts[#parts + 1] = "Teams you may ask for a clarification: " .. table.concat(team.may_ask, ", ") .. "."
  end
  parts[#parts + 1] = confidence.CONTRACT
  return table.concat(parts, "\n\n")
end

-- -> the prompt's entry: { text =, json = the system message as JSON }
local function system_prompt(o)
  local per_op = prompts[o.operative]
  if not per_op or per_op.team ~= o.team then
    per_op = { team = o.team, entries = {} }
    prompts[o.operative] = per_op
  end
  -- A stage name is a key of its own; false stands for a clarification.
  local key = not o.question and o.stage.name
  local entry = per_op.entries[key]
  if not entry then
    local text = build_system_prompt(o)
    entry = { text = text, json = assert(json.encode{ role = "system", content = text }) }
    per_op.entries[key] = entry
  end
  return entry
end

local function anchor_text(o)
  local parts = { "# Objective\n" .. o.anchor }
  if o.question then
    parts[#parts + 1] = ("# Question from the %s team\n%s\n\nAnswer it: your artifact is the answer."):format(
      o.question.from, o.question.text)
  else
    local st = o.stage
    parts[#parts + 1] = ("# Your stage: %s\n%s"):format(st.name, st.objective or "Do your team's part of the objective.")
    if #st.acceptance > 0 then parts[#parts + 1] = "Acceptance criteria:\n" .. bullets(st.acceptance) end
    parts[#parts + 1] = "Deliver: " .. st.artifact
  end
  return table.concat(parts, "\n\n")
end

-- The material around the anchor, oldest first: what may be summarised, and what
-- is too recent to be (the last stage's output and every answer received).
local function material(o)
  local older, recent = {}, {}
  for i, input in ipairs(o.inputs or {}) do
    local text = ("## From stage %s (%s)\n%s"):format(input.stage, input.team, input.text)
    if i == #o.inputs then recent[#recent + 1] = text else older[#older + 1] = text end
  end
  if o.memory and #o.memory > 0 then
    local lines = {}
    for _, f in ipairs(o.memory) do lines[#lines + 1] = ("- [%s] %s"):format(f.bank, f.content) end
    older[#older + 1] = "## Recalled memory\n" .. table.concat(lines, "\n")
  end
  if o.learnings and #o.learnings > 0 then
    older[#older + 1] = "## Learnings of your team\n" .. bullets(o.learnings)
  end
  for _, a in ipairs(o.answers or {}) do
    recent[#recent + 1] = ("## Answer from %s to the question %q\n%s"):format(a.from, a.question, a.answer)
  end
  return older, recent
end

local function summarise(o, text, target)
  local res = router.chat({
    model = o.summarizer or "factory/cheap",
    max_tokens = math.max(64, target),
    messages = {
      { role = "system", content = "You compress working notes for another agent. Keep every requirement, decision, "
        .. "interface, name and number; drop repetition and prose. Plain text, at most " .. target .. " tokens." },
      { role = "user", content = text },
    },
  }, { team = o.team.name, run = o.run_id })
  local out = res and res.choices and res.choices[1] and res.choices[1].message.content
  if type(out) == "string" and out:find("%S") then return out end
end

-- Keeps the end of text within n tokens: the newest part of old material matters most.
local function tail(text, n)
  local keep = math.max(0, (n - 4) * 4)
  if #text <= keep then return text end
  return "[earlier material cut to fit the context window]\n" .. text:sub(#text - keep + 1)
end

function M.pack(o)
  local op, team = o.operative, o.team
  local window = M.window(team, op)
  local limit = math.floor(window * SUMMARY_AT)
  local system, anchor = system_prompt(o).text, anchor_text(o)
  local older, recent = material(o)
  local fixed = tokens(system) + tokens(anchor)
  local old_text, recent_text = table.concat(older, "\n\n"), table.concat(recent, "\n\n")
  local total = fixed + (old_text ~= "" and tokens(old_text) or 0) + (recent_text ~= "" and tokens(recent_text) or 0)
  local info = { window = window, summarised = false }
  if total > limit and old_text ~= "" then
    local room = math.max(64, limit - fixed - tokens(recent_text))
    local summary = summarise(o, old_text, math.floor(room / 2))
    local before = total
    old_text = tail(summary and ("## Summary of earlier material\n" .. summary) or old_text, room)
    info.summarised = summary ~= nil
    total = fixed + tokens(old_text) + tokens(recent_text)
    if o.emit then o.emit("context_packed", { before = before, after = total, window = window,
                                             summarised = info.summarised }) end
  end
  if total > limit and recent_text ~= "" then
    recent_text = tail(recent_text, math.max(64, limit - fixed - (old_text ~= "" and tokens(old_text) or 0)))
    total = fixed + tokens(old_text) + tokens(recent_text)
  end
  local messages = { { role = "system", content = system }, { role = "user", content = anchor } }
  for _, text in ipairs({ old_text, recent_text }) do
    if text ~= "" then messages[#messages + 1] = { role = "user", content = text } end
  end
  info.tokens = total
  return messages, info
end

-- The first choice's message content, if it is text (confidence.parse says what is
-- wrong with anything else).
local function truncated(res)
  local choice = type(res) == "table" and res.choices and res.choices[1]
  return type(choice) == "table" and choice.finish_reason == "length"
end

local function reply_text(res)
  local choice = type(res) == "table" and res.choices and res.choices[1]
  local content = type(choice) == "table" and type(choice.message) == "table" and choice.message.content
  if type(content) == "string" then return content end
end

-- The chat request as router.chat_parts takes it: each message's JSON (the system
-- message's is the cached one) and the operative's other members, also cached.
local function request_parts(o, messages)
  local op, team = o.operative, o.team
  local system = system_prompt(o)
  local list = {}
  for i, m in ipairs(messages) do
    list[i] = m.role == "system" and m.content == system.text and system.json or assert(json.encode(m))
  end
  local per_op = prompts[op]
  if not per_op.members then
    per_op.members = assert(json.encode{ max_tokens = op.max_tokens, temperature = op.temperature }):sub(2, -2)
  end
  return { model = op.model or team.model, members = per_op.members, messages = list }
end

local UNREACHABLE = { ECONNREFUSED = true, ETIMEDOUT = true, ECONNRESET = true, EHOST = true, EUNAVAILABLE = true }

local function outage(code, err)
  if UNREACHABLE[code] then return true end
  if code ~= "EUPSTREAM" then return false end
  local status = tonumber(tostring(err):match("HTTP (%d%d%d)"))
  return status ~= nil and (status == 429 or status >= 500)
end

-- call() -> res | nil, err, code: a model call, made again while the model is out of
-- reach (see the top; o: outage_retries, outage_wait_s, emit). -> call's results, then
-- the number of waits.
function M.outlast(o, call)
  local waits, wait, most = 0, o.outage_wait_s or 30, o.outage_retries or 3
  while true do
    local res, err, code = call()
    if res or not outage(code, err) or waits >= most then return res, err, code, waits end
    waits = waits + 1
    if o.emit then
      o.emit("model_unavailable", { code = code, error = tostring(err):gsub("^E%u+: ", ""), wait_s = wait,
                                    wait = waits, waits = most })
    end
    fiber.sleep(wait)
    wait = wait * 2
  end
end

-- A call whose estimate is more than its budget's whole limit: no wait, and no
-- answer, would let it through. -> the estimate and the limit with their unit, or nil.
local function beyond_limit(why)
  local limit, cost = why:match(" of ([%d.]+) USD left.-this call may cost ([%d.]+)")
  local unit = "USD"
  if not limit then
    limit, cost = why:match(" of ([%d.]+) tokens left.-this call may use ([%d.]+)")
    unit = "tokens"
  end
  if limit and tonumber(cost) > tonumber(limit) then return ("%s %s"):format(cost, unit), ("%s %s"):format(limit, unit) end
end

-- What the human asked about a spent budget must do: where that budget is set (a
-- raised one applies when the run goes on), or how the run ends.
local function budget_question(why, pipeline)
  local kind, name = why:match("budget exhausted: (%a+) (%S+) has")
  local cost, limit = beyond_limit(why)
  if kind == "team" and cost then
    return ("One call of team %s may cost %s (its prompt, and max_tokens at the dearest price of its model's chain),"
      .. " more than the team's whole daily budget of %s: raise budget.usd_per_day (or tokens_per_day) in teams/%s.lua,"
      .. " or budgets.teams.%s in factory.lua, above it, or lower the operative's max_tokens; then answer this to go"
      .. " on."):format(name, cost, limit, name, name)
  elseif kind == "run" and cost then
    return ("One call may cost %s (its prompt, and max_tokens at the dearest price of its model's chain), more than"
      .. " all the run's budget had left (%s): raise limits.budget_usd in pipelines/%s.lua, or lower the operative's"
      .. " max_tokens; then answer this to go on."):format(cost, limit, pipeline or "<its pipeline>")
  elseif kind == "team" then
    return ("Team %s's budget for today is spent. Raise budget.usd_per_day (or tokens_per_day) in teams/%s.lua,"
      .. " or budgets.teams.%s in factory.lua, or wait until its day starts again (budgets.utc_offset); then"
      .. " answer this to go on."):format(name, name, name)
  elseif kind == "run" then
    return ("The run's budget is spent. Raise limits.budget_usd in pipelines/%s.lua, then answer this to go on;"
      .. " or end the run: factory runs cancel %s."):format(pipeline or "<its pipeline>", name)
  end
  return "The model router refused the call because a budget is spent; a human must raise it or stop the run."
end

-- What a failed call comes to: BLOCKED, saying why (and how long it was waited for).
function M.unreachable(err, code, waits, pipeline)
  local why = tostring(err):gsub("^E%u+: ", "")
  if code == "EBUDGET" then
    return confidence.blocked(why, budget_question(why, pipeline))
  end
  if outage(code, err) then
    local waited = (waits or 0) > 0 and (" (still, after %d wait(s) for it to come back)"):format(waits) or ""
    return confidence.blocked(("the model could not be reached (%s): %s%s"):format(code, why, waited))
  end
  -- The provider answered: waiting, or a human's answer alone, would not change it.
  local status = code == "EUPSTREAM" and tonumber(tostring(err):match("HTTP (4%d%d)"))
  if status == 401 or status == 403 then
    local provider = why:match("^([^/:%s]+)/") or "the provider"
    return confidence.blocked(("the model's provider refused the credentials (%s): %s: check the api_key of provider"
      .. " %s in factory.lua (and the environment variable it reads), then answer this to try again"):format(code,
      why, provider))
  elseif status then
    return confidence.blocked(("the model's provider refused the request (%s): %s"):format(code, why))
  end
  return confidence.blocked(("the model call failed (%s): %s"):format(code, why))
end

-- The router's answer to one request: res, or nil and the BLOCKED result to end with.
local function ask(o, messages)
  local res, err, code, waits = M.outlast(o, function()
    return router.chat_parts(request_parts(o, messages), { team = o.team.name, run = o.run_id })
  end)
  if res then return res end
  return nil, M.unreachable(err, code, waits, o.pipeline)
end

function M.run(o)
  local messages = M.pack(o)
  local retries = o.retries or 2
  local problem
  for attempt = 1, retries + 1 do
    local res, blocked = ask(o, messages)
    if not res then return blocked end
    local text = reply_text(res)
    local result
    result, problem = confidence.parse(text)
    if result then return result end
    -- A reply cut at the token limit is not a malformed one: say so, to the model
    -- (shorter) and, if it stays too long, to the human (a larger max_tokens).
    local cut = truncated(res)
    if cut then problem = ("the reply was cut off at the token limit (max_tokens %s)"):format(o.operative.max_tokens or "default") end
    if o.emit then o.emit("task_result_invalid", { attempt = attempt, error = problem }) end
    messages[#messages + 1] = { role = "assistant", content = type(text) == "string" and text or "" }
    messages[#messages + 1] = { role = "user", content = cut
      and "Your reply was cut off at the token limit. Reply again with only the JSON object, shorter: keep the artifact brief."
      or ("Your reply is not a valid TaskResult: %s. Reply again with only the corrected JSON object."):format(problem) }
  end
  local hint = problem:find("cut off at the token limit", 1, true)
    and " (raise the operative's max_tokens, or split its objective)" or ""
  return confidence.blocked(("no valid TaskResult after %d attempts: %s%s"):format(retries + 1, problem, hint))
end

return M
