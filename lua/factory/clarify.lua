-- factory.clarify: the clarification broker. request_clarification(target, question)
-- runs a focused objective on the target team and brings its answer back to the
-- asker. The target may itself need a clarification; the chain is bounded.
--
--   clarify.ask(ctx, target, question) -> answer | nil, why
--   ctx: { db, run_id, stage = root stage name, limits (the pipeline's), asker = team,
--          count = questions this objective already asked, team = fn(name) -> team | nil,
--          answer = fn(team, question = { from, text }, answers) -> TaskResult,
--          emit = fn(kind, data) }
-- nil, why means a limit was hit or nobody could answer: the caller escalates the
-- question to a human. The limits: max_clarifications per objective, max_hops
-- (depth of the chain), no self-routing, no cycle (A asks B asks A), may_ask, and
-- clarification_timeout_s for the whole exchange. Every question and answer is mail.
-- The target is read as people write team names too ("Solution Architecture" is
-- solution_architecture, when the asker may ask it).
local fiber = require "factory.fiber"
local records = require "factory.records"
local confidence = require "factory.confidence"

local M = {}

local function contains(list, x)
  for _, v in ipairs(list) do
    if v == x then return true end
  end
  return false
end

local function path(chain, target)
  return table.concat(chain, " -> ") .. " -> " .. target
end

local ask

-- The target's focused objective, re-run with each answer it needed, until it answers.
local function resolve(ctx, chain, team, question)
  local answers, count = {}, 0
  for _ = 1, ctx.limits.max_iterations do
    local r = ctx.answer(team, question, answers)
    if r.status == "COMPLETE" then return confidence.artifact_text(r) end
    if r.status == "BLOCKED" then
      return nil, ("the %s team could not answer: %s"):format(team.name, table.concat(r.blockers, "; "))
    end
    local sub = r.clarification_needed
    local inner = { chain = chain, asker = team, count = count }
    local answer, why = ask(ctx, inner, sub.team, sub.question)
    if not answer then return nil, why end
    count = count + 1
    answers[#answers + 1] = { from = sub.team, question = sub.question, answer = answer }
  end
  return nil, ("the %s team gave no answer within %d iterations"):format(team.name, ctx.limits.max_iterations)
end

-- The team of may_ask a model meant by target: "Solution Architecture" or
-- "solution-architecture" is solution_architecture.
local function named(may_ask, target)
  local want = tostring(target):lower():gsub("^%s+", ""):gsub("%s+$", ""):gsub("[%s%-]+", "_")
  for _, name in ipairs(may_ask or {}) do
    if name:lower() == want then return name end
  end
  return target
end

-- at: { chain = teams from the root asker to this asker, asker = team, count = n }
function ask(ctx, at, target, question)
  local asker, limits = at.asker, ctx.limits
  target = named(asker.may_ask, target)
  local depth = #at.chain
  if target == asker.name then return nil, ("self-routing: the %s team asked itself"):format(target) end
  if not contains(asker.may_ask, target) then
    return nil, ("the %s team may not ask %s (not in its may_ask)"):format(asker.name, target)
  end
  local team = ctx.team(target)
  if not team then return nil, ("no team %q to ask"):format(target) end
  if at.count >= limits.max_clarifications then
    return nil, ("clarification limit reached: %d per objective (max_clarifications)"):format(limits.max_clarifications)
  end
  if contains(at.chain, target) then return nil, "cycle: " .. path(at.chain, target) end
  if depth > limits.max_hops then
    return nil, ("hop limit reached: %s (max_hops = %d)"):format(path(at.chain, target), limits.max_hops)
  end
  local id = records.mail(ctx.db, { sender = asker.name, recipient = target, kind = "clarification", run_id = ctx.run_id,
    body = question, data = { stage = ctx.stage, depth = depth } })
  ctx.emit("clarification", { id = id, from = asker.name, to = target, question = question, depth = depth })
  local chain = { unpack(at.chain) }
  chain[#chain + 1] = target
  local answer, why = resolve(ctx, chain, team, { from = asker.name, text = question })
  if answer then
    records.mail(ctx.db, { sender = target, recipient = asker.name, kind = "answer", run_id = ctx.run_id,
      in_reply_to = id, body = answer, data = { stage = ctx.stage, depth = depth } })
    ctx.emit("clarification_answered", { id = id, from = target, to = asker.name, depth = depth })
  end
  return answer, why
end

function M.ask(ctx, target, question)
  local at = { chain = { ctx.asker.name }, asker = ctx.asker, count = ctx.count }
  local secs = ctx.limits.clarification_timeout_s
  local ok, answer, why = fiber.with_timeout(secs, ask, ctx, at, target, question)
  if ok == nil then return nil, ("no answer from %s within %g s (clarification_timeout_s)"):format(target, secs) end
  if not ok then error(answer, 0) end
  return answer, why
end

return M
