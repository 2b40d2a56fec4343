-- Specs for lua/factory/log.lua.
local log = require "factory.log"
local json = require "factory.json"

local function temp_path()
  return os.tmpname()
end

local function read_all(path)
  local f = assert(io.open(path, "r"))
  local s = f:read("*a")
  f:close()
  return s
end

describe("log", function()
  local path, console_path, console

  before_each(function()
    path = temp_path()
    console_path = temp_path()
    console = assert(io.open(console_path, "w"))
    assert(log.open(path))
    log.set_console(console)
    log.set_level("info", "console")
    log.set_level("debug", "file")
  end)

  after_each(function()
    log.close()
    log.set_console(nil)
    console:close()
    os.remove(path)
    os.remove(console_path)
  end)

  it("writes one JSON object per line to the file", function()
    log.info("stage finished", { stage = "build", ms = 12 })
    log.debug("details")
    local lines = {}
    for line in read_all(path):gmatch("[^\n]+") do lines[#lines + 1] = json.decode(line) end
    assert.equal(2, #lines)
    assert.equal("info", lines[1].level)
    assert.equal("stage finished", lines[1].msg)
    assert.equal("build", lines[1].stage)
    assert.equal(12, lines[1].ms)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT", lines[1].ts)
    assert.equal("debug", lines[2].level)
  end)

  it("writes a readable console line, filtered by level", function()
    log.info("hello world", { team = "qa" })
    log.debug("hidden")
    console:flush()
    local text = read_all(console_path)
    assert.matches("^%d%d:%d%d:%d%d%.%d%d%d INFO  hello world team=qa\n$", text)
  end)

  it("never writes secrets", function()
    log.warn("calling provider", { api_key = "sk-live-123", headers = { Authorization = "Bearer abc" }, model = "m" })
    console:flush()
    local both = read_all(path) .. read_all(console_path)
    assert.falsy(both:find("sk-live-123", 1, true), "the key leaked")
    assert.falsy(both:find("Bearer abc", 1, true), "the header leaked")
    assert.contains("[REDACTED]", both)
    assert.contains("model", both)
  end)

  it("leaves out a message repeated past 5 a second, and says how many it left out", function()
    for i = 1, 20 do log.error("db: a posted write failed (log spec)", { n = i }) end
    log.error("another message (log spec)")
    require("factory.fiber").sleep(1.05)
    log.error("db: a posted write failed (log spec)", { n = 21 })
    local lines = {}
    for line in read_all(path):gmatch("[^\n]+") do lines[#lines + 1] = json.decode(line) end
    assert.equal(7, #lines)
    for i = 1, 5 do assert.equal(i, lines[i].n) end
    assert.equal("another message (log spec)", lines[6].msg)
    assert.same({ 21, 15 }, { lines[7].n, lines[7].left_out })
  end)

  it("rejects an unknown level", function()
    assert.error_matches(function() log.set_level("loud") end, "unknown level")
  end)
end)
