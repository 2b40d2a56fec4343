/* core/http_server.c — factory.core.http_server: an HTTP/1.1 server for fibers, on
 * the process's libuv loop; requests are parsed by http_parser (libhttp-parser 2.9).
 *
 *   listen{ host = "127.0.0.1", port = 0, token = nil, tokens = nil,
 *           handler = function(req, res), max_header_bytes = 16384,
 *           max_body_bytes = 8 MiB, header_timeout = 10, idle_timeout = 60 }
 *       -> server | nil, "ECODE: message", "ECODE"
 *     host is an IP address or "localhost"; anything but loopback needs a token
 *     (else EACCES). token is one accepted bearer token, tokens a list of more
 *     (per-client keys); with any, every request must carry "Authorization: Bearer
 *     TOKEN" (or "x-api-key: TOKEN") with one of them (else 401). Timeouts are seconds, 0 = none:
 *     header_timeout bounds the head from its first byte (and a new connection's
 *     wait for it) and any pause in the body; idle_timeout bounds a kept-alive
 *     connection between requests and a write the client does not drain (the
 *     writer then gets nil, "ETIMEDOUT: ...", "ETIMEDOUT" and the connection goes).
 *   server:port(), server:host(), server:stats() -> { connections, in_flight }
 *   server:set_tokens{ token =, tokens = } -> true | nil, err, "EACCES"   replaces the
 *     accepted tokens (a server beyond loopback cannot go without)
 *   server:close([grace]) stops accepting, closes idle connections, lets requests
 *     in flight finish for up to grace seconds (when called from a fiber), then
 *     closes everything and cancels the handler fibers still running. From a
 *     handler of the same server, its own request counts as in flight: close from
 *     another fiber. __gc closes a forgotten server (without the grace).
 *
 * Each request runs handler(req, res) in a fiber of its own, one request at a time
 * per connection (pipelined requests wait their turn, in order).
 *   req = { method, path, query (raw, "" if none), headers (lowercase names, repeated
 *           ones joined by ", "), body (whole, "" if none) }
 *   res:status(n), res:header(name, value)      -> res (before anything is sent)
 *   res:send([body])                            a whole response with Content-Length
 *   res:start(), res:write(chunk), res:finish() a streamed response (chunked; to an
 *                                               HTTP/1.0 client, ended by closing)
 *   res:sse(event)  one Server-Sent Event: a string (the data) or { event =, data =,
 *                   id =, retry =, comment = }; the first one sends text/event-stream
 *   res:cancel_on_disconnect()  -> res: if the client closes the connection (or
 *                   half-closes it) before the response is finished, the handler's
 *                   fiber is cancelled at once, rather than when it next writes:
 *                   for a handler that waits long on work someone pays for
 * send, start, write, finish and sse return true, or nil, "ECONNRESET: ...",
 * "ECONNRESET" once the client is gone. They wait while the socket's send buffer is
 * full, so a slow reader slows its writer down. Misuse (a header after the head was
 * sent, a write after finish, CR/LF in a header) raises. Extra methods can be added
 * to the table `response` (the router adds json and error). HEAD gets no body.
 *
 * The server answers by itself, with an OpenAI-shaped JSON error: 400 (malformed
 * request), 401 (token), 408 (request not received in time), 413 (body), 431 (head),
 * 503 (the runtime is shutting down), all closing the connection; and 500 when the
 * handler raised (logged with its traceback through factory.log) or returned
 * without responding. A response already streaming is cut off instead.
 *
 * Lifetimes: the server and its connections are malloc'd and freed when their last
 * uv handle has closed and (for the server) Lua has let go. The response userdata
 * and its connection point at each other; whichever goes first clears the other's
 * pointer, so a response outliving its connection reports ECONNRESET, and a
 * response collected unfinished (its fiber was cancelled) closes the connection.
 * A connection holds a registry reference to its handler's fiber only to cancel it
 * on close().
 */
#include "fiber.h"

#include <http_parser.h>
#include <lauxlib.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define SERVER_MT "factory.http_server"
#define RESPONSE_MT "factory.http_response"
#define READ_ROOM 8192
/* Bytes of pipelined requests buffered while a handler runs before reading pauses. */
#define PIPELINE_HIGH_WATER 65536
/* Buffers bigger than this are given back after each request. */
#define KEEP_BUFFER 65536
/* How long a closing connection may take to flush its response and see the
 * client's end, so that unread request bytes do not turn the close into a reset
 * that destroys the response (RFC 9112 9.6). */
#define LINGER_MS 5000

typedef struct {
    char *data;
    size_t len, cap;
} buf;

typedef struct {
    size_t name, nlen, value, vlen;     /* offsets into conn.hdr */
} hfield;

typedef struct {
    char *data;
    size_t len;
} token;

typedef struct server server;
typedef struct conn conn;
typedef struct response response;

enum { T_NONE, T_IDLE, T_HEADERS, T_BODY, T_LINGER };
enum { R_FRESH, R_STREAMING, R_DONE };
enum { OUT_CHUNK, OUT_SEND, OUT_FINISH };

struct server {
    uv_tcp_t tcp;
    lua_State *L;               /* a thread of our own for calls into Lua from callbacks */
    int thread_ref, handler_ref, dispatch_ref;
    token *tokens;              /* accepted bearer tokens; none: no authorization */
    int ntokens;
    int loopback;               /* bound to loopback: may go without tokens */
    size_t max_header, max_body;
    uint64_t header_ms, idle_ms;
    conn *conns;
    int handles;                /* open uv handles: the listener and each connection */
    int connections, busy;
    int closing;                /* no longer accepting */
    int killed;                 /* Lua has let go: free with the last handle */
    fb_fiber *closer;           /* waiting in close() for busy to reach 0 */
    char host[64];
    int port;
};

typedef struct {
    server *s;                  /* NULL once closed */
} server_ud;

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown;
    http_parser parser;
    server *s;
    conn *prev, *next;
    int handles;
    buf in;                     /* received bytes; those before in_pos are parsed */
    size_t in_pos;
    buf url, hdr, body;         /* the request being received */
    hfield *fields;
    size_t nfields, fcap, header_bytes;
    size_t path_off, path_len, query_off, query_len;
    int last_was_value;
    int err_status;             /* why a parser callback stopped the parser */
    const char *err_msg;
    int timer_kind;
    int receiving, ready, busy, keep_alive, head, eof, reading, processing;
    int ending, shut, closing;  /* conn_end called; its shutdown done; conn_close called */
    response *res;              /* the response of the request in flight */
    int fiber_ref;              /* its handler's fiber */
    int cancel_on_gone;         /* res:cancel_on_disconnect() was called */
};

