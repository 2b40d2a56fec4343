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
-- A UNIX socket directory goes in the host part percent-encoded (%2Ftmp%2Fpg) or as
-- ?host=/tmp/pg. Query keys are libpq's (sslmode, application_name, ...) plus
-- factory's own: pool (connections, default 4). connect_timeout (default 10 s) also
-- bounds factory's non-blocking connect, which libpq's own setting does not.
-- display is the URL without the password: the only form any message may show.
local M = {}

M.DEFAULT_PATH = ".factory/factory.db"

function M.redact(url)
  return (tostring(url):gsub("^(%a[%w+.-]*://[^:/@?]*:)[^@/?]*@", "%1***@"))
end

local function bad(url, why)
  return nil, ("EURL: malformed database URL '%s': %s"):format(M.redact(url), why), "EURL"
end

-- Percent-decodes s; nil, reason on a bad escape.
local function decode(s)
  if s:find("%%[^%x]") or s:find("%%%x[^%x]") or s:find("%%%x?$") then
    return nil, "bad percent-encoding in '" .. s .. "'"
  end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_postgres(url)
  local rest = url:match("^postgres://(.*)$") or url:match("^postgresql://(.*)$")
  if rest:find("#", 1, true) then return bad(url, "a fragment (#) is not allowed") end
  local main, query = rest:match("^([^?]*)%??(.*)$")
  local authority, path = main:match("^([^/]*)/?(.*)$")
  local userinfo, hostport = authority:match("^(.*)@([^@]*)$")
  hostport = hostport or authority
  local params, spec = {}, { backend = "postgres", pool = 4, connect_timeout = 10 }
  local err
  if userinfo then
    local user, password = userinfo:match("^([^:]*):(.*)$")
    user = user or userinfo
    if user ~= "" then
      params.user, err = decode(user)
      if not params.user then return bad(url, err) end
    end
    if password then
      params.password, err = decode(password)
      if not params.password then return bad(url, err) end
      spec.password = params.password
    end
  end
  local host, port
  if hostport:sub(1, 1) == "[" then
    host, port = hostport:match("^%[([^%]]+)%]:?(.*)$")
    if not host then return bad(url, "unclosed [ in the host") end
  else
    host, port = hostport:match("^([^:]*):?(.*)$")
  end
  if host ~= "" then
    if host:find(",", 1, true) then return bad(url, "several hosts are not supported") end
    params.host, err = decode(host)
    if not params.host then return bad(url, err) end
  end
  if port ~= "" then
    local n = port:match("^%d+$") and tonumber(port)
    if not n or n < 1 or n > 65535 then
      return bad(url, ("port '%s' is not a number from 1 to 65535"):format(port))
    end
    params.port = tostring(n)
  end
  if path ~= "" then
    if path:find("/", 1, true) then return bad(url, "the database name contains '/'") end
    params.dbname, err = decode(path)
    if not params.dbname then return bad(url, err) end
  end
  for pair in query:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]+)=(.*)$")
    if not k then return bad(url, ("query parameter '%s' is not key=value"):format(pair)) end
    k, err = decode(k)
    if not k then return bad(url, err) end
    v, err = decode(v)
    if not v then return bad(url, err) end
    if k == "pool" then
      local n = v:match("^%d+$") and tonumber(v)
      if not n or n < 1 or n > 64 then return bad(url, "pool must be a number from 1 to 64") end
      spec.pool = n
    else
      if k == "connect_timeout" then
        local n = tonumber(v)
        if not n or n <= 0 then return bad(url, "connect_timeout must be a positive number") end
        spec.connect_timeout = n
      end
      if k == "password" then spec.password = v end
      params[k] = v
    end
  end
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
