-- factory.json: JSON through lua-cjson.
--
--   encode(value)  -> string | nil, "EJSON: ...", "EJSON"
--   decode(text)   -> value  | nil, "EJSON: ...", "EJSON"
--
-- null: JSON null decodes to json.null (a lightuserdata, truthy!); encode json.null
--   to write null. A Lua nil inside a table is simply absent.
-- Arrays: a Lua table whose keys are exactly 1..n encodes as an array; an empty
--   table encodes as {} (cjson cannot tell an empty array from an empty object):
--   put json.empty_array where [] is wanted. Decoding [] gives an empty table.
--   Sparse arrays (holes) encode as objects with string keys.
-- Numbers: 14 significant digits; NaN and infinity are refused (EJSON).
local cjson = require "factory.core.json"

local M = {}

M.null = cjson.null

-- A sentinel cjson encodes as a string no real data contains; replaced by [] after.
local EMPTY = "\0factory.json.empty_array\0"
local EMPTY_ENCODED = '"\\u0000factory.json.empty_array\\u0000"'
M.empty_array = EMPTY

local function fail(msg)
  return nil, "EJSON: " .. tostring(msg), "EJSON"
end

function M.encode(value)
  local ok, s, err = pcall(cjson.encode, value)
  if not ok then return fail(s) end
  if not s then return fail(err) end
  if s:find(EMPTY_ENCODED, 1, true) then
    s = s:gsub('"\\u0000factory%.json%.empty_array\\u0000"', "[]")
  end
  return s
end

function M.decode(text)
  if type(text) ~= "string" then
    return fail("expected a string to decode, got " .. type(text))
  end
  local ok, v, err = pcall(cjson.decode, text)
  if not ok then return fail(v) end
  if v == nil and err then return fail(err) end
  return v
end

return M
