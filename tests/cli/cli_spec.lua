-- The command line as a user meets it: the factory binary run as a child process.
local proc = require "factory.proc"
local env = require "factory.core.env"
local fs = require "factory.core.fs"

local BIN = env.get("FACTORY_BIN") or "./factory"

local function child_env()
  local e = { PATH = env.get("PATH"), HOME = env.get("HOME") or "/tmp" }
  for _, name in ipairs({ "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS" }) do
    e[name] = env.get(name)
  end
  return e
end

local function factory(args, opts)
  local argv = { BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local r = assert(proc.run({ argv = argv, env = child_env(), timeout = 30, cwd = opts and opts.cwd,
                              stdin = opts and opts.stdin }))
  return r
end

local function lines(s)
  local out = {}
  for line in s:gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

local tmp

before_each(function()
  tmp = os.tmpname()
  os.remove(tmp)
  assert(fs.mkdir_p(tmp))
end)

after_each(function()
  fs.remove(tmp, { recursive = true })
end)

local function write(name, text)
  local path = tmp .. "/" .. name
  assert(fs.write(path, text))
  return path
end

describe("factory CLI", function()
  it("prints its version", function()
    local r = factory({ "version" })
    assert.equal(0, r.code)
    assert.matches("^factory %d+%.%d+%.%d+ %(", r.stdout)
    assert.contains("LuaJIT", r.stdout)
  end)

  it("has help for itself and each command", function()
    for _, args in ipairs({ { "--help" }, { "help" }, { "-h" }, { "repl", "--help" }, { "check", "--help" }, { "version", "--help" },
                          { "learnings", "--help" } }) do
      local r = factory(args)
      assert.equal(0, r.code, table.concat(args, " "))
      assert.matches("usage: factory", r.stdout)
    end
  end)

  it("refuses unknown commands and flags with one line and exit 2", function()
    for _, args in ipairs({ { "frobnicate" }, { "--bogus" }, { "check", "--bogus" }, { "repl", "--nope" }, { "-e" } }) do
      local r = factory(args)
      assert.equal(2, r.code, table.concat(args, " "))
      assert.equal(1, #lines(r.stderr), "one line: " .. r.stderr)
      assert.matches("^factory: ", r.stderr)
    end
  end)

  it("runs a script in a fiber with its arguments", function()
    local script = write("args.lua", [[
      local fiber = require "factory.fiber"
      fiber.sleep(0.01)
      print(select("#", ...), table.concat({ ... }, ","), arg[0] ~= nil, arg[1])
    ]])
    local r = factory({ script, "one", "two" })
    assert.equal(0, r.code, r.stderr)
    assert.equal("2\tone,two\ttrue\tone\n", r.stdout)
  end)

  it("runs -e code", function()
    local r = factory({ "-e", "print(1 + 2, ...)", "x" })
    assert.equal(0, r.code)
    assert.equal("3\tx\n", r.stdout)
  end)

  it("exits with the integer a script returns", function()
    local r = factory({ "-e", "return 7" })
    assert.equal(7, r.code)
  end)

  it("reports a script error as file:line with a traceback and exits 1", function()
    local script = write("fails.lua", "local x = 1\nlocal function f() error('it broke') end\nf()\n")
    local r = factory({ script })
    assert.equal(1, r.code)
    assert.matches("fails%.lua:2: it broke", r.stderr)
    assert.contains("stack traceback", r.stderr)
    assert.matches("fails%.lua:3", r.stderr)
  end)

  it("reports a syntax error as file:line", function()
    local script = write("syntax.lua", "local x = \n\nfunction(\n")
    local r = factory({ script })
    assert.equal(1, r.code)
    assert.matches("syntax%.lua:%d+:", r.stderr)
  end)

  it("reports a missing script clearly", function()
    local r = factory({ tmp .. "/nothere.lua" })
    assert.equal(1, r.code)
    assert.matches("nothere%.lua", r.stderr)
  end)

  it("a failing fiber prints file:line and a traceback while others keep running", function()
    local script = write("bg.lua", [[
      local fiber = require "factory.fiber"
      local worker = fiber.spawn(function() fiber.sleep(0.05) return "worker done" end)
      fiber.spawn(function()
        fiber.sleep(0.01)
        local t = nil
        return t.field
      end)
      print(select(2, fiber.join(worker)))
    ]])
    local r = factory({ script })
    assert.equal(0, r.code, r.stderr)
    assert.equal("worker done\n", r.stdout)
    assert.matches("bg%.lua:6: attempt to index local 't'", r.stderr)
    assert.contains("stack traceback", r.stderr)
  end)

  it("installs with make install and runs from any directory", function()
    local san = BIN:find("san") and "1" or "0"
    local prefix = tmp .. "/prefix"
    local r = assert(proc.run({ argv = { "make", "--no-print-directory", "install", "PREFIX=" .. prefix, "SAN=" .. san },
                                env = child_env(), timeout = 600 }))
    assert.equal(0, r.code, r.stderr)
    local installed = prefix .. "/bin/factory"
    local out = assert(proc.run({ argv = { installed, "-e", "print(require('factory.json').encode({ok=true}))" },
                                  env = child_env(), cwd = "/", timeout = 30 }))
    assert.equal(0, out.code, out.stderr)
    assert.equal('{"ok":true}\n', out.stdout)
  end, { timeout = 600 })
end)
