-- factory.agents.workspace: a build objective in its own git worktree and branch.
--
--   workspace.run(o) -> ws | nil, err, code
--   o: { repo = PATH of the repository (or an open factory.git handle),
--        branch = NAME of the new branch and worktree (required),
--        path = DIR for the worktree (default REPO/../.factory-worktrees/NAME; must not exist),
--        base = "main" | oid | revspec (default HEAD: the latest commit of the base),
--        author = { name =, email = } (default { name = "Factory Agent", email = "agent@factory.local" }),
--        message = commit message (default "factory: " .. first line of the objective),
--        keep = true to leave the worktree in place (default: removed at the end),
--        diff_base = OID the change is counted from, when the branch starts further on
--          (a killed attempt's commit: its work is part of the change; default base),
--        commit = false: nothing is committed (a stage that reads and runs, not
--          changes: what the agent wrote is thrown away with the worktree),
--        agent = fn(o2) -> result, stats (default factory.agents.builtin.run),
--        ...every option of builtin.run (objective, model, team, run, max_iterations,
--           token_budget, emit, ...) except root/box, which is the worktree }
--   Steps: worktree_add(branch, path, {base}) -> run the agent in the worktree ->
--   add_all + commit on the branch (only when the agent changed tracked or new,
--   non-ignored files; commits the agent made on the branch itself are kept as part
--   of its change, and one that left the worktree on another branch or a detached
--   HEAD is an EBRANCH error) -> diff stats of the commit against the base -> remove the
--   worktree (forced: build output left by the agent goes with it) unless keep.
--   ws: { result = TaskResult, stats = the agent's stats, branch = NAME, path = DIR,
--         base = OID the branch started from (diff_base when given), commit = OID | nil
--           (no change),
--         diff_stats = { files, insertions, deletions, per_file = {{path, ...}} },
--         diff = the commit's patch against the base, its first max_diff bytes (default
--           32 KiB) and a line saying how much was cut (nil without a commit),
--         removed = true | false,
--         discarded = n: paths the agent changed that were not kept (commit = false) }
--   An error in the git steps returns nil, "CODE: message", CODE (the worktree is
--   removed first unless keep); the agent's own outcome is in ws.result.
--
--   workspace.remove(repo, branch) -> true | nil, err, code
--       removes a worktree left with keep = true (the branch stays).
--
--   workspace.root(dir) -> true | nil, err, code
--       makes DIR (with parents) ready to hold worktrees: marked as the top of
--       unrelated trees (factory.core.fs.set_topdir), where the filesystem supports it.
local git = require "factory.git"
local fs = require "factory.core.fs"
local builtin = require "factory.agents.builtin"

local M = {}

local MAX_DIFF = 32 * 1024

M.DEFAULT_AUTHOR = { name = "Factory Agent", email = "agent@factory.local" }

local function open(repo)
  if type(repo) == "string" then
    local r, err, code = git.open(repo)
    if not r then return nil, err, code end
    return r, nil, nil, true
  end
  return repo
end

local function dirname(p)
  p = p:gsub("/+$", "")
  return p:match("^(.*)/[^/]*$") or "."
end

-- Whether a worktree of r is registered at path.
local function registered(r, path)
  local real = fs.realpath(path) or path
  for _, w in ipairs(r:worktrees() or {}) do
    if (fs.realpath(w.path) or w.path:gsub("/+$", "")) == real then return true end
  end
  return false
end

function M.root(dir)
  local ok, err, code = fs.mkdir_p(dir)
  if not ok then return nil, err, code end
  -- Only a placement hint: a filesystem without it works the same, a little slower.
  fs.set_topdir(dir)
  return true
end

function M.remove(repo, branch)
  local r, err, code, owned = open(repo)
  if not r then return nil, err, code end
  local ok, rerr, rcode = r:worktree_remove(branch, { force = true })
  if owned then r:close() end
  if not ok then return nil, rerr, rcode end
  return true
end

