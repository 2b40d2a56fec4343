-- tests/tools/queue_crasher.lua: a queue worker process for the crash and
-- concurrency tests (tests/lua/factory/queue_spec.lua) and the benchmark.
--
--   factory tests/tools/queue_crasher.lua --db URL --owner NAME [--mode crash|drain]
--       [--fibers N] [--batch N] [--lease S] [--enqueue N] [--audit]
--
-- Prints "ready" once the database is open, then "done ID" for each item after the
-- transaction completing it has committed. Each completion also writes a row to
-- crash_log (item_id, owner, attempt) in that same transaction, and with --audit an
-- audit record: the test checks both against the queue after a SIGKILL.
--   crash: each fiber claims --batch items and completes them, enqueueing --enqueue
--          new ones whenever a claim comes back short; runs until killed.
--   drain: claims and completes until nothing is ready or leased, then exits 0.
local db = require "factory.db"
local queue = require "factory.queue"
local audit = require "factory.audit"
local fiber = require "factory.fiber"

local opts = { mode = "crash", fibers = 4, batch = 4, lease = 0.3, enqueue = 8 }
local args = { ... }
local i = 1
while i <= #args do
  local name = args[i]:match("^%-%-(.+)$")
  if name == "audit" then
    opts.audit = true
    i = i + 1
  else
    local v = args[i + 1]
    assert(name and v, "usage: queue_crasher.lua --db URL --owner NAME [--mode crash|drain] ...")
    opts[name] = tonumber(v) or v
    i = i + 2
  end
end

local d = assert(db.open(opts.db))
local q = queue.new(d)
local LOG = "INSERT INTO crash_log (item_id, owner, attempt) VALUES (?, ?, ?)"

local function record(tx, item)
  assert(tx:exec(LOG, { item.id, opts.owner, item.attempts }))
  if opts.audit then
    assert(audit.append(tx, { kind = "complete", actor = opts.owner, payload = { item = item.id } }))
  end
end

local function finished()
  local s = assert(q:stats())
  return s.ready + s.leased == 0
end

local function worker(n)
  local owner = opts.owner .. "/" .. n
  while true do
    local items = assert(q:claim(owner, { batch = opts.batch, lease = opts.lease,
      wait = opts.mode == "drain" and 0.2 or 0 }))
    for _, item in ipairs(items) do
      local ok, err = q:complete(item, owner, { by = owner }, record)
      if ok then
        io.stdout:write("done ", item.id, "\n")
        io.stdout:flush()
      elseif not err:find("^ELEASE") then
        error(err)
      end
    end
    if #items < opts.batch then
      if opts.mode == "drain" then
        if #items == 0 and finished() then return end
      else
        local list = {}
        for k = 1, opts.enqueue do list[k] = { payload = { from = owner, k = k }, max_attempts = 1000 } end
        assert(q:enqueue_many(list))
      end
    end
  end
end

io.stdout:write("ready\n")
io.stdout:flush()
local fibers = {}
for n = 1, opts.fibers do fibers[n] = fiber.spawn(worker, n) end
local ok, outcomes = fiber.all(fibers)
q:close()
d:close()
if not ok then
  for _, o in ipairs(outcomes) do
    if not o.ok then io.stderr:write(tostring(o[1]), "\n", tostring(o[2] or ""), "\n") end
  end
  return 1
end
return 0