struct response {
    conn *c;                    /* NULL once the response is done or the client gone */
    int state, status;
    int chunked, nobody, close, has_ctype;
    buf head;                   /* "Name: value\r\n" lines set by the handler */
};

typedef struct {
    uv_write_t req;
    fb_fiber *fiber;            /* waiting for the write to drain, if any */
    buf b;
} wreq;

/* ---- buffers ---------------------------------------------------------------- */

static int buf_reserve(buf *b, size_t extra) {
    if (b->cap - b->len >= extra) return 1;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap - b->len < extra) cap *= 2;
    char *d = (char *)realloc(b->data, cap);
    if (!d) return 0;
    b->data = d;
    b->cap = cap;
    return 1;
}

static int buf_append(buf *b, const char *p, size_t n) {
    if (!buf_reserve(b, n)) return 0;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    return 1;
}

static int buf_printf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int buf_printf(buf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < sizeof tmp && buf_append(b, tmp, (size_t)n);
}

static void buf_free(buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Empties b, giving its memory back when a big request made it grow. */
static void buf_reset(buf *b) {
    if (b->cap > KEEP_BUFFER) buf_free(b);
    b->len = 0;
}

static const char *bytes(const buf *b) { return b->data ? b->data : ""; }

/* ---- connections --------------------------------------------------------------- */

static void conn_process(conn *c, lua_State *L);

static void on_timer(uv_timer_t *t);

static void timer_set(conn *c, int kind, uint64_t ms) {
    c->timer_kind = kind;
    if (kind == T_NONE || ms == 0) uv_timer_stop(&c->timer);
    else uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void free_tokens(token *t, int n) {
    for (int i = 0; i < n; i++) free(t[i].data);
    free(t);
}

static void server_free(server *s) {
    free_tokens(s->tokens, s->ntokens);
    free(s);
}

static void server_maybe_free(server *s) {
    if (s->handles > 0 || !s->killed) return;
    server_free(s);
}

static void on_conn_closed(uv_handle_t *h) {
    conn *c = (conn *)h->data;
    if (--c->handles > 0) return;
    server *s = c->s;
    buf_free(&c->in);
    buf_free(&c->url);
    buf_free(&c->hdr);
    buf_free(&c->body);
    free(c->fields);
    free(c);
    s->handles--;
    server_maybe_free(s);
}

/* The request in flight no longer needs the connection's attention: detach its
 * response, release its fiber, and wake close() when it was the last one. */
static void request_end(conn *c) {
    server *s = c->s;
    if (c->res) {
        c->res->c = NULL;
        c->res = NULL;
    }
    if (c->fiber_ref != LUA_NOREF && s->L) luaL_unref(s->L, LUA_REGISTRYINDEX, c->fiber_ref);
    c->fiber_ref = LUA_NOREF;
    c->cancel_on_gone = 0;
    if (!c->busy) return;
    c->busy = 0;
    if (--s->busy == 0 && s->closer) {
        fb_fiber *f = s->closer;
        s->closer = NULL;
        lua_pushboolean(fb_co(f), 1);
        fb_wake(f, 1);
    }
}

static void conn_close(conn *c) {
    if (c->closing) return;
    c->closing = 1;
    server *s = c->s;
    if (c->prev) c->prev->next = c->next; else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    s->connections--;
    request_end(c);
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
    conn *c = (conn *)req->data;
    c->shut = 1;
    if (status < 0 || c->eof || c->s->killed) conn_close(c);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b);
static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b);

static void read_resume(conn *c) {
    if (!c->reading && !c->eof && uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
}

/* Closes gracefully: the queued writes go out, then FIN; what the client still
 * sends is read and dropped until its end or LINGER_MS. */
static void conn_end(conn *c) {
    if (c->ending || c->closing) return;
    c->ending = 1;
    c->shutdown.data = c;
    if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        conn_close(c);
        return;
    }
    read_resume(c);
    timer_set(c, T_LINGER, LINGER_MS);
}

static void on_write(uv_write_t *req, int status) {
    wreq *w = (wreq *)req;
    conn *c = (conn *)req->handle->data;
    if (status < 0) conn_close(c);
    if (w->fiber) {
        lua_State *co = fb_co(w->fiber);
        if (status < 0)
            fb_push_error(co, "ECONNRESET", "the client closed the connection (%s)", uv_err_name(status));
        else lua_pushboolean(co, 1);
        fb_wake(w->fiber, status < 0 ? 3 : 1);
    }
    buf_free(&w->b);
    free(w);
}

/* The writer gave up (cancelled, or the client stalled past idle_timeout): the
 * response cannot be completed, so the connection goes. */
static void wreq_abort(void *op) {
    wreq *w = (wreq *)op;
    w->fiber = NULL;
    conn_close((conn *)w->req.handle->data);
}

enum { SUBMIT_FAILED, SUBMIT_QUEUED, SUBMIT_WRITTEN };

/* Sends w's bytes on c (taking w): SUBMIT_WRITTEN when the socket took them all at
 * once (w is freed), SUBMIT_QUEUED when the rest went to a uv_write (w is its
 * request), SUBMIT_FAILED when the connection failed. Writing directly first spares
 * a response that fits the socket buffer (nearly all) the write request's round
 * through the loop, and the epoll_ctl libuv makes when its write queue drains. A
 * write that fails here is left to uv_write to fail again and report, as before. */
static int conn_submit(conn *c, wreq *w) {
    uv_buf_t b = uv_buf_init(w->b.data, (unsigned)w->b.len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n > 0 && (size_t)n == w->b.len) {
        buf_free(&w->b);
        free(w);
        return SUBMIT_WRITTEN;
    }
    if (n > 0) {
        b.base += n;
        b.len -= (unsigned)n;
    }
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        buf_free(&w->b);
        free(w);
        conn_close(c);
        return SUBMIT_FAILED;
    }
    return SUBMIT_QUEUED;
}

static const char *http_date(void) {
    static char text[40];
    static time_t last;
    time_t now = time(NULL);
    if (now != last) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(text, sizeof text, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        last = now;
    }
    return text;
}

