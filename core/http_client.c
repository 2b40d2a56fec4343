/* core/http_client.c — factory.core.http_client: HTTP(S) requests for fibers, on
 * libcurl's multi_socket interface driven by the process's libuv loop.
 *
 * One CURLM per process (created on the first request): curl asks for socket
 * interest through socket_cb (a private epoll set, itself polled by the loop) and
 * for one timeout through timer_cb (a uv_timer_t); each event runs
 * curl_multi_socket_action, then process() collects finished transfers and wakes
 * the fibers waiting on them.
 * Connections, DNS and TLS sessions live in the multi handle, so they are reused
 * across requests; finished easy handles go back to small pools (see detach).
 *
 * Lua never runs inside a curl callback: callbacks only record what happened and
 * queue the request; process() delivers the queue after curl has returned, since
 * a woken fiber may call back into curl (new requests, unpausing a stream).
 *
 * Only a waiting fiber keeps the loop alive: the module's poll, timer and idle
 * handles are unref'd and the `keep` handle is ref'd while some fiber waits on a
 * request, so a transfer nobody waits for (an unread stream) does not hold the
 * process open.
 *
 * Lifetimes: a request (struct req, malloc'd) is owned by the fiber waiting on it
 * and, for a streamed response, by the Lua handle "factory.http_stream"; it is freed
 * when neither is left (release). The curl side (easy handle in the multi) is
 * detached as soon as the transfer ends or its owners are gone. The module's state
 * userdata is kept in the registry; its __gc (at lua_close) detaches every request
 * and frees curl and the uv handles, leaving the request structs to their owners'
 * __gc/abort, which lua_close runs in any order.
 */
#include "fiber.h"
#include "http_client.h"

#include <curl/curl.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef FACTORY_VERSION
#define FACTORY_VERSION "0.0.0-dev"
#endif

#define STREAM_MT "factory.http_stream"
#define STATE_MT "factory.http_client"
#define DEFAULT_MAX_BODY ((size_t)64 << 20)
/* Unread bytes of a streamed response at which the transfer pauses until read. */
#define STREAM_HIGH_WATER ((size_t)256 << 10)
#define POOL_MAX 64
#define MAX_REDIRECTS 10
/* Idle connections kept for reuse (all hosts together). */
#define MAX_CONNECTS 256L

typedef struct {
    char *data;
    size_t len, cap;
} buf;

enum { WAIT_NONE, WAIT_RESPONSE, WAIT_CHUNK };

typedef struct req req;
struct req {
    CURL *easy;                 /* NULL once detached from curl */
    struct curl_slist *headers; /* curl reads it until the transfer ends */
    fb_fiber *fiber;            /* the fiber waiting on this request, if any */
    int wait;                   /* what that fiber waits for */
    int stream, follow, has_handle;
    int headers_done, has_location, done, paused, too_big, queued;
    CURLcode result;
    long status;
    size_t max_body;
    buf body;                   /* the whole body, or the unread part of a stream */
    buf head;                   /* "lowercase-name:value\n" lines of the last response */
    char errbuf[CURL_ERROR_SIZE];
    const hc_callbacks *cb;     /* a request from C (http_client.h), else NULL */
    void *cb_ud;
    int head_sent, delivering, cancelled;
    req *prev, *next;           /* every live request, for teardown */
    req *qprev, *qnext;         /* queued for delivery */
};

typedef struct {
    uint32_t events;            /* registered in the epoll set (0: not registered) */
    int idle;                   /* curl said REMOVE; still registered (see socket_cb) */
    int owned;                  /* opened and (to come) closed through our callbacks */
} hc_fd;

typedef struct {
    req *r;                     /* NULL once closed */
} hc_stream;

static struct {
    CURLM *multi;
    uv_timer_t timer;
    uv_idle_t soon;             /* for curl's "time out now" (see timer_cb) */
    uv_async_t keep;            /* never sent: ref'd while some fiber waits */
    req *live;
    req *qhead, *qtail;
    CURL *pool[POOL_MAX];       /* reset, for requests from Lua */
    int npool;
    CURL *cpool[POOL_MAX];      /* set up for requests from C, which they only complete */
    int ncpool;
    int running;                /* easy handles in the multi */
    int waiting;                /* fibers waiting on a request */
    int epfd;                   /* the private epoll set of curl's sockets */
    uv_poll_t epoll;            /* polls epfd */
    hc_fd *fds;                 /* by socket number */
    int nfds;
    size_t buffered;            /* unread stream bytes, all requests */
    int closed;
} hc;

/* ---- buffers ------------------------------------------------------------------ */

static int buf_append(buf *b, const char *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n) cap *= 2;
        char *d = (char *)realloc(b->data, cap);
        if (!d) return 0;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 1;
}

