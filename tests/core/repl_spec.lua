-- factory.repl (printing, compiling, the session's globals) and the parts of
-- factory.core.repl that need no terminal. The prompt itself is tested under a
-- pseudo-terminal by tests/cli/repl_test.py.
local repl = require "factory.repl"
local core = require "factory.core.repl"

describe("repl.pretty", function()
  local deep = {}
  local t = deep
  for _ = 1, 12 do
    t.next = {}
    t = t.next
  end
  local cyclic = {}
  cyclic.self = cyclic
  local shared = { 1 }
  local cases = {
    { 1, "1" },
    { nil, "nil" },
    { true, "true" },
    { "a\n\"b\"\0", [["a\n\"b\"\000"]] },
    { {}, "{}" },
    { { 1, 2, 3 }, "{ 1, 2, 3 }" },
    { { a = 1, b = { 2, 3 } }, "{ a = 1, b = { 2, 3 } }" },
    { { b = 1, a = 2, "x", [3] = "y", ["end"] = 2, ["not id"] = 1 },
      [[{ "x", [3] = "y", a = 2, b = 1, ["end"] = 2, ["not id"] = 1 }]] },
    { cyclic, "{ self = <cycle> }" },
    { { shared, shared }, "{ { 1 }, { 1 } }" },
    { setmetatable({}, { __tostring = function() return "<thing>" end }), "<thing>" },
    { { name = "factory", list = { 1, 2, 3 }, text = "a string long enough to break the line" },
      '{\n  list = { 1, 2, 3 },\n  name = "factory",\n  text = "a string long enough to break the line"\n}' },
    { { outer = { inner = { text = "a string long enough to break the line, twice over" } } },
      '{\n  outer = {\n    inner = { text = "a string long enough to break the line, twice over" }\n  }\n}' },
  }
  for i, c in ipairs(cases) do
    it("case " .. i .. ": " .. c[2]:gsub("\n.*", " ..."), function()
      assert.equal(c[2], repl.pretty(c[1]))
    end)
  end

  it("stops at a maximum depth", function()
    assert.contains("{...}", repl.pretty(deep))
  end)

  it("hides a string or table under a key that looks secret, and shows numbers under such keys", function()
    assert.equal('{ api_key = "[REDACTED]", base_url = "http://x", max_tokens = 16 }',
      repl.pretty({ api_key = "sk-live-1", base_url = "http://x", max_tokens = 16 }))
    assert.equal('{ keys = "[REDACTED]", team = { token = "[REDACTED]" } }',
      repl.pretty({ keys = { ["sk-team"] = "qa" }, team = { token = "t" } }))
    assert.equal('"sk-live-1"', repl.pretty("sk-live-1"))
  end)
end)

describe("repl.compile", function()
  it("turns an expression into a function returning its values", function()
    local fn = repl.compile("1 + 2, 'x'")
    local a, b = fn()
    assert.equal(3, a)
    assert.equal("x", b)
  end)

  it("lets an expression name any global", function()
    assert.equal(5, setfenv(repl.compile("values"), { values = 5 })())
  end)

  it("runs a statement as typed", function()
    local env = {}
    assert(setfenv(repl.compile("y = 5"), env))()
    assert.equal(5, env.y)
  end)

  it("returns nil for input that is not complete yet", function()
    for _, src in ipairs({ "for i = 1, 3 do", "x =", "function f(a)", "t = {", "s = [[long", "f(1,\n2," }) do
      assert.equal(nil, (repl.compile(src)), src)
    end
  end)

  it("returns false and the message for a syntax error", function()
    local fn, err = repl.compile("1 +* 2")
    assert.equal(false, fn)
    assert.matches("^stdin:1: ", err)
  end)

  it("keeps the prompt's line in errors raised by a called builtin", function()
    local ok, err = pcall(repl.compile('error("bad")'))
    assert.falsy(ok)
    assert.equal("stdin:1: bad", err)
  end)
end)

describe("repl.environment", function()
  it("has the engine loaded and falls back to the standard globals", function()
    local env = repl.environment()
    for _, name in ipairs({ "fiber", "sleep", "spawn", "json", "log", "time", "env" }) do
      assert.truthy(env[name], name)
    end
    assert.equal(string, env.string)
  end)

  it("keeps globals set at the prompt out of _G", function()
    local env = repl.environment()
    setfenv(repl.compile("repl_spec_global = 42"), env)()
    assert.equal(42, env.repl_spec_global)
    assert.is_nil(rawget(_G, "repl_spec_global"))
  end)
end)

describe("factory.core.repl", function()
  it("refuses to read outside a fiber", function()
    local ok, err = coroutine.wrap(function() return pcall(core.readline, "> ") end)()
    assert.falsy(ok)
    assert.matches("must be called from a fiber", err)
  end)

  it("saves and loads the history in libedit's format", function()
    local path = os.tmpname()
    core.add_history("repl spec entry")
    assert.equal(true, core.save_history(path))
    local f = assert(io.open(path))
    local text = f:read("*a")
    f:close()
    assert.contains("repl\\040spec\\040entry", text)
    assert.equal(true, core.load_history(path))
    os.remove(path)
  end)

  it("reports a missing history file as an error value", function()
    local ok, err, code = core.load_history("/nonexistent/factory_history")
    assert.is_nil(ok)
    assert.equal("ENOENT", code)
    assert.matches("^ENOENT: ", err)
  end)
end)
