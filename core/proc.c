/* core/proc.c — factory.core.proc: child processes for fibers.
 *
 *   proc.spawn{ argv = {...}, cwd = DIR, env = {NAME = value, ...},
 *               stdin = STRING | "pipe" | nil, stdout = "pipe" | "null" | "inherit",
 *               stderr = "pipe" | "null" | "inherit" | "stdout",
 *               timeout = SECONDS, max_output = BYTES, kill_grace = SECONDS }
 *       -> process | nil, "ECODE: message", "ECODE"
 *     argv[1] without a slash is looked up in the child's PATH (env.PATH, else the
 *     default below); a missing program is "ENOENT: program not found: NAME".
 *     The environment is explicit, never inherited: env = nil gives only
 *     PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin.
 *     stdin: nil reads /dev/null; a string is written, then closed; "pipe" is
 *     written with p:write. stdout and stderr default to "pipe"; "stdout" merges
 *     stderr into stdout. Each piped stream keeps at most max_output bytes
 *     (default 16 MiB); the rest is read and discarded (truncated = true).
 *     When timeout expires the process group gets SIGTERM, then SIGKILL
 *     kill_grace seconds later (default 0: SIGKILL at once); timed_out = true.
 *   p:read_line([stream]) -> the next line without "\n" | nil at EOF   (yields)
 *   p:read([stream])      -> the bytes buffered so far | nil at EOF    (yields)
 *     stream is "stdout" (default) or "stderr"; one reader per stream at a time.
 *   p:write(data) -> true | nil, err (yields until written); p:close_stdin()
 *   p:wait([timeout]) -> { code = N|nil, signal = N|nil, timed_out = bool,
 *     truncated = bool }, once the process has exited and its piped streams have
 *     reached EOF (unread output stays readable). A timeout here works like the
 *     spawn option: the group is killed when it expires.
 *   p:kill([signal]) -> true | false once exited; signals the whole group
 *     (signal: number or name like "TERM", default SIGTERM).
 *   p.pid; p:close() kills the group if still running and releases everything
 *     (also done by __gc); closing twice is harmless; fibers waiting on p get
 *     nil, "ECANCELED: ...".
 *   proc.getpid() -> this process's pid.
 *   proc.which(name [, PATH]) -> the file spawn would run as argv[1] = name (looked
 *     up in PATH, default the one above; a name with a slash is checked as is) | nil.
 * A fiber cancelled while waiting in read, read_line, write or wait kills the
 * process group (SIGKILL). A process keeps the engine running only while a fiber
 * waits on it; one still running at exit is killed. Everything but kill, close
 * and getpid must be called from a fiber.
 *
 * Why not uv_spawn: libuv 1.44 forks, and fork copies the page tables, so its cost
 * grows with the engine's heap. glibc's posix_spawn uses clone(CLONE_VM|CLONE_VFORK)
 * and costs the same at any heap size. The child leads its own session and process
 * group (POSIX_SPAWN_SETSID), so a timeout or a cancellation reaches its children
 * too. Exit is learned from a pidfd polled by the loop and reaped with
 * waitid(P_PIDFD): no SIGCHLD handler, no zombies. Once the leader has exited the
 * rest of its group is killed, so a command leaves no stray children behind.
 *
 * Lifetimes: a proc_t is malloc'd and counted: one reference for the Lua object,
 * one per open libuv handle, one per waiting fiber or pending write. The Lua object
 * only points to it; close/__gc kill the child, close the handles and drop the
 * Lua reference; the pidfd poll stays until the child is reaped.
 */
#include "fiber.h"
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROC_MT "factory.proc"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define DEFAULT_MAX_OUTPUT ((size_t)16 << 20)

enum { READ_CHUNK, READ_LINE };
/* What the timer does when it fires next. */
enum { T_NONE, T_DEADLINE, T_GRACE, T_KILLED };

typedef struct proc proc_t;

typedef struct {
    proc_t *p;
    uv_pipe_t pipe;
    int piped, open, eof;
    char *buf;
    size_t start, len, cap;     /* unread bytes: buf[start, start + len) */
    size_t kept;                /* bytes kept so far, against max_output */
    fb_fiber *reader;
    int mode;
} stream_t;

struct proc {
    pid_t pid;
    int pidfd;
    int refs;
    int waiting;                /* fibers waiting in read, write or wait */
    int reaped, code, sig, timed_out, truncated;
    uv_poll_t exit_poll;
    int poll_open;
    uv_timer_t timer;
    int timer_open, stage;
    double kill_grace;
    size_t max_output;
    uv_pipe_t in;
    int in_open, in_piped;      /* in_piped: stdin = "pipe", for p:write */
    stream_t out[2];            /* stdout, stderr */
    fb_fiber *waiter;
};

