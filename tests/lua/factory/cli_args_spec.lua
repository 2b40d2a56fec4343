-- Specs for lua/factory/cli_args.lua.
local cli_args = require "factory.cli_args"

describe("cli_args.db_and_words", function()
  it("splits --db from the words, in either form and any place", function()
    local cases = {
      { {}, { words = {} } },
      { { "status" }, { words = { "status" } } },
      { { "--db", "sqlite:x.db", "search", "a b" }, { url = "sqlite:x.db", words = { "search", "a b" } } },
      { { "verify", "--db=postgres://h/d" }, { url = "postgres://h/d", words = { "verify" } } },
    }
    for _, c in ipairs(cases) do
      assert.same(c[2], cli_args.db_and_words(c[1]))
    end
  end)

  it("refuses other flags and a --db without a URL", function()
    local cases = {
      { { "status", "--verbose" }, "unknown flag '--verbose'" },
      { { "status", "--db" }, "--db needs a URL" },
    }
    for _, c in ipairs(cases) do
      local parsed, err = cli_args.db_and_words(c[1])
      assert.is_nil(parsed)
      assert.equal(c[2], err)
    end
  end)
end)

describe("cli_args.flags", function()
  local NAMES = { ["--team"] = "team", ["--db"] = "db" }

  it("takes each named flag's value, in either form, and keeps the words in order", function()
    assert.same({ { team = "qa", db = "sqlite:x.db" }, { "search", "a b" } },
                { cli_args.flags({ "search", "--team", "qa", "a b", "--db=sqlite:x.db" }, NAMES) })
    assert.same({ {}, {} }, { cli_args.flags({}, NAMES) })
  end)

  it("refuses other flags and a flag without its value", function()
    assert.same({ nil, "unknown flag '--verbose'" }, { cli_args.flags({ "--verbose" }, NAMES) })
    assert.same({ nil, "--team needs a value" }, { cli_args.flags({ "x", "--team" }, NAMES) })
  end)
end)

describe("cli_args.commas", function()
  it("groups the thousands", function()
    assert.same({ "0", "999", "1,000", "1,234,567", "-12,345" },
                { cli_args.commas(0), cli_args.commas(999), cli_args.commas(1000), cli_args.commas(1234567.9),
                  cli_args.commas(-12345) })
  end)
end)
