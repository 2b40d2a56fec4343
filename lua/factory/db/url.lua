-- factory.db.url: which database a URL names.
--
--   parse(url) -> spec | nil, "EURL: ...", "EURL"
--     url: "sqlite:PATH", "postgres://[user[:password]@][host][:port][/dbname][?k=v&...]"
--          (also "postgresql://"), or nil/"" for $FACTORY_DB, else .factory/factory.db.
--     sqlite spec:   { backend = "sqlite", path =, create_dir =, display = }
--     postgres spec: { backend = "postgres", params = {libpq keyword = value},
--                      pool =, connect_timeout =, password =, display = }
--   redact(url) -> url with any password replaced by ***
--
-- libpq itself parses a postgres URL (PQconninfoParse, through factory.core.db_pg), so
-- factory reads it exactly as libpq would: percent-decoding, [ipv6] hosts, and query
-- keys that are libpq's (sslmode, application_name, ...; any other is refused). A UNIX
-- socket directory goes in the host part percent-encoded (%2Ftmp%2Fpg) or as
-- ?host=/tmp/pg. factory's own query key, pool (connections, 1..64, default 4), is
-- taken out before libpq sees the URL. connect_timeout (default 10 s) also bounds
-- factory's non-blocking connect, which libpq's own setting does not. factory also
-- refuses what it does not support or what would put a password where it is shown:
-- a #fragment, several hosts, a port outside 1..65535, a raw '/' in the database
-- name, a raw '@' after the user info.
-- display is the URL without the password: the only form any message may show.
local pg = require "factory.core.db_pg"

local M = {}

M.DEFAULT_PATH = ".factory/factory.db"

-- Where libpq splits url: s, after "scheme://"; from, after the user info's '@' (the
-- first '@' before any '/'), else s; q, the query's '?' (the first after from), else
-- #url + 1. nil if url has no "scheme://".
local function split(url)
  local s = url:match("^%a[%w+.-]*://()")
  if not s then return nil end
  local at, slash = url:find("@", s, true), url:find("/", s, true)
  local from = (at and (not slash or at < slash)) and at + 1 or s
  return s, from, url:find("?", from, true) or #url + 1
end