/* Answers on c by itself (no handler involved) and closes the connection. */
static void send_error(conn *c, int status, const char *message) {
    if (c->ending || c->closing) return;
    const char *type = status == 401 ? "authentication_error"
                     : status >= 500 ? "server_error" : "invalid_request_error";
    char body[512];
    int blen = snprintf(body, sizeof body, "{\"error\":{\"message\":\"%s\",\"type\":\"%s\"}}", message, type);
    wreq *w = (wreq *)calloc(1, sizeof *w);
    if (!w || blen < 0 || (size_t)blen >= sizeof body ||
        !buf_printf(&w->b, "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
                    "Content-Length: %d\r\nConnection: close\r\n%s\r\n", status,
                    http_status_str((enum http_status)status), http_date(), blen,
                    status == 401 ? "WWW-Authenticate: Bearer\r\n" : "") ||
        !buf_append(&w->b, body, (size_t)blen)) {
        if (w) buf_free(&w->b);
        free(w);
        conn_close(c);
        return;
    }
    if (conn_submit(c, w)) conn_end(c);
}

static void on_timer(uv_timer_t *t) {
    conn *c = (conn *)t->data;
    if (c->timer_kind == T_LINGER) conn_close(c);
    else if (c->receiving) send_error(c, 408, "the request was not received in time");
    else conn_end(c);      /* an idle connection may still be flushing its last response */
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
    conn *c = (conn *)h->data;
    if (c->in_pos > 0) {
        memmove(c->in.data, c->in.data + c->in_pos, c->in.len - c->in_pos);
        c->in.len -= c->in_pos;
        c->in_pos = 0;
    }
    if (!buf_reserve(&c->in, READ_ROOM)) {
        *b = uv_buf_init(NULL, 0);      /* the read callback gets UV_ENOBUFS */
        return;
    }
    *b = uv_buf_init(c->in.data + c->in.len, (unsigned)(c->in.cap - c->in.len));
}

/* The client went away while a handler that asked for it (cancel_on_disconnect)
 * still works: the connection closes and the handler's fiber is cancelled. */
static void cancel_handler(conn *c) {
    server *s = c->s;
    lua_State *L = s->L;
    int ref = c->fiber_ref;
    c->fiber_ref = LUA_NOREF;
    conn_close(c);
    if (!L || ref == LUA_NOREF) return;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    lua_getfield(L, -1, "cancel");
    lua_insert(L, -2);
    lua_pushliteral(L, "the client closed the connection");
    lua_pcall(L, 2, 0, 0);
    lua_settop(L, top);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
    conn *c = (conn *)st->data;
    if (n == 0) return;
    if (n < 0 && c->busy && c->cancel_on_gone && c->fiber_ref != LUA_NOREF) {
        cancel_handler(c);
        return;
    }
    if (n < 0) {
        if (n != UV_EOF) {
            conn_close(c);
            return;
        }
        c->eof = 1;
        c->reading = 0;
        if (c->shut) conn_close(c);
        else if (!c->busy) conn_end(c);
        return;
    }
    if (c->ending) {
        c->in.len = c->in_pos = 0;
        return;
    }
    c->in.len += (size_t)n;
    if (c->timer_kind == T_BODY) timer_set(c, T_BODY, c->s->header_ms);
    if (!c->busy) {
        conn_process(c, c->s->L);
    } else if (c->in.len - c->in_pos > PIPELINE_HIGH_WATER) {
        uv_read_stop(st);
        c->reading = 0;
    }
}

/* ---- parsing ---------------------------------------------------------------------- */

static int stop(conn *c, int status, const char *message) {
    c->err_status = status;
    c->err_msg = message;
    return -1;
}

static int over_limit(conn *c, size_t len) {
    c->header_bytes += len;
    return c->header_bytes > c->s->max_header;
}

static int on_message_begin(http_parser *p) {
    conn *c = (conn *)p->data;
    c->receiving = 1;
    c->url.len = c->hdr.len = c->body.len = 0;
    c->nfields = c->header_bytes = 0;
    c->last_was_value = 0;
    timer_set(c, T_HEADERS, c->s->header_ms);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
    conn *c = (conn *)p->data;
    if (over_limit(c, len)) return stop(c, 431, "the request head is too large");
    if (!buf_append(&c->url, at, len)) return stop(c, 500, "out of memory");
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
    conn *c = (conn *)p->data;
    if (over_limit(c, len)) return stop(c, 431, "the request head is too large");
    if (c->nfields == 0 || c->last_was_value) {
        if (c->nfields == c->fcap) {
            size_t cap = c->fcap ? c->fcap * 2 : 16;
            hfield *f = (hfield *)realloc(c->fields, cap * sizeof *f);
            if (!f) return stop(c, 500, "out of memory");
            c->fields = f;
            c->fcap = cap;
        }
        c->fields[c->nfields++] = (hfield){ c->hdr.len, 0, 0, 0 };
        c->last_was_value = 0;
    }
    if (!buf_append(&c->hdr, at, len)) return stop(c, 500, "out of memory");
    c->fields[c->nfields - 1].nlen += len;
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
    conn *c = (conn *)p->data;
    if (over_limit(c, len)) return stop(c, 431, "the request head is too large");
    hfield *f = &c->fields[c->nfields - 1];
    if (!c->last_was_value) {
        f->value = c->hdr.len;
        c->last_was_value = 1;
    }
    if (!buf_append(&c->hdr, at, len)) return stop(c, 500, "out of memory");
    f->vlen += len;
    return 0;
}

/* The value of the request header `name` (lowercase), or NULL. */
static const char *find_header(conn *c, const char *name, size_t *len) {
    size_t n = strlen(name);
    for (size_t i = 0; i < c->nfields; i++) {
        hfield *f = &c->fields[i];
        if (f->nlen == n && strncasecmp(c->hdr.data + f->name, name, n) == 0) {
            *len = f->vlen;
            return c->hdr.data + f->value;
        }
    }
    return NULL;
}

/* Compares with every token, each in time independent of where the first difference
 * is, so the time taken tells nothing about which token came close. The token comes
 * as "Authorization: Bearer TOKEN" or, as Anthropic's clients send it, "x-api-key:
 * TOKEN". */
