-- Worktree create+remove per second: factory.git (libgit2) against the `git` CLI
-- run as processes (`git worktree add -b` then `git worktree remove`), in the same
-- run, on the same repository (50 files), interleaved in rounds so both see the
-- same load. Usage: factory tests/bench/worktree.lua N ROUNDS
-- Prints "libgit2 RATE", "cli RATE" (the best round of each).
local git = require "factory.git"
local fs = require "factory.core.fs"
local proc = require "factory.proc"
local time = require "factory.core.time"
local fiber = require "factory.fiber"

local N, ROUNDS = tonumber(arg[1]) or 20, tonumber(arg[2]) or 3

local function main()
  local root = os.tmpname()
  os.remove(root)
  assert(fs.mkdir_p(root))
  local dir = root .. "/repo"
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
  local seq, best_lib, best_cli = 0, 0, 0
  for _ = 1, ROUNDS do
    local t0 = time.monotonic()
    for _ = 1, N do
      seq = seq + 1
      local name = "lib" .. seq
      assert(repo:worktree_add(name, root .. "/wt/" .. name, { base = "main" }))
      assert(repo:worktree_remove(name))
    end
    best_lib = math.max(best_lib, N / (time.monotonic() - t0))
    t0 = time.monotonic()
    for _ = 1, N do
      seq = seq + 1
      local name = "cli" .. seq
      cli("worktree", "add", "-q", "-b", name, root .. "/wt/" .. name, "main")
      cli("worktree", "remove", root .. "/wt/" .. name)
    end
    best_cli = math.max(best_cli, N / (time.monotonic() - t0))
  end
  repo:close()
  assert(fs.remove(root, { recursive = true }))
  print(("libgit2 %.0f"):format(best_lib))
  print(("cli %.0f"):format(best_cli))
end

local f = fiber.spawn(main)
local ok, err = fiber.join(f)
if not ok then io.stderr:write("bench worktree: ", tostring(err), "\n"); os.exit(1) end
