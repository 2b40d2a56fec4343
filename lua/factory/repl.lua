-- factory.repl: the interactive prompt of `factory repl`.
--
--   main([opts])      the prompt; returns 0 at end of input (Ctrl-D).
--                     opts.config: factory.lua's path (default: ./factory.lua if any)
--   pretty(value)     the text a result is shown as; a string or table under a key
--                     that looks secret (api_key, token, keys...: factory.log's rule)
--                     is shown as "[REDACTED]": index it to see it
--   compile(source)   -> function | nil (incomplete: read more) | false, error
--   environment([opts]) the globals of a session: the engine loaded, backed by _G;
--                     with a factory.lua, `router` is configured from it and
--                     `config` is what it loaded (a file that does not load is
--                     reported, and the session goes on without it)
--
-- Every input runs in its own fiber, so async calls work at the prompt and an
-- error, or Ctrl-C while it waits, ends that input and not the session. On a
-- terminal, lines are edited with libedit and kept in ~/.factory_history (or
-- $FACTORY_HISTORY); from a pipe or a file, only results and errors are printed.
local fiber = require "factory.fiber"
local env_core = require "factory.core.env"
local host = require "factory.core.host"
local input = require "factory.core.repl"
local log = require "factory.log"

local M = {}

local PROMPT, CONTINUE = "factory> ", "...> "
local MAX_DEPTH, WIDTH = 8, 72

local KEYWORDS = {}
for w in ([[and break do else elseif end false for function goto if in local nil not
  or repeat return then true until while]]):gmatch("%a+") do KEYWORDS[w] = true end

local ESCAPES = { ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ['"'] = '\\"', ["\\"] = "\\\\" }

local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or ("\\%03d"):format(c:byte())
  end) .. '"'
end

local function key_text(k)
  if type(k) == "string" and k:find("^[%a_][%w_]*$") and not KEYWORDS[k] then return k end
  return "[" .. (type(k) == "string" and quote(k) or tostring(k)) .. "]"
end

-- Numbers first, then strings, then anything else by its text.
local RANK = { number = 1, string = 2 }
local function key_before(a, b)
  local ra, rb = RANK[type(a)] or 3, RANK[type(b)] or 3
  if ra ~= rb then return ra < rb end
  if ra == 3 then return tostring(a) < tostring(b) end
  return a < b
end

