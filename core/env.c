/* core/env.c — factory.core.env: the process environment as data. Children never
 * inherit it implicitly (see proc); this module is how policy code reads it to
 * build the explicit, scrubbed environment a child gets. */
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static int env_get(lua_State *L) {
    const char *v = getenv(luaL_checkstring(L, 1));
    if (!v) return 0;
    lua_pushstring(L, v);
    return 1;
}

/* A table of every NAME = value in the environment. */
static int env_all(lua_State *L) {
    lua_newtable(L);
    for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e) continue;
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        lua_pushstring(L, eq + 1);
        lua_rawset(L, -3);
    }
    return 1;
}

static int env_set(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    if (!*name || strchr(name, '=')) return luaL_argerror(L, 1, "invalid variable name");
    int rc = lua_isnoneornil(L, 2) ? unsetenv(name) : setenv(name, luaL_checkstring(L, 2), 1);
    lua_pushboolean(L, rc == 0);
    return 1;
}

static const luaL_Reg env_functions[] = {
    {"get", env_get},
    {"all", env_all},
    {"set", env_set},
    {NULL, NULL},
};

int luaopen_factory_core_env(lua_State *L) {
    lua_newtable(L);
    luaL_register(L, NULL, env_functions);
    return 1;
}
