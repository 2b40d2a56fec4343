/* core/db_pg.c — factory.core.db_pg: PostgreSQL connections for lua/factory/db.lua.
 *
 *   conninfo(uri)               -> {keyword = value, ...} | nil, message
 *                                  (libpq's parse of a postgres:// URI; no connection)
 *   connect({keyword = value, ...} [, timeout_s]) -> conn | nil, err, code
 *   conn:run(sql, params, n)    -> rows, {changes=, json={col...}} | nil, err, code
 *   conn:script(sql)            -> true | nil, err, code   (several statements, no parameters)
 *   conn:wait_notify([timeout]) -> channel, payload, pid | nil, err, code
 *   conn:quote_ident(name)      -> name quoted as an SQL identifier (LISTEN takes no parameter)
 *   conn:ok()                   -> whether the connection is usable
 *   conn:close()
 * connect, run, script and wait_notify must be called from a fiber.
 *
 * libpq runs in non-blocking mode only: PQconnectStartParams/PQconnectPoll to
 * connect, PQsendQueryParams + PQflush to send, PQconsumeInput/PQisBusy/PQgetResult
 * to read, the socket watched by a uv_poll_t. libpq would resolve a host name with a
 * blocking getaddrinfo, so names are resolved first on libuv's thread pool and handed
 * over as hostaddr. libpq ignores connect_timeout in this mode: the caller's timeout
 * bounds the whole connect.
 *
 * A connection runs one operation at a time and queues the rest. An abandoned
 * operation (its fiber was cancelled or timed out) stays queued and its result is
 * read and dropped, so the protocol stays in step for the next one.
 *
 * Parameters go as text. Integers are sent typed int8, other numbers float8 and
 * booleans bool, so `SELECT ?` comes back typed as it does on SQLite; strings (and
 * JSON text) go untyped and take the type the statement gives them.
 * Results are typed by column OID: int2/4/8, oid -> integer; float4/8, numeric ->
 * number; bool -> boolean; NULL -> key absent; json/jsonb columns are listed in
 * meta.json for the Lua layer to decode; everything else is its text form.
 *
 * Lifetimes: the userdata holds a pointer to the C-owned connection. The struct is
 * freed in the close callback of its poll handle (or of the name lookup), never
 * during one of its own callbacks. Callbacks finish all bookkeeping first and wake
 * fibers last, because a woken fiber runs at once and may close the connection.
 */
#include "fiber.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <libpq-fe.h>
#include <math.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define CONN_MT "factory.pg"
#define CONNINFO_MT "factory.pg.conninfo"
#define MAX_KW 32

/* Type OIDs from the server's pg_type.h (stable across versions). */
enum {
    BOOLOID = 16, INT8OID = 20, INT2OID = 21, INT4OID = 23, OIDOID = 26, JSONOID = 114,
    FLOAT4OID = 700, FLOAT8OID = 701, NUMERICOID = 1700, JSONBOID = 3802
};

enum { ST_RESOLVING, ST_CONNECTING, ST_READY, ST_BROKEN, ST_CLOSED };
enum { OP_RUN, OP_SCRIPT };

typedef struct pg_op {
    struct pg_op *next;
    fb_fiber *fiber;
    int kind;
    int sent;
    char *sql;
    int nparams;
    char **values;
    Oid *types;
    PGresult *result;    /* the one reported: the first error, else the last result */
    const char *errcode; /* set when the operation failed without a result */
    char *errmsg;
} pg_op;

typedef struct pg_conn {
    PGconn *pg;
    uv_poll_t *poll;
    uv_getaddrinfo_t gai;
    int fd, events;
    int state;
    pg_op *head, *tail;   /* head is the one on the wire */
    fb_fiber *connecting; /* waits for connect() */
    fb_fiber *listener;   /* waits in wait_notify() */
    char *broken;         /* why the connection died */
    char *keys[MAX_KW + 2], *vals[MAX_KW + 2]; /* kept until libpq has them */
    int host_index, gai_status;
} pg_conn;

/* What a callback owes fibers, delivered after all bookkeeping. */
typedef struct {
    pg_op *done, **tail;  /* finished operations, detached from the connection */
    fb_fiber *listener;
    PGnotify *note;
    const char *lcode;    /* or the listener's error */
    char lmsg[600];
} batch;

