/* core/signal.c — factory.core.signal: a fiber waits for POSIX signals, delivered
 * through libuv (uv_signal_t), so no Lua ever runs in a signal handler.
 *
 *   signal.wait(name, ...) -> name
 *       names: "INT", "TERM", "HUP", "USR1", "USR2" (one to five of them). Yields
 *       the calling fiber until one of the signals arrives and returns its name.
 *       While a fiber waits, those signals are caught; once no fiber waits for a
 *       signal any more, libuv gives it back its default action (for INT and TERM:
 *       ending the process, after factory.core.proc's guard has killed the
 *       process groups the host started).
 *
 * Lifetimes: a wait is malloc'd and freed when the last of its uv handles has
 * closed, which happens when a signal arrives or when the wait is abandoned.
 */
#include "fiber.h"
#include "proc.h"

#include <lauxlib.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SIGNALS 5

static const struct {
    const char *name;
    int signum;
} NAMES[MAX_SIGNALS] = {
    {"INT", SIGINT}, {"TERM", SIGTERM}, {"HUP", SIGHUP}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2},
};

typedef struct {
    uv_signal_t h[MAX_SIGNALS];
    int n, open;                /* handles started; not yet closed */
    fb_fiber *fiber;            /* NULL once woken or abandoned */
} waiter;

/* A signal no handle watches any more has its default action back (libuv's doing):
 * the children's guard goes back over it. */
static void signal_closed(uv_handle_t *h) {
    waiter *w = (waiter *)h->data;
    if (--w->open > 0) return;
    free(w);
    proc_guard_signals();
}

static void signal_close(waiter *w) {
    for (int i = 0; i < w->n; i++) uv_close((uv_handle_t *)&w->h[i], signal_closed);
}

static void signal_arrived(uv_signal_t *h, int signum) {
    waiter *w = (waiter *)h->data;
    fb_fiber *f = w->fiber;
    if (!f) return;
    w->fiber = NULL;
    signal_close(w);
    for (int i = 0; i < MAX_SIGNALS; i++)
        if (NAMES[i].signum == signum) lua_pushstring(fb_co(f), NAMES[i].name);
    fb_wake(f, 1);
}

static void signal_abort(void *op) {
    waiter *w = (waiter *)op;
    w->fiber = NULL;
    signal_close(w);
}

static int signal_check(lua_State *L, int arg) {
    const char *name = luaL_checkstring(L, arg);
    for (int i = 0; i < MAX_SIGNALS; i++)
        if (strcmp(NAMES[i].name, name) == 0) return NAMES[i].signum;
    return luaL_argerror(L, arg, "expected \"INT\", \"TERM\", \"HUP\", \"USR1\" or \"USR2\"");
}

static int signal_wait(lua_State *L) {
    int n = lua_gettop(L);
    luaL_argcheck(L, n >= 1 && n <= MAX_SIGNALS, 1, "one to five signal names expected");
    int nums[MAX_SIGNALS];
    for (int i = 0; i < n; i++) nums[i] = signal_check(L, i + 1);
    fb_fiber *f = fb_check_current(L, "signal.wait");
    if (fb_closing()) return luaL_error(L, "signal.wait: the runtime is shutting down");
    waiter *w = (waiter *)calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "signal.wait: out of memory");
    for (int i = 0; i < n; i++) {
        uv_signal_init(fb_loop(), &w->h[i]);
        w->h[i].data = w;
        w->n++;
        w->open++;
        int err = uv_signal_start(&w->h[i], signal_arrived, nums[i]);
        if (err) {
            signal_close(w);
            return fb_push_uv_error(L, err, "signal.wait");
        }
    }
    w->fiber = f;
    return fb_await(L, f, signal_abort, w, 0);
}

static const luaL_Reg signal_functions[] = {
    {"wait", signal_wait},
    {NULL, NULL},
};

int luaopen_factory_core_signal(lua_State *L) {
    lua_newtable(L);
    luaL_register(L, NULL, signal_functions);
    return 1;
}
