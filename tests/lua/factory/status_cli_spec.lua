-- `factory status` (lua/factory/status_cli.lua) on a store holding an overnight
-- batch's leftovers: runs waiting for a human, stopped, executed by a live process
-- and by none, and the teams' model calls of today and of yesterday, with a call in
-- flight; the budgets from a team file and from factory.lua.
local db = require "factory.db"
local hitl = require "factory.hitl"
local engine_id = require "factory.engine_id"
local host = require "factory.core.host"
local time = require "factory.core.time"
local fs = require "factory.core.fs"
local backends = require "tests.tools.backends"
local proc = require "factory.proc"
local orchestrator = require "factory.agents.orchestrator"

local store, url, dir

local function factory(args)
  local p = io.popen(("cd %s && %s status --db %s %s 2>&1; echo exit=$?"):format(dir, host.exe, url, args or ""))
  local out = p:read("*a")
  p:close()
  return out
end

local function new_run(state, stage_index, err)
  local now = time.now()
  local item = assert(store:exec("INSERT INTO work_items (source, title, state, created_at, updated_at)"
    .. " VALUES ('cli', ?, 'accepted', ?, ?) RETURNING id", { "item " .. state, now, now })).last_id
  return assert(store:exec("INSERT INTO runs (work_item_id, pipeline, state, stage_index, error, data, created_at,"
    .. " updated_at) VALUES (?, 'feature', ?, ?, ?, '{}', ?, ?) RETURNING id",
    { item, state, stage_index, err, now, now })).last_id
end

local function call(team, usd, tokens, at)
  assert(store:exec("INSERT INTO model_calls (team, provider, model, prompt_tokens, completion_tokens, cost_usd, status,"
    .. " created_at) VALUES (?, 'cloud', 'big', ?, 0, ?, 'ok', ?)", { team, tokens, usd, at or time.now() }))
end

for _, b in ipairs(backends.LIST) do
  describe("factory status on " .. b[1], function()
    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(fs.mkdir_p(dir .. "/teams"))
      url = b[2]()
      store = assert(db.open(url))
      assert(store:migrate())
    end)

    after_each(function()
      store:close()
      backends.cleanup()
      assert(fs.remove(dir, { recursive = true }))
    end)

    it("lists what moves each unfinished run on, and each team's day against its budget", function()
      new_run("succeeded", 5)
      local waiting = new_run("running", 2)
      assert(store:tx(function(tx)
        return hitl.escalate(tx, { run_id = waiting, stage = "build", team = "backend_engineering", operative = "impl",
                                   question = "Which currency?", reason = "BLOCKED: unclear" })
      end))
      local stopped = new_run("stopped", 1, "stage analysis: EPOSTED: a write was lost\nmore detail")
      local live, orphan = new_run("running", 3), new_run("running", 0)
      local me = engine_id.new()
      for run, owner in pairs({ [live] = me, [orphan] = engine_id.HOST .. ":999999999:1" }) do
        assert(store:exec("INSERT INTO locks (name, owner, expires_at, acquired_at) VALUES (?, ?, ?, ?)",
                          { "run:" .. run, owner, time.now() + 30, time.now() }))
      end
      call("backend_engineering", 4, 1000)
      call("backend_engineering", 1.5, 2000)
      call("backend_engineering", 100, 9000, time.now() - 3 * 86400)
      call("qa_engineering", 0.25, 500)
    assert(store:exec("INSERT INTO model_calls (team, provider, model, cost_usd, status, code, created_at)"
      .. " VALUES ('qa_engineering', '', '', 0, 'error', 'EBUDGET', ?)", { time.now() }))
      assert(store:exec("INSERT INTO budget_holds (team, process, usd, tokens, expires_at) VALUES (?, ?, 2, 10, ?)",
                        { "backend_engineering", me, time.now() + 60 }))
      assert(fs.write(dir .. "/teams/backend_engineering.lua", [[
  return team "backend_engineering" {
    description = "Builds.",
    model = "factory/coder",
    budget = { usd_per_day = 20 },
    operative "impl" { prompt = "Build." },
  }]]))
      assert(fs.write(dir .. "/factory.lua", [[
  providers { cloud = { base_url = "http://127.0.0.1:9/v1" } }
  models { ["factory/coder"] = { "cloud/big" } }
  prices { big = { input = 1, output = 1 } }
  budgets { teams = { backend_engineering = { usd_per_day = 10 }, qa_engineering = { tokens_per_day = 2000 },
                      docs = { usd_per_day = 3 } } }
  ]]))
      local out = factory()
      local want = {
        "runs: 2 running, 1 stopped, 1 succeeded, 1 waiting",
        ("  run %d (feature) waiting: 1 question(s) for a human (factory hitl list, then factory hitl answer ID TEXT)")
          :format(waiting),
        ("  run %d (feature) stopped: stage analysis: EPOSTED: a write was lost (factory resume %d once that is fixed)")
          :format(stopped, stopped),
        ("  run %d (feature) running, stage 3 done, by process %s"):format(live, me),
        ("  run %d (feature) running, stage 0 done: no process executes it (factory resume %d)"):format(orphan, orphan),
        "  TEAM                       CALLS       TOKENS       SPENT   IN FLIGHT     BUDGET/DAY          LEFT",
        "  backend_engineering            2        3,000     $5.5000     $2.0000       $10.0000       $2.5000",
        "  qa_engineering                 1          500     $0.2500           -      2,000 tok     1,500 tok",
        "  (1 more team(s) with a budget made no call today)",
      "  calls a budget refused today (not sent): qa_engineering 1",
        "exit=0",
      }
      for _, line in ipairs(want) do assert.contains(line .. "\n", out) end
      assert.matches("\nmodel calls today %(since %d%d%d%d%-%d%d%-%d%dT00:00:00%.000Z%): 3 calls, 3,500 tokens, %$5%.7500\n",
                     out)
    end)

    it("names the agents a dead factory run left running on this host", function()
      local agent = assert(proc.spawn{ argv = { "sleep", "30" } })
      local dead = engine_id.HOST .. ":999999999:1"
      assert(orchestrator.record_agent(store, dead, agent, { run = 7, stage = "build" }))
      -- One recorded by a live process is its own business.
      local other = assert(proc.spawn{ argv = { "sleep", "30" } })
      assert(orchestrator.record_agent(store, engine_id.new(), other, { run = 8, stage = "fix" }))
      local out = factory()
      for _, p in ipairs({ agent, other }) do
        p:kill()
        p:wait()
        p:close()
      end
      assert.contains(("\nagents still running whose factory process died: pid %d (run 7, stage build); the next"
        .. " factory run or resume here stops them\n"):format(agent.pid), out)
      assert.falsy(out:find("pid " .. other.pid, 1, true))
    end)

    it("says when there is nothing, and refuses what it does not take", function()
      assert.equal("runs: none\nmodel calls today (since " .. time.iso8601(require("factory.router").day_start())
        .. "): 0 calls, 0 tokens, $0.0000\nexit=0\n", factory())
      assert.equal("factory status: unknown flag '--bogus' (see 'factory status --help')\nexit=2\n", factory("--bogus"))
      assert.equal("factory status: " .. dir .. "/nope.lua:1: cannot read the file\nexit=1\n",
                   factory("--config " .. dir .. "/nope.lua"))
      -- ./factory.lua that does not load is said, and the rest shown without its budgets.
      assert(fs.write(dir .. "/factory.lua", "budgets { teams = 3 }\n"))
      assert.matches("^factory status: [^\n]*factory.lua:1: [^\n]*%(budgets from it are not shown%)\nruns: none\n", factory())
    end)
  end)
end