static void batch_init(batch *b) {
    memset(b, 0, sizeof *b);
    b->tail = &b->done;
}

/* ---- errors ------------------------------------------------------------------- */

/* libpq messages span lines ("...failed: FATAL:  password ...\n"): one line. */
static void one_line(char *s) {
    char *w = s;
    int space = 0;
    for (char *r = s; *r; r++) {
        if (*r == '\n' || *r == '\r' || *r == '\t' || *r == ' ') {
            space = 1;
            continue;
        }
        if (space && w != s) *w++ = ' ';
        space = 0;
        *w++ = *r;
    }
    *w = '\0';
}

static int push_conn_error(lua_State *L, PGconn *pg) {
    char msg[600];
    snprintf(msg, sizeof msg, "%s", pg ? PQerrorMessage(pg) : "out of memory");
    one_line(msg);
    const char *code = "ECONNECT";
    if (strstr(msg, "password authentication failed") || strstr(msg, "no password supplied"))
        code = "EAUTH";
    else if (strstr(msg, "Connection refused") || strstr(msg, "No such file or directory"))
        code = "ECONNREFUSED";
    else if (strstr(msg, "invalid connection option") || strstr(msg, "invalid integer value") ||
             strstr(msg, "invalid sslmode") || strstr(msg, "invalid value"))
        code = "EINVAL";
    return fb_push_error(L, code, "%s", msg);
}

static const char *sqlstate_code(const char *state) {
    if (!state) return "ESQL";
    if (!strncmp(state, "23", 2)) return "ECONSTRAINT";
    /* connection exceptions and server shutdown; 08P01 (protocol violation, e.g. a
     * wrong parameter count) leaves the connection usable */
    if ((!strncmp(state, "08", 2) && strcmp(state, "08P01")) || !strncmp(state, "57P", 3)) return "ECONNRESET";
    if (!strcmp(state, "40P01")) return "EDEADLK";
    if (!strcmp(state, "40001")) return "ESERIALIZE";
    if (!strcmp(state, "55P03")) return "EBUSY";
    if (!strcmp(state, "57014")) return "ECANCELED";
    return "ESQL";
}

static int push_result_error(lua_State *L, const PGresult *r) {
    const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    char msg[600];
    snprintf(msg, sizeof msg, "%s", primary ? primary : PQresultErrorMessage(r));
    one_line(msg);
    return fb_push_error(L, sqlstate_code(PQresultErrorField(r, PG_DIAG_SQLSTATE)), "%s", msg);
}

/* ---- results --------------------------------------------------------------------- */

static void push_cell(lua_State *L, const PGresult *r, int row, int col) {
    const char *s = PQgetvalue(r, row, col);
    switch (PQftype(r, col)) {
    case INT2OID:
    case INT4OID:
    case INT8OID:
    case OIDOID: lua_pushnumber(L, (lua_Number)strtoll(s, NULL, 10)); break;
    case FLOAT4OID:
    case FLOAT8OID:
    case NUMERICOID: lua_pushnumber(L, strtod(s, NULL)); break;
    case BOOLOID: lua_pushboolean(L, s[0] == 't'); break;
    default: lua_pushlstring(L, s, (size_t)PQgetlength(r, row, col)); break;
    }
}

