/* core/fiber.c — factory.core.fiber: the fiber scheduler on the process's libuv loop.
 *
 * Owns: the ready queue, each fiber's coroutine and timer, the one place where the
 * loop re-enters Lua (fiber_step), and the reporting of fibers that fail unobserved.
 * Combinators (join, all, any, timeouts, conditions) are policy and live in
 * lua/factory/fiber.lua on top of park/wake/subscribe.
 *
 * Lifetimes: a fiber is a userdata "factory.fiber" whose environment table holds its
 * coroutine, results and subscribers. While not finished it is pinned by a registry
 * reference, so C may hold fb_fiber pointers exactly until the fiber finishes; at
 * finish every pending operation has been woken or aborted and the timer is closed.
 */
#include "fiber.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIBER_MT "factory.fiber"

enum { FB_READY, FB_RUNNING, FB_WAITING, FB_DONE };
enum { FB_OK, FB_FAILED, FB_CANCELLED };
enum { WAIT_NONE, WAIT_OP, WAIT_SLEEP, WAIT_PARK };

struct fb_fiber {
    lua_State *co;
    int self_ref;           /* pins the userdata until the fiber finishes */
    int state, outcome, wait_kind;
    fb_abort_fn abort;
    void *op;
    uv_timer_t *timer;      /* allocated on first timed wait, closed at finish */
    double timeout;         /* of the current wait, for the error message */
    int nargs;              /* values waiting on co's stack for the next resume */
    int cancelling;         /* set when a fiber cancels itself (its error is the reason),
                               or while its wait is aborted because it is cancelled */
    int quiet;              /* its failure is reported by its owner (fiber.run) */
    int nsubs;
    uint64_t id;
    fb_fiber *prev, *next;  /* ready or deferred queue */
};

typedef struct {
    fb_fiber *head, *tail;
} fb_queue;

static struct {
    lua_State *L;           /* main thread, valid while fiber.run is on the C stack */
    fb_fiber *running;
    fb_queue ready;         /* resumed in this turn of the loop */
    fb_queue deferred;      /* yielded voluntarily: resumed after the loop polls */
    uv_idle_t idle;
    int idle_init;
    int draining;
    int in_run;
    int closing;
    uint64_t next_id;
    long live;
} rt;

uv_loop_t *fb_loop(void) { return uv_default_loop(); }
int fb_closing(void) { return rt.closing; }

/* ---- queues ---------------------------------------------------------------- */

static void queue_push(fb_queue *q, fb_fiber *f) {
    f->next = NULL;
    f->prev = q->tail;
    if (q->tail) q->tail->next = f; else q->head = f;
    q->tail = f;
}

static fb_fiber *queue_pop(fb_queue *q) {
    fb_fiber *f = q->head;
    if (!f) return NULL;
    q->head = f->next;
    if (q->head) q->head->prev = NULL; else q->tail = NULL;
    f->next = f->prev = NULL;
    return f;
}

static void queue_remove(fb_queue *q, fb_fiber *f) {
    if (f->prev) f->prev->next = f->next; else if (q->head == f) q->head = f->next; else return;
    if (f->next) f->next->prev = f->prev; else q->tail = f->prev;
    f->next = f->prev = NULL;
}

/* ---- errors ---------------------------------------------------------------- */

int fb_push_error(lua_State *L, const char *code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", code, msg);
    lua_pushstring(L, code);
    return 3;
}

int fb_push_uv_error(lua_State *L, int uverr, const char *context) {
    if (context)
        return fb_push_error(L, uv_err_name(uverr), "%s (%s)", uv_strerror(uverr), context);
    return fb_push_error(L, uv_err_name(uverr), "%s", uv_strerror(uverr));
}

/* Pushes a readable text for the error value at idx: strings as they are, tables by
 * __tostring or as "code: message" (or the code alone). */
