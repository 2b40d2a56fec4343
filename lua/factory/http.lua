-- factory.http: HTTP(S) client for fibers (libcurl on the process's event loop).
--
-- Errors: misuse (a missing url, a header value with CR/LF, calling outside a
-- fiber) raises. Everything that can go wrong on the network is a value:
--   nil, "ECODE: message", "ECODE"
-- with ECODE one of ETIMEDOUT (the total `timeout` or `connect_timeout` passed),
-- ECONNREFUSED (cannot connect), ECONNRESET (the connection dropped, also a body cut
-- short), EHOST (the name does not resolve), ETLS (handshake or certificate), EHTTP
-- (anything else, e.g. the body exceeds max_body); rarely ENOMEM, and ECANCELED for
-- a read cut by close(). An HTTP status such as 404 or 500 is a response, not an
-- error.
--
--   request{ method = "GET", url = ..., headers = { ["Name"] = "value" }, body = STRING,
--            timeout = SECONDS, connect_timeout = SECONDS, stream = false,
--            max_body = BYTES (64 MiB), ca_file = PATH, follow = false }
--     -> { status = 200, headers = { ["content-type"] = "..." }, body = STRING }
--   timeout bounds the whole transfer (a streamed body included); none by default.
--   Response header names are lowercase; a repeated header's values are joined
--   with ", ". A body is sent as given, with no Content-Type unless in headers.
--   ca_file replaces the system CA store (Debian's ca-certificates) for this
--   request; follow = true follows up to 10 redirects. Connections are kept alive
--   and reused; the http_proxy/https_proxy/no_proxy variables apply, as in curl.
--   With stream = true it returns once the response headers arrived:
--     res.status, res.headers, res:read([timeout]) -> chunk | nil (end) | nil, err
--     (a read timeout is ETIMEDOUT and leaves the stream open; one reader at a time),
--     res:close() (aborts the transfer; a fiber blocked in read gets ECANCELED).
--     A reader that falls behind pauses the transfer instead of buffering it all.
--   get(url [, opts]), post(url, body [, opts])   shorthands for request
--   sse(res) -> events: an iterator over the Server-Sent Events of a streamed
--     response (anything with read()). Each event is { event = "message" or the
--     event field, data = STRING, id = last event id or nil, retry = ms or nil }.
--     The loop ends at the end of the stream or on an error, left in events.err:
--       local events = http.sse(res)
--       for ev in events do ... end
--       if events.err then ... end
--   versions() -> { "libcurl/7.88.1", "OpenSSL/3.0.11", ... }
--   stats() -> { active, requests, sockets, pooled, buffered } (for tests and metrics)
local core = require "factory.core.http_client"

local M = {
  request = core.request,
  versions = core.versions,
  stats = core.stats,
}

-- A request table from the shorthand's arguments plus opts (left unchanged).
local function with(opts, method, url, body)
  local t = { method = method, url = url, body = body }
  if opts then
    for k, v in pairs(opts) do
      if t[k] == nil then t[k] = v end
    end
  end
  return t
end

function M.get(url, opts)
  return core.request(with(opts, "GET", url))
end

function M.post(url, body, opts)
  return core.request(with(opts, "POST", url, body))
end

-- The event stream interpretation of the WHATWG HTML spec, "9.2.6 Interpreting an
-- event stream": lines end with CRLF, LF or CR (a CR at the end of a chunk may be the
-- first half of a CRLF, so the LF that starts the next chunk is skipped); a blank line
-- dispatches; an event without data is not dispatched; a partial event at the end of
-- the stream is discarded.
local Parser = {}
Parser.__index = Parser

local function new_parser()
  return setmetatable({ pending = "", data = {}, event = nil, last_id = nil, retry = nil,
                        skip_lf = false, started = false, out = {} }, Parser)
end

function Parser:line(line)
  if line == "" then
    if #self.data > 0 then
      self.out[#self.out + 1] = { event = self.event or "message", data = table.concat(self.data, "\n"),
                                  id = self.last_id, retry = self.retry }
    end
    self.data, self.event = {}, nil
    return
  end
  if line:byte(1) == 58 then return end     -- ":" comment
  local field, value = line:match("^([^:]*):(.*)$")
  if not field then
    field, value = line, ""
  elseif value:byte(1) == 32 then
    value = value:sub(2)
  end
  if field == "data" then
    self.data[#self.data + 1] = value
  elseif field == "event" then
    self.event = value
  elseif field == "id" then
    if not value:find("\0", 1, true) then self.last_id = value end
  elseif field == "retry" then
    if value:match("^%d+$") then self.retry = tonumber(value) end
  end
end

-- Feeds one chunk; returns the events it completed, in order.
function Parser:feed(chunk)
  if chunk == "" then return {} end
  if not self.started then
    self.started = true
    if chunk:sub(1, 3) == "\239\187\191" then chunk = chunk:sub(4) end
  end
  if self.skip_lf and chunk:byte(1) == 10 then chunk = chunk:sub(2) end
  self.skip_lf = false
  local buf, pos = self.pending .. chunk, 1
  while true do
    local s, e = buf:find("[\r\n]", pos)
    if not s then break end
    if buf:byte(s) == 13 then
      if s == #buf then
        self.skip_lf = true
      elseif buf:byte(s + 1) == 10 then
        e = s + 1
      end
    end
    self:line(buf:sub(pos, s - 1))
    pos = e + 1
  end
  self.pending = buf:sub(pos)
  local out = self.out
  self.out = {}
  return out
end

local Events = {}
Events.__index = Events

function Events:__call()
  while true do
    local ev = table.remove(self.queue, 1)
    if ev then return ev end
    if self.finished then return nil end
    local chunk, err = self.res:read()
    if chunk then
      self.queue = self.parser:feed(chunk)
    else
      self.finished, self.err = true, err
    end
  end
end

function M.sse(res)
  return setmetatable({ res = res, parser = new_parser(), queue = {}, finished = false }, Events)
end

return M