/* Pushes what a finished operation returns. */
static int push_result(lua_State *L, const pg_op *op) {
    PGresult *r = op->result;
    lua_checkstack(L, 8);
    if (op->errcode) return fb_push_error(L, op->errcode, "%s", op->errmsg ? op->errmsg : "out of memory");
    if (r && PQresultStatus(r) != PGRES_TUPLES_OK && PQresultStatus(r) != PGRES_COMMAND_OK &&
        PQresultStatus(r) != PGRES_EMPTY_QUERY)
        return push_result_error(L, r);
    if (op->kind == OP_SCRIPT) {
        lua_pushboolean(L, 1);
        return 1;
    }
    int nrows = r ? PQntuples(r) : 0, ncols = r ? PQnfields(r) : 0;
    lua_createtable(L, nrows, 0);
    for (int i = 0; i < nrows; i++) {
        lua_createtable(L, 0, ncols);
        for (int c = 0; c < ncols; c++) {
            if (PQgetisnull(r, i, c)) continue;
            push_cell(L, r, i, c);
            lua_setfield(L, -2, PQfname(r, c));
        }
        lua_rawseti(L, -2, i + 1);
    }
    lua_createtable(L, 0, 2);
    const char *tuples = r ? PQcmdTuples(r) : "";
    /* A SELECT's count is its rows, not changes (as with sqlite3_changes). */
    int select = r && !strncmp(PQcmdStatus(r), "SELECT", 6);
    lua_pushnumber(L, (*tuples && !select) ? strtod(tuples, NULL) : 0);
    lua_setfield(L, -2, "changes");
    int njson = 0;
    for (int c = 0; c < ncols; c++) {
        if (PQftype(r, c) != JSONOID && PQftype(r, c) != JSONBOID) continue;
        if (!njson) {
            lua_newtable(L);
            lua_pushvalue(L, -1);
            lua_setfield(L, -3, "json");
        }
        lua_pushstring(L, PQfname(r, c));
        lua_rawseti(L, -2, ++njson);
    }
    if (njson) lua_pop(L, 1);
    return 2;
}

/* ---- operations and the poll loop ------------------------------------------------ */

static void op_free(pg_op *op) {
    free(op->sql);
    for (int i = 0; i < op->nparams; i++) free(op->values[i]);
    free(op->values);
    free(op->types);
    free(op->errmsg);
    PQclear(op->result);
    free(op);
}

static void abort_op(void *p) { ((pg_op *)p)->fiber = NULL; }

/* Moves the head operation to the batch of finished ones. */
static void finish_head(pg_conn *c, batch *b) {
    pg_op *op = c->head;
    c->head = op->next;
    if (!c->head) c->tail = NULL;
    op->next = NULL;
    *b->tail = op;
    b->tail = &op->next;
}

/* Every queued operation and the listener fail with code: msg. */
static void fail_all(pg_conn *c, const char *code, const char *msg, batch *b) {
    while (c->head) {
        pg_op *op = c->head;
        op->errcode = code;
        free(op->errmsg);
        op->errmsg = strdup(msg);
        finish_head(c, b);
    }
    if (c->listener) {
        b->listener = c->listener;
        c->listener = NULL;
        b->lcode = code;
        snprintf(b->lmsg, sizeof b->lmsg, "%s", msg);
    }
}

/* Resumes the fibers a callback owes results to. Each op's fiber is read just
 * before its wake: an earlier wake may have run Lua that cancelled it. */
static void batch_run(batch *b) {
    if (b->listener) {
        lua_State *co = fb_co(b->listener);
        int n = 3;
        if (b->note) {
            lua_pushstring(co, b->note->relname);
            lua_pushstring(co, b->note->extra);
            lua_pushinteger(co, b->note->be_pid);
        } else {
            n = fb_push_error(co, b->lcode, "%s", b->lmsg);
        }
        fb_wake(b->listener, n);
    }
    if (b->note) PQfreemem(b->note);
    for (pg_op *op = b->done, *next; op; op = next) {
        next = op->next;
        fb_fiber *f = op->fiber;
        int n = f ? push_result(fb_co(f), op) : 0;
        op_free(op);
        if (f) fb_wake(f, n);
    }
}

static void on_poll(uv_poll_t *h, int status, int events);

static void handle_free_cb(uv_handle_t *h) { free(h); }

static void conn_free(pg_conn *c) {
    for (int i = 0; c->keys[i]; i++) {
        free(c->keys[i]);
        free(c->vals[i]);
    }
    free(c->broken);
    free(c);
}

static void conn_free_cb(uv_handle_t *h) {
    conn_free((pg_conn *)h->data);
    free(h);
}

/* Stops watching the socket. Done before libpq closes it, or right after libpq has:
 * closing a poll handle unregisters its fd number from epoll, and once that number
 * belongs to another socket this would silently deafen that one. */
static void unwatch(pg_conn *c, uv_close_cb cb) {
    if (!c->poll) return;
    uv_close((uv_handle_t *)c->poll, cb);
    c->poll = NULL;
    c->events = 0;
}