/* ---- request lifetime ------------------------------------------------------------ */

static void enqueue(req *r) {
    if (r->queued || (!r->fiber && !r->cb)) return;
    r->queued = 1;
    r->qnext = NULL;
    r->qprev = hc.qtail;
    if (hc.qtail) hc.qtail->qnext = r; else hc.qhead = r;
    hc.qtail = r;
}

static void unqueue(req *r) {
    if (!r->queued) return;
    if (r->qprev) r->qprev->qnext = r->qnext; else hc.qhead = r->qnext;
    if (r->qnext) r->qnext->qprev = r->qprev; else hc.qtail = r->qprev;
    r->queued = 0;
}

static void wait_on(req *r, fb_fiber *f, int what) {
    r->fiber = f;
    r->wait = what;
    if (hc.waiting++ == 0 && !hc.closed) uv_ref((uv_handle_t *)&hc.keep);
}

/* Returns the fiber that was waiting on r, if any, and forgets it. */
static fb_fiber *unwait(req *r) {
    fb_fiber *f = r->fiber;
    if (!f) return NULL;
    r->fiber = NULL;
    r->wait = WAIT_NONE;
    if (--hc.waiting == 0 && !hc.closed) uv_unref((uv_handle_t *)&hc.keep);
    return f;
}

/* Takes r's transfer out of curl; its easy handle goes back to a pool. A request from
 * Lua may set any option, so its handle is reset; one from C sets the same options
 * each time, so its handle keeps them for the next (a reset and a new setup cost
 * about as much as the rest of curl's work for a request on a kept-alive
 * connection). */
static void detach(req *r) {
    if (!r->easy) return;
    curl_multi_remove_handle(hc.multi, r->easy);
    hc.running--;
    if (r->cb && hc.ncpool < POOL_MAX) {
        curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, NULL);    /* freed below */
        hc.cpool[hc.ncpool++] = r->easy;
    } else if (!r->cb && hc.npool < POOL_MAX) {
        curl_easy_reset(r->easy);
        hc.pool[hc.npool++] = r->easy;
    } else {
        curl_easy_cleanup(r->easy);
    }
    r->easy = NULL;
    curl_slist_free_all(r->headers);
    r->headers = NULL;
}

static void req_free(req *r) {
    detach(r);
    unqueue(r);
    if (r->prev) r->prev->next = r->next; else hc.live = r->next;
    if (r->next) r->next->prev = r->prev;
    if (r->stream) hc.buffered -= r->body.len;
    curl_slist_free_all(r->headers);
    free(r->body.data);
    free(r->head.data);
    free(r);
}

static void release(req *r) {
    if (!r->fiber && !r->has_handle) req_free(r);
}

/* fb_abort_fn: the waiting fiber is gone (cancelled, timed out or collected). */
static void req_abort(void *op) {
    req *r = (req *)op;
    unwait(r);
    unqueue(r);
    release(r);
}

/* ---- errors --------------------------------------------------------------------- */

static const char *error_code(CURLcode rc) {
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        return "ETIMEDOUT";
    case CURLE_COULDNT_CONNECT:
        return "ECONNREFUSED";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "EHOST";
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
        return "ECONNRESET";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CLIENTCERT:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_USE_SSL_FAILED:
        return "ETLS";
    default:
        return "EHTTP";
    }
}

static int push_transfer_error(lua_State *L, req *r) {
    if (r->too_big || r->result == CURLE_FILESIZE_EXCEEDED)
        return fb_push_error(L, "EHTTP", "response body larger than max_body (%zu bytes)", r->max_body);
    return fb_push_error(L, error_code(r->result), "%s",
                         r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->result));
}

/* ---- curl callbacks (no Lua here) ------------------------------------------------ */

static void headers_complete(req *r, long status) {
    r->headers_done = 1;
    r->status = status;
    if (r->stream) enqueue(r);
}

/* Collects the header lines of the latest response; a status line starts a new
 * response (1xx, a followed redirect), the blank line ends one. */
static size_t header_cb(char *p, size_t size, size_t n, void *ud) {
    req *r = (req *)ud;
    size_t len = size * n;
    if (r->headers_done) return len;    /* trailers */
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) {
        r->head.len = 0;
        r->has_location = 0;
        return len;
    }
    size_t end = len;
    while (end > 0 && (p[end - 1] == '\r' || p[end - 1] == '\n')) end--;
    if (end == 0) {
        long code = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &code);
        if (code >= 200 && !(r->follow && code / 100 == 3 && r->has_location)) headers_complete(r, code);
        return len;
    }
    const char *colon = memchr(p, ':', end);
    if (!colon || colon == p) return len;
    size_t nlen = (size_t)(colon - p);
    const char *v = colon + 1, *vend = p + end;
    while (v < vend && (*v == ' ' || *v == '\t')) v++;
    while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t')) vend--;
    size_t start = r->head.len;
    if (!buf_append(&r->head, p, nlen + 1) || !buf_append(&r->head, v, (size_t)(vend - v)) ||
        !buf_append(&r->head, "\n", 1))
        return 0;
    for (size_t i = start; i < start + nlen; i++)
        if (r->head.data[i] >= 'A' && r->head.data[i] <= 'Z') r->head.data[i] += 'a' - 'A';
    if (nlen == 8 && memcmp(r->head.data + start, "location", 8) == 0) r->has_location = 1;
    return len;
}

