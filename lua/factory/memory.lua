-- factory.memory: the memory banks (one per team, plus `shared-world` across teams)
-- and the learnings agents record for later objectives.
--
--   memory.retain(q, bank, facts, { source =, run_id =, vectors = { [i] = embedding } })
--       -> number of new facts; facts are de-duplicated per bank (case and spacing do
--       not make a new fact); vectors[i] is stored as facts[i]'s embedding
--   memory.recall(db, banks, query [, limit [, vector]]) -> { { bank =, content = }, ... }
--       full-text search (SQLite FTS5 / PostgreSQL tsvector), best first (bm25 /
--       ts_rank) when more than limit facts match, else all of them newest first; with vector
--       (the query's embedding) the facts nearest in meaning too (cosine similarity
--       over the newest MAX_SCAN embedded facts of the banks), the two rankings
--       merged by reciprocal rank
--   memory.context(db, banks, team, query [, limit [, vector]]) -> facts, learnings
--       memory.recall(db, banks, query, limit, vector) and
--       memory.learnings(db, team, nil, query) read together: one round trip, and
--       no full-text search of the learnings of a team that has none
--   memory.embed(texts, { team =, run = }) -> { vector, ... } | nil
--       embeddings through the `local/embed` alias; nil when no such alias is
--       configured or the call fails (recall then falls back to words alone)
--   memory.learn(q, team, run_id, texts [, { repo =, objective = }]) -> number of new learnings
--       repo: the repository the learning is about (a path or URL); objective: the
--       objective it came from. A text already stored for the same team and repo
--       (case and spacing aside) is not stored again.
--   memory.learnings(db, team [, limit [, query]]) -> { text, ... }
--       the team's learnings: without query the newest first (default 5); with one
--       the most relevant to it first (full-text recall), the newest when none match.
--   memory.search_learnings(db, text, { team =, repo =, limit = }) -> { row, ... }
--       row: { id, team, repo, objective, text, run_id, created_at }; with text the
--       matches best first (none: {}), without text (nil or "") the newest first;
--       team and repo filter when given; limit defaults to 20.
-- q is a db or a transaction. Database errors are raised (they are bugs or outages,
-- not outcomes).
local time = require "factory.core.time"
local router = require "factory.router"
local table_new = require "table.new"
local log = require "factory.log"

local M = { SHARED = "shared-world" }

local EMBED = "local/embed"
local MAX_SCAN, MIN_SIMILARITY = 2000, 0.2

