-- factory.confidence: the TaskResult every objective returns, and the confidence
-- gate that decides what happens next.
--
--   confidence.parse(text) -> result | nil, "what is wrong with it"
--       text: the model's reply; the JSON object may be fenced (```json ... ```) or
--       surrounded by prose; the status is read in any case ("complete"), and a list
--       given as one string is that one item. result:
--       { status, reasoning, blockers, assumptions_made,
--       verified_facts, clarification_needed = nil | { team =, question = },
--       artifact (required when COMPLETE), learnings }
--   confidence.blocked(reason [, reasoning]) -> a BLOCKED result made by the engine
--   confidence.gate(result) -> "advance" | "clarify" | "escalate"
--   confidence.CONTRACT: the instructions given to every operative
local json = require "factory.json"

local M = {}

M.CONTRACT = [[
Reply with exactly one JSON object, the TaskResult, and nothing else:
{
  "status": "COMPLETE" | "NEEDS_CLARIFICATION" | "BLOCKED",
  "reasoning": "why you reached this status, in a few sentences",
  "blockers": ["what stops you (required when BLOCKED)"],
  "assumptions_made": ["defaults you chose where the input was silent"],
  "verified_facts": ["facts you checked yourself; later teams rely on them"],
  "clarification_needed": null | {"team": "a team you may ask", "question": "one specific question"},
  "artifact": "your deliverable (required when COMPLETE; Markdown text or a JSON object)",
  "learnings": ["short discoveries worth remembering for later work (optional)"]
}
Use COMPLETE only when the artifact meets the objective and its acceptance criteria.
Use NEEDS_CLARIFICATION when another team can answer what you cannot decide safely.
Use BLOCKED when nobody but a human can unblock you.]]

local STATUSES = { COMPLETE = true, NEEDS_CLARIFICATION = true, BLOCKED = true }
local LISTS = { "blockers", "assumptions_made", "verified_facts", "learnings" }

-- Where the JSON in candidate broke, as the decoder says, with the text around it:
-- a model told where its reply went wrong mends it rather than resending the mistake.
local function json_problem(candidate, err)
  local at = tonumber(tostring(err):match("at character (%d+)"))
  local why = tostring(err):gsub("^EJSON: ", ""):gsub(" at character %d+$", "")
  if not at then return why end
  local near = candidate:sub(math.max(1, at - 30), at + 10):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  return ("%s at character %d of the JSON, near `%s`"):format(why, at, near)
end

-- The JSON object in a reply: the whole text, a fenced block, or the outermost
-- braces; else nil and what is wrong with the likeliest of them.
local function extract(text)
  local v, err = json.decode(text)
  if type(v) == "table" then return v end
  local candidate = text
  local fenced = text:match("```json%s*(.-)```") or text:match("```%s*(.-)```")
  if fenced then
    v, err = json.decode(fenced)
    if type(v) == "table" then return v end
    candidate = fenced
  end
  local first, last = text:find("{", 1, true), nil
  for i = #text, 1, -1 do
    if text:sub(i, i) == "}" then last = i break end
  end
  if first and last and first < last then
    local braces = text:sub(first, last)
    local v2, err2 = json.decode(braces)
    if type(v2) == "table" then return v2 end
    if not fenced then candidate, err = braces, err2 end
  end
  if candidate:find("{", 1, true) and err then return nil, json_problem(candidate, err) end
end

local function nonempty(s) return type(s) == "string" and s:find("%S") ~= nil end

function M.parse(text)
  if type(text) ~= "string" or text == "" then return nil, "the reply was empty" end
  local r, problem = extract(text)
  if not r then return nil, "the reply is not a JSON object" .. (problem and (": " .. problem) or "") end
  -- "complete" is what was meant: sending it back would cost a model call.
  if type(r.status) == "string" and STATUSES[r.status:upper()] then r.status = r.status:upper() end
  if not STATUSES[r.status] then
    return nil, ("status must be COMPLETE, NEEDS_CLARIFICATION or BLOCKED, got %s"):format(json.encode(r.status or json.null))
  end
  if not nonempty(r.reasoning) then return nil, "reasoning must be a non-empty string" end
  for _, k in ipairs(LISTS) do
    local v = r[k]
    if v == nil or v == json.null then
      r[k] = {}
    elseif type(v) == "string" then
      -- one item written without its list: meant as that list
      r[k] = v:find("%S") and { v } or {}
    elseif type(v) ~= "table" then
      return nil, k .. " must be a list of strings"
    else
      for _, s in ipairs(v) do
        if type(s) ~= "string" then return nil, k .. " must be a list of strings" end
      end
    end
  end
  local c = r.clarification_needed
  if c == json.null then c = nil end
  if r.status == "NEEDS_CLARIFICATION" then
    if type(c) ~= "table" or not nonempty(c.team) or not nonempty(c.question) then
      return nil, 'NEEDS_CLARIFICATION needs clarification_needed = {"team": ..., "question": ...}'
    end
  end
  r.clarification_needed = type(c) == "table" and c or nil
  if r.status == "BLOCKED" and #r.blockers == 0 then return nil, "BLOCKED needs at least one blocker" end
  if r.artifact == json.null then r.artifact = nil end
  if r.status == "COMPLETE" and not (nonempty(r.artifact) or type(r.artifact) == "table") then
    return nil, "COMPLETE needs the artifact"
  end
  return r
end

function M.blocked(reason, reasoning)
  return { status = "BLOCKED", reasoning = reasoning or reason, blockers = { reason }, assumptions_made = {},
           verified_facts = {}, learnings = {} }
end

local GATE = { COMPLETE = "advance", NEEDS_CLARIFICATION = "clarify", BLOCKED = "escalate" }

function M.gate(result)
  return GATE[result.status]
end

-- The artifact as text, for the next stages' context and for people.
function M.artifact_text(result)
  local a = result.artifact
  if type(a) == "table" then return json.encode(a) end
  return a or ""
end

return M
