-- factory.db.sql: SQL text helpers.
--
--   to_postgres(sql) -> sql with each ? placeholder replaced by $1, $2, ... in order,
--                       and the number of placeholders
--
-- Statements are written with ? on both backends. A ? inside a string literal
-- ('...', E'...' with backslash escapes, $tag$...$tag$), a quoted identifier ("...")
-- or a comment (-- and nested /* */) is text, not a placeholder. PostgreSQL's jsonb
-- operators ?, ?| and ?& therefore cannot be written literally: use the functions
-- jsonb_exists, jsonb_exists_any and jsonb_exists_all instead.
local M = {}

-- Index just past the literal quoted by q that opens at i.
local function skip_quoted(sql, i, q, backslashes)
  local j = i + 1
  while true do
    local k = sql:find(backslashes and "[\\" .. q .. "]" or q, j, not backslashes)
    if not k then return #sql + 1 end
    if sql:sub(k, k) == "\\" then
      j = k + 2
    elseif sql:sub(k + 1, k + 1) == q then
      j = k + 2
    else
      return k + 1
    end
  end
end

local function skip_block_comment(sql, i)
  local depth, j = 1, i + 2
  while depth > 0 do
    local k = sql:find("[/*]", j)
    if not k then return #sql + 1 end
    local two = sql:sub(k, k + 1)
    if two == "/*" then
      depth, j = depth + 1, k + 2
    elseif two == "*/" then
      depth, j = depth - 1, k + 2
    else
      j = k + 1
    end
  end
  return j
end

local function word_char_before(sql, i)
  return i > 1 and sql:sub(i - 1, i - 1):find("[%w_]") ~= nil
end

local function translate(sql)
  local out, n, start, i = {}, 0, 1, 1
  while true do
    local j = sql:find("[?'\"%-/$]", i)
    if not j then break end
    local c = sql:sub(j, j)
    if c == "?" then
      n = n + 1
      out[#out + 1] = sql:sub(start, j - 1)
      out[#out + 1] = "$" .. n
      start, i = j + 1, j + 1
    elseif c == "'" then
      local e = j > 1 and sql:sub(j - 1, j - 1):find("[eE]") and not word_char_before(sql, j - 1)
      i = skip_quoted(sql, j, "'", e)
    elseif c == '"' then
      i = skip_quoted(sql, j, '"', false)
    elseif c == "-" and sql:sub(j + 1, j + 1) == "-" then
      i = (sql:find("\n", j, true) or #sql) + 1
    elseif c == "/" and sql:sub(j + 1, j + 1) == "*" then
      i = skip_block_comment(sql, j)
    elseif c == "$" and not word_char_before(sql, j) then
      local tag = sql:match("^%$([%a_][%w_]*)%$", j) or (sql:sub(j + 1, j + 1) == "$" and "")
      if tag then
        local close = "$" .. tag .. "$"
        local _, e = sql:find(close, j + #close, true)
        i = (e or #sql) + 1
      else
        i = j + 1
      end
    else
      i = j + 1
    end
  end
  if n == 0 then return sql, 0 end
  out[#out + 1] = sql:sub(start)
  return table.concat(out), n
end

-- Statements repeat, so translations are kept (bounded: cleared when full).
local cache, cached = {}, 0

function M.to_postgres(sql)
  local t = cache[sql]
  if not t then
    t = { translate(sql) }
    if cached >= 1000 then cache, cached = {}, 0 end
    cache[sql], cached = t, cached + 1
  end
  return t[1], t[2]
end

return M
