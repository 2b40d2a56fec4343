-- tests/tools/queue_crash.lua: the SIGKILL crash test of factory.queue (issue 3,
-- acceptance 2), shared by tests/lua/factory/queue_spec.lua (small) and the queue
-- benchmark (bigger).
--
--   run(url, opts) -> { rounds, completed, lost_leases } ; raises on any violation
--   opts: rounds (default 50), min_run, max_run (seconds each worker runs before its
--   SIGKILL; default 0.02 and 0.1), args (extra worker arguments)
--
-- Each round starts tests/tools/queue_crasher.lua (it enqueues, claims and
-- completes, writing a crash_log row and an audit record in each completing
-- transaction) and kills it with SIGKILL at a random moment. After every kill:
-- every item it reported done is done, no item has two crash_log rows, completions
-- and crash_log rows and audit records agree, and the audit chain verifies. The
-- items it held leased are remembered; at the end a drain run must claim each again
-- and leave nothing ready or leased.
local db = require "factory.db"
local queue = require "factory.queue"
local audit = require "factory.audit"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local host = require "factory.core.host"

local M = {}

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "tests/tools"

local function check(cond, fmt, ...)
  if not cond then error(fmt:format(...), 2) end
end

local function one(d, sql, params)
  return assert(d:query(sql, params))[1].n
end

-- Starts the worker process; returns it once it has printed "ready".
function M.spawn(url, owner, args)
  local argv = { host.exe, here .. "/queue_crasher.lua", "--db", url, "--owner", owner }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = tostring(a) end
  local p = assert(proc.spawn { argv = argv, stdout = "pipe", stderr = "pipe" })
  local first = p:read_line()
  if first ~= "ready" then
    p:kill(9)
    p:wait()
    error("the queue worker did not start: " .. tostring(first) .. "\n" .. tostring(p:read("stderr")))
  end
  return p
end

-- The ids a finished worker reported done.
function M.done_lines(p)
  local done = {}
  while true do
    local line = p:read_line()
    if not line then break end
    local id = tonumber(line:match("^done (%d+)$"))
    if id then done[#done + 1] = id end
  end
  return done
end

M.LOG_TABLE = "CREATE TABLE crash_log (item_id BIGINT NOT NULL, owner TEXT NOT NULL, attempt BIGINT NOT NULL)"

function M.run(url, opts)
  opts = opts or {}
  local rounds, min_run, max_run = opts.rounds or 50, opts.min_run or 0.02, opts.max_run or 0.1
  local d = assert(db.open(url))
  local q = queue.new(d)
  assert(d:script(M.LOG_TABLE))
  local reported, lost = {}, {}
  local lost_count = 0

  local function verify(done, round)
    for _, id in ipairs(done) do
      reported[#reported + 1] = id
      check(assert(q:get(id)).state == "done", "round %d: item %d was reported done but is not", round, id)
    end
    local twice = assert(d:query("SELECT item_id FROM crash_log GROUP BY item_id HAVING COUNT(*) > 1 LIMIT 1"))
    check(#twice == 0, "round %d: item %s was completed twice", round, twice[1] and twice[1].item_id)
    local logged = one(d, "SELECT COUNT(*) AS n FROM crash_log")
    local completed = one(d, "SELECT COUNT(*) AS n FROM queue WHERE state = 'done'")
    check(logged == completed, "round %d: %d completions but %d crash_log rows", round, completed, logged)
    local ok, n = audit.verify(d)
    check(ok, "round %d: %s", round, tostring(n))
    check(n == logged, "round %d: %d audit records for %d completions", round, n, logged)
  end

  -- PostgreSQL finishes what a killed client already sent (its last COMMIT may land
  -- after the kill), so the checks wait until the server has dropped its sessions.
  local worker_url, settle = url, function() end
  if d.backend == "postgres" then
    worker_url = url .. (url:find("?", 1, true) and "&" or "?") .. "application_name=factory_crasher"
    settle = function(round)
      for _ = 1, 500 do
        if one(d, "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE application_name = 'factory_crasher'") == 0 then
          return
        end
        fiber.sleep(0.01)
      end
      check(false, "round %d: the killed worker's sessions are still open after 5 s", round)
    end
  end

  local args = opts.args or { "--fibers", 4, "--batch", 3, "--lease", 0.3, "--enqueue", 6 }
  args[#args + 1] = "--audit"
  for round = 1, rounds do
    local owner = "crasher" .. round
    local p = M.spawn(worker_url, owner, args)
    fiber.sleep(min_run + math.random() * (max_run - min_run))
    p:kill(9)
    local res = p:wait()
    settle(round)
    check(res.signal == 9, "round %d: the worker exited before its kill (code %s): %s", round,
      tostring(res.code), tostring(p:read("stderr")))
    verify(M.done_lines(p), round)
    p:close()
    local held = assert(d:query("SELECT id, attempts FROM queue WHERE state = 'leased' AND lease_owner LIKE ?",
      { owner .. "/%" }))
    for _, r in ipairs(held) do
      lost[r.id] = r.attempts
      lost_count = lost_count + 1
    end
  end

  local p = M.spawn(url, "drainer", { "--mode", "drain", "--lease", 0.3, "--audit" })
  local res = p:wait(60)
  check(res.code == 0, "the drain run failed: %s", tostring(p:read("stderr")))
  verify(M.done_lines(p), rounds + 1)
  p:close()
  for _, id in ipairs(reported) do check(q:get(id).state == "done", "item %d is no longer done", id) end
  local s = assert(q:stats())
  check(s.ready + s.leased + s.dead + s.cancelled == 0, "after the drain: %d ready, %d leased, %d dead",
    s.ready, s.leased, s.dead)
  -- A killed PostgreSQL client's last COMMIT can still land after the kill (the
  -- server finishes what it received): such an item was completed by that lease, so
  -- its lease never expired. Every other lost lease must have been claimed again.
  for id, attempts in pairs(lost) do
    local finished_by_it = one(d, "SELECT COUNT(*) AS n FROM crash_log WHERE item_id = ? AND attempt = ?",
      { id, attempts }) > 0
    check(finished_by_it or q:get(id).attempts > attempts,
      "item %d, leased by a killed worker, was not claimed again", id)
  end
  q:close()
  d:close()
  return { rounds = rounds, completed = s.done, lost_leases = lost_count }
end

return M
