/* tests/core/test_fiber.c — C unit tests of the fiber runtime (core/fiber.c),
 * driving it through its C API the way core modules do: a test operation built on
 * a uv timer waits with fb_await and completes with fb_wake, or is aborted by a
 * timeout or a cancellation, after which its late callback must be harmless.
 * Run under ASan/UBSan (make test SAN=1) this also checks the runtime frees
 * everything it allocates. */
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fiber.h"
#include "modules.h"

static int passed, failed;

#define CHECK(cond, what)                                                   \
    do {                                                                    \
        if (cond) {                                                         \
            passed++;                                                       \
            printf("ok   %s\n", what);                                      \
        } else {                                                            \
            failed++;                                                       \
            printf("FAIL %s (%s:%d: %s)\n", what, __FILE__, __LINE__, #cond); \
        }                                                                   \
    } while (0)

/* ---- a test operation: completes after `ms` with the integer 42 ------------- */

typedef struct {
    uv_timer_t timer;
    fb_fiber *fiber;
} test_op;

static int aborts, late_callbacks, completions;

static void op_close_cb(uv_handle_t *h) { free(h->data); }

static void op_timer_cb(uv_timer_t *t) {
    test_op *op = (test_op *)t->data;
    if (op->fiber) {
        completions++;
        lua_pushinteger(fb_co(op->fiber), 42);
        fb_wake(op->fiber, 1);
    } else {
        late_callbacks++;
    }
    uv_close((uv_handle_t *)t, op_close_cb);
}

static void op_abort(void *p) {
    ((test_op *)p)->fiber = NULL;
    aborts++;
}

/* delayed(ms [, timeout]) -> 42 | nil, "ETIMEDOUT: ...", "ETIMEDOUT" */
static int l_delayed(lua_State *L) {
    lua_Integer ms = luaL_checkinteger(L, 1);
    double timeout = luaL_optnumber(L, 2, 0);
    fb_fiber *f = fb_check_current(L, "delayed");
    test_op *op = (test_op *)malloc(sizeof *op);
    op->fiber = f;
    op->timer.data = op;
    uv_timer_init(fb_loop(), &op->timer);
    uv_timer_start(&op->timer, op_timer_cb, (uint64_t)ms, 0);
    return fb_await(L, f, op_abort, op, timeout);
}

/* ---- harness ------------------------------------------------------------------ */

static lua_State *new_state(void) {
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_factory_core_fiber);
    lua_setfield(L, -2, "factory.core.fiber");
    lua_pop(L, 2);
    lua_pushcfunction(L, l_delayed);
    lua_setglobal(L, "delayed");
    return L;
}

static void close_state(lua_State *L) {
    lua_getglobal(L, "require");
    lua_pushliteral(L, "factory.core.fiber");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "shutdown");
    lua_call(L, 0, 0);
    lua_close(L);
    uv_run(fb_loop(), UV_RUN_DEFAULT);
}

/* Runs `code` as the main fiber; leaves fiber.run's results on the stack and
 * returns how many there are. */
static int run(lua_State *L, const char *code) {
    lua_settop(L, 0);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "factory.core.fiber");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "run");
    lua_remove(L, 1);
    if (luaL_loadstring(L, code) != 0) {
        printf("FAIL cannot load test code: %s\n", lua_tostring(L, -1));
        failed++;
        lua_settop(L, 0);
        return 0;
    }
    lua_call(L, 1, LUA_MULTRET);
    if (!lua_toboolean(L, 1) && lua_isstring(L, 2)) printf("#    the main fiber failed: %s\n", lua_tostring(L, 2));
    return lua_gettop(L);
}

static int is_true(lua_State *L, int idx) { return lua_toboolean(L, idx); }

static int str_is(lua_State *L, int idx, const char *want) {
    const char *s = lua_tostring(L, idx);
    return s && strcmp(s, want) == 0;
}

static int str_has(lua_State *L, int idx, const char *part) {
    const char *s = lua_tostring(L, idx);
    return s && strstr(s, part) != NULL;
}

/* ---- tests -------------------------------------------------------------------- */

static void test_wake_delivers_results(void) {
    lua_State *L = new_state();
    completions = 0;
    run(L, "return delayed(5)");
    CHECK(is_true(L, 1) && lua_tointeger(L, 2) == 42, "an op's callback resumes its fiber with results");
    CHECK(completions == 1, "the op completed exactly once");
    close_state(L);
}

