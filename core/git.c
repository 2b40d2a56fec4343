/* core/git.c — factory.core.git: git repositories through libgit2 (no `git` process).
 *
 * Every operation is a job. Inside a fiber it runs on libuv's thread pool and the
 * fiber waits; outside one it runs inline (like core/fs.c). A job owns copies of its
 * inputs and its results are plain C data, turned into Lua values on the loop
 * thread. A git_repository is not thread-safe, so a repository handle serialises its
 * jobs with a mutex taken on the worker thread; the handle is reference-counted by
 * its jobs so that close() (or __gc) while a job runs frees the repository only when
 * the last job is done.
 *
 * libgit2 has global state: the module calls git_libgit2_init when loaded and a
 * sentinel userdata, created before any repository handle (so collected after them
 * at lua_close), calls git_libgit2_shutdown.
 *
 * Failures: nil, "EGIT: message", "EGIT" — or ENOTFOUND, EEXISTS, ELOCKED, EDIRTY
 * when the cause is that precise. libgit2's error text is thread-local, so it is
 * copied on the worker thread.
 */
#include "fiber.h"

#include <git2.h>
#include <git2/sys/repository.h>
#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define REPO_MT "factory.git.repo"
#define SENTINEL_MT "factory.git.sentinel"

typedef struct {
    git_repository *repo;
    uv_mutex_t lock;        /* one job at a time on repo */
    int refs;               /* the Lua handle (until closed) + queued jobs */
} git_handle;

enum {
    OP_OPEN, OP_INIT, OP_HEAD, OP_WT_ADD, OP_WT_LIST, OP_WT_REMOVE, OP_WT_PRUNE, OP_STATUS,
    OP_DIFF_STATS, OP_DIFF, OP_ADD_ALL, OP_ADD, OP_COMMIT, OP_BRANCHES, OP_FETCH, OP_PUSH,
    OP_REMOTE_ADD, OP_BRANCH_DELETE, OP_IGNORED,
};

/* One result row: a worktree, a status entry, a file's diff stats, a branch. */
typedef struct {
    char *a, *b;
    long x, y;
    int f1, f2;
} git_row;

typedef struct {
    uv_work_t req;
    fb_fiber *fiber;        /* waiting for the result; NULL inline or once abandoned */
    git_handle *h;          /* NULL for open/init */
    int op;
    int flag;               /* init: bare; remove: force */
    char *s1, *s2, *s3;     /* inputs: path/name/base/message/remote/refspec */
    char *an, *ae, *cn, *ce; /* commit: author and committer */
    char **paths;
    size_t npaths;
    /* results */
    git_repository *newrepo;
    char *t1, *t2;          /* head: branch, oid; commit: oid; diff: patch text */
    long n1, n2, n3;
    git_row *rows;
    size_t nrows, caprows;
    /* failure */
    const char *ecode;
    char *emsg;
} git_job;

/* ---- errors (worker thread) ------------------------------------------------ */

/* Records the failure unless one is recorded already. Returns -1. */
static int gj_failf(git_job *j, const char *code, const char *fmt, ...) {
    if (j->ecode) return -1;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    j->ecode = code;
    j->emsg = strdup(buf);
    return -1;
}

/* Records libgit2's last error for the failing call `rc`, prefixed by `what`. */
static int gj_fail(git_job *j, int rc, const char *what) {
    const git_error *e = git_error_last();
    const char *code = rc == GIT_ENOTFOUND ? "ENOTFOUND" : rc == GIT_EEXISTS ? "EEXISTS"
                     : rc == GIT_ELOCKED ? "ELOCKED" : "EGIT";
    char msg[900];
    snprintf(msg, sizeof msg, "%s", e && e->message ? e->message : "unknown error");
    /* One line: libgit2 messages sometimes end with a newline. */
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    return gj_failf(j, code, "%s: %s", what, msg);
}

static char *gj_strdup(const char *s) { return s ? strdup(s) : NULL; }

static git_row *gj_row(git_job *j) {
    if (j->nrows == j->caprows) {
        size_t cap = j->caprows ? j->caprows * 2 : 16;
        git_row *r = realloc(j->rows, cap * sizeof *r);
        if (!r) return NULL;
        j->rows = r;
        j->caprows = cap;
    }
    git_row *r = &j->rows[j->nrows++];
    memset(r, 0, sizeof *r);
    return r;
}

static int gj_oom(git_job *j) { return gj_failf(j, "ENOMEM", "out of memory"); }

/* ---- the jobs (worker thread: no Lua here) ---------------------------------- */

static void oid_hex(const git_oid *oid, char out[GIT_OID_HEXSZ + 1]) { git_oid_tostr(out, GIT_OID_HEXSZ + 1, oid); }

/* The commit that `spec` (a branch, a revspec or an oid) names. */
static int gj_resolve_commit(git_job *j, git_repository *repo, const char *spec, git_commit **out) {
    git_object *obj = NULL;
    int rc = git_revparse_single(&obj, repo, spec);
    if (rc < 0) {
        if (rc == GIT_ENOTFOUND || rc == GIT_EAMBIGUOUS || rc == GIT_EINVALIDSPEC)
            return gj_failf(j, "ENOTFOUND", "unknown base '%s'", spec);
        return gj_fail(j, rc, spec);
    }
    rc = git_object_peel((git_object **)out, obj, GIT_OBJECT_COMMIT);
    git_object_free(obj);
    if (rc < 0) return gj_failf(j, "ENOTFOUND", "base '%s' is not a commit", spec);
    return 0;
}

static int gj_open(git_job *j) {
    int rc = git_repository_open_ext(&j->newrepo, j->s1, GIT_REPOSITORY_OPEN_NO_SEARCH, NULL);
    if (rc == GIT_ENOTFOUND) return gj_failf(j, "ENOTFOUND", "not a git repository: %s", j->s1);
    if (rc < 0) return gj_fail(j, rc, j->s1);
    return 0;
}

static int gj_init(git_job *j) {
    git_repository_init_options o;
    git_repository_init_options_init(&o, GIT_REPOSITORY_INIT_OPTIONS_VERSION);
    o.flags = GIT_REPOSITORY_INIT_MKPATH | (j->flag ? GIT_REPOSITORY_INIT_BARE : 0);
    o.initial_head = j->s2 ? j->s2 : "main";
    int rc = git_repository_init_ext(&j->newrepo, j->s1, &o);
    return rc < 0 ? gj_fail(j, rc, j->s1) : 0;
}

static int gj_head(git_job *j, git_repository *repo) {
    git_reference *ref = NULL;
    int rc = git_repository_head(&ref, repo);
    if (rc == GIT_EUNBORNBRANCH) {
        /* No commit yet: the branch HEAD points at, and no oid. */
        rc = git_reference_lookup(&ref, repo, "HEAD");
        if (rc < 0) return gj_fail(j, rc, "HEAD");
        const char *t = git_reference_symbolic_target(ref);
        if (t && !strncmp(t, "refs/heads/", 11)) j->t1 = gj_strdup(t + 11);
        git_reference_free(ref);
        return 0;
    }
    if (rc < 0) return gj_fail(j, rc, "HEAD");
    if (git_reference_is_branch(ref)) j->t1 = gj_strdup(git_reference_shorthand(ref));
    char hex[GIT_OID_HEXSZ + 1];
    oid_hex(git_reference_target(ref), hex);
    j->t2 = strdup(hex);
    git_reference_free(ref);
    return 0;
}

