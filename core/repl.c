/* core/repl.c — factory.core.repl: line input for `factory repl` that never blocks
 * the loop, so servers, timers and background fibers keep running while the prompt
 * waits.
 *
 * On a terminal, libedit's readline-compatible callback interface edits the line
 * (history, arrows, Ctrl-R): a uv_poll on fd 0 hands it each keystroke. The terminal
 * is raw only while a readline waits, so output of the code run between lines, and
 * a crash, find it in its normal mode. Otherwise (a pipe, a file) lines are read
 * without libedit and no prompt is shown.
 *
 * On a terminal, Ctrl-C (SIGINT) is caught from the first read until close(): at the
 * prompt it abandons the line (readline returns nil, "EINTR: ...", "EINTR"); while
 * code runs it wakes wait_interrupt(). A second Ctrl-C before the loop has seen the
 * first means Lua is busy and cannot be interrupted: it kills the process as usual,
 * after putting the terminal back. After Ctrl-Z and fg the shell hands the terminal
 * back in its own mode; SIGCONT makes it raw again if the prompt was waiting.
 *
 * libedit keeps its state in globals, so this module is a process-wide singleton;
 * its state is static and C-owned, and only the waiting fibers come from Lua.
 *
 *   readline([prompt]) -> line | nil at end of input | nil, "EINTR: ...", "EINTR"
 *   wait_interrupt()   -> true when Ctrl-C is pressed (nil once closed)
 *   add_history(line), load_history(path), save_history(path) -> true | nil, err
 *   isatty(), close()
 */
#include <stdio.h>

#include <editline/readline.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <locale.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "fiber.h"

#define REPL_GUARD "factory.repl.guard"
#define HISTORY_MAX 1000        /* libedit keeps every entry unless told otherwise */

enum { REPL_NEW, REPL_OPEN, REPL_CLOSED };

static struct {
    int state;
    int tty;
    int pollable;               /* fd 0 works with uv_poll (a regular file does not) */
    int editing;                /* libedit's handler is installed: the terminal is raw */
    int libedit_ready;
    uv_poll_t poll;
    uv_async_t interrupt;       /* how the SIGINT handler gets back into the loop */
    uv_signal_t resume;         /* SIGCONT: after Ctrl-Z and fg */
    struct sigaction old_sigint;
    struct termios cooked;      /* the terminal as we found it */
    fb_fiber *reader, *waiter;
    char *line;                 /* the line libedit just completed (NULL: Ctrl-D) */
    int line_done;
    char *buf;                  /* input from a pipe or file not yet returned */
    size_t len, cap;
    int eof;
} in;

static volatile sig_atomic_t sigint_seen;

