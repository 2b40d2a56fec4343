/* core/http_client.h — the HTTP client's C API, for core modules (the router) that
 * issue requests on the process's one curl multi handle without a fiber per request.
 *
 * hc_start() begins a request; its callbacks then run from the loop, never inside
 * curl, in this order: on_head once (when the final response head has arrived),
 * on_data zero or more times (body bytes as they come), on_done exactly once
 * (code NULL on success, else an ECODE such as "ETIMEDOUT" or "ECONNRESET" with a
 * message). A callback may start other requests or cancel any request, this one
 * included. hc_cancel() stops a request: no callback runs for it afterwards.
 * A request is freed after on_done returns or when cancelled; the handle must not
 * be used after that. A request in flight keeps the loop alive.
 */
#ifndef FACTORY_HTTP_CLIENT_H
#define FACTORY_HTTP_CLIENT_H

#include <stddef.h>

typedef struct req hc_req;

typedef struct {
    /* head: "lowercase-name:value\n" lines, len bytes (not NUL-terminated). */
    void (*on_head)(void *ud, long status, const char *head, size_t len);
    void (*on_data)(void *ud, const char *data, size_t len);
    void (*on_done)(void *ud, const char *code, const char *message);
} hc_callbacks;

typedef struct {
    const char *method;         /* "GET", "POST" */
    const char *url;
    const char *const *headers; /* "Name: value" lines, NULL-terminated, or NULL */
    const char *body;           /* copied; NULL for none */
    size_t body_len;
    long timeout_ms;            /* whole transfer, 0 = none */
    long connect_timeout_ms;    /* 0 = curl's default */
} hc_options;

/* Returns the request, or NULL (out of memory, or the runtime is shutting down). */
hc_req *hc_start(const hc_options *rq, const hc_callbacks *cb, void *ud);

void hc_cancel(hc_req *r);

#endif