/* The Lua object: p is NULL once closed; the pid stays readable. */
typedef struct {
    proc_t *p;
    pid_t pid;
} proc_box;

typedef struct {
    uv_write_t req;
    proc_t *p;
    fb_fiber *fiber;            /* waiting for the write; NULL if none or gone */
    int close_after;            /* the spawn-time stdin string: close stdin once written */
    char data[];
} write_op;

static void proc_unref(proc_t *p) {
    if (--p->refs > 0) return;
    free(p->out[0].buf);
    free(p->out[1].buf);
    free(p);
}

static void on_handle_closed(uv_handle_t *h) { proc_unref((proc_t *)h->data); }

static void on_poll_closed(uv_handle_t *h) {
    proc_t *p = (proc_t *)h->data;
    close(p->pidfd);
    proc_unref(p);
}

static void close_handle(uv_handle_t *h, int *open) {
    if (!*open) return;
    *open = 0;
    uv_close(h, on_handle_closed);
}

/* The handles keep the loop running only while a fiber waits on the process: a
 * forgotten process must not keep the engine alive (it is killed at shutdown). */
static void set_loop_refs(proc_t *p) {
    uv_handle_t *h[] = {(uv_handle_t *)&p->exit_poll, (uv_handle_t *)&p->timer, (uv_handle_t *)&p->in,
                        (uv_handle_t *)&p->out[0].pipe, (uv_handle_t *)&p->out[1].pipe};
    int open[] = {p->poll_open, p->timer_open, p->in_open, p->out[0].open, p->out[1].open};
    for (int i = 0; i < 5; i++) {
        if (!open[i]) continue;
        if (p->waiting) uv_ref(h[i]);
        else uv_unref(h[i]);
    }
}

static void begin_wait(proc_t *p) {
    p->waiting++;
    p->refs++;
    set_loop_refs(p);
}

static void end_wait(proc_t *p) {
    p->waiting--;
    set_loop_refs(p);
    proc_unref(p);
}

/* ---- children die with the host ------------------------------------------------
 * Each child leads its own session, so neither the terminal's Ctrl-C nor a kill of
 * the host reaches it: a host killed by SIGINT, SIGTERM or SIGHUP would leave its
 * agents and gates running. While none of the host's fibers waits for the signal
 * (factory.core.signal), the guard handler SIGKILLs every group the host started and
 * then lets the signal end the host as it would have. It is installed only over the
 * default action (never over SIG_IGN or another handler) at each spawn and when a
 * signal wait ends (libuv then puts back the default). guarded[] holds the leaders
 * not yet reaped (the first GUARD_MAX of those running at once); the handler only
 * reads it and calls kill, which is async-signal-safe, so it works even while the
 * loop is busy. */
#define GUARD_MAX 1024
static volatile sig_atomic_t guarded[GUARD_MAX];
static const int GUARDED_SIGNALS[] = {SIGINT, SIGTERM, SIGHUP};

static void guard_handler(int sig) {
    for (int i = 0; i < GUARD_MAX; i++)
        if (guarded[i] > 0) kill(-(pid_t)guarded[i], SIGKILL);
    signal(sig, SIG_DFL);
    raise(sig);                 /* pending until this returns, then the default action */
}

void proc_guard_signals(void) {
    for (size_t i = 0; i < sizeof GUARDED_SIGNALS / sizeof *GUARDED_SIGNALS; i++) {
        struct sigaction old;
        if (sigaction(GUARDED_SIGNALS[i], NULL, &old) != 0) continue;
        if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = guard_handler;
        sigemptyset(&sa.sa_mask);
        sigaction(GUARDED_SIGNALS[i], &sa, NULL);
    }
}

static void guard(pid_t pid) {
    for (int i = 0; i < GUARD_MAX; i++)
        if (guarded[i] == 0) {
            guarded[i] = pid;
            return;
        }
}

/* Before the leader is reaped: afterwards its pid may name someone else's group. */
static void unguard(pid_t pid) {
    for (int i = 0; i < GUARD_MAX; i++)
        if (guarded[i] == pid) guarded[i] = 0;
}

/* Only while the leader is unreaped: until then its pid is ours and names the group. */
static int kill_group(proc_t *p, int sig) {
    return !p->reaped && kill(-p->pid, sig) == 0;
}

/* ---- output streams --------------------------------------------------------- */

static void stream_close(stream_t *s) {
    s->eof = 1;
    close_handle((uv_handle_t *)&s->pipe, &s->open);
}