static size_t write_cb(char *p, size_t size, size_t n, void *ud) {
    req *r = (req *)ud;
    size_t len = size * n;
    if (!r->headers_done) {
        long code = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &code);
        headers_complete(r, code);
    }
    if (r->stream) {
        if (r->body.len >= STREAM_HIGH_WATER && !r->cb) {
            r->paused = 1;
            return CURL_WRITEFUNC_PAUSE;
        }
    } else if (len > r->max_body - r->body.len) {
        r->too_big = 1;
        return 0;
    }
    if (!buf_append(&r->body, p, len)) return 0;
    if (r->stream) {
        hc.buffered += len;
        enqueue(r);
    }
    return len;
}

static void process(void);

/* Curl's sockets live in a private epoll set, and the loop polls that set's fd with
 * one uv_poll_t. Curl drops its interest in a connection after every transfer
 * (REMOVE) and asks again for the next request on the same kept-alive connection;
 * with a uv_poll_t per socket that costs a handle, an ioctl and three epoll_ctl per
 * request. Here a REMOVEd socket simply stays registered (idle). A connection's
 * socket is opened and closed through opensocket_cb and closesocket_cb, which take it
 * out of the set before closing it, so asking again for the same events on it costs
 * no system call. Curl closes its other sockets (the resolver's) by itself, so for
 * them asking again is one EPOLL_CTL_MOD, which also tells whether the registration
 * still holds (the socket may have been closed, which removes it from the set, and
 * another opened with the same number). An idle socket that reports an event (the
 * peer closed it) is taken out of the set. A closed socket is never left in a set
 * that libuv or anyone else sees. */
static hc_fd *fd_state(curl_socket_t fd) {
    if (fd >= hc.nfds) {
        int n = hc.nfds ? hc.nfds : 64;
        while (n <= fd) n *= 2;
        hc_fd *m = (hc_fd *)realloc(hc.fds, (size_t)n * sizeof *m);
        if (!m) return NULL;
        memset(m + hc.nfds, 0, (size_t)(n - hc.nfds) * sizeof *m);
        hc.fds = m;
        hc.nfds = n;
    }
    return &hc.fds[fd];
}

static void fd_forget(curl_socket_t fd, hc_fd *st) {
    if (st->events) epoll_ctl(hc.epfd, EPOLL_CTL_DEL, fd, NULL);
    st->events = 0;
    st->idle = 0;
}

static int socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp) {
    hc_fd *st = fd_state(s);
    if (!st) return -1;
    uint32_t want = 0;
    if (what & CURL_POLL_IN) want |= EPOLLIN;
    if (what & CURL_POLL_OUT) want |= EPOLLOUT;
    if (what == CURL_POLL_REMOVE || want == 0) {
        st->idle = st->events != 0;
        return 0;
    }
    if (want == st->events && (st->owned || !st->idle)) {
        st->idle = 0;
        return 0;
    }
    struct epoll_event ev = {.events = want, .data.fd = s};
    if (!st->events || epoll_ctl(hc.epfd, EPOLL_CTL_MOD, s, &ev) != 0) {
        if (epoll_ctl(hc.epfd, EPOLL_CTL_ADD, s, &ev) != 0 &&
            (errno != EEXIST || epoll_ctl(hc.epfd, EPOLL_CTL_MOD, s, &ev) != 0))
            return -1;
    }
    st->events = want;
    st->idle = 0;
    return 0;
}

static int closesocket_cb(void *clientp, curl_socket_t fd) {
    if (fd < hc.nfds) {
        fd_forget(fd, &hc.fds[fd]);
        hc.fds[fd].owned = 0;
    }
    return close(fd);
}