static void repl_on_sigint(int sig) {
    if (sigint_seen) {  /* only async-signal-safe calls here */
        tcsetattr(STDIN_FILENO, TCSANOW, &in.cooked);
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    sigint_seen = 1;
    uv_async_send(&in.interrupt);
}

/* Before libedit's first use. It decodes keystrokes by the locale's character set,
 * and in the "C" locale a program starts in it drops every non-ASCII character;
 * only LC_CTYPE changes, so number formatting stays as Lua expects. */
static void repl_libedit_setup(void) {
    if (in.libedit_ready) return;
    in.libedit_ready = 1;
    const char *loc = setlocale(LC_CTYPE, "");
    if (!loc || !strcmp(loc, "C") || !strcmp(loc, "POSIX")) setlocale(LC_CTYPE, "C.UTF-8");
    stifle_history(HISTORY_MAX);
}

/* Stops listening to fd 0 and gives the terminal back its normal mode. */
static void repl_stop_reading(void) {
    if (in.pollable) uv_poll_stop(&in.poll);
    if (in.editing) {
        rl_callback_handler_remove();
        in.editing = 0;
    }
}

/* Takes the waiting reader off the module's books, ready to be woken. */
static fb_fiber *repl_take_reader(void) {
    fb_fiber *f = in.reader;
    in.reader = NULL;
    repl_stop_reading();
    return f;
}

static void repl_reader_abort(void *op) {
    (void)op;
    repl_take_reader();
}

static void repl_waiter_abort(void *op) {
    (void)op;
    in.waiter = NULL;
}

static void repl_on_interrupt(uv_async_t *a) {
    (void)a;
    sigint_seen = 0;
    fb_fiber *f;
    if (in.reader) {
        f = repl_take_reader();
        fputs("^C\n", stdout);
        fflush(stdout);
        fb_wake(f, fb_push_error(fb_co(f), "EINTR", "interrupted"));
    } else if ((f = in.waiter)) {
        in.waiter = NULL;
        lua_pushboolean(fb_co(f), 1);
        fb_wake(f, 1);
    }
}

/* The shell gave the terminal back in its own mode: make it raw again and redraw
 * the prompt and the line as typed so far. */
static void repl_on_resume(uv_signal_t *h, int sig) {
    (void)h;
    (void)sig;
    if (!in.editing) return;
    rl_deprep_terminal();
    rl_prep_terminal(0);
    rl_forced_update_display();
}

static void repl_open(void) {
    if (in.state != REPL_NEW) return;
    in.state = REPL_OPEN;
    in.tty = isatty(STDIN_FILENO);
    /* uv_poll_init makes fd 0 non-blocking; on a terminal that open file is shared
     * with stdout and with the shell, which must not see it so. */
    int flags = fcntl(STDIN_FILENO, F_GETFL);
    in.pollable = uv_poll_init(fb_loop(), &in.poll, STDIN_FILENO) == 0;
    if (flags != -1) fcntl(STDIN_FILENO, F_SETFL, flags);
    uv_async_init(fb_loop(), &in.interrupt, repl_on_interrupt);
    uv_unref((uv_handle_t *)&in.interrupt);
    if (in.tty) {
        tcgetattr(STDIN_FILENO, &in.cooked);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = repl_on_sigint;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART;
        sigaction(SIGINT, &sa, &in.old_sigint);
        uv_signal_init(fb_loop(), &in.resume);
        uv_signal_start(&in.resume, repl_on_resume, SIGCONT);
        uv_unref((uv_handle_t *)&in.resume);
    }
}

/* Restores the terminal and SIGINT and closes the handles. wake: whether waiting
 * fibers get nil (an explicit close) or are just forgotten (the state is closing). */
static void repl_shutdown(int wake) {
    if (in.state != REPL_OPEN) return;
    in.state = REPL_CLOSED;
    fb_fiber *r = repl_take_reader(), *w = in.waiter;
    in.waiter = NULL;
    if (in.tty) {
        sigaction(SIGINT, &in.old_sigint, NULL);
        uv_close((uv_handle_t *)&in.resume, NULL);
    }
    if (in.pollable) uv_close((uv_handle_t *)&in.poll, NULL);
    uv_close((uv_handle_t *)&in.interrupt, NULL);
    free(in.buf);
    free(in.line);
    in.buf = in.line = NULL;
    in.len = in.cap = 0;
    if (!wake) return;
    if (r) fb_wake(r, 0);
    if (w) fb_wake(w, 0);
}

/* ---- input from a pipe or a file --------------------------------------------- */

/* Pushes the next complete line of the buffer (at end of input, the rest) onto L.
 * Returns whether it pushed one. */
static int repl_take_line(lua_State *L) {
    char *nl = in.len ? memchr(in.buf, '\n', in.len) : NULL;
    if (!nl && !(in.eof && in.len)) return 0;
    size_t n = nl ? (size_t)(nl - in.buf) : in.len;
    size_t used = nl ? n + 1 : n;
    if (n && in.buf[n - 1] == '\r') n--;
    lua_pushlstring(L, in.buf, n);
    memmove(in.buf, in.buf + used, in.len - used);
    in.len -= used;
    return 1;
}

/* Reads what fd 0 has into the buffer; sets eof at end of input or on error. */
static void repl_fill(void) {
    if (in.cap - in.len < 4096) {
        char *p = realloc(in.buf, in.cap + 8192);
        if (!p) {
            in.eof = 1;
            return;
        }
        in.buf = p;
        in.cap += 8192;
    }
    ssize_t n = read(STDIN_FILENO, in.buf + in.len, in.cap - in.len);
    if (n > 0) in.len += (size_t)n;
    else if (n == 0 || (errno != EAGAIN && errno != EINTR)) in.eof = 1;
}

/* ---- the terminal ---------------------------------------------------------------- */

static void repl_on_line(char *line) {
    in.line = line;
    in.line_done = 1;
}

/* One keystroke (or escape sequence) for libedit. The line is delivered after
 * rl_callback_read_char has returned, so the woken fiber may start the next
 * readline without re-entering libedit. */
static void repl_on_key(int status, int events) {
    int avail = 0;
    /* A hung-up terminal stays readable with nothing to read: that is the end. */
    if (status < 0 || ((events & UV_DISCONNECT) && (ioctl(STDIN_FILENO, FIONREAD, &avail) < 0 || avail == 0))) {
        fb_fiber *f = repl_take_reader();
        fb_wake(f, 0);
        return;
    }
    rl_callback_read_char();
    if (!in.line_done) return;
    char *line = in.line;
    in.line = NULL;
    in.line_done = 0;
    fb_fiber *f = repl_take_reader();
    if (!line) {
        fputc('\n', stdout);   /* Ctrl-D: leave the shell's prompt a line of its own */
        fflush(stdout);
        fb_wake(f, 0);
        return;
    }
    lua_pushstring(fb_co(f), line);
    free(line);
    fb_wake(f, 1);
}

static void repl_on_readable(uv_poll_t *h, int status, int events) {
    (void)h;
    if (!in.reader) return;
    if (in.tty) {
        repl_on_key(status, events);
        return;
    }
    if (status < 0) in.eof = 1;
    else repl_fill();
    lua_State *co = fb_co(in.reader);
    int n = repl_take_line(co);
    if (!n && !in.eof) return;
    fb_wake(repl_take_reader(), n);
}

/* ---- Lua functions ------------------------------------------------------------------ */

static int repl_readline(lua_State *L) {
    const char *prompt = luaL_optstring(L, 1, "");
    fb_fiber *f = fb_check_current(L, "repl.readline");
    if (in.reader) return luaL_error(L, "repl.readline: another fiber is already reading");
    repl_open();
    if (in.state == REPL_CLOSED) return 0;
    if (!in.tty) {
        for (;;) {
            if (repl_take_line(L)) return 1;
            if (in.eof) return 0;
            if (in.pollable) break;
            repl_fill();    /* a regular file: reading it does not block */
        }
    } else {
        if (!in.pollable) return fb_push_error(L, "EIO", "the terminal on stdin cannot be polled");
        repl_libedit_setup();
        fflush(stdout);
        rl_callback_handler_install(prompt, repl_on_line);
        in.editing = 1;
    }
    int rc = uv_poll_start(&in.poll, UV_READABLE | UV_DISCONNECT, repl_on_readable);
    if (rc < 0) {
        repl_stop_reading();
        return fb_push_uv_error(L, rc, "reading stdin");
    }
    in.reader = f;
    return fb_await(L, f, repl_reader_abort, &in.reader, 0);
}

static int repl_wait_interrupt(lua_State *L) {
    fb_fiber *f = fb_check_current(L, "repl.wait_interrupt");
    if (in.waiter) return luaL_error(L, "repl.wait_interrupt: another fiber is already waiting");
    repl_open();
    if (in.state == REPL_CLOSED) return 0;
    in.waiter = f;
    return fb_await(L, f, repl_waiter_abort, &in.waiter, 0);
}

static int repl_add_history(lua_State *L) {
    const char *line = luaL_checkstring(L, 1);
    repl_libedit_setup();
    add_history(line);
    return 0;
}

/* libedit's history functions return an errno value, or EINVAL for a bad file. */
static int repl_history_result(lua_State *L, int err, const char *path) {
    if (err) return fb_push_uv_error(L, -err, path);
    lua_pushboolean(L, 1);
    return 1;
}

static int repl_load_history(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    repl_libedit_setup();
    return repl_history_result(L, read_history(path), path);
}

static int repl_save_history(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    repl_libedit_setup();
    return repl_history_result(L, write_history(path), path);
}

static int repl_isatty(lua_State *L) {
    lua_pushboolean(L, isatty(STDIN_FILENO));
    return 1;
}

static int repl_close(lua_State *L) {
    (void)L;
    repl_shutdown(1);
    return 0;
}

/* The guard's __gc: at lua_close, whatever happened, the terminal is put back. */
static int repl_guard_gc(lua_State *L) {
    (void)L;
    repl_shutdown(0);
    return 0;
}

static const luaL_Reg repl_functions[] = {
    {"readline",       repl_readline},
    {"wait_interrupt", repl_wait_interrupt},
    {"add_history",    repl_add_history},
    {"load_history",   repl_load_history},
    {"save_history",   repl_save_history},
    {"isatty",         repl_isatty},
    {"close",          repl_close},
    {NULL, NULL},
};

int luaopen_factory_core_repl(lua_State *L) {
    /* Before libedit's first use: the SIGINT policy above is ours, and ~/.editrc
     * settings under "factory:" apply. */
    rl_catch_signals = 0;
    rl_readline_name = "factory";
    lua_newuserdata(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, repl_guard_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, REPL_GUARD);
    lua_newtable(L);
    luaL_register(L, NULL, repl_functions);
    return 1;
}