static void stream_append(stream_t *s, const char *data, size_t n) {
    proc_t *p = s->p;
    size_t room = p->max_output - s->kept;
    if (n > room) {
        n = room;
        p->truncated = 1;
    }
    if (n == 0) return;
    if (s->start + s->len + n > s->cap) {
        if (s->start) memmove(s->buf, s->buf + s->start, s->len);
        s->start = 0;
        if (s->len + n > s->cap) {
            size_t cap = s->cap ? s->cap * 2 : 16384;
            while (cap < s->len + n) cap *= 2;
            char *b = (char *)realloc(s->buf, cap);
            if (!b) {
                p->truncated = 1;
                return;
            }
            s->buf = b;
            s->cap = cap;
        }
    }
    memcpy(s->buf + s->start + s->len, data, n);
    s->len += n;
    s->kept += n;
}

static void consume(stream_t *s, size_t n) {
    s->start += n;
    s->len -= n;
    if (s->len == 0) s->start = 0;
}

/* Pushes the result of a read onto L if one is available now; returns whether. */
static int stream_take(stream_t *s, lua_State *L, int mode) {
    if (s->len > 0) {
        const char *b = s->buf + s->start;
        if (mode == READ_CHUNK) {
            lua_pushlstring(L, b, s->len);
            consume(s, s->len);
            return 1;
        }
        const char *nl = (const char *)memchr(b, '\n', s->len);
        if (nl) {
            lua_pushlstring(L, b, (size_t)(nl - b));
            consume(s, (size_t)(nl - b) + 1);
            return 1;
        }
        if (!s->eof) return 0;
        lua_pushlstring(L, b, s->len);
        consume(s, s->len);
        return 1;
    }
    if (!s->eof) return 0;
    lua_pushnil(L);
    return 1;
}

static void serve_reader(stream_t *s) {
    fb_fiber *f = s->reader;
    if (!f || !stream_take(s, fb_co(f), s->mode)) return;
    s->reader = NULL;
    fb_wake(f, 1);
    end_wait(s->p);
}

/* Reads what the pipe holds now, then treats the stream as ended: for a process
 * that is gone while something outside its group still holds the pipe open. */
static void stream_drain_now(stream_t *s) {
    if (!s->open) return;
    uv_os_fd_t fd;
    char buf[65536];
    ssize_t n;
    /* Bounded: a straggler could write as fast as this reads. */
    if (uv_fileno((uv_handle_t *)&s->pipe, &fd) == 0)
        for (int i = 0; i < 16 && (n = read(fd, buf, sizeof buf)) > 0; i++) stream_append(s, buf, (size_t)n);
    stream_close(s);
}

/* ---- completion --------------------------------------------------------------- */

static int finished(proc_t *p) {
    return p->reaped && (!p->out[0].piped || p->out[0].eof) && (!p->out[1].piped || p->out[1].eof);
}

static void push_status(lua_State *L, proc_t *p) {
    lua_createtable(L, 0, 4);
    if (p->reaped && !p->sig) {
        lua_pushinteger(L, p->code);
        lua_setfield(L, -2, "code");
    }
    if (p->sig) {
        lua_pushinteger(L, p->sig);
        lua_setfield(L, -2, "signal");
    }
    lua_pushboolean(L, p->timed_out);
    lua_setfield(L, -2, "timed_out");
    lua_pushboolean(L, p->truncated);
    lua_setfield(L, -2, "truncated");
}

/* Called after every change of state: serves waiting readers and the waiter. */
static void settle(proc_t *p) {
    serve_reader(&p->out[0]);
    serve_reader(&p->out[1]);
    if (!finished(p)) return;
    if (p->timer_open) uv_timer_stop(&p->timer);
    fb_fiber *f = p->waiter;
    if (!f) return;
    p->waiter = NULL;
    push_status(fb_co(f), p);
    fb_wake(f, 1);
    end_wait(p);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    /* libuv reads into this and calls on_read before the next allocation, so
     * one buffer serves every stream; on_read copies what it keeps. */
    static char scratch[65536];
    *buf = uv_buf_init(scratch, sizeof scratch);
}

static void on_read(uv_stream_t *h, ssize_t n, const uv_buf_t *buf) {
    proc_t *p = (proc_t *)h->data;
    stream_t *s = (uv_pipe_t *)h == &p->out[0].pipe ? &p->out[0] : &p->out[1];
    if (n > 0) stream_append(s, buf->base, (size_t)n);
    else if (n < 0) stream_close(s);
    settle(p);
}

static void on_exit_ready(uv_poll_t *h, int status, int events) {
    proc_t *p = (proc_t *)h->data;
    /* The leader is a zombie, so it still holds the group id: stragglers die now. */
    kill(-p->pid, SIGKILL);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    unguard(p->pid);
    if (waitid(P_PIDFD, (id_t)p->pidfd, &si, WEXITED | WNOHANG) != 0 || si.si_pid == 0) {
        guard(p->pid);
        return;
    }
    p->reaped = 1;
    if (si.si_code == CLD_EXITED) p->code = si.si_status;
    else p->sig = si.si_status;
    p->poll_open = 0;
    uv_close((uv_handle_t *)h, on_poll_closed);
    if (p->timed_out) {
        stream_drain_now(&p->out[0]);
        stream_drain_now(&p->out[1]);
    }
    settle(p);
}