static const char *push_error_text(lua_State *L, int idx) {
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
        lua_pushvalue(L, idx);
        return lua_tostring(L, -1);
    }
    if (luaL_getmetafield(L, idx, "__tostring")) {
        lua_pushvalue(L, idx);
        if (lua_pcall(L, 1, 1, 0) == 0 && lua_isstring(L, -1)) return lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    if (lua_type(L, idx) == LUA_TTABLE) {
        lua_getfield(L, idx, "code");
        lua_getfield(L, idx, "message");
        if (lua_isstring(L, -1)) {
            const char *code = lua_isstring(L, -2) ? lua_tostring(L, -2) : "error";
            lua_pushfstring(L, "%s: %s", code, lua_tostring(L, -1));
            lua_replace(L, -3);
            lua_pop(L, 1);
            return lua_tostring(L, -1);
        }
        lua_pop(L, 1);
        if (lua_isstring(L, -1)) return lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
    return lua_tostring(L, -1);
}

/* ---- fiber objects ---------------------------------------------------------- */

static fb_fiber *check_fiber(lua_State *L, int idx) {
    return (fb_fiber *)luaL_checkudata(L, idx, FIBER_MT);
}

static void push_fiber(lua_State *L, fb_fiber *f) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->self_ref);
}

/* Creates a fiber whose coroutine is ready to call the function at the stack top
 * (popped). Pushes the fiber userdata. */
static fb_fiber *fiber_new(lua_State *L) {
    fb_fiber *f = (fb_fiber *)lua_newuserdata(L, sizeof *f);
    memset(f, 0, sizeof *f);
    f->self_ref = LUA_NOREF;
    luaL_getmetatable(L, FIBER_MT);
    lua_setmetatable(L, -2);
    lua_createtable(L, 1, 2);
    f->co = lua_newthread(L);
    lua_rawseti(L, -2, 1);
    lua_setfenv(L, -2);
    lua_pushvalue(L, -1);
    f->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    f->id = ++rt.next_id;
    f->state = FB_READY;
    rt.live++;
    lua_insert(L, -2);          /* ud, fn */
    lua_xmove(L, f->co, 1);
    return f;
}

static void idle_cb(uv_idle_t *h);

static void drain(void);

static void make_ready(fb_fiber *f, int nargs) {
    f->state = FB_READY;
    f->nargs = nargs;
    queue_push(&rt.ready, f);
}

static void defer(fb_fiber *f) {
    f->state = FB_READY;
    f->nargs = 0;
    queue_push(&rt.deferred, f);
    if (!rt.idle_init) {
        uv_idle_init(fb_loop(), &rt.idle);
        rt.idle_init = 1;
    }
    if (!uv_is_active((uv_handle_t *)&rt.idle)) uv_idle_start(&rt.idle, idle_cb);
}

static void idle_cb(uv_idle_t *h) {
    fb_fiber *f;
    uv_idle_stop(h);
    while ((f = queue_pop(&rt.deferred))) queue_push(&rt.ready, f);
    drain();
}

static void timer_close_cb(uv_handle_t *h) { free(h); }

static void timer_stop(fb_fiber *f) {
    if (f->timer) uv_timer_stop(f->timer);
}

static void timer_release(fb_fiber *f) {
    if (f->timer) {
        f->timer->data = NULL;
        uv_close((uv_handle_t *)f->timer, timer_close_cb);
        f->timer = NULL;
    }
}

static void report_failure(fb_fiber *f, const char *trace) {
    fprintf(stderr, "factory: fiber #%llu failed: %s\n", (unsigned long long)f->id, trace);
    fflush(stderr);
}

/* Wakes every parked subscriber with the finished fiber; the subscriber table is in
 * the fiber's environment at the stack top. */
static void notify_subscribers(lua_State *L, fb_fiber *f) {
    lua_getfield(L, -1, "subs");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        fb_fiber *w = (fb_fiber *)lua_touserdata(L, -1);
        if (w && w->state == FB_WAITING && w->wait_kind == WAIT_PARK) {
            push_fiber(L, f);
            lua_xmove(L, w->co, 1);
            fb_wake(w, 1);
        }
    }
    lua_pop(L, 1);
}

