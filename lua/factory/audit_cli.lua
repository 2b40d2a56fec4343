-- factory.audit_cli: `factory audit verify|search TEXT [--db URL]`.
--
--   run(args) -> exit code: 0 ok (verify: the chain is intact; search: printed the
--   matches, maybe none), 1 failure (one line on stderr: a broken chain names its
--   first broken seq), 2 usage error. args: what follows `audit`. Runs in a fiber.
--   USAGE: the help text for `factory audit --help`.
local db = require "factory.db"
local audit = require "factory.audit"
local cli_args = require "factory.cli_args"
local time = require "factory.core.time"

local M = {}

M.USAGE = [[
usage: factory audit verify [--db URL]
       factory audit search TEXT [--db URL]

  verify        check the hash chain of the audit log; names the first broken link
  search TEXT   list the records whose kind, actor or payload contain TEXT, newest first

--db URL    sqlite:PATH or postgres://user:password@host:port/dbname
            (default: $FACTORY_DB, else .factory/factory.db in this directory)
]]

local fail, usage_error = cli_args.reporters("audit")

local function parse(args)
  local parsed, err = cli_args.db_and_words(args)
  if not parsed then return nil, err end
  local words = parsed.words
  local opts = { url = parsed.url, command = words[1], text = words[2] }
  if opts.command == "verify" then
    if #words > 1 then return nil, ("unexpected argument '%s'"):format(words[2]) end
  elseif opts.command == "search" then
    if not opts.text then return nil, "search needs a TEXT" end
    if #words > 2 then return nil, ("unexpected argument '%s'"):format(words[3]) end
  elseif opts.command then
    return nil, ("unknown subcommand '%s' (verify or search)"):format(opts.command)
  else
    return nil, "missing subcommand: verify or search"
  end
  return opts
end

local function run(conn, opts)
  local st, err = conn:schema_status()
  if not st then return fail(err) end
  if st.version == 0 then return fail("the database has no schema yet (run 'factory db migrate')") end
  if opts.command == "verify" then
    local ok, n = audit.verify(conn)
    if not ok then return fail(n) end
    io.stdout:write(("audit: %d record(s), chain intact\n"):format(n))
    return 0
  end
  local rows
  rows, err = audit.search(conn, opts.text)
  if not rows then return fail(err) end
  for _, r in ipairs(rows) do
    io.stdout:write(("%d %s %s %s %s\n"):format(r.seq, time.iso8601(r.created_at), r.kind, r.actor or "-", r.payload))
  end
  return 0
end

function M.run(args)
  local opts, err = parse(args)
  if not opts then return usage_error(err) end
  local conn
  conn, err = db.open(opts.url)
  if not conn then return fail(err) end
  local code = run(conn, opts)
  conn:close()
  return code
end

return M