static int authorized(conn *c) {
    server *s = c->s;
    size_t n;
    const char *v = find_header(c, "authorization", &n);
    if (v && n >= 7 && strncasecmp(v, "Bearer ", 7) == 0) {
        v += 7;
        n -= 7;
    } else if (!(v = find_header(c, "x-api-key", &n))) {
        return 0;
    }
    while (n && (*v == ' ' || *v == '\t')) v++, n--;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
    unsigned ok = 0;
    for (int t = 0; t < s->ntokens; t++) {
        const token *k = &s->tokens[t];
        unsigned diff = n != k->len;
        for (size_t i = 0; i < k->len; i++) diff |= (unsigned char)(k->data[i] ^ (i < n ? v[i] : 0));
        ok |= diff == 0;
    }
    return ok;
}

static int on_headers_complete(http_parser *p) {
    conn *c = (conn *)p->data;
    server *s = c->s;
    struct http_parser_url u;
    http_parser_url_init(&u);
    if (http_parser_parse_url(bytes(&c->url), c->url.len, p->method == HTTP_CONNECT, &u) != 0)
        return stop(c, 400, "the request target is not a valid URL");
    if (u.field_set & (1 << UF_PATH)) {
        c->path_off = u.field_data[UF_PATH].off;
        c->path_len = u.field_data[UF_PATH].len;
    } else {
        c->path_off = c->path_len = 0;
    }
    c->query_off = u.field_data[UF_QUERY].off;
    c->query_len = (u.field_set & (1 << UF_QUERY)) ? u.field_data[UF_QUERY].len : 0;
    if (s->ntokens && !authorized(c)) return stop(c, 401, "a valid bearer token is required");
    if (p->content_length != ULLONG_MAX && p->content_length > s->max_body)
        return stop(c, 413, "the request body is too large");
    size_t n;
    const char *expect = find_header(c, "expect", &n);
    if (expect && n == 12 && strncasecmp(expect, "100-continue", 12) == 0 && p->http_minor >= 1) {
        wreq *w = (wreq *)calloc(1, sizeof *w);
        if (!w || !buf_printf(&w->b, "HTTP/1.1 100 Continue\r\n\r\n")) {
            free(w);
            return stop(c, 500, "out of memory");
        }
        if (!conn_submit(c, w)) return stop(c, 500, "the connection failed");
    }
    timer_set(c, T_BODY, s->header_ms);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
    conn *c = (conn *)p->data;
    if (c->body.len + len > c->s->max_body) return stop(c, 413, "the request body is too large");
    if (!buf_append(&c->body, at, len)) return stop(c, 500, "out of memory");
    return 0;
}

/* Pauses the parser so that the connection's loop dispatches this request before
 * parsing any pipelined one. */
static int on_message_complete(http_parser *p) {
    conn *c = (conn *)p->data;
    c->ready = 1;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void parse_failed(conn *c) {
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (c->err_status) {
        send_error(c, c->err_status, c->err_msg);
    } else if (e == HPE_HEADER_OVERFLOW) {
        send_error(c, 431, "the request head is too large");
    } else {
        char msg[160];
        snprintf(msg, sizeof msg, "malformed request: %s", http_errno_description(e));
        send_error(c, 400, msg);
    }
}

/* ---- dispatch ---------------------------------------------------------------------- */

static void push_request(conn *c, lua_State *L) {
    lua_createtable(L, 0, 5);
    lua_pushstring(L, http_method_str((enum http_method)c->parser.method));
    lua_setfield(L, -2, "method");
    if (c->path_len) lua_pushlstring(L, c->url.data + c->path_off, c->path_len);
    else lua_pushliteral(L, "/");
    lua_setfield(L, -2, "path");
    lua_pushlstring(L, bytes(&c->url) + c->query_off, c->query_len);
    lua_setfield(L, -2, "query");
    lua_createtable(L, 0, (int)c->nfields);
    for (size_t i = 0; i < c->nfields; i++) {
        hfield *f = &c->fields[i];
        char *name = c->hdr.data + f->name;
        for (size_t k = 0; k < f->nlen; k++)
            if (name[k] >= 'A' && name[k] <= 'Z') name[k] = (char)(name[k] + 32);
        lua_pushlstring(L, name, f->nlen);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, bytes(&c->hdr) + f->value, f->vlen);
        } else {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, bytes(&c->hdr) + f->value, f->vlen);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, bytes(&c->body), c->body.len);
    lua_setfield(L, -2, "body");
}

/* Runs the handler of the request just parsed in a new fiber. L is the thread
 * calling in: the server's own from a libuv callback, else a fiber's. */
static void dispatch(conn *c, lua_State *L) {
    server *s = c->s;
    timer_set(c, T_NONE, 0);
    c->receiving = 0;
    c->keep_alive = http_should_keep_alive(&c->parser) && !c->parser.upgrade;
    c->head = c->parser.method == HTTP_HEAD;
    if (!lua_checkstack(L, 8)) {
        send_error(c, 500, "out of memory");
        return;
    }
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->dispatch_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_ref);
    push_request(c, L);
    response *r = (response *)lua_newuserdata(L, sizeof *r);
    memset(r, 0, sizeof *r);
    r->status = 200;
    luaL_getmetatable(L, RESPONSE_MT);
    lua_setmetatable(L, -2);
    r->c = c;
    c->res = r;
    c->busy = 1;
    s->busy++;
    buf_reset(&c->url);
    buf_reset(&c->hdr);
    buf_reset(&c->body);
    /* The handler may run to completion inside this call, ending the request. */
    if (lua_pcall(L, 3, 1, 0) != 0) {
        request_end(c);
        send_error(c, 503, "the server is shutting down");
    } else if (c->busy) {
        c->fiber_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_settop(L, top);
}

/* Parses what has been received, one request at a time. Re-entered (through a
 * handler that responds at once) it returns: the outer loop goes on. */
static void conn_process(conn *c, lua_State *L) {
    if (c->processing) return;
    c->processing = 1;
    while (!c->busy && !c->ending && !c->closing && c->in_pos < c->in.len) {
        size_t n = http_parser_execute(&c->parser, &parser_settings, c->in.data + c->in_pos,
                                       c->in.len - c->in_pos);
        c->in_pos += n;
        if (c->ready) {
            c->ready = 0;
            http_parser_pause(&c->parser, 0);
            dispatch(c, L);
        } else if (HTTP_PARSER_ERRNO(&c->parser) != HPE_OK) {
            parse_failed(c);
        }
    }
    c->processing = 0;
    if (c->in_pos == c->in.len) c->in_pos = c->in.len = 0;
    if (c->eof && !c->busy) conn_end(c);
}