/* Creates the directories above path (like mkdir -p of its parent). */
static void mkdir_parents(const char *path) {
    char *p = strdup(path);
    if (!p) return;
    char *slash = strrchr(p, '/');
    if (slash && slash != p) {
        *slash = 0;
        for (char *q = p + 1; *q; q++) {
            if (*q != '/') continue;
            *q = 0;
            mkdir(p, 0777);
            *q = '/';
        }
        mkdir(p, 0777);
    }
    free(p);
}

/* ---- worktree fast paths ----------------------------------------------------
 * In a checkout libgit2 looks up attributes for every file it writes (for the crlf
 * and ident filters), resolving the file's real path each time; and a status
 * re-hashes, with the same lookups, every file written in the index's own
 * timestamp tick (racy git): all of a fresh checkout. That work is most of a
 * worktree's create+remove. The helpers below skip it only where it cannot change
 * the outcome. */

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Whether a directory of one of libgit2's search paths (a ':'-separated list)
 * holds a file named name; 1 too when the list cannot be read. */
static int search_path_has(int level, const char *name) {
    git_buf dirs = {0};
    if (git_libgit2_opts(GIT_OPT_GET_SEARCH_PATH, level, &dirs) < 0) return 1;
    int found = 0;
    for (const char *p = dirs.ptr; p && *p && !found;) {
        const char *end = strchr(p, GIT_PATH_LIST_SEPARATOR);
        int n = end ? (int)(end - p) : (int)strlen(p);
        char path[4096];
        if (n > 0 && snprintf(path, sizeof path, "%.*s/%s", n, p, name) < (int)sizeof path)
            found = file_exists(path);
        p = end ? end + 1 : NULL;
    }
    git_buf_dispose(&dirs);
    return found;
}

static int is_attributes_entry(const char *root, const git_tree_entry *e, void *found) {
    (void)root;
    if (strcasecmp(git_tree_entry_name(e), ".gitattributes") != 0) return 0;
    *(int *)found = 1;
    return -1;
}

/* Whether checking out commit could pass a file through a filter: only an
 * attributes file (a .gitattributes in the tree, $GIT_COMMON_DIR/info/attributes,
 * core.attributesFile or its XDG default, the system gitattributes) or a
 * core.autocrlf other than false turns on the crlf or ident filter. 1 when unsure. */
static int filters_may_apply(git_repository *repo, git_commit *commit) {
    int may = 0;
    git_config *cfg = NULL;
    if (git_repository_config_snapshot(&cfg, repo) < 0) return 1;
    git_config_entry *e = NULL;
    if (git_config_get_entry(&e, cfg, "core.autocrlf") == 0) {
        int on = 1;
        may = git_config_parse_bool(&on, e->value) < 0 || on;
        git_config_entry_free(e);
    }
    if (!may && git_config_get_entry(&e, cfg, "core.attributesfile") == 0) {
        may = 1;
        git_config_entry_free(e);
    }
    git_config_free(cfg);
    git_buf info = {0};
    if (!may) {
        char path[4096];
        may = git_repository_item_path(&info, repo, GIT_REPOSITORY_ITEM_INFO) < 0 ||
              snprintf(path, sizeof path, "%s/attributes", info.ptr) >= (int)sizeof path || file_exists(path);
        git_buf_dispose(&info);
    }
    if (!may) may = search_path_has(GIT_CONFIG_LEVEL_XDG, "attributes") ||
                    search_path_has(GIT_CONFIG_LEVEL_SYSTEM, "gitattributes");
    git_tree *tree = NULL;
    if (!may) {
        int found = 0;
        may = git_commit_tree(&tree, commit) < 0 ||
              (git_tree_walk(tree, GIT_TREEWALK_PRE, is_attributes_entry, &found) < 0 && !found) || found;
        git_tree_free(tree);
    }
    git_error_clear();
    return may;
}

/* The regular files under the directory open as fd (closed here), not counting
 * the top-level .git; -1 when anything else is there or it cannot be read. */
static long count_files(int fd, int top, int depth) {
    DIR *d = depth > 256 ? NULL : fdopendir(fd);
    if (!d) {
        close(fd);
        return -1;
    }
    long n = 0;
    struct dirent *de;
    while (n >= 0 && (de = readdir(d))) {
        const char *name = de->d_name;
        if (!strcmp(name, ".") || !strcmp(name, "..") || (top && !strcmp(name, ".git"))) continue;
        unsigned char type = de->d_type;
        struct stat st;
        if (type == DT_UNKNOWN) {
            if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                n = -1;
                break;
            }
            type = S_ISREG(st.st_mode) ? DT_REG : S_ISDIR(st.st_mode) ? DT_DIR : DT_LNK;
        }
        if (type == DT_REG) {
            n++;
        } else if (type == DT_DIR) {
            int sub = openat(dirfd(d), name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            long k = sub < 0 ? -1 : count_files(sub, 0, depth + 1);
            n = k < 0 ? -1 : n + k;
        } else {
            n = -1;
        }
    }
    closedir(d);
    return n;
}

static int same_time(const git_index_time *t, const struct timespec *ts) {
    return t->seconds == (int32_t)ts->tv_sec && t->nanoseconds == (uint32_t)ts->tv_nsec;
}

/* Whether index entry e describes the regular file at path: its stat data match,
 * and, when the file is not older than the index (written: the index file's
 * mtime), its bytes hash to e's blob. */
static int entry_matches(const git_index_entry *e, const char *path, const struct timespec *written) {
    struct stat st;
    if (lstat(path, &st) < 0 || !S_ISREG(st.st_mode) || (st.st_mode & 0100) != (e->mode & 0100) ||
        (uint32_t)st.st_size != e->file_size || !same_time(&e->mtime, &st.st_mtim) ||
        !same_time(&e->ctime, &st.st_ctim) || (uint32_t)st.st_ino != e->ino ||
        (uint32_t)st.st_uid != e->uid || (uint32_t)st.st_gid != e->gid)
        return 0;
    int racy = e->mtime.seconds > (int32_t)written->tv_sec ||
               (e->mtime.seconds == (int32_t)written->tv_sec && e->mtime.nanoseconds >= (uint32_t)written->tv_nsec);
    if (!racy) return 1;
    git_oid oid;
    return git_odb_hashfile(&oid, path, GIT_OBJECT_BLOB) == 0 && git_oid_equal(&oid, &e->id);
}

/* Whether idx differs from HEAD's tree (a staged change), or that is unknown: a
 * tree-to-index diff, which reads no file of the working tree. */
static int index_changed(git_repository *wr, git_index *idx) {
    git_object *head = NULL;
    if (git_revparse_single(&head, wr, "HEAD^{tree}") < 0) return 1;
    git_diff_options o;
    git_diff_options_init(&o, GIT_DIFF_OPTIONS_VERSION);
    o.flags = GIT_DIFF_IGNORE_SUBMODULES;
    git_diff *diff = NULL;
    int changed = git_diff_tree_to_index(&diff, wr, (git_tree *)head, idx, &o) < 0 || git_diff_num_deltas(diff) > 0;
    git_diff_free(diff);
    git_object_free(head);
    return changed;
}

