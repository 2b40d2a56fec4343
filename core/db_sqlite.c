/* core/db_sqlite.c — factory.core.db_sqlite: SQLite connections for lua/factory/db.lua.
 *
 *   open(path [, {create_dir=, busy_timeout_ms=, reader=}]) -> conn | nil, err, code
 *       reader = true: a connection only read through (see "Reads" below)
 *   conn:run(sql, params, n)  -> rows, {changes=, last_id=, json={col...}} | nil, err, code
 *   conn:script(sql)          -> true | nil, err, code   (several statements, no parameters)
 *   conn:inline(on)           -> true   (see below)
 *   conn:try(sql)             -> true | nil, err, code   (a script run now, never waiting)
 *   conn:batch({ {sql, params, n [, if_rows = k [, min_rows = m]]}, ... })
 *                             -> { {rows, meta} | {nil, err, code}, ... }
 *       the statements as one job: one pool round trip instead of one each, and one
 *       read transaction, so every statement sees the same snapshot. if_rows = k: the
 *       statement runs only if statement k (an earlier one) returned at least m rows
 *       (default 1); otherwise it returns no rows (a read that could not find
 *       anything, or that the earlier one made needless, is not made).
 *   conn:close()              -> true
 *
 * Every SQLite call runs on libuv's thread pool: a statement may wait up to the busy
 * timeout for another process's lock, and a commit waits for fsync, neither of which
 * may stall the event loop. A connection runs one job at a time and queues the rest,
 * so the sqlite3 handle is only ever used by one thread at once (hence NOMUTEX).
 * Outside a fiber (nothing could wait) the job runs inline on the calling thread.
 * conn:inline(true) makes every job run inline, in fibers too: the Lua layer turns it
 * on while it holds the write lock (after BEGIN IMMEDIATE, before COMMIT), when a
 * statement can wait for no other process and a pool round trip would only add two
 * thread switches to a few microseconds of work.
 * conn:try(sql) runs a script inline with no busy wait: EBUSY, at once, when another
 * process holds the lock it needs or a job of this connection is still queued. The
 * Lua layer takes the write lock (BEGIN IMMEDIATE) this way first, and only when it
 * is taken queues the BEGIN for the pool to wait out the busy timeout there.
 *
 * Reads: on a reader connection, statements and batches queued behind each other
 * (several fibers reading at once) run as one pool job, in one read transaction: one
 * round trip, and one snapshot whose pages the later reads find in the cache (a
 * connection's cache is dropped whenever another one commits). Each read still sees
 * only what was committed before it was made. A read known to be quick runs inline
 * instead, when nothing is queued (see "quick reads" below).
 *
 * Statements are prepared once per connection and kept (STMT_CACHE of them, the
 * least recently used replaced): the engine repeats the same few dozen texts.
 *
 *   conn:sync()               -> true | nil, err, code
 *       waits until every commit this connection has made is on disk (see below)
 *   conn:sync_stats()         -> { commits =, synced =, syncs = }
 *
 * Durability: WAL, and every commit on disk before the caller is told it committed,
 * so a stage result or queue completion reported committed is never lost, even to a
 * power loss. SQLite's synchronous=FULL would fsync the WAL inside COMMIT, holding
 * the write lock all the while: nothing else can write during any fsync. Instead the
 * connection runs synchronous=NORMAL (SQLite still syncs the WAL's header when it
 * restarts it, and the WAL and the database around each checkpoint), counts its
 * commits (a WAL hook, which also runs the usual checkpoint at 1000 pages), and
 * conn:sync() fdatasyncs the WAL file on the pool, outside the connection's queue:
 * the next transaction writes while the last one's sync runs, and one sync covers
 * every commit made before it started. The Lua layer calls it after each commit
 * before returning to the writer. A commit is visible to readers a moment before it
 * is on disk; anything they write because of it comes later in the WAL, which a
 * recovery replays only as an unbroken prefix. A sync that fails (or a WAL that was
 * deleted) fails every later one too: writes after it may be lost, and saying so
 * each time is better than a later sync's success that would hide it. Closing
 * syncs what is left.
 *
 * Values: INTEGER -> integer, REAL -> number, TEXT and BLOB -> string, NULL -> key
 * absent; a column declared BOOLEAN -> boolean. Columns declared JSON/JSONB come back
 * as strings and are listed in meta.json for the Lua layer to decode.
 *
 * Lifetimes: the userdata holds a pointer to the C-owned connection. Closing (or
 * __gc) queues a close job behind any running one, so a worker thread never sees
 * the handle freed; the connection is freed when that job completes.
 */
#include "fiber.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <math.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CONN_MT "factory.sqlite"

enum { JOB_OPEN, JOB_RUN, JOB_SCRIPT, JOB_CLOSE, JOB_BATCH };
enum { COL_PLAIN, COL_BOOL, COL_JSON };

typedef struct {
    int type; /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL */
    sqlite3_int64 i;
    double d;
    char *s;
    size_t n;
} sq_value;

typedef struct sq_conn sq_conn;

typedef struct sq_job {
    uv_work_t req;
    sq_conn *conn;
    struct sq_job *next;
    fb_fiber *fiber;
    int kind;
    char *sql;
    sq_value *params;
    int nparams;
    /* results, filled on the worker thread */
    int ncols;
    char **names;
    unsigned char *colkind;
    sq_value *cells;
    size_t ncells, cap;
    sqlite3_int64 changes, last_id;
    int has_last_id;
    const char *code; /* NULL on success */
    char *msg;
    struct sq_job **parts; /* JOB_BATCH: its JOB_RUN statements, run in order */
    int nparts;
    int if_rows;  /* a batch part: run only if part if_rows (1-based) returned rows; 0: always */
    int min_rows; /* ... at least this many (>= 1) */
    int train;   /* the head of a reader's train: it and the train - 1 jobs after it run as one */
    int borrowed; /* sql and the text parameters point into Lua strings (a job run inline) */
    int waits_out; /* a quick read sent to the pool by a busy lock: its wait is not its cost */
} sq_job;

enum { STMT_CACHE = 64, MAX_TRAIN = 32 };

typedef struct {
    char *sql; /* NULL: a free slot */
    uint64_t hash, used;
    sqlite3_stmt *st;
    double cost; /* seconds a run of it takes (read_clock; moving average); 0: not run yet */
} sq_cached;

/* A fiber waiting in conn:sync() for the commits up to `need` to be on disk. */
typedef struct sq_sync_wait {
    struct sq_sync_wait *next, *prev;
    sq_conn *conn;
    fb_fiber *fiber;
    uint64_t need;
    int nresults;   /* pushed onto the fiber's stack once settled */
} sq_sync_wait;

