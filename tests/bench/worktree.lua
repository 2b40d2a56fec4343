-- Worktree create+remove per second: factory.git (libgit2, in-process) against the
-- `git` CLI run as processes, in the same run, on the same repository (50 files in
-- 5 directories). One create+remove is, on each side:
--   libgit2: repo:worktree_add(name, path, {base="main"}) -- new branch + checkout
--            repo:worktree_remove(name)                   -- dirty check + delete
--   cli:     git worktree add -q -b NAME PATH main
--            git worktree remove PATH                     -- dirty check + delete
-- Both sides keep the branch they created (neither command deletes it), so refs
-- accumulate the same way on both. Both make their worktrees in one directory,
-- prepared as Factory prepares its worktree root (factory.agents.workspace.root).
-- A third side, "files", writes and removes the same files with no git at all: the
-- filesystem's own cost, which bounds both. Rounds rotate which side goes first,
-- each side does one untimed warm-up, and the best round of each is reported.
-- Usage: factory tests/bench/worktree.lua N ROUNDS [DIR]   (DIR: where to work,
-- default the system temporary directory)
-- Prints "libgit2 RATE", "cli RATE", "files RATE" (the best round of each).
local git = require "factory.git"
local fs = require "factory.core.fs"
local proc = require "factory.proc"
local time = require "factory.core.time"
local fiber = require "factory.fiber"
local workspace = require "factory.agents.workspace"

local N, ROUNDS, DIR = tonumber(arg[1]) or 20, tonumber(arg[2]) or 3, arg[3]

local function main()
  local root = os.tmpname()
  os.remove(root)
  if DIR and DIR ~= "" then root = DIR .. "/" .. root:match("[^/]+$") end
  assert(fs.mkdir_p(root))
  local dir = root .. "/repo"
  local wt = root .. "/wt"
  assert(workspace.root(wt))
  local repo = assert(git.init(dir))
  for i = 1, 50 do
    assert(fs.mkdir_p(dir .. "/d" .. (i % 5)))
    assert(fs.write(("%s/d%d/f%d.c"):format(dir, i % 5, i), ("int v%d = %d;\n"):format(i, i):rep(40)))
  end
  assert(repo:add_all())
  assert(repo:commit("base", { author = { name = "Bench", email = "bench@factory.test" } }))
  local env = { PATH = os.getenv("PATH") or "/usr/bin:/bin", HOME = root, GIT_CONFIG_NOSYSTEM = "1" }
  local function cli(...)
    local res = assert(proc.run{ argv = { "git", ... }, cwd = dir, env = env })
    assert(res.code == 0, "git failed: " .. (res.stderr or ""))
  end
  local seq = 0
  local sides = {
    { label = "libgit2", best = 0, one = function(name)
        assert(repo:worktree_add(name, wt .. "/" .. name, { base = "main" }))
        assert(repo:worktree_remove(name))
      end },
    { label = "cli", best = 0, one = function(name)
        cli("worktree", "add", "-q", "-b", name, wt .. "/" .. name, "main")
        cli("worktree", "remove", wt .. "/" .. name)
      end },
    -- The filesystem's floor: the checkout's files written and removed with no git,
    -- in a plain coroutine so that each call runs at once on this thread; append,
    -- not write, for a plain open-write-close (write is durable: temp file, fsync).
    { label = "files", best = 0, one = function(name)
        local co = coroutine.create(function()
          local top = wt .. "/" .. name
          for i = 1, 50 do
            if i <= 5 then assert(fs.mkdir_p(("%s/d%d"):format(top, i % 5))) end
            assert(fs.append(("%s/d%d/f%d.c"):format(top, i % 5, i), ("int v%d = %d;\n"):format(i, i):rep(40)))
          end
          assert(fs.append(top .. "/.git", "gitdir: " .. dir .. "/.git/worktrees/" .. name .. "\n"))
          assert(fs.remove(top, { recursive = true }))
        end)
        local ok, err = coroutine.resume(co)
        assert(ok and coroutine.status(co) == "dead", err)
      end },
  }
  local function run(side, n)
    local t0 = time.monotonic()
    for _ = 1, n do
      seq = seq + 1
      side.one(side.label .. seq)
    end
    return n / (time.monotonic() - t0)
  end
  for _, side in ipairs(sides) do run(side, 1) end -- warm-up, untimed
  for r = 1, ROUNDS do
    for k = 0, #sides - 1 do
      local side = sides[(r + k - 1) % #sides + 1]
      side.best = math.max(side.best, run(side, N))
    end
  end
  repo:close()
  assert(fs.remove(root, { recursive = true }))
  for _, side in ipairs(sides) do print(("%s %.0f"):format(side.label, side.best)) end
end

local f = fiber.spawn(main)
local ok, err = fiber.join(f)
if not ok then io.stderr:write("bench worktree: ", tostring(err), "\n"); os.exit(1) end