/* The response on c is complete: go on with the next request, or close. */
static void response_done(conn *c, lua_State *L) {
    request_end(c);
    if (!c->keep_alive || c->s->closing) {
        conn_end(c);
        return;
    }
    timer_set(c, T_IDLE, c->s->idle_ms);
    read_resume(c);
    conn_process(c, L);
}

/* ---- responses --------------------------------------------------------------------- */

static response *check_response(lua_State *L) {
    return (response *)luaL_checkudata(L, 1, RESPONSE_MT);
}

static int push_reset(lua_State *L) {
    return fb_push_error(L, "ECONNRESET", "the client closed the connection");
}

static int append_head(response *r, buf *b, int mode, size_t len) {
    conn *c = r->c;
    const char *reason = http_status_str((enum http_status)r->status);
    int keep = c->keep_alive && !r->close && !c->s->closing;
    r->nobody = c->head || r->status == 204 || r->status == 304;
    if (reason[0] == '<') reason = "";     /* http_status_str's "<unknown>" */
    if (!buf_printf(b, "HTTP/1.1 %d %s\r\nDate: %s\r\n", r->status, reason, http_date()) ||
        !buf_append(b, bytes(&r->head), r->head.len))
        return 0;
    if (mode == OUT_SEND) {
        if (r->status != 204 && r->status != 304 && !buf_printf(b, "Content-Length: %zu\r\n", len)) return 0;
    } else if (!r->nobody) {
        r->chunked = c->parser.http_major == 1 && c->parser.http_minor >= 1;
        if (r->chunked && !buf_printf(b, "Transfer-Encoding: chunked\r\n")) return 0;
        if (!r->chunked) keep = 0;      /* the body ends where the connection does */
    }
    c->keep_alive = keep;
    if (!keep) return buf_printf(b, "Connection: close\r\n\r\n");
    if (c->parser.http_minor == 0) return buf_printf(b, "Connection: keep-alive\r\n\r\n");
    return buf_printf(b, "\r\n");
}

/* Sends the head (once) and data as mode says; when `wait`, then waits while the
 * socket's send buffer is full (use as `return response_emit(...)`). */
static int response_emit(lua_State *L, response *r, int mode, const char *data, size_t len, int wait) {
    conn *c = r->c;
    if (!c) {
        if (mode != OUT_CHUNK) r->state = R_DONE;
        return push_reset(L);
    }
    wreq *w = (wreq *)calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "http_server: out of memory");
    int ok = r->state != R_FRESH || append_head(r, &w->b, mode, len);
    if (ok && !r->nobody) {
        if (mode == OUT_SEND || !r->chunked) {
            ok = buf_append(&w->b, data, len);
        } else {
            if (len)
                ok = buf_printf(&w->b, "%zx\r\n", len) && buf_append(&w->b, data, len) &&
                     buf_append(&w->b, "\r\n", 2);
            if (ok && mode == OUT_FINISH) ok = buf_append(&w->b, "0\r\n\r\n", 5);
        }
    }
    if (!ok) {
        buf_free(&w->b);
        free(w);
        return luaL_error(L, "http_server: out of memory");
    }
    r->state = mode == OUT_CHUNK ? R_STREAMING : R_DONE;
    int sent = SUBMIT_WRITTEN;
    if (w->b.len > 0) sent = conn_submit(c, w);
    else free(w);
    if (sent == SUBMIT_FAILED) return push_reset(L);
    int pending = sent == SUBMIT_QUEUED && c->tcp.write_queue_size > 0;
    if (r->state == R_DONE) response_done(c, L);
    fb_fiber *f = fb_current(L);
    if (wait && pending && f) {
        w->fiber = f;
        return fb_await(L, f, wreq_abort, w, (double)c->s->idle_ms / 1000.0);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int res_status(lua_State *L) {
    response *r = check_response(L);
    int status = (int)luaL_checkinteger(L, 2);
    luaL_argcheck(L, status >= 200 && status <= 999, 2, "status must be 200..999");
    if (r->state != R_FRESH) return luaL_error(L, "res:status: the response head was already sent");
    r->status = status;
    lua_settop(L, 1);
    return 1;
}

static int res_cancel_on_disconnect(lua_State *L) {
    response *r = check_response(L);
    if (r->c) r->c->cancel_on_gone = 1;
    lua_settop(L, 1);
    return 1;
}

static int is_token_char(unsigned char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static int res_header(lua_State *L) {
    response *r = check_response(L);
    size_t nlen, vlen;
    const char *name = luaL_checklstring(L, 2, &nlen);
    const char *value = luaL_checklstring(L, 3, &vlen);
    if (r->state != R_FRESH) return luaL_error(L, "res:header: the response head was already sent");
    luaL_argcheck(L, nlen > 0, 2, "empty header name");
    for (size_t i = 0; i < nlen; i++)
        luaL_argcheck(L, is_token_char((unsigned char)name[i]), 2, "invalid character in header name");
    for (size_t i = 0; i < vlen; i++)
        luaL_argcheck(L, value[i] != '\r' && value[i] != '\n' && value[i] != '\0', 3,
                      "CR, LF or NUL in header value");
    if (strcasecmp(name, "content-length") == 0 || strcasecmp(name, "transfer-encoding") == 0)
        return luaL_argerror(L, 2, "set by the server");
    if (strcasecmp(name, "connection") == 0) {
        r->close = r->close || strcasestr(value, "close") != NULL;
    } else {
        r->has_ctype = r->has_ctype || strcasecmp(name, "content-type") == 0;
        if (!buf_append(&r->head, name, nlen) || !buf_append(&r->head, ": ", 2) ||
            !buf_append(&r->head, value, vlen) || !buf_append(&r->head, "\r\n", 2))
            return luaL_error(L, "http_server: out of memory");
    }
    lua_settop(L, 1);
    return 1;
}

static int res_send(lua_State *L) {
    response *r = check_response(L);
    size_t len;
    const char *body = luaL_optlstring(L, 2, "", &len);
    if (r->state != R_FRESH) return luaL_error(L, "res:send: the response was already started or sent");
    return response_emit(L, r, OUT_SEND, body, len, 1);
}

static int res_start(lua_State *L) {
    response *r = check_response(L);
    if (r->state == R_DONE) return luaL_error(L, "res:start: the response is finished");
    if (r->state == R_STREAMING) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return response_emit(L, r, OUT_CHUNK, "", 0, 1);
}

static int res_write(lua_State *L) {
    response *r = check_response(L);
    size_t len;
    const char *chunk = luaL_checklstring(L, 2, &len);
    if (r->state == R_DONE) return luaL_error(L, "res:write: the response is finished");
    return response_emit(L, r, OUT_CHUNK, chunk, len, 1);
}

static int res_finish(lua_State *L) {
    response *r = check_response(L);
    if (r->state == R_DONE) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return response_emit(L, r, OUT_FINISH, "", 0, 1);
}

/* Adds "name: value\n" per line of the field (SSE lines end at CR, LF or CRLF). */
static void sse_field(lua_State *L, luaL_Buffer *b, const char *name, int idx, int multiline) {
    size_t len;
    const char *v = lua_tolstring(L, idx, &len);
    if (!v) {
        luaL_argerror(L, 2, lua_pushfstring(L, "field %s must be a string or a number", name));
        return;
    }
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && v[i] != '\r' && v[i] != '\n') continue;
        if (i < len && !multiline) {
            luaL_argerror(L, 2, lua_pushfstring(L, "field %s must be a single line", name));
            return;
        }
        luaL_addstring(b, name);
        luaL_addstring(b, ": ");
        luaL_addlstring(b, v + start, i - start);
        luaL_addchar(b, '\n');
        if (i + 1 < len && v[i] == '\r' && v[i + 1] == '\n') i++;
        start = i + 1;
    }
}