struct sq_conn {
    sqlite3 *db;
    char *path;
    int create_dir, busy_ms, inline_jobs, reader;
    int busy_now;        /* the busy timeout in force: busy_ms, or 0 for a try or a quick read */
    int quick_inline;    /* running a quick read inline (see "quick reads") */
    int quick_deferred;  /* ... which met a statement never run before: it goes to the pool */
    sq_job *head, *tail; /* head is the running job */
    sq_cached cache[STMT_CACHE];
    uint64_t clock;
    /* Durability (see the top). commits and synced are read and written with
     * __atomic builtins: the WAL hook runs on whichever thread commits. */
    uint64_t commits, synced;
    uint64_t syncs;         /* fdatasync calls made */
    char *wal_path;         /* NULL on a reader */
    int wal_fd;             /* the sync job's own descriptor of the WAL; -1 until needed */
    int syncing;            /* a sync job is in flight (it owns wal_fd meanwhile) */
    int sync_errno;         /* a sync failed: every later one fails too */
    int free_pending;       /* closed while a sync was in flight: freed when it ends */
    uv_work_t sync_req;
    uint64_t sync_target;   /* the commits the running sync covers */
    int sync_result;        /* its errno, 0 on success */
    sq_sync_wait *waiters;
};

/* ---- errors ------------------------------------------------------------------ */

static const char *code_for(int rc) {
    switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return "EBUSY";
    case SQLITE_CONSTRAINT: return "ECONSTRAINT";
    case SQLITE_NOTADB: return "ENOTDB";
    case SQLITE_CORRUPT: return "ECORRUPT";
    case SQLITE_FULL: return "ENOSPC";
    case SQLITE_READONLY: return "EROFS";
    case SQLITE_CANTOPEN: return "ECANTOPEN";
    default: return "ESQL";
    }
}

static void job_fail(sq_job *j, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void job_fail(sq_job *j, const char *code, const char *fmt, ...) {
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    j->code = code;
    free(j->msg);
    j->msg = strdup(buf);
}

/* A lock that stayed busy names the file and how long it was waited for: "database
 * is locked" alone does not say which database, nor that another process holds it. */
static void job_fail_text(sq_job *j, int rc, const char *text) {
    sq_conn *c = j->conn;
    if (!strcmp(code_for(rc), "EBUSY"))
        job_fail(j, "EBUSY", "%s: %s (another connection held the lock for over %d ms)", c->path, text, c->busy_now);
    else
        job_fail(j, code_for(rc), "%s", text);
}

static void job_fail_db(sq_job *j, int rc) {
    job_fail_text(j, rc, j->conn->db ? sqlite3_errmsg(j->conn->db) : sqlite3_errstr(rc));
}

static void set_busy(sq_conn *c, int ms) {
    c->busy_now = ms;
    sqlite3_busy_timeout(c->db, ms);
}

/* ---- values -------------------------------------------------------------------- */

static void value_free(sq_value *v) {
    free(v->s);
    v->s = NULL;
}

static char *dup_bytes(const void *p, size_t n) {
    char *s = (char *)malloc(n + 1);
    if (!s) return NULL;
    if (n) memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

static int add_cell(sq_job *j, sqlite3_stmt *st, int col) {
    if (j->ncells == j->cap) {
        size_t cap = j->cap ? j->cap * 2 : 64;
        sq_value *cells = (sq_value *)realloc(j->cells, cap * sizeof *cells);
        if (!cells) return 0;
        j->cells = cells;
        j->cap = cap;
    }
    sq_value *v = &j->cells[j->ncells++];
    memset(v, 0, sizeof *v);
    v->type = sqlite3_column_type(st, col);
    switch (v->type) {
    case SQLITE_INTEGER: v->i = sqlite3_column_int64(st, col); break;
    case SQLITE_FLOAT: v->d = sqlite3_column_double(st, col); break;
    case SQLITE_TEXT:
    case SQLITE_BLOB: {
        const void *p = v->type == SQLITE_TEXT ? (const void *)sqlite3_column_text(st, col)
                                               : sqlite3_column_blob(st, col);
        v->n = (size_t)sqlite3_column_bytes(st, col);
        v->s = dup_bytes(p ? p : "", v->n);
        if (!v->s) return 0;
        break;
    }
    default: break;
    }
    return 1;
}

static int decl_kind(const char *decl) {
    if (!decl) return COL_PLAIN;
    if (!strcasecmp(decl, "JSON") || !strcasecmp(decl, "JSONB")) return COL_JSON;
    if (!strcasecmp(decl, "BOOLEAN") || !strcasecmp(decl, "BOOL")) return COL_BOOL;
    return COL_PLAIN;
}

static int bind_value(sqlite3_stmt *st, int i, const sq_value *v) {
    switch (v->type) {
    case SQLITE_INTEGER: return sqlite3_bind_int64(st, i, v->i);
    case SQLITE_FLOAT: return sqlite3_bind_double(st, i, v->d);
    case SQLITE_TEXT: return sqlite3_bind_text(st, i, v->s, (int)v->n, SQLITE_STATIC);
    default: return sqlite3_bind_null(st, i);
    }
}

/* ---- the work, on a pool thread (or inline) ------------------------------------ */

static int dir_missing(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash || slash == path) return 0;
    char *dir = dup_bytes(path, (size_t)(slash - path));
    struct stat sb;
    int missing = dir && stat(dir, &sb) != 0 && errno == ENOENT;
    free(dir);
    return missing;
}

/* Creates the one directory the database file lives in (the default .factory/). */
static void make_parent(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash || slash == path) return;
    char *dir = dup_bytes(path, (size_t)(slash - path));
    if (dir) mkdir(dir, 0700);
    free(dir);
}

enum { WAL_CHECKPOINT_PAGES = 1000 };

/* Runs after each commit of a writer connection, on the thread that committed. Taking
 * the hook replaces SQLite's own auto-checkpoint hook, so it checkpoints the same way. */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int pages) {
    sq_conn *c = (sq_conn *)arg;
    __atomic_add_fetch(&c->commits, 1, __ATOMIC_RELEASE);
    if (pages >= WAL_CHECKPOINT_PAGES) sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return SQLITE_OK;
}