static void poll_cb(uv_poll_t *p, int status, int events) {
    struct epoll_event evs[256];
    int n = epoll_wait(hc.epfd, evs, 256, 0), running;
    for (int i = 0; i < n; i++) {
        curl_socket_t fd = evs[i].data.fd;
        hc_fd *st = fd < hc.nfds ? &hc.fds[fd] : NULL;
        if (!st || st->idle || !st->events) {
            if (st) fd_forget(fd, st);
            continue;
        }
        int flags = 0;
        if (evs[i].events & (EPOLLIN | EPOLLHUP)) flags |= CURL_CSELECT_IN;
        if (evs[i].events & EPOLLOUT) flags |= CURL_CSELECT_OUT;
        if (evs[i].events & EPOLLERR) flags |= CURL_CSELECT_ERR;
        curl_multi_socket_action(hc.multi, fd, flags, &running);
    }
    process();
}

/* Connection sockets are close-on-exec, so child processes (agents, gates) do not
 * inherit them and keep connections open. */
static curl_socket_t opensocket_cb(void *clientp, curlsocktype purpose, struct curl_sockaddr *a) {
    curl_socket_t fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
    if (fd < 0) return CURL_SOCKET_BAD;
    hc_fd *st = fd_state(fd);
    if (!st) {
        close(fd);
        return CURL_SOCKET_BAD;
    }
    /* A new socket is in no set, whatever was known of an earlier one of this number. */
    *st = (hc_fd){.owned = 1};
    return fd;
}

static void run_timeouts(void) {
    int running;
    uv_idle_stop(&hc.soon);
    curl_multi_socket_action(hc.multi, CURL_SOCKET_TIMEOUT, 0, &running);
    process();
}

static void on_timer(uv_timer_t *t) { run_timeouts(); }
static void on_soon(uv_idle_t *h) { run_timeouts(); }

/* A zero timeout runs from an idle handle, not a 0 ms timer: libuv 1.44 runs a timer
 * re-armed from its own callback again in the same pass, so one transfer chaining
 * requests could starve every socket waiting for I/O. */
static int timer_cb(CURLM *m, long timeout_ms, void *userp) {
    uv_timer_stop(&hc.timer);
    uv_idle_stop(&hc.soon);
    if (timeout_ms == 0) uv_idle_start(&hc.soon, on_soon);
    else if (timeout_ms > 0) uv_timer_start(&hc.timer, on_timer, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ---- delivering results to fibers ----------------------------------------------- */

/* Pushes { status, headers = { name = value } [, body] } or, for a stream, the
 * handle whose environment holds status and headers. */
static void push_head(lua_State *L, req *r) {
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, r->status);
    lua_setfield(L, -2, "status");
    lua_newtable(L);
    const char *p = r->head.data, *end = p + r->head.len;
    while (p < end) {
        const char *colon = memchr(p, ':', (size_t)(end - p));
        const char *nl = memchr(colon, '\n', (size_t)(end - colon));
        lua_pushlstring(L, p, (size_t)(colon - p));
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {     /* repeated fields join with ", " (RFC 9110 5.3) */
            lua_pop(L, 1);
            lua_pushlstring(L, colon + 1, (size_t)(nl - colon - 1));
        } else {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, colon + 1, (size_t)(nl - colon - 1));
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
        p = nl + 1;
    }
    lua_setfield(L, -2, "headers");
}

static int push_response(lua_State *L, req *r) {
    if (!r->stream) {
        push_head(L, r);
        lua_pushlstring(L, r->body.data ? r->body.data : "", r->body.len);
        lua_setfield(L, -2, "body");
        return 1;
    }
    hc_stream *s = (hc_stream *)lua_newuserdata(L, sizeof *s);
    s->r = r;
    r->has_handle = 1;
    luaL_getmetatable(L, STREAM_MT);
    lua_setmetatable(L, -2);
    push_head(L, r);
    lua_setfenv(L, -2);
    return 1;
}

/* Ends r's transfer with rc (used when curl cannot resume it). */
static void fail(req *r, CURLcode rc) {
    detach(r);
    r->done = 1;
    r->result = rc;
}

/* The next chunk of a stream: the unread data, else nil at the end, else the error. */
static int take_chunk(lua_State *L, req *r) {
    if (r->body.len > 0) {
        lua_pushlstring(L, r->body.data, r->body.len);
        hc.buffered -= r->body.len;
        r->body.len = 0;
        if (r->paused && r->easy) {
            r->paused = 0;
            CURLcode rc = curl_easy_pause(r->easy, CURLPAUSE_CONT);
            if (rc != CURLE_OK) fail(r, rc);
        }
        return 1;
    }
    if (r->result == CURLE_OK) {
        lua_pushnil(L);
        return 1;
    }
    return push_transfer_error(L, r);
}

static void c_release(req *r);

/* Runs a C request's callbacks for what has happened since the last delivery; a
 * callback may cancel r, which then only takes effect (frees r) afterwards. */
static void deliver_c(req *r) {
    r->delivering = 1;
    if (r->headers_done && !r->head_sent) {
        r->head_sent = 1;
        r->cb->on_head(r->cb_ud, r->status, r->head.data, r->head.len);
    }
    if (r->body.len > 0 && !r->cancelled) {
        size_t n = r->body.len;
        hc.buffered -= n;
        r->body.len = 0;
        r->cb->on_data(r->cb_ud, r->body.data, n);
    }
    if (r->done && !r->cancelled) {
        r->cancelled = 1;
        if (r->result == CURLE_OK) r->cb->on_done(r->cb_ud, NULL, NULL);
        else if (r->result == CURLE_FILESIZE_EXCEEDED) r->cb->on_done(r->cb_ud, "EHTTP", "response too large");
        else r->cb->on_done(r->cb_ud, error_code(r->result), r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->result));
    }
    r->delivering = 0;
    if (r->cancelled) c_release(r);
}