static int res_sse(lua_State *L) {
    response *r = check_response(L);
    if (r->state == R_DONE) return luaL_error(L, "res:sse: the response is finished");
    if (lua_type(L, 2) != LUA_TTABLE) {
        luaL_checkstring(L, 2);
        lua_createtable(L, 0, 1);
        lua_pushvalue(L, 2);
        lua_setfield(L, -2, "data");
        lua_replace(L, 2);
    }
    lua_settop(L, 2);
    static const char *const fields[] = { "comment", "event", "id", "retry", "data" };
    for (int i = 0; i < 5; i++) lua_getfield(L, 2, fields[i]);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 0; i < 5; i++) {
        if (!lua_isnil(L, 3 + i)) sse_field(L, &b, i == 0 ? "" : fields[i], 3 + i, i == 0 || i == 4);
    }
    luaL_addchar(&b, '\n');
    luaL_pushresult(&b);
    if (r->state == R_FRESH && !r->has_ctype &&
        (!buf_printf(&r->head, "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n")))
        return luaL_error(L, "http_server: out of memory");
    r->has_ctype = 1;
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    return response_emit(L, r, OUT_CHUNK, text, len, 1);
}

/* Called by the fiber wrapper once the handler has returned or raised. Makes sure
 * the client gets an answer, and returns what went wrong, for the log, or nothing. */
static int res_settle(lua_State *L) {
    response *r = check_response(L);
    int ok = lua_toboolean(L, 2);
    conn *c = r->c;
    if (r->state == R_DONE || !c) {
        r->state = R_DONE;
        if (ok) return 0;
        lua_pushliteral(L, "http handler raised an error");
        return 1;
    }
    if (r->state == R_STREAMING) {
        /* The head is out: the only way left to tell the client is to cut the
         * stream short. */
        r->state = R_DONE;
        conn_close(c);
        lua_pushstring(L, ok ? "http handler returned without finishing its response"
                             : "http handler raised an error");
        return 1;
    }
    static const char body[] = "{\"error\":{\"message\":\"internal server error\",\"type\":\"server_error\"}}";
    r->status = 500;
    r->head.len = 0;
    buf_printf(&r->head, "Content-Type: application/json\r\n");
    lua_settop(L, 1);
    response_emit(L, r, OUT_SEND, body, sizeof body - 1, 0);
    lua_pushstring(L, ok ? "http handler returned without responding" : "http handler raised an error");
    return 1;
}

/* Runs only for a response its handler abandoned (its fiber was cancelled):
 * nothing will complete it, so the connection goes. */
static int res_gc(lua_State *L) {
    response *r = (response *)luaL_checkudata(L, 1, RESPONSE_MT);
    if (r->c) conn_close(r->c);
    buf_free(&r->head);
    return 0;
}

/* ---- servers ----------------------------------------------------------------------- */

static void on_connection(uv_stream_t *ls, int status) {
    server *s = (server *)ls->data;
    if (status < 0 || s->closing) return;
    conn *c = (conn *)calloc(1, sizeof *c);
    if (!c) return;
    uv_tcp_init(fb_loop(), &c->tcp);
    uv_timer_init(fb_loop(), &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    c->s = s;
    c->fiber_ref = LUA_NOREF;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    s->handles++;
    s->connections++;
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0 ||
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        conn_close(c);
        return;
    }
    c->reading = 1;
    uv_tcp_nodelay(&c->tcp, 1);
    timer_set(c, T_HEADERS, s->header_ms);
}

static void on_listener_closed(uv_handle_t *h) {
    server *s = (server *)h->data;
    s->handles--;
    server_maybe_free(s);
}

static void server_stop_accepting(server *s) {
    if (s->closing) return;
    s->closing = 1;
    uv_close((uv_handle_t *)&s->tcp, on_listener_closed);
}

/* Closes every connection, cancels the handler fibers still running and lets go
 * of Lua. Gracefully (from close()), connections already ending, their last
 * response being flushed, finish by themselves; from __gc everything goes at once
 * and no Lua code runs. The fibers are cancelled only once every connection is
 * closed: a collection during a cancel may run res_gc, which closes connections. */
