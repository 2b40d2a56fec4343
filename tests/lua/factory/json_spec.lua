-- Specs for lua/factory/json.lua.
local json = require "factory.json"

describe("json", function()
  it("round-trips nested values", function()
    local v = { name = "factory", n = 3, ok = true, list = { 1, 2, 3 }, nested = { a = { b = "c" } } }
    assert.same(v, json.decode(json.encode(v)))
  end)

  it("decodes null as json.null and encodes it back", function()
    local v = json.decode('{"a":null,"b":[1,null]}')
    assert.equal(json.null, v.a)
    assert.equal(json.null, v.b[2])
    assert.equal('{"a":null}', json.encode({ a = json.null }))
  end)

  it("encodes json.empty_array as [] and an empty table as {}", function()
    assert.equal('{"items":[]}', json.encode({ items = json.empty_array }))
    assert.equal("{}", json.encode({}))
    assert.same({ items = {} }, json.decode('{"items":[]}'))
  end)

  it("keeps integers exact up to 1e14", function()
    assert.equal("[99999999999999]", json.encode({ 99999999999999 }))
  end)

  it("turns sparse arrays into objects instead of failing", function()
    local s = json.encode({ [1] = "a", [100] = "b" })
    assert.same({ ["1"] = "a", ["100"] = "b" }, json.decode(s))
  end)

  it("reports malformed text with the EJSON code and position", function()
    local v, err, code = json.decode('{"a": 1,')
    assert.is_nil(v)
    assert.equal("EJSON", code)
    assert.matches("^EJSON: .*character", err)
  end)

  it("refuses non-strings and unencodable values clearly", function()
    local v, err = json.decode(nil)
    assert.is_nil(v)
    assert.matches("expected a string", err)
    local s, err2 = json.encode({ f = print })
    assert.is_nil(s)
    assert.matches("^EJSON: .*function", err2)
    local s3, err3 = json.encode(0 / 0)
    assert.is_nil(s3)
    assert.matches("^EJSON", err3)
  end)
end)
