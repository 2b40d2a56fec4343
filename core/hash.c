/* core/hash.c — factory.core.hash: digests from OpenSSL's libcrypto, so no hash
 * function is ever written by hand (the audit chain depends on it being right). */
#include <lauxlib.h>
#include <lua.h>
#include <openssl/evp.h>

/* The digest is fetched from libcrypto once, when the module loads: EVP_sha256()
 * makes every EVP_Digest look it up again, which cost several times the hashing
 * of an audit record. Kept in a userdata (upvalue of sha256) that frees it. */
typedef struct {
    EVP_MD *md;
} fetched_md;

static int fetched_md_gc(lua_State *L) {
    fetched_md *f = lua_touserdata(L, 1);
    EVP_MD_free(f->md);
    f->md = NULL;
    return 0;
}

/* sha256(data) -> 64 lowercase hex digits */
static int hash_sha256(lua_State *L) {
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    const fetched_md *f = lua_touserdata(L, lua_upvalueindex(1));
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(data, len, md, &n, f->md, NULL)) return luaL_error(L, "sha256: libcrypto failed");
    static const char digits[] = "0123456789abcdef";
    char hex[2 * EVP_MAX_MD_SIZE];
    for (unsigned int i = 0; i < n; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    lua_pushlstring(L, hex, 2 * (size_t)n);
    return 1;
}

int luaopen_factory_core_hash(lua_State *L) {
    lua_newtable(L);
    fetched_md *f = lua_newuserdata(L, sizeof *f);
    f->md = NULL;
    lua_newtable(L);
    lua_pushcfunction(L, fetched_md_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    f->md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (!f->md) return luaL_error(L, "factory.core.hash: libcrypto has no SHA256");
    lua_pushcclosure(L, hash_sha256, 1);
    lua_setfield(L, -2, "sha256");
    return 1;
}