function M.run(o)
  if type(o) ~= "table" or type(o.branch) ~= "string" or type(o.objective) ~= "string" or o.repo == nil then
    error("workspace.run: expected { repo =, branch =, objective = }", 2)
  end
  local r, err, code, owned = open(o.repo)
  if not r then return nil, err, code end
  local function fail(e, c)
    if owned then r:close() end
    return nil, e, c
  end

  -- The branch starts at the base's latest commit; its oid is kept for the diff stats.
  local default_path = dirname(r:path()) .. "/.factory-worktrees/" .. o.branch
  local ok, e, c = true, nil, nil
  if not o.path then
    ok, e, c = M.root(dirname(default_path))
    -- An attempt killed while its worktree was being made can leave the directory
    -- without a worktree registered there: it is Factory's own, and would stop this one.
    if ok and fs.stat(default_path) and not registered(r, default_path) then
      ok, e, c = fs.remove(default_path, { recursive = true })
    end
  end
  if not ok then return fail(e, c) end
  ok, e, c = r:worktree_add(o.branch, o.path or default_path, { base = o.base })
  if not ok then return fail(e, c) end
  local path
  for _, w in ipairs(r:worktrees()) do
    if w.name == o.branch then path = w.path end
  end
  path = (path or o.path or default_path):gsub("/+$", "")

  local wt, werr, wcode = git.open(path)
  if not wt then
    r:worktree_remove(o.branch, { force = true })
    return fail(werr, wcode)
  end
  local base_oid = wt:head().oid

  local function cleanup_fail(e, c)
    wt:close()
    if not o.keep then r:worktree_remove(o.branch, { force = true }) end
    return fail(e, c)
  end

  -- The agent, confined to the worktree.
  local args = {}
  for k, v in pairs(o) do args[k] = v end
  args.repo, args.branch, args.path, args.base, args.author, args.message, args.keep, args.agent, args.commit,
    args.diff_base = nil, nil, nil, nil, nil, nil, nil, nil, nil, nil
  args.box, args.root = nil, path
  local result, stats = (o.agent or builtin.run)(args)

  -- Stage and commit whatever the agent changed. An agent may have committed on its
  -- own (a `git commit` among its commands, a CLI agent's habit): those commits are
  -- its change too, and the branch keeps them.
  base_oid = o.diff_base or base_oid
  local ws = { result = result, stats = stats or {}, branch = o.branch, path = path, base = base_oid,
               removed = false }
  local head = wt:head() or {}
  if head.branch ~= o.branch and o.commit ~= false then
    return cleanup_fail(("EBRANCH: the agent left its worktree on %s, not on its branch %s: what it committed"
      .. " there stays there, what it did not commit is lost"):format(head.branch and ("branch " .. head.branch)
      or "a detached HEAD", o.branch), "EBRANCH")
  end
  if head.oid ~= base_oid and o.commit ~= false then ws.commit = head.oid end
  local st, serr, scode = wt:status()
  if not st then return cleanup_fail(serr, scode) end
  if o.commit == false then
    ws.discarded = #st
  elseif #st > 0 then
    local ok, aerr, acode = wt:add_all()
    if not ok then return cleanup_fail(aerr, acode) end
    local first = o.objective:match("^[^\n]*")
    local author = o.author or M.DEFAULT_AUTHOR
    local oid, cerr, ccode = wt:commit(o.message or ("factory: " .. first), { author = author, committer = o.committer or author })
    if not oid then return cleanup_fail(cerr, ccode) end
    ws.commit = oid
  end
  if o.commit ~= false then
    local ds, derr, dcode = wt:diff_stats(base_oid)
    if not ds then return cleanup_fail(derr, dcode) end
    ws.diff_stats = ds
  end
  if ws.commit then
    local patch, perr, pcode = wt:diff(base_oid)
    if not patch then return cleanup_fail(perr, pcode) end
    local max = o.max_diff or MAX_DIFF
    ws.diff = #patch <= max and patch
      or patch:sub(1, max) .. ("\n[diff cut: %d bytes in all; the branch holds the whole change]\n"):format(#patch)
  end
  wt:close()

  if not o.keep then
    local ok, rerr, rcode = r:worktree_remove(o.branch, { force = true })
    if not ok then return fail(rerr, rcode) end
    ws.removed = true
  end
  if owned then r:close() end
  return ws
end

return M