static uint64_t to_ms(double secs) {
    double ms = ceil(secs * 1000.0);
    return ms > 9.0e15 ? (uint64_t)9.0e15 : (uint64_t)ms;
}

static void on_timer(uv_timer_t *t) {
    proc_t *p = (proc_t *)t->data;
    p->timed_out = 1;
    if (p->reaped) {
        stream_drain_now(&p->out[0]);
        stream_drain_now(&p->out[1]);
        settle(p);
    } else if (p->stage == T_DEADLINE && p->kill_grace > 0) {
        kill_group(p, SIGTERM);
        p->stage = T_GRACE;
        uv_timer_start(t, on_timer, to_ms(p->kill_grace), 0);
    } else {
        kill_group(p, SIGKILL);
        p->stage = T_KILLED;
    }
}

/* Starts the deadline, or brings an existing one forward. */
static void arm_deadline(proc_t *p, double secs) {
    uint64_t ms = to_ms(secs);
    if (!p->timer_open) {
        uv_timer_init(fb_loop(), &p->timer);
        p->timer.data = p;
        p->timer_open = 1;
        p->refs++;
    } else if (p->stage > T_DEADLINE ||
               (uv_is_active((uv_handle_t *)&p->timer) && uv_timer_get_due_in(&p->timer) <= ms)) {
        return;
    }
    p->stage = T_DEADLINE;
    uv_timer_start(&p->timer, on_timer, ms, 0);
}

/* ---- stdin ---------------------------------------------------------------------- */

static void on_written(uv_write_t *req, int status) {
    write_op *w = (write_op *)req;
    proc_t *p = w->p;
    if (w->close_after) close_handle((uv_handle_t *)&p->in, &p->in_open);
    if (w->fiber) {
        lua_State *co = fb_co(w->fiber);
        if (status == 0) {
            lua_pushboolean(co, 1);
            fb_wake(w->fiber, 1);
        } else {
            fb_wake(w->fiber, fb_push_uv_error(co, status, "write to stdin"));
        }
        end_wait(p);
    }
    free(w);
    proc_unref(p);
}

static void abort_write(void *op) {
    write_op *w = (write_op *)op;
    w->fiber = NULL;
    kill_group(w->p, SIGKILL);
    end_wait(w->p);
}

/* Writes what the pipe takes now, queues the rest. Returns 1 when all was taken,
 * 0 when queued (w is then set), or a libuv error. */
static int stdin_write(proc_t *p, const char *data, size_t n, fb_fiber *f, write_op **queued) {
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)n);
    int done = n == 0 ? 0 : uv_try_write((uv_stream_t *)&p->in, &b, 1);
    if (done < 0 && done != UV_EAGAIN) return done;
    size_t taken = done < 0 ? 0 : (size_t)done;
    if (taken == n) return 1;
    write_op *w = (write_op *)malloc(sizeof *w + n - taken);
    if (!w) return UV_ENOMEM;
    memcpy(w->data, data + taken, n - taken);
    w->p = p;
    w->fiber = f;
    w->close_after = f == NULL;
    b = uv_buf_init(w->data, (unsigned)(n - taken));
    int rc = uv_write(&w->req, (uv_stream_t *)&p->in, &b, 1, on_written);
    if (rc) {
        free(w);
        return rc;
    }
    p->refs++;
    *queued = w;
    return 0;
}

/* ---- spawning ------------------------------------------------------------------- */

/* Converts the value at the top to a string kept alive by the table at anchor;
 * pops it. */
static const char *anchor_string(lua_State *L, int anchor, const char *what) {
    int t = lua_type(L, -1);
    if (t != LUA_TSTRING && t != LUA_TNUMBER) luaL_error(L, "proc.spawn: %s must be a string", what);
    const char *s = lua_tostring(L, -1);
    lua_rawseti(L, anchor, (int)lua_objlen(L, anchor) + 1);
    return s;
}

static int opt_choice(lua_State *L, const char *field, const char *const *choices, const char *listing) {
    lua_getfield(L, 1, field);
    int choice = lua_isnil(L, -1) ? 0 : -1;
    const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    for (int i = 0; v && choices[i]; i++)
        if (strcmp(v, choices[i]) == 0) choice = i;
    lua_pop(L, 1);
    if (choice < 0) return luaL_error(L, "proc.spawn: %s must be one of %s", field, listing);
    return choice;
}