/* Records the outcome of f. For FB_OK the results are co's whole stack; for
 * FB_FAILED and FB_CANCELLED the error value is at L's top (popped). */
static void finish(lua_State *L, fb_fiber *f, int outcome) {
    int top = lua_gettop(L);
    int errv = top;
    push_fiber(L, f);
    lua_getfenv(L, -1);
    int env = lua_gettop(L);
    if (outcome == FB_OK) {
        int n = lua_gettop(f->co);
        lua_createtable(L, n, 1);
        lua_pushinteger(L, n);
        lua_setfield(L, -2, "n");
        lua_xmove(f->co, L, n);
        for (int i = n; i >= 1; i--) lua_rawseti(L, env + 1, i);
        lua_setfield(L, env, "res");
    } else {
        lua_pushvalue(L, errv);
        lua_setfield(L, env, "err");
        if (outcome == FB_FAILED) {
            const char *text = push_error_text(L, errv);
            luaL_traceback(L, f->co, text, 0);
            lua_setfield(L, env, "tb");
            lua_pop(L, 1);
        }
    }
    lua_pushnil(L);
    lua_rawseti(L, env, 1);     /* let the dead coroutine be collected */
    f->co = NULL;
    f->outcome = outcome;
    f->state = FB_DONE;
    f->abort = NULL;
    f->op = NULL;
    timer_release(f);
    rt.live--;
    if (outcome == FB_FAILED && !f->quiet && f->nsubs == 0) {
        lua_getfield(L, env, "tb");
        report_failure(f, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    notify_subscribers(L, f);
    luaL_unref(L, LUA_REGISTRYINDEX, f->self_ref);
    f->self_ref = LUA_NOREF;
    lua_settop(L, outcome == FB_OK ? top : top - 1);
}

/* The single re-entry point from the loop into Lua. */
static void fiber_step(fb_fiber *f) {
    lua_State *co = f->co;
    f->state = FB_RUNNING;
    rt.running = f;
    int st = lua_resume(co, f->nargs);
    f->nargs = 0;
    rt.running = NULL;
    if (st == LUA_YIELD) {
        if (f->state == FB_RUNNING) {   /* a bare coroutine.yield or fiber.yield */
            lua_settop(co, 0);
            defer(f);
        }
        return;
    }
    if (st == 0) {
        finish(rt.L, f, FB_OK);
    } else {
        lua_xmove(co, rt.L, 1);
        finish(rt.L, f, f->cancelling ? FB_CANCELLED : FB_FAILED);
    }
}

static void drain(void) {
    if (rt.draining || rt.running || !rt.in_run || rt.closing) return;
    rt.draining = 1;
    fb_fiber *f;
    while ((f = queue_pop(&rt.ready))) fiber_step(f);
    rt.draining = 0;
}

/* ---- the C API --------------------------------------------------------------- */

fb_fiber *fb_running(lua_State *L) {
    return (rt.running && rt.running->co == L) ? rt.running : NULL;
}

/* A fiber inside a C call that runs Lua cannot yield: LuaJIT raises, after the
 * caller started the operation it waits for, whose completion would then resume a
 * fiber that never yielded for it. */
fb_fiber *fb_current(lua_State *L) {
    fb_fiber *f = fb_running(L);
    return f && lua_isyieldable(L) ? f : NULL;
}

fb_fiber *fb_check_current(lua_State *L, const char *what) {
    fb_fiber *f = fb_current(L);
    if (f) return f;
    if (fb_running(L))
        luaL_error(L, "%s: cannot wait inside a C call that runs Lua code (dofile, require, a table.sort comparator, "
                      "a string.gsub callback); call it from the fiber's own code", what);
    luaL_error(L, "%s: must be called from a fiber (not the main thread or a plain coroutine)", what);
    return NULL;
}

lua_State *fb_co(fb_fiber *f) { return f->co; }

int fb_cancelling(fb_fiber *f) { return f->cancelling; }

static void timer_cb(uv_timer_t *t) {
    fb_fiber *f = (fb_fiber *)t->data;
    if (!f || f->state != FB_WAITING) return;
    if (f->wait_kind == WAIT_SLEEP) {
        fb_wake(f, 0);
        return;
    }
    if (f->abort) f->abort(f->op);
    f->abort = NULL;
    lua_State *co = f->co;
    lua_pushnil(co);
    lua_pushfstring(co, "ETIMEDOUT: timed out after %f s", f->timeout);
    lua_pushliteral(co, "ETIMEDOUT");
    fb_wake(f, 3);
}

static void start_wait(fb_fiber *f, int kind, fb_abort_fn abort, void *op, double timeout) {
    f->state = FB_WAITING;
    f->wait_kind = kind;
    f->abort = abort;
    f->op = op;
    f->timeout = timeout;
    if (timeout > 0) {
        if (!f->timer) {
            f->timer = (uv_timer_t *)malloc(sizeof *f->timer);
            uv_timer_init(fb_loop(), f->timer);
        }
        f->timer->data = f;
        /* The loop's cached clock may be stale after a long turn; a timer measured
         * from it would fire early. */
        uv_update_time(fb_loop());
        double ms = timeout * 1000.0;
        uint64_t ims = ms > 9.0e15 ? (uint64_t)9.0e15 : (uint64_t)ms;
        if ((double)ims < ms) ims++;
        uv_timer_start(f->timer, timer_cb, ims, 0);
    }
}

int fb_await(lua_State *L, fb_fiber *f, fb_abort_fn abort, void *op, double timeout) {
    start_wait(f, WAIT_OP, abort, op, timeout);
    return lua_yield(L, 0);
}

void fb_wake(fb_fiber *f, int nresults) {
    if (!f || f->state != FB_WAITING) return;
    timer_stop(f);
    f->abort = NULL;
    f->op = NULL;
    f->wait_kind = WAIT_NONE;
    make_ready(f, nresults);
    drain();
}

/* Cancels f with the reason at L's top (popped). Returns whether f was cancelled. */
static int cancel(lua_State *L, fb_fiber *f) {
    switch (f->state) {
    case FB_DONE:
        lua_pop(L, 1);
        return 0;
    case FB_RUNNING:
        f->cancelling = 1;
        lua_error(L);
        return 0;
    case FB_READY:
        queue_remove(&rt.ready, f);
        queue_remove(&rt.deferred, f);
        break;
    case FB_WAITING:
        timer_stop(f);
        f->cancelling = 1;
        if (f->abort) f->abort(f->op);
        break;
    }
    finish(L, f, FB_CANCELLED);
    return 1;
}

/* ---- Lua functions ----------------------------------------------------------- */

static int fiber_spawn(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (rt.closing) return luaL_error(L, "fiber.spawn: the runtime is shutting down");
    int n = lua_gettop(L);
    lua_pushvalue(L, 1);
    fb_fiber *f = fiber_new(L);
    for (int i = 2; i <= n; i++) lua_pushvalue(L, i);
    lua_xmove(L, f->co, n - 1);
    make_ready(f, n - 1);
    drain();
    return 1;
}

static int fiber_run(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (!lua_pushthread(L)) return luaL_error(L, "fiber.run: must be called from the main thread");
    lua_pop(L, 1);
    if (rt.in_run) return luaL_error(L, "fiber.run: the loop is already running");
    int n = lua_gettop(L);
    rt.L = L;
    rt.in_run = 1;
    lua_pushvalue(L, 1);
    fb_fiber *main = fiber_new(L);
    int mainidx = lua_gettop(L);
    main->quiet = 1;
    for (int i = 2; i <= n; i++) lua_pushvalue(L, i);
    lua_xmove(L, main->co, n - 1);
    make_ready(main, n - 1);
    drain();
    while (main->state != FB_DONE)
        if (!uv_run(fb_loop(), UV_RUN_ONCE) && main->state != FB_DONE) break;
    /* Like an interpreter, a script that returned normally lets its other fibers
     * finish; a failed main fiber ends the run at once. */
    if (main->state == FB_DONE && main->outcome == FB_OK) uv_run(fb_loop(), UV_RUN_DEFAULT);
    rt.in_run = 0;
    lua_getfenv(L, mainidx);
    int env = lua_gettop(L);
    if (main->state != FB_DONE) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "EDEADLK: the main fiber is waiting but nothing is left that can wake it");
        return 2;
    }
    if (main->outcome == FB_OK) {
        lua_getfield(L, env, "res");
        lua_getfield(L, -1, "n");
        int nres = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
        for (int i = 1; i <= nres; i++) lua_rawgeti(L, env + 1, i);
        return nres + 1;
    }
    lua_pushboolean(L, 0);
    lua_getfield(L, env, "err");
    lua_getfield(L, env, "tb");
    return 3;
}