/* Wakes r's fiber if what it waits for has happened. r may be freed here. */
static void deliver(req *r) {
    if (r->cb) {
        deliver_c(r);
        return;
    }
    fb_fiber *f = r->fiber;
    if (!f) return;
    lua_State *co = fb_co(f);
    int n;
    if (r->wait == WAIT_RESPONSE) {
        if (!r->done && !(r->stream && r->headers_done)) return;
        unwait(r);
        if (r->done && r->result != CURLE_OK && !(r->stream && r->headers_done))
            n = push_transfer_error(co, r);
        else
            n = push_response(co, r);
    } else {
        if (r->body.len == 0 && !r->done) return;
        unwait(r);
        n = take_chunk(co, r);
    }
    release(r);
    fb_wake(f, n);
}

static void process(void) {
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(hc.multi, &left))) {
        if (m->msg != CURLMSG_DONE) continue;
        char *priv = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &priv);
        req *r = (req *)priv;
        r->done = 1;
        r->result = m->data.result;
        if (!r->headers_done) curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
        detach(r);
        enqueue(r);
    }
    req *r;
    while ((r = hc.qhead)) {
        unqueue(r);
        deliver(r);
    }
}

/* ---- starting a request ------------------------------------------------------------ */

static int multi_init(void) {
    if (!(hc.multi = curl_multi_init())) return 0;
    hc.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (hc.epfd < 0 || uv_poll_init(fb_loop(), &hc.epoll, hc.epfd) != 0) {
        if (hc.epfd >= 0) close(hc.epfd);
        curl_multi_cleanup(hc.multi);
        hc.multi = NULL;
        return 0;
    }
    uv_poll_start(&hc.epoll, UV_READABLE, poll_cb);
    uv_unref((uv_handle_t *)&hc.epoll);
    uv_timer_init(fb_loop(), &hc.timer);
    uv_unref((uv_handle_t *)&hc.timer);
    uv_idle_init(fb_loop(), &hc.soon);
    uv_unref((uv_handle_t *)&hc.soon);
    uv_async_init(fb_loop(), &hc.keep, NULL);
    uv_unref((uv_handle_t *)&hc.keep);
    curl_multi_setopt(hc.multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(hc.multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    /* curl's default keeps 4 idle connections per transfer in the multi at the time
     * one ends; handles leave the multi as their transfers end, so under a varying
     * load that closes connections a moment later needed again. */
    curl_multi_setopt(hc.multi, CURLMOPT_MAXCONNECTS, MAX_CONNECTS);
    return 1;
}

static const char *opt_string(lua_State *L, const char *name, const char *def, size_t *len) {
    lua_getfield(L, 1, name);
    const char *s = def;
    if (len) *len = def ? strlen(def) : 0;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_argerror(L, 1, lua_pushfstring(L, "'%s' must be a string", name));
        s = lua_tolstring(L, -1, len);
    }
    return s;       /* left on the stack: it must outlive the request's setup */
}

/* Seconds -> milliseconds for curl, rounded up so a small timeout is not "none". */
static long opt_ms(lua_State *L, const char *name) {
    lua_getfield(L, 1, name);
    double s = 0;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0))
            luaL_argerror(L, 1, lua_pushfstring(L, "'%s' must be a number of seconds >= 0", name));
        s = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    double ms = s * 1000.0;
    if (ms > (double)LONG_MAX / 2) return LONG_MAX / 2;
    long ims = (long)ms;
    return (double)ims < ms ? ims + 1 : ims;
}

static int opt_bool(lua_State *L, const char *name) {
    lua_getfield(L, 1, name);
    int b = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return b;
}

static int is_token(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (*s <= ' ' || *s >= 127 || strchr("\"(),/:;<=>?@[\\]{}", *s)) return 0;
    return 1;
}

/* Raises unless every header is a token name with a string/number value free of CR/LF,
 * so that building the list afterwards cannot fail half-way. */