/* An idle connection must not keep the process alive (a script that ends without
 * closing its database would never exit): the watch counts for the loop only while
 * someone waits on the connection. */
static void hold_loop(pg_conn *c) {
    if (!c->poll) return;
    if (c->head || c->listener || c->connecting) uv_ref((uv_handle_t *)c->poll);
    else uv_unref((uv_handle_t *)c->poll);
}

/* Watches the socket for `events`. libpq may switch sockets while connecting (one
 * address after another, sometimes reusing the fd number), so until connected every
 * step registers a fresh handle. */
static int watch(pg_conn *c, int events) {
    int fd = PQsocket(c->pg);
    if (fd < 0) return UV_EBADF;
    if (c->poll && (c->state == ST_CONNECTING || fd != c->fd)) unwatch(c, handle_free_cb);
    if (!c->poll) {
        c->poll = (uv_poll_t *)malloc(sizeof *c->poll);
        if (!c->poll) return UV_ENOMEM;
        int rc = uv_poll_init(fb_loop(), c->poll, fd);
        if (rc) {
            free(c->poll);
            c->poll = NULL;
            return rc;
        }
        c->poll->data = c;
        c->fd = fd;
        c->events = 0;
    }
    hold_loop(c);
    if (events == c->events) return 0;
    c->events = events;
    return uv_poll_start(c->poll, events, on_poll);
}

/* Drops the connection; the struct is freed when its poll handle is closed (so
 * never inside its own callback), or now if it has none. Queued operations must
 * already be detached. */
static void conn_release(pg_conn *c) {
    int resolving = c->state == ST_RESOLVING;
    int had_poll = c->poll != NULL;
    c->state = ST_CLOSED;
    unwatch(c, conn_free_cb);
    PQfinish(c->pg);
    c->pg = NULL;
    if (!resolving && !had_poll) conn_free(c); /* while resolving, gai_cb frees it */
}

/* The connection is gone (libpq may already have closed the socket): every queued
 * operation and the listener get the reason. */
static void mark_broken(pg_conn *c, const char *why, batch *b) {
    char msg[600];
    snprintf(msg, sizeof msg, "connection lost: %s", why && *why ? why : "the server closed it");
    one_line(msg);
    c->state = ST_BROKEN;
    free(c->broken);
    c->broken = strdup(msg);
    unwatch(c, handle_free_cb);
    fail_all(c, "ECONNRESET", msg, b);
}

/* Sends the head operation if it is not on the wire yet. Returns 0 on failure. */
static int send_head(pg_conn *c) {
    while (c->head && !c->head->sent && !c->head->fiber) { /* abandoned before it was sent */
        pg_op *op = c->head;
        c->head = op->next;
        if (!c->head) c->tail = NULL;
        op_free(op);
    }
    pg_op *op = c->head;
    if (!op || op->sent) return 1;
    op->sent = 1;
    if (op->kind == OP_SCRIPT) return PQsendQuery(c->pg, op->sql);
    return PQsendQueryParams(c->pg, op->sql, op->nparams, op->types,
                             (const char *const *)op->values, NULL, NULL, 0);
}

/* Reads every complete result, finishes operations, sends the next one and sets
 * the watch for what libpq needs now. */
static void pump(pg_conn *c, batch *b) {
    for (;;) {
        if (!send_head(c)) {
            mark_broken(c, PQerrorMessage(c->pg), b);
            return;
        }
        if (!c->head || PQisBusy(c->pg)) break;
        PGresult *r = PQgetResult(c->pg);
        if (!r) {
            finish_head(c, b);
            continue;
        }
        pg_op *op = c->head;
        if (op->result && PQresultStatus(op->result) == PGRES_FATAL_ERROR) {
            PQclear(r);
        } else {
            PQclear(op->result);
            op->result = r;
        }
    }
    if (c->listener && (b->note = PQnotifies(c->pg))) {
        b->listener = c->listener;
        c->listener = NULL;
    }
    int flush = PQflush(c->pg);
    /* libpq may find the connection dead while writing yet report success (it
     * expects the next read to tell), having closed the socket already. */
    if (flush < 0 || PQstatus(c->pg) == CONNECTION_BAD) {
        mark_broken(c, PQerrorMessage(c->pg), b);
        return;
    }
    int rc = watch(c, flush ? UV_READABLE | UV_WRITABLE : UV_READABLE);
    if (rc) mark_broken(c, uv_strerror(rc), b);
}

