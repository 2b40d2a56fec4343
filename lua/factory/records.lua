-- factory.records: what a run leaves behind, for people and for the audit log.
--
--   records.event(q, run_id, kind, data)          the run's timeline (events table)
--   records.events(q, run_id, { { kind, data }, ... })   several, in order, in one statement
--   records.mail(q, { sender, recipient, kind, run_id, in_reply_to, subject, body, data })
--       -> id    every agent<->agent and agent<->human message
--   records.decision(q, { run_id, stage, team, operative, decision, reasoning, data })
--   records.model_call(q, record [, operative])  one router call (router.on_call record),
--       its first-token latency, error code and attempt chain included; the call's
--       budget hold (record.hold, factory.budgets) goes in the same statement group. A
--       run id the store does not know is recorded as no run: the call was paid for.
--   records.team_spending(q, since [, team]) -> { { team =, usd =, tokens = }, ... }
--       what the model calls recorded since that time (Unix seconds) cost, per team
-- q is a db or a transaction: written inside a transaction, a record commits or
-- rolls back with the work it describes. Mail, decisions and model calls are also
-- appended to the hash-chained audit log. Each returns the row id, or raises: a
-- record that cannot be written must not be silently lost.
local audit = require "factory.audit"
local time = require "factory.core.time"

local M = {}

local function must(what, ok, err)
  if not ok then error(("records: cannot write the %s: %s"):format(what, tostring(err)), 3) end
  return ok
end

-- What makes an INSERT report its id: SQLite reports a plain INSERT's rowid by
-- itself, where RETURNING would cost as much again as the INSERT.
local function returning(q)
  return q.backend == "postgres" and " RETURNING id" or ""
end

local function audited(q, kind, actor, run_id, payload)
  must("audit record", audit.append(q, { kind = kind, actor = actor, run_id = run_id, payload = payload }))
end

function M.event(q, run_id, kind, data)
  return must("event", q:exec("INSERT INTO events (run_id, kind, data, created_at) VALUES (?, ?, ?, ?)" .. returning(q),
    { run_id, kind, data or {}, time.now() })).last_id
end

local EVENT_ROW = "(?, ?, ?, ?)"

function M.events(q, run_id, list)
  if #list == 0 then return end
  local rows, params = {}, {}
  for i, e in ipairs(list) do
    rows[i] = EVENT_ROW
    local at = (i - 1) * 4
    params[at + 1], params[at + 2], params[at + 3], params[at + 4] = run_id, e[1], e[2] or {}, time.now()
  end
  params.n = #list * 4
  return must("event", q:exec("INSERT INTO events (run_id, kind, data, created_at) VALUES " .. table.concat(rows, ", ")
    .. returning(q), params)).last_id
end

function M.mail(q, m)
  local id = must("mail", q:exec("INSERT INTO mail (sender, recipient, kind, run_id, in_reply_to, subject, body, data,"
    .. " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)" .. returning(q),
    { m.sender, m.recipient, m.kind, m.run_id, m.in_reply_to, m.subject, m.body, m.data, time.now(), n = 9 })).last_id
  audited(q, "mail." .. m.kind, m.sender, m.run_id,
          { id = id, to = m.recipient, in_reply_to = m.in_reply_to, subject = m.subject, body = m.body })
  return id
end

function M.decision(q, d)
  local id = must("decision", q:exec("INSERT INTO decisions (run_id, stage, team, operative, decision, reasoning, data,"
    .. " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)" .. returning(q),
    { d.run_id, d.stage, d.team, d.operative, d.decision, d.reasoning, d.data, time.now(), n = 8 })).last_id
  audited(q, "decision", d.operative and (d.team .. "/" .. d.operative) or d.team, d.run_id,
          { id = id, stage = d.stage, decision = d.decision, reasoning = d.reasoning, data = d.data })
  return id
end

-- A call that never reached a provider (a budget error, an unknown alias) has none.
local function nonempty(s)
  if s == nil or s == "" then return "-" end
  return s
end

-- The chain is a JSON list even when nothing was tried (an empty table would be
-- stored as {}).
local function attempts_of(r)
  if r.attempts and next(r.attempts) then return r.attempts end
  return "[]"
end

function M.model_call(q, r, operative)
  local run_id = tonumber(r.run)
  local id = must("model call", q:exec("INSERT INTO model_calls (run_id, team, operative, alias, provider, model,"
    .. " prompt_tokens, completion_tokens, cost_usd, latency_ms, first_token_ms, status, code, error, attempts,"
    .. " created_at) VALUES ((SELECT id FROM runs WHERE id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    .. returning(q),
    { run_id, r.team, operative, r.alias, nonempty(r.provider), nonempty(r.model), r.prompt_tokens or 0,
      r.completion_tokens or 0, r.cost_usd or 0, r.latency_ms, r.first_token_ms, r.status, r.code, r.error,
      attempts_of(r), time.now(), n = 16 })).last_id
  audited(q, "model_call", r.team, run_id,
          { id = id, alias = r.alias, provider = r.provider, model = r.model, status = r.status, code = r.code,
            prompt_tokens = r.prompt_tokens, completion_tokens = r.completion_tokens, cost_usd = r.cost_usd })
  if r.hold then must("budget hold", q:exec("DELETE FROM budget_holds WHERE id = ?", { r.hold })) end
  return id
end

function M.team_spending(q, since, team)
  local rows, err = q:query("SELECT team, COALESCE(SUM(cost_usd), 0) AS usd,"
    .. " COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS tokens FROM model_calls WHERE created_at >= ?"
    .. (team and " AND team = ?" or " AND team IS NOT NULL") .. " GROUP BY team", { since, team, n = team and 2 or 1 })
  if not rows then error(("records: cannot read the teams' spending: %s"):format(tostring(err)), 2) end
  for _, r in ipairs(rows) do
    r.usd, r.tokens = tonumber(r.usd), tonumber(r.tokens)
  end
  return rows
end

return M
