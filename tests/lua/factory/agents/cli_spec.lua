-- factory.agents.cli: a fake Claude Code (tests/tools/fake_claude.sh, printing the
-- real stream-json event shapes) runs in the fresh-context loop: three iterations
-- check off SPEC.md and leave a learning that is harvested into the store; a fake
-- that hangs is killed at its heartbeat timeout together with its child, and retried;
-- stuck notes, caps, the agent's environment and the Codex/plain parsers.
local cli = require "factory.agents.cli"
local workspace = require "factory.agents.workspace"
local memory = require "factory.memory"
local db = require "factory.db"
local git = require "factory.git"
local fs = require "factory.core.fs"
local env = require "factory.core.env"
local time = require "factory.core.time"

local backends = require "tests.tools.backends"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local FAKE = fs.realpath(HERE .. "../../../tools/fake_claude.sh")
local OBJECTIVE = "Add the progress log\n\nAcceptance:\n- first item\n- second item\n- third item\n"

local root, dir, state, events

local function fake(mode)
  return { "sh", FAKE, mode, state, "{prompt}" }
end

local function emit(kind, data) events[#events + 1] = { kind = kind, data = data } end

local function kinds(kind)
  local out = {}
  for _, e in ipairs(events) do if e.kind == kind then out[#out + 1] = e.data end end
  return out
end

local function read(path) return (fs.read(path)) end

local function calls() return tonumber(read(state .. "/calls")) or 0 end

-- A process is gone when /proc has no entry for it, or only a zombie's.
local function gone(pid)
  local stat = read("/proc/" .. pid .. "/stat")
  return stat == nil or stat:match("^%d+ %b() (%a)") == "Z"
end

before_each(function()
  events = {}
  root = os.tmpname()
  os.remove(root)
  dir, state = root .. "/wt", root .. "/state"
  assert(fs.mkdir_p(dir))
  assert(fs.mkdir_p(state))
end)

after_each(function()
  assert(fs.remove(root, { recursive = true }))
  backends.cleanup()
end)

describe("cli agent", function()
  it("derives the checklist from the objective's list lines, else its first line", function()
    assert.same({ "first item", "second item", "third item" }, cli.checklist(OBJECTIVE))
    assert.same({ "a", "b", "c" }, cli.checklist("Do it\n* a\n1. b\n- [x] c\n"))
    assert.same({ "Fix the parser" }, cli.checklist("  Fix the parser\nIt crashes on empty input."))
  end)

  it("three iterations check off SPEC.md; the learning is stored with team, repo and objective", function()
    local d = assert(db.open(backends.sqlite_url()))
    assert(d:migrate())
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = fake("work"), format = "claude",
                                   team = "backend", db = d, repo_name = "git@example.com:acme/calc.git",
                                   heartbeat_timeout = 5, emit = emit }
    assert.equal("COMPLETE", result.status, result.reasoning)
    assert.equal(3, calls())
    assert.equal(3, stats.iterations)
    assert.equal(0, stats.retries)
    assert.matches("All 3 checklist items", result.reasoning)
    assert.contains("- [x] first item\n- [x] second item\n- [x] third item", result.artifact)
    assert.contains("Checked off: third item", result.artifact)
    assert.equal("first item\nsecond item\nthird item\n", read(dir .. "/progress.txt"))

    -- The result events' usage and cost (cache tokens are input tokens).
    assert.equal(3 * (10 + 1200 + 800), stats.input_tokens)
    assert.equal(3 * 90, stats.output_tokens)
    assert.equal(stats.input_tokens + stats.output_tokens, stats.tokens)
    assert.near(0.0375, stats.cost_usd, 1e-9)
    local usage = kinds("agent_usage")
    assert.equal(3, #usage)
    assert.same({ iteration = 2, input_tokens = 2010, output_tokens = 90, cost_usd = 0.0125 }, usage[2])

    -- Progress parsed from the events.
    local progress = {}
    for _, p in ipairs(kinds("agent_progress")) do progress[#progress + 1] = p.text end
    progress = table.concat(progress, "\n")
    assert.contains("session started (claude-sonnet-4-5-20250929)", progress)
    assert.contains("Next unchecked item: second item", progress)
    assert.contains("tool Edit " .. dir, progress)
    assert.contains("result success: 3 turns, $0.0125", progress)
    assert.truthy(#kinds("agent_heartbeat") >= 3)
    assert.equal(3, #kinds("agent_iteration"))
    assert.same({ status = "COMPLETE", iterations = 3, tokens = stats.tokens, cost_usd = stats.cost_usd },
                kinds("agent_done")[1])

    -- The learning, harvested once, then the file is gone.
    assert.same({ "The calc tests run with `make -s test` from the repository root",
                  "progress.txt lists the finished items" }, stats.learnings)
    assert.same({}, result.learnings) -- stored, not handed on
    local rows = memory.search_learnings(d, "how are the tests run", { team = "backend" })
    assert.equal(1, #rows)
    assert.equal("The calc tests run with `make -s test` from the repository root", rows[1].text)
    assert.equal("backend", rows[1].team)
    assert.equal("git@example.com:acme/calc.git", rows[1].repo)
    assert.equal(OBJECTIVE, rows[1].objective)
    assert.equal(2, #memory.search_learnings(d, nil, {}))

    -- Each iteration got the instructions; SPEC.md and .ai/ are cleaned away.
    assert.contains("Read SPEC.md", read(state .. "/prompt.1"))
    assert.contains("The objective, in short: Add the progress log", read(state .. "/prompt.3"))
    assert.falsy(fs.exists(dir .. "/SPEC.md"))
    assert.falsy(fs.exists(dir .. "/.ai"))
    d:close()
  end)

  it("a fake that hangs is killed at its heartbeat timeout with its child, and retried", function()
    local t0 = time.monotonic()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = fake("hang-once"),
                                   format = "claude", heartbeat_timeout = 0.5, kill_grace = 0.2, emit = emit }
    local elapsed = time.monotonic() - t0
    assert.equal("COMPLETE", result.status, result.reasoning)
    assert.equal(4, calls())
    assert.equal(4, stats.iterations)
    assert.equal(1, stats.retries)
    assert.equal(1, stats.killed)
    assert.truthy(elapsed >= 0.5 and elapsed < 4, "elapsed " .. elapsed)
    local killed = kinds("agent_killed")
    assert.equal(1, #killed)
    assert.same({ iteration = 1, reason = "no output for 0.5 s" }, killed[1])
    -- The retry is the same iteration, attempt 2.
    assert.same({ iteration = 1, attempt = 2 }, kinds("agent_iteration")[2])
    -- The hung agent's child, `sleep 1000`, went with its process group.
    local pid = assert(read(state .. "/child.pid")):match("%d+")
    assert.truthy(gone(pid), "child " .. pid .. " still running")
    -- Without a learnings store the harvested learnings travel in the result.
    assert.equal(2, #result.learnings)
  end)

  it("an agent that keeps hanging is BLOCKED after its retries", function()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = fake("hang"), format = "claude",
                                   heartbeat_timeout = 0.3, kill_grace = 0.1, max_retries = 1 }
    assert.equal("BLOCKED", result.status)
    assert.equal("the agent was killed 2 times in a row (no output for 0.3 s); 0 of 3 checklist items checked",
                 result.blockers[1])
    assert.equal(2, stats.iterations)
    assert.equal(2, stats.killed)
    assert.equal(1, stats.retries)
    assert.truthy(gone(assert(read(state .. "/child.pid")):match("%d+")))
  end)

  it("a grandchild that left the process group and holds the output does not hang the loop", function()
    local script = 'echo started; setsid sleep 30 & echo $! > "$1/escaped.pid"; wait'
    local t0 = time.monotonic()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = { "sh", "-c", script, "sh", state },
                                   heartbeat_timeout = 0.3, kill_grace = 0.1, max_retries = 0 }
    local pid = assert(read(state .. "/escaped.pid")):match("%d+")
    os.execute("kill -9 " .. pid .. " 2>/dev/null")
    assert.equal("BLOCKED", result.status)
    assert.equal(1, stats.killed)
    assert.truthy(time.monotonic() - t0 < 3)
  end)

  it("an iteration that outlives iteration_timeout is killed and retried", function()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = fake("hang-once"), format = "claude",
                                   heartbeat_timeout = 10, iteration_timeout = 0.4, kill_grace = 0.1, emit = emit }
    assert.equal("COMPLETE", result.status, result.reasoning)
    assert.equal(1, stats.killed)
    assert.equal("iteration ran longer than 0.4 s", kinds("agent_killed")[1].reason)
  end)

  it(".ai/stuck.md makes the objective BLOCKED with its text", function()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = fake("stuck"), format = "claude" }
    assert.equal("BLOCKED", result.status)
    assert.same({ "The objective needs the production database password; nobody gave it." }, result.blockers)
    assert.matches("wrote %.ai/stuck%.md in iteration 1", result.reasoning)
    assert.equal(1, stats.iterations)
    assert.falsy(fs.exists(dir .. "/.ai"))
  end)

  it("writes SPEC.md: the objective, earlier learnings, the checklist; a SPEC.md of the repo's own is put back", function()
    assert(fs.write(dir .. "/SPEC.md", "the repository's own spec\n"))
    local objective = "Tidy up\n\n- [ ] rename foo\n- [x] drop bar\n"
    local result = cli.run{ root = dir, objective = objective, command = fake("idle"), format = "claude",
                            max_iterations = 1, learnings = { "Use snake_case" }, keep_files = true }
    assert.equal("BLOCKED", result.status)
    assert.equal("# Objective\n\nTidy up\n\n- rename foo\n- drop bar\n\n## Learned in earlier work\n\n"
      .. "- Use snake_case\n\n## Checklist\n\n- [ ] rename foo\n- [ ] drop bar\n", read(dir .. "/SPEC.md"))
    assert(fs.write(dir .. "/SPEC.md", "the repository's own spec\n"))
    cli.run{ root = dir, objective = objective, command = fake("work"), format = "claude" }
    assert.equal("the repository's own spec\n", read(dir .. "/SPEC.md"))
  end)

  it("makes what an agent prints and writes UTF-8 before it is recorded, and puts the repo's SPEC.md back as it was", function()
    local text = require "factory.core.text"
    assert(fs.write(dir .. "/SPEC.md", "caf\233 spec\n"))
    local script = "printf 'edited caf\\351.c\\n'; mkdir -p .ai; printf 'caf\\351 needs a human\\n' > .ai/stuck.md"
    local result = cli.run{ root = dir, objective = OBJECTIVE, command = { "sh", "-c", script }, emit = emit }
    assert.equal("BLOCKED", result.status)
    assert.same({ "caf\239\191\189 needs a human" }, result.blockers)
    local progress = kinds("agent_progress")
    assert.equal("edited caf\239\191\189.c", progress[1].text)
    assert.is_nil(text.utf8_error(require("factory.json").encode(result)))
    assert.equal("caf\233 spec\n", read(dir .. "/SPEC.md"))
  end)

  it("the iteration cap and the stuck limit give BLOCKED", function()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = fake("idle"), format = "claude",
                                   max_iterations = 2, stuck_idle = 5 }
    assert.equal("BLOCKED", result.status)
    assert.equal("iteration cap reached: 2 iterations, 0 of 3 checklist items checked", result.blockers[1])
    assert.equal(2, stats.iterations)

    result = cli.run{ root = dir, objective = OBJECTIVE, command = fake("fail"), format = "claude", stuck_idle = 2 }
    assert.equal("BLOCKED", result.status)
    assert.equal("stuck: no checklist item checked in 2 iterations in a row; 0 of 3 checklist items checked;"
      .. " last error: error_during_execution: API Error: 401 invalid x-api-key", result.blockers[1])
  end)

  it("a command that cannot start is BLOCKED at once", function()
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = { "no-such-agent-cli", "{prompt}" } }
    assert.equal("BLOCKED", result.status)
    assert.matches("^cannot start the agent: ENOENT", result.blockers[1])
    assert.equal(1, stats.iterations)
    assert.falsy(fs.exists(dir .. "/SPEC.md"))
  end)

  it("the agent gets the proxy and the team's virtual key, never the parent's keys", function()
    local usage
    local saved_key, saved_other = env.get("OPENAI_API_KEY"), env.get("FACTORY_TEST_SECRET")
    env.set("OPENAI_API_KEY", "sk-parent-provider-key")
    env.set("FACTORY_TEST_SECRET", "hush")
    local result = cli.run{ root = dir, objective = "One thing", command = { "sh", FAKE, "work", state },
                            format = "claude", proxy_url = "http://127.0.0.1:8420/", virtual_key = "vk-backend-123",
                            run = 42, model = "factory/coder", env = { EXTRA = "yes" },
                            emit = function(kind, data) if kind == "agent_usage" then usage = data end end }
    env.set("OPENAI_API_KEY", saved_key)
    env.set("FACTORY_TEST_SECRET", saved_other)
    assert.equal("COMPLETE", result.status, result.reasoning)
    local e = {}
    for line in read(state .. "/env.1"):gmatch("[^\n]+") do
      local k, v = line:match("^([%w_]+)=(.*)$")
      if k then e[k] = v end
    end
    assert.equal("http://127.0.0.1:8420/v1", e.OPENAI_BASE_URL)
    assert.equal("http://127.0.0.1:8420", e.ANTHROPIC_BASE_URL)
    assert.equal("vk-backend-123", e.OPENAI_API_KEY)
    assert.equal("vk-backend-123", e.ANTHROPIC_API_KEY)
    assert.equal("X-Factory-Run: 42", e.ANTHROPIC_CUSTOM_HEADERS)
    -- What it reports it spent is its own estimate: the proxy charges the calls.
    assert.equal(true, usage.estimate)
    -- Whatever model the agent picks (its main one, a haiku for small tasks, a
    -- subagent's) is the operative's alias, which the proxy knows.
    for _, name in ipairs({ "ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
                            "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL",
                            "CLAUDE_CODE_SUBAGENT_MODEL" }) do
      assert.equal("factory/coder", e[name], name)
    end
    assert.equal("openai/factory/coder", e.AIDER_MODEL)
    assert.equal("http://127.0.0.1:8420/v1", e.OPENAI_API_BASE)
    assert.equal("yes", e.EXTRA)
    assert.equal(env.get("PATH"), e.PATH)
    assert.is_nil(e.FACTORY_TEST_SECRET)
    assert.falsy(read(state .. "/env.1"):find("sk-parent-provider-key", 1, true))
    -- Without "{prompt}" in the command the prompt came on stdin.
    assert.contains("Read SPEC.md", read(state .. "/prompt.1"))
  end)

  it("gives a command's \"{model}\" and \"{proxy}\" their values, and leaves them out with their option without",
    function()
    local function argv(model, proxy)
      local result = cli.run{ root = dir, objective = "One thing", model = model, proxy_url = proxy,
                              command = { "sh", "-c", 'printf "%s|" "$@" > argv.txt; sed -i "s/- \\[ \\]/- [x]/" SPEC.md',
                                          "agent", "--model", "{model}", "--name={model}", "-c", "url={proxy}/v1",
                                          "--keep", "{other}", "{prompt}" } }
      assert.equal("COMPLETE", result.status, result.reasoning)
      return (assert(fs.read(dir .. "/argv.txt")):gsub("You are one iteration.*", "PROMPT|"))
    end
    assert.equal("--model|factory/coder|--name=factory/coder|-c|url=http://127.0.0.1:9/v1|--keep|{other}|PROMPT|",
      argv("factory/coder", "http://127.0.0.1:9/v1/"))
    -- Braces naming no placeholder are the command's own.
    assert.equal("--keep|{other}|PROMPT|", argv(nil, nil))
    -- Claude Code refuses bypassPermissions to root (CI machines, containers).
    local claude = table.concat(cli.PRESETS.claude.command, " ")
    assert.contains("--permission-mode acceptEdits --allowedTools Bash Edit Write Read Glob Grep", claude)
    local codex = table.concat(cli.PRESETS.codex.command, " ")
    assert.contains('--model {model} -c model_provider=factory -c model_providers.factory={ name = "factory",'
      .. ' base_url = "{proxy}/v1", env_key = "OPENAI_API_KEY", wire_api = "responses" } {prompt}', codex)
  end)

  it("parses Codex --json events and plain text", function()
    local ev = cli.parse_line("codex", '{"type":"turn.completed","usage":{"input_tokens":24763,'
      .. '"cached_input_tokens":24448,"output_tokens":122}}')
    assert.same({ input_tokens = 24763, output_tokens = 122 }, ev.usage)
    ev = cli.parse_line("codex", '{"type":"item.completed","item":{"id":"item_1","type":"command_execution",'
      .. '"command":"bash -lc \'make test\'","aggregated_output":"ok\\n","exit_code":0,"status":"completed"}}')
    assert.equal("$ bash -lc 'make test' (exit 0)", ev.progress)
    ev = cli.parse_line("codex", '{"type":"item.completed","item":{"id":"item_2","type":"agent_message",'
      .. '"text":"Done: all tests pass."}}')
    assert.equal("Done: all tests pass.", ev.report)
    ev = cli.parse_line("codex", '{"type":"turn.failed","error":{"message":"stream disconnected"}}')
    assert.equal("turn failed: stream disconnected", ev.error)
    assert.same({ progress = "Applied edit to src/calc.c" }, cli.parse_line("plain", "Applied edit to src/calc.c"))
    assert.same({ progress = "not json" }, cli.parse_line("claude", "not json"))
    assert.same({}, cli.parse_line("plain", "   "))
  end)

  it("runs a Codex-style agent and sums its turns' usage", function()
    local script = [[
printf '%s\n' '{"type":"thread.started","thread_id":"0199a213-81c0-7800-8aa1-bbab2a035a53"}' '{"type":"turn.started"}'
sed 's/- \[ \]/- [x]/' SPEC.md > SPEC.tmp && mv SPEC.tmp SPEC.md
printf '%s\n' '{"type":"item.completed","item":{"id":"item_0","type":"file_change","changes":[{"path":"SPEC.md","kind":"update"}],"status":"completed"}}'
printf '%s\n' '{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"All items done."}}'
printf '%s\n' '{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":600,"output_tokens":50}}'
]]
    local result, stats = cli.run{ root = dir, objective = OBJECTIVE, command = { "sh", "-c", script },
                                   format = "codex", emit = emit }
    assert.equal("COMPLETE", result.status, result.reasoning)
    assert.equal(1, stats.iterations)
    assert.equal(1050, stats.tokens)
    assert.equal(0, stats.cost_usd)
    assert.contains("All items done.", result.artifact)
    local texts = {}
    for _, p in ipairs(kinds("agent_progress")) do texts[#texts + 1] = p.text end
    assert.same({ "session started", "changed SPEC.md", "All items done." }, texts)
  end)

  it("in a workspace, the branch gets the agent's work but not SPEC.md or .ai/", function()
    local repo_dir = root .. "/repo"
    assert(fs.mkdir_p(repo_dir))
    assert(fs.write(repo_dir .. "/README", "calc\n"))
    local repo = assert(git.init(repo_dir))
    assert(repo:add_all())
    assert(repo:commit("base", { author = { name = "Base", email = "base@factory.test" } }))
    local d = assert(db.open(backends.sqlite_url()))
    assert(d:migrate())
    local ws = assert(workspace.run{ repo = repo, branch = "cli-agent", path = root .. "/wt-cli",
                                     objective = OBJECTIVE, agent = cli.run, command = fake("work"),
                                     format = "claude", team = "backend", db = d })
    assert.equal("COMPLETE", ws.result.status, ws.result.reasoning)
    assert.truthy(ws.commit)
    assert.equal(1, ws.diff_stats.files)
    assert.equal("progress.txt", ws.diff_stats.per_file[1].path)
    -- The learnings name the main repository (read from the worktree's .git file).
    local rows = memory.search_learnings(d, "progress", {})
    assert.equal(1, #rows)
    assert.equal(fs.realpath(repo_dir), rows[1].repo)
    repo:close()
    d:close()
  end)
end)
