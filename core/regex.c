/* core/regex.c — factory.core.regex: POSIX extended regular expressions from the C
 * library (regcomp/regexec), for the coding agents' grep tool: the syntax models
 * know from `grep -E`, with no matcher written by hand.
 *
 *   compile(pattern) -> re | nil, message
 *   re:find(text)    -> true | false    (anywhere in text; text may hold any byte;
 *                       ^ and $ match at each line's start and end, and . and [^...]
 *                       never match a newline, so a text matches when one of its
 *                       lines does, as grep reads it: a whole file is searched once)
 *   re:close()       idempotent; __gc closes too
 *
 * Back-references (\1 ... \9) are refused: the C library may take exponential time
 * on them, and a pattern comes from a model. Without them glibc's matcher is
 * polynomial in the text's length.
 */
#include <lauxlib.h>
#include <lua.h>
#include <regex.h>
#include <string.h>

#define REGEX_MT "factory.core.regex"
#define MAX_PATTERN 4096

typedef struct {
    regex_t re;
    int live;
} regex_ud;

static int has_backreference(const char *p, size_t len) {
    for (size_t i = 0; i + 1 < len; i++) {
        if (p[i] != '\\') continue;
        if (p[i + 1] >= '1' && p[i + 1] <= '9') return 1;
        i++;    /* an escaped character: "\\\\1" is a backslash, then a 1 */
    }
    return 0;
}

static int fail(lua_State *L, const char *message) {
    lua_pushnil(L);
    lua_pushstring(L, message);
    return 2;
}

static int regex_compile(lua_State *L) {
    size_t len;
    const char *pattern = luaL_checklstring(L, 1, &len);
    if (len > MAX_PATTERN) return fail(L, "the pattern is longer than 4096 bytes");
    if (memchr(pattern, '\0', len)) return fail(L, "the pattern contains a NUL byte");
    if (has_backreference(pattern, len)) return fail(L, "back-references (\\1 to \\9) are not supported");
    /* The userdata first: a failing allocation after regcomp would leak its tables. */
    regex_ud *u = (regex_ud *)lua_newuserdata(L, sizeof *u);
    u->live = 0;
    luaL_getmetatable(L, REGEX_MT);
    lua_setmetatable(L, -2);
    int rc = regcomp(&u->re, pattern, REG_EXTENDED | REG_NEWLINE);
    if (rc != 0) {
        char message[256];
        regerror(rc, &u->re, message, sizeof message);
        return fail(L, message);
    }
    u->live = 1;
    return 1;
}

static regex_ud *check_live(lua_State *L) {
    regex_ud *u = (regex_ud *)luaL_checkudata(L, 1, REGEX_MT);
    if (!u->live) luaL_error(L, "regex: used after close");
    return u;
}

static int regex_find(lua_State *L) {
    regex_ud *u = check_live(L);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    /* REG_STARTEND: the text's length bounds the match, so a NUL byte is just a byte. */
    regmatch_t m[1] = {{.rm_so = 0, .rm_eo = (regoff_t)len}};
    lua_pushboolean(L, regexec(&u->re, text, 1, m, REG_STARTEND) == 0);
    return 1;
}

static int regex_close(lua_State *L) {
    regex_ud *u = (regex_ud *)luaL_checkudata(L, 1, REGEX_MT);
    if (u->live) regfree(&u->re);
    u->live = 0;
    return 0;
}

static const luaL_Reg regex_methods[] = {
    {"find", regex_find},
    {"close", regex_close},
    {NULL, NULL},
};

static const luaL_Reg regex_functions[] = {
    {"compile", regex_compile},
    {NULL, NULL},
};

int luaopen_factory_core_regex(lua_State *L) {
    if (luaL_newmetatable(L, REGEX_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, regex_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, regex_close);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, regex_functions);
    return 1;
}
