/* core/json.c — factory.core.json: lua-cjson (Debian's liblua5.1-cjson.a), linked
 * into the binary. This file only chooses the safe variant (decode errors return
 * nil, message instead of raising) and the engine-wide settings; the documented
 * API, with null and empty-array handling, is lua/factory/json.lua. */
#include <lauxlib.h>
#include <lua.h>

int luaopen_cjson_safe(lua_State *L);

static void set_option(lua_State *L, const char *option, lua_Number value) {
    lua_getfield(L, -1, option);
    lua_pushnumber(L, value);
    lua_call(L, 1, 0);
}

int luaopen_factory_core_json(lua_State *L) {
    luaopen_cjson_safe(L);
    /* Arrays with holes become objects instead of failing (convert, ratio 2, safe 10). */
    lua_getfield(L, -1, "encode_sparse_array");
    lua_pushboolean(L, 1);
    lua_pushnumber(L, 2);
    lua_pushnumber(L, 10);
    lua_call(L, 3, 0);
    /* 14 significant digits (cjson 2.1.0's maximum): integers below 1e14 stay exact. */
    set_option(L, "encode_number_precision", 14);
    set_option(L, "encode_max_depth", 200);
    set_option(L, "decode_max_depth", 200);
    return 1;
}
