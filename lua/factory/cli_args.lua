-- factory.cli_args: argument parsing (and a number's printing) shared by the
-- subcommands that take a store (`factory db ...`, `factory audit ...`, `factory
-- learnings`, `factory status`).
--
--   db_and_words(args) -> { url = URL | nil, words = { ... } } | nil, message
--   flags(args, names) -> opts, words | nil, message
--       names: { ["--flag"] = "key", ... }, each taking a value (`--flag V` or
--       `--flag=V`, into opts.key); any other flag is an error
--   commas(n) -> "1,234,567"
--   reporters(command) -> fail(msg) -> 1, usage_error(msg) -> 2
--       a subcommand's messages on stderr, "factory COMMAND: msg"; a usage error
--       points at `factory COMMAND --help`
-- Accepts `--db URL` and `--db=URL` anywhere; any other flag is an error, the rest
-- are the positional words in order.
local M = {}

function M.reporters(command)
  local prefix = "factory " .. command .. ": "
  return function(msg)
    io.stderr:write(prefix, msg, "\n")
    return 1
  end, function(msg)
    io.stderr:write(prefix, msg, (" (see 'factory %s --help')\n"):format(command))
    return 2
  end
end

function M.flags(args, names)
  local opts, words = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local name, value = a:match("^(%-%-%a+)=(.*)$")
    name = name or a
    if names[name] then
      if not value then
        value = args[i + 1]
        if value == nil then return nil, name .. " needs a value" end
        i = i + 1
      end
      opts[names[name]] = value
    elseif a:sub(1, 1) == "-" then
      return nil, ("unknown flag '%s'"):format(a)
    else
      words[#words + 1] = a
    end
    i = i + 1
  end
  return opts, words
end

function M.commas(n)
  local s = ("%d"):format(math.floor(n or 0))
  repeat
    local k
    s, k = s:gsub("^(-?%d+)(%d%d%d)", "%1,%2")
  until k == 0
  return s
end

function M.db_and_words(args)
  local url, words = nil, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--db" then
      if not args[i + 1] then return nil, "--db needs a URL" end
      url = args[i + 1]
      i = i + 2
    elseif a:match("^%-%-db=") then
      url = a:sub(6)
      i = i + 1
    elseif a:sub(1, 1) == "-" then
      return nil, ("unknown flag '%s'"):format(a)
    else
      words[#words + 1] = a
      i = i + 1
    end
  end
  return { url = url, words = words }
end

return M
