-- factory.router: every model call goes through here (the mechanism is C:
-- core/router.c documents retries, fallback, breakers, rate limits and budgets).
--
--   router.configure{ providers =, models =, prices =, budgets =, limits = }
--       -> true | nil, "EINVAL: ...", "EINVAL"     (factory.config builds this table)
--   router.chat(request, opts) -> response | nil, err, code
--       request: an OpenAI chat.completions request, as a table (whose JSON is made
--       UTF-8: each malformed byte sequence becomes U+FFFD) or JSON text (sent as is);
--       opts: { team =, run =, stream = bool (default: request.stream), raw = bool }.
--       Returns the OpenAI response table (raw: the JSON text). With stream, a stream:
--         s:read([timeout]) -> chunk (OpenAI chat.completion.chunk; raw: JSON text)
--                              | nil at the end | nil, err, code;   s:close()
--         s:usage() -> prompt_tokens, completion_tokens, reported: the provider's counts
--           once it has sent them (Anthropic: before the content; OpenAI: in the last
--           chunk), else the router's estimate (request bytes / 4, content so far / 4);
--           after the end, what the call was charged and recorded with.
--   router.chat_parts({ model =, members =, messages = { json, ... } }, opts) -> as router.chat
--       a chat request given as JSON texts the caller wrote with factory.json (as
--       factory.objective does): members, its members other than model, messages and
--       stream ('"max_tokens":1024,"temperature":0.2', or ""), and each message's
--       JSON (made UTF-8 like a table's). The router puts the request together
--       without parsing the messages again; text from outside goes through
--       router.chat, which checks it.
--   router.embeddings(request, opts) -> response | nil, err, code   (opts: team, run, raw)
--   router.models() -> { "alias", ... }     router.stats() -> table (providers, budgets)
--   router.has_alias(name) -> whether name is a configured alias
--   router.set_budget("team"|"run", name, { usd =, tokens = })   overrides the
--       configured limit of one team (per day) or run
--   router.count_spent("team"|"run", name, { usd =, tokens = })   the account has
--       spent at least this (a team: today): what the store records of other
--       processes, counted when a process starts, so a restart grants no fresh day
--   router.day_start() -> when (Unix time) the current budget day began
--   router.prompt_tokens(text) -> the prompt tokens the router estimates a request's
--       JSON text at (a token per 4 bytes; an inline image, 1,600 at most)
--   router.clear_budget("team"|"run", name)   forgets that account (what it spent,
--       its override); calls in flight settle into the old one. Accounts live in
--       memory from their first call: clear a run's when the run ends.
--   Budgets: a team's usd_per_day and tokens_per_day start afresh at midnight
--       (UTC, or budgets.utc_offset hours east of it); a run's usd and tokens cover
--       the whole run. A call reserves its estimate on both before it is sent.
--   router.on_call(fn) -> unsubscribe; fn(record) after every call, in the caller's
--       fiber: { kind, alias, provider, model, team, run, stream, prompt_tokens,
--       completion_tokens, cost_usd, latency_ms, first_token_ms, status = "ok" |
--       "error" | "cancelled", code, error, attempts = { { provider, model,
--       status (HTTP), code (error code; none when it succeeded), outcome ("ok" or
--       the error), latency_ms, retry_after_s } } } (first_token_ms: when the first
--       chunk came, or the whole answer; none if neither did). The attempts are the
--       chain in order, skipped providers included. Records never hold an API key.
--   router.use_ledger(fn) -> detach: calls of a team with a budget are confirmed by
--       fn{ team =, usd =, tokens =, limit_usd =, limit_tokens = } (the call's estimate
--       and the team's limits) before they are sent: fn returns a hold id (it goes into
--       the call's record) or nil, err, code: the call fails unsent, with EBUDGET, or
--       with EUNAVAILABLE for any other failure (fn raising too). The last attached fn
--       is asked (factory.budgets: the store's ledger across processes).
--   router.live_holds() -> { hold, ... }: the holds of the calls in flight (sent, not ended)
--   router.flush()  hands the records of the calls that have ended to the on_call
--       hooks now (otherwise the next fiber that passes through the router does):
--       a process about to end calls it, after cancelling its callers
--   router.stop(reason) -> n: the process is about to end (an interrupted `factory
--       run`): the n calls in flight end now, each cancelled, charged what it used (its
--       prompt, if the provider had it) and handed to the on_call hooks before this
--       returns. Their callers, and any that calls the router afterwards, wait for
--       good: none acts on a call that did not finish.
-- Error codes: EINVAL (bad request), EALIAS (unknown model), EBUDGET (a budget is
-- exhausted: the pipeline turns it into BLOCKED), EUPSTREAM (the provider answered
-- with an error or garbage), EUNAVAILABLE (no provider left to try), ETIMEDOUT,
-- ECONNREFUSED, ECONNRESET, EHOST, ETLS, ECANCELED, ENOCONFIG.
local core = require "factory.core.router"
local json = require "factory.json"
local to_utf8 = require("factory.core.text").to_utf8
local log = require "factory.log"

local M = {}

local hooks = {}

-- Records are produced in C as calls end; they are handed to the hooks by whichever
-- fiber next passes through here, so a hook never runs inside a libuv callback.
local function flush()
  local records = core.records()
  if not records then return end
  for _, r in ipairs(records) do
    for _, fn in ipairs(hooks) do
      local ok, err = pcall(fn, r)
      if not ok then log.error("router: on_call hook failed", { error = tostring(err) }) end
    end
  end
end

local function flushed(...)
  flush()
  return ...
end

function M.stop(reason)
  if type(reason) ~= "string" then error("router.stop: expected a reason", 2) end
  local n = core.stop(reason)
  flush()
  return n
end

function M.on_call(fn)
  if type(fn) ~= "function" then error("router.on_call: expected a function", 2) end
  hooks[#hooks + 1] = fn
  core.record(true)
  return function()
    for i = #hooks, 1, -1 do
      if hooks[i] == fn then table.remove(hooks, i) end
    end
    core.record(#hooks > 0)
  end
end

-- The configured aliases as a set, built on first use after each configure
-- (has_alias is asked on every objective).
local aliases

function M.configure(cfg)
  if type(cfg) ~= "table" then error("router.configure: expected a table", 2) end
  local text, err, code = json.encode(cfg)
  if not text then return nil, err, code end
  aliases = nil
  return core.configure(text)
end

-- A request built here is made UTF-8, as JSON must be: a provider refuses a whole
-- request (HTTP 400) for one byte of a Latin-1 file an agent read. JSON text from a
-- client (the proxy) is passed on as it came.
local function encode_request(request, what)
  if type(request) == "string" then return request end
  if type(request) ~= "table" then error(what .. ": request must be a table or JSON text", 3) end
  return (to_utf8(assert(json.encode(request))))
end

local function decoded(text, raw)
  if raw or not text then return text end
  return json.decode(text)
end

local Stream = {}
Stream.__index = Stream

function Stream:read(timeout)
  local chunk, err, code = self.core:read(timeout)
  if chunk == nil then
    flush()
    return nil, err, code
  end
  return decoded(chunk, self.raw)
end

function Stream:usage()
  return self.core:usage()
end

function Stream:close()
  self.core:close()
  flush()
end

local ledgers = {}

function M.use_ledger(fn)
  if type(fn) ~= "function" then error("router.use_ledger: expected a function", 2) end
  ledgers[#ledgers + 1] = fn
  core.ledger(true)
  return function()
    for i = #ledgers, 1, -1 do
      if ledgers[i] == fn then table.remove(ledgers, i) end
    end
    core.ledger(#ledgers > 0)
  end
end

-- What core's call gave: a pending call (its estimate, then the team's limits; < 0:
-- none) goes to the ledger and is sent or refused as it says. A ledger that cannot
-- say (its store is busy, or away) makes the call EUNAVAILABLE: waited out and tried
-- again like a provider that is down, never sent unchecked.
local function confirmed(team, res, usd, tokens, limit_usd, limit_tokens)
  if type(usd) ~= "number" then return res, usd, tokens end
  local ledger = ledgers[#ledgers]
  if not ledger then return res:send() end
  local ok, hold, err, code = pcall(ledger, { team = team, usd = usd, tokens = tokens,
                                              limit_usd = limit_usd >= 0 and limit_usd or nil,
                                              limit_tokens = limit_tokens >= 0 and limit_tokens or nil })
  if ok and hold then return res:send(hold) end
  if not ok then err, code = hold, "EIO" end
  code = code or tostring(err):match("^(E%u+):") or "EIO"
  if code == "EBUDGET" then return res:refuse(code, (tostring(err):gsub("^E%u+: ", ""))) end
  return res:refuse("EUNAVAILABLE", ("budget: team %s's budget could not be checked in the store (%s)"):format(team,
    tostring(err):match("^E%u+: ") and tostring(err) or code .. ": " .. tostring(err)))
end

function M.chat(request, opts)
  opts = opts or {}
  local res, err, code = confirmed(opts.team, core.chat(encode_request(request, "router.chat"), opts.team,
                                                        opts.run and tostring(opts.run), opts.stream))
  if not res then return flushed(nil, err, code) end
  if type(res) ~= "string" then return setmetatable({ core = res, raw = opts.raw }, Stream) end
  return flushed(decoded(res, opts.raw))
end

function M.chat_parts(parts, opts)
  opts = opts or {}
  if type(parts) ~= "table" or type(parts.messages) ~= "table" then
    error("router.chat_parts: expected { model =, members =, messages = { json, ... } }", 2)
  end
  if type(parts.model) ~= "string" then return flushed(nil, "EINVAL: 'model' is required", "EINVAL") end
  local messages = parts.messages
  for i = 1, #messages do messages[i] = to_utf8(messages[i]) end
  local res, err, code = confirmed(opts.team, core.chat_parts(parts.model, parts.members or "", parts.messages,
                                                              opts.team, opts.run and tostring(opts.run), opts.stream))
  if not res then return flushed(nil, err, code) end
  if type(res) ~= "string" then return setmetatable({ core = res, raw = opts.raw }, Stream) end
  return flushed(decoded(res, opts.raw))
end

function M.embeddings(request, opts)
  opts = opts or {}
  local res, err, code = confirmed(opts.team, core.embeddings(encode_request(request, "router.embeddings"), opts.team,
                                                              opts.run and tostring(opts.run)))
  if not res then return flushed(nil, err, code) end
  return flushed(decoded(res, opts.raw))
end

function M.has_alias(name)
  if not aliases then
    aliases = {}
    for _, id in ipairs(M.models()) do aliases[id] = true end
  end
  return aliases[name] == true
end

function M.models()
  local ids = {}
  for _, m in ipairs(json.decode(core.models()).data) do ids[#ids + 1] = m.id end
  return ids
end

-- The OpenAI /v1/models document, as JSON text (the proxy serves it as it is).
M.models_json = core.models

function M.stats()
  return json.decode(core.stats())
end

function M.set_budget(kind, name, limits)
  limits = limits or {}
  core.set_budget(kind, tostring(name), limits.usd, limits.tokens)
end

function M.count_spent(kind, name, spent)
  spent = spent or {}
  core.count_spent(kind, tostring(name), spent.usd, spent.tokens)
end

M.day_start = core.day_start
M.live_holds = core.live_holds
M.prompt_tokens = core.prompt_tokens

function M.clear_budget(kind, name)
  core.clear_budget(kind, tostring(name))
end

M.flush = flush

return M
