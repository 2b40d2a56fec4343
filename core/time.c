/* core/time.c — factory.core.time: wall clock, monotonic clock and ISO-8601
 * formatting. The monotonic clock is libuv's (uv_hrtime), so durations measured
 * here agree with the loop's timers. */
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <time.h>
#include <uv.h>

/* Seconds since the epoch, with sub-microsecond resolution. */
static int time_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}

/* Seconds on a monotonic clock with an arbitrary origin. */
static int time_monotonic(lua_State *L) {
    lua_pushnumber(L, (double)uv_hrtime() / 1e9);
    return 1;
}

/* "2026-11-23T00:31:47.123Z" for the given epoch seconds (default: now), UTC. */
static int time_iso8601(lua_State *L) {
    double t;
    if (lua_isnoneornil(L, 1)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        t = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    } else {
        t = luaL_checknumber(L, 1);
    }
    time_t secs = (time_t)t;
    if ((double)secs > t) secs--;
    int ms = (int)((t - (double)secs) * 1000.0);
    if (ms > 999) ms = 999;
    struct tm tm;
    if (!gmtime_r(&secs, &tm)) return luaL_argerror(L, 1, "time out of range");
    char buf[64];
    snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
    lua_pushstring(L, buf);
    return 1;
}

static const luaL_Reg time_functions[] = {
    {"now", time_now},
    {"monotonic", time_monotonic},
    {"iso8601", time_iso8601},
    {NULL, NULL},
};

int luaopen_factory_core_time(lua_State *L) {
    lua_newtable(L);
    luaL_register(L, NULL, time_functions);
    return 1;
}
