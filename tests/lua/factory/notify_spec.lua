-- factory.notify: factory.lua's notify { } command, run for the events it names with
-- the event's line in place of {message}, its JSON on stdin and a scrubbed
-- environment; bounded by its timeout; its failures logged, never raised.
local notify = require "factory.notify"
local config = require "factory.config"
local json = require "factory.json"
local log = require "factory.log"
local fs = require "factory.core.fs"
local time = require "factory.core.time"
local env = require "factory.core.env"

local dir

before_each(function()
  -- A secret in the engine's environment, as a provider key is.
  env.set("NOTIFY_TEST_SECRET", "sk-notify-test-secret")
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir))
end)

after_each(function()
  assert(fs.remove(dir, { recursive = true }))
end)

-- A command that writes its stdin, its argument and its environment's two variables.
local function recorder(name)
  return { "sh", "-c", 'cat > "$1.json"; printf "%s|%s|%s" "$2" "$FACTORY_EVENT" "${NOTIFY_TEST_SECRET-unset}" > "$1.txt"',
           "notify", dir .. "/" .. name, "{message}" }
end

local ESCALATED = { kind = "escalated", run_id = 3, data = { id = 7, team = "backend_engineering",
                    reason = "BLOCKED: budget exhausted", question = "Raise it?" } }

describe("notify", function()
  it("runs the command for an event it names, with the line, the JSON and a scrubbed environment", function()
    local n = notify.new{ command = recorder("esc"), on = { "escalated" } }
    n.event(ESCALATED)
    n.event({ kind = "run_finished", run_id = 5, data = { state = "succeeded" } })
    n.wait()
    assert.equal("factory: run 3 needs a human: escalation #7 from backend_engineering: BLOCKED: budget exhausted"
      .. " (factory hitl answer 7 TEXT)|escalated|unset", fs.read(dir .. "/esc.txt"))
    local sent = json.decode(fs.read(dir .. "/esc.json"))
    assert.same({ "escalated", 3, 7 }, { sent.kind, sent.run, sent.data.id })
    -- The three kinds by default; the events are told in turn, each its own process.
    local n2 = notify.new{ command = { "sh", "-c", 'printf "%s\\n" "$1" >> "$2"', "x", "{message}", dir .. "/all.txt" } }
    for _, ev in ipairs({ ESCALATED, { kind = "stage_started", run_id = 3 },
                          { kind = "run_stopped", run_id = 4, data = { error = "EPOSTED: a write was lost\nmore" } },
                          { kind = "run_finished", run_id = 5, data = { state = "succeeded" } } }) do
      n2.event(ev)
      n2.wait()
    end
    assert.equal(table.concat({
      "factory: run 3 needs a human: escalation #7 from backend_engineering: BLOCKED: budget exhausted"
        .. " (factory hitl answer 7 TEXT)",
      "factory: run 4 stopped: EPOSTED: a write was lost (factory resume 4)",
      "factory: run 5 succeeded", "" }, "\n"), fs.read(dir .. "/all.txt"))
  end)

  it("tells only the kinds in on, passes the variables env names, and without a section does nothing", function()
    local n = notify.new{ command = recorder("only"), on = { "run_finished" }, env = { "NOTIFY_TEST_SECRET" } }
    n.event(ESCALATED)
    n.wait()
    assert.is_nil(fs.stat(dir .. "/only.txt"))
    n.event({ kind = "run_finished", run_id = 9, data = { state = "failed" } })
    n.wait()
    assert.equal("factory: run 9 failed|run_finished|sk-notify-test-secret", fs.read(dir .. "/only.txt"))
    local none = notify.new(nil)
    none.event(ESCALATED)
    none.wait()
  end)

  it("logs a command that fails or outlasts its timeout, and the run goes on", function()
    local logged = {}
    log.set_console({ write = function(_, ...) logged[#logged + 1] = table.concat({ ... }) end })
    local t0 = time.monotonic()
    local n = notify.new{ command = { "sh", "-c", "exit 3" } }
    n.event(ESCALATED)
    n.wait()
    n = notify.new{ command = { "sleep", "30" }, timeout = 0.3 }
    n.event(ESCALATED)
    n.wait()
    n = notify.new{ command = { "factory-test-no-such-notifier" } }
    n.event(ESCALATED)
    n.wait()
    log.set_console(nil)
    local text = table.concat(logged, "\n")
    assert.less(5, time.monotonic() - t0)
    assert.contains("notify: the command failed code=3 command=sh", text)
    assert.contains("timed_out=true", text)
    assert.contains("factory-test-no-such-notifier", text)
  end)

  it("is checked where factory.lua gives it, with the line", function()
    for _, c in ipairs({
      { 'notify { command = "notify-send" }', "notify.command: expected a list of strings" },
      { 'notify { command = { "x" }, on = { "escalate" } }', 'notify.on: unknown event "escalate"' },
      { 'notify { command = { "x" }, timeout = 0 }', "notify.timeout: expected a number of seconds > 0" },
      { 'notify { command = { "x" }, hook = 1 }', "notify: unknown field hook" },
    }) do
      local path = dir .. "/factory.lua"
      assert(fs.write(path, "providers { p = { base_url = \"http://127.0.0.1:9/v1\" } }\n" .. c[1] .. "\n"))
      local cfg, err = config.load(path)
      assert.is_nil(cfg)
      assert.contains(path .. ":2: " .. c[2], err)
    end
    assert(fs.write(dir .. "/factory.lua", 'notify { command = { "notify-send", "factory", "{message}" } }\n'))
    local cfg = assert(config.load(dir .. "/factory.lua"))
    assert.same({ "notify-send", "factory", "{message}" }, cfg.notify.command)
  end)
end)