static void do_open(sq_job *j) {
    sq_conn *c = j->conn;
    if (c->create_dir) make_parent(c->path);
    int rc = sqlite3_open_v2(c->path, &c->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_extended_result_codes(c->db, 1);
        set_busy(c, c->busy_ms);
        /* journal_mode is the first statement that reads the file: a file that is
         * not a database fails here. temp_store stays the default: a statement
         * journal (any write under a savepoint, as every group member is) then lives
         * in memory in one chunk up to STMT_JOURNAL_SPILL, where temp_store=MEMORY
         * would keep it in 1 KiB chunks, four mallocs for each page it saves (about
         * 6% of the pipeline bench's main-thread instructions). */
        rc = sqlite3_exec(c->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                                 " PRAGMA foreign_keys=ON;", NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK && !c->reader) {
        const char *wal = sqlite3_filename_wal(sqlite3_db_filename(c->db, "main"));
        if (!wal || !(c->wal_path = strdup(wal))) rc = SQLITE_NOMEM;
        else sqlite3_wal_hook(c->db, wal_hook, c);
    }
    if (rc == SQLITE_OK) return;
    if ((rc & 0xff) == SQLITE_CANTOPEN && dir_missing(c->path))
        job_fail(j, "ENOENT", "%s: the directory does not exist", c->path);
    else if ((rc & 0xff) == SQLITE_NOTADB)
        job_fail(j, "ENOTDB", "%s: the file is not a SQLite database", c->path);
    else
        job_fail(j, code_for(rc), "%s: %s", c->path, c->db ? sqlite3_errmsg(c->db) : sqlite3_errstr(rc));
    sqlite3_close_v2(c->db);
    c->db = NULL;
}

static int only_space(const char *s) {
    for (; *s; s++)
        if (!strchr(" \t\r\n;", *s)) return 0;
    return 1;
}

/* Where a statement's first word starts, past spaces and comments. */
static const char *first_word(const char *sql) {
    for (;;) {
        while (*sql && strchr(" \t\r\n", *sql)) sql++;
        if (sql[0] == '-' && sql[1] == '-') {
            while (*sql && *sql != '\n') sql++;
        } else if (sql[0] == '/' && sql[1] == '*') {
            const char *end = strstr(sql + 2, "*/");
            if (!end) return "";
            sql = end + 2;
        } else {
            return sql;
        }
    }
}

/* Whether the statement is an INSERT or REPLACE: only then is last_insert_rowid about
 * this statement. */
static int is_insert(const char *sql) {
    sql = first_word(sql);
    return !strncasecmp(sql, "INSERT", 6) || !strncasecmp(sql, "REPLACE", 7);
}

/* The statement cache's key: FNV-1a over the length and at most 32 bytes spread over
 * the text, which tells the engine's few dozen statements apart at a fraction of the
 * cost of every byte; a match is confirmed by comparing the whole text. */
static uint64_t sql_hash(const char *s) {
    size_t n = strlen(s), step = n / 32 + 1;
    uint64_t h = (1469598103934665603u ^ n) * 1099511628211u;
    for (size_t i = 0; i < n; i += step) h = (h ^ (unsigned char)s[i]) * 1099511628211u;
    return h;
}

static void cache_clear(sq_conn *c) {
    for (int i = 0; i < STMT_CACHE; i++) {
        sqlite3_finalize(c->cache[i].st);
        free(c->cache[i].sql);
        memset(&c->cache[i], 0, sizeof c->cache[i]);
    }
}

/* The cache entry of sql, or NULL. */
static sq_cached *cached(sq_conn *c, const char *sql) {
    uint64_t h = sql_hash(sql);
    for (int i = 0; i < STMT_CACHE; i++) {
        sq_cached *e = &c->cache[i];
        if (e->sql && e->hash == h && !strcmp(e->sql, sql)) return e;
    }
    return NULL;
}

static int ran_before(sq_conn *c, const char *sql) {
    const sq_cached *e = cached(c, sql);
    return e && e->cost > 0;
}

/* The cache entry holding j's prepared statement, found or prepared and cached; NULL
 * with the job failed, or with nothing to run (only blanks or comments). */
static sq_cached *stmt_for(sq_job *j) {
    sq_conn *c = j->conn;
    sq_cached *found = cached(c, j->sql);
    if (found) {
        found->used = ++c->clock;
        return found;
    }
    uint64_t h = sql_hash(j->sql);
    sq_cached *victim = &c->cache[0];
    for (int i = 1; i < STMT_CACHE; i++)
        if (c->cache[i].used < victim->used) victim = &c->cache[i];
    sqlite3_stmt *st = NULL;
    const char *tail = NULL;
    int rc = sqlite3_prepare_v3(c->db, j->sql, -1, SQLITE_PREPARE_PERSISTENT, &st, &tail);
    if (rc != SQLITE_OK) {
        job_fail_db(j, rc);
        return NULL;
    }
    if (!st) return NULL;
    if (tail && !only_space(tail)) {
        sqlite3_finalize(st);
        job_fail(j, "ESQL", "one statement per call (several statements: use a script)");
        return NULL;
    }
    char *copy = strdup(j->sql);
    if (!copy) {
        sqlite3_finalize(st);
        job_fail(j, "ENOMEM", "out of memory preparing the statement");
        return NULL;
    }
    sqlite3_finalize(victim->st);
    free(victim->sql);
    *victim = (sq_cached){.sql = copy, .hash = h, .used = ++c->clock, .st = st};
    return victim;
}

/* PRAGMA wal_autocheckpoint installs SQLite's own WAL hook in place of wal_hook:
 * commits would go uncounted, and unsynced. A script may hold it anywhere, a
 * statement only if it is a PRAGMA. */
static void keep_wal_hook(sq_job *j) {
    if (!j->conn->wal_path || (j->kind == JOB_RUN && strncasecmp(first_word(j->sql), "PRAGMA", 6))) return;
    if (strcasestr(j->sql, "wal_autocheckpoint")) sqlite3_wal_hook(j->conn->db, wal_hook, j->conn);
}

/* What a read costs, in seconds. On the pool, the worker's CPU time: not the time it
 * was preempted, or slept in a busy handler. Inline, on the loop thread, the time it
 * held the loop, by the clock that needs no system call (the loop thread's CPU clock
 * would cost as much as a small read). */
static double read_clock(const sq_conn *c) {
    if (c->quick_inline) return (double)uv_hrtime() / 1e9;
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void do_run(sq_job *j) {
    sqlite3 *db = j->conn->db;
    sq_cached *e = stmt_for(j);
    int rc;
    if (!e) return;
    sqlite3_stmt *st = e->st;
    /* Only reads are timed: only they may run inline (quick reads). */
    double t0 = j->conn->reader ? read_clock(j->conn) : 0;
    if (sqlite3_bind_parameter_count(st) != j->nparams) {
        job_fail(j, "ESQL", "the statement has %d parameter(s), %d given",
                 sqlite3_bind_parameter_count(st), j->nparams);
        goto done;
    }
    for (int i = 0; i < j->nparams; i++) {
        if ((rc = bind_value(st, i + 1, &j->params[i])) != SQLITE_OK) {
            job_fail_db(j, rc);
            goto done;
        }
    }
    j->ncols = sqlite3_column_count(st);
    if (j->ncols > 0) {
        j->names = (char **)calloc((size_t)j->ncols, sizeof *j->names);
        j->colkind = (unsigned char *)calloc((size_t)j->ncols, 1);
        if (!j->names || !j->colkind) goto oom;
        for (int i = 0; i < j->ncols; i++) {
            const char *name = sqlite3_column_name(st, i);
            if (!(j->names[i] = strdup(name ? name : "?"))) goto oom;
            j->colkind[i] = (unsigned char)decl_kind(sqlite3_column_decltype(st, i));
        }
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        for (int i = 0; i < j->ncols; i++)
            if (!add_cell(j, st, i)) goto oom;
    if (rc != SQLITE_DONE) {
        job_fail_db(j, rc);
        goto done;
    }
    j->changes = sqlite3_stmt_readonly(st) ? 0 : sqlite3_changes(db);
    if (j->changes > 0 && is_insert(j->sql)) {
        j->last_id = sqlite3_last_insert_rowid(db);
        j->has_last_id = 1;
    }
    goto done;
oom:
    job_fail(j, "ENOMEM", "out of memory reading the result");
done:
    /* A statement left mid-step would keep its read transaction open. */
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (j->conn->reader && !j->waits_out) {
        double took = read_clock(j->conn) - t0;
        if (took <= 0) took = 1e-9;
        e->cost = e->cost > 0 ? 0.75 * e->cost + 0.25 * took : took;
    }
    keep_wal_hook(j);
}

static void do_script(sq_job *j) {
    char *err = NULL;
    int rc = sqlite3_exec(j->conn->db, j->sql, NULL, NULL, &err);
    if (rc != SQLITE_OK) job_fail_text(j, rc, err ? err : sqlite3_errstr(rc));
    sqlite3_free(err);
    keep_wal_hook(j);
}

/* ---- durability: syncing the WAL (see the top) ----------------------------------------- */

static void synced_raise(sq_conn *c, uint64_t to) {
    uint64_t cur = __atomic_load_n(&c->synced, __ATOMIC_ACQUIRE);
    while (cur < to && !__atomic_compare_exchange_n(&c->synced, &cur, to, 0, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE)) {
    }
}

/* A WAL just created is on disk only once its directory entry is. */
static int dir_sync(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir) return ENOMEM;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0) return errno;
    int err = fsync(fd) == 0 ? 0 : errno;
    close(fd);
    return err;
}

/* fdatasync of the WAL through *fd, opened (with its directory synced) when it is -1.
 * A WAL deleted since it was opened fails: what was written to it is gone. */
static int wal_sync_fd(const char *path, int *fd) {
    struct stat st;
    if (*fd >= 0 && fstat(*fd, &st) == 0 && st.st_nlink == 0) return ENOENT;
    if (*fd < 0) {
        *fd = open(path, O_RDONLY | O_CLOEXEC);
        if (*fd < 0) return errno;
        int err = dir_sync(path);
        if (err) return err;
    }
    return fdatasync(*fd) == 0 ? 0 : errno;
}

/* On the pool, in the close job: the commits no sync covered yet. */
static void wal_sync_rest(sq_conn *c) {
    uint64_t target = __atomic_load_n(&c->commits, __ATOMIC_ACQUIRE);
    if (!c->wal_path || __atomic_load_n(&c->synced, __ATOMIC_ACQUIRE) >= target) return;
    int fd = -1;
    if (wal_sync_fd(c->wal_path, &fd) == 0) synced_raise(c, target);
    if (fd >= 0) close(fd);
}

static size_t rows_of(const sq_job *j) { return j->ncols ? j->ncells / (size_t)j->ncols : 0; }

static void do_job(sq_job *j) {
    switch (j->kind) {
    case JOB_OPEN: do_open(j); break;
    case JOB_RUN: do_run(j); break;
    case JOB_SCRIPT: do_script(j); break;
    case JOB_BATCH: {
        /* One read transaction for the batch: one snapshot, and one look at the WAL
         * instead of one per statement. Outside any transaction only (a batch never
         * runs inside the writer's). */
        int own = sqlite3_get_autocommit(j->conn->db) && j->nparts > 1
                  && sqlite3_exec(j->conn->db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK;
        for (int i = 0; i < j->nparts && !j->conn->quick_deferred; i++) {
            sq_job *p = j->parts[i];
            sq_job *cond = p->if_rows ? j->parts[p->if_rows - 1] : NULL;
            if (cond && (cond->code || rows_of(cond) < (size_t)p->min_rows)) continue;
            if (j->conn->quick_inline && !ran_before(j->conn, p->sql)) j->conn->quick_deferred = 1;
            else do_run(p);
        }
        if (own) sqlite3_exec(j->conn->db, "COMMIT", NULL, NULL, NULL);
        break;
    }
    case JOB_CLOSE:
        wal_sync_rest(j->conn);
        cache_clear(j->conn);
        sqlite3_close_v2(j->conn->db);
        j->conn->db = NULL;
        break;
    }
}

static void work_cb(uv_work_t *req) {
    sq_job *j = (sq_job *)req->data;
    if (j->train <= 1) {
        do_job(j);
        return;
    }
    /* The train's jobs were linked before it started; the loop thread only ever
     * appends behind the last. A batch inside the train's transaction opens none. */
    sqlite3 *db = j->conn->db;
    int n = j->train;
    int own = sqlite3_get_autocommit(db) && sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK;
    for (int i = 0; i < n; i++) {
        do_job(j);
        if (i + 1 < n) j = j->next;
    }
    if (own) sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
}

/* ---- jobs and connections on the loop thread ------------------------------------ */

/* Frees what a run of j produced (not its parts'), leaving none. */
static void job_clear_results(sq_job *j) {
    for (int i = 0; j->names && i < j->ncols; i++) free(j->names[i]);
    free(j->names);
    free(j->colkind);
    for (size_t i = 0; i < j->ncells; i++) value_free(&j->cells[i]);
    free(j->cells);
    free(j->msg);
    j->names = NULL;
    j->colkind = NULL;
    j->cells = NULL;
    j->msg = NULL;
    j->code = NULL;
    j->ncols = 0;
    j->ncells = j->cap = 0;
    j->changes = j->last_id = 0;
    j->has_last_id = 0;
}

static void job_free(sq_job *j) {
    for (int i = 0; i < j->nparts; i++) job_free(j->parts[i]);
    free(j->parts);
    if (!j->borrowed) {
        free(j->sql);
        for (int i = 0; i < j->nparams; i++) value_free(&j->params[i]);
    }
    free(j->params);
    job_clear_results(j);
    free(j);
}

static void conn_free(sq_conn *c) {
    if (c->wal_fd >= 0) close(c->wal_fd);
    free(c->wal_path);
    free(c->path);
    free(c);
}

static int push_sync_error(lua_State *L, const char *path, int err) {
    return fb_push_error(L, "EIO", "%s: the write-ahead log could not be synced to disk (%s): what was committed"
                         " since its last sync may be lost", path, strerror(err));
}

static void sync_work(uv_work_t *req) {
    sq_conn *c = (sq_conn *)req->data;
    c->sync_target = __atomic_load_n(&c->commits, __ATOMIC_ACQUIRE);
    c->sync_result = wal_sync_fd(c->wal_path, &c->wal_fd);
}

static void sync_done(uv_work_t *req, int status);

static void sync_start(sq_conn *c) {
    c->syncing = 1;
    c->sync_req.data = c;
    if (uv_queue_work(fb_loop(), &c->sync_req, sync_work, sync_done) != 0) {
        sync_work(&c->sync_req);
        sync_done(&c->sync_req, 0);
    }
}

/* Settles the waiters this sync covered (or all, when it failed) and starts another
 * sync for the rest; the fibers are woken last, when the connection is no longer
 * touched (a woken fiber may close it). */
static void sync_done(uv_work_t *req, int status) {
    (void)status;
    sq_conn *c = (sq_conn *)req->data;
    c->syncing = 0;
    c->syncs++;
    if (c->sync_result == 0) synced_raise(c, c->sync_target);
    else if (!c->sync_errno) c->sync_errno = c->sync_result;
    uint64_t synced = __atomic_load_n(&c->synced, __ATOMIC_ACQUIRE);
    sq_sync_wait *done = NULL;
    for (sq_sync_wait *w = c->waiters, *next; w; w = next) {
        next = w->next;
        if (w->need > synced && !c->sync_errno) continue;
        if (w->prev) w->prev->next = w->next; else c->waiters = w->next;
        if (w->next) w->next->prev = w->prev;
        lua_State *co = fb_co(w->fiber);
        if (w->need <= synced) w->nresults = (lua_pushboolean(co, 1), 1);
        else w->nresults = push_sync_error(co, c->wal_path, c->sync_errno);
        w->next = done;
        done = w;
    }
    if (c->waiters) sync_start(c);
    else if (c->free_pending) conn_free(c);
    while (done) {
        sq_sync_wait *w = done;
        done = w->next;
        fb_fiber *f = w->fiber;
        int n = w->nresults;
        free(w);
        fb_wake(f, n);
    }
}

static void abort_sync_wait(void *op) {
    sq_sync_wait *w = (sq_sync_wait *)op;
    if (w->prev) w->prev->next = w->next; else w->conn->waiters = w->next;
    if (w->next) w->next->prev = w->prev;
    free(w);
}

static sq_job *job_new(sq_conn *c, int kind) {
    sq_job *j = (sq_job *)calloc(1, sizeof *j);
    if (!j) return NULL;
    j->conn = c;
    j->kind = kind;
    j->req.data = j;
    return j;
}

static void after_work_cb(uv_work_t *req, int status);

static void start(sq_conn *c) {
    /* A statement whose fiber gave up before it started is dropped, not run. */
    while (c->head && !c->head->fiber && (c->head->kind == JOB_RUN || c->head->kind == JOB_SCRIPT
                                               || c->head->kind == JOB_BATCH)) {
        sq_job *j = c->head;
        c->head = j->next;
        if (!c->head) c->tail = NULL;
        job_free(j);
    }
    sq_job *h = c->head;
    if (!h) return;
    h->train = 1;
    if (c->reader && (h->kind == JOB_RUN || h->kind == JOB_BATCH))
        for (sq_job *j = h->next; j && h->train < MAX_TRAIN && (j->kind == JOB_RUN || j->kind == JOB_BATCH);
             j = j->next)
            h->train++;
    uv_queue_work(fb_loop(), &h->req, work_cb, after_work_cb);
}

static void enqueue(sq_conn *c, sq_job *j) {
    if (c->tail) c->tail->next = j; else c->head = j;
    c->tail = j;
    if (c->head == j) start(c);
}

static void abort_job(void *op) { ((sq_job *)op)->fiber = NULL; }

static void push_conn(lua_State *L, sq_conn *c) {
    sq_conn **box = (sq_conn **)lua_newuserdata(L, sizeof *box);
    *box = c;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
}

static void push_value(lua_State *L, const sq_value *v, int kind) {
    switch (v->type) {
    case SQLITE_INTEGER:
        if (kind == COL_BOOL) lua_pushboolean(L, v->i != 0);
        else lua_pushnumber(L, (lua_Number)v->i);
        break;
    case SQLITE_FLOAT: lua_pushnumber(L, v->d); break;
    default: lua_pushlstring(L, v->s, v->n); break;
    }
}

/* Pushes what a finished run/script/batch job returns. */
static int push_results(lua_State *L, sq_job *j) {
    lua_checkstack(L, 8);
    if (j->code) return fb_push_error(L, j->code, "%s", j->msg);
    if (j->kind == JOB_BATCH) {
        lua_createtable(L, j->nparts, 0);
        for (int i = 0; i < j->nparts; i++) {
            lua_newtable(L);
            int t = lua_gettop(L);
            int n = push_results(L, j->parts[i]);
            for (int k = n; k >= 1; k--) lua_rawseti(L, t, k);
            lua_pushinteger(L, n);
            lua_setfield(L, t, "n");
            lua_rawseti(L, -2, i + 1);
        }
        return 1;
    }
    if (j->kind == JOB_SCRIPT) {
        lua_pushboolean(L, 1);
        return 1;
    }
    size_t nrows = rows_of(j);
    lua_createtable(L, (int)nrows, 0);
    for (size_t r = 0; r < nrows; r++) {
        lua_createtable(L, 0, j->ncols);
        for (int c = 0; c < j->ncols; c++) {
            const sq_value *v = &j->cells[r * (size_t)j->ncols + (size_t)c];
            if (v->type == SQLITE_NULL) continue;
            push_value(L, v, j->colkind[c]);
            lua_setfield(L, -2, j->names[c]);
        }
        lua_rawseti(L, -2, (int)r + 1);
    }
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (lua_Number)j->changes);
    lua_setfield(L, -2, "changes");
    if (j->has_last_id) {
        lua_pushnumber(L, (lua_Number)j->last_id);
        lua_setfield(L, -2, "last_id");
    }
    int njson = 0;
    for (int c = 0; c < j->ncols; c++) {
        if (j->colkind[c] != COL_JSON) continue;
        if (!njson) {
            lua_newtable(L);
            lua_pushvalue(L, -1);
            lua_setfield(L, -3, "json");
        }
        lua_pushstring(L, j->names[c]);
        lua_rawseti(L, -2, ++njson);
    }
    if (njson) lua_pop(L, 1);
    return 2;
}

/* Completes a reader's train (j, its head, heads the queue): every job of it leaves
 * the queue, and the next job starts, before the first fiber is woken. A fiber is
 * read only when its turn comes: one woken before may have cancelled it. */
static void finish_train(sq_conn *c, sq_job *j) {
    sq_job *done[MAX_TRAIN];
    int n = j->train;
    for (int i = 0; i < n; i++) {
        done[i] = c->head;
        c->head = c->head->next;
    }
    if (!c->head) c->tail = NULL;
    start(c);
    for (int i = 0; i < n; i++) {
        sq_job *d = done[i];
        fb_fiber *f = d->fiber;
        int k = f ? push_results(fb_co(f), d) : 0;
        job_free(d);
        if (f) fb_wake(f, k);
    }
}

/* All bookkeeping happens before fb_wake: the woken fiber runs at once and may
 * queue more jobs or drop the connection. */
static void after_work_cb(uv_work_t *req, int status) {
    (void)status;
    sq_job *j = (sq_job *)req->data;
    sq_conn *c = j->conn;
    if (j->train > 1) {
        finish_train(c, j);
        return;
    }
    fb_fiber *f = j->fiber;
    c->head = j->next;
    if (!c->head) c->tail = NULL;
    if (j->kind == JOB_CLOSE && c->syncing) {
        c->free_pending = 1;
    } else if (j->kind == JOB_CLOSE || (j->kind == JOB_OPEN && j->code)) {
        conn_free(c);
    } else if (j->kind == JOB_OPEN && !f) {
        /* The opener gave up: nobody will ever own this connection. */
        sq_job *close = job_new(c, JOB_CLOSE);
        if (close) enqueue(c, close);
        else {
            sqlite3_close_v2(c->db);
            conn_free(c);
        }
    } else {
        start(c);
    }
    if (!f) {
        job_free(j);
        return;
    }
    lua_State *co = fb_co(f);
    int n;
    if (j->kind == JOB_OPEN) n = j->code ? fb_push_error(co, j->code, "%s", j->msg) : (push_conn(co, c), 1);
    else if (j->kind == JOB_CLOSE) n = (lua_pushboolean(co, 1), 1);
    else n = push_results(co, j);
    job_free(j);
    fb_wake(f, n);
}

/* ---- quick reads, run inline ------------------------------------------------------
 * A pool round trip costs the loop thread more than a read of a few pages does (two
 * thread wake-ups, the job's completion, the fiber's resumption). So a fiber's read
 * on a reader connection runs inline when the connection has no job queued, every
 * statement of it has run before (on the pool or inline) and took under
 * INLINE_READ_MAX on average (read_clock), and inline reads have taken less than INLINE_SHARE of
 * the loop thread's time in the current INLINE_WINDOW: a fiber reading in a loop
 * still yields to the others, and a read that turns slow goes back to the pool.
 * Inline, a read never waits for a lock: SQLITE_BUSY (another process rebuilding
 * the WAL index, say) sends it to the pool, which waits out the busy timeout. */
#define INLINE_READ_MAX 100e-6
#define INLINE_WINDOW 1e-3
#define INLINE_SHARE 0.5

static struct {
    uint64_t window_start; /* uv_hrtime() */
    double spent;          /* seconds of inline reads since then */
} inline_reads;

/* What j is expected to take, in seconds; -1 if a statement of it never ran. A part
 * of a batch that runs only if an earlier one found rows, and never did, counts as
 * nothing: inline, it sends the batch to the pool if it is about to run. */
static double known_cost(sq_conn *c, const sq_job *j) {
    if (j->kind == JOB_RUN) {
        const sq_cached *e = cached(c, j->sql);
        return e && e->cost > 0 ? e->cost : (j->if_rows ? 0 : -1);
    }
    double sum = 0;
    for (int i = 0; i < j->nparts; i++) {
        double part = known_cost(c, j->parts[i]);
        if (part < 0) return -1;
        sum += part;
    }
    return sum;
}

static int quick_read(sq_conn *c, const sq_job *j) {
    if (!c->reader || c->head || (j->kind != JOB_RUN && j->kind != JOB_BATCH)) return 0;
    uint64_t now = uv_hrtime();
    if ((double)(now - inline_reads.window_start) / 1e9 > INLINE_WINDOW) {
        inline_reads.window_start = now;
        inline_reads.spent = 0;
    }
    if (inline_reads.spent >= INLINE_WINDOW * INLINE_SHARE) return 0;
    double cost = known_cost(c, j);
    return cost > 0 && cost <= INLINE_READ_MAX;
}

static int busy_somewhere(const sq_job *j) {
    if (j->code && !strcmp(j->code, "EBUSY")) return 1;
    for (int i = 0; i < j->nparts; i++)
        if (busy_somewhere(j->parts[i])) return 1;
    return 0;
}

/* Forgets what a run of j produced, so that it can run again; busy: it ran into a
 * lock, which the pool waits out. */
static void job_reset(sq_job *j, int busy) {
    for (int i = 0; i < j->nparts; i++) job_reset(j->parts[i], busy);
    j->waits_out = busy;
    job_clear_results(j);
}

/* Runs the quick read j inline: 1 when it ran (its results or its error are in j),
 * 0 when a lock was busy or it met a statement that never ran (j is as before it
 * ran, for the pool). */
static int run_inline(sq_conn *c, sq_job *j) {
    uint64_t t0 = uv_hrtime();
    set_busy(c, 0);
    c->quick_inline = 1;
    do_job(j);
    c->quick_inline = 0;
    set_busy(c, c->busy_ms);
    inline_reads.spent += (double)(uv_hrtime() - t0) / 1e9;
    int deferred = c->quick_deferred;
    c->quick_deferred = 0;
    int busy = busy_somewhere(j);
    if (!deferred && !busy) return 1;
    job_reset(j, busy);
    return 0;
}

/* Runs j now if nothing can wait (or it is a quick read), else queues it and
 * suspends the fiber. */
static int submit(lua_State *L, sq_job *j) {
    sq_conn *c = j->conn;
    fb_fiber *f = fb_current(L);
    if (f && !c->inline_jobs && quick_read(c, j) && run_inline(c, j)) {
        int n = push_results(L, j);
        job_free(j);
        return n;
    }
    if (f && !c->inline_jobs) {
        j->fiber = f;
        enqueue(c, j);
        return fb_await(L, f, abort_job, j, 0);
    }
    if (c->head) {
        job_free(j);
        return luaL_error(L, "sqlite: the connection is busy with a fiber's job, and this call cannot wait for it: "
                             "call it from a fiber's own code (not the main thread, a plain coroutine, or a C call "
                             "that runs Lua, such as dofile)");
    }
    do_job(j);
    int n;
    if (j->kind == JOB_OPEN) {
        n = j->code ? fb_push_error(L, j->code, "%s", j->msg) : (push_conn(L, c), 1);
        if (j->code) conn_free(c);
    } else if (j->kind == JOB_CLOSE) {
        conn_free(c);
        n = (lua_pushboolean(L, 1), 1);
    } else {
        n = push_results(L, j);
    }
    job_free(j);
    return n;
}

/* ---- Lua functions ----------------------------------------------------------------- */

static sq_conn *check_conn(lua_State *L) {
    sq_conn **box = (sq_conn **)luaL_checkudata(L, 1, CONN_MT);
    if (!*box) luaL_error(L, "sqlite: the connection is closed");
    return *box;
}

static int sq_open(lua_State *L) {
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (!len || strlen(path) != len) return luaL_argerror(L, 1, "expected a file path");
    int create_dir = 0, busy_ms = 5000, reader = 0;
    if (lua_istable(L, 2)) {
        lua_getfield(L, 2, "reader");
        reader = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 2, "create_dir");
        create_dir = lua_toboolean(L, -1);
        lua_getfield(L, 2, "busy_timeout_ms");
        if (lua_isnumber(L, -1)) busy_ms = (int)lua_tointeger(L, -1);
        lua_pop(L, 2);
    }
    sq_conn *c = (sq_conn *)calloc(1, sizeof *c);
    sq_job *j = c ? job_new(c, JOB_OPEN) : NULL;
    if (!j || !(c->path = strdup(path))) {
        free(j);
        if (c) conn_free(c);
        return luaL_error(L, "sqlite.open: out of memory");
    }
    c->create_dir = create_dir;
    c->reader = reader;
    c->wal_fd = -1;
    c->busy_ms = busy_ms;
    return submit(L, j);
}

