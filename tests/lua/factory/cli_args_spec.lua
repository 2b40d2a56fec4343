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