static int fiber_current(lua_State *L) {
    fb_fiber *f = fb_running(L);
    if (!f) return 0;
    push_fiber(L, f);
    return 1;
}

static int fiber_sleep(lua_State *L) {
    double s = luaL_checknumber(L, 1);
    fb_fiber *f = fb_check_current(L, "fiber.sleep");
    if (!(s > 0)) return lua_yield(L, 0);   /* stays RUNNING: deferred like yield */
    start_wait(f, WAIT_SLEEP, NULL, NULL, s);
    return lua_yield(L, 0);
}

static int fiber_yield(lua_State *L) {
    fb_check_current(L, "fiber.yield");
    return lua_yield(L, 0);
}

static int fiber_park(lua_State *L) {
    double timeout = luaL_optnumber(L, 1, 0);
    fb_fiber *f = fb_check_current(L, "fiber.park");
    start_wait(f, WAIT_PARK, NULL, NULL, timeout);
    return lua_yield(L, 0);
}

static int fiber_stats(lua_State *L) {
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, rt.live);
    lua_setfield(L, -2, "live");
    lua_pushinteger(L, (lua_Integer)rt.next_id);
    lua_setfield(L, -2, "spawned");
    return 1;
}

static int fiber_wake(lua_State *L) {
    fb_fiber *f = check_fiber(L, 1);
    if (f->state != FB_WAITING || f->wait_kind != WAIT_PARK) {
        lua_pushboolean(L, 0);
        return 1;
    }
    int n = lua_gettop(L) - 1;
    lua_xmove(L, f->co, n);
    fb_wake(f, n);
    lua_pushboolean(L, 1);
    return 1;
}

