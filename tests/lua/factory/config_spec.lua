-- factory.config: factory.lua's providers and models sections, each mistake
-- reported with the file, the line and the field.
local config = require "factory.config"
local fs = require "factory.core.fs"

local dir, path

before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir_p(dir))
  path = dir .. "/factory.lua"
end)

after_each(function()
  fs.remove(dir, { recursive = true })
end)

local function load(text)
  assert(fs.write(path, text))
  return config.load(path)
end

describe("factory.lua", function()
  it("gives the router its providers and models, kind openai by default", function()
    local cfg = assert(load('providers { local_llm = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'models { ["factory/coder"] = { "local_llm/qwen" } }\n'))
    assert.equal("openai", cfg.router.providers.local_llm.kind)
    assert.same({ "local_llm/qwen" }, cfg.router.models["factory/coder"])
  end)

  it("tells a missing base_url from one that is not a string", function()
    local none, err = load('providers {\n  mine = { api_key = "k" },\n}\n')
    assert.equal(nil, none)
    assert.contains("factory.lua:", err)
    assert.contains("providers.mine: base_url is required", err)
    none, err = load('providers {\n  mine = { base_url = 8080 },\n}\n')
    assert.equal(nil, none)
    assert.contains("providers.mine: base_url must be a string (a URL), got a number", err)
  end)

  it("reports a model chain naming an undeclared provider", function()
    local none, err = load('providers { a = { base_url = "http://127.0.0.1:9/v1" } }\n'
      .. 'models { ["factory/fast"] = { "b/gpt" } }\n')
    assert.equal(nil, none)
    assert.contains("factory.lua:2:", err)
    assert.contains('models["factory/fast"]: unknown provider "b"', err)
  end)

  it("reports a syntax error with its line", function()
    local none, err = load('providers { a = { base_url = "http://x" }\nmodels {')
    assert.equal(nil, none)
    assert.contains("factory.lua:2:", err)
  end)
end)