static double opt_seconds(lua_State *L, const char *field) {
    lua_getfield(L, 1, field);
    double v = lua_isnil(L, -1) ? 0 : lua_tonumber(L, -1);
    if (!lua_isnil(L, -1) && (!lua_isnumber(L, -1) || !(v >= 0)))
        luaL_error(L, "proc.spawn: %s must be a number of seconds >= 0", field);
    lua_pop(L, 1);
    return v;
}

/* Finds name in the PATH list; returns whether found (the path is in out). */
static int search_path(const char *dir, const char *name, char *out, size_t outlen) {
    struct stat st;
    size_t nlen = strlen(name);
    for (;;) {
        size_t dlen = strcspn(dir, ":");
        if (dlen > 0 && dlen + nlen + 2 <= outlen) {
            memcpy(out, dir, dlen);
            out[dlen] = '/';
            memcpy(out + dlen + 1, name, nlen + 1);
            if (stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0) return 1;
        }
        if (!dir[dlen]) return 0;
        dir += dlen + 1;
    }
}

/* "ENOEXEC" and the like: libuv names only the errors it produces itself. */
static const char *errno_name(int e) {
    const char *name = strerrorname_np(e);
    return name ? name : "EIO";
}

static void close_fds(int *fds, int n) {
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
}

/* Wraps the engine's end of a pipe. The handle counts as open even if this fails,
 * so that the usual release closes it; the fd is closed either way. */
static int pipe_open(proc_t *p, uv_pipe_t *h, int fd, int *open) {
    uv_pipe_init(fb_loop(), h, 0);
    h->data = p;
    *open = 1;
    p->refs++;
    int rc = uv_pipe_open(h, fd);
    if (rc) close(fd);
    return rc;
}

static void proc_release(proc_t *p);

enum { IO_PIPE, IO_NULL, IO_INHERIT, IO_STDOUT };