static int fiber_cancel(lua_State *L) {
    fb_fiber *f = check_fiber(L, 1);
    if (lua_isnoneornil(L, 2)) {
        lua_settop(L, 1);
        lua_pushliteral(L, "cancelled");
    }
    lua_settop(L, 2);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "ECANCELED");
    lua_setfield(L, -2, "code");
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "message");
    lua_pushboolean(L, cancel(L, f));
    return 1;
}

static const char *status_name(fb_fiber *f) {
    switch (f->state) {
    case FB_READY: return "ready";
    case FB_RUNNING: return "running";
    case FB_WAITING: return "waiting";
    default: break;
    }
    return f->outcome == FB_OK ? "done" : f->outcome == FB_FAILED ? "failed" : "cancelled";
}

static int fiber_status(lua_State *L) {
    lua_pushstring(L, status_name(check_fiber(L, 1)));
    return 1;
}

/* status, then the results (done), the error and traceback (failed) or the reason
 * (cancelled). */
static int fiber_result(lua_State *L) {
    fb_fiber *f = check_fiber(L, 1);
    lua_pushstring(L, status_name(f));
    if (f->state != FB_DONE) return 1;
    lua_getfenv(L, 1);
    int env = lua_gettop(L);
    if (f->outcome == FB_OK) {
        lua_getfield(L, env, "res");
        lua_getfield(L, -1, "n");
        int n = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(L, n, "too many results");
        for (int i = 1; i <= n; i++) lua_rawgeti(L, env + 1, i);
        lua_remove(L, env + 1);
        lua_remove(L, env);
        return n + 1;
    }
    lua_getfield(L, env, "err");
    lua_getfield(L, env, "tb");
    lua_remove(L, env);
    return 3;
}

