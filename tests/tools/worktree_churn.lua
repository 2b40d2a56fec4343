-- tests/tools/worktree_churn.lua: what a `factory run` does to a repository, many
-- times over, as one of several processes at once (tests/core/git_spec.lua):
--   factory tests/tools/worktree_churn.lua REPO PREFIX COUNT
-- adds a worktree and branch PREFIX-i, removes the worktree, deletes the branch;
-- prints each failure on a line of its own, then "done".
local git = require "factory.git"

local repo_dir, prefix, count = ...
local repo = assert(git.open(repo_dir))
for i = 1, tonumber(count) do
  local name = ("%s-%d"):format(prefix, i)
  local ok, err = repo:worktree_add(name, repo_dir .. "-wt/" .. name)
  if ok then ok, err = repo:worktree_remove(name) end
  if ok then ok, err = repo:branch_delete(name) end
  if not ok then print(err) end
end
repo:close()
print("done")
