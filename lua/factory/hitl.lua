-- factory.hitl: escalations to a human. An escalation is a mail to "human"; the
-- run it blocks waits (runs.state = 'waiting') until a human answers it, in any
-- process, at any later time: everything is in the store.
--
--   hitl.escalate(tx, { run_id, stage, team, operative, question, reason }) -> id
--   hitl.get(db, id) -> { id, run_id, stage, team, question, reason, answer = text | nil }
--   hitl.list(db [, { all = bool }]) -> open escalations (all: answered ones too), oldest first
--   hitl.answer(db, id, text [, who]) -> true | nil, err, code   (ENOENT, EANSWERED)
--   hitl.answers(db, run_id [, stage]) -> { { from, question, answer, human = bool, at, stage } }
--       every answer the stage's objective received (without stage: every stage's),
--       from teams and humans, in order
--   hitl.close_open(tx, run_id, why)   answers the run's open escalations with why,
--       as "factory" (the run ended without them)
local records = require "factory.records"
local time = require "factory.core.time"

local M = {}

function M.escalate(tx, e)
  local id = records.mail(tx, { sender = e.team, recipient = "human", kind = "escalation", run_id = e.run_id,
    subject = e.reason, body = e.question, data = { stage = e.stage, operative = e.operative } })
  assert(tx:exec("UPDATE runs SET state = 'waiting', updated_at = ? WHERE id = ?", { time.now(), e.run_id }))
  records.event(tx, e.run_id, "escalated", { id = id, stage = e.stage, team = e.team, reason = e.reason,
                                             question = e.question })
  return id
end

local SELECT = "SELECT e.id, e.run_id, e.sender AS team, e.subject AS reason, e.body AS question, e.data,"
  .. " e.created_at, a.body AS answer, a.sender AS answered_by FROM mail e"
  .. " LEFT JOIN mail a ON a.in_reply_to = e.id AND a.kind = 'answer' WHERE e.kind = 'escalation'"

local function shaped(row)
  row.stage = type(row.data) == "table" and row.data.stage or nil
  row.data = nil
  return row
end

function M.get(db, id)
  local rows = assert(db:query(SELECT .. " AND e.id = ?", { id }))
  return rows[1] and shaped(rows[1])
end

function M.list(db, opts)
  local sql = SELECT .. ((opts and opts.all) and "" or " AND a.id IS NULL") .. " ORDER BY e.id"
  local rows = assert(db:query(sql))
  for i, r in ipairs(rows) do rows[i] = shaped(r) end
  return rows
end

function M.answer(db, id, text, who)
  if type(text) ~= "string" or not text:find("%S") then return nil, "EINVAL: the answer is empty", "EINVAL" end
  return db:tx(function(tx)
    local rows = assert(tx:query(SELECT .. " AND e.id = ?", { id }))
    local e = rows[1] and shaped(rows[1])
    if not e then return nil, ("ENOENT: no escalation %s"):format(tostring(id)), "ENOENT" end
    if e.answer then return nil, ("EANSWERED: escalation %d was already answered"):format(e.id), "EANSWERED" end
    records.mail(tx, { sender = who or "human", recipient = e.team, kind = "answer", run_id = e.run_id,
      in_reply_to = e.id, body = text, data = { stage = e.stage } })
    assert(tx:exec("UPDATE runs SET state = 'pending', updated_at = ? WHERE id = ? AND state = 'waiting'",
      { time.now(), e.run_id }))
    records.event(tx, e.run_id, "human_answered", { id = e.id, stage = e.stage, by = who or "human", answer = text })
    return true
  end)
end

-- Top-level answers only: a clarification asked inside another clarification
-- (depth > 1) was already folded into the answer it led to.
-- Answers, in tx, every escalation of the run still open, with `why` (the run ended
-- without them): nobody is asked a question that no run waits on.
function M.close_open(tx, run_id, why)
  local open = assert(tx:query(SELECT .. " AND a.id IS NULL AND e.run_id = ?", { run_id }))
  for _, row in ipairs(open) do
    local e = shaped(row)
    records.mail(tx, { sender = "factory", recipient = e.team, kind = "answer", run_id = run_id, in_reply_to = e.id,
                       body = why, data = { stage = e.stage } })
  end
end

function M.answers(db, run_id, stage)
  local rows = assert(db:query("SELECT a.sender, a.body, a.data, a.created_at, q.body AS question, q.kind AS asked"
    .. " FROM mail a JOIN mail q ON q.id = a.in_reply_to WHERE a.run_id = ? AND a.kind = 'answer' ORDER BY a.id",
    { run_id }))
  local out = {}
  for _, r in ipairs(rows) do
    local d = type(r.data) == "table" and r.data or {}
    if (stage == nil or d.stage == stage) and (d.depth or 1) == 1 then
      out[#out + 1] = { from = r.sender, question = r.question, answer = r.body, human = r.asked == "escalation",
                        at = r.created_at, stage = d.stage }
    end
  end
  return out
end

return M