-- open: the tables being printed around this one, so a cycle shows as <cycle>
-- while a table merely seen twice prints twice.
local function render(v, indent, depth, open)
  if type(v) == "string" then return quote(v) end
  if type(v) ~= "table" then return tostring(v) end
  local mt = getmetatable(v)
  if type(mt) == "table" and mt.__tostring then return tostring(v) end
  if open[v] then return "<cycle>" end
  if depth >= MAX_DEPTH then return "{...}" end
  open[v] = true
  local inner, items, n = indent .. "  ", {}, 0
  while rawget(v, n + 1) ~= nil do
    n = n + 1
    items[n] = render(rawget(v, n), inner, depth + 1, open)
  end
  local keys = {}
  for k in next, v do
    if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then keys[#keys + 1] = k end
  end
  table.sort(keys, key_before)
  for _, k in ipairs(keys) do
    local x = rawget(v, k)
    local hidden = (type(x) == "string" or type(x) == "table") and log.is_secret(k)
    items[#items + 1] = key_text(k) .. " = " .. (hidden and '"[REDACTED]"' or render(x, inner, depth + 1, open))
  end
  open[v] = nil
  if #items == 0 then return "{}" end
  local flat = "{ " .. table.concat(items, ", ") .. " }"
  if #indent + #flat <= WIDTH and not flat:find("\n", 1, true) then return flat end
  return "{\n" .. inner .. table.concat(items, ",\n" .. inner) .. "\n" .. indent .. "}"
end

function M.pretty(v)
  return render(v, "", 0, {})
end

local function incomplete(err)
  return err:sub(-7) == "'<eof>'"
end

-- An expression is tried first so that it prints its values. They are passed
-- through a call: as a tail call, `return error("x")` would lose the prompt's line
-- from the message. The local's name is one nobody types.
function M.compile(source)
  local fn = loadstring("local function __repl_values(...) return ... end return __repl_values(" .. source .. "\n)",
    "=stdin")
  if fn then return fn end
  local err, _, experr
  fn, err = loadstring(source, "=stdin")
  if fn then return fn end
  _, experr = loadstring("return " .. source, "=stdin")
  if incomplete(err) or incomplete(experr) then return nil end
  return false, err
end

-- name = the modules to try, in order; other engineers' modules may be missing.
local OPTIONAL = {
  proc = { "factory.proc", "factory.core.proc" },
  http = { "factory.http", "factory.core.http_client" },
  fs = { "factory.fs", "factory.core.fs" },
}

-- factory.lua, as `factory run` and `serve` use it: calls made at the prompt go
-- through the same providers, aliases and budgets.
local function configure(env, path)
  local config = require "factory.config"
  path = config.find(path)
  if not path then return end
  local cfg, err = config.load(path)
  if not cfg then
    io.stderr:write("factory repl: ", err, " (the router is not configured)\n")
    return
  end
  local ok, cerr = env.router.configure(cfg.router)
  if not ok then
    io.stderr:write("factory repl: ", path, ": ", tostring(cerr), " (the router is not configured)\n")
    return
  end
  for _, w in ipairs(cfg.warnings) do io.stderr:write("factory repl: warning: ", path, ": ", w, "\n") end
  env.config = cfg
end

function M.environment(opts)
  opts = opts or {}
  local env = setmetatable({}, { __index = _G })
  env.fiber, env.sleep, env.spawn = fiber, fiber.sleep, fiber.spawn
  env.json = require "factory.json"
  env.log = require "factory.log"
  env.time = require "factory.core.time"
  env.env = env_core
  env.router = require "factory.router"
  configure(env, opts.config)
  for name, modules in pairs(OPTIONAL) do
    for _, mod in ipairs(modules) do
      local ok, m = pcall(require, mod)
      if ok then
        env[name] = m
        break
      end
    end
  end
  return env
end

-- Runs fn in its own fiber; on a terminal, Ctrl-C cancels it.
local function run(fn, tty)
  local f = fiber.spawn(fn)
  if tty then
    local watch = fiber.spawn(input.wait_interrupt)
    fiber.any({ f, watch })
    watch:cancel()
    f:cancel("interrupted")
  end
  return fiber.join(f)
end

local function show_error(err, tb)
  io.stdout:flush()
  if type(err) == "table" and err.code == "ECANCELED" then
    io.stderr:write("\n", tostring(err.message), "\n")   -- after the terminal's ^C
  else
    io.stderr:write(tb or tostring(err), "\n")
  end
end

local function show(ok, ...)
  if not ok then return show_error(...) end
  local n = select("#", ...)
  if n == 0 then return end
  local out = {}
  for i = 1, n do
    -- A __tostring that fails must not end the session.
    local shown, text = pcall(M.pretty, (select(i, ...)))
    out[i] = shown and text or ("<cannot show: " .. tostring(text) .. ">")
  end
  io.stdout:write(table.concat(out, "\t"), "\n")
end

local function history_path()
  local p = env_core.get("FACTORY_HISTORY")
  if p and p ~= "" then return p end
  local home = env_core.get("HOME")
  return home and home .. "/.factory_history"
end

local function session(tty, opts)
  local env = M.environment(opts)
  local history = tty and history_path()
  local last
  if history then input.load_history(history) end
  if tty then
    io.stdout:write(("factory %s (%s) - the engine is loaded%s; Ctrl-D exits.\n"):format(host.version, jit.version,
      env.config and "; `router` is configured from factory.lua" or ""))
  end
  local lines = {}
  while true do
    io.stdout:flush()
    local line, _, code = input.readline(#lines == 0 and PROMPT or CONTINUE)
    if line == nil and code ~= "EINTR" then break end
    if line == nil then
      lines = {}
    elseif #lines > 0 or line:find("%S") then
      -- Saved at once, so a session that is killed keeps its history.
      if history and line:find("%S") and line ~= last then
        input.add_history(line)
        input.save_history(history)
        last = line
      end
      lines[#lines + 1] = line
      local fn, err = M.compile(table.concat(lines, "\n"))
      if fn then
        lines = {}
        show(run(setfenv(fn, env), tty))
      elseif fn == false then
        lines = {}
        show_error(err)
      end
    end
  end
  if #lines > 0 then show_error(select(2, loadstring(table.concat(lines, "\n"), "=stdin"))) end
end

function M.main(opts)
  local tty = input.isatty()
  local ok, err = xpcall(session, debug.traceback, tty, opts or {})
  input.close()
  if not ok then error(err, 0) end
  return 0
end

return M