/* Whether worktree repository wr certainly holds nothing that removing it would
 * lose: nothing is staged, every index entry is a regular file it describes
 * (entry_matches) and there is no other file. Its bytes being the entry's blob is
 * what counts, so a racy file is hashed as it is, without filters. 0 when not
 * shown clean here: the caller then asks libgit2's full status, which also knows
 * ignored files. */
static int wt_clean_quick(git_repository *wr) {
    git_index *idx = NULL;
    const char *wd = git_repository_workdir(wr);
    if (!wd || git_repository_index(&idx, wr) < 0 || index_changed(wr, idx)) {
        git_index_free(idx);
        git_error_clear();
        return 0;
    }
    struct stat ist;
    int clean = !git_index_has_conflicts(idx) && git_index_path(idx) && stat(git_index_path(idx), &ist) == 0;
    size_t n = git_index_entrycount(idx);
    char path[4096];
    for (size_t i = 0; clean && i < n; i++) {
        const git_index_entry *e = git_index_get_byindex(idx, i);
        clean = (e->mode == GIT_FILEMODE_BLOB || e->mode == GIT_FILEMODE_BLOB_EXECUTABLE) &&
                !(e->flags & GIT_INDEX_ENTRY_VALID) && !(e->flags_extended & GIT_INDEX_ENTRY_SKIP_WORKTREE) &&
                snprintf(path, sizeof path, "%s%s", wd, e->path) < (int)sizeof path &&
                entry_matches(e, path, &ist.st_mtim);
    }
    git_index_free(idx);
    if (clean) {
        int fd = open(wd, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        clean = fd >= 0 && count_files(fd, 1, 0) == (long)n;
    }
    git_error_clear();
    return clean;
}

/* libgit2 1.5 says a branch is checked out when a worktree it has just listed is
 * gone before it looks it up: its loop over the worktrees takes the failed lookup
 * for the answer "yes" (`error = lookup(...) < 0`). Several `factory run`s on one
 * repository add and remove worktrees all the time, so about one in six of their
 * worktree_add and branch_delete calls failed so. Here a worktree that cannot be
 * looked up, or whose HEAD cannot be read, is one going away or still being made:
 * it holds no branch. */
enum { CHECKOUT_RACE_TRIES = 20 };

static int head_is(git_repository *r, const char *refname) {
    git_reference *head = NULL;
    int is = git_reference_lookup(&head, r, "HEAD") == 0 && git_reference_type(head) == GIT_REFERENCE_SYMBOLIC &&
             strcmp(git_reference_symbolic_target(head), refname) == 0;
    git_reference_free(head);
    return is;
}

static int checked_out(git_repository *repo, const git_reference *ref) {
    const char *refname = git_reference_name(ref);
    int found = 0;
    if (!git_repository_is_worktree(repo)) {
        found = !git_repository_is_bare(repo) && head_is(repo, refname);
    } else {
        git_repository *main = NULL;
        if (git_repository_open(&main, git_repository_commondir(repo)) == 0)
            found = !git_repository_is_bare(main) && head_is(main, refname);
        git_repository_free(main);
    }
    git_strarray names = {0};
    if (!found && git_worktree_list(&names, repo) == 0) {
        for (size_t i = 0; i < names.count && !found; i++) {
            git_worktree *wt = NULL;
            git_repository *wr = NULL;
            if (git_worktree_lookup(&wt, repo, names.strings[i]) == 0 &&
                git_repository_open_from_worktree(&wr, wt) == 0)
                found = head_is(wr, refname);
            git_repository_free(wr);
            git_worktree_free(wt);
        }
        git_strarray_dispose(&names);
    }
    git_error_clear();
    return found;
}

/* Whether libgit2's last error is its claim that a branch is checked out. */
static int said_checked_out(void) {
    const git_error *e = git_error_last();
    return e && e->message && (strstr(e->message, "checked out") || strstr(e->message, "HEAD of a linked repository"));
}

/* Whether libgit2's last error is its mkdir of .git/worktrees finding it made meanwhile. */
static int said_dir_exists(void) {
    const git_error *e = git_error_last();
    return e && e->message && strstr(e->message, "failed to make directory") &&
           strstr(e->message, "/worktrees': directory exists");
}

static void race_pause(void) {
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    return type == FTW_DP ? rmdir(path) : unlink(path);
}

/* A worktree whose making was cut short (its process killed) can leave its
 * administrative directory, .git/worktrees/NAME, without the files libgit2 needs to
 * open it: libgit2 neither lists it nor removes it, and refuses to make NAME again.
 * Called only once lookup has failed, so it holds no worktree anyone can use. */
static void remove_unopenable_admin(git_repository *repo, const char *name) {
    char admin[4096];
    struct stat st;
    if (snprintf(admin, sizeof admin, "%sworktrees/%s", git_repository_commondir(repo), name) >= (int)sizeof admin ||
        strchr(name, '/') || lstat(admin, &st) != 0 || !S_ISDIR(st.st_mode))
        return;
    nftw(admin, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* The same for the lock a cut-short attempt held on the branch it was making: a
 * branch that does not exist is locked only by someone making it, and worktree_add's
 * caller owns the name. */
static void remove_stale_branch_lock(git_repository *repo, const char *name) {
    git_reference *ref = NULL;
    if (git_branch_lookup(&ref, repo, name, GIT_BRANCH_LOCAL) == 0) {
        git_reference_free(ref);
        return;
    }
    git_error_clear();
    char lock[4096];
    if (snprintf(lock, sizeof lock, "%srefs/heads/%s.lock", git_repository_commondir(repo), name) < (int)sizeof lock)
        unlink(lock);
}

static int gj_wt_add(git_job *j, git_repository *repo) {
    const char *name = j->s1, *path = j->s2, *base = j->s3 ? j->s3 : "HEAD";
    git_worktree *wt = NULL;
    if (git_worktree_lookup(&wt, repo, name) == 0) {
        git_worktree_free(wt);
        return gj_failf(j, "EEXISTS", "worktree '%s' already exists", name);
    }
    git_error_clear();
    remove_unopenable_admin(repo, name);
    remove_stale_branch_lock(repo, name);
    git_commit *c = NULL;
    if (gj_resolve_commit(j, repo, base, &c) < 0) return -1;
    git_reference *branch = NULL;
    int rc = git_branch_create(&branch, repo, name, c, 0);
    int filtered = rc < 0 || filters_may_apply(repo, c);
    git_commit_free(c);
    if (rc == GIT_EEXISTS) return gj_failf(j, "EEXISTS", "branch '%s' already exists", name);
    if (rc < 0) return gj_fail(j, rc, name);
    git_worktree_add_options o;
    git_worktree_add_options_init(&o, GIT_WORKTREE_ADD_OPTIONS_VERSION);
    o.ref = branch;
    o.checkout_options.disable_filters = !filtered;
    mkdir_parents(path);
    rc = git_worktree_add(&wt, repo, name, path, &o);
    /* The branch was made just now under a name no one else has: "already checked
     * out" can only be libgit2 tripping over another process's worktree (see
     * checked_out), and it refuses before it has made anything. Nor is
     * .git/worktrees, made by another process at the same moment, a reason to give up. */
    for (int tries = 0; rc < 0 && tries < CHECKOUT_RACE_TRIES &&
                        ((said_checked_out() && !checked_out(repo, branch)) || said_dir_exists());
         tries++) {
        race_pause();
        rc = git_worktree_add(&wt, repo, name, path, &o);
    }
    if (rc < 0) {
        gj_fail(j, rc, name);
        git_branch_delete(branch); /* leave nothing behind */
    } else {
        git_worktree_free(wt);
    }
    git_reference_free(branch);
    return rc < 0 ? -1 : 0;
}

/* A branch checked out anywhere (the main tree or a worktree) is refused: its
 * worktree would be left on a branch that no longer exists. */
static int gj_branch_delete(git_job *j, git_repository *repo) {
    git_reference *ref = NULL;
    int rc = git_branch_lookup(&ref, repo, j->s1, GIT_BRANCH_LOCAL);
    if (rc == GIT_ENOTFOUND) return gj_failf(j, "ENOTFOUND", "no branch named '%s'", j->s1);
    if (rc < 0) return gj_fail(j, rc, j->s1);
    if (checked_out(repo, ref)) {
        git_reference_free(ref);
        return gj_failf(j, "ELOCKED", "branch '%s' is checked out", j->s1);
    }
    rc = git_branch_delete(ref);
    for (int tries = 0; rc < 0 && tries < CHECKOUT_RACE_TRIES && said_checked_out() && !checked_out(repo, ref);
         tries++) {
        race_pause();
        rc = git_branch_delete(ref);
    }
    git_reference_free(ref);
    return rc < 0 ? gj_fail(j, rc, j->s1) : 0;
}

static int gj_wt_list(git_job *j, git_repository *repo) {
    git_strarray names = {0};
    int rc = git_worktree_list(&names, repo);
    if (rc < 0) return gj_fail(j, rc, "worktrees");
    for (size_t i = 0; i < names.count && !j->ecode; i++) {
        git_worktree *wt = NULL;
        if (git_worktree_lookup(&wt, repo, names.strings[i]) < 0) continue;
        git_row *r = gj_row(j);
        if (!r) {
            gj_oom(j);
        } else {
            r->a = gj_strdup(names.strings[i]);
            r->b = gj_strdup(git_worktree_path(wt));
            r->f1 = git_worktree_is_locked(NULL, wt) > 0;
            r->f2 = git_worktree_is_prunable(wt, NULL) > 0;
        }
        git_worktree_free(wt);
    }
    git_strarray_dispose(&names);
    return j->ecode ? -1 : 0;
}

/* Whether the worktree has changes, tracked or untracked: 1, 0, or -1 (failed). */
static int gj_wt_dirty(git_job *j, git_repository *repo, git_worktree *wt) {
    git_repository *wr = NULL;
    int rc = git_repository_open_from_worktree(&wr, wt);
    if (rc < 0) return 0; /* its directory is gone: nothing to lose */
    git_odb *odb = NULL;
    if (git_repository_odb(&odb, repo) == 0) git_repository_set_odb(wr, odb); /* its cache is warm */
    git_odb_free(odb);
    if (wt_clean_quick(wr)) {
        git_repository_free(wr);
        return 0;
    }
    git_status_options o;
    git_status_options_init(&o, GIT_STATUS_OPTIONS_VERSION);
    o.flags = GIT_STATUS_OPT_INCLUDE_UNTRACKED | GIT_STATUS_OPT_EXCLUDE_SUBMODULES;
    git_status_list *st = NULL;
    rc = git_status_list_new(&st, wr, &o);
    int dirty = rc < 0 ? gj_fail(j, rc, "status") : git_status_list_entrycount(st) > 0;
    git_status_list_free(st);
    git_repository_free(wr);
    return dirty;
}

static int gj_wt_remove(git_job *j, git_repository *repo) {
    git_worktree *wt = NULL;
    int rc = git_worktree_lookup(&wt, repo, j->s1);
    if (rc < 0) return gj_failf(j, "ENOTFOUND", "no worktree named '%s'", j->s1);
    if (!j->flag) {
        if (git_worktree_is_locked(NULL, wt) > 0) {
            git_worktree_free(wt);
            return gj_failf(j, "ELOCKED", "worktree '%s' is locked (use force)", j->s1);
        }
        int dirty = gj_wt_dirty(j, repo, wt);
        if (dirty) {
            git_worktree_free(wt);
            return dirty < 0 ? -1 : gj_failf(j, "EDIRTY", "worktree '%s' has changes (use force)", j->s1);
        }
    }
    git_worktree_prune_options o;
    git_worktree_prune_options_init(&o, GIT_WORKTREE_PRUNE_OPTIONS_VERSION);
    o.flags = GIT_WORKTREE_PRUNE_VALID | GIT_WORKTREE_PRUNE_WORKING_TREE | GIT_WORKTREE_PRUNE_LOCKED;
    rc = git_worktree_prune(wt, &o);
    git_worktree_free(wt);
    return rc < 0 ? gj_fail(j, rc, j->s1) : 0;
}

static int gj_wt_prune(git_job *j, git_repository *repo) {
    git_strarray names = {0};
    int rc = git_worktree_list(&names, repo);
    if (rc < 0) return gj_fail(j, rc, "worktrees");
    for (size_t i = 0; i < names.count && !j->ecode; i++) {
        git_worktree *wt = NULL;
        if (git_worktree_lookup(&wt, repo, names.strings[i]) < 0) continue;
        /* Default options: neither valid (directory present) nor locked ones. */
        if (git_worktree_is_prunable(wt, NULL) > 0) {
            rc = git_worktree_prune(wt, NULL);
            git_row *r = rc < 0 ? NULL : gj_row(j);
            if (rc < 0) gj_fail(j, rc, names.strings[i]);
            else if (!r) gj_oom(j);
            else r->a = gj_strdup(names.strings[i]);
        }
        git_worktree_free(wt);
    }
    git_strarray_dispose(&names);
    return j->ecode ? -1 : 0;
}

/* The porcelain "XY" code of a status entry, as `git status --porcelain` prints it. */
static void status_code(unsigned s, char xy[3]) {
    if (s & GIT_STATUS_CONFLICTED) {
        strcpy(xy, "UU");
        return;
    }
    if (s & GIT_STATUS_WT_NEW && !(s & (GIT_STATUS_INDEX_NEW | GIT_STATUS_INDEX_MODIFIED))) {
        strcpy(xy, "??");
        return;
    }
    xy[0] = s & GIT_STATUS_INDEX_NEW ? 'A' : s & GIT_STATUS_INDEX_MODIFIED ? 'M'
          : s & GIT_STATUS_INDEX_DELETED ? 'D' : s & GIT_STATUS_INDEX_RENAMED ? 'R'
          : s & GIT_STATUS_INDEX_TYPECHANGE ? 'T' : ' ';
    xy[1] = s & GIT_STATUS_WT_MODIFIED ? 'M' : s & GIT_STATUS_WT_DELETED ? 'D'
          : s & GIT_STATUS_WT_TYPECHANGE ? 'T' : s & GIT_STATUS_WT_RENAMED ? 'R' : ' ';
    xy[2] = 0;
}

static int gj_status(git_job *j, git_repository *repo) {
    git_status_options o;
    git_status_options_init(&o, GIT_STATUS_OPTIONS_VERSION);
    o.flags = GIT_STATUS_OPT_INCLUDE_UNTRACKED | GIT_STATUS_OPT_RECURSE_UNTRACKED_DIRS |
              GIT_STATUS_OPT_EXCLUDE_SUBMODULES | GIT_STATUS_OPT_SORT_CASE_SENSITIVELY;
    git_status_list *st = NULL;
    int rc = git_status_list_new(&st, repo, &o);
    if (rc < 0) return gj_fail(j, rc, "status");
    size_t n = git_status_list_entrycount(st);
    for (size_t i = 0; i < n && !j->ecode; i++) {
        const git_status_entry *e = git_status_byindex(st, i);
        if (e->status == GIT_STATUS_CURRENT || e->status & GIT_STATUS_IGNORED) continue;
        const git_diff_delta *d = e->head_to_index ? e->head_to_index : e->index_to_workdir;
        git_row *r = gj_row(j);
        if (!r) {
            gj_oom(j);
            break;
        }
        char xy[3];
        status_code(e->status, xy);
        r->a = gj_strdup(d->new_file.path ? d->new_file.path : d->old_file.path);
        r->b = strdup(xy);
    }
    git_status_list_free(st);
    return j->ecode ? -1 : 0;
}

/* The diff from base's tree (default HEAD) to the working directory, through the
 * index: what `git diff BASE` shows (tracked files only). */
static int gj_make_diff(git_job *j, git_repository *repo, git_diff **out) {
    const char *base = j->s1 ? j->s1 : "HEAD";
    git_commit *c = NULL;
    if (gj_resolve_commit(j, repo, base, &c) < 0) return -1;
    git_tree *tree = NULL;
    int rc = git_commit_tree(&tree, c);
    git_commit_free(c);
    if (rc < 0) return gj_fail(j, rc, base);
    git_diff_options o;
    git_diff_options_init(&o, GIT_DIFF_OPTIONS_VERSION);
    rc = git_diff_tree_to_workdir_with_index(out, repo, tree, &o);
    git_tree_free(tree);
    return rc < 0 ? gj_fail(j, rc, "diff") : 0;
}

static int gj_diff_stats(git_job *j, git_repository *repo) {
    git_diff *diff = NULL;
    if (gj_make_diff(j, repo, &diff) < 0) return -1;
    size_t n = git_diff_num_deltas(diff);
    for (size_t i = 0; i < n && !j->ecode; i++) {
        git_patch *p = NULL;
        int rc = git_patch_from_diff(&p, diff, i);
        if (rc < 0) {
            gj_fail(j, rc, "diff");
            break;
        }
        size_t ctx = 0, ins = 0, del = 0;
        if (p) git_patch_line_stats(&ctx, &ins, &del, p);
        const git_diff_delta *d = git_diff_get_delta(diff, i);
        git_row *r = gj_row(j);
        if (!r) {
            gj_oom(j);
        } else {
            r->a = gj_strdup(d->new_file.path ? d->new_file.path : d->old_file.path);
            r->x = (long)ins;
            r->y = (long)del;
            r->f1 = (d->flags & GIT_DIFF_FLAG_BINARY) != 0;
            j->n2 += (long)ins;
            j->n3 += (long)del;
        }
        git_patch_free(p);
    }
    j->n1 = (long)n;
    git_diff_free(diff);
    return j->ecode ? -1 : 0;
}

static int gj_diff(git_job *j, git_repository *repo) {
    git_diff *diff = NULL;
    if (gj_make_diff(j, repo, &diff) < 0) return -1;
    git_buf buf = GIT_BUF_INIT;
    int rc = git_diff_to_buf(&buf, diff, GIT_DIFF_FORMAT_PATCH);
    if (rc < 0) gj_fail(j, rc, "diff");
    else if (!(j->t1 = malloc(buf.size + 1))) gj_oom(j);
    else {
        memcpy(j->t1, buf.ptr ? buf.ptr : "", buf.size);
        j->t1[buf.size] = 0;
        j->n1 = (long)buf.size;
    }
    git_buf_dispose(&buf);
    git_diff_free(diff);
    return j->ecode ? -1 : 0;
}

/* add_all: like `git add -A` (new, changed and deleted files); add: the given paths,
 * a path missing from the working directory is removed from the index. */
static int gj_add(git_job *j, git_repository *repo) {
    git_index *idx = NULL;
    int rc = git_repository_index(&idx, repo);
    if (rc < 0) return gj_fail(j, rc, "index");
    if (j->op == OP_ADD_ALL) {
        char *all[] = {"*"};
        git_strarray spec = {all, 1};
        rc = git_index_add_all(idx, &spec, GIT_INDEX_ADD_DEFAULT, NULL, NULL);
        if (rc == 0) rc = git_index_update_all(idx, &spec, NULL, NULL);
        if (rc < 0) gj_fail(j, rc, "add");
    } else {
        const char *wd = git_repository_workdir(repo);
        for (size_t i = 0; i < j->npaths && !j->ecode; i++) {
            size_t need = strlen(wd ? wd : "") + strlen(j->paths[i]) + 1;
            char *full = malloc(need);
            if (!full) {
                gj_oom(j);
                break;
            }
            snprintf(full, need, "%s%s", wd ? wd : "", j->paths[i]);
            FILE *fp = fopen(full, "r");
            free(full);
            if (fp) fclose(fp);
            rc = fp ? git_index_add_bypath(idx, j->paths[i]) : git_index_remove_bypath(idx, j->paths[i]);
            if (rc < 0) gj_fail(j, rc, j->paths[i]);
        }
    }
    if (!j->ecode && (rc = git_index_write(idx)) < 0) gj_fail(j, rc, "index");
    git_index_free(idx);
    return j->ecode ? -1 : 0;
}

/* A signature from name/email, or from the repository's configuration (user.name,
 * user.email) when name is NULL. */
static int gj_signature(git_job *j, git_repository *repo, const char *name, const char *email,
                        git_signature **out) {
    int rc = name ? git_signature_now(out, name, email ? email : "") : git_signature_default(out, repo);
    if (rc < 0 && !name)
        return gj_failf(j, "EGIT", "commit: no author given and no user.name/user.email configured");
    return rc < 0 ? gj_fail(j, rc, "signature") : 0;
}

static int gj_commit(git_job *j, git_repository *repo) {
    git_signature *author = NULL, *committer = NULL;
    git_index *idx = NULL;
    git_tree *tree = NULL;
    git_commit *parent = NULL;
    git_oid tree_id, oid;
    int rc;
    if (gj_signature(j, repo, j->an, j->ae, &author) < 0) goto out;
    if (j->cn ? gj_signature(j, repo, j->cn, j->ce, &committer) < 0
              : git_signature_dup(&committer, author) < 0)
        goto out;
    if ((rc = git_repository_index(&idx, repo)) < 0 || (rc = git_index_write_tree(&tree_id, idx)) < 0 ||
        (rc = git_tree_lookup(&tree, repo, &tree_id)) < 0) {
        gj_fail(j, rc, "commit");
        goto out;
    }
    git_object *head = NULL;
    rc = git_revparse_single(&head, repo, "HEAD^{commit}");
    if (rc == 0) parent = (git_commit *)head;
    else if (rc != GIT_ENOTFOUND) {
        gj_fail(j, rc, "HEAD");
        goto out;
    }
    const git_commit *parents[] = {parent};
    rc = git_commit_create(&oid, repo, "HEAD", author, committer, NULL, j->s1, tree, parent ? 1 : 0, parents);
    if (rc < 0) {
        gj_fail(j, rc, "commit");
        goto out;
    }
    char hex[GIT_OID_HEXSZ + 1];
    oid_hex(&oid, hex);
    j->t1 = strdup(hex);
out:
    git_commit_free(parent);
    git_tree_free(tree);
    git_index_free(idx);
    git_signature_free(author);
    git_signature_free(committer);
    return j->ecode ? -1 : 0;
}

static int gj_branches(git_job *j, git_repository *repo) {
    git_branch_iterator *it = NULL;
    int rc = git_branch_iterator_new(&it, repo, GIT_BRANCH_LOCAL);
    if (rc < 0) return gj_fail(j, rc, "branches");
    git_reference *ref;
    git_branch_t type;
    while (!j->ecode && git_branch_next(&ref, &type, it) == 0) {
        const char *name = NULL;
        git_branch_name(&name, ref);
        git_row *r = gj_row(j);
        if (!r) {
            gj_oom(j);
        } else {
            r->a = gj_strdup(name);
            const git_oid *oid = git_reference_target(ref);
            if (oid) {
                char hex[GIT_OID_HEXSZ + 1];
                oid_hex(oid, hex);
                r->b = strdup(hex);
            }
            r->f1 = git_branch_is_head(ref) > 0;
        }
        git_reference_free(ref);
    }
    git_branch_iterator_free(it);
    return j->ecode ? -1 : 0;
}

/* A named remote, or an anonymous one for a path or URL. */
static int gj_remote(git_job *j, git_repository *repo, git_remote **out) {
    int rc = git_remote_lookup(out, repo, j->s1);
    if (rc == GIT_ENOTFOUND || rc == GIT_EINVALIDSPEC) {
        if (!strchr(j->s1, '/')) return gj_failf(j, "ENOTFOUND", "no remote named '%s'", j->s1);
        rc = git_remote_create_anonymous(out, repo, j->s1);
    }
    return rc < 0 ? gj_fail(j, rc, j->s1) : 0;
}

static int gj_fetch(git_job *j, git_repository *repo) {
    git_remote *remote = NULL;
    if (gj_remote(j, repo, &remote) < 0) return -1;
    git_fetch_options o;
    git_fetch_options_init(&o, GIT_FETCH_OPTIONS_VERSION);
    int rc = git_remote_fetch(remote, NULL, &o, NULL);
    if (rc < 0) gj_fail(j, rc, j->s1);
    git_remote_free(remote);
    return j->ecode ? -1 : 0;
}

static int gj_push_remote(git_job *j, git_repository *repo) {
    git_remote *remote = NULL;
    if (gj_remote(j, repo, &remote) < 0) return -1;
    git_push_options o;
    git_push_options_init(&o, GIT_PUSH_OPTIONS_VERSION);
    char *specs[] = {j->s2};
    git_strarray refspecs = {specs, 1};
    int rc = git_remote_push(remote, &refspecs, &o);
    if (rc < 0) gj_fail(j, rc, j->s1);
    git_remote_free(remote);
    return j->ecode ? -1 : 0;
}

static int gj_remote_add(git_job *j, git_repository *repo) {
    git_remote *remote = NULL;
    int rc = git_remote_create(&remote, repo, j->s1, j->s2);
    if (rc == GIT_EEXISTS) return gj_failf(j, "EEXISTS", "remote '%s' already exists", j->s1);
    if (rc < 0) return gj_fail(j, rc, j->s1);
    git_remote_free(remote);
    return 0;
}

/* Whether each path (relative to the working directory; a directory's with a
 * trailing slash) is ignored by the repository's ignore rules. */
static void gj_ignored(git_job *j, git_repository *repo) {
    for (size_t i = 0; i < j->npaths && !j->ecode; i++) {
        int ignored = 0;
        int rc = git_ignore_path_is_ignored(&ignored, repo, j->paths[i]);
        git_row *r = gj_row(j);
        if (!r) gj_oom(j);
        else if (rc < 0) gj_fail(j, rc, j->paths[i]);
        else r->f1 = ignored;
    }
}

static void gj_run(git_job *j) {
    if (!j->h) {
        if (j->op == OP_OPEN) gj_open(j);
        else gj_init(j);
        return;
    }
    uv_mutex_lock(&j->h->lock);
    git_repository *repo = j->h->repo;
    switch (j->op) {
    case OP_HEAD: gj_head(j, repo); break;
    case OP_WT_ADD: gj_wt_add(j, repo); break;
    case OP_WT_LIST: gj_wt_list(j, repo); break;
    case OP_WT_REMOVE: gj_wt_remove(j, repo); break;
    case OP_WT_PRUNE: gj_wt_prune(j, repo); break;
    case OP_STATUS: gj_status(j, repo); break;
    case OP_DIFF_STATS: gj_diff_stats(j, repo); break;
    case OP_DIFF: gj_diff(j, repo); break;
    case OP_ADD_ALL:
    case OP_ADD: gj_add(j, repo); break;
    case OP_COMMIT: gj_commit(j, repo); break;
    case OP_BRANCHES: gj_branches(j, repo); break;
    case OP_FETCH: gj_fetch(j, repo); break;
    case OP_PUSH: gj_push_remote(j, repo); break;
    case OP_REMOTE_ADD: gj_remote_add(j, repo); break;
    case OP_BRANCH_DELETE: gj_branch_delete(j, repo); break;
    case OP_IGNORED: gj_ignored(j, repo); break;
    default: break;
    }
    uv_mutex_unlock(&j->h->lock);
}

/* ---- handles and jobs (loop thread) ------------------------------------------ */

static void handle_unref(git_handle *h) {
    if (--h->refs > 0) return;
    git_repository_free(h->repo);
    uv_mutex_destroy(&h->lock);
    free(h);
}

static void gj_free(git_job *j) {
    if (j->h) handle_unref(j->h);
    if (j->newrepo) git_repository_free(j->newrepo);
    free(j->s1);
    free(j->s2);
    free(j->s3);
    free(j->an);
    free(j->ae);
    free(j->cn);
    free(j->ce);
    for (size_t i = 0; i < j->npaths; i++) free(j->paths[i]);
    free(j->paths);
    free(j->t1);
    free(j->t2);
    for (size_t i = 0; i < j->nrows; i++) {
        free(j->rows[i].a);
        free(j->rows[i].b);
    }
    free(j->rows);
    free(j->emsg);
    free(j);
}

static void push_repo(lua_State *L, git_repository *repo) {
    git_handle **ud = (git_handle **)lua_newuserdata(L, sizeof *ud);
    *ud = NULL;
    luaL_getmetatable(L, REPO_MT);
    lua_setmetatable(L, -2);
    git_handle *h = calloc(1, sizeof *h);
    if (!h || uv_mutex_init(&h->lock) != 0) {
        free(h);
        git_repository_free(repo);
        luaL_error(L, "git: out of memory");
    }
    h->repo = repo;
    h->refs = 1;
    *ud = h;
}

static void set_str(lua_State *L, const char *k, const char *v) {
    if (!v) return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, long v) {
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static void set_bool(lua_State *L, const char *k, int v) {
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

/* Pushes the job's results (or its failure) onto L. */
static int gj_push(lua_State *L, git_job *j) {
    if (j->ecode) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", j->ecode, j->emsg ? j->emsg : "failed");
        lua_pushstring(L, j->ecode);
        return 3;
    }
    switch (j->op) {
    case OP_OPEN:
    case OP_INIT: {
        git_repository *r = j->newrepo;
        j->newrepo = NULL;
        push_repo(L, r);
        return 1;
    }
    case OP_HEAD:
        lua_createtable(L, 0, 2);
        set_str(L, "branch", j->t1);
        set_str(L, "oid", j->t2);
        return 1;
    case OP_COMMIT:
    case OP_DIFF:
        lua_pushlstring(L, j->t1, j->op == OP_DIFF ? (size_t)j->n1 : strlen(j->t1));
        return 1;
    case OP_DIFF_STATS:
        lua_createtable(L, 0, 4);
        set_int(L, "files", j->n1);
        set_int(L, "insertions", j->n2);
        set_int(L, "deletions", j->n3);
        lua_createtable(L, (int)j->nrows, 0);
        for (size_t i = 0; i < j->nrows; i++) {
            lua_createtable(L, 0, 4);
            set_str(L, "path", j->rows[i].a);
            set_int(L, "insertions", j->rows[i].x);
            set_int(L, "deletions", j->rows[i].y);
            if (j->rows[i].f1) set_bool(L, "binary", 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        lua_setfield(L, -2, "per_file");
        return 1;
    case OP_IGNORED:
        lua_createtable(L, (int)j->nrows, 0);
        for (size_t i = 0; i < j->nrows; i++) {
            lua_pushboolean(L, j->rows[i].f1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        return 1;
    case OP_WT_LIST:
    case OP_WT_PRUNE:
    case OP_STATUS:
    case OP_BRANCHES:
        lua_createtable(L, (int)j->nrows, 0);
        for (size_t i = 0; i < j->nrows; i++) {
            git_row *r = &j->rows[i];
            if (j->op == OP_WT_PRUNE) {
                lua_pushstring(L, r->a);
            } else {
                lua_createtable(L, 0, 4);
                set_str(L, j->op == OP_STATUS ? "path" : "name", r->a);
                set_str(L, j->op == OP_WT_LIST ? "path" : j->op == OP_STATUS ? "status" : "oid", r->b);
                if (j->op == OP_WT_LIST) {
                    set_bool(L, "locked", r->f1);
                    set_bool(L, "prunable", r->f2);
                } else if (j->op == OP_BRANCHES) {
                    set_bool(L, "head", r->f1);
                }
            }
            lua_rawseti(L, -2, (int)i + 1);
        }
        return 1;
    default:
        lua_pushboolean(L, 1);
        return 1;
    }
}

static void gj_work_cb(uv_work_t *req) { gj_run((git_job *)req->data); }

static void gj_after_cb(uv_work_t *req, int status) {
    git_job *j = (git_job *)req->data;
    fb_fiber *f = j->fiber;
    if (!f) {
        gj_free(j);
        return;
    }
    lua_State *co = fb_co(f);
    lua_checkstack(co, 8);
    int n = status < 0 ? fb_push_uv_error(co, status, "git") : gj_push(co, j);
    gj_free(j);
    fb_wake(f, n);
}

static void gj_abort(void *op) { ((git_job *)op)->fiber = NULL; }

/* Runs j inline outside a fiber, on the thread pool inside one; frees j. */
static int gj_start(lua_State *L, git_job *j) {
    fb_fiber *f = fb_current(L);
    j->req.data = j;
    if (f && !fb_closing()) {
        j->fiber = f;
        if (uv_queue_work(fb_loop(), &j->req, gj_work_cb, gj_after_cb) == 0) return fb_await(L, f, gj_abort, j, 0);
        j->fiber = NULL;
    }
    gj_run(j);
    int n = gj_push(L, j);
    gj_free(j);
    return n;
}

/* ---- argument checks (raise before anything is allocated) --------------------- */

static const char *check_str(lua_State *L, int idx) {
    size_t len;
    const char *s = luaL_checklstring(L, idx, &len);
    if (len == 0) luaL_argerror(L, idx, "empty string");
    if (strlen(s) != len) luaL_argerror(L, idx, "contains a NUL byte");
    return s;
}

static const char *opt_str(lua_State *L, int idx) { return lua_isnoneornil(L, idx) ? NULL : check_str(L, idx); }

static git_handle *check_repo(lua_State *L) {
    git_handle **ud = (git_handle **)luaL_checkudata(L, 1, REPO_MT);
    if (!*ud) luaL_argerror(L, 1, "repository is closed");
    return *ud;
}

/* A string field of the options table at idx (nil if absent); raises if not a string. */
static const char *opt_field(lua_State *L, int idx, const char *k) {
    if (!lua_istable(L, idx)) return NULL;
    lua_getfield(L, idx, k);
    const char *s = NULL;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "git: option '%s' must be a string", k);
        s = lua_tostring(L, -1);
    }
    lua_pop(L, 1); /* still referenced by the table */
    return s;
}

static int opt_flag(lua_State *L, int idx, const char *k) {
    if (!lua_istable(L, idx)) return 0;
    lua_getfield(L, idx, k);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

static void check_opts(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TTABLE);
}

static git_job *gj_new(lua_State *L, git_handle *h, int op) {
    git_job *j = calloc(1, sizeof *j);
    if (!j) luaL_error(L, "git: out of memory");
    j->op = op;
    if (h) {
        j->h = h;
        h->refs++;
    }
    return j;
}

/* Copies strings into a new job; raises (freeing the job) on out of memory. */
static git_job *gj_new_s(lua_State *L, git_handle *h, int op, const char *s1, const char *s2, const char *s3) {
    git_job *j = gj_new(L, h, op);
    if ((s1 && !(j->s1 = strdup(s1))) || (s2 && !(j->s2 = strdup(s2))) || (s3 && !(j->s3 = strdup(s3)))) {
        gj_free(j);
        luaL_error(L, "git: out of memory");
    }
    return j;
}

/* ---- Lua functions -------------------------------------------------------------- */

static int git_open(lua_State *L) { return gj_start(L, gj_new_s(L, NULL, OP_OPEN, check_str(L, 1), NULL, NULL)); }

static int git_init(lua_State *L) {
    const char *path = check_str(L, 1);
    check_opts(L, 2);
    const char *branch = opt_field(L, 2, "initial_branch");
    git_job *j = gj_new_s(L, NULL, OP_INIT, path, branch, NULL);
    j->flag = opt_flag(L, 2, "bare");
    return gj_start(L, j);
}

static int repo_simple(lua_State *L, int op) { return gj_start(L, gj_new(L, check_repo(L), op)); }
static int repo_head(lua_State *L) { return repo_simple(L, OP_HEAD); }
static int repo_worktrees(lua_State *L) { return repo_simple(L, OP_WT_LIST); }
static int repo_prune(lua_State *L) { return repo_simple(L, OP_WT_PRUNE); }
static int repo_status(lua_State *L) { return repo_simple(L, OP_STATUS); }
static int repo_add_all(lua_State *L) { return repo_simple(L, OP_ADD_ALL); }
static int repo_branches(lua_State *L) { return repo_simple(L, OP_BRANCHES); }

static int repo_worktree_add(lua_State *L) {
    git_handle *h = check_repo(L);
    const char *name = check_str(L, 2), *path = check_str(L, 3);
    check_opts(L, 4);
    const char *base = opt_field(L, 4, "base");
    return gj_start(L, gj_new_s(L, h, OP_WT_ADD, name, path, base));
}

static int repo_worktree_remove(lua_State *L) {
    git_handle *h = check_repo(L);
    const char *name = check_str(L, 2);
    check_opts(L, 3);
    git_job *j = gj_new_s(L, h, OP_WT_REMOVE, name, NULL, NULL);
    j->flag = opt_flag(L, 3, "force");
    return gj_start(L, j);
}

static int repo_branch_delete(lua_State *L) {
    git_handle *h = check_repo(L);
    return gj_start(L, gj_new_s(L, h, OP_BRANCH_DELETE, check_str(L, 2), NULL, NULL));
}

static int repo_diff_stats(lua_State *L) {
    git_handle *h = check_repo(L);
    return gj_start(L, gj_new_s(L, h, OP_DIFF_STATS, opt_str(L, 2), NULL, NULL));
}

static int repo_diff(lua_State *L) {
    git_handle *h = check_repo(L);
    return gj_start(L, gj_new_s(L, h, OP_DIFF, opt_str(L, 2), NULL, NULL));
}

/* A job of op on the list of non-empty paths at index 2. */
static int paths_job(lua_State *L, git_handle *h, int op) {
    luaL_checktype(L, 2, LUA_TTABLE);
    size_t n = lua_objlen(L, 2);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, 2, (int)i);
        if (lua_type(L, -1) != LUA_TSTRING || lua_objlen(L, -1) == 0)
            luaL_argerror(L, 2, "expected a list of non-empty path strings");
        lua_pop(L, 1);
    }
    git_job *j = gj_new(L, h, op);
    j->paths = calloc(n ? n : 1, sizeof *j->paths);
    int oom = !j->paths;
    for (size_t i = 1; i <= n && !oom; i++) {
        lua_rawgeti(L, 2, (int)i);
        if (!(j->paths[j->npaths] = strdup(lua_tostring(L, -1)))) oom = 1;
        else j->npaths++;
        lua_pop(L, 1);
    }
    if (oom) {
        gj_free(j);
        luaL_error(L, "git: out of memory");
    }
    return gj_start(L, j);
}

static int repo_add(lua_State *L) { return paths_job(L, check_repo(L), OP_ADD); }
static int repo_ignored(lua_State *L) { return paths_job(L, check_repo(L), OP_IGNORED); }

/* Reads {name=, email=} at options[k] into name and email (NULL if absent). */
static void opt_person(lua_State *L, int idx, const char *k, const char **name, const char **email) {
    *name = *email = NULL;
    if (!lua_istable(L, idx)) return;
    lua_getfield(L, idx, k);
    if (!lua_isnil(L, -1)) {
        if (!lua_istable(L, -1)) luaL_error(L, "git: option '%s' must be a table {name=, email=}", k);
        int t = lua_gettop(L);
        *name = opt_field(L, t, "name");
        *email = opt_field(L, t, "email");
        if (!*name || !*email) luaL_error(L, "git: option '%s' needs name and email", k);
    }
    lua_pop(L, 1);
}

static int repo_commit(lua_State *L) {
    git_handle *h = check_repo(L);
    const char *msg = check_str(L, 2);
    check_opts(L, 3);
    const char *an, *ae, *cn, *ce;
    opt_person(L, 3, "author", &an, &ae);
    opt_person(L, 3, "committer", &cn, &ce);
    git_job *j = gj_new_s(L, h, OP_COMMIT, msg, NULL, NULL);
    if ((an && !(j->an = strdup(an))) || (ae && !(j->ae = strdup(ae))) || (cn && !(j->cn = strdup(cn))) ||
        (ce && !(j->ce = strdup(ce)))) {
        gj_free(j);
        luaL_error(L, "git: out of memory");
    }
    return gj_start(L, j);
}

static int repo_fetch(lua_State *L) {
    git_handle *h = check_repo(L);
    return gj_start(L, gj_new_s(L, h, OP_FETCH, check_str(L, 2), NULL, NULL));
}

static int repo_push(lua_State *L) {
    git_handle *h = check_repo(L);
    const char *remote = check_str(L, 2), *spec = check_str(L, 3);
    return gj_start(L, gj_new_s(L, h, OP_PUSH, remote, spec, NULL));
}

static int repo_remote_add(lua_State *L) {
    git_handle *h = check_repo(L);
    const char *name = check_str(L, 2), *url = check_str(L, 3);
    return gj_start(L, gj_new_s(L, h, OP_REMOTE_ADD, name, url, NULL));
}

static int repo_path(lua_State *L) {
    git_handle *h = check_repo(L);
    /* Only the loop thread reads these: set at open, never changed by a job. */
    const char *wd = git_repository_workdir(h->repo);
    lua_pushstring(L, wd ? wd : git_repository_path(h->repo));
    return 1;
}

/* Idempotent; a job still running keeps the repository until it is done. */
static int repo_close(lua_State *L) {
    git_handle **ud = (git_handle **)luaL_checkudata(L, 1, REPO_MT);
    if (*ud) {
        handle_unref(*ud);
        *ud = NULL;
    }
    return 0;
}

static int repo_tostring(lua_State *L) {
    git_handle **ud = (git_handle **)luaL_checkudata(L, 1, REPO_MT);
    lua_pushfstring(L, "git repository (%s)", *ud ? "open" : "closed");
    return 1;
}

static int sentinel_gc(lua_State *L) {
    git_libgit2_shutdown();
    return 0;
}

#if defined(__SANITIZE_ADDRESS__)
#define GIT_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GIT_LSAN 1
#endif
#endif
#ifdef GIT_LSAN
/* Sanitizer builds only. libgit2 1.5's git_regexp_match (src/util/regexp.c) returns
 * without pcre2_match_data_free when a pattern does not match; config iteration
 * (remotes, branch sections) hits it. LeakSanitizer reads this hook at exit; the
 * only suppressed allocations are pcre2's, which nothing else in the engine uses. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libpcre2-8.so\n"; }
#endif

static const luaL_Reg repo_methods[] = {
    {"head",            repo_head},
    {"worktree_add",    repo_worktree_add},
    {"worktrees",       repo_worktrees},
    {"worktree_remove", repo_worktree_remove},
    {"prune_worktrees", repo_prune},
    {"status",          repo_status},
    {"diff_stats",      repo_diff_stats},
    {"diff",            repo_diff},
    {"add_all",         repo_add_all},
    {"add",             repo_add},
    {"commit",          repo_commit},
    {"branches",        repo_branches},
    {"branch_delete",   repo_branch_delete},
    {"ignored",         repo_ignored},
    {"remote_add",      repo_remote_add},
    {"fetch",           repo_fetch},
    {"push",            repo_push},
    {"path",            repo_path},
    {"close",           repo_close},
    {NULL, NULL},
};

static const luaL_Reg git_functions[] = {
    {"open", git_open},
    {"init", git_init},
    {NULL, NULL},
};

int luaopen_factory_core_git(lua_State *L) {
    if (luaL_newmetatable(L, SENTINEL_MT)) {
        /* First load in this state: libgit2's global state lives until lua_close. */
        git_libgit2_init();
        lua_pushcfunction(L, sentinel_gc);
        lua_setfield(L, -2, "__gc");
        lua_newuserdata(L, 1);
        lua_pushvalue(L, -2);
        lua_setmetatable(L, -2);
        lua_setfield(L, LUA_REGISTRYINDEX, "factory.git.sentinel.instance");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, REPO_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, repo_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, repo_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, repo_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, git_functions);
    return 1;
}
