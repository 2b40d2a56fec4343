-- factory.serve: `factory serve`, the OpenAI-compatible model proxy in front of the
-- router, so that external agents (Claude Code, Codex, Aider, the SDKs) are held to
-- the same aliases, fallbacks and budgets as the built-in operatives.
--
--   serve.start{ host = "127.0.0.1", port = 8420, config = FILE | nil (./factory.lua),
--                db = URL | true (the default store) | nil (none), token = nil,
--                header_timeout =, max_body_bytes = (default 32 MiB) }
--     -> server | nil, err, code   (the last two: see factory.core.http_server)
--     server:url(), server:close([grace]), server.store_url (where calls are recorded, or nil)
--   serve.local_proxy{ [KEY] = { team =, run = } } -> server | nil, err, code
--     the same proxy on a free loopback port of this process, over the router as it
--     is configured, accepting only those keys (CLI agents of `factory run`)
--   serve.mount(srv, keys_fn): the proxy's routes on an http_server
--   serve.main(opts) -> exit code: `factory serve`: starts, prints the URL, serves
--     until SIGINT or SIGTERM, then stops accepting and gives the requests in flight
--     GRACE seconds to finish before closing.
-- Endpoints: POST /v1/chat/completions (stream or not), POST /v1/embeddings,
-- GET /v1/models, with OpenAI-shaped JSON errors; POST /v1/responses, OpenAI's
-- Responses API, which Codex speaks (factory.serve_responses); and POST /v1/messages,
-- Anthropic's Messages API (factory.serve_messages), with Anthropic-shaped errors.
-- Teams: factory.lua's keys { ["sk-..."] = { team = NAME } } are virtual keys: the
-- bearer key (or x-api-key) picks the team whose budget the call is charged to; with keys
-- configured, any other key gets 401 (from the core server, which also lets them
-- in beyond loopback). token is the operator's key: it is accepted too, and like a
-- proxy without keys it takes the team from the X-Factory-Team header. X-Factory-Run
-- names the run.
-- factory.lua is watched: an edit of providers, models, prices, budgets, limits or
-- keys applies to the calls that start after it (calls in flight finish on the
-- configuration they started with, and budgets keep what was spent); an edit that
-- does not load or validate is logged with its file:line and changes nothing.
-- With db, what each team spent today as the store records it counts against its
-- budget from the start (and again every RECOUNT_S seconds, for the spending of
-- other processes); each call of a team with a budget is held in the store's ledger
-- before it is sent (factory.budgets: exact across processes); and every call is
-- written to the store (factory.records.model_call: the model_calls table and the
-- audit log) as a posted write (db:post), so the response does not wait for it, and
-- a burst of calls shares commits; stopping writes what is still waiting, with the
-- calls it cut short (cancelled).
local server = require "factory.http_server"
local router = require "factory.router"
local budgets = require "factory.budgets"
local engine_id = require "factory.engine_id"
local config = require "factory.config"
local signal = require "factory.core.signal"
local log = require "factory.log"
local records = require "factory.records"
local messages = require "factory.serve_messages"
local responses = require "factory.serve_responses"
local fiber = require "factory.fiber"

local M = {}

local GRACE = 5
-- The largest request body taken by default: what the Anthropic API takes (32 MB),
-- since agents send long contexts with images; the core server's default is 8 MiB.
local MAX_BODY = 32 * 1024 * 1024
-- How often what the teams spent is read again from the store, so that other
-- processes spending from the same budgets (`factory run`s) are seen.
M.RECOUNT_S = 5

local STATUS = { EINVAL = 400, EALIAS = 404, EBUDGET = 402, ENOCONFIG = 503, EUNAVAILABLE = 503,
                 ETIMEDOUT = 504 }
local TYPES = { EBUDGET = "insufficient_quota", EALIAS = "invalid_request_error" }
local CODES = { EBUDGET = "budget_exhausted", EALIAS = "model_not_found", ETIMEDOUT = "timeout" }