static int proc_spawn(lua_State *L) {
    static const char *const io_choices[] = {"pipe", "null", "inherit", NULL};
    static const char *const err_choices[] = {"pipe", "null", "inherit", "stdout", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    fb_check_current(L, "proc.spawn");
    lua_settop(L, 1);
    lua_newtable(L);            /* 2: keeps the strings handed to the child alive */

    lua_getfield(L, 1, "argv");
    if (!lua_istable(L, -1) || lua_objlen(L, -1) == 0)
        return luaL_error(L, "proc.spawn: argv must be a non-empty list of strings");
    int argc = (int)lua_objlen(L, -1);
    char **argv = (char **)lua_newuserdata(L, sizeof(char *) * (size_t)(argc + 1));
    for (int i = 0; i < argc; i++) {
        lua_rawgeti(L, 3, i + 1);
        argv[i] = (char *)anchor_string(L, 2, "each argv item");
    }
    argv[argc] = NULL;
    if (!*argv[0]) return luaL_error(L, "proc.spawn: argv[1] is empty");

    const char *child_path = NULL;
    int envc = 0;
    lua_getfield(L, 1, "env");
    if (!lua_isnil(L, -1)) {
        luaL_argcheck(L, lua_istable(L, -1), 1, "env must be a table of NAME = value");
        for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) envc++;
    }
    char **envp = (char **)lua_newuserdata(L, sizeof(char *) * (size_t)(envc + 2));
    if (envc == 0 && lua_isnil(L, -2)) {
        envp[0] = (char *)"PATH=" DEFAULT_PATH;
        envp[1] = NULL;
    } else {
        int i = 0;
        for (lua_pushnil(L); lua_next(L, -3); lua_pop(L, 1)) {
            const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            if (!name || !*name || strchr(name, '='))
                return luaL_error(L, "proc.spawn: env names must be non-empty strings without '='");
            lua_pushvalue(L, -1);
            const char *value = anchor_string(L, 2, "each env value");
            if (strcmp(name, "PATH") == 0) child_path = value;
            lua_pushfstring(L, "%s=%s", name, value);
            envp[i++] = (char *)anchor_string(L, 2, "env");
        }
        envp[i] = NULL;
    }

    const char *cwd = NULL;
    lua_getfield(L, 1, "cwd");
    if (!lua_isnil(L, -1)) cwd = anchor_string(L, 2, "cwd");
    else lua_pop(L, 1);

    size_t stdin_len = 0;
    const char *stdin_data = NULL;
    int stdin_pipe = 0;
    lua_getfield(L, 1, "stdin");
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "proc.spawn: stdin must be a string or \"pipe\"");
        stdin_data = lua_tolstring(L, -1, &stdin_len);
        stdin_pipe = strcmp(stdin_data, "pipe") == 0;
        if (stdin_pipe) stdin_data = NULL;
    }
    int out_mode = opt_choice(L, "stdout", io_choices, "\"pipe\", \"null\", \"inherit\"");
    int err_mode = opt_choice(L, "stderr", err_choices, "\"pipe\", \"null\", \"inherit\", \"stdout\"");
    double timeout = opt_seconds(L, "timeout");
    double kill_grace = opt_seconds(L, "kill_grace");
    size_t max_output = DEFAULT_MAX_OUTPUT;
    lua_getfield(L, 1, "max_output");
    if (!lua_isnil(L, -1)) {
        double m = lua_tonumber(L, -1);
        if (!lua_isnumber(L, -1) || !(m >= 0)) return luaL_error(L, "proc.spawn: max_output must be a number of bytes >= 0");
        max_output = m >= (double)SIZE_MAX ? SIZE_MAX : (size_t)m;
    }

    char path[PATH_MAX];
    if (strchr(argv[0], '/')) {
        if (strlen(argv[0]) >= sizeof path) return fb_push_error(L, "ENAMETOOLONG", "program path too long");
        strcpy(path, argv[0]);
    } else if (!search_path(child_path ? child_path : DEFAULT_PATH, argv[0], path, sizeof path)) {
        return fb_push_error(L, "ENOENT", "program not found: %s", argv[0]);
    }
    struct stat st;
    if (cwd && (stat(cwd, &st) != 0 || !S_ISDIR(st.st_mode)))
        return fb_push_error(L, "ENOENT", "no such directory: %s", cwd);

    proc_box *box = (proc_box *)lua_newuserdata(L, sizeof *box);
    box->p = NULL;
    box->pid = 0;
    luaL_getmetatable(L, PROC_MT);
    lua_setmetatable(L, -2);

    /* fds[0..1] stdin, [2..3] stdout, [4..5] stderr: read end, write end. */
    int fds[6] = {-1, -1, -1, -1, -1, -1};
    int rc = 0;
    if ((stdin_pipe || stdin_data) && pipe2(fds, O_CLOEXEC) != 0) rc = errno;
    if (!rc && out_mode == IO_PIPE && pipe2(fds + 2, O_CLOEXEC) != 0) rc = errno;
    if (!rc && err_mode == IO_PIPE && pipe2(fds + 4, O_CLOEXEC) != 0) rc = errno;
    if (rc) {
        close_fds(fds, 6);
        return fb_push_error(L, errno_name(rc), "cannot create a pipe: %s", strerror(rc));
    }

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (fds[0] >= 0) posix_spawn_file_actions_adddup2(&fa, fds[0], 0);
    else posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (out_mode == IO_PIPE) posix_spawn_file_actions_adddup2(&fa, fds[3], 1);
    else if (out_mode == IO_NULL) posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    if (err_mode == IO_PIPE) posix_spawn_file_actions_adddup2(&fa, fds[5], 2);
    else if (err_mode == IO_NULL) posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    else if (err_mode == IO_STDOUT) posix_spawn_file_actions_adddup2(&fa, 1, 2);
    /* Descriptors the host opened without O_CLOEXEC (Lua's io.open) stay here. */
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    if (cwd) posix_spawn_file_actions_addchdir_np(&fa, cwd);

    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);     /* the host ignores SIGPIPE; children must not */
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

    /* A signal between the spawn and guard() would miss the child. */
    sigset_t guarded_set, old_mask;
    sigemptyset(&guarded_set);
    for (size_t i = 0; i < sizeof GUARDED_SIGNALS / sizeof *GUARDED_SIGNALS; i++)
        sigaddset(&guarded_set, GUARDED_SIGNALS[i]);
    proc_guard_signals();
    pthread_sigmask(SIG_BLOCK, &guarded_set, &old_mask);
    pid_t pid;
    rc = posix_spawn(&pid, path, &fa, &attr, argv, envp);
    if (!rc) guard(pid);
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close_fds((int[]){fds[0], fds[3], fds[5]}, 3);
    if (rc) {
        close_fds((int[]){fds[1], fds[2], fds[4]}, 3);
        return fb_push_error(L, errno_name(rc), "cannot run %s: %s", path, strerror(rc));
    }

    int pidfd = pidfd_open(pid, 0);
    proc_t *p = pidfd >= 0 ? (proc_t *)calloc(1, sizeof *p) : NULL;
    int uverr = p ? uv_poll_init(fb_loop(), &p->exit_poll, pidfd) : 0;
    if (!p || uverr) {
        rc = pidfd < 0 ? errno : p ? -uverr : ENOMEM;
        free(p);
        kill(-pid, SIGKILL);
        unguard(pid);
        waitpid(pid, NULL, 0);
        if (pidfd >= 0) close(pidfd);
        close_fds((int[]){fds[1], fds[2], fds[4]}, 3);
        return fb_push_error(L, errno_name(rc), "cannot watch %s: %s", path, strerror(rc));
    }
    p->pid = pid;
    p->pidfd = pidfd;
    p->refs = 1;
    p->in_piped = stdin_pipe;
    p->kill_grace = kill_grace;
    p->max_output = max_output;
    p->out[0].p = p->out[1].p = p;
    box->p = p;
    box->pid = pid;

    p->exit_poll.data = p;
    uv_poll_start(&p->exit_poll, UV_READABLE, on_exit_ready);
    p->poll_open = 1;
    p->refs++;
    int err = fds[1] >= 0 ? pipe_open(p, &p->in, fds[1], &p->in_open) : 0;
    for (int i = 0; i < 2; i++) {
        stream_t *s = &p->out[i];
        int fd = fds[2 + 2 * i];
        if (fd < 0) continue;
        s->piped = 1;
        if (err) close(fd);
        else if (!(err = pipe_open(p, &s->pipe, fd, &s->open)))
            uv_read_start((uv_stream_t *)&s->pipe, on_alloc, on_read);
    }
    if (err) {
        box->p = NULL;
        proc_release(p);
        return fb_push_uv_error(L, err, "cannot watch the child's pipes");
    }
    write_op *w = NULL;
    if (stdin_data && stdin_write(p, stdin_data, stdin_len, NULL, &w) != 0)
        close_handle((uv_handle_t *)&p->in, &p->in_open);
    if (timeout > 0) arm_deadline(p, timeout);
    set_loop_refs(p);
    return 1;
}

