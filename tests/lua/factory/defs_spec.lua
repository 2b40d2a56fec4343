-- factory.defs: load, validate and swap definition files; hot reload; defs.check.
-- The registry is exercised with a definition type made up for the test:
--   return greeting "name" { text = "..." }
local defs = require "factory.defs"
local fs = require "factory.core.fs"
local fiber = require "factory.fiber"
local log = require "factory.log"
local time = require "factory.core.time"
local host = require "factory.core.host"

local FIXTURES = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") .. "/fixtures"

local function greeting_dsl(collect, line)
  return {
    greeting = function(name)
      if type(name) ~= "string" then error("greeting needs a name: greeting \"name\" { ... }") end
      local at = line()
      return function(body)
        body.name = name
        return collect(body, at)
      end
    end,
  }
end

local function validate_greeting(def, name)
  if type(def) ~= "table" then return nil, "a greeting file must return greeting \"name\" { ... }" end
  if type(def.text) ~= "string" or def.text == "" then
    return nil, "greeting text must be a non-empty string"
  end
  if def.name ~= name then return nil, ("greeting %q must be in %s.lua"):format(def.name, def.name) end
  return true
end

local dir, reg, handle, logged

local function write(file, text)
  assert(fs.write(dir .. "/" .. file, text))
end

local function greeting(name, text)
  return ("-- a greeting\nreturn greeting %q {\n  text = %q,\n}\n"):format(name, text)
end