-- The HTTP answer for a router error: an upstream 4xx keeps its status.
local function send_error(res, err, code)
  local status = STATUS[code] or 502
  local upstream = code == "EUPSTREAM" and tonumber(tostring(err):match("HTTP (4%d%d):"))
  if upstream then status = upstream end
  local msg = tostring(err):gsub("^E%u+: ", "")
  return res:json(status, { error = { message = msg, type = TYPES[code] or server.error_type(status),
                                      code = CODES[code] or code:lower() } })
end

-- The client's key: a bearer token, or Anthropic's x-api-key header.
local function bearer(req)
  local auth = req.headers["authorization"]
  return auth and auth:match("^[Bb]earer%s+(.-)%s*$") or req.headers["x-api-key"]
end

-- The team and run of a request (the core server has checked its key already): a
-- virtual key's, else the operator's headers.
local function caller_of(req, keys)
  local entry = keys[bearer(req) or req.headers["x-api-key"] or ""]
  local run = req.headers["x-factory-run"]
  if entry then return entry.team or "default", run or (entry.run and tostring(entry.run)) end
  return req.headers["x-factory-team"], run
end

local function stream_reply(res, s)
  while true do
    local chunk, err, code = s:read()
    if not chunk then
      if err then
        local msg = tostring(err):gsub("^E%u+: ", "")
        res:sse(require("factory.json").encode({ error = { message = msg, type = "server_error", code = code:lower() } }))
      else
        res:sse("[DONE]")
      end
      return res:finish()
    end
    if not res:sse(chunk) then return s:close() end
  end
end

-- Every call's record is posted (db:post): written in the writer's next group, so a
-- burst of calls costs a commit, not a commit each, and keeps up with the proxy; a
-- record the store refuses (a run id it does not know) is undone alone and logged.
-- db:close, when serve stops, writes those still waiting.
local function record_calls(db)
  return router.on_call(function(r) db:post(records.model_call, r) end)
end

