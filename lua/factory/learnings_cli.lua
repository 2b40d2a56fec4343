-- factory.learnings_cli: `factory learnings [search TEXT] [--team T] [--repo R]
-- [--limit N] [--db URL]`.
--
--   run(args) -> exit code: 0 listed (maybe nothing), 1 failure (one line on stderr),
--   2 usage error. args: what follows `learnings`. Runs in a fiber.
--   USAGE: the help text for `factory learnings --help`.
-- Without `search` the newest learnings are listed; with it, the ones matching TEXT
-- (full-text, best first). Each is printed as
--   #ID  TIME  team TEAM  repo REPO
--       TEXT
--       from: the first line of the objective it came from
local db = require "factory.db"
local memory = require "factory.memory"
local time = require "factory.core.time"
local cli_args = require "factory.cli_args"

local M = {}

M.USAGE = [[
usage: factory learnings [--team T] [--repo R] [--limit N] [--db URL]
       factory learnings search TEXT [--team T] [--repo R] [--limit N] [--db URL]

  (none)        the newest learnings agents recorded, with their team, repository
                and the objective they came from
  search TEXT   the learnings matching TEXT (full-text, best first)

--team T    only team T's learnings
--repo R    only those about repository R
--limit N   at most N (default 20)
--db URL    sqlite:PATH or postgres://user:password@host:port/dbname
            (default: $FACTORY_DB, else .factory/factory.db in this directory)
]]

local FLAGS = { ["--team"] = "team", ["--repo"] = "repo", ["--limit"] = "limit", ["--db"] = "db" }

local fail, usage_error = cli_args.reporters("learnings")

local function parse(args)
  local opts, words = cli_args.flags(args, FLAGS)
  if not opts then return nil, words end
  if opts.limit then
    local n = tonumber(opts.limit)
    if not n or n < 1 or n ~= math.floor(n) then return nil, "--limit needs a positive whole number" end
    opts.limit = n
  end
  if words[1] == "search" then
    if not words[2] then return nil, "search needs a TEXT" end
    if words[3] then return nil, ("unexpected argument '%s'"):format(words[3]) end
    opts.text = words[2]
  elseif words[1] then
    return nil, ("unknown subcommand '%s' (search TEXT, or none to list)"):format(words[1])
  end
  return opts
end

local function first_line(text)
  local line = (text or ""):match("^%s*([^\n]*)") or ""
  if #line > 100 then line = line:sub(1, 97) .. "..." end
  return line
end

function M.run(args)
  local opts, err = parse(args)
  if not opts then return usage_error(err) end
  local conn
  conn, err = db.open(opts.db)
  if not conn then return fail(err) end
  local ok
  ok, err = conn:migrate()
  if not ok then
    conn:close()
    return fail(err)
  end
  local rows
  ok, rows = pcall(memory.search_learnings, conn, opts.text, { team = opts.team, repo = opts.repo, limit = opts.limit })
  conn:close()
  if not ok then return fail(tostring(rows)) end
  if #rows == 0 then io.stdout:write(opts.text and "no matching learnings\n" or "no learnings\n") end
  for _, r in ipairs(rows) do
    io.stdout:write(("#%d  %s  team %s  repo %s\n    %s\n"):format(r.id, time.iso8601(r.created_at), r.team or "-",
      r.repo or "-", r.text))
    if r.objective then io.stdout:write("    from: ", first_line(r.objective), "\n") end
  end
  return 0
end

return M
