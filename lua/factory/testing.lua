-- factory.testing: a small describe/it test runner that runs inside the factory
-- binary, so specs can use fibers and every core module.
--
-- A spec file is a chunk run with describe, it, before_each, after_each and an
-- extended assert in its environment. Each `it` runs in its own fiber with a
-- timeout (default 30 s, `it(name, fn, { timeout = s })`) and must not leave fibers
-- running. run(files) prints one line per test, the failures with file:line and a
-- traceback, and ends with "N passed, N failed"; it returns passed, failed.
local fiber = require "factory.fiber"
local time = require "factory.core.time"

local M = {}

local function fmt(v)
  if type(v) == "string" then return ("%q"):format(v) end
  return tostring(v)
end

local function deep_equal(a, b, seen)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  seen = seen or {}
  if seen[a] == b then return true end
  seen[a] = b
  for k, v in pairs(a) do
    if not deep_equal(v, b[k], seen) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function dump(v, indent, seen)
  if type(v) ~= "table" then return fmt(v) end
  seen = seen or {}
  if seen[v] then return "<cycle>" end
  seen[v] = true
  indent = indent or ""
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
  local out = {}
  for _, k in ipairs(keys) do
    out[#out + 1] = indent .. "  [" .. fmt(k) .. "] = " .. dump(v[k], indent .. "  ", seen)
  end
  if #out == 0 then return "{}" end
  return "{\n" .. table.concat(out, ",\n") .. "\n" .. indent .. "}"
end

local function failure(msg, level)
  error(msg, (level or 1) + 2)
end

-- The assert seen by specs: callable like the builtin, plus named checks.
local checks = {}

function checks.equal(expected, actual, what)
  if expected ~= actual then
    failure(("%sexpected %s, got %s"):format(what and (what .. ": ") or "", fmt(expected), fmt(actual)))
  end
end

function checks.same(expected, actual, what)
  if not deep_equal(expected, actual) then
    failure(("%sexpected (deep)\n%s\ngot\n%s"):format(what and (what .. ": ") or "", dump(expected), dump(actual)))
  end
end

function checks.truthy(v, what)
  if not v then failure((what or "value") .. " should be truthy, got " .. fmt(v)) end
end

function checks.falsy(v, what)
  if v then failure((what or "value") .. " should be falsy, got " .. fmt(v)) end
end

function checks.is_nil(v, what)
  if v ~= nil then failure((what or "value") .. " should be nil, got " .. fmt(v)) end
end

function checks.matches(pattern, s, what)
  if type(s) ~= "string" or not s:find(pattern) then
    failure(("%s%s does not match %q"):format(what and (what .. ": ") or "", fmt(s), pattern))
  end
end

function checks.contains(needle, s, what)
  if type(s) ~= "string" or not s:find(needle, 1, true) then
    failure(("%s%s does not contain %q"):format(what and (what .. ": ") or "", fmt(s), needle))
  end
end

function checks.near(expected, actual, tolerance, what)
  if type(actual) ~= "number" or math.abs(expected - actual) > tolerance then
    failure(("%sexpected %s +- %s, got %s"):format(what and (what .. ": ") or "", fmt(expected), fmt(tolerance), fmt(actual)))
  end
end

function checks.less(limit, actual, what)
  if type(actual) ~= "number" or not (actual < limit) then
    failure(("%sexpected < %s, got %s"):format(what and (what .. ": ") or "", fmt(limit), fmt(actual)))
  end
end

-- Calls fn and checks it raises an error whose text matches pattern.
function checks.error_matches(fn, pattern)
  local ok, err = pcall(fn)
  if ok then failure("expected an error matching " .. fmt(pattern) .. ", but none was raised") end
  local text = type(err) == "table" and (tostring(err.code) .. ": " .. tostring(err.message)) or tostring(err)
  if pattern and not text:find(pattern) then
    failure(("error %s does not match %q"):format(fmt(text), pattern))
  end
  return err
end

local spec_assert = setmetatable(checks, {
  __call = function(_, v, msg, ...)
    if not v then failure(msg or "assertion failed!") end
    return v, msg, ...
  end,
})
M.assert = spec_assert

local function collect(file)
  local root = { name = nil, children = {}, before = {}, after = {} }
  local current = root
  local env = setmetatable({}, { __index = _G })
  env.assert = spec_assert
  env.describe = function(name, body)
    local group = { name = name, children = {}, before = {}, after = {}, parent = current }
    current.children[#current.children + 1] = group
    local saved = current
    current = group
    body()
    current = saved
  end
  env.it = function(name, body, opts)
    local info = debug.getinfo(2, "Sl")
    current.children[#current.children + 1] = {
      name = name, body = body, parent = current, opts = opts or {},
      where = info.short_src .. ":" .. info.currentline,
    }
  end
  env.before_each = function(fn) current.before[#current.before + 1] = fn end
  env.after_each = function(fn) current.after[#current.after + 1] = fn end
  local chunk, err = loadfile(file)
  if not chunk then return nil, err end
  setfenv(chunk, env)
  local ok, lerr = pcall(chunk)
  if not ok then return nil, tostring(lerr) end
  return root
end

local function full_name(node)
  local parts = {}
  while node do
    if node.name then table.insert(parts, 1, node.name) end
    node = node.parent
  end
  return table.concat(parts, " ")
end

local function hooks(node, field)
  local chain = {}
  while node do
    table.insert(chain, 1, node)
    node = node.parent
  end
  local list = {}
  for _, n in ipairs(chain) do
    for _, fn in ipairs(n[field]) do list[#list + 1] = fn end
  end
  return list
end

local function error_text(err, tb)
  local text = type(err) == "table" and ((err.code or "error") .. ": " .. tostring(err.message)) or tostring(err)
  if tb then return tb end
  return text
end

local function run_test(test, filter)
  local name = full_name(test)
  if filter and not name:find(filter, 1, true) then return nil end
  local live_before = fiber.stats().live
  local started = time.monotonic()
  local function body()
    for _, fn in ipairs(hooks(test.parent, "before")) do fn() end
    local ok, err = xpcall(test.body, debug.traceback)
    local afters = hooks(test.parent, "after")
    for i = #afters, 1, -1 do afters[i]() end
    if not ok then error(err, 0) end
  end
  local ok, err, tb = fiber.with_timeout(test.opts.timeout or 30, body)
  local ms = (time.monotonic() - started) * 1000
  if ok then
    local leaked = fiber.stats().live - live_before
    if leaked > 0 then
      ok, err = false, ("%d fiber(s) left running by the test"):format(leaked)
    end
  end
  if ok then
    io.stdout:write(("ok   %s (%.0f ms)\n"):format(name, ms))
    return true
  end
  io.stdout:write(("FAIL %s (%.0f ms)\n     at %s\n     %s\n"):format(
    name, ms, test.where, (error_text(err, tb):gsub("\n", "\n     "))))
  return false
end

local function walk(node, fn)
  for _, child in ipairs(node.children) do
    if child.body then fn(child) else walk(child, fn) end
  end
end

-- Runs the spec files (inside a fiber); `filter` keeps tests whose full name
-- contains it. Returns passed, failed.
function M.run(files, filter)
  local passed, failed = 0, 0
  for _, file in ipairs(files) do
    io.stdout:write("# " .. file .. "\n")
    local root, err = collect(file)
    if not root then
      io.stdout:write("FAIL " .. file .. " (loading)\n     " .. err .. "\n")
      failed = failed + 1
    else
      walk(root, function(test)
        local r = run_test(test, filter)
        if r == true then passed = passed + 1 elseif r == false then failed = failed + 1 end
      end)
    end
    io.stdout:flush()
  end
  io.stdout:write(("%d passed, %d failed\n"):format(passed, failed))
  return passed, failed
end

return M
