-- factory.git: git repositories for agents' worktrees, on libgit2 (factory.core.git).
-- No `git` process is ever run. Inside a fiber each call runs on libuv's thread pool
-- and the fiber waits; outside a fiber it runs inline. Calls on one repository
-- handle from many fibers are serialised (a libgit2 repository is not thread-safe);
-- open one handle per worktree to work on several at once.
--
-- Failures return nil, "CODE: message", "CODE" with CODE one of EGIT (libgit2's
-- message), ENOTFOUND (not a repository, unknown base, no such worktree or remote),
-- EEXISTS (worktree or branch name taken), ELOCKED, EDIRTY. Misuse (wrong argument
-- types, a closed handle) raises.
--
--   git.open(path) -> repo                  path is the repository's or a worktree's
--                                           top directory (no upward search)
--   git.init(path, {bare = false, initial_branch = "main"}) -> repo
--
--   repo:head() -> {branch = NAME|nil (detached), oid = HEX|nil (no commit yet)}
--   repo:worktree_add(name, path, {base = "main"|oid|revspec}) -> true
--       creates branch `name` at the base's latest commit (default HEAD) and checks
--       it out in a new worktree `name` at path (which must not exist). The name is
--       the caller's: what an attempt at it that was cut short left behind (git's
--       administrative directory for it, a lock on the branch) is cleared first.
--   repo:worktrees() -> {{name, path, locked, prunable}, ...}
--   repo:worktree_remove(name, {force = false}) -> true
--       deletes the worktree's directory and its administrative files; the branch
--       stays. Without force, a locked worktree or one with changes (tracked or
--       untracked) is refused with ELOCKED / EDIRTY.
--   repo:prune_worktrees() -> {name, ...}   forgets worktrees whose directory is gone
--                                           (not locked ones); returns their names
--   repo:status() -> {{path, status = "XY"}, ...}
--       XY as in `git status --porcelain -uall`: "??" untracked, " M", "M ", "A ",
--       " D", "D ", "UU" (conflict) ...; sorted by path
--   repo:diff_stats([base]) -> {files, insertions, deletions,
--                               per_file = {{path, insertions, deletions, binary}, ...}}
--   repo:diff([base]) -> patch text
--       both compare base's tree (default HEAD) with the working directory through
--       the index, as `git diff BASE` does: tracked files only
--   repo:add_all() -> true                  like `git add -A`
--   repo:add({path, ...}) -> true           a path missing on disk is removed from the index
--   repo:commit(message, {author = {name =, email =}, committer = {...}}) -> oid
--       commits the index on HEAD; without author, user.name/user.email from the
--       configuration; committer defaults to the author
--   repo:branches() -> {{name, oid, head}, ...}
--   repo:ignored({path, ...}) -> {bool, ...}  whether the ignore rules (.gitignore,
--                                           info/exclude, core.excludesFile) ignore each
--                                           path (relative to the working directory; a
--                                           directory's with a trailing slash)
--   repo:branch_delete(name) -> true        a local branch; ELOCKED when it is checked
--                                           out (here or in a worktree), ENOTFOUND
--   repo:remote_add(name, url) -> true
--   repo:fetch(remote) -> true              a remote's name, or a path/URL
--   repo:push(remote, refspec) -> true      e.g. "refs/heads/x:refs/heads/x"
--   repo:path() -> the working directory (or the git directory of a bare repository)
--   repo:close()                            idempotent; __gc closes too
local core = require "factory.core.git"

return {
  open = core.open,
  init = core.init,
}