local function normal(text)
  return (text:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

function M.retain(q, bank, facts, opts)
  opts = opts or {}
  local added = 0
  for i, fact in ipairs(facts) do
    local content = normal(fact)
    if content ~= "" then
      local rows = assert(q:query("SELECT id FROM memory_facts WHERE bank = ? AND lower(content) = lower(?) LIMIT 1",
        { bank, content }))
      if #rows == 0 then
        local now = time.now()
        local vector = opts.vectors and opts.vectors[i]
        assert(q:exec("INSERT INTO memory_facts (bank, content, source, run_id, created_at, updated_at, embedding)"
          .. " VALUES (?, ?, ?, ?, ?, ?, ?)", { bank, content, opts.source, opts.run_id, now, now,
          vector, n = 7 }))
        added = added + 1
      end
    end
  end
  return added
end

-- Words too common to tell texts apart (PostgreSQL's english configuration drops
-- them itself; SQLite's FTS5 has no stop words).
local STOP = {}
for w in ([[the and are for was were been being has have had not but you your with this that these those
  from into onto over than then them they their there what when where which who whom why how can could should
  would will all any some its our out off too very just also only about such each other more most]]):gmatch("%a+") do
  STOP[w] = true
end

-- The query's distinct words, at most 24: enough to find related facts, and only
-- word characters, so user text can never be read as query syntax.
local MAX_WORDS = 24

local function words(query)
  local out, seen, n = table_new(MAX_WORDS, 0), table_new(0, 32), 0
  for w in query:lower():gmatch("%w+") do
    if #w >= 3 and not seen[w] and not STOP[w] then
      seen[w] = true
      n = n + 1
      out[n] = w
      if n == MAX_WORDS then break end
    end
  end
  return out
end

-- SQLite ranks by FTS5's bm25(), PostgreSQL by ts_rank.
--
-- The text a full-text search of ws (words' list) matches.
local function matching(db, ws)
  if db.backend == "postgres" then return table.concat(ws, " | ") end
  return '"' .. table.concat(ws, '" OR "') .. '"'
end

-- Statement texts depend only on the backend and the statement's shape: each is
-- built once. WORDS_SQL[backend][banks] = { found, ranked }; FIND_SQL[backend][shape].
local WORDS_SQL, FIND_SQL = { sqlite = {}, postgres = {} }, { sqlite = {}, postgres = {} }

local function words_sql(backend, nbanks)
  local texts = WORDS_SQL[backend][nbanks]
  if texts then return texts[1], texts[2] end
  local marks = ("?, "):rep(nbanks):sub(1, -3)
  local found, ranked
  if backend == "postgres" then
    local where = "FROM memory_facts WHERE search @@ to_tsquery('english', ?) AND bank IN (" .. marks .. ")"
    found = "SELECT id, bank, content " .. where .. " LIMIT ?"
    ranked = "SELECT bank, content " .. where .. " ORDER BY ts_rank(search, to_tsquery('english', ?)) DESC, id DESC LIMIT ?"
  else
    local where = "FROM memory_facts_fts JOIN memory_facts f ON f.id = memory_facts_fts.rowid"
      .. " WHERE memory_facts_fts MATCH ? AND f.bank IN (" .. marks .. ")"
    found = "SELECT f.id, f.bank, f.content " .. where .. " LIMIT ?"
    ranked = "SELECT f.bank, f.content " .. where .. " ORDER BY bm25(memory_facts_fts) LIMIT ?"
  end
  WORDS_SQL[backend][nbanks] = { found, ranked }
  return found, ranked
end

-- Full-text recall is two reads: the matching facts unranked, at most limit + 1 of
-- them, and the same search ranked, made only when more than limit match. Ranking is
-- what costs (bm25 counts, for every query word, the facts that hold it: with the
-- 20-odd words of an objective that is ~4x the search itself); when every match
-- fits, each is recalled anyway, newest first. words_reads(db, banks, match, limit, k)
-- -> the two reads for db:queries, the first of them to be read k (match: matching's).
local function words_reads(db, banks, match, limit, k)
  local nb = #banks
  local found_sql, ranked_sql = words_sql(db.backend, nb)
  local found, ranked = table_new(nb + 2, 1), table_new(nb + 3, 1)
  found[1], ranked[1] = match, match
  for i = 1, nb do
    found[i + 1], ranked[i + 1] = banks[i], banks[i]
  end
  found[nb + 2], found.n = limit + 1, nb + 2
  if db.backend == "postgres" then
    ranked[nb + 2], ranked[nb + 3], ranked.n = match, limit, nb + 3
  else
    ranked[nb + 2], ranked.n = limit, nb + 2
  end
  return { found_sql, found }, { ranked_sql, ranked, if_rows = k, min_rows = limit + 1 }
end

local function bank_rows(rows, limit)
  local out = {}
  for i = 1, math.min(#rows, limit) do out[i] = { bank = rows[i].bank, content = rows[i].content } end
  return out
end

-- The facts recalled from words_reads' two results, best first.
local function words_result(found, ranked, limit)
  if #ranked > 0 then return bank_rows(ranked, limit) end
  table.sort(found, function(a, b) return a.id > b.id end)
  return bank_rows(found, limit)
end

local function words_recall(db, banks, query, limit)
  local ws = words(query or "")
  if #ws == 0 then return {} end
  local found, ranked = words_reads(db, banks, matching(db, ws), limit, 1)
  local out = assert(db:queries({ found, ranked }))
  return words_result(out[1], out[2], limit)
end

function M.embed(texts, opts)
  if #texts == 0 or not router.has_alias(EMBED) then return nil end
  opts = opts or {}
  local res, err = router.embeddings({ model = EMBED, input = texts }, { team = opts.team, run = opts.run })
  local data = res and res.data
  if type(data) ~= "table" or #data ~= #texts then
    log.warn("memory: embeddings unavailable, recall uses words only", { error = tostring(err or "bad reply") })
    return nil
  end
  local out = {}
  for i, d in ipairs(data) do
    local v = d.embedding
    if type(v) ~= "table" or #v == 0 then return nil end
    out[(tonumber(d.index) or (i - 1)) + 1] = v
  end
  return out
end

local function cosine(a, b)
  local dot, na, nb = 0, 0, 0
  for i = 1, math.min(#a, #b) do
    local x, y = tonumber(a[i]) or 0, tonumber(b[i]) or 0
    dot, na, nb = dot + x * y, na + x * x, nb + y * y
  end
  if na == 0 or nb == 0 then return 0 end
  return dot / math.sqrt(na * nb)
end

local function nearest_sql(banks)
  local marks = ("?, "):rep(#banks):sub(1, -3)
  local params = {}
  for i, b in ipairs(banks) do params[i] = b end
  params[#params + 1] = MAX_SCAN
  return "SELECT bank, content, embedding FROM memory_facts WHERE embedding IS NOT NULL"
    .. " AND bank IN (" .. marks .. ") ORDER BY id DESC LIMIT ?", params
end

-- The facts of rows (nearest_sql's) nearest to vector, best first.
local function nearest_of(rows, vector, limit)
  local scored = {}
  for _, r in ipairs(rows) do
    local score = type(r.embedding) == "table" and cosine(vector, r.embedding) or 0
    if score >= MIN_SIMILARITY then scored[#scored + 1] = { bank = r.bank, content = r.content, score = score } end
  end
  table.sort(scored, function(a, b) return a.score > b.score end)
  local out = {}
  for i = 1, math.min(limit, #scored) do out[i] = { bank = scored[i].bank, content = scored[i].content } end
  return out
end

-- Reciprocal rank fusion: a fact high in either list ranks high.
local function fuse(lists, limit)
  local score, first, order = {}, {}, {}
  for _, list in ipairs(lists) do
    for rank, f in ipairs(list) do
      local key = f.bank .. "\0" .. f.content
      if not score[key] then
        score[key], first[key] = 0, f
        order[#order + 1] = key
      end
      score[key] = score[key] + 1 / (60 + rank)
    end
  end
  table.sort(order, function(a, b) return score[a] > score[b] end)
  local out = {}
  for i = 1, math.min(limit, #order) do out[i] = first[order[i]] end
  return out
end

function M.recall(db, banks, query, limit, vector)
  limit = limit or 8
  if #banks == 0 then return {} end
  local by_words = words_recall(db, banks, query, limit)
  if not vector then return by_words end
  return fuse({ by_words, nearest_of(assert(db:query(nearest_sql(banks))), vector, limit) }, limit)
end


function M.learn(q, team, run_id, texts, opts)
  opts = opts or {}
  local added = 0
  for _, text in ipairs(texts) do
    local t = normal(text)
    if t ~= "" then
      local rows = assert(q:query("SELECT id FROM learnings WHERE COALESCE(team, '') = ? AND COALESCE(repo, '') = ?"
        .. " AND lower(text) = lower(?) LIMIT 1", { team or "", opts.repo or "", t }))
      if #rows == 0 then
        assert(q:exec("INSERT INTO learnings (run_id, team, repo, objective, text, created_at) VALUES (?, ?, ?, ?, ?, ?)",
          { run_id, team, opts.repo, opts.objective, t, time.now(), n = 6 }))
        added = added + 1
      end
    end
  end
  return added
end

local COLUMNS = "l.id, l.team, l.repo, l.objective, l.text, l.run_id, l.created_at"

-- The statement for the rows of learnings matching match (matching's text; best
-- first), or the newest when it is nil.
local function find_sql(db, match, opts)
  local shape = (match and 1 or 0) + (opts.team and 2 or 0) + (opts.repo and 4 or 0)
  local sql = FIND_SQL[db.backend][shape]
  local pg = db.backend == "postgres"
  if not sql then
    local where = {}
    if not match then
      sql = "SELECT " .. COLUMNS .. " FROM learnings l"
    elseif pg then
      sql = "SELECT " .. COLUMNS .. " FROM learnings l"
      where[1] = "l.search @@ to_tsquery('english', ?)"
    else
      sql = "SELECT " .. COLUMNS .. " FROM learnings_fts JOIN learnings l ON l.id = learnings_fts.rowid"
      where[1] = "learnings_fts MATCH ?"
    end
    if opts.team then where[#where + 1] = "l.team = ?" end
    if opts.repo then where[#where + 1] = "l.repo = ?" end
    if #where > 0 then sql = sql .. " WHERE " .. table.concat(where, " AND ") end
    if not match then
      sql = sql .. " ORDER BY l.id DESC"
    elseif pg then
      sql = sql .. " ORDER BY ts_rank(l.search, to_tsquery('english', ?)) DESC, l.id DESC"
    else
      sql = sql .. " ORDER BY bm25(learnings_fts), l.id DESC"
    end
    sql = sql .. " LIMIT ?"
    FIND_SQL[db.backend][shape] = sql
  end
  local params, n = table_new(5, 1), 0
  if match then
    n = n + 1
    params[n] = match
  end
  if opts.team then
    n = n + 1
    params[n] = opts.team
  end
  if opts.repo then
    n = n + 1
    params[n] = opts.repo
  end
  if match and pg then
    n = n + 1
    params[n] = match
  end
  params[n + 1], params.n = opts.limit or 20, n + 1
  return sql, params
end

local function find(db, text, opts)
  local ws = words(text or "")
  return assert(db:query(find_sql(db, #ws > 0 and matching(db, ws) or nil, opts)))
end

function M.search_learnings(db, text, opts)
  return find(db, text, opts or {})
end

local function texts(rows)
  for i, r in ipairs(rows) do rows[i] = r.text end
  return rows
end

function M.learnings(db, team, limit, query)
  local opts = { team = team, limit = limit or 5 }
  local rows = {}
  local ws = words(query or "")
  if #ws > 0 then rows = assert(db:query(find_sql(db, matching(db, ws), opts))) end
  if #rows == 0 then rows = find(db, nil, opts) end
  return texts(rows)
end

-- recall(db, banks, query, limit, vector) and learnings(db, team, nil, query) in one
-- db:queries (one round trip on SQLite). The team's newest learnings are read first:
-- only a team that has some is searched (the search is what costs).
function M.context(db, banks, team, query, limit, vector)
  limit = limit or 8
  local ws = words(query or "")
  local match = #ws > 0 and matching(db, ws) or nil
  local list, n = table_new(5, 0), 0
  local found_at, nearest_at, matching_at
  if #banks > 0 and match then
    list[1], list[2] = words_reads(db, banks, match, limit, 1)
    found_at, n = 1, 2
  end
  if #banks > 0 and vector then
    n = n + 1
    list[n] = { nearest_sql(banks) }
    nearest_at = n
  end
  local opts = { team = team, limit = 5 }
  n = n + 1
  list[n] = { find_sql(db, nil, opts) }
  local newest_at = n
  if match then
    local sql, params = find_sql(db, match, opts)
    n = n + 1
    list[n] = { sql, params, if_rows = newest_at }
    matching_at = n
  end
  local out = assert(db:queries(list))
  local facts = found_at and words_result(out[found_at], out[found_at + 1], limit) or {}
  if nearest_at then facts = fuse({ facts, nearest_of(out[nearest_at], vector, limit) }, limit) end
  local learned = matching_at and out[matching_at] or {}
  if #learned == 0 then learned = out[newest_at] end
  return facts, texts(learned)
end

return M