/* Raises (misuse) on a parameter SQLite cannot take, before anything is allocated. */
static void check_params(lua_State *L, int idx, int n) {
    if (n <= 0) return;
    luaL_checktype(L, idx, LUA_TTABLE);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        int t = lua_type(L, -1);
        if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER && t != LUA_TSTRING)
            luaL_error(L, "sqlite: parameter %d is a %s (expected nil, boolean, number or string)",
                       i, lua_typename(L, t));
        lua_pop(L, 1);
    }
}

/* Reads the parameters into j: text copied into C memory when the job outlives this
 * call's stack, else (borrow) pointed at in the Lua strings, which the caller's
 * stack holds until the job has run. */
static int read_params(lua_State *L, int idx, int n, sq_job *j, int borrow) {
    if (n <= 0) return 1;
    j->params = (sq_value *)calloc((size_t)n, sizeof *j->params);
    if (!j->params) return 0;
    j->nparams = n;
    for (int i = 0; i < n; i++) {
        sq_value *v = &j->params[i];
        lua_rawgeti(L, idx, i + 1);
        switch (lua_type(L, -1)) {
        case LUA_TBOOLEAN:
            v->type = SQLITE_INTEGER;
            v->i = lua_toboolean(L, -1);
            break;
        case LUA_TNUMBER: {
            double d = lua_tonumber(L, -1);
            if (d == floor(d) && fabs(d) < 9.2e18) {
                v->type = SQLITE_INTEGER;
                v->i = (sqlite3_int64)d;
            } else {
                v->type = SQLITE_FLOAT;
                v->d = d;
            }
            break;
        }
        case LUA_TSTRING: {
            size_t len;
            const char *s = lua_tolstring(L, -1, &len);
            v->type = SQLITE_TEXT;
            v->n = len;
            if (borrow) v->s = (char *)s;
            else if (!(v->s = dup_bytes(s, len))) return 0;
            break;
        }
        default: v->type = SQLITE_NULL; break;
        }
        lua_pop(L, 1);
    }
    return 1;
}

