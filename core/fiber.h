/* core/fiber.h — the fiber runtime's C API, used by every async core module.
 *
 * A fiber is a Lua coroutine driven by the one libuv loop of the process. An async
 * C function starts its libuv operation, then returns fb_await(): the fiber yields.
 * Exactly one of two things happens afterwards:
 *   - the operation completes: its callback pushes the results onto fb_co(f) and
 *     calls fb_wake(f, nresults); the C function "returns" those values to Lua;
 *   - the wait is abandoned (the fiber was cancelled, or its timeout fired): the
 *     runtime calls abort(op) once. abort must make the operation's callback a
 *     no-op for this fiber (typically op->fiber = NULL) and arrange that the
 *     operation frees itself when it finishes. After abort, f must not be touched.
 * On timeout the C function returns nil, "ETIMEDOUT: ...", "ETIMEDOUT".
 */
#ifndef FACTORY_FIBER_H
#define FACTORY_FIBER_H

#include <lua.h>
#include <uv.h>

typedef struct fb_fiber fb_fiber;
typedef void (*fb_abort_fn)(void *op);

/* The process's event loop (uv_default_loop). */
uv_loop_t *fb_loop(void);

/* The fiber running on L if it can wait here, else raises a Lua error naming `what`. */
fb_fiber *fb_check_current(lua_State *L, const char *what);

/* The fiber running on L if it can wait here (yield), or NULL: on the main thread, in
 * a plain coroutine, and inside a C call that runs Lua (dofile, require, a
 * table.sort comparator, a string.gsub callback), where a yield would fail; callers
 * that can run their work inline do so there. */
fb_fiber *fb_current(lua_State *L);

/* The fiber running on L, whether or not it can wait here, or NULL. */
fb_fiber *fb_running(lua_State *L);

/* Suspends f (running on L). timeout <= 0 means no timeout. Use as
 * `return fb_await(L, f, abort, op, timeout);`. */
int fb_await(lua_State *L, fb_fiber *f, fb_abort_fn abort, void *op, double timeout);

/* The coroutine of a suspended fiber: push results here, then call fb_wake. */
lua_State *fb_co(fb_fiber *f);

/* In an abort callback: whether the wait ends because the fiber is being cancelled
 * (it will not run again), rather than because its timeout fired. */
int fb_cancelling(fb_fiber *f);

/* Resumes a fiber suspended by fb_await with the nresults values on top of fb_co(f).
 * Safe from any libuv callback; resumption happens before this returns when called
 * outside any fiber, and right after the running fiber yields otherwise. */
void fb_wake(fb_fiber *f, int nresults);

/* Pushes the operational-error triple used by every core module:
 * nil, "CODE: message", "CODE". Returns 3. */
int fb_push_error(lua_State *L, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Pushes nil, "<uv name>: <uv message>[ (context)]", "<uv name>" for a libuv error. */
int fb_push_uv_error(lua_State *L, int uverr, const char *context);

/* Whether the runtime is shutting down (no new work may be scheduled). */
int fb_closing(void);

int luaopen_factory_core_fiber(lua_State *L);

#endif