-- Collects the registry's change events so a test can wait for one.
local function events(r)
  local queue, cond = {}, fiber.cond()
  r:on_change(function(ev)
    ev.at = time.monotonic()
    queue[#queue + 1] = ev
    cond:signal()
  end)
  return function(timeout)
    local deadline = time.monotonic() + (timeout or 2)
    while #queue == 0 do
      local left = deadline - time.monotonic()
      if left <= 0 or not cond:wait(left) then return nil end
    end
    return table.remove(queue, 1)
  end
end

before_each(function()
  local p = os.tmpname()
  os.remove(p)
  dir = p
  assert(fs.mkdir_p(dir))
  reg = defs.registry{ kind = "greeting", dir = dir, dsl = greeting_dsl, validate = validate_greeting }
  logged = {}
  log.set_console({ write = function(_, ...) logged[#logged + 1] = table.concat({ ... }) end })
end)

after_each(function()
  if handle then handle:stop() end
  handle = nil
  log.set_console(nil)
  assert(fs.remove(dir, { recursive = true }))
end)

describe("defs.registry load_all", function()
  it("loads valid files and reports each invalid one as file:line", function()
    write("hello.lua", greeting("hello", "Hello!"))
    write("bye.lua", greeting("bye", "Bye."))
    write("syntax.lua", "return greeting \"syntax\" {\n  text = = 1,\n}\n")
    write("empty.lua", "\n\nreturn greeting \"empty\" {\n  text = \"\",\n}\n")
    write("misnamed.lua", greeting("other", "x"))
    write("global.lua", "local x = 1\ncounter = 2\nreturn greeting \"global\" { text = \"x\" }\n")
    write("undefined.lua", "return greeting \"undefined\" {\n  text = missing_variable,\n}\n")
    write("io.lua", "io.write(\"hi\")\n")
    write("exec.lua", "\nos.execute(\"true\")\n")
    write("req.lua", "local m = require \"os\"\n")
    write("runtime.lua", "local t = nil\nlocal y = 1\nreturn t.x\n")
    write("dslerror.lua", "local n = 42\n\nreturn greeting(n) { text = \"x\" }\n")
    write("nothing.lua", "local x = 1\n")
    write("notes.txt", "not a definition")
    write(".hidden.lua", "broken (")
    local problems = reg:load_all()
    local expect = {
      "dslerror.lua:3: greeting needs a name: greeting \"name\" { ... }",
      "empty.lua:3: greeting text must be a non-empty string",
      "exec.lua:2: attempt to call field 'execute' (a nil value)",
      "global.lua:2: assignment to global 'counter' (definition files may only use locals)",
      "io.lua:1: undefined global 'io'",
      "misnamed.lua:2: greeting \"other\" must be in other.lua",
      "nothing.lua:1: must return a greeting definition (it returned nothing)",
      "req.lua:1: undefined global 'require'",
      "runtime.lua:3: attempt to index local 't' (a nil value)",
      "syntax.lua:2: unexpected symbol near '='",
      "undefined.lua:2: undefined global 'missing_variable'",
    }
    for i, e in ipairs(expect) do expect[i] = dir .. "/" .. e end
    assert.same(expect, problems)
    assert.same(expect, reg:problems())
    assert.same({ "bye", "hello" }, reg:names())
    assert.equal("Hello!", reg:get("hello").text)
    assert.is_nil(reg:get("syntax"))
    assert.equal(1, reg:version("hello"))
    assert.equal(0, reg:version("syntax"))
  end)

  it("reports the full path even when Lua would shorten it", function()
    local deep = dir .. "/" .. ("d"):rep(80)
    assert(fs.mkdir_p(deep))
    assert(fs.write(deep .. "/bad.lua", "\nreturn = 1\n"))
    assert(fs.write(deep .. "/err.lua", "error('boom')\n"))
    local r = defs.registry{ kind = "greeting", dir = deep, dsl = greeting_dsl }
    assert.same({
      deep .. "/bad.lua:2: unexpected symbol near '='",
      deep .. "/err.lua:1: boom",
    }, r:load_all())
  end)

  it("stops a file that runs too long, even one that pcalls", function()
    write("loop.lua", "local n = 0\nwhile true do\n  pcall(function() while true do n = n + 1 end end)\nend\n")
    local t0 = time.monotonic()
    local problems = reg:load_all()
    assert.less(4, time.monotonic() - t0)
    assert.equal(1, #problems)
    assert.matches("^" .. dir:gsub("%p", "%%%0") .. "/loop%.lua:[23]: still running after 2 s", problems[1])
    -- The hook is gone once the file stopped: the engine keeps running normally.
    local n = 0
    for _ = 1, 1e7 do n = n + 1 end
    assert.equal(1e7, n)
  end, { timeout = 10 })

  it("gives each file a fresh environment that cannot touch the engine's", function()
    write("a.lua", "string.upper = nil\nlocal s = ('x'):rep(2)\nreturn greeting \"a\" { text = s }\n")
    write("b.lua", "return greeting \"b\" { text = string.upper('b') }\n")
    assert.same({}, reg:load_all())
    assert.equal("xx", reg:get("a").text)
    assert.equal("B", reg:get("b").text)
    assert.equal("function", type(string.upper))
  end)

  it("reloading unchanged files changes nothing; changed ones swap", function()
    write("hello.lua", greeting("hello", "one"))
    reg:load_all()
    local first = reg:get("hello")
    assert.same({}, reg:load_all())
    assert.equal(first, reg:get("hello"))
    assert.equal(1, reg:version("hello"))
    write("hello.lua", greeting("hello", "two"))
    reg:load_all()
    assert.equal(2, reg:version("hello"))
    assert.equal("two", reg:get("hello").text)
    assert.equal("one", first.text, "the old definition is not touched")
  end)

  it("forgets files that are gone; a missing directory holds nothing", function()
    write("hello.lua", greeting("hello", "hi"))
    write("bad.lua", "(")
    assert.equal(1, #reg:load_all())
    assert(fs.remove(dir .. "/hello.lua"))
    assert(fs.remove(dir .. "/bad.lua"))
    assert.same({}, reg:load_all())
    assert.same({}, reg:names())
    local none = defs.registry{ kind = "greeting", dir = dir .. "/missing" }
    assert.same({}, none:load_all())
    assert(fs.write(dir .. "/file", "x"))
    local notdir = defs.registry{ kind = "greeting", dir = dir .. "/file" }
    assert.same({ ("%s/file: ENOTDIR: not a directory: %s/file"):format(dir, dir) }, notdir:load_all())
  end)

  it("points a validation failure at the line the validator names", function()
    local r = defs.registry{
      kind = "greeting", dir = dir, dsl = greeting_dsl,
      validate = function(def) return nil, "too cheerful", def.text == "!!!" and 4 or nil end,
    }
    write("a.lua", "\nreturn greeting \"a\" {\n\n  text = \"!!!\",\n}\n")
    write("b.lua", "return { text = 1 }\n")
    assert.same({ dir .. "/a.lua:4: too cheerful", dir .. "/b.lua:1: too cheerful" }, r:load_all())
  end)
end)

describe("defs hot reload", function()
  it("keeps the old definition on a broken edit and swaps the fix in within 200 ms", function()
    write("hello.lua", greeting("hello", "v1"))
    assert.same({}, reg:load_all())
    local held = reg:get("hello")
    local next_event = events(reg)
    handle = assert(reg:watch())

    -- A broken edit: the old definition stays, the problem names file and line.
    write("hello.lua", "-- a greeting\nreturn greeting \"hello\" {\n  text = \"v2\"\n  oops\n}\n")
    local ev = assert(next_event(2), "no event after the broken edit")
    assert.equal("rejected", ev.action)
    local problem = dir .. "/hello.lua:4: '}' expected (to close '{' at line 2) near 'oops'"
    assert.equal(problem, ev.problem)
    assert.same({ problem }, reg:problems())
    assert.equal(held, reg:get("hello"))
    assert.equal(1, reg:version("hello"))
    assert.contains("WARN", table.concat(logged))
    assert.contains(problem, table.concat(logged))

    -- The fix, written in place the way a simple editor does: swapped in < 200 ms.
    local t0 = time.monotonic()
    local f = assert(io.open(dir .. "/hello.lua", "w"))
    f:write(greeting("hello", "v3"))
    f:close()
    ev = assert(next_event(2), "no event after the fix")
    local latency = ev.at - t0
    io.stdout:write(("     reload latency: %.1f ms\n"):format(latency * 1000))
    assert.equal("swapped", ev.action)
    assert.less(0.2, latency, "seconds from the write to the swap")
    assert.equal("v3", reg:get("hello").text)
    assert.equal(2, reg:version("hello"))
    assert.same({}, reg:problems())
    assert.contains("reloaded", table.concat(logged))
    -- Whoever held the old definition still sees it, unchanged.
    assert.equal("v1", held.text)
    assert.truthy(held ~= reg:get("hello"))
  end)

  it("adds new files, removes deleted ones and ignores other names", function()
    assert.same({}, reg:load_all())
    local next_event = events(reg)
    handle = assert(reg:watch({ debounce = 0.02 }))
    write("notes.txt", "ignored")
    write("new.lua", greeting("new", "fresh"))
    local ev = assert(next_event(2))
    assert.equal("swapped", ev.action)
    assert.equal("new", ev.name)
    assert.equal(dir .. "/new.lua", ev.file)
    assert.equal(1, ev.version)
    assert.equal("fresh", reg:get("new").text)

    assert(fs.remove(dir .. "/new.lua"))
    ev = assert(next_event(2))
    assert.equal("removed", ev.action)
    assert.is_nil(reg:get("new"))
    assert.same({}, reg:names())
    assert.is_nil(next_event(0.2), "no further events")

    -- Re-created: the version keeps counting, so a new definition is never
    -- mistaken for the one removed.
    write("new.lua", greeting("new", "again"))
    ev = assert(next_event(2))
    assert.equal(2, ev.version)
  end)

  it("catches up with changes made between load_all and watch", function()
    write("a.lua", greeting("a", "old"))
    reg:load_all()
    write("a.lua", greeting("a", "new"))
    local next_event = events(reg)
    handle = assert(reg:watch())
    local ev = assert(next_event(2))
    assert.equal("swapped", ev.action)
    assert.equal("new", reg:get("a").text)
  end)

  it("stops cleanly, also from inside a change listener", function()
    reg:load_all()
    local stopped = fiber.cond()
    handle = assert(reg:watch({ debounce = 0.01 }))
    reg:on_change(function()
      handle:stop()
      stopped:signal()
    end)
    write("a.lua", greeting("a", "x"))
    assert(stopped:wait(2))
    handle:stop()
    fiber.sleep(0.05)
    write("b.lua", greeting("b", "x"))
    fiber.sleep(0.1)
    assert.is_nil(reg:get("b"))
  end)

  it("watch reports a directory that cannot be watched", function()
    local r = defs.registry{ kind = "greeting", dir = dir .. "/missing" }
    local h, err, code = r:watch()
    assert.is_nil(h)
    assert.equal("ENOENT", code)
    assert.contains(dir .. "/missing", err)
  end)
end)

describe("defs.check", function()
  it("passes a good project", function()
    assert.same({}, defs.check(FIXTURES .. "/good_project"))
    assert.same({}, defs.check(FIXTURES .. "/good_project/"))
  end)

  it("reports every problem of a bad project as file:line", function()
    local p = FIXTURES .. "/bad_project"
    assert.same({
      p .. "/teams/broken.lua:3: unexpected symbol near '='",
      p .. "/pipelines/empty.lua:1: must return a pipeline definition (it returned nothing)",
      p .. "/pipelines/leaky.lua:2: assignment to global 'stages' (definition files may only use locals)",
      p .. "/factory.lua:2: attempt to index local 'providers' (a nil value)",
    }, defs.check(p))
  end)

  it("warns of a USD budget that limits nothing: a team's unpriced models, a budget naming no team", function()
    assert(fs.mkdir_p(dir .. "/teams"))
    assert(fs.mkdir_p(dir .. "/pipelines"))
    local function team(name, extra)
      write("teams/" .. name .. ".lua", ([[
return team %q {
  description = "A team.",
  model = "factory/coder",
  %s
  operative "worker" { prompt = [=[Work.]=] %s },
}]]):format(name, extra.team or "", extra.operative or ""))
    end
    team("backend_engineering", { team = "budget = { usd_per_day = 20 },", operative = ', model = "factory/fast"' })
    team("qa_engineering", {})
    team("docs", {})
    write("pipelines/ship.lua", [[
return pipeline "ship" {
  limits = { budget_usd = 5 },
  stage "test" { team = "qa_engineering" },
}]])
    write("factory.lua", [[
providers { cloud = { base_url = "http://127.0.0.1:9/v1" }, local_ = { base_url = "http://127.0.0.1:9/v1" } }
models { ["factory/coder"] = { "cloud/big", "local_/small" }, ["factory/fast"] = { "cloud/quick" } }
prices { ["cloud/big"] = { input = 3, output = 15 } }
budgets { teams = { docs = { tokens_per_day = 1000 }, backend_engineerin = { tokens_per_day = 5 } } }
keys { ["sk-team-agents"] = { team = "agents" } }
]])
    local problems, warnings = defs.check(dir)
    assert.same({}, problems)
    assert.same({
      "backend_engineering, qa_engineering have a USD budget, but cloud/quick, local_/small have no price in"
        .. " factory.lua's prices {}: their calls count as $0 against it, so it limits nothing (give each a price; 0"
        .. " for a free local model)",
      dir .. "/factory.lua: budgets.teams[\"backend_engineerin\"] names no team of teams/*.lua and no key's team: it"
        .. " limits nothing (teams: backend_engineering, docs, qa_engineering)",
    }, warnings)
    -- With a USD budget in factory.lua, its loader names each unpriced model instead.
    write("factory.lua", assert(fs.read(dir .. "/factory.lua")):gsub("tokens_per_day = 1000", "usd_per_day = 1"))
    problems, warnings = defs.check(dir)
    assert.same({
      dir .. "/factory.lua: models[\"factory/coder\"]: local_/small has no price in prices {}: its calls count as $0"
        .. " against the USD budgets",
      dir .. "/factory.lua: models[\"factory/fast\"]: cloud/quick has no price in prices {}: its calls count as $0"
        .. " against the USD budgets",
      dir .. "/factory.lua: budgets.teams[\"backend_engineerin\"] names no team of teams/*.lua and no key's team: it"
        .. " limits nothing (teams: backend_engineering, docs, qa_engineering)",
    }, warnings)
    -- Priced (a free local model at 0), and the budget naming the key's team: nothing to say.
    write("factory.lua", [[
providers { cloud = { base_url = "http://127.0.0.1:9/v1" }, local_ = { base_url = "http://127.0.0.1:9/v1" } }
models { ["factory/coder"] = { "cloud/big", "local_/small" }, ["factory/fast"] = { "cloud/quick" } }
prices { ["cloud/big"] = { input = 3, output = 15 }, quick = { input = 1, output = 2 },
         ["local_/small"] = { input = 0, output = 0 } }
budgets { teams = { agents = { usd_per_day = 5 } } }
keys { ["sk-team-agents"] = { team = "agents" } }
]])
    problems, warnings = defs.check(dir)
    assert.same({}, problems)
    assert.same({}, warnings)
  end)

  it("warns of a notify command that is not installed here", function()
    write("factory.lua", 'notify { command = { "factory-test-no-such-notifier", "{message}" } }\n')
    local problems, warnings = defs.check(dir)
    assert.same({}, problems)
    assert.same({ dir .. "/factory.lua: notify.command runs factory-test-no-such-notifier, which is not installed here"
      .. " (not found in PATH)" }, warnings)
    write("factory.lua", 'notify { command = { "sh", "-c", "true" } }\n')
    assert.same({}, select(2, defs.check(dir)))
  end)

  it("warns of a CLI agent that is not installed here: valid, but a run of its stage would fail", function()
    assert(fs.mkdir_p(dir .. "/teams"))
    write("teams/backend_engineering.lua", [[
return team "backend_engineering" {
  description = "Builds the server side.",
  model = "factory/coder",
  operative "implementer" {
    prompt = [=[Implement the change.]=],
    agent = { cli = "custom", command = { "factory-test-no-such-agent", "{prompt}" }, env = { PATH = "/nowhere" } },
  },
}]])
    local problems, warnings = defs.check(dir)
    assert.same({}, problems)
    assert.same({ dir .. "/teams/backend_engineering.lua: operative implementer's agent runs factory-test-no-such-agent,"
      .. " which is not installed here (not found in PATH /nowhere)" }, warnings)
    local p = io.popen(("%s check %s 2>&1; echo \"exit=$?\""):format(host.exe, dir))
    local out = p:read("*a")
    p:close()
    assert.contains("warning: " .. warnings[1] .. "\n", out)
    assert.contains("check: ok: 1 team\nexit=0\n", out)
  end)

  it("accepts a project without definition directories; a missing one is a problem", function()
    assert.same({}, defs.check(dir))
    assert.same({ dir .. "/nope: no such directory" }, defs.check(dir .. "/nope"))
    write("f", "x")
    assert.same({ dir .. "/f: not a directory" }, defs.check(dir .. "/f"))
  end)

  it("runs as `factory check`, outside any fiber", function()
    local function run(args)
      local p = io.popen(("%s check %s 2>&1; echo \"exit=$?\""):format(host.exe, args))
      local out = p:read("*a")
      p:close()
      return out
    end
    assert.equal("check: ok: factory.lua, 1 pipeline, 1 team\nexit=0\n", run(FIXTURES .. "/good_project"))
    -- A directory that holds no project is not "ok": the check ran in the wrong place.
    assert.equal(("check: nothing to check in %s: no factory.lua, teams/*.lua or pipelines/*.lua"
      .. " (factory check DIR names the project's directory)\nexit=1\n"):format(dir), run(dir))
    local out = run(FIXTURES .. "/bad_project")
    assert.contains("bad_project/teams/broken.lua:3: unexpected symbol near '='", out)
    assert.contains("bad_project/factory.lua:2: ", out)
    assert.matches("exit=1\n$", out)
  end)
end)
