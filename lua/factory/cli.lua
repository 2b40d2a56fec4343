-- factory.cli: the command line. Command names, flags and exit codes are a
-- contract that tests, later commands and users depend on:
--   factory SCRIPT.lua [ARGS...]   run a script in a fiber (its `...` and `arg` are ARGS)
--   factory -e CODE [ARGS...]      run CODE the same way
--   factory repl                   interactive prompt with the engine loaded
--   factory check [DIR]            validate definition files, print file:line errors
--   factory db migrate|status [--db URL]   apply or show the schema migrations
--   factory audit verify|search TEXT [--db URL]   check the audit chain, search the log
--   factory serve [--host H] [--port N] [--config FILE] [--db URL | --no-db] [--token T]
--                                  the model proxy; prints the URL it listens on
--   factory run PIPELINE --repo DIR (--issue TEXT | --file F)   run a work item (resumable)
--   factory resume RUN | hitl list|answer | runs [show RUN]      see factory.run_cli
--   factory learnings [search TEXT] [--team T] [--repo R] [--db URL]   see factory.learnings_cli
--   factory status [--db URL] [--config FILE] [--project DIR]   see factory.status_cli
--   factory version                print the version
--   factory help | --help | -h     usage; `factory COMMAND --help` for each command
-- Exit codes: 0 success, 1 the script or check failed, 2 usage error (unknown command
-- or flag: one line on stderr). A script that returns an integer exits with it.
local fiber = require "factory.fiber"
local host = require "factory.core.host"

local M = {}

local USAGE = [[
usage: factory COMMAND [OPTIONS]
       factory SCRIPT.lua [ARGS...]
       factory -e CODE [ARGS...]

commands:
  repl              interactive Lua prompt with the engine loaded (async calls work)
  check [DIR]       validate the definition files under DIR (default .)
  db migrate|status apply or show the database schema migrations (--db URL)
  audit verify|search TEXT  check the audit log's hash chain, or search it (--db URL)
  serve             the OpenAI-compatible model proxy (default 127.0.0.1:8420)
  run PIPELINE      run a work item through a pipeline (--repo DIR --issue TEXT|--file F)
  resume RUN        continue a run from its first unfinished stage
  hitl list|answer  the questions waiting for a human, and answering them
  runs [show RUN]   the latest runs, or one run's timeline
  status            the unfinished runs and what moves each on; each team's spending today
  learnings [search TEXT]  what agents learned (team, repo, objective), or a search
  version           print the version
  help              this text; `factory COMMAND --help` describes a command

A script runs inside a fiber: it can call sleep, spawn processes, make HTTP
requests and wait for them in straight-line code.
]]

