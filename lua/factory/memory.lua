-- factory.memory: the memory banks (one per team, plus `shared-world` across teams)
-- and the learnings agents record for later objectives.
--
--   memory.retain(q, bank, facts, { source =, run_id = }) -> number of new facts
--       facts are de-duplicated per bank (case and spacing do not make a new fact)
--   memory.recall(db, banks, query [, limit]) -> { { bank =, content = }, ... }
--       full-text search (SQLite FTS5 / PostgreSQL tsvector), best first
--   memory.learn(q, team, run_id, texts)
--   memory.learnings(db, team [, limit]) -> { text, ... } newest first
-- q is a db or a transaction.
local time = require "factory.core.time"

local M = { SHARED = "shared-world" }

local function normal(text)
  return (text:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

function M.retain(q, bank, facts, opts)
  opts = opts or {}
  local added = 0
  for _, fact in ipairs(facts) do
    local content = normal(fact)
    if content ~= "" then
      local rows = assert(q:query("SELECT id FROM memory_facts WHERE bank = ? AND lower(content) = lower(?) LIMIT 1",
        { bank, content }))
      if #rows == 0 then
        local now = time.now()
        assert(q:exec("INSERT INTO memory_facts (bank, content, source, run_id, created_at, updated_at)"
          .. " VALUES (?, ?, ?, ?, ?, ?)", { bank, content, opts.source, opts.run_id, now, now, n = 6 }))
        added = added + 1
      end
    end
  end
  return added
end

-- The query's distinct words, at most 24: enough to find related facts, and only
-- word characters, so user text can never be read as query syntax.
local function words(query)
  local out, seen = {}, {}
  for w in query:lower():gmatch("%w+") do
    if #w >= 3 and not seen[w] and #out < 24 then
      seen[w] = true
      out[#out + 1] = w
    end
  end
  return out
end

function M.recall(db, banks, query, limit)
  local ws = words(query or "")
  if #ws == 0 or #banks == 0 then return {} end
  local marks = ("?, "):rep(#banks):sub(1, -3)
  local params = {}
  local sql
  if db.backend == "postgres" then
    params[1] = table.concat(ws, " | ")
    sql = "SELECT bank, content FROM memory_facts WHERE search @@ to_tsquery('english', ?) AND bank IN (" .. marks
      .. ") ORDER BY ts_rank(search, to_tsquery('english', ?)) DESC, id DESC LIMIT ?"
    for _, b in ipairs(banks) do params[#params + 1] = b end
    params[#params + 1] = params[1]
  else
    for i, w in ipairs(ws) do ws[i] = '"' .. w .. '"' end
    params[1] = table.concat(ws, " OR ")
    sql = "SELECT f.bank, f.content FROM memory_facts_fts JOIN memory_facts f ON f.id = memory_facts_fts.rowid"
      .. " WHERE memory_facts_fts MATCH ? AND f.bank IN (" .. marks .. ") ORDER BY memory_facts_fts.rank LIMIT ?"
    for _, b in ipairs(banks) do params[#params + 1] = b end
  end
  params[#params + 1] = limit or 8
  return assert(db:query(sql, params))
end

function M.learn(q, team, run_id, texts)
  for _, text in ipairs(texts) do
    local t = normal(text)
    if t ~= "" then
      assert(q:exec("INSERT INTO learnings (run_id, team, text, created_at) VALUES (?, ?, ?, ?)",
        { run_id, team, t, time.now() }))
    end
  end
end

function M.learnings(db, team, limit)
  local rows = assert(db:query("SELECT text FROM learnings WHERE team = ? ORDER BY id DESC LIMIT ?", { team, limit or 5 }))
  for i, r in ipairs(rows) do rows[i] = r.text end
  return rows
end

return M