static void test_timeout_aborts_op(void) {
    lua_State *L = new_state();
    aborts = late_callbacks = 0;
    run(L, "local v, err, code = delayed(200, 0.01); return v, err, code");
    CHECK(is_true(L, 1) && lua_isnil(L, 2), "a timed-out wait returns nil");
    CHECK(lua_isstring(L, 4) && str_is(L, 4, "ETIMEDOUT"), "with the ETIMEDOUT code");
    CHECK(aborts == 1, "the op was aborted once");
    CHECK(late_callbacks == 1, "its late callback ran and was harmless");
    close_state(L);
}

static void test_cancel_aborts_op(void) {
    lua_State *L = new_state();
    aborts = late_callbacks = 0;
    run(L,
        "local fiber = require 'factory.core.fiber'\n"
        "local f = fiber.spawn(function() return delayed(50) end)\n"
        "fiber.sleep(0.005)\n"
        "local cancelled = f:cancel('no longer needed')\n"
        "local status, err = f:result()\n"
        "return cancelled, status, err.code, err.message");
    CHECK(is_true(L, 1) && is_true(L, 2), "cancel of a waiting fiber succeeds");
    CHECK(str_is(L, 3, "cancelled"), "its status is cancelled");
    CHECK(str_is(L, 4, "ECANCELED"), "its error has code ECANCELED");
    CHECK(str_is(L, 5, "no longer needed"), "and carries the reason");
    CHECK(aborts == 1 && late_callbacks == 1, "the op was aborted and its late callback harmless");
    close_state(L);
}

static void test_error_is_contained(void) {
    lua_State *L = new_state();
    run(L,
        "local fiber = require 'factory.core.fiber'\n"
        "local bad = fiber.spawn(function() local t = nil; return t.x end)\n"
        "local good = fiber.spawn(function() return delayed(5) end)\n"
        "fiber.sleep(0.02)\n"
        "local _, err, tb = bad:result()\n"
        "local _, v = good:result()\n"
        "return bad:status(), tostring(err), tb, v");
    CHECK(str_is(L, 2, "failed"), "a fiber that errors is failed");
    CHECK(str_has(L, 3, ":2: attempt to index"), "its error names the line");
    CHECK(str_has(L, 4, "stack traceback"), "a traceback is kept");
    CHECK(lua_tointeger(L, 5) == 42, "another fiber kept running");
    close_state(L);
}

static void test_main_failure(void) {
    lua_State *L = new_state();
    int n = run(L, "error('main broke')");
    CHECK(n == 3 && !is_true(L, 1), "fiber.run reports a failed main fiber");
    CHECK(str_has(L, 2, "main broke"), "with its error");
    close_state(L);
}

static void test_park_wake_and_deadlock(void) {
    lua_State *L = new_state();
    run(L,
        "local fiber = require 'factory.core.fiber'\n"
        "local f = fiber.spawn(function() return fiber.park() end)\n"
        "fiber.sleep(0.001)\n"
        "f:wake('hello')\n"
        "fiber.sleep(0.001)\n"
        "return select(2, f:result())");
    CHECK(str_is(L, 2, "hello"), "wake passes values to a parked fiber");
    int n = run(L, "require('factory.core.fiber').park()");
    CHECK(n == 2 && !is_true(L, 1) && str_has(L, 2, "EDEADLK"),
          "a main fiber that can never be woken is reported, not hung");
    close_state(L);
}

static void test_many_sleepers(void) {
    lua_State *L = new_state();
    uint64_t t0 = uv_hrtime();
    run(L,
        "local fiber = require 'factory.core.fiber'\n"
        "local done = 0\n"
        "for i = 1, 10000 do fiber.spawn(function() fiber.sleep(0.01); done = done + 1 end) end\n"
        "while done < 10000 do fiber.sleep(0.005) end\n"
        "return done");
    double secs = (double)(uv_hrtime() - t0) / 1e9;
    CHECK(lua_tointeger(L, 2) == 10000, "10,000 fibers each sleeping 10 ms all finish");
    CHECK(secs < 1.0, "in under 1 s of wall time");
    close_state(L);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    test_wake_delivers_results();
    test_timeout_aborts_op();
    test_cancel_aborts_op();
    test_error_is_contained();
    test_main_failure();
    test_park_wake_and_deadlock();
    test_many_sleepers();
    uv_loop_close(fb_loop());
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
