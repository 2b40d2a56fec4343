-- factory.db.cli: `factory db migrate|status [--db URL]`.
--
--   run(args) -> exit code: 0 ok, 1 failure (one line on stderr), 2 usage error
--   args: what follows `db` on the command line. Must run inside a fiber.
--   USAGE: the help text for `factory db --help`.
local db = require "factory.db"
local cli_args = require "factory.cli_args"

local M = {}

M.USAGE = [[
usage: factory db migrate [--db URL]
       factory db status [--db URL]

  migrate   apply the schema migrations this factory knows and the database lacks,
            each in its own transaction
  status    show the database's schema version and the pending migrations

--db URL    sqlite:PATH or postgres://user:password@host:port/dbname
            (default: $FACTORY_DB, else .factory/factory.db in this directory)
]]

local fail, usage_error = cli_args.reporters("db")

local function parse(args)
  local parsed, err = cli_args.db_and_words(args)
  if not parsed then return nil, err end
  local words = parsed.words
  if not words[1] then return nil, "missing subcommand: migrate or status" end
  if words[1] ~= "migrate" and words[1] ~= "status" then
    return nil, ("unknown subcommand '%s' (migrate or status)"):format(words[1])
  end
  if words[2] then return nil, ("unexpected argument '%s'"):format(words[2]) end
  return { url = parsed.url, command = words[1] }
end

local function names(list)
  local out = {}
  for i, m in ipairs(list) do out[i] = ("%d %s"):format(m.version, m.name) end
  return table.concat(out, ", ")
end

local function print_status(st)
  if #st.pending == 0 then
    io.stdout:write(("schema:   version %d (up to date)\n"):format(st.version))
  else
    io.stdout:write(("schema:   version %d of %d, %d pending: %s\n"):format(
      st.version, st.latest, #st.pending, names(st.pending)))
  end
end

function M.run(args)
  local opts, err = parse(args)
  if not opts then return usage_error(err) end
  local conn
  conn, err = db.open(opts.url)
  if not conn then return fail(err) end
  io.stdout:write("database: ", conn.url, "\n")
  local st
  if opts.command == "migrate" then
    local res
    res, err = conn:migrate()
    if res then
      io.stdout:write("applied:  ", #res.applied > 0 and names(res.applied) or "nothing (already up to date)", "\n")
      st, err = conn:schema_status()
    end
  else
    st, err = conn:schema_status()
    if st and st.newer then
      err = ("ESCHEMA: schema version %d is newer than this factory (knows %d)"):format(st.version, st.latest)
      st = nil
    end
  end
  conn:close()
  if not st then return fail(err) end
  print_status(st)
  return 0
end

return M
