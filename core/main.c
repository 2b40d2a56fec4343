/* core/main.c — the factory binary: creates the Lua state, preloads the C core
 * modules, finds the Lua tree, hands argv to lua/factory/cli.lua, and tears
 * everything down in an order that leaves no libuv handle or memory behind.
 * Also owns factory.core.host (where the engine is installed, its version).
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "fiber.h"
#include "modules.h"

#ifndef FACTORY_VERSION
#define FACTORY_VERSION "0.0.0-dev"
#endif
#ifndef FACTORY_DATADIR
#define FACTORY_DATADIR "/usr/local/share/factory"
#endif

static char home[PATH_MAX];
static char exe[PATH_MAX];

static int file_exists(const char *dir, const char *rel) {
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", dir, rel);
    return access(p, R_OK) == 0;
}

/* The engine's home holds lua/factory/: $FACTORY_HOME, else next to the binary
 * (a build tree), else ../share/factory from the binary (an install), else the
 * compiled-in data directory. */
static void find_home(void) {
    const char *env = getenv("FACTORY_HOME");
    if (env && *env) {
        snprintf(home, sizeof home, "%s", env);
        return;
    }
    size_t n = sizeof exe;
    if (uv_exepath(exe, &n) == 0) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", exe);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        if (file_exists(dir, "lua/factory/cli.lua")) {
            snprintf(home, sizeof home, "%s", dir);
            return;
        }
        char share[PATH_MAX + 32];
        snprintf(share, sizeof share, "%s/../share/factory", dir);
        if (file_exists(share, "lua/factory/cli.lua") && realpath(share, home)) return;
    }
    snprintf(home, sizeof home, "%s", FACTORY_DATADIR);
}

static int open_host(lua_State *L) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, home);
    lua_setfield(L, -2, "home");
    lua_pushstring(L, exe);
    lua_setfield(L, -2, "exe");
    lua_pushliteral(L, FACTORY_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}

static void preload(lua_State *L) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    for (const luaL_Reg *m = factory_core_modules; m->name; m++) {
        lua_pushcfunction(L, m->func);
        lua_setfield(L, -2, m->name);
    }
    lua_pushcfunction(L, open_host);
    lua_setfield(L, -2, "factory.core.host");
    lua_pop(L, 1);
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s", home, home, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    luaL_traceback(L, L, msg ? msg : "(non-string error)", 1);
    return 1;
}

static int run_cli(lua_State *L, int argc, char **argv) {
    lua_pushcfunction(L, traceback);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "factory.cli");
    if (lua_pcall(L, 1, 1, 1) != 0) {
        fprintf(stderr, "factory: cannot load the engine from %s/lua: %s\n", home, lua_tostring(L, -1));
        return 70;
    }
    lua_getfield(L, -1, "main");
    lua_createtable(L, argc, 1);
    lua_pushstring(L, argv[0]);
    lua_rawseti(L, -2, 0);
    for (int i = 1; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    if (lua_pcall(L, 1, 1, 1) != 0) {
        fprintf(stderr, "factory: internal error: %s\n", lua_tostring(L, -1));
        return 70;
    }
    return lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 0;
}

static void close_walk_cb(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) {
        fprintf(stderr, "factory: warning: a %s handle was still open at exit\n", uv_handle_type_name(h->type));
        uv_close(h, NULL);
    }
}

static void shutdown_runtime(lua_State *L) {
    lua_getglobal(L, "require");
    lua_pushliteral(L, "factory.core.fiber");
    if (lua_pcall(L, 1, 1, 0) == 0) {
        lua_getfield(L, -1, "shutdown");
        lua_pcall(L, 0, 0, 0);
    }
    lua_settop(L, 0);
    lua_close(L);
    uv_loop_t *loop = fb_loop();
    uv_run(loop, UV_RUN_NOWAIT);
    uv_walk(loop, close_walk_cb, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    find_home();
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "factory: cannot create the Lua state (out of memory)\n");
        return 70;
    }
    luaL_openlibs(L);
    preload(L);
    int code = run_cli(L, argc, argv);
    fflush(stdout);
    shutdown_runtime(L);
    return code;
}
