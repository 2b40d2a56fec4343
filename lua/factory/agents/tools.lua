-- factory.agents.tools: the built-in agent's tools, confined to one worktree.
--
--   tools.new(root, { secrets = { "NAME", ... }, timeout = SECONDS (default 120),
--                     max_output = BYTES (default 64 KiB), max_read = BYTES (default 256 KiB),
--                     lock = fn(relpath) -> true | nil, err, code },
--                     on_command = fn(process) -> fn() | nil (told of each command's
--                       process once it runs; what it returns is called when it ends),
--                     home = DIR (HOME of the commands; default: the agents' own home,
--                       $XDG_CACHE_HOME/factory/agent-home or ~/.cache/factory/agent-home,
--                       shared by them and outside every worktree) })
--       -> box | nil, err, code
--       lock: asked before write_file or edit_file changes a file, with the path
--       relative to the worktree after confinement (links resolved, "./" and ".."
--       gone), e.g. factory.agents.locks.acquire on the objective's behalf. A refusal
--       ("ECONFLICT: ...") is the tool's error and the file stays untouched; a lock
--       function that raises gives "ELOCK: ...".
--   box:read_file(path) -> text   (a binary file, one with a NUL byte in its first
--       8,000, is an EBINARY error: its bytes would only cost the model tokens)
--   box:write_file(path, text) -> "wrote N bytes to PATH"
--   box:edit_file(path, old, new) -> "edited PATH"   (old must occur exactly once)
--   box:list_dir([path]) -> { "name", "dir/", ... }   (the first 1,000 entries, then a
--       line saying how many more there are)
--   box:grep(pattern [, path [, fixed]]) -> "path:line:text\n..."   (a POSIX extended
--       regular expression, as `grep -E` reads it, from the C library; fixed = true:
--       plain text; a pattern that does not compile is an EINVAL with the reason).
--       In a git worktree, what git ignores is skipped, unless path is inside it.
--   box:run_command(argv | "shell text") -> { code, signal, timed_out, truncated, stdout, stderr,
--       timeout = the limit in seconds, when timed_out }
--       a stream longer than max_output keeps its first quarter and last three
--       quarters of that, with a line saying how much was cut (truncated = true);
--       past 4 MiB a command's output is discarded
--   box:finish(task_result) -> "finished"; box.result is the TaskResult
--   box:call(name, args) -> the tool with named arguments (the model's JSON object)
--   box.changes: count of successful writes and edits (stuck detection)
--   tools.SCHEMAS: the tools in OpenAI function-calling format
--   tools.middle_cut(text, max) -> text, or at most max bytes of it: its first quarter
--       and last three, with a line saying how much was cut between them
--
-- Every failure is a value the model sees: nil, "ECODE: message", "ECODE". A path
-- that leaves the worktree, lexically (`..`, an absolute path) or through a symbolic
-- link anywhere along it, gives "EPATH: <path>: <reason>".
--
-- Confinement is checked twice. In Lua, for an error that says what is wrong: the
-- path is normalised, then each existing component is examined with lstat and every
-- symbolic link resolved with realpath and required to stay in the worktree. Then
-- by the kernel, for the file itself: reads and writes go through
-- fs.read_beneath / fs.write_beneath (openat2 with RESOLVE_BENEATH from the
-- worktree's root), so a component swapped for a link between the check and the
-- use (by a process left running by run_command) still cannot lead out.
local fs = require "factory.core.fs"
local regex = require "factory.core.regex"
local env = require "factory.core.env"
local proc = require "factory.proc"
local json = require "factory.json"
local git = require "factory.git"

local M = {}

local NAME_MAX, PATH_MAX = 255, 4096
local MAX_GREP_MATCHES, MAX_GREP_BYTES, MAX_GREP_FILE = 200, 32 * 1024, 1024 * 1024
-- Files read in one pool job by grep: at most 32 MiB held at once.
local GREP_BATCH = 32
local MAX_LINKS = 40
local MAX_LIST = 1000
-- What a command may print before the rest is discarded (max_output is what the
-- model is shown of it).
local CAPTURE = 4 * 1024 * 1024

-- Names a child may inherit; everything else (API keys included) stays behind.
local PASSED = { "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ" }
local ALWAYS_SECRET = { "OPENAI_API_KEY", "ANTHROPIC_API_KEY" }

local Box = {}
Box.__index = Box

local function fail(code, msg) return nil, code .. ": " .. msg, code end

-- A path as the model can read it in an error: escapes shown, long ones cut.
local function shown(path)
  local s = tostring(path):gsub("%z", "\\0")
  if #s > 120 then s = s:sub(1, 100) .. ("...(%d bytes)"):format(#path) end
  return s
end

local function epath(path, reason) return fail("EPATH", shown(path) .. ": " .. reason) end

-- The lock callback's verdict on rel: true, or nil, err, code.
local function take_lock(self, rel)
  if not self.lock then return true end
  local ok, v, err, code = pcall(self.lock, rel)
  if not ok then return fail("ELOCK", "cannot lock " .. rel .. ": " .. tostring(v)) end
  if not v then
    err = err or "ECONFLICT: " .. rel .. " is locked"
    return nil, err, code or tostring(err):match("^(E%u+):") or "ECONFLICT"
  end
  return true
end

-- The kernel refusing a path beneath the root (EXDEV) is a path leaving the worktree.
local function beneath_error(path, err, code)
  if code == "EXDEV" then return epath(path, "leads outside the worktree (refused by the kernel)") end
  return nil, err, code
end

local function inside(root, real)
  return real == root or real:sub(1, #root + 1) == root .. "/"
end

-- path -> absolute resolved path, path relative to root | nil, err, code.
-- Lexical checks first, then the walk over existing components.
function Box:resolve(path)
  if type(path) ~= "string" then return epath(tostring(path), "a path must be a string") end
  if path == "" then return epath(path, "empty path") end
  if path:find("%z") then return epath(path, "path contains a NUL byte") end
  if #path > PATH_MAX then return epath(path, ("path is longer than %d bytes"):format(PATH_MAX)) end
  local rest = path
  if path:sub(1, 1) == "/" then
    if not inside(self.root, path) and not inside(self.root, (path:gsub("/+$", ""))) then
      return epath(path, "absolute path outside the worktree " .. self.root)
    end
    rest = path:sub(#self.root + 1)
  end
  local parts = {}
  for comp in rest:gmatch("[^/]+") do
    if #comp > NAME_MAX then
      return epath(path, ("a path component is longer than %d bytes"):format(NAME_MAX))
    end
    if comp == ".." then
      if #parts == 0 then return epath(path, "'..' leaves the worktree") end
      parts[#parts] = nil
    elseif comp ~= "." then
      parts[#parts + 1] = comp
    end
  end
  -- Walk: `cur` is always a real path inside the root.
  local cur, links = self.root, 0
  local i = 1
  while i <= #parts do
    local p = cur .. "/" .. parts[i]
    local st, err, code = fs.stat(p)
    if not st then
      if code == "ENOENT" then
        -- Nothing below exists: the rest is created, if at all, under cur.
        for j = i, #parts do cur = cur .. "/" .. parts[j] end
        break
      end
      if code == "ENOTDIR" then return epath(path, "a component is not a directory") end
      return nil, err, code
    end
    if st.type == "link" then
      links = links + 1
      if links > MAX_LINKS then return epath(path, "too many symbolic links") end
      local real = fs.realpath(p)
      if not real then
        return epath(path, ("symbolic link %s dangles (its target may be outside the worktree)")
          :format(table.concat(parts, "/", 1, i)))
      end
      if not inside(self.root, real) then
        return epath(path, ("symbolic link %s leads outside the worktree"):format(table.concat(parts, "/", 1, i)))
      end
      cur = real
    else
      cur = p
    end
    i = i + 1
  end
  if #cur > PATH_MAX then return epath(path, ("path is longer than %d bytes"):format(PATH_MAX)) end
  local rel = cur == self.root and "." or cur:sub(#self.root + 2)
  return cur, rel
end

function Box:read_file(path)
  local full, rel, code = self:resolve(path)
  if not full then return nil, rel, code end
  local st, err
  st, err, code = fs.stat(full, true)
  if not st then return nil, err, code end
  if st.type ~= "file" then return fail("EISDIR", shown(path) .. " is a " .. st.type .. ", not a file") end
  local text
  text, err, code = fs.read_beneath(self.root, rel)
  if not text then return beneath_error(path, err, code) end
  -- git's test for a binary file: a NUL byte in its first 8,000.
  if text:sub(1, 8000):find("%z") then
    return fail("EBINARY", ("%s is a binary file (%d bytes): not shown; inspect it with run_command (file, od,"
      .. " or the project's own tools)"):format(shown(path), #text))
  end
  if #text > self.max_read then
    return text:sub(1, self.max_read) .. ("\n[truncated: %s has %d bytes; showing the first %d]"):format(
      rel, #text, self.max_read)
  end
  return text
end


function Box:write_file(path, text)
  if type(text) ~= "string" then return fail("EINVAL", "write_file: text must be a string") end
  local full, rel, code = self:resolve(path)
  if not full then return nil, rel, code end
  if full == self.root then return epath(path, "is the worktree itself") end
  local st = fs.stat(full)
  if st and st.type == "directory" then return fail("EISDIR", shown(path) .. " is a directory") end
  local ok, err
  ok, err, code = take_lock(self, rel)
  if not ok then return nil, err, code end
  ok, err, code = fs.write_beneath(self.root, rel, text, { parents = true })
  if not ok then return beneath_error(path, err, code) end
  self.changes = self.changes + 1
  return ("wrote %d bytes to %s"):format(#text, rel)
end

local function count_plain(s, needle)
  local n, at = 0, 1
  while true do
    local a, b = s:find(needle, at, true)
    if not a then return n end
    n, at = n + 1, b + 1
  end
end

local function squeeze(line) return (line:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")) end

local function lines_of(text)
  local out = {}
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do out[#out + 1] = line end
  return out
end

-- Where old occurs in text but for whitespace (indentation, tabs for spaces, trailing
-- blanks, CRLF line ends): models copy code with the whitespace changed more than
-- anything else, and shown the file's own lines they get the next edit right. The
-- first and last lines of old may be parts of lines. Returns the first line number
-- and the file's lines there, when there is exactly one such place.
local MAX_HINT_LINES = 40

local function near_miss(text, old)
  local want = lines_of(old:gsub("\n$", ""))
  for i, line in ipairs(want) do want[i] = squeeze(line) end
  if #want > MAX_HINT_LINES or squeeze(old) == "" then return nil end
  local have = lines_of(text)
  local found
  for start = 1, #have - #want + 1 do
    local ok = true
    for k = 1, #want do
      local line, w = squeeze(have[start + k - 1]), want[k]
      if #want == 1 then ok = line:find(w, 1, true) ~= nil
      elseif k == 1 then ok = w ~= "" and line:sub(-#w) == w
      elseif k == #want then ok = w ~= "" and line:sub(1, #w) == w
      else ok = line == w end
      if not ok then break end
    end
    if ok then
      if found then return nil end
      found = start
    end
  end
  if found then return found, (table.concat(have, "\n", found, found + #want - 1):gsub("\r\n", "\n"):gsub("\r$", "")) end
end

function Box:edit_file(path, old, new)
  if type(old) ~= "string" or old == "" then return fail("EINVAL", "edit_file: old must be a non-empty string") end
  if type(new) ~= "string" then return fail("EINVAL", "edit_file: new must be a string") end
  local text, err, code = self:read_file(path)
  if not text then return nil, err, code end
  local full, rel = self:resolve(path)
  local size = fs.stat(full, true).size
  if #text ~= size then return fail("EFBIG", shown(path) .. " is too large to edit here") end
  local n = count_plain(text, old)
  -- A file with CRLF line ends, edited with the LF ends a model writes: the same text.
  if n == 0 and not old:find("\r", 1, true) and text:find("\r\n", 1, true) then
    local crlf = old:gsub("\n", "\r\n")
    if crlf ~= old and count_plain(text, crlf) > 0 then
      old, new, n = crlf, new:find("\r", 1, true) and new or new:gsub("\n", "\r\n"), count_plain(text, crlf)
    end
  end
  if n == 0 then
    local line, there = near_miss(text, old)
    if line then
      return fail("ENOTFOUND", ("the text to replace was not found in %s as given, but line %d on matches it except"
        .. " for whitespace (indentation, tabs, line ends); give old exactly as the file has it:\n%s"):format(rel,
        line, there))
    end
    return fail("ENOTFOUND", ("the text to replace was not found in %s (it must match exactly, "
      .. "whitespace included)"):format(rel))
  end
  if n > 1 then
    return fail("ENOTUNIQUE", ("the text to replace occurs %d times in %s; include more surrounding "
      .. "text so it occurs exactly once"):format(n, rel))
  end
  local a, b = text:find(old, 1, true)
  local ok
  ok, err, code = take_lock(self, rel)
  if not ok then return nil, err, code end
  ok, err, code = fs.write_beneath(self.root, rel, text:sub(1, a - 1) .. new .. text:sub(b + 1))
  if not ok then return beneath_error(path, err, code) end
  self.changes = self.changes + 1
  return "edited " .. rel
end

function Box:list_dir(path)
  local full, rel, code = self:resolve(path or ".")
  if not full then return nil, rel, code end
  local names, err
  names, err, code = fs.list(full)
  if not names then return nil, err, code end
  -- A directory of generated files can hold 100,000 entries: the model gets the
  -- first MAX_LIST and a note, not a listing it pays for and cannot use.
  local total = #names
  for k = total, MAX_LIST + 1, -1 do names[k] = nil end
  for k, name in ipairs(names) do
    local st = fs.stat(full .. "/" .. name)
    if st and st.type == "directory" then names[k] = name .. "/"
    elseif st and st.type == "link" then names[k] = name .. "@" end
  end
  if total > MAX_LIST then
    names[#names + 1] = ("[%d more entries not shown: %d in all]"):format(total - MAX_LIST, total)
  end
  return names
end

function Box:grep(pattern, path, fixed)
  if type(pattern) ~= "string" or pattern == "" then return fail("EINVAL", "grep: pattern must be a non-empty string") end
  local full, rel, code = self:resolve(path or ".")
  if not full then return nil, rel, code end
  local re, rerr
  if not fixed then
    re, rerr = regex.compile(pattern)
    if not re then return fail("EINVAL", "grep: bad regular expression '" .. pattern .. "': " .. rerr) end
  end
  local out, bytes, matches, cut = {}, 0, 0, false
  local function scan(text, name)
    if not text or text:find("\0", 1, true) then return end
    -- Most files hold no match: one search of the whole text (where ^ and $ are a
    -- line's ends) passes over them without splitting them into lines.
    if re then
      if not re:find(text) then return end
    elseif not text:find(pattern, 1, true) then
      return
    end
    local n = 0
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
      n = n + 1
      if (re and re:find(line)) or (not re and line:find(pattern, 1, true)) then
        local entry = ("%s:%d:%s"):format(name, n, #line > 300 and line:sub(1, 300) .. "..." or line)
        if matches >= MAX_GREP_MATCHES or bytes + #entry > MAX_GREP_BYTES then cut = true return end
        out[#out + 1], bytes, matches = entry, bytes + #entry + 1, matches + 1
      end
    end
  end
  -- What git ignores (node_modules/, build output, .env) is skipped, as ripgrep
  -- does: matches there would crowd out the source's. A path given explicitly
  -- inside such a place is searched all the same.
  local st = fs.stat(full, true)
  local repo = st and st.type == "directory" and git.open(self.root) or nil
  if repo and rel ~= "." and (repo:ignored({ rel .. "/" }) or {})[1] then
    repo:close()
    repo = nil
  end
  -- The files to search, in the order their matches are listed. Links are not
  -- followed: what they point to was either checked by resolve or is reached
  -- through its real place in the tree. The directory says what each entry is.
  local files, names = {}, {}
  local function walk(dir, name)
    local entries, rels = {}, {}
    local list, types = fs.list(dir, true)
    for k, n in ipairs(list or {}) do
      local kind = types[k]
      if n ~= ".git" and (kind == "directory" or kind == "file") then
        local shown_name = name == "." and n or name .. "/" .. n
        entries[#entries + 1] = { dir .. "/" .. n, shown_name, kind }
        rels[#rels + 1] = shown_name .. (kind == "directory" and "/" or "")
      end
    end
    local ignored = repo and #rels > 0 and repo:ignored(rels) or {}
    for i, e in ipairs(entries) do
      if not ignored[i] then
        if e[3] == "directory" then
          walk(e[1], e[2])
        else
          files[#files + 1], names[#names + 1] = e[1], e[2]
        end
      end
    end
  end
  if st and st.type == "directory" then
    walk(full, rel)
  else
    files[1], names[1] = full, rel
  end
  -- Read in batches (one pool round trip each), searched in order until the output
  -- is full; a file larger than MAX_GREP_FILE, or no regular file, reads as false.
  for first = 1, #files, GREP_BATCH do
    local last = math.min(first + GREP_BATCH - 1, #files)
    local texts = fs.read_many({ unpack(files, first, last) }, MAX_GREP_FILE) or {}
    for k = first, last do
      if cut then break end
      scan(texts[k - first + 1] or nil, names[k])
    end
    if cut then break end
  end
  if repo then repo:close() end
  if re then re:close() end
  if cut then out[#out + 1] = ("[output cut at %d matches / %d bytes]"):format(matches, bytes) end
  if #out == 0 then return "no matches" end
  return table.concat(out, "\n")
end

-- HOME of the commands: one directory for every built-in agent, outside any
-- worktree. What tools keep in a home (npm's logs and cache, Go's module cache,
-- ~/.local, ~/.gitconfig) landed in the worktree when HOME was the worktree, and
-- was committed with the agent's change; the user's own home (credentials,
-- dotfiles) stays out of reach.
local shared_home

local function agent_home()
  if shared_home then return shared_home end
  local base = env.get("XDG_CACHE_HOME")
  if not base or base == "" then
    local home = env.get("HOME")
    base = home and home ~= "" and home .. "/.cache"
  end
  for _, dir in ipairs({ base and base .. "/factory/agent-home", "/tmp/factory-agent-home" }) do
    if dir and fs.mkdir_p(dir, tonumber("700", 8)) then
      shared_home = dir
      return dir
    end
  end
end

-- The explicit environment of a child: a few harmless names, HOME at the agents'
-- own home, and never a secret, even when one of the passed names is listed as secret.
function Box:child_env()
  local e = {}
  for _, name in ipairs(PASSED) do e[name] = env.get(name) end
  e.PATH = e.PATH or "/usr/local/bin:/usr/bin:/bin"
  e.LANG = e.LANG or "C.UTF-8"
  e.HOME = self.home or agent_home() or self.root
  e.TERM = "dumb"
  for name in pairs(self.secrets) do e[name] = nil end
  return e
end

-- A test run's verdict is at the end of its output: a long output keeps its first
-- quarter and its last three, with a line saying what was cut between them.
function M.middle_cut(text, max)
  if #text <= max then return text end
  local head = math.floor(max / 4)
  local tail = max - head
  return text:sub(1, head) .. ("\n[... %d bytes cut here ...]\n"):format(#text - max) .. text:sub(-tail)
end

function Box:run_command(cmd)
  local argv
  if type(cmd) == "string" then
    if cmd:find("%z") then return fail("EINVAL", "run_command: command contains a NUL byte") end
    argv = { "/bin/sh", "-c", cmd }
  elseif type(cmd) == "table" and #cmd > 0 then
    argv = {}
    for k, a in ipairs(cmd) do
      if type(a) ~= "string" or a:find("%z") then return fail("EINVAL", "run_command: argv[" .. k .. "] is not a plain string") end
      argv[k] = a
    end
  else
    return fail("EINVAL", "run_command: expected an argv list or a shell command string")
  end
  local res, err, code = proc.run{ argv = argv, cwd = self.root, env = self:child_env(), timeout = self.timeout,
                                   max_output = math.max(self.max_output, CAPTURE), stderr = "pipe",
                                   started = self.on_command }
  if not res then return nil, err, code end
  if res.timed_out then res.timeout = self.timeout end
  for _, stream in ipairs({ "stdout", "stderr" }) do
    local text = res[stream]
    if text and #text > self.max_output then
      res[stream] = M.middle_cut(text, self.max_output)
      res.truncated = true
    end
  end
  return res
end

function Box:finish(result)
  if type(result) ~= "table" then return fail("EINVAL", "finish: expected the TaskResult object") end
  self.result = result
  return "finished"
end

local ARGS = {
  read_file = { "path" }, write_file = { "path", "text" }, edit_file = { "path", "old", "new" },
  list_dir = { "path" }, grep = { "pattern", "path", "fixed" }, run_command = { "command" },
}

function Box:call(name, args)
  if type(args) ~= "table" then return fail("EINVAL", name .. ": arguments must be a JSON object") end
  if name == "finish" then return self:finish(args.result or args) end
  local names = ARGS[name]
  if not names then return fail("ENOTOOL", ("unknown tool %q"):format(tostring(name))) end
  local vals = {}
  for k, n in ipairs(names) do
    local v = args[n]
    if v == json.null then v = nil end
    vals[k] = v
  end
  return self[name](self, unpack(vals, 1, #names))
end

function M.new(root, opts)
  opts = opts or {}
  if type(root) ~= "string" or root == "" then error("tools.new: root must be a directory path", 2) end
  local real, err, code = fs.realpath(root)
  if not real then return nil, err, code end
  if real == "/" then return fail("EPATH", "the worktree cannot be /") end
  local st = fs.stat(real)
  if not st or st.type ~= "directory" then return fail("ENOTDIR", root .. " is not a directory") end
  local secrets = {}
  for _, n in ipairs(ALWAYS_SECRET) do secrets[n] = true end
  for _, n in ipairs(opts.secrets or {}) do secrets[n] = true end
  return setmetatable({
    root = real, secrets = secrets, changes = 0,
    timeout = opts.timeout or 120, max_output = opts.max_output or 64 * 1024,
    max_read = opts.max_read or 256 * 1024, lock = opts.lock, home = opts.home, on_command = opts.on_command,
  }, Box)
end

local function fn(name, description, props, required)
  return { type = "function", ["function"] = { name = name, description = description,
    parameters = { type = "object", properties = props, required = required } } }
end

local S = { type = "string" }
M.SCHEMAS = {
  fn("read_file", "Read a text file of the worktree.", { path = S }, { "path" }),
  fn("write_file", "Create or replace a file of the worktree with the given text.", { path = S, text = S },
     { "path", "text" }),
  fn("edit_file", "Replace the one occurrence of `old` (exact text) in a file with `new`.",
     { path = S, old = S, new = S }, { "path", "old", "new" }),
  fn("list_dir", "List a directory of the worktree (directories end with /).", { path = S }, {}),
  fn("grep", "Search files for a regular expression (POSIX extended, as grep -E; plain text with fixed=true);"
     .. " prints path:line:text. Files git ignores are skipped unless path names a place inside them.",
     { pattern = S, path = S, fixed = { type = "boolean" } }, { "pattern" }),
  fn("run_command", "Run a shell command in the worktree (no network credentials, time-limited).",
     { command = S }, { "command" }),
  fn("finish", "End the work with your TaskResult (status COMPLETE, NEEDS_CLARIFICATION or BLOCKED).",
     { status = S, reasoning = S, artifact = S, blockers = { type = "array", items = S },
       learnings = { type = "array", items = S } }, { "status", "reasoning" }),
}

return M
