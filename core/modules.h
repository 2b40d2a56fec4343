/* core/modules.h — the list of C core modules preloaded as factory.core.<name>.
 * A new core/<name>.c adds its luaopen_ here and to CORE_MODULES in the Makefile. */
#ifndef FACTORY_MODULES_H
#define FACTORY_MODULES_H

#include <lauxlib.h>

int luaopen_factory_core_fiber(lua_State *L);
int luaopen_factory_core_json(lua_State *L);
int luaopen_factory_core_time(lua_State *L);
int luaopen_factory_core_env(lua_State *L);
int luaopen_factory_core_proc(lua_State *L);
int luaopen_factory_core_http_client(lua_State *L);
int luaopen_factory_core_fs(lua_State *L);
int luaopen_factory_core_repl(lua_State *L);
int luaopen_factory_core_db_sqlite(lua_State *L);
int luaopen_factory_core_db_pg(lua_State *L);
int luaopen_factory_core_http_server(lua_State *L);
int luaopen_factory_core_router(lua_State *L);
int luaopen_factory_core_hash(lua_State *L);
int luaopen_factory_core_signal(lua_State *L);
int luaopen_factory_core_git(lua_State *L);
int luaopen_factory_core_regex(lua_State *L);
int luaopen_factory_core_text(lua_State *L);

static const luaL_Reg factory_core_modules[] = {
    {"factory.core.fiber", luaopen_factory_core_fiber},
    {"factory.core.json", luaopen_factory_core_json},
    {"factory.core.time", luaopen_factory_core_time},
    {"factory.core.env", luaopen_factory_core_env},
    {"factory.core.proc", luaopen_factory_core_proc},
    {"factory.core.http_client", luaopen_factory_core_http_client},
    {"factory.core.fs", luaopen_factory_core_fs},
    {"factory.core.repl", luaopen_factory_core_repl},
    {"factory.core.db_sqlite", luaopen_factory_core_db_sqlite},
    {"factory.core.db_pg", luaopen_factory_core_db_pg},
    {"factory.core.http_server", luaopen_factory_core_http_server},
    {"factory.core.router", luaopen_factory_core_router},
    {"factory.core.hash", luaopen_factory_core_hash},
    {"factory.core.signal", luaopen_factory_core_signal},
    {"factory.core.git", luaopen_factory_core_git},
    {"factory.core.regex", luaopen_factory_core_regex},
    {"factory.core.text", luaopen_factory_core_text},
    {NULL, NULL},
};

#endif