static void push_conn(lua_State *L, pg_conn *c) {
    pg_conn **box = (pg_conn **)lua_newuserdata(L, sizeof *box);
    *box = c;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
}

static void connect_failed(pg_conn *c, int (*push)(lua_State *, pg_conn *)) {
    fb_fiber *f = c->connecting;
    c->connecting = NULL;
    int n = push(fb_co(f), c);
    conn_release(c);
    fb_wake(f, n);
}

static int push_pq_error(lua_State *L, pg_conn *c) { return push_conn_error(L, c->pg); }

/* Server NOTICEs ("relation ... already exists, skipping") are not errors; libpq's
 * default prints them to stderr. */
static void ignore_notice(void *arg, const char *message) {
    (void)arg;
    (void)message;
}

static void connect_step(pg_conn *c) {
    int rc = 0;
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING: rc = watch(c, UV_READABLE); break;
    case PGRES_POLLING_WRITING: rc = watch(c, UV_WRITABLE); break;
    case PGRES_POLLING_OK: {
        if (PQsetnonblocking(c->pg, 1) != 0) break;
        PQsetNoticeProcessor(c->pg, ignore_notice, NULL);
        fb_fiber *f = c->connecting;
        c->state = ST_READY;
        c->connecting = NULL;
        if (watch(c, UV_READABLE) != 0) {
            c->connecting = f;
            break;
        }
        push_conn(fb_co(f), c);
        fb_wake(f, 1);
        return;
    }
    default: break;
    }
    if (rc == 0 && c->state == ST_CONNECTING && PQstatus(c->pg) != CONNECTION_BAD) return;
    connect_failed(c, push_pq_error);
}

static void on_poll(uv_poll_t *h, int status, int events) {
    pg_conn *c = (pg_conn *)h->data;
    if (c->state == ST_CONNECTING) {
        connect_step(c);
        return;
    }
    if (c->state != ST_READY) return;
    batch b;
    batch_init(&b);
    if (status < 0) mark_broken(c, uv_strerror(status), &b);
    else if ((events & UV_READABLE) && !PQconsumeInput(c->pg)) mark_broken(c, PQerrorMessage(c->pg), &b);
    else pump(c, &b);
    batch_run(&b);
}

static void start_connect(pg_conn *c) {
    c->state = ST_CONNECTING;
    c->pg = PQconnectStartParams((const char *const *)c->keys, (const char *const *)c->vals, 0);
    if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD || watch(c, UV_WRITABLE) != 0)
        connect_failed(c, push_pq_error);
}

static int push_resolve_error(lua_State *L, pg_conn *c) {
    return fb_push_error(L, "ECONNECT", "cannot resolve host \"%s\": %s", c->vals[c->host_index],
                         uv_strerror(c->gai_status));
}

/* Hands libpq every address as hostaddr (comma-separated, host repeated to match,
 * as libpq wants one host per address), so it tries them in order as it would. */
static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
    pg_conn *c = (pg_conn *)req->data;
    if (c->state == ST_CLOSED) { /* abandoned while resolving */
        uv_freeaddrinfo(res);
        conn_free(c);
        return;
    }
    c->state = ST_CONNECTING; /* from here conn_release frees c */
    const char *host = c->vals[c->host_index];
    char addrs[1024] = "", hosts[2048] = "", ip[INET6_ADDRSTRLEN];
    int n = 0;
    for (struct addrinfo *a = res; status == 0 && a; a = a->ai_next) {
        const void *src = a->ai_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)a->ai_addr)->sin6_addr
                                                   : (const void *)&((struct sockaddr_in *)a->ai_addr)->sin_addr;
        if (!inet_ntop(a->ai_family, src, ip, sizeof ip)) continue;
        if (strlen(addrs) + strlen(ip) + 2 > sizeof addrs || strlen(hosts) + strlen(host) + 2 > sizeof hosts)
            break;
        if (n++) {
            strcat(addrs, ",");
            strcat(hosts, ",");
        }
        strcat(addrs, ip);
        strcat(hosts, host);
    }
    uv_freeaddrinfo(res);
    int k = 0;
    while (c->keys[k]) k++;
    char *hostlist = n ? strdup(hosts) : NULL;
    c->keys[k] = n ? strdup("hostaddr") : NULL;
    c->vals[k] = n ? strdup(addrs) : NULL;
    if (!hostlist || !c->keys[k] || !c->vals[k]) {
        free(hostlist);
        c->gai_status = status ? status : n ? UV_ENOMEM : UV_EAI_NONAME;
        connect_failed(c, push_resolve_error);
        return;
    }
    free(c->vals[c->host_index]);
    c->vals[c->host_index] = hostlist;
    start_connect(c);
}