static int sq_run(lua_State *L) {
    sq_conn *c = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    int n = (int)luaL_optinteger(L, 4, 0);
    check_params(L, 3, n);
    sq_job *j = job_new(c, JOB_RUN);
    if (!j) return luaL_error(L, "sqlite: out of memory");
    /* What submit runs inline runs before this returns. */
    j->borrowed = !fb_current(L) || c->inline_jobs;
    j->sql = j->borrowed ? (char *)sql : strdup(sql);
    if (!j->sql || !read_params(L, 3, n, j, j->borrowed)) {
        job_free(j);
        return luaL_error(L, "sqlite: out of memory");
    }
    return submit(L, j);
}

static int sq_batch(lua_State *L) {
    sq_conn *c = check_conn(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int count = (int)lua_objlen(L, 2);
    /* Everything that can raise is checked before anything is allocated. */
    for (int i = 1; i <= count; i++) {
        lua_rawgeti(L, 2, i);
        int part = lua_gettop(L);
        luaL_checktype(L, part, LUA_TTABLE);
        lua_rawgeti(L, part, 1);
        if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "sqlite: batch statement %d has no SQL text", i);
        lua_rawgeti(L, part, 3);
        int n = (int)lua_tointeger(L, -1);
        lua_rawgeti(L, part, 2);
        check_params(L, lua_gettop(L), n);
        lua_getfield(L, part, "if_rows");
        lua_Integer k = lua_tointeger(L, -1);
        if (!lua_isnil(L, -1) && (k < 1 || k >= i))
            return luaL_error(L, "sqlite: batch statement %d: if_rows must name an earlier statement", i);
        lua_getfield(L, part, "min_rows");
        if (!lua_isnil(L, -1) && !(lua_isnumber(L, -1) && lua_tointeger(L, -1) >= 1))
            return luaL_error(L, "sqlite: batch statement %d: min_rows must be a count of at least 1", i);
        lua_settop(L, part - 1);
    }
    sq_job *j = job_new(c, JOB_BATCH);
    if (!j) return luaL_error(L, "sqlite: out of memory");
    if (count > 0 && !(j->parts = (sq_job **)calloc((size_t)count, sizeof *j->parts))) goto oom;
    for (int i = 1; i <= count; i++) {
        lua_rawgeti(L, 2, i);
        int part = lua_gettop(L);
        lua_rawgeti(L, part, 1);
        lua_rawgeti(L, part, 2);
        lua_rawgeti(L, part, 3);
        int n = (int)lua_tointeger(L, -1);
        sq_job *p = job_new(c, JOB_RUN);
        if (p) j->parts[j->nparts++] = p;
        if (!p || !(p->sql = strdup(lua_tostring(L, part + 1))) || !read_params(L, part + 2, n, p, 0)) goto oom;
        lua_getfield(L, part, "if_rows");
        p->if_rows = (int)lua_tointeger(L, -1);
        lua_getfield(L, part, "min_rows");
        p->min_rows = lua_isnil(L, -1) ? 1 : (int)lua_tointeger(L, -1);
        lua_settop(L, part - 1);
    }
    return submit(L, j);
oom:
    job_free(j);
    return luaL_error(L, "sqlite: out of memory");
}