static void check_headers(lua_State *L, int idx) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t vlen;
        int vt = lua_type(L, -1);
        if (lua_type(L, -2) != LUA_TSTRING || !is_token(lua_tostring(L, -2)))
            luaL_argerror(L, 1, "header names must be strings of token characters");
        if (vt != LUA_TSTRING && vt != LUA_TNUMBER)
            luaL_argerror(L, 1, lua_pushfstring(L, "header '%s' must be a string", lua_tostring(L, -2)));
        const char *v = lua_tolstring(L, -1, &vlen);
        if (strlen(v) != vlen || strpbrk(v, "\r\n"))
            luaL_argerror(L, 1,
                          lua_pushfstring(L, "header '%s' contains CR, LF or NUL", lua_tostring(L, -2)));
        lua_pop(L, 1);
    }
}

/* The request header list: the caller's headers, plus for a body empty "Expect:" (no
 * 100-continue round trip) and empty "Content-Type:" (curl would claim a form) unless
 * given. */
static struct curl_slist *build_headers(lua_State *L, int idx, int has_body, int *ok) {
    struct curl_slist *list = NULL, *next;
    int expect = 0, ctype = 0;
    *ok = 1;
    if (idx) {
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            const char *name = lua_tostring(L, -2), *v = lua_tostring(L, -1);
            expect |= strcasecmp(name, "expect") == 0;
            ctype |= strcasecmp(name, "content-type") == 0;
            /* "Name;" is curl's way to send a header with an empty value. */
            const char *line = *v ? lua_pushfstring(L, "%s: %s", name, v) : lua_pushfstring(L, "%s;", name);
            next = curl_slist_append(list, line);
            lua_pop(L, 2);
            if (!next) goto oom;
            list = next;
        }
    }
    if (has_body && !expect) {
        if (!(next = curl_slist_append(list, "Expect:"))) goto oom;
        list = next;
    }
    if (has_body && !ctype) {
        if (!(next = curl_slist_append(list, "Content-Type:"))) goto oom;
        list = next;
    }
    return list;
oom:
    *ok = 0;
    curl_slist_free_all(list);
    return NULL;
}

/* The options every request has. */
static void easy_setup_handle(CURL *e) {
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "factory/" FACTORY_VERSION);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, opensocket_cb);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, closesocket_cb);
    /* Proxy CONNECT responses would look like the final response headers. */
    curl_easy_setopt(e, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
}

/* The options of request r that every request sets. */
static void easy_setup(CURL *e, req *r, const char *url, long timeout, long connect_timeout) {
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, connect_timeout);
}

/* request{ method, url, headers, body, timeout, connect_timeout, stream, max_body,
 * ca_file, follow } -> response | nil, "ECODE: message", "ECODE" */
static int hc_request(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    fb_fiber *f = fb_check_current(L, "http_client.request");
    if (hc.closed || fb_closing()) return luaL_error(L, "http_client.request: the runtime is shutting down");
    const char *url = opt_string(L, "url", NULL, NULL);
    if (!url) return luaL_argerror(L, 1, "'url' is required");
    const char *method = opt_string(L, "method", "GET", NULL);
    if (!is_token(method)) return luaL_argerror(L, 1, "'method' must be a token such as \"GET\"");
    size_t body_len;
    const char *body = opt_string(L, "body", NULL, &body_len);
    const char *ca_file = opt_string(L, "ca_file", NULL, NULL);
    long timeout = opt_ms(L, "timeout"), connect_timeout = opt_ms(L, "connect_timeout");
    int stream = opt_bool(L, "stream"), follow = opt_bool(L, "follow");
    lua_getfield(L, 1, "max_body");
    size_t max_body = DEFAULT_MAX_BODY;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0))
            return luaL_argerror(L, 1, "'max_body' must be a number of bytes >= 0");
        max_body = lua_tonumber(L, -1) >= (double)SIZE_MAX ? SIZE_MAX : (size_t)lua_tonumber(L, -1);
    }
    lua_getfield(L, 1, "headers");
    int hidx = 0;
    if (!lua_isnil(L, -1)) {
        luaL_argcheck(L, lua_istable(L, -1), 1, "'headers' must be a table");
        hidx = lua_gettop(L);
        check_headers(L, hidx);
    }
    int is_post = strcmp(method, "POST") == 0;
    int send_body = body || is_post || strcmp(method, "PUT") == 0 || strcmp(method, "PATCH") == 0;

    if (!hc.multi && !multi_init()) return fb_push_error(L, "EHTTP", "cannot create the curl multi handle");
    req *r = (req *)calloc(1, sizeof *r);
    CURL *e = hc.npool > 0 ? hc.pool[--hc.npool] : curl_easy_init();
    int ok = 0;
    if (r && e) r->headers = build_headers(L, hidx, send_body, &ok);
    if (!ok) {
        free(r);
        if (e) curl_easy_cleanup(e);
        return fb_push_error(L, "ENOMEM", "out of memory starting a request");
    }
    r->stream = stream;
    r->follow = follow;
    r->max_body = max_body;
    r->next = hc.live;
    if (hc.live) hc.live->prev = r;
    hc.live = r;

    easy_setup_handle(e);
    easy_setup(e, r, url, timeout, connect_timeout);
    if (!stream && max_body < (size_t)INT64_MAX)
        curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)max_body);
    if (ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, ca_file);
    if (follow) {
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(e, CURLOPT_MAXREDIRS, (long)MAX_REDIRECTS);
        curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    }
    if (send_body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(body ? body_len : 0));
        curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body ? body : "");
        if (!is_post) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (strcmp(method, "GET") != 0) {
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }
    CURLMcode mc = curl_multi_add_handle(hc.multi, e);
    if (mc != CURLM_OK) {
        curl_easy_cleanup(e);
        req_free(r);
        return fb_push_error(L, "EHTTP", "%s", curl_multi_strerror(mc));
    }
    r->easy = e;
    hc.running++;
    wait_on(r, f, WAIT_RESPONSE);
    return fb_await(L, f, req_abort, r, 0);
}