static void abort_connect(void *p) {
    pg_conn *c = (pg_conn *)p;
    c->connecting = NULL;
    conn_release(c);
}

static void abort_listen(void *p) {
    pg_conn *c = (pg_conn *)p;
    c->listener = NULL;
    hold_loop(c);
}

/* ---- Lua functions ------------------------------------------------------------------ */

static pg_conn *check_conn(lua_State *L) {
    pg_conn **box = (pg_conn **)luaL_checkudata(L, 1, CONN_MT);
    if (!*box) luaL_error(L, "pg: the connection is closed");
    return *box;
}

/* A host that needs a name lookup: not a socket directory, an address or a list. */
static int needs_lookup(const char *host) {
    unsigned char buf[sizeof(struct in6_addr)];
    return host && *host && host[0] != '/' && host[0] != '@' && !strchr(host, ',') &&
           inet_pton(AF_INET, host, buf) != 1 && inet_pton(AF_INET6, host, buf) != 1;
}

static int pg_connect(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    double timeout = luaL_optnumber(L, 2, 10);
    fb_fiber *f = fb_check_current(L, "pg.connect");
    pg_conn *c = (pg_conn *)calloc(1, sizeof *c);
    if (!c) return luaL_error(L, "pg.connect: out of memory");
    const char *host = NULL;
    int n = 0, lookup = 1;
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1) || n == MAX_KW) {
            conn_free(c);
            return luaL_argerror(L, 1, "expected at most 32 string keywords and values");
        }
        const char *k = lua_tostring(L, -2);
        if (!strcmp(k, "host")) {
            host = lua_tostring(L, -1);
            c->host_index = n;
        }
        if (!strcmp(k, "hostaddr")) lookup = 0;
        c->keys[n] = strdup(k);
        c->vals[n] = strdup(lua_tostring(L, -1));
        if (!c->keys[n++] || !c->vals[n - 1]) {
            conn_free(c);
            return luaL_error(L, "pg.connect: out of memory");
        }
        lua_pop(L, 1);
    }
    c->connecting = f;
    if (lookup && needs_lookup(host)) {
        struct addrinfo hints;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        c->state = ST_RESOLVING;
        c->gai.data = c;
        int rc = uv_getaddrinfo(fb_loop(), &c->gai, gai_cb, host, NULL, &hints);
        if (rc) {
            conn_free(c);
            return fb_push_uv_error(L, rc, "resolving the PostgreSQL host");
        }
        return fb_await(L, f, abort_connect, c, timeout);
    }
    c->state = ST_CONNECTING;
    c->pg = PQconnectStartParams((const char *const *)c->keys, (const char *const *)c->vals, 0);
    if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD || watch(c, UV_WRITABLE) != 0) {
        c->connecting = NULL;
        int rc = push_conn_error(L, c->pg);
        conn_release(c);
        return rc;
    }
    return fb_await(L, f, abort_connect, c, timeout);
}

/* What PQconninfoParse returned, owned by a userdata until it is freed: building the
 * Lua result can raise (out of memory), and the __gc then frees it. */
typedef struct {
    PQconninfoOption *opts;
    char *errmsg;
} conninfo_box;

static void conninfo_box_free(conninfo_box *b) {
    if (b->opts) PQconninfoFree(b->opts);
    if (b->errmsg) PQfreemem(b->errmsg);
    b->opts = NULL;
    b->errmsg = NULL;
}

static int conninfo_box_gc(lua_State *L) {
    conninfo_box_free((conninfo_box *)luaL_checkudata(L, 1, CONNINFO_MT));
    return 0;
}

