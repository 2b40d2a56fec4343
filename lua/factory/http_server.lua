-- factory.http_server: routes on top of the core HTTP server (factory.core.http_server,
-- which documents req, res, the limits and the timeouts).
--
--   local srv, err, code = server.new{ host, port, token, tokens, max_header_bytes,
--                                      max_body_bytes, header_timeout, idle_timeout }
--   srv:route("GET", "/v1/models", function(req, res) ... end)   -> srv
--   srv:route("GET", "/runs/:id", fn)        req.params.id, percent-decoded
--   srv:route("GET", "/web/*path", fn)       req.params.path: the rest of the path
--   srv:port(), srv:host(), srv:url() ("http://127.0.0.1:8420"), srv:close([grace])
--   srv:set_tokens{ token =, tokens = } -> true | nil, err, code   (see the core)
-- Routes are tried in the order they were added; a GET route also answers HEAD.
--
-- Helpers, on every request and response:
--   req:json()                      -> the body decoded | nil, "EJSON: ...", "EJSON"
--   res:json(status, value)         sends value as application/json
--   res:error(status, message [, type])
--
-- Error convention. Every error response is JSON in OpenAI's shape, which the
-- OpenAI and Anthropic SDKs know how to show:
--   {"error": {"message": "what went wrong, for the caller", "type": TYPE}}
-- TYPE follows the status: 401 authentication_error, 403 permission_error,
-- 404 not_found_error, 429 rate_limit_error, 5xx server_error, any other 4xx
-- invalid_request_error. The router answers 404 for an unknown path and 405 (with
-- Allow) for a known path with another method; the core answers 400, 401, 408, 413,
-- 431, 500 and 503 in the same shape. A handler reports an expected failure with
-- res:error(...) and raises only for bugs: the client gets a bare 500 and the log
-- gets the error with its file:line and traceback.
local core = require "factory.core.http_server"
local json = require "factory.json"

local M = {}

local Request = {}
Request.__index = Request

function Request:json()
  return json.decode(self.body)
end

local Response = core.response

function Response:json(status, value)
  local body, err = json.encode(value)
  if not body then error("res:json: " .. err, 2) end
  return self:status(status):header("Content-Type", "application/json"):send(body)
end

local TYPES = { [401] = "authentication_error", [403] = "permission_error",
                [404] = "not_found_error", [429] = "rate_limit_error" }

function M.error_type(status)
  return TYPES[status] or (status >= 500 and "server_error") or "invalid_request_error"
end

function Response:error(status, message, type_)
  return self:json(status, { error = { message = message, type = type_ or M.error_type(status) } })
end

local function decode(s)
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- "/runs/:id" -> "^/runs/([^/]+)$", { "id" }; "/web/*path" -> "^/web/(.*)$", { "path" }
local function compile(pattern)
  local names = {}
  local lua = pattern:gsub("([^/]+)", function(segment)
    local kind, name = segment:sub(1, 1), segment:sub(2)
    if (kind == ":" or kind == "*") and name:match("^[%w_]+$") then
      names[#names + 1] = name
      return kind == ":" and "([^/]+)" or "(.*)"
    end
    return (segment:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
  end)
  return "^" .. lua .. "$", names
end

local function params(route, first, _, ...)
  if not first then return nil end
  local p = {}
  for i = 1, #route.names do p[route.names[i]] = decode((select(i, ...))) end
  return p
end

local function handle(routes, req, res)
  setmetatable(req, Request)
  local allowed, seen = {}, {}
  for i = 1, #routes do
    local route = routes[i]
    local p = params(route, req.path:find(route.pattern))
    if p then
      if route.method == req.method or (req.method == "HEAD" and route.method == "GET") then
        req.params = p
        return route.fn(req, res)
      end
      if not seen[route.method] then
        seen[route.method] = true
        allowed[#allowed + 1] = route.method
      end
    end
  end
  if #allowed > 0 then
    res:header("Allow", table.concat(allowed, ", "))
    return res:error(405, ("method %s is not allowed on %s"):format(req.method, req.path))
  end
  return res:error(404, ("no route for %s %s"):format(req.method, req.path))
end

local Server = {}
Server.__index = Server

-- Returns the server, listening, or nil, err, code (see core listen).
function M.new(opts)
  if type(opts) ~= "table" then error("http_server.new: expected a table of options", 2) end
  -- The handler holds the routes, not the server, so that a forgotten server can
  -- still be collected (and closed).
  local routes = {}
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.handler = function(req, res) return handle(routes, req, res) end
  local srv, err, code = core.listen(o)
  if not srv then return nil, err, code end
  return setmetatable({ core = srv, routes = routes }, Server)
end

function Server:route(method, pattern, fn)
  if type(method) ~= "string" or not method:match("^%u+$") then
    error("route: method must be an uppercase HTTP method, like \"GET\"", 2)
  end
  if type(pattern) ~= "string" or pattern:sub(1, 1) ~= "/" then
    error("route: the path pattern must start with /", 2)
  end
  if type(fn) ~= "function" then error("route: handler must be a function", 2) end
  local lua, names = compile(pattern)
  self.routes[#self.routes + 1] = { method = method, pattern = lua, names = names, fn = fn }
  return self
end

function Server:set_tokens(opts) return self.core:set_tokens(opts) end
function Server:port() return self.core:port() end
function Server:host() return self.core:host() end
function Server:close(grace) return self.core:close(grace) end

function Server:url()
  local host = self.core:host()
  if host:find(":", 1, true) then host = "[" .. host .. "]" end
  return ("http://%s:%d"):format(host, self.core:port())
end

return M
