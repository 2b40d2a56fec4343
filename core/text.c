/* core/text.c — factory.core.text: text that has to be UTF-8, checked and repaired
 * with the C library's iconv (UTF-8 to UTF-8 rejects malformed, overlong and
 * surrogate sequences), and code points past U+10FFFF, which glibc's lets through.
 *
 *   text.utf8_error(s) -> nil when s is UTF-8 | the 1-based offset of its first
 *       byte that is not
 *   text.to_utf8(s) -> s2, n   s with each malformed sequence (n of them) replaced by
 *       U+FFFD; s itself when n is 0
 *
 * Why: a model request is JSON, which must be UTF-8, and providers refuse the whole
 * request (HTTP 400) for one stray byte of a Latin-1 file an agent read or a
 * command printed. */
#include <errno.h>
#include <iconv.h>
#include <lauxlib.h>
#include <lua.h>
#include <string.h>

static const char REPLACEMENT[] = "\xEF\xBF\xBD";

/* One descriptor for the process, reset before each use: opening one costs as much
 * as checking a few kilobytes. Only the loop thread uses it. */
static iconv_t utf8_cd = (iconv_t)-1;

static iconv_t open_utf8(lua_State *L) {
    if (utf8_cd == (iconv_t)-1) {
        utf8_cd = iconv_open("UTF-8", "UTF-8");
        if (utf8_cd == (iconv_t)-1) luaL_error(L, "text: iconv has no UTF-8 (%s)", strerror(errno));
    }
    iconv(utf8_cd, NULL, NULL, NULL, NULL);
    return utf8_cd;
}

/* glibc's iconv takes the 4-byte forms of U+110000 and above (lead byte F4 with a
 * second byte from 90, or F5 to F7), which UTF-8 has not had since RFC 3629 and
 * which JSON parsers and PostgreSQL refuse. The offset of the first such sequence
 * in s[0, len), text iconv has passed, or len. */
static size_t beyond_unicode(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < len; i++)
        if (p[i] >= 0xF4 && (p[i] > 0xF4 || (i + 1 < len && p[i + 1] >= 0x90))) return i;
    return len;
}

/* The offset of the first byte of s that is not UTF-8, or len when all are. The
 * converted text goes to a scratch buffer and is dropped: only iconv's verdict
 * counts. */
static size_t valid_length(iconv_t cd, const char *s, size_t len) {
    char scratch[4096];
    char *in = (char *)s;
    size_t left = len;
    while (left > 0) {
        char *out = scratch;
        size_t room = sizeof scratch;
        if (iconv(cd, &in, &left, &out, &room) != (size_t)-1 || errno != E2BIG) break;
    }
    return beyond_unicode(s, len - left);
}

static int text_to_utf8(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    iconv_t cd = open_utf8(L);
    size_t ok = valid_length(cd, s, len);
    if (ok == len) {
        lua_pushvalue(L, 1);
        lua_pushinteger(L, 0);
        return 2;
    }
    /* Valid runs are copied as they are (UTF-8 to UTF-8 changes nothing); each byte
     * that starts no valid sequence becomes U+FFFD. */
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    const char *in = s;
    size_t left = len, replaced = 0;
    for (;;) {
        luaL_addlstring(&b, in, ok);
        in += ok;
        left -= ok;
        if (left == 0) break;
        luaL_addlstring(&b, REPLACEMENT, sizeof REPLACEMENT - 1);
        in++;
        left--;
        replaced++;
        iconv(cd, NULL, NULL, NULL, NULL);
        ok = valid_length(cd, in, left);
    }
    luaL_pushresult(&b);
    lua_pushinteger(L, (lua_Integer)replaced);
    return 2;
}

static int text_utf8_error(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    size_t ok = valid_length(open_utf8(L), s, len);
    if (ok == len) return 0;
    lua_pushinteger(L, (lua_Integer)ok + 1);
    return 1;
}

static const luaL_Reg text_functions[] = {
    {"to_utf8", text_to_utf8},
    {"utf8_error", text_utf8_error},
    {NULL, NULL},
};

int luaopen_factory_core_text(lua_State *L) {
    lua_newtable(L);
    luaL_register(L, NULL, text_functions);
    return 1;
}
