-- factory.log: structured logging.
--
-- Every record goes, as one JSON line, to the log file when one is open
-- (log.open(path)), and in a readable form to stderr when its level is at or above
-- the console level:   12:00:01.123 INFO  message  key=value ...
--   log.debug|info|warn|error(message, fields?)
--   log.set_level(level [, "console"|"file"]); levels: debug < info < warn < error
-- Field values whose key looks secret (key, token, secret, password, authorization,
-- cookie) are written as "[REDACTED]", in both forms, so a careless call cannot leak
-- a credential.
-- A message repeated more than BURST times within a second (a write failing for every
-- request on a full disk) is left out for the rest of that second; the next one
-- written after it says how many were (field left_out).
local json = require "factory.json"
local time = require "factory.core.time"

local M = {}

local LEVELS = { debug = 10, info = 20, warn = 30, error = 40 }
local console_level, file_level = LEVELS.info, LEVELS.debug
local file
local console = io.stderr

local SECRET = { "key", "token", "secret", "password", "passwd", "authorization", "cookie", "credential" }

local function is_secret(k)
  k = tostring(k):lower()
  for _, word in ipairs(SECRET) do
    if k:find(word, 1, true) then return true end
  end
  return false
end

local function redact(v, depth)
  if type(v) ~= "table" or depth > 8 then return v end
  local out = {}
  for k, x in pairs(v) do
    out[k] = is_secret(k) and "[REDACTED]" or redact(x, depth + 1)
  end
  return out
end
M.redact = function(v) return redact(v, 0) end
M.is_secret = is_secret

function M.set_level(level, where)
  local n = LEVELS[level]
  if not n then error(("log.set_level: unknown level %q (debug, info, warn, error)"):format(tostring(level)), 2) end
  if where ~= "file" then console_level = n end
  if where ~= "console" then file_level = n end
end

-- Opens (appending) the JSON-lines log file. Returns true or nil, err.
function M.open(path)
  local f, err = io.open(path, "a")
  if not f then return nil, "EIO: " .. tostring(err) end
  f:setvbuf("line")
  if file then file:close() end
  file = f
  return true
end

function M.close()
  if file then file:close() end
  file = nil
end

-- Sends the console form somewhere else (a file handle); nil restores stderr.
function M.set_console(handle)
  console = handle or io.stderr
end

local function scalar(v)
  if type(v) == "string" then
    if v:find("[%s\"=]") then return ("%q"):format(v) end
    return v
  end
  if type(v) == "table" then return json.encode(v) or tostring(v) end
  return tostring(v)
end

local function emit(level, message, fields)
  local n = LEVELS[level]
  local now = time.now()
  fields = fields and redact(fields, 0) or nil
  if file and n >= file_level then
    local rec = { ts = time.iso8601(now), level = level, msg = tostring(message) }
    if fields then
      for k, v in pairs(fields) do
        if rec[k] == nil then rec[k] = v end
      end
    end
    local line = json.encode(rec) or json.encode({ ts = rec.ts, level = level, msg = tostring(message) })
    file:write(line, "\n")
  end
  if n >= console_level then
    local parts = { time.iso8601(now):sub(12, 23), ("%-5s"):format(level:upper()), tostring(message) }
    if fields then
      local keys = {}
      for k in pairs(fields) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. scalar(fields[k]) end
    end
    console:write(table.concat(parts, " "), "\n")
  end
end

local BURST, WINDOW = 5, 1.0
local seen = {} -- level .. message -> { since =, n =, left_out = }
local nseen = 0

-- Whether this record is written; fields gain left_out when some were not.
local function admit(level, message, fields)
  local key = level .. "\0" .. tostring(message)
  local now = time.monotonic()
  local s = seen[key]
  if not s then
    -- Messages carry no ids in their text (those go in fields), so the set stays
    -- small; it is dropped whole if it grows anyway.
    if nseen >= 1000 then seen, nseen = {}, 0 end
    s = { since = now, n = 0, left_out = 0 }
    seen[key], nseen = s, nseen + 1
  end
  if now - s.since >= WINDOW then s.since, s.n = now, 0 end
  s.n = s.n + 1
  if s.n > BURST then
    s.left_out = s.left_out + 1
    return false
  end
  if s.left_out > 0 then
    local out = {}
    for k, v in pairs(fields or {}) do out[k] = v end
    out.left_out = s.left_out
    s.left_out = 0
    return true, out
  end
  return true, fields
end

for level in pairs(LEVELS) do
  M[level] = function(message, fields)
    local ok, f = admit(level, message, fields)
    if ok then emit(level, message, f) end
  end
end

return M