/* subscriber is woken (if parked) with this fiber when it finishes. */
static int fiber_subscribe(lua_State *L) {
    fb_fiber *f = check_fiber(L, 1);
    check_fiber(L, 2);
    if (f->state == FB_DONE) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_getfenv(L, 1);
    lua_getfield(L, -1, "subs");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "subs");
    }
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    if (lua_isnil(L, -1)) f->nsubs++;
    lua_pop(L, 1);
    lua_pushvalue(L, 2);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pushboolean(L, 1);
    return 1;
}

static int fiber_unsubscribe(lua_State *L) {
    fb_fiber *f = check_fiber(L, 1);
    check_fiber(L, 2);
    lua_getfenv(L, 1);
    lua_getfield(L, -1, "subs");
    if (lua_isnil(L, -1)) return 0;
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1) && f->nsubs > 0) f->nsubs--;
    lua_pop(L, 1);
    lua_pushvalue(L, 2);
    lua_pushnil(L);
    lua_rawset(L, -3);
    return 0;
}

static int fiber_id(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_fiber(L, 1)->id);
    return 1;
}

static int fiber_tostring(lua_State *L) {
    fb_fiber *f = check_fiber(L, 1);
    lua_pushfstring(L, "fiber #%d (%s)", (int)f->id, status_name(f));
    return 1;
}

/* Runs only for fibers that never finished (collected at shutdown): abandon the
 * pending operation so its callback cannot reach freed memory. */
static int fiber_gc(lua_State *L) {
    fb_fiber *f = (fb_fiber *)luaL_checkudata(L, 1, FIBER_MT);
    if (f->state == FB_DONE) return 0;
    if (f->state == FB_WAITING && f->abort) f->abort(f->op);
    f->abort = NULL;
    queue_remove(&rt.ready, f);
    queue_remove(&rt.deferred, f);
    timer_release(f);
    f->state = FB_DONE;
    f->outcome = FB_CANCELLED;
    rt.live--;
    return 0;
}

/* Called by main before lua_close: refuse new work from here on. */
static int fiber_shutdown(lua_State *L) {
    (void)L;
    rt.closing = 1;
    if (rt.idle_init) {
        uv_close((uv_handle_t *)&rt.idle, NULL);
        rt.idle_init = 0;
    }
    return 0;
}

static const luaL_Reg fiber_methods[] = {
    {"wake", fiber_wake},
    {"cancel", fiber_cancel},
    {"status", fiber_status},
    {"result", fiber_result},
    {"subscribe", fiber_subscribe},
    {"unsubscribe", fiber_unsubscribe},
    {"id", fiber_id},
    {NULL, NULL},
};

static const luaL_Reg fiber_functions[] = {
    {"spawn", fiber_spawn},
    {"run", fiber_run},
    {"current", fiber_current},
    {"sleep", fiber_sleep},
    {"yield", fiber_yield},
    {"park", fiber_park},
    {"stats", fiber_stats},
    {"shutdown", fiber_shutdown},
    {NULL, NULL},
};

int luaopen_factory_core_fiber(lua_State *L) {
    /* A new Lua state after a shutdown (the C tests make several) starts afresh. */
    if (!rt.in_run) rt.closing = 0;
    if (luaL_newmetatable(L, FIBER_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, fiber_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, fiber_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, fiber_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fiber_functions);
    return 1;
}