static int sq_script(lua_State *L) {
    sq_conn *c = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    sq_job *j = job_new(c, JOB_SCRIPT);
    if (!j || !(j->sql = strdup(sql))) {
        free(j);
        return luaL_error(L, "sqlite: out of memory");
    }
    return submit(L, j);
}

static int sq_try(lua_State *L) {
    sq_conn *c = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    if (c->head) return fb_push_error(L, "EBUSY", "the connection is busy with a queued job");
    sq_job *j = job_new(c, JOB_SCRIPT);
    if (!j || !(j->sql = strdup(sql))) {
        free(j);
        return luaL_error(L, "sqlite: out of memory");
    }
    set_busy(c, 0);
    do_job(j);
    set_busy(c, c->busy_ms);
    int n = push_results(L, j);
    job_free(j);
    return n;
}

static int sq_sync(lua_State *L) {
    sq_conn **box = (sq_conn **)luaL_checkudata(L, 1, CONN_MT);
    sq_conn *c = *box;
    /* Closed: its close job syncs before closing. A reader commits nothing. */
    if (!c || !c->wal_path) return (lua_pushboolean(L, 1), 1);
    if (c->sync_errno) return push_sync_error(L, c->wal_path, c->sync_errno);
    uint64_t need = __atomic_load_n(&c->commits, __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&c->synced, __ATOMIC_ACQUIRE) >= need) return (lua_pushboolean(L, 1), 1);
    fb_fiber *f = fb_current(L);
    if (!f) {
        /* Nothing can wait: synced here, through a descriptor of its own (a sync job
         * may be using the connection's). */
        int fd = -1;
        int err = wal_sync_fd(c->wal_path, &fd);
        if (fd >= 0) close(fd);
        c->syncs++;
        if (err) {
            c->sync_errno = err;
            return push_sync_error(L, c->wal_path, err);
        }
        synced_raise(c, need);
        return (lua_pushboolean(L, 1), 1);
    }
    sq_sync_wait *w = (sq_sync_wait *)calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "sqlite: out of memory");
    w->conn = c;
    w->fiber = f;
    w->need = need;
    w->next = c->waiters;
    if (c->waiters) c->waiters->prev = w;
    c->waiters = w;
    if (!c->syncing) sync_start(c);
    return fb_await(L, f, abort_sync_wait, w, 0);
}