static void server_kill(lua_State *L, server_ud *ud, int graceful) {
    server *s = ud->s;
    if (!s) return;
    ud->s = NULL;
    server_stop_accepting(s);
    int n = 0, *refs = graceful ? (int *)malloc(((size_t)s->connections + 1) * sizeof *refs) : NULL;
    for (conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (c->ending && graceful) continue;
        if (refs && c->fiber_ref != LUA_NOREF) {
            refs[n++] = c->fiber_ref;
            c->fiber_ref = LUA_NOREF;
        }
        conn_close(c);
    }
    fb_fiber *self = fb_running(L);
    for (int i = 0; i < n; i++) {
        int top = lua_gettop(L);
        lua_rawgeti(L, LUA_REGISTRYINDEX, refs[i]);
        luaL_unref(L, LUA_REGISTRYINDEX, refs[i]);
        if (lua_touserdata(L, -1) != (void *)self) {
            lua_getfield(L, -1, "cancel");
            lua_insert(L, -2);
            lua_pushliteral(L, "the http server was closed");
            lua_pcall(L, 2, 0, 0);
        }
        lua_settop(L, top);
    }
    free(refs);
    if (s->closer) {
        fb_fiber *f = s->closer;
        s->closer = NULL;
        lua_pushboolean(fb_co(f), 1);
        fb_wake(f, 1);
    }
    luaL_unref(L, LUA_REGISTRYINDEX, s->handler_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, s->dispatch_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, s->thread_ref);
    s->L = NULL;
    s->killed = 1;
    server_maybe_free(s);
}

static server_ud *check_server_ud(lua_State *L) {
    return (server_ud *)luaL_checkudata(L, 1, SERVER_MT);
}

static server *check_server(lua_State *L) {
    server_ud *ud = check_server_ud(L);
    if (!ud->s) luaL_error(L, "http server: the server is closed");
    return ud->s;
}

static int server_port(lua_State *L) {
    lua_pushinteger(L, check_server(L)->port);
    return 1;
}

static int server_host(lua_State *L) {
    lua_pushstring(L, check_server(L)->host);
    return 1;
}

static int server_stats(lua_State *L) {
    server *s = check_server(L);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, s->connections);
    lua_setfield(L, -2, "connections");
    lua_pushinteger(L, s->busy);
    lua_setfield(L, -2, "in_flight");
    return 1;
}

/* close(), first step: stop accepting and end the idle connections. Returns the
 * number of requests in flight. */
static int server_stop(lua_State *L) {
    server *s = check_server_ud(L)->s;
    if (!s) {
        lua_pushinteger(L, 0);
        return 1;
    }
    server_stop_accepting(s);
    for (conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (!c->busy) conn_end(c);
    }
    lua_pushinteger(L, s->busy);
    return 1;
}

static void closer_abort(void *op) { ((server *)op)->closer = NULL; }

/* close(), second step: waits up to grace seconds for the requests in flight. */
static int server_wait(lua_State *L) {
    server *s = check_server_ud(L)->s;
    double grace = luaL_checknumber(L, 2);
    fb_fiber *f = fb_current(L);
    if (!s || s->busy == 0 || s->closer || !f || !(grace > 0)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    s->closer = f;
    return fb_await(L, f, closer_abort, s, grace);
}

/* close(), last step. */
static int server_close_now(lua_State *L) {
    server_kill(L, check_server_ud(L), 1);
    return 0;
}

static int server_gc(lua_State *L) {
    server_kill(L, check_server_ud(L), 0);
    return 0;
}

static lua_Number opt_number(lua_State *L, const char *field, lua_Number def, lua_Number min, lua_Number max) {
    lua_getfield(L, 1, field);
    lua_Number v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "http_server.listen: %s must be a number", field);
        v = lua_tonumber(L, -1);
        if (!(v >= min && v <= max)) luaL_error(L, "http_server.listen: %s is out of range", field);
    }
    lua_pop(L, 1);
    return v;
}

static const char *opt_string(lua_State *L, const char *field, size_t *len) {
    lua_getfield(L, 1, field);
    const char *v = NULL;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "http_server.listen: %s must be a string", field);
        v = lua_tolstring(L, -1, len);
    }
    lua_pop(L, 1);      /* still referenced by the options table */
    return v;
}

/* Checks the options token and tokens (the table at index 1); returns how many
 * tokens they hold. */
static int check_tokens(lua_State *L) {
    size_t len = 0;
    int n = opt_string(L, "token", &len) != NULL;
    if (n && len == 0) luaL_error(L, "http_server.listen: token must not be empty");
    lua_getfield(L, 1, "tokens");
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "http_server.listen: tokens must be a list of strings");
        for (int i = 1;; i++, n++) {
            lua_rawgeti(L, -1, i);
            if (lua_isnil(L, -1)) break;
            if (lua_type(L, -1) != LUA_TSTRING || lua_objlen(L, -1) == 0)
                luaL_error(L, "http_server.listen: tokens must be non-empty strings");
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return n;
}

static int add_token(server *s, const char *p, size_t len) {
    char *d = (char *)malloc(len);
    if (!d) return 0;
    memcpy(d, p, len);
    s->tokens[s->ntokens++] = (token){ d, len };
    return 1;
}

/* Copies the n tokens that check_tokens counted into s (which holds none); 0 when
 * out of memory. */
static int copy_tokens(lua_State *L, server *s, int n) {
    if (n == 0) return 1;
    if (!(s->tokens = (token *)calloc((size_t)n, sizeof *s->tokens))) return 0;
    size_t len;
    const char *p = opt_string(L, "token", &len);
    if (p && !add_token(s, p, len)) return 0;
    lua_getfield(L, 1, "tokens");
    for (int i = 1; lua_istable(L, -1) && s->ntokens < n; i++) {
        lua_rawgeti(L, -1, i);
        p = lua_tolstring(L, -1, &len);
        int ok = add_token(s, p, len);
        lua_pop(L, 1);
        if (!ok) break;
    }
    lua_pop(L, 1);
    return s->ntokens == n;
}

/* server:set_tokens{ token =, tokens = } replaces the accepted tokens (the options
 * of listen); requests already received keep their verdict. Without any tokens a
 * server bound beyond loopback would be open to all: that is refused (EACCES) and
 * the old tokens stay. */