/* ---- the C API (http_client.h) --------------------------------------------------------- */

/* A C request in flight keeps the loop alive, like a waiting fiber. */
static void c_release(req *r) {
    if (--hc.waiting == 0 && !hc.closed) uv_unref((uv_handle_t *)&hc.keep);
    req_free(r);
}

hc_req *hc_start(const hc_options *rq, const hc_callbacks *cb, void *ud) {
    if (hc.closed || fb_closing()) return NULL;
    if (!hc.multi && !multi_init()) return NULL;
    req *r = (req *)calloc(1, sizeof *r);
    CURL *e = NULL;
    if (hc.ncpool > 0) e = hc.cpool[--hc.ncpool];
    else if ((e = curl_easy_init())) easy_setup_handle(e);
    struct curl_slist *list = NULL;
    int ok = r && e;
    for (const char *const *h = rq->headers; ok && h && *h; h++) {
        struct curl_slist *next = curl_slist_append(list, *h);
        if (next) list = next; else ok = 0;
    }
    if (ok && rq->body) {
        struct curl_slist *next = curl_slist_append(list, "Expect:");
        if (next) list = next; else ok = 0;
    }
    if (!ok) {
        curl_slist_free_all(list);
        free(r);
        if (e) curl_easy_cleanup(e);
        return NULL;
    }
    r->headers = list;
    r->stream = 1;
    r->cb = cb;
    r->cb_ud = ud;
    r->next = hc.live;
    if (hc.live) hc.live->prev = r;
    hc.live = r;
    easy_setup(e, r, rq->url, rq->timeout_ms, rq->connect_timeout_ms);
    if (rq->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
        curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, rq->body);
    } else {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    }
    /* A pooled handle keeps the method of its last request: set or clear it. */
    int plain = strcmp(rq->method, rq->body ? "POST" : "GET") == 0;
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, plain ? NULL : rq->method);
    if (curl_multi_add_handle(hc.multi, e) != CURLM_OK) {
        curl_easy_cleanup(e);
        req_free(r);
        return NULL;
    }
    r->easy = e;
    hc.running++;
    if (hc.waiting++ == 0) uv_ref((uv_handle_t *)&hc.keep);
    return r;
}

void hc_cancel(hc_req *r) {
    if (r->delivering) r->cancelled = 1;
    else c_release(r);
}

/* ---- streamed responses -------------------------------------------------------------- */

static req *check_stream(lua_State *L) {
    hc_stream *s = (hc_stream *)luaL_checkudata(L, 1, STREAM_MT);
    if (!s->r) luaL_argerror(L, 1, "the response is closed");
    return s->r;
}

/* res:read([timeout]) -> chunk | nil (end of body) | nil, err */
static int stream_read(lua_State *L) {
    req *r = check_stream(L);
    double timeout = luaL_optnumber(L, 2, 0);
    if (r->fiber) return luaL_error(L, "response:read: another fiber is already reading");
    if (r->body.len > 0 || r->done) return take_chunk(L, r);
    fb_fiber *f = fb_check_current(L, "response:read");
    wait_on(r, f, WAIT_CHUNK);
    return fb_await(L, f, req_abort, r, timeout);
}