/* ---- methods -------------------------------------------------------------------- */

static proc_t *check_proc(lua_State *L) {
    proc_box *box = (proc_box *)luaL_checkudata(L, 1, PROC_MT);
    if (!box->p) luaL_argerror(L, 1, "the process is closed");
    return box->p;
}

static stream_t *check_stream(lua_State *L, proc_t *p) {
    static const char *const names[] = {"stdout", "stderr", NULL};
    stream_t *s = &p->out[luaL_checkoption(L, 2, "stdout", names)];
    if (!s->piped) luaL_argerror(L, 2, "that stream is not a pipe");
    return s;
}

static void abort_read(void *op) {
    stream_t *s = (stream_t *)op;
    s->reader = NULL;
    kill_group(s->p, SIGKILL);
    end_wait(s->p);
}

static int read_common(lua_State *L, int mode, const char *what) {
    proc_t *p = check_proc(L);
    stream_t *s = check_stream(L, p);
    fb_fiber *f = fb_check_current(L, what);
    if (s->reader) return luaL_error(L, "%s: another fiber is already reading this stream", what);
    if (stream_take(s, L, mode)) return 1;
    s->reader = f;
    s->mode = mode;
    begin_wait(p);
    return fb_await(L, f, abort_read, s, 0);
}

static int proc_read_line(lua_State *L) { return read_common(L, READ_LINE, "proc:read_line"); }
static int proc_read(lua_State *L) { return read_common(L, READ_CHUNK, "proc:read"); }

static int proc_write(lua_State *L) {
    proc_t *p = check_proc(L);
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    fb_fiber *f = fb_check_current(L, "proc:write");
    if (!p->in_piped) return luaL_error(L, "proc:write: stdin is not a pipe (spawn with stdin = \"pipe\")");
    if (!p->in_open) return fb_push_error(L, "EPIPE", "stdin is closed");
    write_op *w = NULL;
    int rc = stdin_write(p, data, n, f, &w);
    if (rc < 0) return fb_push_uv_error(L, rc, "write to stdin");
    if (rc == 1) {
        lua_pushboolean(L, 1);
        return 1;
    }
    begin_wait(p);
    return fb_await(L, f, abort_write, w, 0);
}

static int proc_close_stdin(lua_State *L) {
    proc_t *p = check_proc(L);
    close_handle((uv_handle_t *)&p->in, &p->in_open);
    return 0;
}

static void abort_wait(void *op) {
    proc_t *p = (proc_t *)op;
    p->waiter = NULL;
    kill_group(p, SIGKILL);
    end_wait(p);
}

static int proc_wait(lua_State *L) {
    proc_t *p = check_proc(L);
    double timeout = luaL_optnumber(L, 2, 0);
    fb_fiber *f = fb_check_current(L, "proc:wait");
    if (finished(p)) {
        push_status(L, p);
        return 1;
    }
    if (p->waiter) return luaL_error(L, "proc:wait: another fiber is already waiting for this process");
    if (timeout > 0) arm_deadline(p, timeout);
    p->waiter = f;
    begin_wait(p);
    return fb_await(L, f, abort_wait, p, 0);
}