-- Where url's passwords are, as sorted, disjoint {first, last} spans of its text: the
-- user info's (after its first ':') and every ?password= value. In a URL with a raw
-- '@' or '/' in its password libpq's split is not what the writer meant, so the span
-- runs on to the last '@' before the query, else to the last '@' at all: it may hide
-- too much, never part of a password.
local function password_spans(url)
  local spans = {}
  local s, _, q = split(url)
  if not s then return spans end
  local last = url:sub(1, q - 1):match(".*()@") or url:match(".*()@")
  local colon = url:find(":", s, true)
  if colon and last and colon + 1 < last then spans[#spans + 1] = { colon + 1, last - 1 } end
  for i in url:gmatch("[?&]password=()") do
    local j = (url:find("&", i, true) or #url + 1) - 1
    if j >= i then spans[#spans + 1] = { i, j } end
  end
  table.sort(spans, function(a, b) return a[1] < b[1] end)
  local merged = {}
  for _, sp in ipairs(spans) do
    local top = merged[#merged]
    if top and sp[1] <= top[2] + 1 then top[2] = math.max(top[2], sp[2])
    else merged[#merged + 1] = { sp[1], sp[2] } end
  end
  return merged
end

function M.redact(url)
  url = tostring(url)
  local out, pos = {}, 1
  for _, sp in ipairs(password_spans(url)) do
    out[#out + 1] = url:sub(pos, sp[1] - 1) .. "***"
    pos = sp[2] + 1
  end
  out[#out + 1] = url:sub(pos)
  return table.concat(out)
end

-- part, a piece of url a message quotes, as it may be shown: "***" if it overlaps or
-- contains a password.
local function shown(url, part)
  local spans = password_spans(url)
  for _, sp in ipairs(spans) do
    if part:find(url:sub(sp[1], sp[2]), 1, true) then return "***" end
  end
  local i, j = url:find(part, 1, true)
  while i and part ~= "" do
    for _, sp in ipairs(spans) do
      if i <= sp[2] and j >= sp[1] then return "***" end
    end
    i, j = url:find(part, i + 1, true)
  end
  return part
end

local function bad(url, why)
  return nil, ("EURL: malformed database URL '%s': %s"):format(M.redact(url), why), "EURL"
end

-- libpq's messages end in the quoted piece of the URI they reject (uri: url without
-- pool): the whole URI, which the message shows already, is dropped. A message of any
-- other form is not shown if it holds a password.
local function bad_libpq(url, uri, msg)
  local desc, part = msg:match('^(.-): "(.*)"$')
  if not desc then
    for _, sp in ipairs(password_spans(url)) do
      if msg:find(url:sub(sp[1], sp[2]), 1, true) then return bad(url, "libpq cannot parse it") end
    end
    return bad(url, msg)
  end
  if part == uri then return bad(url, desc) end
  return bad(url, ('%s: "%s"'):format(desc, shown(url, part)))
end

local function parse_postgres(url)
  if url:find("#", 1, true) then return bad(url, "a fragment (#) is not allowed") end
  -- Another '@' between the user info and the query means a raw '@' or '/' in the
  -- password, which libpq would read as part of the host or database name.
  local _, from, q = split(url)
  if url:sub(from, q - 1):find("@", 1, true) then
    return bad(url, "unencoded '@' after the user info: write '@' as %40 and '/' as %2F in the user name and password")
  end
  -- libpq would take a raw '/' as part of the name; in a URL it reads as a path
  -- (a slash too many, or a password's '/' left unencoded).
  if url:sub(from, q - 1):find("^[^/]*/.*/") then return bad(url, "the database name contains '/'") end
  local spec = { backend = "postgres", pool = 4, connect_timeout = 10 }
  local kept = {}
  for pair in url:sub(q + 1):gmatch("[^&]+") do
    local v = pair:match("^pool=(.*)$")
    if v then
      local n = v:match("^%d+$") and tonumber(v)
      if not n or n < 1 or n > 64 then return bad(url, "pool must be a number from 1 to 64") end
      spec.pool = n
    else
      kept[#kept + 1] = pair
    end
  end
  local uri = url:sub(1, q - 1) .. (#kept > 0 and "?" .. table.concat(kept, "&") or "")
  local params, err = pg.conninfo(uri)
  if not params then return bad_libpq(url, uri, err) end
  -- db_pg connects to one host, and lists would also make display ambiguous.
  if (params.host or ""):find(",", 1, true) or (params.hostaddr or ""):find(",", 1, true) then
    return bad(url, "several hosts are not supported")
  end
  -- libpq leaves the port unchecked until it connects.
  if params.port then
    local n = params.port:match("^%d+$") and tonumber(params.port)
    if not n or n < 1 or n > 65535 then
      return bad(url, ("port '%s' is not a number from 1 to 65535"):format(shown(url, params.port)))
    end
    params.port = tostring(n)
  end
  if params.connect_timeout then
    local n = tonumber(params.connect_timeout)
    if not n or n <= 0 then return bad(url, "connect_timeout must be a positive number") end
    spec.connect_timeout = n
  end
  spec.password = params.password
  spec.params = params
  local where = params.host or ""
  if where:find(":", 1, true) then where = "[" .. where .. "]" end
  if params.port then where = where .. ":" .. params.port end
  spec.display = ("postgres://%s%s/%s"):format(params.user and (params.user .. "@") or "", where,
    params.dbname or "")
  return spec
end

function M.parse(url)
  if url == nil or url == "" then
    local env = os.getenv("FACTORY_DB")
    if env and env ~= "" then return M.parse(env) end
    return { backend = "sqlite", path = M.DEFAULT_PATH, create_dir = true, display = "sqlite:" .. M.DEFAULT_PATH }
  end
  if type(url) ~= "string" then error("db: the URL must be a string, got " .. type(url), 3) end
  if url:find("^postgres://") or url:find("^postgresql://") then return parse_postgres(url) end
  local path = url:match("^sqlite:(.*)$")
  if path then
    if path:find("^//") then path = path:sub(3) end
    if path == "" then return bad(url, "no file path after 'sqlite:'") end
    return { backend = "sqlite", path = path, create_dir = false, display = "sqlite:" .. path }
  end
  return nil, ("EURL: unsupported database URL '%s' (use sqlite:PATH or postgres://user:password@host:port/dbname)")
    :format(M.redact(url)), "EURL"
end

return M