/* libpq's own URI parser, so factory.db.url reads URIs exactly as libpq would: only
 * the keywords the URI sets (no defaults from the environment). The message is
 * libpq's, on one line; it may quote any part of the URI, the password included, so
 * the caller must hide that before showing it. */
static int pg_conninfo(lua_State *L) {
    size_t len;
    const char *uri = luaL_checklstring(L, 1, &len);
    if (strlen(uri) != len) {
        lua_pushnil(L);
        lua_pushliteral(L, "the URI contains a NUL byte");
        return 2;
    }
    conninfo_box *b = (conninfo_box *)lua_newuserdata(L, sizeof *b);
    b->opts = NULL;
    b->errmsg = NULL;
    luaL_getmetatable(L, CONNINFO_MT);
    lua_setmetatable(L, -2);
    b->opts = PQconninfoParse(uri, &b->errmsg);
    if (!b->opts) {
        lua_pushnil(L);
        if (b->errmsg) {
            one_line(b->errmsg);
            lua_pushstring(L, b->errmsg);
        } else {
            lua_pushliteral(L, "out of memory");
        }
        conninfo_box_free(b);
        return 2;
    }
    lua_newtable(L);
    for (const PQconninfoOption *o = b->opts; o->keyword; o++) {
        if (!o->val) continue;
        lua_pushstring(L, o->val);
        lua_setfield(L, -2, o->keyword);
    }
    conninfo_box_free(b);
    return 1;
}

/* Raises (misuse) on a parameter that cannot be sent, before anything is allocated. */
static void check_params(lua_State *L, int idx, int n) {
    if (n <= 0) return;
    luaL_checktype(L, idx, LUA_TTABLE);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        int t = lua_type(L, -1);
        if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER && t != LUA_TSTRING)
            luaL_error(L, "pg: parameter %d is a %s (expected nil, boolean, number or string)",
                       i, lua_typename(L, t));
        if (t == LUA_TSTRING) {
            size_t len;
            const char *s = lua_tolstring(L, -1, &len);
            if (strlen(s) != len) luaL_error(L, "pg: parameter %d contains a NUL byte", i);
        }
        lua_pop(L, 1);
    }
}

static char *format_param(lua_State *L, Oid *type) {
    char buf[64];
    switch (lua_type(L, -1)) {
    case LUA_TBOOLEAN:
        *type = BOOLOID;
        return strdup(lua_toboolean(L, -1) ? "t" : "f");
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, -1);
        if (d == floor(d) && fabs(d) < 9.2e18) {
            *type = INT8OID;
            snprintf(buf, sizeof buf, "%lld", (long long)d);
        } else {
            *type = FLOAT8OID;
            if (isnan(d)) snprintf(buf, sizeof buf, "NaN");
            else if (isinf(d)) snprintf(buf, sizeof buf, d > 0 ? "Infinity" : "-Infinity");
            else snprintf(buf, sizeof buf, "%.17g", d);
        }
        return strdup(buf);
    }
    default:
        *type = 0;
        return strdup(lua_tostring(L, -1));
    }
}

/* Queues op (taking ownership); sends it at once when the connection is idle. */
static int submit(lua_State *L, pg_conn *c, pg_op *op) {
    fb_fiber *f = fb_current(L);
    if (c->state != ST_READY) {
        op_free(op);
        return fb_push_error(L, "ECONNRESET", "%s", c->broken ? c->broken : "the connection is not ready");
    }
    op->fiber = f;
    if (c->tail) c->tail->next = op; else c->head = op;
    c->tail = op;
    if (c->head == op) {
        batch b;
        batch_init(&b);
        pump(c, &b);
        int failed = b.done != NULL; /* only op can be there: the connection broke */
        if (failed) op->fiber = NULL;
        batch_run(&b);
        if (failed) return fb_push_error(L, "ECONNRESET", "%s", c->broken ? c->broken : "the connection broke");
    }
    return fb_await(L, f, abort_op, op, 0);
}

static pg_op *op_new(lua_State *L, int kind, const char *sql) {
    pg_op *op = (pg_op *)calloc(1, sizeof *op);
    if (!op || !(op->sql = strdup(sql))) {
        free(op);
        luaL_error(L, "pg: out of memory");
    }
    op->kind = kind;
    return op;
}