/* res:close(): aborts the transfer; a fiber blocked in read gets ECANCELED. */
static int stream_close(lua_State *L) {
    hc_stream *s = (hc_stream *)luaL_checkudata(L, 1, STREAM_MT);
    req *r = s->r;
    if (!r) return 0;
    s->r = NULL;
    r->has_handle = 0;
    fb_fiber *f = unwait(r);
    if (f) fb_push_error(fb_co(f), "ECANCELED", "the response was closed");
    req_free(r);
    if (f) fb_wake(f, 3);
    return 0;
}

/* At lua_close a fiber may still wait in read: leave the request to its abort. */
static int stream_gc(lua_State *L) {
    hc_stream *s = (hc_stream *)luaL_checkudata(L, 1, STREAM_MT);
    req *r = s->r;
    if (!r) return 0;
    s->r = NULL;
    r->has_handle = 0;
    detach(r);
    release(r);
    return 0;
}

/* Methods first, then the fields of the response (status, headers). */
static int stream_index(lua_State *L) {
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    if (!lua_isnil(L, -1)) return 1;
    lua_getfenv(L, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

/* ---- module -------------------------------------------------------------------------- */

/* versions() -> { "libcurl/7.88.1", "OpenSSL/3.0.11", "zlib/1.2.13", ... } */
static int hc_versions(lua_State *L) {
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    int n = 0;
    lua_newtable(L);
    lua_pushfstring(L, "libcurl/%s", v->version);
    lua_rawseti(L, -2, ++n);
    if (v->ssl_version) {
        lua_pushstring(L, v->ssl_version);
        lua_rawseti(L, -2, ++n);
    }
    if (v->libz_version) {
        lua_pushfstring(L, "zlib/%s", v->libz_version);
        lua_rawseti(L, -2, ++n);
    }
    if (v->age >= CURLVERSION_FOURTH && v->features & CURL_VERSION_HTTP2 && v->nghttp2_version) {
        lua_pushfstring(L, "nghttp2/%s", v->nghttp2_version);
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

/* stats() -> { active = transfers in curl, requests = live requests, sockets,
 * pooled = idle easy handles, buffered = unread stream bytes } */
static int hc_stats(lua_State *L) {
    int live = 0, sockets = 0;
    for (req *r = hc.live; r; r = r->next) live++;
    for (int fd = 0; fd < hc.nfds; fd++) sockets += hc.fds[fd].events && !hc.fds[fd].idle;
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, hc.running);
    lua_setfield(L, -2, "active");
    lua_pushinteger(L, live);
    lua_setfield(L, -2, "requests");
    lua_pushinteger(L, sockets);
    lua_setfield(L, -2, "sockets");
    lua_pushinteger(L, hc.npool + hc.ncpool);
    lua_setfield(L, -2, "pooled");
    lua_pushnumber(L, (lua_Number)hc.buffered);
    lua_setfield(L, -2, "buffered");
    return 1;
}

/* lua_close: curl and libuv resources go now; request structs go with their owners. */
static int hc_gc(lua_State *L) {
    for (req *r = hc.live; r; r = r->next) detach(r);
    while (hc.npool > 0) curl_easy_cleanup(hc.pool[--hc.npool]);
    while (hc.ncpool > 0) curl_easy_cleanup(hc.cpool[--hc.ncpool]);
    if (hc.multi) {
        curl_multi_cleanup(hc.multi);
        hc.multi = NULL;
        uv_close((uv_handle_t *)&hc.epoll, NULL);
        close(hc.epfd);
        free(hc.fds);
        hc.fds = NULL;
        hc.nfds = 0;
        uv_close((uv_handle_t *)&hc.timer, NULL);
        uv_close((uv_handle_t *)&hc.soon, NULL);
        uv_close((uv_handle_t *)&hc.keep, NULL);
    }
    hc.closed = 1;
    curl_global_cleanup();
    return 0;
}

static const luaL_Reg stream_methods[] = {
    {"read", stream_read},
    {"close", stream_close},
    {NULL, NULL},
};

static const luaL_Reg hc_functions[] = {
    {"request", hc_request},
    {"versions", hc_versions},
    {"stats", hc_stats},
    {NULL, NULL},
};

int luaopen_factory_core_http_client(lua_State *L) {
    if (luaL_newmetatable(L, STATE_MT)) {      /* a new Lua state: a fresh start */
        hc.closed = 0;
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
            return luaL_error(L, "curl_global_init failed");
        lua_pushcfunction(L, hc_gc);
        lua_setfield(L, -2, "__gc");
        lua_newuserdata(L, 1);
        lua_pushvalue(L, -2);
        lua_setmetatable(L, -2);
        luaL_ref(L, LUA_REGISTRYINDEX);     /* lives until lua_close */
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, STREAM_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, stream_methods);
        lua_pushcclosure(L, stream_index, 1);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, stream_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, hc_functions);
    return 1;
}
