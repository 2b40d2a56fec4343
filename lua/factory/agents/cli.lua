-- factory.agents.cli: CLI coding agents (Claude Code, Codex, Aider or any command)
-- run as a fresh-context loop in one worktree. State lives in files, not in a
-- conversation: SPEC.md holds the objective and its checklist, and each iteration is
-- a new agent process that works on it until every box is checked or a cap is hit.
--
--   cli.run(o) -> result, stats          (the shape of factory.agents.builtin.run, so
--                                         workspace.run{ agent = cli.run, ... } works)
--   o: { root = DIR (the worktree), objective = text, team =, run = RUN id,
--        preset = "claude" | "codex" | "aider"   (a command and format; see PRESETS),
--        command = { argv template }: "{prompt}" inside any element is replaced by the
--          iteration's prompt; with no "{prompt}" anywhere the prompt goes to stdin,
--        format = "claude" (stream-json) | "codex" (`exec --json`) | "plain" (default),
--        prompt = text replacing M.PROMPT (the instructions of every iteration),
--        checklist = { item, ... } (default: the objective's list lines - "- x",
--          "* x", "1. x", "- [ ] x" - else its first line),
--        learnings = { text, ... }: earlier learnings, listed in SPEC.md,
--        max_iterations = n (default 10; a killed iteration's retry is not one more),
--        stuck_idle = n (default 3: iterations in a row that check no box -> BLOCKED),
--        heartbeat_timeout = SECONDS (default 900: longer than the 10 minutes Claude
--          Code lets one command run, printing nothing meanwhile): any output line is a heartbeat;
--          none for that long and the process group is killed and the iteration retried,
--        iteration_timeout = SECONDS (default 3600): the same for one iteration's age,
--        kill_grace = SECONDS (default 5): SIGTERM, then SIGKILL that much later,
--        max_retries = n (default 2): killed iterations retried in a row before BLOCKED,
--        proxy_url = the model proxy's root URL, virtual_key = the team's key for it,
--        model = the operative's model alias: "{model}" in the command, and through the
--          proxy the model of every variable the agents read (below); "{proxy}" in the
--          command is the proxy's root URL (Codex's model provider),
--        env = { NAME = value } more variables for the agent,
--        db = a store | nil: harvested learnings are stored there (memory.learn with
--          team, run, repo, objective); on_learnings = fn(texts) | nil instead;
--          with neither they are returned in result.learnings,
--        repo_name = the repository the learnings are about (default: the worktree's
--          main repository path, read from its .git file),
--        keep_files = true to leave SPEC.md and .ai/ in the worktree,
--        charge = fn(iteration, attempt) -> true | nil, err | nil: asked before each
--          agent process starts (factory.agents.pool's daily budget); a refusal ends
--          the loop BLOCKED with its reason,
--        spawn = fn(opts) -> process | nil, err: starts each agent process (default
--          factory.proc.spawn; factory.agents.build records them in the store),
--        emit = fn(kind, data) | nil }
--   The agent's environment is built, never inherited: PATH, HOME, LANG, TERM=dumb,
--   OPENAI_BASE_URL = PROXY/v1 and ANTHROPIC_BASE_URL = PROXY (from proxy_url),
--   OPENAI_API_KEY = ANTHROPIC_API_KEY = ANTHROPIC_AUTH_TOKEN = virtual_key (never a
--   provider key: the proxy counts the team's spend), ANTHROPIC_CUSTOM_HEADERS =
--   "X-Factory-Run: RUN"; with a proxy and a model, that model as ANTHROPIC_MODEL,
--   ANTHROPIC_DEFAULT_{OPUS,SONNET,HAIKU}_MODEL, ANTHROPIC_SMALL_FAST_MODEL and
--   CLAUDE_CODE_SUBAGENT_MODEL (Claude Code), AIDER_MODEL = "openai/MODEL" with
--   OPENAI_API_BASE (Aider); then o.env. It runs in the worktree in its own process group.
--   Each iteration: spawn -> read its output (stdout and stderr merged) line by line,
--   parse events into emit("agent_progress" | "agent_heartbeat" | "agent_usage" |
--   "agent_killed" | "agent_iteration" | "agent_learning", { iteration =, ... }; at the
--   end "agent_done", { status, iterations, tokens, cost_usd }) ->
--   harvest .ai/new-learnings.md (one learning per non-empty line or bullet; the file
--   is removed) -> .ai/stuck.md: BLOCKED with its text -> every box of SPEC.md checked:
--   COMPLETE (the artifact is the checklist and the agent's last report).
--   Caps (iterations, stuck_idle, retries) and a command that cannot start give BLOCKED
--   with the reason. At the end SPEC.md and the .ai/ files are removed (a SPEC.md the
--   repository had is put back), so workspace.run never commits them.
--   result: a TaskResult (factory.confidence). stats: { iterations = processes started,
--   retries, killed, tokens, input_tokens, output_tokens, cost_usd, learnings = { text } }.
--   Bad arguments raise; everything else is a result.
--
--   cli.program(spec) -> program, PATH | nil   what an agent spec ({ cli =, command =,
--       env = } of a team file) runs, and where it is looked up
--   cli.PRESETS, cli.PROMPT, cli.checklist(objective) -> { item, ... },
--   cli.parse_line(format, line) -> { progress = text | nil, usage = {...} | nil,
--       cost_usd =, error = text | nil, report = text | nil, message_id = }  (for tests)
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local json = require "factory.json"
local env = require "factory.core.env"
local to_utf8 = require("factory.core.text").to_utf8
local fs = require "factory.core.fs"
local time = require "factory.core.time"
local confidence = require "factory.confidence"
local memory = require "factory.memory"

local M = {}

M.PRESETS = {
  -- Edits accepted and commands allowed without asking; bypassPermissions would do
  -- the same but Claude Code refuses it to root, which CI machines and containers are.
  claude = { format = "claude", command = { "claude", "-p", "{prompt}", "--output-format", "stream-json", "--verbose",
                                            "--permission-mode", "acceptEdits",
                                            "--allowedTools", "Bash Edit Write Read Glob Grep" } },
  -- Codex reaches models only through a configured provider speaking the Responses
  -- API (the proxy's /v1/responses); its sandbox lets it write in the worktree.
  codex = { format = "codex", command = { "codex", "exec", "--json", "--sandbox", "workspace-write", "--ephemeral",
    "--model", "{model}", "-c", "model_provider=factory", "-c", 'model_providers.factory={ name = "factory",'
      .. ' base_url = "{proxy}/v1", env_key = "OPENAI_API_KEY", wire_api = "responses" }', "{prompt}" } },
  aider = { format = "plain", command = { "aider", "--yes-always", "--no-auto-commits", "--message", "{prompt}" } },
}

M.PROMPT = [[
You are one iteration of a loop of fresh agent processes working in this git worktree;
nothing is remembered between iterations except the files.
1. Read SPEC.md: the objective and its checklist.
2. Take the first unchecked item ("- [ ]"), do it, and verify it (run the tests).
3. Check it off in SPEC.md ("- [x]"). Go on with the next items while you can.
Append what is worth remembering for later work on this repository, one line each, to
.ai/new-learnings.md. If you cannot go on without a human, write why to .ai/stuck.md
and stop. Do not commit, and do not put SPEC.md or .ai/ in any commit.]]

local SPEC, LEARNINGS, STUCK = "SPEC.md", ".ai/new-learnings.md", ".ai/stuck.md"
-- An agent prints nothing while one of its commands runs (a test suite), and Claude
-- Code lets a command run 10 minutes; a hung agent only costs this much wall time.
local DEFAULT_HEARTBEAT_S = 900
local DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

local function first_line(text)
  return (text:match("^%s*([^\n]*)") or ""):gsub("%s+$", "")
end

local function cut(text, n)
  text = tostring(text):gsub("%s+", " "):gsub("^ ", "")
  if #text > n then return text:sub(1, n - 3) .. "..." end
  return text
end

function M.checklist(objective)
  local items = {}
  for line in (objective .. "\n"):gmatch("([^\n]*)\n") do
    local item = line:match("^%s*[-*+]%s+%[[ xX]%]%s+(.-)%s*$") or line:match("^%s*[-*+]%s+(.-)%s*$")
      or line:match("^%s*%d+[.)]%s+(.-)%s*$")
    if item and item ~= "" then items[#items + 1] = item end
  end
  if #items == 0 then items[1] = first_line(objective) end
  return items
end

local function spec_text(objective, items, learned)
  -- The objective's own check boxes become plain bullets: the only boxes are the checklist's.
  local text = ("\n" .. objective:gsub("%s+$", "")):gsub("\n(%s*[-*+]%s+)%[[ xX]%]%s+", "\n%1"):sub(2)
  local out = { "# Objective", "", text, "" }
  if learned and #learned > 0 then
    out[#out + 1] = "## Learned in earlier work"
    out[#out + 1] = ""
    for _, t in ipairs(learned) do out[#out + 1] = "- " .. t end
    out[#out + 1] = ""
  end
  out[#out + 1] = "## Checklist"
  out[#out + 1] = ""
  for _, item in ipairs(items) do out[#out + 1] = "- [ ] " .. item end
  out[#out + 1] = ""
  return table.concat(out, "\n")
end

-- The checklist in SPEC.md (after its last "## Checklist" heading, if it has one):
-- number checked, number open, the item lines.
local function spec_state(text)
  local done, open, lines = 0, 0, {}
  text = text or ""
  local from = 1
  for pos in text:gmatch("()##[ \t]+Checklist[^\n]*") do
    if pos == 1 or text:sub(pos - 1, pos - 1) == "\n" then from = pos end
  end
  for line in text:sub(from):gmatch("[^\n]+") do
    local mark = line:match("^%s*[-*+]%s+%[([ xX])%]")
    if mark then
      if mark == " " then open = open + 1 else done = done + 1 end
      lines[#lines + 1] = (line:gsub("^%s+", ""))
    end
  end
  return done, open, lines
end

-- ---- event parsers: one output line -> what it tells ------------------------------

local function num(v) return tonumber(v) or 0 end

local function claude_usage(u)
  if type(u) ~= "table" then return nil end
  return { input_tokens = num(u.input_tokens) + num(u.cache_creation_input_tokens) + num(u.cache_read_input_tokens),
           output_tokens = num(u.output_tokens) }
end

local function tool_brief(input)
  if type(input) ~= "table" then return "" end
  local v = input.command or input.file_path or input.path or input.pattern or input.description or input.url
  return v and (" " .. cut(v, 120)) or ""
end

local function parse_claude(ev)
  local t, out = ev.type, {}
  if t == "system" then
    if ev.subtype == "init" then
      out.progress = "session started" .. (type(ev.model) == "string" and (" (" .. ev.model .. ")") or "")
    end
  elseif t == "assistant" and type(ev.message) == "table" then
    local m = ev.message
    local parts = {}
    for _, c in ipairs(type(m.content) == "table" and m.content or {}) do
      if type(c) == "table" and c.type == "text" and type(c.text) == "string" and c.text:find("%S") then
        parts[#parts + 1] = cut(c.text, 200)
      elseif type(c) == "table" and c.type == "tool_use" then
        parts[#parts + 1] = "tool " .. tostring(c.name) .. tool_brief(c.input)
      end
    end
    if #parts > 0 then out.progress = table.concat(parts, "; ") end
    out.message_id = type(m.id) == "string" and m.id or nil
    out.message_usage = claude_usage(m.usage)
  elseif t == "user" and type(ev.message) == "table" then
    for _, c in ipairs(type(ev.message.content) == "table" and ev.message.content or {}) do
      if type(c) == "table" and c.type == "tool_result" and c.is_error == true then
        out.progress = "tool error: " .. cut(type(c.content) == "string" and c.content or json.encode(c.content), 200)
      end
    end
  elseif t == "result" then
    out.usage = claude_usage(ev.usage) or { input_tokens = 0, output_tokens = 0 }
    out.cost_usd = num(ev.total_cost_usd)
    out.report = type(ev.result) == "string" and ev.result or nil
    if ev.is_error == true or ev.subtype ~= "success" then
      out.error = tostring(ev.subtype) .. ": " .. cut(out.report or "", 300)
    end
    out.progress = ("result %s: %d turns, $%.4f"):format(tostring(ev.subtype), num(ev.num_turns), out.cost_usd)
  end
  return out
end

local function parse_codex(ev)
  local t, out = ev.type, {}
  if t == "thread.started" then
    out.progress = "session started"
  elseif t == "turn.completed" then
    local u = type(ev.usage) == "table" and ev.usage or {}
    -- input_tokens includes cached_input_tokens.
    out.usage = { input_tokens = num(u.input_tokens), output_tokens = num(u.output_tokens) }
    out.add_usage = true
  elseif t == "turn.failed" then
    local e = type(ev.error) == "table" and ev.error.message or ev.error
    out.error = "turn failed: " .. cut(e or "", 300)
    out.progress = out.error
  elseif t == "error" then
    out.error = cut(ev.message or "", 300)
    out.progress = "error: " .. out.error
  elseif t == "item.completed" and type(ev.item) == "table" then
    local it = ev.item
    if it.type == "agent_message" and type(it.text) == "string" then
      out.progress = cut(it.text, 200)
      out.report = it.text
    elseif it.type == "command_execution" then
      out.progress = ("$ %s (exit %s)"):format(cut(it.command or "", 120), tostring(it.exit_code))
    elseif it.type == "file_change" and type(it.changes) == "table" then
      local paths = {}
      for _, c in ipairs(it.changes) do paths[#paths + 1] = tostring(type(c) == "table" and c.path or c) end
      out.progress = "changed " .. cut(table.concat(paths, ", "), 200)
    elseif it.type == "error" then
      out.progress = "error: " .. cut(it.message or "", 200)
    end
  end
  return out
end

local PARSERS = { claude = parse_claude, codex = parse_codex }

function M.parse_line(format, line)
  local parser = PARSERS[format]
  if parser then
    local ev = line:find("^%s*{") and json.decode(line)
    if type(ev) == "table" then return parser(ev) end
  end
  -- Plain text, or a line that is not an event (stderr is merged in).
  if line:find("%S") then return { progress = cut(line, 300) } end
  return {}
end

-- ---- one iteration ----------------------------------------------------------------

-- The program an agent spec ({ cli =, command =, env = } of a team file, or
-- cli.run's options) runs, and the PATH it is looked up in.
function M.program(spec)
  local preset = M.PRESETS[spec.preset or spec.cli]
  local command = spec.command or (preset and preset.command)
  if type(command) ~= "table" or type(command[1]) ~= "string" then return nil end
  return command[1], (spec.env and spec.env.PATH) or env.get("PATH") or DEFAULT_PATH
end

local MODEL_VARIABLES = { "ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
                          "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL" }

local function child_env(o)
  local e = { PATH = env.get("PATH") or DEFAULT_PATH, HOME = env.get("HOME"), LANG = env.get("LANG") or "C.UTF-8",
              TERM = "dumb" }
  if o.proxy_url then
    local base = o.proxy_url:gsub("/+$", ""):gsub("/v1$", "")
    e.OPENAI_BASE_URL, e.ANTHROPIC_BASE_URL = base .. "/v1", base
  end
  if o.virtual_key then
    e.OPENAI_API_KEY, e.ANTHROPIC_API_KEY, e.ANTHROPIC_AUTH_TOKEN = o.virtual_key, o.virtual_key, o.virtual_key
  end
  -- Left to itself an agent asks the proxy for its vendor's models
  -- ("claude-sonnet-4-5-...", and a haiku for its small tasks), which are not
  -- aliases: every call would fail. Each model it may pick is the operative's.
  if o.proxy_url and o.model then
    for _, name in ipairs(MODEL_VARIABLES) do e[name] = o.model end
    e.OPENAI_API_BASE, e.AIDER_MODEL = e.OPENAI_BASE_URL, "openai/" .. o.model
  end
  if o.run then e.ANTHROPIC_CUSTOM_HEADERS = "X-Factory-Run: " .. tostring(o.run) end
  for k, v in pairs(o.env or {}) do e[k] = v end
  return e
end

-- "{model}" is the operative's model and "{proxy}" the model proxy's root URL; an
-- argument naming one that is not there is left out with the option before it
-- ("--model", "-c"), and the agent keeps its own default.
local PLACEHOLDERS = { model = true, proxy = true }

local function argv_of(command, prompt, values)
  local argv, used = {}, false
  for _, a in ipairs(command) do
    local missing = false
    a = a:gsub("{(%a+)}", function(name)
      if not PLACEHOLDERS[name] then return nil end
      if values[name] == nil then missing = true return nil end
      return values[name]
    end)
    if missing then
      if (argv[#argv] or ""):find("^%-") then argv[#argv] = nil end
    else
      local s, e = a:find("{prompt}", 1, true)
      if s then
        used = true
        a = a:sub(1, s - 1) .. prompt .. a:sub(e + 1)
      end
      argv[#argv + 1] = a
    end
  end
  return argv, not used and prompt or nil
end

-- Runs one agent process. Returns { killed = "heartbeat" | "timeout" | nil, code,
-- signal, input_tokens, output_tokens, cost_usd, report, error } or nil, spawn error.
local function iterate(ctx, n)
  local emit = ctx.emit
  local argv, stdin = argv_of(ctx.command, ctx.prompt, { model = ctx.model, proxy = ctx.proxy })
  local p, err = (ctx.o.spawn or proc.spawn){ argv = argv, cwd = ctx.root, env = ctx.env, stdin = stdin,
                                             stdout = "pipe", stderr = "stdout", timeout = ctx.iteration_timeout,
                                             kill_grace = ctx.kill_grace }
  if not p then return nil, err end
  local it = { input_tokens = 0, output_tokens = 0, cost_usd = 0 }
  local msg_usage, turn_usage, final_usage = {}, { input_tokens = 0, output_tokens = 0 }, nil
  local last, last_beat = time.monotonic(), -math.huge
  local reader = fiber.spawn(function()
    while true do
      local line = p:read_line()
      if not line then return end
      last = time.monotonic()
      if last - last_beat >= 1 then
        last_beat = last
        emit("agent_heartbeat", { iteration = n })
      end
      -- Its report becomes the stage's recorded result, which must be UTF-8 (JSON,
      -- and PostgreSQL's text): an agent printing Latin-1 must not stop the run.
      local ev = M.parse_line(ctx.format, (to_utf8(line)))
      if ev.progress then emit("agent_progress", { iteration = n, text = ev.progress }) end
      if ev.message_id and ev.message_usage then msg_usage[ev.message_id] = ev.message_usage end
      if ev.usage then
        if ev.add_usage then
          turn_usage.input_tokens = turn_usage.input_tokens + ev.usage.input_tokens
          turn_usage.output_tokens = turn_usage.output_tokens + ev.usage.output_tokens
          final_usage = turn_usage
        else
          final_usage = ev.usage
        end
      end
      if ev.cost_usd then it.cost_usd = ev.cost_usd end
      if ev.report then it.report = ev.report end
      if ev.error then it.error = ev.error end
    end
  end)

  -- The watchdog: the reader's last line is the heartbeat.
  local step = math.max(0.02, math.min(1, ctx.heartbeat_timeout / 5))
  local ok, rerr = fiber.join(reader, step)
  local abandoned = false
  while ok == nil do
    if time.monotonic() - last >= ctx.heartbeat_timeout then
      it.killed = "heartbeat"
      emit("agent_killed", { iteration = n, reason = ("no output for %g s"):format(ctx.heartbeat_timeout) })
      p:kill("TERM")
      ok, rerr = fiber.join(reader, ctx.kill_grace)
      p:kill("KILL")
      if ok == nil then ok, rerr = fiber.join(reader, 1) end
      if ok == nil then -- a grandchild that left the group still holds the pipe
        reader:cancel("killed")
        fiber.join(reader)
        ok, abandoned = true, true
      end
      break
    end
    ok, rerr = fiber.join(reader, step)
  end
  -- (An abandoned pipe never reaches EOF, so it is not waited for: close kills the rest.)
  local st = not abandoned and p:wait(ctx.heartbeat_timeout) or nil
  p:close()
  if not ok then error(rerr, 0) end -- emit raised: the caller's bug, not the agent's
  if st and st.timed_out and not it.killed then
    it.killed = "timeout"
    emit("agent_killed", { iteration = n, reason = ("iteration ran longer than %g s"):format(ctx.iteration_timeout) })
  end
  it.code, it.signal = st and st.code, st and st.signal

  if not final_usage then
    final_usage = { input_tokens = 0, output_tokens = 0 }
    for _, u in pairs(msg_usage) do
      final_usage.input_tokens = final_usage.input_tokens + u.input_tokens
      final_usage.output_tokens = final_usage.output_tokens + u.output_tokens
    end
  end
  it.input_tokens, it.output_tokens = final_usage.input_tokens, final_usage.output_tokens
  if it.input_tokens + it.output_tokens > 0 or it.cost_usd > 0 then
    -- Through the proxy the calls are charged and recorded there at the configured
    -- prices; the agent's own figure is its estimate, and is said to be one.
    emit("agent_usage", { iteration = n, input_tokens = it.input_tokens, output_tokens = it.output_tokens,
                          cost_usd = it.cost_usd, estimate = ctx.proxy ~= nil or nil })
  end
  if not it.error and not it.killed and it.code ~= 0 then
    it.error = it.signal and ("the agent died of signal " .. it.signal) or ("the agent exited with code " .. tostring(it.code))
  end
  return it
end

-- ---- the loop -----------------------------------------------------------------------

-- The main repository of a worktree (its .git file names it), else the worktree.
local function repo_of(root)
  local text = fs.read(root .. "/.git")
  local gitdir = text and text:match("^gitdir:%s*(.-)%s*$")
  return gitdir and gitdir:match("^(.*)/%.git/worktrees/[^/]+/*$") or root
end

local function learnings_of(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    local t = line:gsub("^%s*[-*+]%s+", ""):gsub("^%s*%d+[.)]%s+", ""):gsub("^%s+", ""):gsub("%s+$", "")
    if t ~= "" and not t:find("^#") then out[#out + 1] = t end
  end
  return out
end

-- What the agent wrote (SPEC.md, its learnings, its stuck note) is recorded, so
-- it is made UTF-8 like its output.
local function read(path)
  local text = fs.read(path)
  return text and (to_utf8(text))
end

function M.run(o)
  if type(o) ~= "table" or type(o.objective) ~= "string" or type(o.root) ~= "string" then
    error("cli.run: expected { root =, objective =, command = | preset = }", 2)
  end
  local preset = o.preset and M.PRESETS[o.preset]
  if o.preset and not preset then error("cli.run: unknown preset " .. tostring(o.preset), 2) end
  local command = o.command or (preset and preset.command)
  if type(command) ~= "table" or type(command[1]) ~= "string" then
    error("cli.run: expected command = { argv template } or a preset", 2)
  end
  local format = o.format or (preset and preset.format) or "plain"
  if format ~= "plain" and not PARSERS[format] then error("cli.run: unknown format " .. tostring(format), 2) end
  local root = o.root:gsub("/+$", "")
  local user_emit = o.emit or function() end
  local stats = { iterations = 0, retries = 0, killed = 0, tokens = 0, input_tokens = 0, output_tokens = 0,
                  cost_usd = 0, learnings = {} }
  local ctx = {
    o = o, root = root, command = command, format = format, env = child_env(o), model = o.model,
    proxy = o.proxy_url and (o.proxy_url:gsub("/+$", ""):gsub("/v1$", "")),
    emit = user_emit,
    prompt = (o.prompt or M.PROMPT) .. "\n\nThe objective, in short: " .. first_line(o.objective),
    heartbeat_timeout = o.heartbeat_timeout or DEFAULT_HEARTBEAT_S, iteration_timeout = o.iteration_timeout or 3600,
    kill_grace = o.kill_grace or 5,
  }
  local max_iter, max_retries, stuck_idle = o.max_iterations or 10, o.max_retries or 2, o.stuck_idle or 3
  local repo = o.repo_name or repo_of(root)
  local keep_learnings = not o.db and not o.on_learnings

  -- SPEC.md (a SPEC.md of the repository's own is kept to be put back) and .ai/.
  local spec_path = root .. "/" .. SPEC
  local old_spec = fs.read(spec_path)  -- byte for byte
  local had_ai = fs.exists(root .. "/.ai")
  local items = o.checklist or M.checklist(o.objective)
  local ok, err = fs.write(spec_path, spec_text(o.objective, items, o.learnings))
  if not ok then return confidence.blocked("cannot write SPEC.md: " .. tostring(err)), stats end
  fs.mkdir_p(root .. "/.ai")

  local function cleanup()
    if o.keep_files then return end
    if old_spec then fs.write(spec_path, old_spec) else fs.remove(spec_path) end
    fs.remove(root .. "/" .. LEARNINGS)
    fs.remove(root .. "/" .. STUCK)
    if not had_ai then fs.remove(root .. "/.ai") end -- fails, harmlessly, if the agent left more there
  end

  local function harvest(n)
    local text = read(root .. "/" .. LEARNINGS)
    if not text then return end
    fs.remove(root .. "/" .. LEARNINGS)
    local texts = learnings_of(text)
    if #texts == 0 then return end
    for _, t in ipairs(texts) do
      stats.learnings[#stats.learnings + 1] = t
      user_emit("agent_learning", { iteration = n, text = t })
    end
    if o.db then
      memory.learn(o.db, o.team, o.run, texts, { repo = repo, objective = o.objective })
    elseif o.on_learnings then
      o.on_learnings(texts)
    end
  end

  local function finish(result)
    cleanup()
    if keep_learnings then
      for _, t in ipairs(stats.learnings) do result.learnings[#result.learnings + 1] = t end
    end
    user_emit("agent_done", { status = result.status, iterations = stats.iterations, tokens = stats.tokens,
                              cost_usd = stats.cost_usd })
    return result, stats
  end

  local function progress_text()
    local done, open = spec_state(read(spec_path))
    return ("%d of %d checklist items checked"):format(done, done + open)
  end

  local n, retries_in_row, idle, last_error, last_report = 0, 0, 0, nil, nil
  local checked_before = 0
  while true do
    if retries_in_row == 0 then
      if n >= max_iter then
        return finish(confidence.blocked(("iteration cap reached: %d iterations, %s"):format(max_iter, progress_text())
          .. (last_error and ("; last error: " .. last_error) or "")))
      end
      n = n + 1
    end
    if o.charge then
      local paid, why = o.charge(n, retries_in_row + 1)
      if not paid then
        local reason = tostring(why):gsub("^E%u+: ", "")
        return finish(confidence.blocked(reason))
      end
    end
    stats.iterations = stats.iterations + 1
    user_emit("agent_iteration", { iteration = n, attempt = retries_in_row + 1 })
    local it, serr = iterate(ctx, n)
    if not it then
      harvest(n)
      return finish(confidence.blocked("cannot start the agent: " .. tostring(serr)))
    end
    stats.input_tokens = stats.input_tokens + it.input_tokens
    stats.output_tokens = stats.output_tokens + it.output_tokens
    stats.tokens = stats.input_tokens + stats.output_tokens
    stats.cost_usd = stats.cost_usd + it.cost_usd
    if it.error then last_error = it.error end
    if it.report then last_report = it.report end
    harvest(n)

    local stuck = read(root .. "/" .. STUCK)
    if stuck and stuck:find("%S") then
      stuck = stuck:gsub("^%s+", ""):gsub("%s+$", "")
      return finish(confidence.blocked(stuck, ("the CLI agent wrote .ai/stuck.md in iteration %d: %s"):format(n, stuck)))
    end

    local spec = read(spec_path)
    if not spec then
      return finish(confidence.blocked(("the agent removed SPEC.md in iteration %d"):format(n)))
    end
    local done, open, lines = spec_state(spec)
    if done > 0 and open == 0 then
      local artifact = "## Checklist\n\n" .. table.concat(lines, "\n")
        .. (last_report and ("\n\n## The agent's last report\n\n" .. last_report) or "")
      local result = assert(confidence.parse(json.encode({
        status = "COMPLETE", artifact = artifact, learnings = {},
        reasoning = ("All %d checklist items of SPEC.md are checked after %d iteration(s) (%d process(es))."):format(
          done, n, stats.iterations) })))
      return finish(result)
    end

    if it.killed then
      stats.killed = stats.killed + 1
      if retries_in_row >= max_retries then
        local why = it.killed == "heartbeat" and ("no output for %g s"):format(ctx.heartbeat_timeout)
          or ("ran longer than %g s"):format(ctx.iteration_timeout)
        return finish(confidence.blocked(("the agent was killed %d times in a row (%s); %s"):format(
          retries_in_row + 1, why, progress_text())))
      end
      retries_in_row = retries_in_row + 1
      stats.retries = stats.retries + 1
    else
      retries_in_row = 0
      if done > checked_before then idle = 0 else idle = idle + 1 end
      if idle >= stuck_idle then
        return finish(confidence.blocked(("stuck: no checklist item checked in %d iterations in a row; %s"):format(
          idle, progress_text()) .. (last_error and ("; last error: " .. last_error) or "")))
      end
    end
    checked_before = math.max(checked_before, done)
  end
end

return M