static int pg_run(lua_State *L) {
    pg_conn *c = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    int n = (int)luaL_optinteger(L, 4, 0);
    fb_check_current(L, "pg query");
    check_params(L, 3, n);
    pg_op *op = op_new(L, OP_RUN, sql);
    if (n > 0) {
        op->values = (char **)calloc((size_t)n, sizeof *op->values);
        op->types = (Oid *)calloc((size_t)n, sizeof *op->types);
        if (!op->values || !op->types) {
            op_free(op);
            return luaL_error(L, "pg: out of memory");
        }
        op->nparams = n;
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 3, i + 1);
            if (!lua_isnil(L, -1) && !(op->values[i] = format_param(L, &op->types[i]))) {
                op_free(op);
                return luaL_error(L, "pg: out of memory");
            }
            lua_pop(L, 1);
        }
    }
    return submit(L, c, op);
}

static int pg_script(lua_State *L) {
    pg_conn *c = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    fb_check_current(L, "pg script");
    return submit(L, c, op_new(L, OP_SCRIPT, sql));
}

static int pg_wait_notify(lua_State *L) {
    pg_conn *c = check_conn(L);
    double timeout = luaL_optnumber(L, 2, 0);
    fb_fiber *f = fb_check_current(L, "pg wait_notify");
    if (c->listener) return luaL_error(L, "pg wait_notify: another fiber is already waiting on this connection");
    if (c->state != ST_READY)
        return fb_push_error(L, "ECONNRESET", "%s", c->broken ? c->broken : "the connection is not ready");
    PGnotify *n = PQnotifies(c->pg);
    if (n) {
        lua_pushstring(L, n->relname);
        lua_pushstring(L, n->extra);
        lua_pushinteger(L, n->be_pid);
        PQfreemem(n);
        return 3;
    }
    c->listener = f;
    hold_loop(c);
    return fb_await(L, f, abort_listen, c, timeout);
}

static int pg_quote_ident(lua_State *L) {
    pg_conn *c = check_conn(L);
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    char *q = PQescapeIdentifier(c->pg, name, len);
    if (!q) return luaL_error(L, "pg quote_ident: %s", PQerrorMessage(c->pg));
    lua_pushstring(L, q);
    PQfreemem(q);
    return 1;
}

static int pg_ok(lua_State *L) {
    pg_conn **box = (pg_conn **)luaL_checkudata(L, 1, CONN_MT);
    lua_pushboolean(L, *box && (*box)->state == ST_READY);
    return 1;
}

/* Also __gc. Fibers still waiting on the connection get ECLOSED. */
static int pg_close(lua_State *L) {
    pg_conn **box = (pg_conn **)luaL_checkudata(L, 1, CONN_MT);
    pg_conn *c = *box;
    if (c) {
        *box = NULL;
        batch b;
        batch_init(&b);
        fail_all(c, "ECLOSED", "the connection was closed", &b);
        conn_release(c);
        batch_run(&b);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int pg_tostring(lua_State *L) {
    pg_conn **box = (pg_conn **)luaL_checkudata(L, 1, CONN_MT);
    if (*box) lua_pushfstring(L, "postgres connection (%s)", (*box)->state == ST_READY ? "ready" : "broken");
    else lua_pushliteral(L, "postgres connection (closed)");
    return 1;
}

static const luaL_Reg conn_methods[] = {
    {"run",         pg_run},
    {"script",      pg_script},
    {"wait_notify", pg_wait_notify},
    {"quote_ident", pg_quote_ident},
    {"ok",          pg_ok},
    {"close",       pg_close},
    {NULL, NULL},
};

static const luaL_Reg pg_functions[] = {
    {"conninfo", pg_conninfo},
    {"connect", pg_connect},
    {NULL, NULL},
};

int luaopen_factory_core_db_pg(lua_State *L) {
    if (luaL_newmetatable(L, CONN_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, conn_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, pg_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, pg_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, CONNINFO_MT)) {
        lua_pushcfunction(L, conninfo_box_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, pg_functions);
    lua_pushinteger(L, PQlibVersion());
    lua_setfield(L, -2, "libpq_version");
    return 1;
}