static int sq_sync_stats(lua_State *L) {
    sq_conn *c = check_conn(L);
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (lua_Number)__atomic_load_n(&c->commits, __ATOMIC_ACQUIRE));
    lua_setfield(L, -2, "commits");
    lua_pushnumber(L, (lua_Number)__atomic_load_n(&c->synced, __ATOMIC_ACQUIRE));
    lua_setfield(L, -2, "synced");
    lua_pushnumber(L, (lua_Number)c->syncs);
    lua_setfield(L, -2, "syncs");
    return 1;
}

static int sq_inline(lua_State *L) {
    sq_conn *c = check_conn(L);
    c->inline_jobs = lua_toboolean(L, 2);
    lua_pushboolean(L, 1);
    return 1;
}

/* Queues the close behind the jobs already queued; a fiber waits for it. */
static int sq_close(lua_State *L) {
    sq_conn **box = (sq_conn **)luaL_checkudata(L, 1, CONN_MT);
    sq_conn *c = *box;
    if (!c) {
        lua_pushboolean(L, 1);
        return 1;
    }
    *box = NULL;
    sq_job *j = job_new(c, JOB_CLOSE);
    if (!j) return luaL_error(L, "sqlite: out of memory");
    if (!fb_current(L) && c->head) {
        enqueue(c, j); /* nothing can wait: it closes once the running job ends */
        lua_pushboolean(L, 1);
        return 1;
    }
    return submit(L, j);
}