local HELP = {
  repl = [[
usage: factory repl [--config FILE]

An interactive Lua prompt with the whole engine loaded. Expressions print their
values; statements run as typed; an incomplete statement continues on the next
line. Async calls (sleep(0.1), proc.run{...}, http.get(...)) work at the prompt.
`router` is configured from factory.lua (--config FILE, default ./factory.lua if
there is one) and `config` is what it loaded, so router.chat{ model = "factory/fast",
messages = { ... } } goes where `factory run` would send it.
History is kept in ~/.factory_history. Ctrl-D exits.
]],
  check = [[
usage: factory check [DIR]

Loads and validates every definition file under DIR (default: the current
directory): teams/*.lua, pipelines/*.lua and factory.lua. Prints one
"file:line: message" per problem; exits 1 if there is any, 0 otherwise.
]],
  serve = [[
usage: factory serve [--host H] [--port N] [--config FILE] [--db URL | --no-db] [--token T]

Serves the model proxy: POST /v1/chat/completions (streamed or not), POST
/v1/embeddings and GET /v1/models (OpenAI's API), and POST /v1/messages
(Anthropic's), routed through the aliases, fallbacks, rate limits and budgets of
factory.lua (./factory.lua, or --config), which is reloaded when edited (a broken
edit is logged and the previous configuration kept). Listens on 127.0.0.1:8420
unless told otherwise and prints its URL. Any host but loopback needs a token
(--token or $FACTORY_TOKEN) or keys in factory.lua, sent as the bearer key (or
x-api-key). Every model call is recorded in the store (--db URL, else $FACTORY_DB,
else .factory/factory.db here); --no-db records nothing. On SIGINT or SIGTERM it
stops accepting, lets requests in flight finish (up to 5 s), exits 0.
]],
  version = [[
usage: factory version

Prints the factory version and the versions of its libraries.
]],
}

local function err_line(msg)
  io.stderr:write("factory: ", msg, "\n")
end

local function usage_error(msg)
  err_line(msg .. " (see 'factory --help')")
  return 2
end

local function error_text(err)
  if type(err) == "table" then
    return tostring(err.code or "error") .. ": " .. tostring(err.message)
  end
  return tostring(err)
end

-- Runs chunk in the main fiber; prints file:line: message and a traceback on error.
local function run_main(chunk, args)
  local function exit_code(ok, err, tb, ...)
    if not ok then
      io.stderr:write(tb or error_text(err), "\n")
      return 1
    end
    if type(err) == "number" and err == math.floor(err) then return err end
    return 0
  end
  return exit_code(fiber.run(chunk, unpack(args, 1, args.n)))
end

local function script_args(argv, first)
  local args = { n = 0 }
  for i = first, #argv do
    args.n = args.n + 1
    args[args.n] = argv[i]
  end
  return args
end

local function set_arg(argv, script_index)
  local a = {}
  for i = 0, #argv do a[i - script_index] = argv[i] end
  rawset(_G, "arg", a)
end

local function cmd_script(argv)
  local path = argv[1]
  local chunk, err = loadfile(path)
  if not chunk then
    err_line(err)
    return 1
  end
  set_arg(argv, 1)
  return run_main(chunk, script_args(argv, 2))
end

local function cmd_eval(argv)
  local code = argv[2]
  if not code then return usage_error("-e needs an argument: factory -e CODE") end
  local chunk, err = loadstring(code, "=(command line)")
  if not chunk then
    err_line(err)
    return 1
  end
  set_arg(argv, 2)
  return run_main(chunk, script_args(argv, 3))
end

local function library_versions()
  local parts = { jit and jit.version or _VERSION }
  local ok, http = pcall(require, "factory.core.http_client")
  if ok and http.versions then
    for _, v in ipairs(http.versions()) do parts[#parts + 1] = v end
  end
  return table.concat(parts, ", ")
end

local function cmd_version()
  io.stdout:write(("factory %s (%s)\n"):format(host.version, library_versions()))
  return 0
end

local function no_extra(name, argv, max)
  for i = 2, #argv do
    local a = argv[i]
    if a:sub(1, 1) == "-" then return usage_error(("unknown flag '%s' for '%s'"):format(a, name)) end
  end
  if #argv - 1 > max then return usage_error(("too many arguments for '%s'"):format(name)) end
end

local function cmd_check(argv)
  local bad = no_extra("check", argv, 1)
  if bad then return bad end
  local defs = require "factory.defs"
  local dir = argv[2] or "."
  local problems, warnings, checked = defs.check(dir)
  for _, p in ipairs(problems) do io.stderr:write(p, "\n") end
  for _, w in ipairs(warnings or {}) do io.stderr:write("warning: ", w, "\n") end
  if #problems > 0 then return 1 end
  local what = {}
  if checked.config then what[1] = "factory.lua" end
  local function count(n, noun) if n > 0 then what[#what + 1] = ("%d %s%s"):format(n, noun, n == 1 and "" or "s") end end
  count(checked.pipelines, "pipeline")
  count(checked.teams, "team")
  -- An "ok" for a directory that holds no project would pass a batch's check in the
  -- wrong place.
  if #what == 0 then
    io.stderr:write(("check: nothing to check in %s: no factory.lua, teams/*.lua or pipelines/*.lua"
      .. " (factory check DIR names the project's directory)\n"):format(dir))
    return 1
  end
  io.stdout:write("check: ok: ", table.concat(what, ", "), "\n")
  return 0
end

local function cmd_repl(argv)
  local opts = {}
  if argv[2] == "--config" then
    if not argv[3] then return usage_error("--config needs a value") end
    opts.config = argv[3]
    table.remove(argv, 2)
    table.remove(argv, 2)
  end
  local bad = no_extra("repl", argv, 0)
  if bad then return bad end
  local repl = require "factory.repl"
  return run_main(repl.main, { opts, n = 1 })
end

local SERVE_FLAGS = { ["--host"] = "host", ["--port"] = "port", ["--config"] = "config", ["--db"] = "db",
                      ["--token"] = "token" }

local function cmd_serve(argv)
  local opts = {}
  local i = 2
  local no_db = false
  while i <= #argv do
    local name = SERVE_FLAGS[argv[i]]
    if argv[i] == "--no-db" then
      no_db = true
      i = i + 1
    elseif not name then
      if argv[i]:sub(1, 1) == "-" then return usage_error(("unknown flag '%s' for 'serve'"):format(argv[i])) end
      return usage_error(("unexpected argument '%s' for 'serve'"):format(argv[i]))
    elseif argv[i + 1] == nil then
      return usage_error(("%s needs a value"):format(argv[i]))
    else
      opts[name] = argv[i + 1]
      i = i + 2
    end
  end
  if no_db and opts.db then return usage_error("--db and --no-db exclude each other") end
  -- The default store (true: $FACTORY_DB, else .factory/factory.db), as for every command.
  if not no_db then opts.db = opts.db or true end
  if opts.port then
    opts.port = tonumber(opts.port)
    if not opts.port or opts.port ~= math.floor(opts.port) or opts.port < 0 or opts.port > 65535 then
      return usage_error("--port needs a port number")
    end
  end
  opts.token = opts.token or os.getenv("FACTORY_TOKEN")
  return run_main(require("factory.serve").main, { opts, n = 1 })
end

local function cmd_db(argv)
  local dbcli = require "factory.db.cli"
  return run_main(function() return dbcli.run({ unpack(argv, 2) }) end, { n = 0 })
end

local function cmd_audit(argv)
  local auditcli = require "factory.audit_cli"
  return run_main(function() return auditcli.run({ unpack(argv, 2) }) end, { n = 0 })
end

local function cmd_pipeline(argv)
  local runcli = require "factory.run_cli"
  return run_main(function() return runcli.main(argv[1], { unpack(argv, 2) }) end, { n = 0 })
end

local function cmd_learnings(argv)
  local learningscli = require "factory.learnings_cli"
  return run_main(function() return learningscli.run({ unpack(argv, 2) }) end, { n = 0 })
end

local function cmd_status(argv)
  local statuscli = require "factory.status_cli"
  return run_main(function() return statuscli.run({ unpack(argv, 2) }) end, { n = 0 })
end

local COMMANDS = {
  learnings = cmd_learnings,
  status = cmd_status,
  run = cmd_pipeline,
  resume = cmd_pipeline,
  hitl = cmd_pipeline,
  runs = cmd_pipeline,
  db = cmd_db,
  audit = cmd_audit,
  version = cmd_version,
  check = cmd_check,
  repl = cmd_repl,
  serve = cmd_serve,
  help = function()
    io.stdout:write(USAGE)
    return 0
  end,
}

function M.main(argv)
  local first = argv[1]
  if first == nil then
    io.stderr:write(USAGE)
    return 2
  end
  if first == "-h" or first == "--help" then return COMMANDS.help() end
  if first == "--version" then return cmd_version() end
  if first == "-e" then return cmd_eval(argv) end
  if first:sub(1, 1) == "-" then return usage_error(("unknown flag '%s'"):format(first)) end
  local cmd = COMMANDS[first]
  if cmd then
    if first == "db" then HELP.db = require("factory.db.cli").USAGE end
    if cmd == cmd_pipeline then HELP[first] = require("factory.run_cli").HELP[first] end
    if first == "audit" then HELP.audit = require("factory.audit_cli").USAGE end
    if first == "learnings" then HELP.learnings = require("factory.learnings_cli").USAGE end
    if first == "status" then HELP.status = require("factory.status_cli").USAGE end
    for i = 2, #argv do
      if argv[i] == "--help" or argv[i] == "-h" then
        io.stdout:write(HELP[first] or USAGE)
        return 0
      end
    end
    return cmd(argv)
  end
  if first:find("%.lua$") or first:find("/") then return cmd_script(argv) end
  return usage_error(("unknown command '%s'"):format(first))
end

return M
