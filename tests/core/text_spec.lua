-- factory.core.text: UTF-8 checked and repaired through iconv.
local text = require "factory.core.text"

local FFFD = "\239\191\189"

describe("factory.core.text", function()
  it("finds the first byte of a string that is not UTF-8", function()
    assert.is_nil(text.utf8_error(""))
    assert.is_nil(text.utf8_error("plain ascii"))
    assert.is_nil(text.utf8_error("caf\195\169 \226\130\172 \240\159\152\128"))
    assert.equal(4, text.utf8_error("caf\233"))                  -- Latin-1
    assert.equal(1, text.utf8_error("\237\160\128"))             -- a UTF-16 surrogate
    assert.equal(1, text.utf8_error("\192\175"))                 -- overlong "/"
    assert.equal(4, text.utf8_error("abc\226\130"))              -- cut in the middle of a character
    assert.equal(3, text.utf8_error("a\0\255"))                  -- NUL is UTF-8; 0xFF never is
    assert.is_nil(text.utf8_error("\244\143\191\191"))         -- U+10FFFF, the last code point
    assert.equal(2, text.utf8_error("a\244\144\128\128"))       -- U+110000: glibc's iconv takes it
    assert.equal(1, text.utf8_error("\245\128\128\128"))
    local long = ("x"):rep(100000) .. "\255"
    assert.equal(100001, text.utf8_error(long))
  end)

  it("replaces each malformed byte with U+FFFD and counts them, keeping a valid string as it is", function()
    local s = "caf\195\169"
    local out, n = text.to_utf8(s)
    assert.equal(s, out)
    assert.equal(0, n)
    assert.same({ "caf" .. FFFD .. " x", 1 }, { text.to_utf8("caf\233 x") })
    assert.same({ FFFD .. FFFD .. FFFD .. "s", 3 }, { text.to_utf8("\237\160\128s") })
    assert.same({ "abc" .. FFFD .. FFFD, 2 }, { text.to_utf8("abc\226\130") })
    assert.same({ "a" .. FFFD:rep(4) .. "b\244\143\191\191", 4 }, { text.to_utf8("a\244\144\128\128b\244\143\191\191") })
    -- across the buffer's seams: long runs on both sides of each bad byte
    local parts, want = {}, {}
    for i = 1, 50 do
      parts[i] = ("a"):rep(i * 97) .. "\255"
      want[i] = ("a"):rep(i * 97) .. FFFD
    end
    local fixed, count = text.to_utf8(table.concat(parts))
    assert.equal(table.concat(want), fixed)
    assert.equal(50, count)
    assert.is_nil(text.utf8_error(fixed))
  end)
end)