static int check_signal(lua_State *L, int idx) {
    static const struct { const char *name; int sig; } names[] = {
        {"HUP", SIGHUP}, {"INT", SIGINT}, {"QUIT", SIGQUIT}, {"KILL", SIGKILL}, {"USR1", SIGUSR1},
        {"USR2", SIGUSR2}, {"TERM", SIGTERM}, {"CONT", SIGCONT}, {"STOP", SIGSTOP}, {NULL, 0},
    };
    if (lua_isnoneornil(L, idx)) return SIGTERM;
    if (lua_type(L, idx) == LUA_TNUMBER) return (int)lua_tointeger(L, idx);
    const char *s = luaL_checkstring(L, idx);
    if (strncmp(s, "SIG", 3) == 0) s += 3;
    for (int i = 0; names[i].name; i++)
        if (strcmp(s, names[i].name) == 0) return names[i].sig;
    return luaL_argerror(L, idx, "unknown signal name");
}

static int proc_kill(lua_State *L) {
    proc_t *p = check_proc(L);
    int sig = check_signal(L, 2);
    if (p->reaped) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (kill(-p->pid, sig) != 0) return fb_push_error(L, errno_name(errno), "kill: %s", strerror(errno));
    lua_pushboolean(L, 1);
    return 1;
}

/* Kills the child if it runs, closes the handles and drops the Lua reference. The
 * exit poll stays to reap the child, except at shutdown, when the loop will not run
 * again: then the SIGKILLed child is reaped here. */
static void proc_release(proc_t *p) {
    kill_group(p, SIGKILL);
    close_handle((uv_handle_t *)&p->in, &p->in_open);
    stream_close(&p->out[0]);
    stream_close(&p->out[1]);
    close_handle((uv_handle_t *)&p->timer, &p->timer_open);
    if (fb_closing()) {
        if (!p->reaped) {
            unguard(p->pid);
            waitpid(p->pid, NULL, 0);   /* not waitid(P_PIDFD): the pidfd is non-blocking */
            p->reaped = 1;
        }
        if (p->poll_open) {
            p->poll_open = 0;
            uv_close((uv_handle_t *)&p->exit_poll, on_poll_closed);
        }
    } else {
        /* Fibers still waiting learn it now; at shutdown the runtime aborts them. */
        int woken = 0;
        for (int i = 0; i < 2; i++) {
            fb_fiber *f = p->out[i].reader;
            if (!f) continue;
            p->out[i].reader = NULL;
            fb_wake(f, fb_push_error(fb_co(f), "ECANCELED", "the process was closed"));
            woken++;
        }
        if (p->waiter) {
            fb_fiber *f = p->waiter;
            p->waiter = NULL;
            fb_wake(f, fb_push_error(fb_co(f), "ECANCELED", "the process was closed"));
            woken++;
        }
        p->waiting -= woken;
        p->refs -= woken;       /* the Lua reference still holds p */
        set_loop_refs(p);
    }
    proc_unref(p);
}

static int proc_close(lua_State *L) {
    proc_box *box = (proc_box *)luaL_checkudata(L, 1, PROC_MT);
    proc_t *p = box->p;
    box->p = NULL;
    if (p) proc_release(p);
    return 0;
}

static int proc_index(lua_State *L) {
    proc_box *box = (proc_box *)luaL_checkudata(L, 1, PROC_MT);
    const char *key = lua_tostring(L, 2);
    if (key && strcmp(key, "pid") == 0) {
        lua_pushinteger(L, box->pid);
        return 1;
    }
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    return 1;
}

static int proc_getpid(lua_State *L) {
    lua_pushinteger(L, getpid());
    return 1;
}

/* which(name [, PATH]) -> the program spawn would run for argv[1] = name | nil */
static int proc_which(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    const char *dirs = luaL_optstring(L, 2, DEFAULT_PATH);
    char path[PATH_MAX];
    struct stat st;
    if (strchr(name, '/')) {
        if (stat(name, &st) != 0 || !S_ISREG(st.st_mode) || access(name, X_OK) != 0) return 0;
        lua_pushstring(L, name);
        return 1;
    }
    if (!*name || !search_path(dirs, name, path, sizeof path)) return 0;
    lua_pushstring(L, path);
    return 1;
}

static const luaL_Reg proc_methods[] = {
    {"read_line", proc_read_line},
    {"read", proc_read},
    {"write", proc_write},
    {"close_stdin", proc_close_stdin},
    {"wait", proc_wait},
    {"kill", proc_kill},
    {"close", proc_close},
    {NULL, NULL},
};

static const luaL_Reg proc_functions[] = {
    {"spawn", proc_spawn},
    {"getpid", proc_getpid},
    {"which", proc_which},
    {NULL, NULL},
};

int luaopen_factory_core_proc(lua_State *L) {
    if (luaL_newmetatable(L, PROC_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, proc_methods);
        lua_pushcclosure(L, proc_index, 1);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, proc_close);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, proc_functions);
    return 1;
}