/* Never waits: runs when the fiber that used the connection is gone, or at exit. */
static int sq_gc(lua_State *L) {
    sq_conn **box = (sq_conn **)luaL_checkudata(L, 1, CONN_MT);
    sq_conn *c = *box;
    if (!c) return 0;
    *box = NULL;
    sq_job *j = job_new(c, JOB_CLOSE);
    if (j) enqueue(c, j);
    return 0;
}

static int sq_tostring(lua_State *L) {
    sq_conn **box = (sq_conn **)luaL_checkudata(L, 1, CONN_MT);
    if (*box) lua_pushfstring(L, "sqlite connection (%s)", (*box)->path);
    else lua_pushliteral(L, "sqlite connection (closed)");
    return 1;
}

static const luaL_Reg conn_methods[] = {
    {"run",    sq_run},
    {"script", sq_script},
    {"inline", sq_inline},
    {"try",    sq_try},
    {"batch",  sq_batch},
    {"sync",   sq_sync},
    {"sync_stats", sq_sync_stats},
    {"close",  sq_close},
    {NULL, NULL},
};

/* A group's transaction saves every page its members' savepoints change in one
 * statement journal. Past SQLite's default of 64 KiB that journal moves to a temporary
 * file, created, written page by page and deleted for each group: in the pipeline
 * bench (16 runs at once) most groups crossed it, and those system calls cost the
 * loop thread about 10% of its time; at this size none does. SQLite holds the
 * journal in one chunk of this size and, when it outgrows it, writes the chunk to
 * the file in one call, which its unix VFS cuts to the low 17 bits of the length:
 * a larger chunk made every transaction that journals more fail as "database or
 * disk is full". */
#define STMT_JOURNAL_SPILL ((1 << 17) - 1)

static const luaL_Reg sqlite_functions[] = {
    {"open", sq_open},
    {NULL, NULL},
};

int luaopen_factory_core_db_sqlite(lua_State *L) {
    /* Without memory statistics (nothing reads them) SQLite's allocator takes no
     * global mutex on every malloc and free. Only the first call, before SQLite
     * initializes, takes effect; later ones fail harmlessly. */
    sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
    sqlite3_config(SQLITE_CONFIG_STMTJRNL_SPILL, STMT_JOURNAL_SPILL);
    if (luaL_newmetatable(L, CONN_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, conn_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, sq_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, sq_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, sqlite_functions);
    lua_pushstring(L, sqlite3_libversion());
    lua_setfield(L, -2, "version");
    return 1;
}