static int server_set_tokens(lua_State *L) {
    server *s = check_server(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_remove(L, 1);
    int n = check_tokens(L);
    if (!s->loopback && !n)
        return fb_push_error(L, "EACCES", "a server listening on %s needs a token", s->host);
    token *old = s->tokens;
    int nold = s->ntokens;
    s->tokens = NULL;
    s->ntokens = 0;
    if (!copy_tokens(L, s, n)) {
        free_tokens(s->tokens, s->ntokens);
        s->tokens = old;
        s->ntokens = nold;
        return luaL_error(L, "server:set_tokens: out of memory");
    }
    free_tokens(old, nold);
    lua_pushboolean(L, 1);
    return 1;
}

static uint64_t to_ms(double seconds) { return (uint64_t)(seconds * 1000.0 + 0.999); }

/* Upvalue 1: the Lua function that spawns a handler's fiber. */
static int server_listen(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "handler");
    if (lua_type(L, -1) != LUA_TFUNCTION) return luaL_error(L, "http_server.listen: handler must be a function");
    lua_pop(L, 1);
    const char *host = opt_string(L, "host", NULL);
    int ntokens = check_tokens(L);
    int port = (int)opt_number(L, "port", 0, 0, 65535);
    size_t max_header = (size_t)opt_number(L, "max_header_bytes", 16384, 256, 1 << 30);
    size_t max_body = (size_t)opt_number(L, "max_body_bytes", 8 << 20, 0, 9.0e15);
    double header_timeout = opt_number(L, "header_timeout", 10, 0, 1.0e6);
    double idle_timeout = opt_number(L, "idle_timeout", 60, 0, 1.0e6);

    if (!host || strcmp(host, "localhost") == 0) host = "127.0.0.1";
    struct sockaddr_storage addr;
    int loopback;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) == 0)
        loopback = (ntohl(((struct sockaddr_in *)&addr)->sin_addr.s_addr) >> 24) == 127;
    else if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) == 0)
        loopback = IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&addr)->sin6_addr);
    else
        return fb_push_error(L, "EINVAL", "host must be an IP address or localhost, got %s", host);
    if (!loopback && !ntokens)
        return fb_push_error(L, "EACCES", "refusing to listen on %s without a token: set token, "
                             "which clients then send as Authorization: Bearer TOKEN", host);

    /* http_parser's own cap on the head (80 KiB by default) must not undercut ours. */
    static size_t parser_max_header;
    if (max_header + 1024 > parser_max_header && max_header + 1024 > HTTP_MAX_HEADER_SIZE) {
        parser_max_header = max_header + 1024;
        http_parser_set_max_header_size((uint32_t)parser_max_header);    /* max_header <= 1 GiB */
    }

    server *s = (server *)calloc(1, sizeof *s);
    if (!s || !copy_tokens(L, s, ntokens)) {
        if (s) server_free(s);
        return luaL_error(L, "http_server.listen: out of memory");
    }
    uv_tcp_init(fb_loop(), &s->tcp);
    s->tcp.data = s;
    s->handles = 1;
    int err = uv_tcp_bind(&s->tcp, (struct sockaddr *)&addr, 0);
    if (!err) err = uv_listen((uv_stream_t *)&s->tcp, 1024, on_connection);
    struct sockaddr_storage bound;
    int blen = sizeof bound;
    if (!err) err = uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&bound, &blen);
    if (err) {
        s->killed = s->closing = 1;
        uv_close((uv_handle_t *)&s->tcp, on_listener_closed);
        char where[96];
        snprintf(where, sizeof where, "listening on %s port %d", host, port);
        return fb_push_uv_error(L, err, where);
    }
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    snprintf(s->host, sizeof s->host, "%s", host);
    s->loopback = loopback;
    s->max_header = max_header;
    s->max_body = max_body;
    s->header_ms = to_ms(header_timeout);
    s->idle_ms = to_ms(idle_timeout);

    server_ud *ud = (server_ud *)lua_newuserdata(L, sizeof *ud);
    ud->s = s;
    luaL_getmetatable(L, SERVER_MT);
    lua_setmetatable(L, -2);
    s->L = lua_newthread(L);
    s->thread_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, 1, "handler");
    s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, lua_upvalueindex(1));
    s->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

/* The Lua side of the module: the fiber each handler runs in (a C function could
 * not yield across its pcall) and close(), whose wait needs code after a yield. */
static const char lua_part[] =
    "local settle, stop, wait, close_now = ...\n"
    "local spawn = require('factory.core.fiber').spawn\n"
    "local xpcall, traceback = xpcall, debug.traceback\n"
    "local function run(handler, req, res)\n"
    "  local ok, err = xpcall(handler, traceback, req, res)\n"
    "  local problem = settle(res, ok)\n"
    "  if problem then\n"
    "    require('factory.log').error(problem, { method = req.method, path = req.path,\n"
    "                                           error = not ok and err or nil })\n"
    "  end\n"
    "end\n"
    "local function close(self, grace)\n"
    "  if stop(self) > 0 and grace then wait(self, grace) end\n"
    "  close_now(self)\n"
    "  return true\n"
    "end\n"
    "return function(handler, req, res) return spawn(run, handler, req, res) end, close\n";

static const luaL_Reg response_methods[] = {
    {"status", res_status},
    {"header", res_header},
    {"send", res_send},
    {"start", res_start},
    {"write", res_write},
    {"finish", res_finish},
    {"sse", res_sse},
    {"cancel_on_disconnect", res_cancel_on_disconnect},
    {NULL, NULL},
};

static const luaL_Reg server_methods[] = {
    {"port", server_port},
    {"host", server_host},
    {"stats", server_stats},
    {"set_tokens", server_set_tokens},
    {NULL, NULL},
};

int luaopen_factory_core_http_server(lua_State *L) {
    luaL_newmetatable(L, RESPONSE_MT);
    lua_newtable(L);
    luaL_register(L, NULL, response_methods);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "__index");
    lua_pushcfunction(L, res_gc);
    lua_setfield(L, -3, "__gc");
    int rmethods = lua_gettop(L);

    luaL_newmetatable(L, SERVER_MT);
    lua_newtable(L);
    luaL_register(L, NULL, server_methods);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "__index");
    lua_pushcfunction(L, server_gc);
    lua_setfield(L, -3, "__gc");
    int smethods = lua_gettop(L);

    if (luaL_loadbuffer(L, lua_part, sizeof lua_part - 1, "=[C] factory.core.http_server") != 0) lua_error(L);
    lua_pushcfunction(L, res_settle);
    lua_pushcfunction(L, server_stop);
    lua_pushcfunction(L, server_wait);
    lua_pushcfunction(L, server_close_now);
    lua_call(L, 4, 2);
    lua_setfield(L, smethods, "close");

    lua_createtable(L, 0, 2);
    lua_insert(L, -2);
    lua_pushcclosure(L, server_listen, 1);
    lua_setfield(L, -2, "listen");
    lua_pushvalue(L, rmethods);
    lua_setfield(L, -2, "response");
    return 1;
}