local function key_list(keys)
  local list = {}
  for key in pairs(keys) do list[#list + 1] = key end
  return list
end

function M.start(opts)
  opts = opts or {}
  local path = config.find(opts.config)
  local cfg = { router = { providers = {}, models = {} }, keys = {} }
  local srv, keys, pending
  local closers = {}
  local function fail(err, code)
    for i = #closers, 1, -1 do closers[i]() end
    return nil, err, code
  end
  -- An edit of factory.lua: the server's tokens, then the router; either refusing
  -- leaves both as they were. One made before the server is up waits for it.
  local function reload(new)
    if not srv then
      pending = new
      return
    end
    local ok, err = srv:set_tokens{ token = opts.token, tokens = key_list(new.keys) }
    if ok then
      ok, err = router.configure(new.router)
      if not ok then srv:set_tokens{ token = opts.token, tokens = key_list(keys) } end
    end
    if not ok then
      return log.warn("serve: reload rejected, keeping the previous configuration: " .. path .. ": " .. err)
    end
    keys = new.keys
    log.info("serve: configuration reloaded", { file = path })
    for _, w in ipairs(new.warnings) do log.warn(("serve: %s: %s"):format(path, w)) end
  end
  if path then
    local c, watcher = config.load(path, reload)
    if not c then return nil, "EINVAL: " .. watcher, "EINVAL" end
    cfg = c
    for _, w in ipairs(c.warnings) do log.warn(("serve: %s: %s"):format(path, w)) end
    closers[#closers + 1] = watcher.stop
  end
  keys = cfg.keys
  local ok, err, code = router.configure(cfg.router)
  if not ok then return fail(err, code) end
  local store_url
  if opts.db then
    local db
    db, err, code = require("factory.db").open(opts.db ~= true and opts.db or nil)
    if not db then return fail(err, code) end
    closers[#closers + 1] = function() db:close() end
    ok, err, code = db:migrate()
    if not ok then return fail(err, code) end
    closers[#closers + 1] = record_calls(db)
    closers[#closers + 1] = budgets.attach(db, engine_id.new())
    -- What the teams spent today before this process started counts against their
    -- budgets (a restarted serve must not grant a fresh day), and what other
    -- processes spend meanwhile, within RECOUNT_S.
    local function count_spent()
      for _, t in ipairs(records.team_spending(db, router.day_start())) do router.count_spent("team", t.team, t) end
    end
    local counted, cerr = pcall(count_spent)
    if not counted then return fail(tostring(cerr), "EIO") end
    local recounter = fiber.spawn(function()
      while true do
        fiber.sleep(M.RECOUNT_S)
        local ok, rerr = pcall(count_spent)
        if not ok then log.warn("serve: cannot read what the teams spent", { error = tostring(rerr) }) end
      end
    end)
    closers[#closers + 1] = function() recounter:cancel("serve stopped") end
    store_url = db.url
  elseif next((cfg.router.budgets or {}).teams or {}) then
    log.warn("serve: with no store, a team's budget counts only this process's calls: a restart starts its day afresh")
  end
  srv, err, code = server.new{ host = opts.host or "127.0.0.1", port = opts.port or 8420, token = opts.token,
                               tokens = key_list(keys), header_timeout = opts.header_timeout,
                               max_body_bytes = opts.max_body_bytes or MAX_BODY }
  if not srv then
    -- The server says what it needs; here is where serve's user gives it.
    if code == "EACCES" then err = err .. " (factory serve: --token T or $FACTORY_TOKEN, or keys { } in factory.lua)" end
    return fail(err, code)
  end
  if pending then reload(pending) end
  M.mount(srv, function() return keys end)
  srv.store_url = store_url
  local close = srv.close
  function srv.close(self, grace)
    close(self, grace)
    -- The calls of the requests that the grace did not see to the end were cancelled
    -- with their handlers: their records go to the store before it closes.
    router.flush()
    for i = #closers, 1, -1 do closers[i]() end
  end
  return srv
end

-- The proxy's routes on srv; keys() gives the current virtual keys.
function M.mount(srv, keys)
  -- A client that gives up (a timeout, Ctrl-C) stops its call upstream at once: a
  -- completion nobody will read is not waited for, or paid for to its end.
  local function call(req, res, fn)
    res:cancel_on_disconnect()
    local team, run = caller_of(req, keys())
    local out, cerr, ccode = fn(req.body, { team = team, run = run, raw = true })
    if not out then return send_error(res, cerr, ccode) end
    if type(out) == "string" then
      return res:status(200):header("Content-Type", "application/json"):send(out)
    end
    return stream_reply(res, out)
  end
  srv:route("POST", "/v1/chat/completions", function(req, res) return call(req, res, router.chat) end)
  srv:route("POST", "/v1/embeddings", function(req, res) return call(req, res, router.embeddings) end)
  srv:route("POST", "/v1/messages", function(req, res)
    res:cancel_on_disconnect()
    local team, run = caller_of(req, keys())
    return messages.handle(req, res, { team = team, run = run })
  end)
  srv:route("POST", "/v1/messages/count_tokens", function(req, res) return messages.count_tokens(req, res) end)
  srv:route("POST", "/v1/responses", function(req, res)
    res:cancel_on_disconnect()
    local team, run = caller_of(req, keys())
    return responses.handle(req, res, { team = team, run = run, router_error = send_error })
  end)
  srv:route("GET", "/v1/models", function(_, res)
    return res:status(200):header("Content-Type", "application/json"):send(router.models_json())
  end)
end

-- A proxy on a free loopback port, in this process, over the router as it is
-- configured, that accepts only the given virtual keys: what a CLI agent started by
-- `factory run` talks to, so that its calls are held to, and counted against, its
-- team and run. keys: { [KEY] = { team =, run = } }.
function M.local_proxy(keys)
  local srv, err, code = server.new{ host = "127.0.0.1", port = 0, tokens = key_list(keys), max_body_bytes = MAX_BODY }
  if not srv then return nil, err, code end
  M.mount(srv, function() return keys end)
  return srv
end

function M.main(opts)
  local srv, err = M.start(opts)
  if not srv then
    io.stderr:write("factory: ", tostring(err), "\n")
    return 1
  end
  io.stdout:write("factory serve: listening on ", srv:url(), "\n")
  io.stdout:write("factory serve: ", srv.store_url and ("recording every call in " .. srv.store_url)
    or "recording no call (--no-db)", "\n")
  io.stdout:flush()
  local name = signal.wait("INT", "TERM")
  log.info("factory serve: stopping", { signal = name, grace_s = GRACE })
  srv:close(GRACE)
  return 0
end

return M
