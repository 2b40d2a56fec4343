/* core/hash.c — factory.core.hash: digests from OpenSSL's libcrypto, so no hash
 * function is ever written by hand (the audit chain depends on it being right). */
#include <lauxlib.h>
#include <lua.h>
#include <openssl/evp.h>

/* sha256(data) -> 64 lowercase hex digits */
static int hash_sha256(lua_State *L) {
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(data, len, md, &n, EVP_sha256(), NULL)) return luaL_error(L, "sha256: libcrypto failed");
    static const char digits[] = "0123456789abcdef";
    char hex[2 * EVP_MAX_MD_SIZE];
    for (unsigned int i = 0; i < n; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    lua_pushlstring(L, hex, 2 * (size_t)n);
    return 1;
}

static const luaL_Reg hash_functions[] = {
    {"sha256", hash_sha256},
    {NULL, NULL},
};

int luaopen_factory_core_hash(lua_State *L) {
    lua_newtable(L);
    luaL_register(L, NULL, hash_functions);
    return 1;
}
