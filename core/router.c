/* core/router.c — factory.core.router: model routing for fibers. The documented Lua
 * API is lua/factory/router.lua; this is its mechanism.
 *
 *   configure(config_json) -> true | nil, "EINVAL: ...", "EINVAL"
 *       { providers = { NAME = { kind = "openai"|"anthropic", base_url, api_key,
 *                                rpm, tpm, max_concurrency } },
 *         models = { ALIAS = { "provider/model", ... } },
 *         prices = { ["provider/model" or "model"] = { input =, output = } } (USD per 1M tokens),
 *         budgets = { teams = { NAME = { usd_per_day =, tokens_per_day = } },
 *                     run = { usd =, tokens = }, utc_offset = hours (where days start) },
 *         limits = { retries, backoff, backoff_max, retry_after_max, breaker_failures,
 *                    breaker_cooldown, connect_timeout, timeout, first_token_timeout,
 *                    idle_timeout, default_max_tokens } }
 *   chat(request_json, team, run, stream) -> body_json | stream | nil, err, code
 *       stream nil: as the request's "stream" says
 *   embeddings(request_json, team, run)   -> body_json | nil, err, code
 *   stream:read([timeout]) -> chunk_json | nil (end) | nil, err, code;  stream:close()
 *   stream:usage() -> prompt_tokens, completion_tokens, reported (see stream_usage)
 *   set_budget("team"|"run", name, usd, tokens)   overrides the configured limits
 *   count_spent("team"|"run", name, usd, tokens)   the account has spent at least this
 *       (today, for a team): what the store records, when a process starts
 *   day_start() -> when (Unix time) the budget day began
 *   prompt_tokens(text) -> the prompt tokens a request's text is estimated at
 *   clear_budget("team"|"run", name)   forgets the account: its spending and override
 *   models(), stats() -> JSON text;  record(on);  records() -> { record, ... } | nil
 *   stop(reason) -> number of calls stopped: the process is ending (see r_stop)
 *   ledger(on): with it on, a chat or embeddings call whose team has a budget,
 *       once reserved here, returns pending, est_usd, est_tokens, limit_usd,
 *       limit_tokens instead of starting: pending:send(hold) starts it (as chat()
 *       would, hold going into its record), pending:refuse(code, message) ends it
 *       unsent. factory.budgets confirms the budget across processes in between.
 *       live_holds() -> { hold, ... } of the calls in flight.
 *
 * A call reserves its estimated cost against every budget that applies (team per
 * day, run) before anything is sent and settles with the real usage when it ends:
 * concurrent calls can only overspend by what an estimate undercounts. The estimate
 * is body bytes / 4 prompt tokens (an inline image: IMAGE_TOKENS) plus max_tokens (or
 * default_max_tokens) times n,
 * priced at the dearest entry of the chain. A model named directly ("provider/model")
 * with no entry in prices is refused to an account limited in USD.
 *
 * Each chain entry is tried up to 1 + retries times: 429, 5xx, connection errors,
 * timeouts and unusable responses (malformed JSON, wrong content type, a stream cut
 * before its first token) are retried after exponential backoff with jitter, or
 * after Retry-After when the provider says so (longer than retry_after_max: fall
 * back at once); other 4xx are not retried. Then the next entry is tried. A provider
 * whose breaker is open (breaker_failures failures in a row) is skipped until
 * breaker_cooldown has passed; then one trial call decides.
 * Rate limits (rpm, tpm, max_concurrency) queue callers in order, never fail them.
 * A stream commits at its first chunk: before, failures retry and fall back; after,
 * they reach the reader. first_token_timeout bounds the wait for the first chunk,
 * idle_timeout each gap after it, timeout (curl) the whole transfer.
 *
 * API keys live only in the provider structs and the request headers; every error
 * text is scrubbed of them.
 *
 * Lifetimes: a configuration is refcounted, and each call holds the one it started
 * with, so a reload never pulls providers from under a call. A call is owned by the
 * fiber waiting on it and, for a stream, by the "factory.router_stream" userdata;
 * it is freed (through its timer's close callback) when it has finished and neither
 * is left. Budget accounts outlive configurations: a reload keeps what was spent.
 * They are created on first use, so whoever starts runs clears each one's account
 * when the run ends (clear_budget), or a long-lived process would keep them all.
 */
#include "fiber.h"
#include "http_client.h"

#include <curl/curl.h>
#include <jansson.h>
#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <yajl/yajl_parse.h>

#define STREAM_MT "factory.router_stream"
#define PENDING_MT "factory.router_pending"
#define STATE_MT "factory.router"
#define MAX_ERR 480

typedef struct {
    char *data;
    size_t len, cap;
} buf;

enum { K_OPENAI, K_ANTHROPIC };
enum { OP_CHAT, OP_EMBED };
enum { T_NONE, T_BACKOFF, T_FIRST, T_IDLE };

typedef struct call call;
typedef struct config config;

/* The top-level members of a request (offsets of a member's key and its value's
 * end), read once when the call starts and copied into every attempt's body. */
#define MAX_MEMBERS 16
enum { M_MODEL = 1, M_STREAM = 2 };    /* stream and stream_options */

typedef struct {
    size_t at[MAX_MEMBERS][2];
    unsigned char what[MAX_MEMBERS];    /* M_*, or 0 */
    int n;                              /* -1: more than MAX_MEMBERS (read them again) */
} members;

typedef struct {
    char *name, *chat_url, *embed_url, *auth, *api_key;
    int kind;
    double rpm, tpm;            /* 0: no limit */
    int max_conc;
    double req_bucket, tok_bucket, refilled_at;
    int inflight;
    call *qhead, *qtail;        /* callers waiting for the rate limits */
    uv_timer_t *timer;          /* wakes the queue once the buckets have refilled */
    int failures, trial;        /* breaker: failures in a row; a half-open trial is out */
    int no_stream_options;      /* it refused stream_options: its streams go without */
    double open_until;
    long requests, errors;
    config *cfg;
} provider;

typedef struct {
    provider *p;
    char *model;
    double price_in, price_out; /* USD per token */
    int priced;                 /* listed in prices (else both are 0) */
} target;

typedef struct {
    char *name;
    target *t;
    int n;
} alias;

struct config {
    int refs;
    provider *providers;
    int nproviders;
    alias *aliases;
    int naliases;
    json_t *budgets, *prices;
    double utc_offset;          /* hours: a team's day starts at midnight there */
    int retries, breaker_failures, default_max_tokens;
    double backoff, backoff_max, retry_after_max, breaker_cooldown;
    double connect_timeout, timeout, first_token_timeout, idle_timeout;
};

typedef struct account {
    char *key;                  /* "team:NAME" or "run:ID" */
    double usd, tokens;         /* spent (today, for a team) */
    double r_usd, r_tokens;     /* reserved by calls in flight */
    double lim_usd, lim_tokens; /* set_budget overrides; < 0: from the configuration */
    long day;                   /* of the spending, for a team */
    int calls;                  /* in flight, holding a reservation here */
    struct account *next;
} account;

typedef struct chunk {
    struct chunk *next;
    size_t len;
    char data[];
} chunk;

/* One attempt of a call's chain, kept for its record. */
typedef struct {
    char *provider, *model, *outcome;
    char code[16];
    int has_code;               /* it failed with code */
    long status;                /* HTTP status; 0: none */
    double latency_ms;          /* < 0: not sent (skipped) */
    double retry_after_s;       /* < 0: none */
} attempt_rec;

/* A finished call's record until records() hands it to Lua: plain C, since building
 * it as JSON objects first cost more than the rest of its way to the hooks. */
typedef struct record {
    struct record *next;
    int op, stream;
    char *alias, *provider, *model;
    char *team, *run, *error;   /* NULL: none */
    const char *status;
    char code[16];
    long prompt_tokens, completion_tokens;
    double cost_usd, latency_ms;
    double first_token_ms;      /* < 0: none */
    attempt_rec *attempts;
    int nattempts;
    double hold;                /* the store's budget hold, 0: none */
} record;

struct call {
    uv_timer_t timer;           /* first: the call is freed in its close callback */
    config *cfg;
    int op, stream, include_usage;
    char *text;                 /* the caller's request */
    size_t text_len;
    members mem;                /* of text */
    json_t *req;                /* the same as a tree, when a translation needs it */
    char *alias_name, *team, *run;
    alias direct;               /* a "provider/model" model names its own chain */
    target direct_t;
    alias *al;
    int entry, tries, timer_kind;
    account *acc[2];
    int nacc;
    double est_tokens, est_usd, est_prompt;
    int gated;                  /* its team has a limit that a ledger confirms across processes */
    double gate_usd, gate_tokens; /* that limit (< 0: none) */
    double hold;                /* the ledger's hold for it, 0: none */
    double started, attempt_started, first_at;
    /* the attempt in flight */
    target *tgt;
    hc_req *http;
    int slot, queued;
    call *qprev, *qnext;
    long status;
    int is_sse, is_json, ended_ok;
    int choices, finished;      /* n asked for; choices an OpenAI stream has finished */
    double retry_after;         /* seconds, -1: none */
    buf body, line, data;       /* response body; SSE: the partial line, event data */
    /* the result */
    int committed, done, cancelled, has_handle, released;
    long prompt_tokens, completion_tokens;
    int have_usage;
    size_t content_chars;
    char *out_id, *out_model;
    int ntools, cur_tool;
    char *finish_reason;
    chunk *head, *tail;
    char *result;               /* non-stream body */
    size_t result_len;
    char err_code[16];
    char err[MAX_ERR];
    attempt_rec *attempts;      /* the chain so far, while recording is on */
    int nattempts, cattempts;
    fb_fiber *fiber;            /* waiting in chat() or stream:read() */
    call *prev, *next;          /* live calls */
};

typedef struct {
    call *c;
} stream_ud;

/* A call reserved in this process, waiting for the ledger's word before it is sent. */
typedef struct {
    call *c;
} pending_ud;

static struct {
    config *cfg;
    account *accounts;
    account *cleared;           /* cleared while calls held them: freed as the last settles */
    call *live;
    record *rhead, *rtail;      /* finished calls, while recording is on */
    int recording, closed;
    int stopping;               /* stop() was called: no fiber is woken any more */
    int ledger;                 /* team budgets are also confirmed by the store's ledger */
} R;

/* ---- small helpers ----------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int buf_add(buf *b, const char *p, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *d = (char *)realloc(b->data, cap);
        if (!d) return 0;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 1;
}

static char *dup_str(const char *s) { return s ? strdup(s) : NULL; }

static const char *jstr(json_t *o, const char *k) { return json_string_value(json_object_get(o, k)); }

static double jnum(json_t *o, const char *k, double def) {
    json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : def;
}

/* ---- reading JSON in place ---------------------------------------------------------------
 * An OpenAI-compatible upstream takes the caller's request with a few members changed
 * and answers in the caller's format, so on that path the router only checks the JSON
 * and reads a handful of members. A jansson tree for that costs more than the rest of
 * the proxy's work for a call (about 65,000 instructions and 120 mallocs to load a
 * 330-byte completion), so yajl checks the text (strings are not checked for UTF-8:
 * the bytes go on as they came) and reports its tokens, and the router notes where the
 * values it reads lie, from yajl's count of the bytes it has consumed. Keys are
 * compared as written: an escaped key matches nothing. */

#define JS_MAX_DEPTH 256    /* containers inside the top one */
#define JS_LEVELS 8         /* levels a walk can report: the deepest read is 7 below the top */

typedef struct js_walk js_walk;

/* What a walk reports of each value down to its levels (the top object is level 0): a
 * container when it opens (ve NULL) and when it closes, any other value once. The
 * value's key is w->k[level] (inside the quotes; NULL in an array). 0 stops the walk. */
typedef int (*js_visit)(js_walk *w, int level, const char *v, const char *ve);

struct js_walk {
    yajl_handle h;
    const char *text;
    size_t last;                    /* where the last token yajl reported ends */
    int level, levels, closed;      /* containers open; deepest level reported; top object closed */
    const char *open[JS_LEVELS];    /* where each open container starts */
    const char *k[JS_LEVELS + 1];   /* one more level: a container opening clears its members' key */
    size_t kl[JS_LEVELS + 1];
    js_visit visit;
    void *site;
};

/* yajl reports where a token ends; it starts past the whitespace and the ':' or ','
 * since the last one (yajl's whitespace: \v and \f too). */
static const char *js_skip(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t' || *p == ':' || *p == ',' || *p == '\v' || *p == '\f')
        p++;
    return p;
}

static int js_scalar(void *ctx) {
    js_walk *w = (js_walk *)ctx;
    size_t end = yajl_get_bytes_consumed(w->h);
    const char *v = js_skip(w->text + w->last);
    w->last = end;
    if (w->level == 0) return 0;    /* the top value must be an object */
    return w->level > w->levels || w->visit(w, w->level, v, w->text + end);
}

static int js_null(void *ctx) { return js_scalar(ctx); }
static int js_boolean(void *ctx, int b) { return js_scalar(ctx); }
static int js_number(void *ctx, const char *s, size_t n) { return js_scalar(ctx); }
static int js_string(void *ctx, const unsigned char *s, size_t n) { return js_scalar(ctx); }

static int js_open(js_walk *w, int object) {
    int l = w->level++;
    w->last = yajl_get_bytes_consumed(w->h);
    if (l > JS_MAX_DEPTH || (l == 0 && !object)) return 0;
    if (l > w->levels) return 1;
    w->open[l] = w->text + w->last - 1;
    w->k[l + 1] = NULL;
    return w->visit(w, l, w->open[l], NULL);
}

static int js_start_map(void *ctx) { return js_open((js_walk *)ctx, 1); }
static int js_start_array(void *ctx) { return js_open((js_walk *)ctx, 0); }

static int js_close(void *ctx) {
    js_walk *w = (js_walk *)ctx;
    int l = --w->level;
    w->last = yajl_get_bytes_consumed(w->h);
    w->closed = l == 0;
    return l > w->levels || w->visit(w, l, w->open[l], w->text + w->last);
}

static int js_key(void *ctx, const unsigned char *s, size_t n) {
    js_walk *w = (js_walk *)ctx;
    size_t end = yajl_get_bytes_consumed(w->h);
    const char *k = js_skip(w->text + w->last);
    w->last = end;
    if (w->level <= w->levels) {
        w->k[w->level] = k + 1;
        w->kl[w->level] = (size_t)(w->text + end - k - 2);
    }
    return 1;
}

static const yajl_callbacks js_callbacks = {
    .yajl_null = js_null,
    .yajl_boolean = js_boolean,
    .yajl_number = js_number,
    .yajl_string = js_string,
    .yajl_start_map = js_start_map,
    .yajl_map_key = js_key,
    .yajl_end_map = js_close,
    .yajl_start_array = js_start_array,
    .yajl_end_array = js_close,
};

/* Walks [text, text + len), reporting values down to levels (< JS_LEVELS) to visit:
 * whether the text is one JSON object, nested at most JS_MAX_DEPTH deep, and no visit
 * stopped the walk. One yajl handle a walk: its allocations (five small blocks) cost
 * about 50 ns, against 250 ns to parse a short request. */
static int js_walk_text(js_visit visit, void *site, int levels, const char *text, size_t len) {
    js_walk w = {.text = text, .levels = levels, .visit = visit, .site = site};
    w.h = yajl_alloc(&js_callbacks, NULL, &w);
    if (!w.h) return 0;
    yajl_config(w.h, yajl_dont_validate_strings, 1);
    /* Once the top object has closed only whitespace may follow, which yajl checks to the
     * end; a text that ends before then is cut short, whatever yajl would make of it. */
    int ok = yajl_parse(w.h, (const unsigned char *)text, len) == yajl_status_ok && w.closed &&
             yajl_complete_parse(w.h) == yajl_status_ok;
    yajl_free(w.h);
    return ok;
}

static int js_key_is(const js_walk *w, int level, const char *key) {
    size_t n = strlen(key);
    return w->k[level] && w->kl[level] == n && memcmp(w->k[level], key, n) == 0;
}

/* Whether the visit is a value's first: a container's opening or any other value. */
static int js_starts(const char *v, const char *ve) { return !ve || (*v != '{' && *v != '['); }

/* A (checked) number as a long: its integer part; anything else is 0. A member's
 * value is always followed by its object's closing brace, so strtol stops in time. */
static long js_long(const char *v) { return *v == '-' || (*v >= '0' && *v <= '9') ? strtol(v, NULL, 10) : 0; }

static int js_is_integer(const char *v, const char *ve) {
    if (v < ve && *v == '-') v++;
    if (v == ve) return 0;
    while (v < ve && *v >= '0' && *v <= '9') v++;
    return v == ve;
}

/* Appends s as a JSON string. */
static int buf_add_jstr(buf *b, const char *s) {
    int ok = buf_add(b, "\"", 1);
    for (; *s && ok; s++) {
        unsigned char ch = (unsigned char)*s;
        char esc[8];
        if (ch == '"' || ch == '\\') ok = buf_add(b, "\\", 1) && buf_add(b, s, 1);
        else if (ch < 0x20) ok = buf_add(b, esc, (size_t)snprintf(esc, sizeof esc, "\\u%04x", ch));
        else ok = buf_add(b, s, 1);
    }
    return ok && buf_add(b, "\"", 1);
}

/* Every API key of cfg in s becomes [REDACTED], in place (s is NUL-terminated). */
static void scrub(config *cfg, char *s) {
    for (int i = 0; cfg && i < cfg->nproviders; i++) {
        const char *key = cfg->providers[i].api_key;
        size_t kl = key ? strlen(key) : 0;
        if (kl < 4) continue;
        char *hit;
        while ((hit = strstr(s, key))) {
            const char *red = "[REDACTED]";
            size_t rl = strlen(red), tail = strlen(hit + kl);
            if (rl <= kl) {
                memcpy(hit, red, rl);
                memmove(hit + rl, hit + kl, tail + 1);
            } else {
                memcpy(hit, red, kl);   /* a short key: as many bytes of the marker */
            }
        }
    }
}

/* ---- configuration ------------------------------------------------------------------- */

static void cfg_timer_closed(uv_handle_t *h) { free(h); }

static void cfg_unref(config *cfg) {
    if (!cfg || --cfg->refs > 0) return;
    for (int i = 0; i < cfg->nproviders; i++) {
        provider *p = &cfg->providers[i];
        free(p->name);
        free(p->chat_url);
        free(p->embed_url);
        free(p->auth);
        free(p->api_key);
        if (p->timer) uv_close((uv_handle_t *)p->timer, cfg_timer_closed);
    }
    for (int i = 0; i < cfg->naliases; i++) {
        for (int k = 0; k < cfg->aliases[i].n; k++) free(cfg->aliases[i].t[k].model);
        free(cfg->aliases[i].t);
        free(cfg->aliases[i].name);
    }
    free(cfg->providers);
    free(cfg->aliases);
    json_decref(cfg->budgets);
    json_decref(cfg->prices);
    free(cfg);
}

static provider *find_provider(config *cfg, const char *name, size_t len) {
    for (int i = 0; i < cfg->nproviders; i++)
        if (strlen(cfg->providers[i].name) == len && memcmp(cfg->providers[i].name, name, len) == 0)
            return &cfg->providers[i];
    return NULL;
}

/* Fills t from "provider/model"; 0 if the provider is unknown. */
static int set_target(config *cfg, target *t, const char *spec) {
    const char *slash = strchr(spec, '/');
    if (!slash || !slash[1]) return 0;
    provider *p = find_provider(cfg, spec, (size_t)(slash - spec));
    if (!p) return 0;
    t->p = p;
    t->model = strdup(slash + 1);
    json_t *price = json_object_get(cfg->prices, spec);
    if (!price) price = json_object_get(cfg->prices, slash + 1);
    t->priced = price != NULL;
    t->price_in = jnum(price, "input", 0) / 1e6;
    t->price_out = jnum(price, "output", 0) / 1e6;
    return t->model != NULL;
}

static char *join_url(const char *base, const char *path) {
    size_t bl = strlen(base);
    while (bl > 0 && base[bl - 1] == '/') bl--;
    char *s = (char *)malloc(bl + strlen(path) + 1);
    if (s) {
        memcpy(s, base, bl);
        strcpy(s + bl, path);
    }
    return s;
}

static int cfg_error(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, MAX_ERR, fmt, ap);
    va_end(ap);
    return 0;
}

static int ends_with_v1(const char *url) {
    size_t n = strlen(url);
    while (n > 0 && url[n - 1] == '/') n--;
    return n >= 3 && memcmp(url + n - 3, "/v1", 3) == 0;
}

static int load_provider(config *cfg, provider *p, const char *name, json_t *o, char *err) {
    p->cfg = cfg;
    p->name = strdup(name);
    const char *kind = jstr(o, "kind");
    if (!kind || strcmp(kind, "openai") == 0) p->kind = K_OPENAI;
    else if (strcmp(kind, "anthropic") == 0) p->kind = K_ANTHROPIC;
    else return cfg_error(err, "provider '%s': kind must be \"openai\" or \"anthropic\"", name);
    const char *base = jstr(o, "base_url");
    if (!base) return cfg_error(err, "provider '%s': base_url is required", name);
    const char *key = jstr(o, "api_key");
    p->api_key = dup_str(key);
    if (p->kind == K_ANTHROPIC) {
        /* Anthropic's base URL has no /v1 (its SDKs add it); one written with it, as
         * OpenAI-style URLs are, must not become /v1/v1/messages. */
        p->chat_url = join_url(base, ends_with_v1(base) ? "/messages" : "/v1/messages");
        if (key && asprintf(&p->auth, "x-api-key: %s", key) < 0) p->auth = NULL;
    } else {
        p->chat_url = join_url(base, "/chat/completions");
        p->embed_url = join_url(base, "/embeddings");
        if (key && asprintf(&p->auth, "Authorization: Bearer %s", key) < 0) p->auth = NULL;
    }
    p->rpm = jnum(o, "rpm", 0);
    p->tpm = jnum(o, "tpm", 0);
    p->max_conc = (int)jnum(o, "max_concurrency", 0);
    p->req_bucket = p->rpm;
    p->tok_bucket = p->tpm;
    p->refilled_at = now_s();
    if (p->rpm > 0 || p->tpm > 0) {
        p->timer = (uv_timer_t *)malloc(sizeof *p->timer);
        if (!p->timer) return cfg_error(err, "out of memory");
        uv_timer_init(fb_loop(), p->timer);
        p->timer->data = p;
    }
    return 1;
}

static config *cfg_load(const char *text, size_t len, char *err) {
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    if (!json_is_object(root)) {
        json_decref(root);
        cfg_error(err, "configuration is not a JSON object");
        return NULL;
    }
    config *cfg = (config *)calloc(1, sizeof *cfg);
    json_t *provs = json_object_get(root, "providers"), *models = json_object_get(root, "models");
    json_t *limits = json_object_get(root, "limits");
    cfg->refs = 1;
    cfg->budgets = json_incref(json_object_get(root, "budgets"));
    cfg->utc_offset = jnum(cfg->budgets, "utc_offset", 0);
    cfg->prices = json_incref(json_object_get(root, "prices"));
    cfg->retries = (int)jnum(limits, "retries", 2);
    cfg->backoff = jnum(limits, "backoff", 0.5);
    cfg->backoff_max = jnum(limits, "backoff_max", 8);
    cfg->retry_after_max = jnum(limits, "retry_after_max", 60);
    cfg->breaker_failures = (int)jnum(limits, "breaker_failures", 5);
    cfg->breaker_cooldown = jnum(limits, "breaker_cooldown", 30);
    cfg->connect_timeout = jnum(limits, "connect_timeout", 10);
    cfg->timeout = jnum(limits, "timeout", 600);
    cfg->first_token_timeout = jnum(limits, "first_token_timeout", 60);
    cfg->idle_timeout = jnum(limits, "idle_timeout", 60);
    cfg->default_max_tokens = (int)jnum(limits, "default_max_tokens", 4096);
    size_t np = json_object_size(provs), na = json_object_size(models);
    int ok = fabs(cfg->utc_offset) <= 14 || cfg_error(err, "budgets.utc_offset must be hours from -14 to 14");
    cfg->providers = (provider *)calloc(np ? np : 1, sizeof *cfg->providers);
    cfg->aliases = (alias *)calloc(na ? na : 1, sizeof *cfg->aliases);
    const char *name;
    json_t *v;
    json_object_foreach(provs, name, v) {
        if (!ok) break;
        ok = load_provider(cfg, &cfg->providers[cfg->nproviders++], name, v, err);
    }
    json_object_foreach(models, name, v) {
        if (!ok) break;
        alias *a = &cfg->aliases[cfg->naliases++];
        a->name = strdup(name);
        size_t n = json_array_size(v);
        if (n == 0) {
            ok = cfg_error(err, "model '%s': expected a list of \"provider/model\"", name);
            break;
        }
        a->t = (target *)calloc(n, sizeof *a->t);
        for (size_t i = 0; ok && i < n; i++) {
            const char *spec = json_string_value(json_array_get(v, i));
            if (!spec || !set_target(cfg, &a->t[a->n++], spec))
                ok = cfg_error(err, "model '%s': '%s' does not name a configured provider", name,
                               spec ? spec : "?");
        }
    }
    json_decref(root);
    if (!ok) {
        cfg_unref(cfg);
        return NULL;
    }
    return cfg;
}

static alias *find_alias(config *cfg, const char *name) {
    for (int i = 0; i < cfg->naliases; i++)
        if (strcmp(cfg->aliases[i].name, name) == 0) return &cfg->aliases[i];
    return NULL;
}

/* ---- budgets ------------------------------------------------------------------------- */

/* The day number of now in the configured zone. */
static long today(config *cfg) { return (long)floor((time(NULL) + cfg->utc_offset * 3600) / 86400); }

static double day_start(config *cfg) { return (double)today(cfg) * 86400 - cfg->utc_offset * 3600; }

/* Where days start for the current configuration (UTC before there is one). */
static config *zone(void) {
    static config utc;
    return R.cfg ? R.cfg : &utc;
}

static account *get_account(const char *kind, const char *name) {
    char key[256];
    snprintf(key, sizeof key, "%s:%s", kind, name);
    for (account *a = R.accounts; a; a = a->next)
        if (strcmp(a->key, key) == 0) return a;
    account *a = (account *)calloc(1, sizeof *a);
    if (!a || !(a->key = strdup(key))) {
        free(a);
        return NULL;
    }
    a->lim_usd = a->lim_tokens = -1;
    a->next = R.accounts;
    R.accounts = a;
    return a;
}

/* A team's spending starts afresh each day (at midnight of budgets.utc_offset);
 * reservations carry over. */
static void roll_day(config *cfg, account *a) {
    long d = today(cfg);
    if (a->key[0] == 't' && a->day != d) {
        a->usd = a->tokens = 0;
        a->day = d;
    }
}

static void limits_of(config *cfg, account *a, double *usd, double *tokens) {
    json_t *b;
    if (a->key[0] == 't') {
        b = json_object_get(json_object_get(cfg->budgets, "teams"), a->key + 5);
        *usd = jnum(b, "usd_per_day", -1);
        *tokens = jnum(b, "tokens_per_day", -1);
    } else {
        b = json_object_get(cfg->budgets, "run");
        *usd = jnum(b, "usd", -1);
        *tokens = jnum(b, "tokens", -1);
    }
    if (a->lim_usd >= 0) *usd = a->lim_usd;
    if (a->lim_tokens >= 0) *tokens = a->lim_tokens;
}

/* Whether a budget applies to run id. A run without one gets no account: a proxy
 * serving external agents hears of runs but never of their end, so it must not keep
 * an account for each. */
static int run_limited(config *cfg, const char *id) {
    json_t *b = json_object_get(cfg->budgets, "run");
    if (jnum(b, "usd", -1) >= 0 || jnum(b, "tokens", -1) >= 0) return 1;
    char key[256];
    snprintf(key, sizeof key, "run:%s", id);
    for (account *a = R.accounts; a; a = a->next)
        if (strcmp(a->key, key) == 0) return 1;
    return 0;
}

/* Reserves the call's estimate on every account that applies, or none of them. */
static int reserve(call *c) {
    const char *kinds[2] = {"team", "run"}, *names[2] = {c->team, c->run};
    for (int i = 0; i < 2; i++) {
        if (!names[i] || (i == 1 && !run_limited(c->cfg, names[i]))) continue;
        account *a = get_account(kinds[i], names[i]);
        if (!a) return cfg_error(c->err, "out of memory");
        roll_day(c->cfg, a);
        double lu, lt;
        limits_of(c->cfg, a, &lu, &lt);
        /* An alias's chain is the operator's choice; a model named directly, with no
         * price, would cost nothing against a USD budget however much it spent. */
        if (lu >= 0 && c->al == &c->direct && !c->direct_t.priced)
            return cfg_error(c->err, "budget: %s %s is limited in USD and %s/%s has no price (add it to prices {},"
                             " or call an alias)", kinds[i], names[i], c->direct_t.p->name, c->direct_t.model);
        if (lu >= 0 && a->usd + a->r_usd + c->est_usd > lu + 1e-12)
            return cfg_error(c->err, "budget exhausted: %s %s has %.4f of %.4f USD left, this call may cost %.4f",
                             kinds[i], names[i], fmax(0, lu - a->usd - a->r_usd), lu, c->est_usd);
        if (lt >= 0 && a->tokens + a->r_tokens + c->est_tokens > lt)
            return cfg_error(c->err, "budget exhausted: %s %s has %.0f of %.0f tokens left, this call may use %.0f",
                             kinds[i], names[i], fmax(0, lt - a->tokens - a->r_tokens), lt, c->est_tokens);
        /* A call that costs nothing has nothing to hold against a USD limit. */
        if (i == 0 && ((lu >= 0 && c->est_usd > 0) || lt >= 0)) {
            c->gated = 1;
            c->gate_usd = lu;
            c->gate_tokens = lt;
        }
        c->acc[c->nacc++] = a;
    }
    for (int i = 0; i < c->nacc; i++) {
        c->acc[i]->r_usd += c->est_usd;
        c->acc[i]->r_tokens += c->est_tokens;
        c->acc[i]->calls++;
    }
    return 1;
}

static void free_accounts(account *a) {
    for (account *n; a; a = n) {
        n = a->next;
        free(a->key);
        free(a);
    }
}

/* Frees a once nothing holds it, if it was cleared. */
static void forget_cleared(account *a) {
    for (account **pp = &R.cleared; *pp; pp = &(*pp)->next) {
        if (*pp == a) {
            *pp = a->next;
            a->next = NULL;
            free_accounts(a);
            return;
        }
    }
}

/* Drops an account: what it spent and its override. A call in flight keeps it until
 * it settles; a later call starts a new one. */
static void clear_account(const char *kind, const char *name) {
    char key[256];
    snprintf(key, sizeof key, "%s:%s", kind, name);
    for (account **pp = &R.accounts; *pp; pp = &(*pp)->next) {
        account *a = *pp;
        if (strcmp(a->key, key) != 0) continue;
        *pp = a->next;
        a->next = NULL;
        if (a->calls == 0) {
            free_accounts(a);
        } else {
            a->next = R.cleared;
            R.cleared = a;
        }
        return;
    }
}

static double call_cost(call *c) {
    if (!c->tgt) return 0;
    return c->prompt_tokens * c->tgt->price_in + c->completion_tokens * c->tgt->price_out;
}

static void settle(call *c) {
    double usd = call_cost(c), tokens = (double)(c->prompt_tokens + c->completion_tokens);
    for (int i = 0; i < c->nacc; i++) {
        account *a = c->acc[i];
        a->r_usd -= c->est_usd;
        a->r_tokens -= c->est_tokens;
        roll_day(c->cfg, a);
        a->usd += usd;
        a->tokens += tokens;
        if (--a->calls == 0) forget_cleared(a);
    }
    c->nacc = 0;
}

/* ---- calls: lifetime ------------------------------------------------------------------- */

static void free_attempts(attempt_rec *a, int n) {
    for (int i = 0; i < n; i++) {
        free(a[i].provider);
        free(a[i].model);
        free(a[i].outcome);
    }
    free(a);
}

static void free_record(record *r) {
    free(r->alias);
    free(r->provider);
    free(r->model);
    free(r->team);
    free(r->run);
    free(r->error);
    free_attempts(r->attempts, r->nattempts);
    free(r);
}

static void call_closed(uv_handle_t *h) {
    call *c = (call *)h;
    free(c->text);
    json_decref(c->req);
    free_attempts(c->attempts, c->nattempts);
    free(c->alias_name);
    free(c->team);
    free(c->run);
    free(c->direct_t.model);
    free(c->body.data);
    free(c->line.data);
    free(c->data.data);
    free(c->out_id);
    free(c->out_model);
    free(c->finish_reason);
    free(c->result);
    for (chunk *k = c->head, *n; k; k = n) {
        n = k->next;
        free(k);
    }
    cfg_unref(c->cfg);
    free(c);
}

static void release(call *c) {
    if (!c->done || c->fiber || c->has_handle || c->released) return;
    c->released = 1;
    if (c->prev) c->prev->next = c->next; else R.live = c->next;
    if (c->next) c->next->prev = c->prev;
    uv_close((uv_handle_t *)&c->timer, call_closed);
}

/* ---- provider queues and limits -------------------------------------------------------- */

static void send_attempt(call *c);

static void refill(provider *p) {
    double t = now_s(), dt = t - p->refilled_at;
    p->refilled_at = t;
    if (p->rpm > 0) p->req_bucket = fmin(p->rpm, p->req_bucket + dt * p->rpm / 60);
    if (p->tpm > 0) p->tok_bucket = fmin(p->tpm, p->tok_bucket + dt * p->tpm / 60);
}

/* Seconds until c may be sent to p: 0 now, < 0 when waiting for a slot (not time). */
static double wait_for(provider *p, call *c) {
    if (p->max_conc > 0 && p->inflight >= p->max_conc) return -1;
    refill(p);
    double w = 0;
    if (p->rpm > 0 && p->req_bucket < 1) w = (1 - p->req_bucket) * 60 / p->rpm;
    /* A call bigger than the whole bucket goes once the bucket is full. */
    double need = fmin(c->est_tokens, p->tpm);
    if (p->tpm > 0 && p->tok_bucket < need) w = fmax(w, (need - p->tok_bucket) * 60 / p->tpm);
    return w;
}

static void unqueue(call *c) {
    if (!c->queued) return;
    provider *p = c->tgt->p;
    if (c->qprev) c->qprev->qnext = c->qnext; else p->qhead = c->qnext;
    if (c->qnext) c->qnext->qprev = c->qprev; else p->qtail = c->qprev;
    c->queued = 0;
    c->qprev = c->qnext = NULL;
}

static void pump(provider *p);

static void on_provider_timer(uv_timer_t *t) { pump((provider *)t->data); }

/* Sends the queued calls of p that the limits allow now, in order. */
static void pump(provider *p) {
    while (p->qhead && !R.closed && !R.stopping) {
        call *c = p->qhead;
        double w = wait_for(p, c);
        if (w != 0) {
            if (w > 0 && p->timer) uv_timer_start(p->timer, on_provider_timer, (uint64_t)(w * 1000) + 1, 0);
            return;
        }
        unqueue(c);
        send_attempt(c);
    }
}

static void take_slot(call *c) {
    provider *p = c->tgt->p;
    if (p->rpm > 0) p->req_bucket -= 1;
    if (p->tpm > 0) p->tok_bucket -= c->est_tokens;
    p->inflight++;
    p->requests++;
    c->slot = 1;
}

/* Ends the attempt in flight: the request, the timer, the queue place, the slot. */
static void end_attempt(call *c) {
    if (c->http) {
        hc_cancel(c->http);
        c->http = NULL;
    }
    uv_timer_stop(&c->timer);
    c->timer_kind = T_NONE;
    unqueue(c);
    if (c->slot) {
        provider *p = c->tgt->p;
        c->slot = 0;
        p->inflight--;
        /* What the estimate took from the token bucket beyond the real use comes back. */
        if (p->tpm > 0 && c->have_usage)
            p->tok_bucket = fmin(p->tpm, p->tok_bucket + c->est_tokens - (double)(c->prompt_tokens + c->completion_tokens));
        pump(p);
    }
}

/* ---- finishing ------------------------------------------------------------------------- */

static void push_record(call *c, const char *status) {
    if (!R.recording || R.closed) return;
    record *r = (record *)calloc(1, sizeof *r);
    if (!r) return;
    r->op = c->op;
    r->stream = c->stream;
    r->status = status;
    r->alias = strdup(c->alias_name ? c->alias_name : "");
    r->provider = strdup(c->tgt ? c->tgt->p->name : "");
    r->model = strdup(c->tgt ? c->tgt->model : "");
    r->team = dup_str(c->team);
    r->run = dup_str(c->run);
    r->prompt_tokens = c->prompt_tokens;
    r->completion_tokens = c->completion_tokens;
    r->cost_usd = call_cost(c);
    r->latency_ms = (now_s() - c->started) * 1000;
    r->first_token_ms = c->first_at > 0 ? (c->first_at - c->started) * 1000 : -1;
    if (c->err_code[0]) {
        memcpy(r->code, c->err_code, sizeof r->code);
        r->error = strdup(c->err);
    }
    /* The chain goes to the record: the call is over. */
    r->attempts = c->attempts;
    r->nattempts = c->nattempts;
    r->hold = c->hold;
    c->attempts = NULL;
    c->nattempts = c->cattempts = 0;
    if (!r->alias || !r->provider || !r->model || (c->team && !r->team) || (c->run && !r->run) ||
        (c->err_code[0] && !r->error)) {
        free_record(r);
        return;
    }
    if (R.rtail) R.rtail->next = r; else R.rhead = r;
    R.rtail = r;
}

static void set_error(call *c, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    snprintf(c->err_code, sizeof c->err_code, "%s", code);
    scrub(c->cfg, c->err);
}

static int push_err(lua_State *L, call *c) { return fb_push_error(L, c->err_code, "%s", c->err); }

static void stream_wake(call *c);

/* The call's token counts as they stand: the provider's, once it has reported them,
 * else the router's estimate (the request's bytes / 4, and the content so far / 4). */
static void usage_now(call *c, long *prompt, long *completion) {
    if (c->have_usage) {
        *prompt = c->prompt_tokens;
        *completion = c->completion_tokens;
    } else {
        *prompt = (long)c->est_prompt;
        *completion = (long)((c->content_chars + 3) / 4);
    }
}

/* The call is over (c->err_code says how): settle, record, tell the waiting fiber. */
static void finish(call *c) {
    if (c->done) return;
    /* A call given up while its request was with the provider has been paid for as
     * far as the provider got: its prompt at least. A failed one, as a rule, not. */
    int in_flight = c->cancelled && c->http;
    end_attempt(c);
    c->done = 1;
    if (c->tgt) usage_now(c, &c->prompt_tokens, &c->completion_tokens);
    if (c->err_code[0] && !c->committed && !c->have_usage && !in_flight) c->prompt_tokens = c->completion_tokens = 0;
    if (c->tgt) c->tgt->p->trial = 0;
    settle(c);
    push_record(c, c->cancelled ? "cancelled" : c->err_code[0] ? "error" : "ok");
    /* At lua_close the fiber is being collected, and after stop() it is never to run
     * again: either way its abort will let go of c. */
    fb_fiber *f = R.closed || R.stopping ? NULL : c->fiber;
    if (f && c->committed) {
        stream_wake(c);
    } else if (f) {
        c->fiber = NULL;
        lua_State *co = fb_co(f);
        int n = 1;
        if (c->err_code[0]) n = push_err(co, c);
        else lua_pushlstring(co, c->result, c->result_len);
        fb_wake(f, n);
    }
    release(c);
}

/* ---- attempts -------------------------------------------------------------------------- */

static int breaker_open(config *cfg, provider *p) {
    if (p->failures < cfg->breaker_failures) return 0;
    if (now_s() < p->open_until || p->trial) return 1;
    p->trial = 1;   /* half-open: this call is the trial */
    return 0;
}

/* Adds to the attempt chain of the call's record, which only a record reads. sent:
 * the attempt in flight (else t was skipped); code: its error code, NULL if it
 * succeeded. The outcome is an error text, scrubbed of keys by set_error. */
static void log_attempt(call *c, target *t, int sent, const char *code, const char *outcome) {
    if (!R.recording) return;
    if (c->nattempts == c->cattempts) {
        int n = c->cattempts ? c->cattempts * 2 : 4;
        attempt_rec *more = (attempt_rec *)realloc(c->attempts, (size_t)n * sizeof *more);
        if (!more) return;
        c->attempts = more;
        c->cattempts = n;
    }
    attempt_rec *a = &c->attempts[c->nattempts];
    memset(a, 0, sizeof *a);
    a->provider = strdup(t->p->name);
    a->model = strdup(t->model);
    a->outcome = strdup(outcome);
    if (!a->provider || !a->model || !a->outcome) {
        free(a->provider);
        free(a->model);
        free(a->outcome);
        return;
    }
    if (code) {
        a->has_code = 1;
        snprintf(a->code, sizeof a->code, "%s", code);
    }
    a->status = sent ? c->status : 0;
    a->latency_ms = sent ? (now_s() - c->attempt_started) * 1000 : -1;
    a->retry_after_s = sent && c->retry_after >= 0 ? c->retry_after : -1;
    c->nattempts++;
}

static void next_target(call *c);

static void dispatch(call *c) {
    provider *p = c->tgt->p;
    if (!p->qhead && wait_for(p, c) == 0) {
        send_attempt(c);
        return;
    }
    c->queued = 1;
    c->qprev = p->qtail;
    if (p->qtail) p->qtail->qnext = c; else p->qhead = c;
    p->qtail = c;
    pump(p);
}

static void on_call_timer(uv_timer_t *t);

/* The attempt failed with c->err/err_code. retryable: 429, 5xx, transport, timeout,
 * unusable response. */
static void attempt_failed(call *c, int retryable) {
    provider *p = c->tgt->p;
    config *cfg = c->cfg;
    int counts = retryable && c->status != 429;
    p->errors++;
    if (counts) {
        if (++p->failures >= cfg->breaker_failures) p->open_until = now_s() + cfg->breaker_cooldown;
    } else if (c->status != 429) {
        p->failures = 0;    /* it answered: the provider works */
    }
    p->trial = 0;
    log_attempt(c, c->tgt, 1, c->err_code, c->err);
    end_attempt(c);
    if (c->committed) {
        finish(c);
        return;
    }
    if (retryable && c->tries <= cfg->retries && c->retry_after <= cfg->retry_after_max &&
        !breaker_open(cfg, p)) {
        double d = fmin(cfg->backoff_max, cfg->backoff * pow(2, c->tries - 1));
        d = d / 2 + d / 2 * ((double)rand() / RAND_MAX);
        if (c->retry_after > d) d = c->retry_after;
        c->timer_kind = T_BACKOFF;
        uv_timer_start(&c->timer, on_call_timer, (uint64_t)(d * 1000), 0);
        return;
    }
    c->entry++;
    c->tries = 0;
    next_target(c);
}

static void next_target(call *c) {
    for (; c->entry < c->al->n; c->entry++) {
        target *t = &c->al->t[c->entry];
        if (c->op == OP_EMBED && t->p->kind != K_OPENAI) continue;
        /* Anthropic answers one completion: n of them, from it, would be one. */
        if (c->choices > 1 && t->p->kind == K_ANTHROPIC) {
            log_attempt(c, t, 0, "EUNAVAILABLE", "skipped: an Anthropic provider gives one completion, not n");
            continue;
        }
        if (breaker_open(c->cfg, t->p)) {
            log_attempt(c, t, 0, "EUNAVAILABLE", "skipped: circuit open");
            if (!c->err_code[0]) set_error(c, "EUNAVAILABLE", "provider %s: circuit open after repeated failures", t->p->name);
            continue;
        }
        c->tgt = t;
        dispatch(c);
        return;
    }
    /* A request no entry of the chain can serve is the caller's to change (400). */
    if (!c->err_code[0] && c->choices > 1)
        set_error(c, "EINVAL", "no provider of '%s' can serve n = %d completions (Anthropic gives one)",
                  c->alias_name, c->choices);
    else if (!c->err_code[0])
        set_error(c, "EUNAVAILABLE", "no provider of '%s' can serve %s", c->alias_name,
                  c->op == OP_EMBED ? "embeddings" : "this call");
    finish(c);
}

/* ---- translation: OpenAI -> Anthropic request --------------------------------------- */

static void add_text(buf *b, json_t *content) {
    if (json_is_string(content)) {
        if (b->len) buf_add(b, "\n\n", 2);
        buf_add(b, json_string_value(content), json_string_length(content));
        return;
    }
    size_t i;
    json_t *part;
    json_array_foreach(content, i, part) add_text(b, json_object_get(part, "text"));
}

static json_t *anth_blocks(json_t *content) {
    json_t *out = json_array();
    if (json_is_string(content)) {
        if (json_string_length(content))
            json_array_append_new(out, json_pack("{s:s,s:O}", "type", "text", "text", content));
        return out;
    }
    size_t i;
    json_t *part;
    json_array_foreach(content, i, part) {
        const char *type = jstr(part, "type");
        if (type && strcmp(type, "text") == 0) {
            json_array_append_new(out, json_pack("{s:s,s:O}", "type", "text", "text", json_object_get(part, "text")));
        } else if (type && strcmp(type, "image_url") == 0) {
            const char *url = jstr(json_object_get(part, "image_url"), "url");
            if (!url) continue;
            const char *semi = strchr(url, ';'), *comma = strchr(url, ',');
            if (strncmp(url, "data:", 5) == 0 && semi && comma && semi < comma) {
                json_array_append_new(out, json_pack("{s:s,s:{s:s,s:s%,s:s}}", "type", "image", "source", "type",
                                                     "base64", "media_type", url + 5, (size_t)(semi - url - 5),
                                                     "data", comma + 1));
            } else {
                json_array_append_new(out, json_pack("{s:s,s:{s:s,s:s}}", "type", "image", "source", "type", "url", "url", url));
            }
        }
    }
    return out;
}

/* Appends a message, merging into the previous one of the same role (the Messages
 * API wants user and assistant turns to alternate). */
static void anth_push(json_t *msgs, const char *role, json_t *blocks) {
    json_t *last = json_array_get(msgs, json_array_size(msgs) - 1);
    if (json_array_size(blocks) == 0) {
        json_decref(blocks);
        return;
    }
    if (last && strcmp(jstr(last, "role"), role) == 0) {
        json_array_extend(json_object_get(last, "content"), blocks);
        json_decref(blocks);
        return;
    }
    json_array_append_new(msgs, json_pack("{s:s,s:o}", "role", role, "content", blocks));
}

static json_t *to_anthropic(call *c, const char *model) {
    json_t *req = c->req, *out = json_object(), *msgs = json_array();
    buf system = {0};
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(req, "messages"), i, m) {
        const char *role = jstr(m, "role");
        json_t *content = json_object_get(m, "content");
        if (!role) continue;
        if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0) {
            add_text(&system, content);
        } else if (strcmp(role, "tool") == 0) {
            buf text = {0};
            add_text(&text, content);
            json_t *b = json_pack("{s:s,s:s,s:s}", "type", "tool_result", "tool_use_id",
                                  jstr(m, "tool_call_id") ? jstr(m, "tool_call_id") : "", "content", text.data ? text.data : "");
            free(text.data);
            anth_push(msgs, "user", json_pack("[o]", b));
        } else {
            int assistant = strcmp(role, "assistant") == 0;
            json_t *blocks = anth_blocks(content);
            size_t k;
            json_t *tc;
            json_array_foreach(json_object_get(m, "tool_calls"), k, tc) {
                json_t *fn = json_object_get(tc, "function");
                const char *args = jstr(fn, "arguments");
                json_t *input = args ? json_loads(args, 0, NULL) : NULL;
                if (!json_is_object(input)) {
                    json_decref(input);
                    input = json_object();
                }
                json_array_append_new(blocks, json_pack("{s:s,s:s,s:s,s:o}", "type", "tool_use", "id",
                                                        jstr(tc, "id") ? jstr(tc, "id") : "", "name",
                                                        jstr(fn, "name") ? jstr(fn, "name") : "", "input", input));
            }
            anth_push(msgs, assistant ? "assistant" : "user", blocks);
        }
    }
    json_object_set_new(out, "model", json_string(model));
    if (system.len) json_object_set_new(out, "system", json_string(system.data));
    free(system.data);
    json_object_set_new(out, "messages", msgs);
    json_t *mt = json_object_get(req, "max_completion_tokens");
    if (!mt) mt = json_object_get(req, "max_tokens");
    json_object_set_new(out, "max_tokens", mt ? json_incref(mt) : json_integer(c->cfg->default_max_tokens));
    json_object_set_new(out, "stream", json_boolean(c->stream));
    if (json_object_get(req, "top_p")) json_object_set(out, "top_p", json_object_get(req, "top_p"));
    /* OpenAI takes temperatures up to 2, Anthropic up to 1: a request written for the
     * one must not be refused when the chain falls back to the other. */
    json_t *temp = json_object_get(req, "temperature");
    if (json_is_number(temp) && json_number_value(temp) > 1) json_object_set_new(out, "temperature", json_real(1));
    else if (temp) json_object_set(out, "temperature", temp);
    json_t *stop = json_object_get(req, "stop");
    if (json_is_string(stop)) json_object_set_new(out, "stop_sequences", json_pack("[O]", stop));
    else if (json_is_array(stop)) json_object_set(out, "stop_sequences", stop);
    json_t *tools = json_object_get(req, "tools");
    if (json_array_size(tools)) {
        json_t *at = json_array();
        json_t *t;
        json_array_foreach(tools, i, t) {
            json_t *fn = json_object_get(t, "function");
            /* A function without parameters takes none; Anthropic wants that said. */
            json_t *params = json_object_get(fn, "parameters");
            json_t *tool = json_pack("{s:O?,s:O?}", "name", json_object_get(fn, "name"), "input_schema",
                                     json_is_object(params) ? params : NULL);
            if (!json_is_object(params))
                json_object_set_new(tool, "input_schema", json_pack("{s:s,s:{}}", "type", "object", "properties"));
            if (json_object_get(fn, "description")) json_object_set(tool, "description", json_object_get(fn, "description"));
            json_array_append_new(at, tool);
        }
        json_object_set_new(out, "tools", at);
    }
    json_t *choice = json_object_get(req, "tool_choice");
    const char *cs = json_string_value(choice);
    if (cs && strcmp(cs, "required") == 0) json_object_set_new(out, "tool_choice", json_pack("{s:s}", "type", "any"));
    else if (cs && strcmp(cs, "none") == 0) json_object_set_new(out, "tool_choice", json_pack("{s:s}", "type", "none"));
    else if (cs) json_object_set_new(out, "tool_choice", json_pack("{s:s}", "type", "auto"));
    else if (json_is_object(choice))
        json_object_set_new(out, "tool_choice", json_pack("{s:s,s:O?}", "type", "tool", "name",
                                                          json_object_get(json_object_get(choice, "function"), "name")));
    json_t *tc = json_object_get(out, "tool_choice");
    if (json_is_false(json_object_get(req, "parallel_tool_calls")) && json_array_size(tools) &&
        !(tc && strcmp(jstr(tc, "type"), "none") == 0)) {
        if (!tc) json_object_set_new(out, "tool_choice", tc = json_pack("{s:s}", "type", "auto"));
        json_object_set_new(tc, "disable_parallel_tool_use", json_true());
    }
    return out;
}

/* ---- translation: Anthropic -> OpenAI response ---------------------------------------- */

static const char *finish_of(const char *stop_reason) {
    if (!stop_reason) return NULL;
    if (strcmp(stop_reason, "max_tokens") == 0) return "length";
    if (strcmp(stop_reason, "tool_use") == 0) return "tool_calls";
    if (strcmp(stop_reason, "refusal") == 0) return "content_filter";
    return "stop";
}

static long anth_input_tokens(json_t *u) {
    return (long)(jnum(u, "input_tokens", 0) + jnum(u, "cache_creation_input_tokens", 0) +
                  jnum(u, "cache_read_input_tokens", 0));
}

static json_t *usage_json(call *c) {
    return json_pack("{s:I,s:I,s:I}", "prompt_tokens", (json_int_t)c->prompt_tokens, "completion_tokens",
                     (json_int_t)c->completion_tokens, "total_tokens",
                     (json_int_t)(c->prompt_tokens + c->completion_tokens));
}

static json_t *from_anthropic(call *c, json_t *resp) {
    buf text = {0};
    json_t *calls = json_array();
    size_t i;
    json_t *b;
    json_array_foreach(json_object_get(resp, "content"), i, b) {
        const char *type = jstr(b, "type");
        if (!type) continue;
        if (strcmp(type, "text") == 0) {
            const char *t = jstr(b, "text");
            if (t) buf_add(&text, t, strlen(t));
        } else if (strcmp(type, "tool_use") == 0) {
            char *args = json_dumps(json_object_get(b, "input"), JSON_COMPACT | JSON_ENCODE_ANY);
            json_array_append_new(calls, json_pack("{s:O?,s:s,s:{s:O?,s:s}}", "id", json_object_get(b, "id"), "type",
                                                   "function", "function", "name", json_object_get(b, "name"),
                                                   "arguments", args ? args : "{}"));
            free(args);
        }
    }
    json_t *u = json_object_get(resp, "usage");
    c->prompt_tokens = anth_input_tokens(u);
    c->completion_tokens = (long)jnum(u, "output_tokens", 0);
    c->have_usage = 1;
    json_t *msg = json_pack("{s:s,s:s?}", "role", "assistant", "content", text.data);
    free(text.data);
    if (json_array_size(calls)) json_object_set(msg, "tool_calls", calls);
    json_decref(calls);
    const char *fr = finish_of(jstr(resp, "stop_reason"));
    return json_pack("{s:O?,s:s,s:I,s:O?,s:[{s:i,s:o,s:s?}],s:o}", "id", json_object_get(resp, "id"), "object",
                     "chat.completion", "created", (json_int_t)time(NULL), "model", json_object_get(resp, "model"),
                     "choices", "index", 0, "message", msg, "finish_reason", fr ? fr : "stop", "usage", usage_json(c));
}

/* ---- responses ----------------------------------------------------------------------- */

static int emit(call *c, json_t *obj);

/* The message of an error body in OpenAI's or Anthropic's shape, or its start. */
static void upstream_message(call *c, char *out, size_t size) {
    json_t *doc = json_loadb(c->body.data ? c->body.data : "", c->body.len, 0, NULL);
    json_t *e = json_object_get(doc, "error");
    const char *msg = json_is_string(e) ? json_string_value(e) : jstr(e, "message");
    if (msg) snprintf(out, size, "%s", msg);
    else snprintf(out, size, "%.200s", c->body.len ? c->body.data : "(empty body)");
    json_decref(doc);
}

static void succeed(call *c) {
    c->tgt->p->failures = 0;
    c->tgt->p->trial = 0;
    log_attempt(c, c->tgt, 1, NULL, "ok");
    c->err_code[0] = 0;
    c->err[0] = 0;
    finish(c);
}

/* The token counts of an OpenAI usage object: the first prompt_tokens and
 * completion_tokens of the last "usage" member of the top object. */
typedef struct {
    long prompt, completion;
    int seen;       /* of the members: 1 prompt_tokens, 2 completion_tokens */
    int have;       /* a usage object closed */
} usage_read;

static void usage_visit(usage_read *u, const js_walk *w, int level, const char *v, const char *ve) {
    if (level == 0 || !js_key_is(w, 1, "usage")) return;
    if (level == 1) {
        if (*v != '{') return;
        if (ve) u->have = 1;
        else u->prompt = u->completion = u->seen = 0;
    } else if (level == 2 && js_starts(v, ve)) {
        int bit = js_key_is(w, 2, "prompt_tokens") ? 1 : js_key_is(w, 2, "completion_tokens") ? 2 : 0;
        if (!bit || (u->seen & bit)) return;
        u->seen |= bit;
        *(bit == 1 ? &u->prompt : &u->completion) = js_long(v);
    }
}

static void read_usage(call *c, const usage_read *u) {
    c->prompt_tokens = u->prompt;
    c->completion_tokens = u->completion;
    c->have_usage = 1;
}

/* What a completion (or embeddings) body shows the router. */
typedef struct {
    const char *list;   /* the member holding the answer: choices or data */
    int shaped;         /* the last one is an array */
    usage_read u;
} result_scan;

static int result_visit(js_walk *w, int level, const char *v, const char *ve) {
    result_scan *s = (result_scan *)w->site;
    usage_visit(&s->u, w, level, v, ve);
    if (level != 1 || !ve) return 1;
    if (js_key_is(w, 1, s->list)) s->shaped = *v == '[';
    return !js_key_is(w, 1, "error");
}

/* An OpenAI-compatible answer goes to the caller as it came, once it is known to be a
 * completion (or embeddings); its usage is read in passing. */
static int openai_result(call *c) {
    result_scan s = {.list = c->op == OP_CHAT ? "choices" : "data"};
    if (!js_walk_text(result_visit, &s, 2, c->body.data ? c->body.data : "", c->body.len) || !s.shaped) return 0;
    if (s.u.have) read_usage(c, &s.u);
    c->result = c->body.data;       /* NUL-terminated by buf_add */
    c->result_len = c->body.len;
    c->body = (buf){0};
    return 1;
}

static void complete_json(call *c) {
    int openai = c->tgt->p->kind == K_OPENAI;
    if (openai && openai_result(c)) {
        c->first_at = now_s();
        succeed(c);
        return;
    }
    /* What is wrong with the body, or the translation of an Anthropic answer. */
    json_error_t je;
    json_t *doc = json_loadb(c->body.data ? c->body.data : "", c->body.len, 0, &je);
    if (openai || !json_is_object(doc) || json_object_get(doc, "error") ||
        (c->op == OP_CHAT && !json_is_array(json_object_get(doc, "content")))) {
        if (doc && json_object_get(doc, "error")) {
            char msg[256];
            upstream_message(c, msg, sizeof msg);
            set_error(c, "EUPSTREAM", "%s/%s: %s", c->tgt->p->name, c->tgt->model, msg);
        } else {
            set_error(c, "EUPSTREAM", "%s/%s: malformed response body (%s)", c->tgt->p->name, c->tgt->model,
                      doc ? "not a completion" : je.text);
        }
        json_decref(doc);
        attempt_failed(c, 1);
        return;
    }
    json_t *o = from_anthropic(c, doc);
    json_decref(doc);
    c->result = json_dumps(o, JSON_COMPACT);
    c->result_len = c->result ? strlen(c->result) : 0;
    json_decref(o);
    c->first_at = now_s();
    if (!c->result) {
        set_error(c, "ENOMEM", "out of memory");
        finish(c);
        return;
    }
    succeed(c);
}

/* ---- streams --------------------------------------------------------------------------- */

static void stream_wake(call *c);

static int push_chunk(lua_State *L, call *c) {
    chunk *k = c->head;
    if (!k) {
        if (c->err_code[0]) return push_err(L, c);
        lua_pushnil(L);
        return 1;
    }
    c->head = k->next;
    if (!c->head) c->tail = NULL;
    lua_pushlstring(L, k->data, k->len);
    free(k);
    return 1;
}

/* Wakes the fiber reading c if there is something for it. */
static void stream_wake(call *c) {
    fb_fiber *f = c->fiber;
    if (!f || (!c->head && !c->done)) return;
    c->fiber = NULL;
    fb_wake(f, push_chunk(fb_co(f), c));
}

static void on_call_timer(uv_timer_t *t);

static void arm(call *c, int kind, double secs) {
    c->timer_kind = kind;
    if (secs > 0) uv_timer_start(&c->timer, on_call_timer, (uint64_t)(secs * 1000) + 1, 0);
}

/* Queues one chunk for the reader; the first commits the call to this attempt and
 * hands the caller its stream. */
static int emit_raw(call *c, const char *data, size_t len) {
    chunk *k = (chunk *)malloc(sizeof *k + len);
    if (!k) return 0;
    k->next = NULL;
    k->len = len;
    memcpy(k->data, data, len);
    if (c->tail) c->tail->next = k; else c->head = k;
    c->tail = k;
    arm(c, T_IDLE, c->cfg->idle_timeout);
    if (!c->committed) {
        c->committed = 1;
        c->first_at = now_s();
        fb_fiber *f = c->fiber;
        if (f) {
            c->fiber = NULL;
            lua_State *co = fb_co(f);
            stream_ud *s = (stream_ud *)lua_newuserdata(co, sizeof *s);
            s->c = c;
            c->has_handle = 1;
            luaL_getmetatable(co, STREAM_MT);
            lua_setmetatable(co, -2);
            fb_wake(f, 1);
        }
        return 1;
    }
    stream_wake(c);
    return 1;
}

static int emit(call *c, json_t *obj) {
    char *s = json_dumps(obj, JSON_COMPACT);
    json_decref(obj);
    int ok = s && emit_raw(c, s, strlen(s));
    free(s);
    return ok;
}

static json_t *chunk_of(call *c, json_t *delta, const char *finish_reason) {
    return json_pack("{s:s,s:s,s:I,s:s,s:[{s:i,s:o,s:s?}]}", "id", c->out_id ? c->out_id : "", "object",
                     "chat.completion.chunk", "created", (json_int_t)time(NULL), "model",
                     c->out_model ? c->out_model : c->tgt->model, "choices", "index", 0, "delta", delta,
                     "finish_reason", finish_reason);
}

static void stream_failed(call *c, const char *fmt, const char *detail) {
    set_error(c, "EUPSTREAM", fmt, c->tgt->p->name, c->tgt->model, detail);
    attempt_failed(c, 1);
}

/* One event of an Anthropic Messages stream, as OpenAI chunks. */
static void anthropic_event(call *c, json_t *ev) {
    const char *type = jstr(ev, "type");
    if (!type) return;
    if (strcmp(type, "message_start") == 0) {
        json_t *m = json_object_get(ev, "message");
        free(c->out_id);
        free(c->out_model);
        c->out_id = dup_str(jstr(m, "id"));
        c->out_model = dup_str(jstr(m, "model"));
        c->prompt_tokens = anth_input_tokens(json_object_get(m, "usage"));
        c->have_usage = 1;
        emit(c, chunk_of(c, json_pack("{s:s,s:s}", "role", "assistant", "content", ""), NULL));
    } else if (strcmp(type, "content_block_start") == 0) {
        json_t *b = json_object_get(ev, "content_block");
        const char *bt = jstr(b, "type");
        if (bt && strcmp(bt, "tool_use") == 0) {
            c->cur_tool = c->ntools++;
            emit(c, chunk_of(c, json_pack("{s:[{s:i,s:O?,s:s,s:{s:O?,s:s}}]}", "tool_calls", "index", c->cur_tool, "id",
                                          json_object_get(b, "id"), "type", "function", "function", "name",
                                          json_object_get(b, "name"), "arguments", ""), NULL));
        } else if (bt && strcmp(bt, "text") == 0 && jstr(b, "text") && *jstr(b, "text")) {
            c->content_chars += strlen(jstr(b, "text"));
            emit(c, chunk_of(c, json_pack("{s:O}", "content", json_object_get(b, "text")), NULL));
        }
    } else if (strcmp(type, "content_block_delta") == 0) {
        json_t *d = json_object_get(ev, "delta");
        const char *dt = jstr(d, "type");
        if (dt && strcmp(dt, "text_delta") == 0 && jstr(d, "text")) {
            c->content_chars += strlen(jstr(d, "text"));
            emit(c, chunk_of(c, json_pack("{s:O}", "content", json_object_get(d, "text")), NULL));
        } else if (dt && strcmp(dt, "input_json_delta") == 0 && jstr(d, "partial_json")) {
            c->content_chars += strlen(jstr(d, "partial_json"));
            emit(c, chunk_of(c, json_pack("{s:[{s:i,s:{s:O}}]}", "tool_calls", "index", c->cur_tool, "function",
                                          "arguments", json_object_get(d, "partial_json")), NULL));
        }
    } else if (strcmp(type, "message_delta") == 0) {
        json_t *u = json_object_get(ev, "usage");
        if (json_object_get(u, "output_tokens")) c->completion_tokens = (long)jnum(u, "output_tokens", 0);
        if (json_object_get(u, "input_tokens")) c->prompt_tokens = anth_input_tokens(u);
        const char *fr = finish_of(jstr(json_object_get(ev, "delta"), "stop_reason"));
        emit(c, chunk_of(c, json_object(), fr ? fr : "stop"));
    } else if (strcmp(type, "message_stop") == 0) {
        c->ended_ok = 1;
        if (c->include_usage) {
            json_t *k = chunk_of(c, json_object(), NULL);
            json_object_set_new(k, "choices", json_array());
            json_object_set_new(k, "usage", usage_json(c));
            emit(c, k);
        }
    } else if (strcmp(type, "error") == 0) {
        char msg[256];
        json_t *e = json_object_get(ev, "error");
        snprintf(msg, sizeof msg, "%s", jstr(e, "message") ? jstr(e, "message") : "error event");
        stream_failed(c, "%s/%s: %s", msg);
    }
}

/* The message of an error event or body, for the caller. */
static void error_message(const char *data, size_t len, char *out, size_t size) {
    json_t *ev = json_loadb(data, len, 0, NULL);
    json_t *e = json_object_get(ev, "error");
    const char *m = json_is_string(e) ? json_string_value(e) : jstr(e, "message");
    snprintf(out, size, "%s", m ? m : "error event");
    json_decref(ev);
}

/* What an OpenAI stream event shows the router: the text of its choices' deltas and
 * tool calls counts toward the estimate of the tokens it brings. Each member is the
 * first of its name in its object; the counts say how many a name has had so far. */
typedef struct {
    usage_read u;
    int error, choices;
    size_t chars;
    int delta, content, tools, fn, args;
    int finished;               /* choices with a finish_reason */
} event_scan;

/* Whether the value is in the first tool_calls of the first delta of a choice. */
static int in_tools(const event_scan *s, const js_walk *w) {
    return s->delta == 1 && s->tools == 1 && js_key_is(w, 3, "delta") && js_key_is(w, 4, "tool_calls");
}

static void choice_visit(event_scan *s, const js_walk *w, int level, const char *v, const char *ve) {
    if (!js_starts(v, ve)) return;
    switch (level) {
    case 2:
        s->delta = 0;
        break;
    case 3:
        if (js_key_is(w, 3, "delta") && ++s->delta == 1) s->content = s->tools = 0;
        else if (js_key_is(w, 3, "finish_reason") && *v == '"') s->finished++;
        break;
    case 4:
        if (s->delta != 1 || !js_key_is(w, 3, "delta")) break;
        if (js_key_is(w, 4, "content") && ++s->content == 1 && *v == '"') s->chars += (size_t)(ve - v - 2);
        else if (js_key_is(w, 4, "tool_calls")) s->tools++;
        break;
    case 5:
        if (in_tools(s, w)) s->fn = 0;
        break;
    case 6:
        if (in_tools(s, w) && js_key_is(w, 6, "function") && ++s->fn == 1) s->args = 0;
        break;
    case 7:
        if (in_tools(s, w) && s->fn == 1 && js_key_is(w, 6, "function") && js_key_is(w, 7, "arguments") &&
            ++s->args == 1 && *v == '"')
            s->chars += (size_t)(ve - v - 2);
        break;
    }
}

static int event_visit(js_walk *w, int level, const char *v, const char *ve) {
    event_scan *s = (event_scan *)w->site;
    if (level == 0) return 1;
    if (level == 1 && ve && js_key_is(w, 1, "error")) {
        s->error = 1;
        return 0;
    }
    usage_visit(&s->u, w, level, v, ve);
    if (!js_key_is(w, 1, "choices")) return 1;
    if (level == 2 && ve) s->choices++;
    choice_visit(s, w, level, v, ve);
    return 1;
}

/* One event of an OpenAI stream: passed through as it came, after a look at it. */
static void openai_event(call *c, const char *data, size_t len) {
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        c->ended_ok = 1;
        return;
    }
    event_scan s = {0};
    int ok = js_walk_text(event_visit, &s, 7, data, len);
    if (s.error) {
        char msg[256];
        error_message(data, len, msg, sizeof msg);
        stream_failed(c, "%s/%s: %s", msg);
        return;
    }
    if (!ok) {
        json_error_t je;
        json_t *doc = json_loadb(data, len, JSON_DECODE_ANY, &je);
        json_decref(doc);
        stream_failed(c, "%s/%s: malformed stream event (%s)", doc ? "not an object" : je.text);
        return;
    }
    if (s.u.have) read_usage(c, &s.u);
    c->finished += s.finished;
    c->content_chars += s.chars;
    /* The usage chunk was asked for by the router; the caller gets it if it asked too. */
    if (!(s.u.have && s.choices == 0) || c->include_usage) emit_raw(c, data, len);
}

static void sse_dispatch(call *c) {
    if (c->data.len == 0) return;
    if (c->tgt->p->kind == K_ANTHROPIC) {
        json_t *ev = json_loadb(c->data.data, c->data.len, 0, NULL);
        if (json_is_object(ev)) anthropic_event(c, ev);
        else stream_failed(c, "%s/%s: malformed stream event%s", "");
        json_decref(ev);
    } else {
        openai_event(c, c->data.data, c->data.len);
    }
    c->data.len = 0;
}

/* Server-Sent Events framing (WHATWG HTML 9.2.6): lines, data: fields joined with
 * LF, a blank line dispatches; other fields are not needed (Anthropic repeats the
 * event name as the data's "type"). The JSON inside is parsed with jansson. */
static void sse_feed(call *c, const char *p, size_t n) {
    const char *end = p + n;
    while (p < end && !c->done && c->http) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            buf_add(&c->line, p, (size_t)(end - p));
            return;
        }
        buf_add(&c->line, p, (size_t)(nl - p));
        p = nl + 1;
        size_t l = c->line.len;
        if (l && c->line.data[l - 1] == '\r') l--;
        const char *s = c->line.data ? c->line.data : "";
        c->line.len = 0;
        if (l == 0) {
            sse_dispatch(c);
        } else if (l >= 5 && memcmp(s, "data:", 5) == 0) {
            size_t off = (l > 5 && s[5] == ' ') ? 6 : 5;
            if (c->data.len) buf_add(&c->data, "\n", 1);
            buf_add(&c->data, s + off, l - off);
        }
    }
}

/* ---- HTTP callbacks ------------------------------------------------------------------- */

static const char *head_value(const char *head, size_t len, const char *name, size_t *vlen) {
    size_t nl = strlen(name);
    const char *p = head, *end = head + len;
    while (p && p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        if ((size_t)(eol - p) > nl && memcmp(p, name, nl) == 0 && p[nl] == ':') {
            *vlen = (size_t)(eol - p - nl - 1);
            return p + nl + 1;
        }
        p = eol + 1;
    }
    return NULL;
}

static void on_head(void *ud, long status, const char *head, size_t len) {
    call *c = (call *)ud;
    c->status = status;
    size_t vl;
    const char *v = head_value(head, len, "retry-after-ms", &vl);
    char tmp[64];
    if (v && vl < sizeof tmp) {
        snprintf(tmp, sizeof tmp, "%.*s", (int)vl, v);
        c->retry_after = atof(tmp) / 1000;
    } else if ((v = head_value(head, len, "retry-after", &vl)) && vl < sizeof tmp) {
        snprintf(tmp, sizeof tmp, "%.*s", (int)vl, v);
        char *endp;
        double secs = strtod(tmp, &endp);
        if (endp == tmp) {
            /* An HTTP-date, in any of the three forms RFC 9110 says a recipient must read. */
            time_t at = curl_getdate(tmp, NULL);
            secs = at >= 0 ? difftime(at, time(NULL)) : 0;
        }
        c->retry_after = secs > 0 ? secs : 0;
    }
    if (status != 200) return;
    v = head_value(head, len, "content-type", &vl);
    snprintf(tmp, sizeof tmp, "%.*s", v ? (int)(vl < 63 ? vl : 63) : 0, v ? v : "");
    c->is_sse = strstr(tmp, "text/event-stream") != NULL;
    c->is_json = strstr(tmp, "json") != NULL;
    if (c->stream ? !c->is_sse : !c->is_json) {
        set_error(c, "EUPSTREAM", "%s/%s: unexpected content type '%s'", c->tgt->p->name, c->tgt->model,
                  tmp[0] ? tmp : "(none)");
        attempt_failed(c, 1);
    }
}

#define MAX_ERROR_BODY 65536

static void on_data(void *ud, const char *data, size_t len) {
    call *c = (call *)ud;
    if (c->status == 200 && c->stream) {
        if (c->committed) arm(c, T_IDLE, c->cfg->idle_timeout);
        sse_feed(c, data, len);
    } else if (c->status == 200 || c->body.len < MAX_ERROR_BODY) {
        if (!buf_add(&c->body, data, len)) {
            set_error(c, "ENOMEM", "out of memory reading the response");
            attempt_failed(c, 0);
        }
    }
}

/* Some OpenAI-compatible servers (older Azure OpenAI API versions, some gateways)
 * refuse the stream_options the router adds to have a stream's usage: the provider
 * is asked again at once without them, and from then on (its streams' usage is then
 * estimated from their content). */
static int refused_stream_options(call *c) {
    char msg[256];
    upstream_message(c, msg, sizeof msg);
    if (c->tgt->p->kind != K_OPENAI || !strstr(msg, "stream_options")) return 0;
    c->tgt->p->no_stream_options = 1;
    set_error(c, "EUPSTREAM", "%s/%s: HTTP 400: %s (asked again without stream_options)", c->tgt->p->name,
              c->tgt->model, msg);
    log_attempt(c, c->tgt, 1, c->err_code, c->err);
    end_attempt(c);
    dispatch(c);
    return 1;
}

static void on_done(void *ud, const char *code, const char *message) {
    call *c = (call *)ud;
    c->http = NULL;     /* freed by the client after this returns */
    if (code) {
        char msg[MAX_ERR];
        snprintf(msg, sizeof msg, "%s", message);
        set_error(c, code, "%s/%s: %s", c->tgt->p->name, c->tgt->model, msg);
        attempt_failed(c, 1);
        return;
    }
    if (c->status == 404) {
        /* Most often a base_url missing (or doubling) its path: say where the request
         * went, the path only (a URL's host part may carry credentials). */
        const char *url = c->op == OP_EMBED ? c->tgt->p->embed_url : c->tgt->p->chat_url;
        const char *host = strstr(url, "://");
        const char *path = host ? strchr(host + 3, '/') : NULL;
        size_t plen = path ? strcspn(path, "?#") : 0;
        char msg[256];
        upstream_message(c, msg, sizeof msg);
        /* A provider that names the model in its 404 (OpenAI's model_not_found,
         * Anthropic's "model: ...", Ollama's "model ... not found") found the path. */
        if (strcasestr(msg, "model"))
            set_error(c, "EUPSTREAM", "%s/%s: HTTP 404: %s", c->tgt->p->name, c->tgt->model, msg);
        else
            set_error(c, "EUPSTREAM", "%s/%s: HTTP 404: %s (the request went to %.*s: is providers.%s.base_url right?)",
                      c->tgt->p->name, c->tgt->model, msg, (int)(plen > 200 ? 200 : plen), path ? path : "",
                      c->tgt->p->name);
        attempt_failed(c, 0);
        return;
    }
    if (c->status == 400 && c->stream && !c->tgt->p->no_stream_options && refused_stream_options(c)) return;
    if (c->status != 200) {
        char msg[256];
        upstream_message(c, msg, sizeof msg);
        set_error(c, "EUPSTREAM", "%s/%s: HTTP %ld: %s", c->tgt->p->name, c->tgt->model, c->status, msg);
        attempt_failed(c, c->status == 429 || c->status >= 500);
        return;
    }
    if (!c->stream) {
        complete_json(c);
        return;
    }
    if (c->line.len) sse_feed(c, "\n", 1);
    /* Some servers end the stream after the last finish_reason, without [DONE]: every
     * choice has finished, so nothing is missing but the usage chunk. */
    if (c->ended_ok || (c->finished >= c->choices && !c->done)) succeed(c);
    else if (!c->done) stream_failed(c, "%s/%s: %s", "the stream ended before completion");
}

static const hc_callbacks callbacks = {on_head, on_data, on_done};

static void on_call_timer(uv_timer_t *t) {
    call *c = (call *)t->data;
    int kind = c->timer_kind;
    c->timer_kind = T_NONE;
    if (kind == T_BACKOFF) {
        dispatch(c);
    } else if (kind == T_IDLE && c->ended_ok) {
        succeed(c);
    } else if (kind == T_FIRST || kind == T_IDLE) {
        set_error(c, "ETIMEDOUT", "%s/%s: %s after %g s", c->tgt->p->name, c->tgt->model,
                  kind == T_FIRST ? "no first token" : "the stream stalled",
                  kind == T_FIRST ? c->cfg->first_token_timeout : c->cfg->idle_timeout);
        attempt_failed(c, 1);
    }
}

/* The caller's members for the target, when the request has too many to note. */
typedef struct {
    call *c;
    buf *b;
    int ok;
} body_copy;

static int copy_visit(js_walk *w, int level, const char *v, const char *ve) {
    body_copy *bc = (body_copy *)w->site;
    if (level != 1 || !ve || js_key_is(w, 1, "model") ||
        (bc->c->op == OP_CHAT && (js_key_is(w, 1, "stream") || js_key_is(w, 1, "stream_options"))))
        return 1;
    const char *k = w->k[1] - 1;
    bc->ok = buf_add(bc->b, ",", 1) && buf_add(bc->b, k, (size_t)(ve - k));
    return bc->ok;
}

/* The request for the target, malloc'd (NUL-terminated), or NULL when out of memory.
 * An OpenAI-compatible one gets the caller's members as they came, with the target's
 * model and the stream options the router needs. */
static char *upstream_body(call *c) {
    if (c->op == OP_CHAT && c->tgt->p->kind == K_ANTHROPIC) {
        json_t *o = to_anthropic(c, c->tgt->model);
        char *body = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        return body;
    }
    buf b = {0};
    int ok = buf_add(&b, "{\"model\":", 9) && buf_add_jstr(&b, c->tgt->model);
    const members *m = &c->mem;
    for (int i = 0; ok && i < m->n; i++) {
        if (m->what[i] == M_MODEL || (c->op == OP_CHAT && m->what[i] == M_STREAM)) continue;
        ok = buf_add(&b, ",", 1) && buf_add(&b, c->text + m->at[i][0], m->at[i][1] - m->at[i][0]);
    }
    if (ok && m->n < 0) {
        body_copy bc = {c, &b, 1};
        js_walk_text(copy_visit, &bc, 1, c->text, c->text_len);
        ok = bc.ok;
    }
    /* Usage comes in a last chunk only when asked for. */
    const char *tail = c->op == OP_EMBED ? "}"
                     : c->stream && c->tgt->p->no_stream_options ? ",\"stream\":true}"
                     : c->stream ? ",\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
                     : ",\"stream\":false}";
    if (ok && buf_add(&b, tail, strlen(tail))) return b.data;
    free(b.data);
    return NULL;
}

static void send_attempt(call *c) {
    provider *p = c->tgt->p;
    take_slot(c);
    c->tries++;
    c->attempt_started = now_s();
    c->status = 0;
    c->retry_after = -1;
    c->ended_ok = c->is_sse = c->is_json = c->finished = 0;
    c->body.len = c->line.len = c->data.len = 0;
    char *body = upstream_body(c);
    const char *headers[5];
    int n = 0;
    headers[n++] = "Content-Type: application/json";
    if (p->auth) headers[n++] = p->auth;
    if (p->kind == K_ANTHROPIC) headers[n++] = "anthropic-version: 2023-06-01";
    if (c->stream) headers[n++] = "Accept: text/event-stream";
    headers[n] = NULL;
    hc_options rq = {
        .method = "POST",
        .url = c->op == OP_EMBED ? p->embed_url : p->chat_url,
        .headers = headers,
        .body = body,
        .body_len = body ? strlen(body) : 0,
        .timeout_ms = (long)(c->cfg->timeout * 1000),
        .connect_timeout_ms = (long)(c->cfg->connect_timeout * 1000),
    };
    c->http = body ? hc_start(&rq, &callbacks, c) : NULL;
    free(body);
    if (!c->http) {
        set_error(c, "EHTTP", "%s/%s: cannot start the request", p->name, c->tgt->model);
        attempt_failed(c, 0);
        return;
    }
    if (c->stream) arm(c, T_FIRST, c->cfg->first_token_timeout);
}

/* ---- Lua API --------------------------------------------------------------------------- */

/* A reader's wait abandoned: before the first chunk nobody has the answer, so the
 * call stops; after it, a read that timed out leaves the stream to be read again,
 * but a reader cancelled (its fiber will not run again) takes the stream with it,
 * or the upstream would go on generating, and be paid for, until its handle is
 * collected. */
static void call_abort(void *op) {
    call *c = (call *)op;
    int cancelled = c->fiber && fb_cancelling(c->fiber);
    c->fiber = NULL;
    if (!c->done && (!c->committed || cancelled)) {
        c->cancelled = 1;
        set_error(c, "ECANCELED", "the caller went away");
        finish(c);
    }
    release(c);
}

static int r_configure(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    char err[MAX_ERR];
    config *cfg = cfg_load(text, len, err);
    if (!cfg) return fb_push_error(L, "EINVAL", "%s", err);
    cfg_unref(R.cfg);
    R.cfg = cfg;
    lua_pushboolean(L, 1);
    return 1;
}

static double chain_price(alias *a, double prompt, double completion) {
    double m = 0;
    for (int i = 0; i < a->n; i++) m = fmax(m, prompt * a->t[i].price_in + completion * a->t[i].price_out);
    return m;
}

static int bad_request(lua_State *L, const char *code, const char *fmt, ...) {
    char msg[MAX_ERR];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return fb_push_error(L, code, "%s", msg);
}

/* The configured aliases and providers, as far as they fit in out, for a caller who
 * named neither. */
static void known_names(config *cfg, char *out, size_t size) {
    size_t n = (size_t)snprintf(out, size, "aliases:");
    for (int i = 0; i < cfg->naliases && n < size; i++)
        n += (size_t)snprintf(out + n, size - n, "%s %s", i ? "," : "", cfg->aliases[i].name);
    if (n < size) n += (size_t)snprintf(out + n, size - n, "%s; providers:", cfg->naliases ? "" : " none");
    for (int i = 0; i < cfg->nproviders && n < size; i++)
        n += (size_t)snprintf(out + n, size - n, "%s %s", i ? "," : "", cfg->providers[i].name);
    if (n >= size && size > 4) memcpy(out + size - 4, "...", 4);
}

/* What the router reads of a request. */
typedef struct {
    const char *model, *model_end;      /* the value, quotes included */
    int messages, input, stream, include_usage;
    const char *max_tokens, *max_tokens_end;
    const char *choices, *choices_end;  /* n: how many completions */
    members mem;
} request_info;

/* Where read_request is in a request. */
typedef struct {
    request_info *ri;
    const char *text, *mct, *mct_end;   /* max_completion_tokens */
    int usage;                          /* include_usage in the current stream_options: 0 none, 1 false, 2 true */
} request_scan;

static void request_member(request_scan *s, const js_walk *w, const char *v, const char *ve) {
    request_info *ri = s->ri;
    members *m = &ri->mem;
    int model = js_key_is(w, 1, "model"), stream = js_key_is(w, 1, "stream");
    int options = js_key_is(w, 1, "stream_options");
    if (m->n >= MAX_MEMBERS) {
        m->n = -1;
    } else if (m->n >= 0) {
        m->at[m->n][0] = (size_t)(w->k[1] - 1 - s->text);
        m->at[m->n][1] = (size_t)(ve - s->text);
        m->what[m->n++] = (unsigned char)(model ? M_MODEL : stream || options ? M_STREAM : 0);
    }
    if (model) {
        ri->model = v;
        ri->model_end = ve;
    } else if (js_key_is(w, 1, "messages")) {
        ri->messages = *v == '[' && *js_skip(v + 1) != ']';
    } else if (js_key_is(w, 1, "input")) {
        ri->input = 1;
    } else if (stream) {
        ri->stream = *v == 't';
    } else if (options) {
        ri->include_usage = s->usage == 2;
        s->usage = 0;
    } else if (js_key_is(w, 1, "n")) {
        ri->choices = v;
        ri->choices_end = ve;
    } else if (js_key_is(w, 1, "max_completion_tokens")) {
        s->mct = v;
        s->mct_end = ve;
    } else if (js_key_is(w, 1, "max_tokens")) {
        ri->max_tokens = v;
        ri->max_tokens_end = ve;
    }
}

static int request_visit(js_walk *w, int level, const char *v, const char *ve) {
    request_scan *s = (request_scan *)w->site;
    if (level == 1 && ve) request_member(s, w, v, ve);
    else if (level == 2 && !s->usage && js_key_is(w, 1, "stream_options") && js_key_is(w, 2, "include_usage"))
        s->usage = *v == 't' ? 2 : 1;
    return 1;
}

static int read_request(const char *text, size_t len, request_info *ri) {
    request_scan s = {.ri = ri, .text = text};
    memset(ri, 0, sizeof *ri);
    if (!js_walk_text(request_visit, &s, 2, text, len)) return 0;
    if (s.mct) {
        ri->max_tokens = s.mct;
        ri->max_tokens_end = s.mct_end;
    }
    return 1;
}

/* The model a request names (malloc'd), or NULL if it names none. */
static char *request_model(const request_info *ri) {
    if (!ri->model || *ri->model != '"') return NULL;
    size_t n = (size_t)(ri->model_end - ri->model - 2);
    if (!memchr(ri->model + 1, '\\', n)) return n ? strndup(ri->model + 1, n) : NULL;
    json_t *v = json_loadb(ri->model, n + 2, JSON_DECODE_ANY, NULL);
    char *m = json_string_length(v) ? strdup(json_string_value(v)) : NULL;
    json_decref(v);
    return m;
}

/* Whether a member of text (as read into m) is named key, written plainly. */
static int member_named(const char *text, const members *m, const char *key) {
    size_t n = strlen(key);
    for (int i = 0; i < m->n; i++) {
        const char *k = text + m->at[i][0];
        if (k[0] == '"' && !strncmp(k + 1, key, n) && k[n + 1] == '"') return 1;
    }
    return 0;
}

static int stream_member(const members *m) {
    for (int i = 0; i < m->n; i++)
        if (m->what[i] == M_STREAM) return 1;
    return 0;
}

static int chain_has(alias *a, int kind) {
    for (int i = 0; i < a->n; i++)
        if (a->t[i].p->kind == kind) return 1;
    return 0;
}

/* A member's value [v, ve) is absent, null, or a whole number from 1 to max. */
static int whole_or_absent(const char *v, const char *ve, long max) {
    if (!v || (ve - v == 4 && memcmp(v, "null", 4) == 0)) return 1;
    if (!js_is_integer(v, ve) || *v == '-' || ve - v > 10) return 0;
    long n = js_long(v);
    return n >= 1 && n <= max;
}

/* OpenAI's own limit on n. */
#define MAX_CHOICES 128

/* What an inline image (a data: URL) costs in prompt tokens, at most: providers bill
 * images by their pixels (Anthropic about 1,600 tokens for the largest, OpenAI 1,445),
 * not by their base64 bytes, of which a screenshot has a million. */
#define IMAGE_TOKENS 1600

static int is_base64_char(char ch) {
    /* '\\' for JSON's escaped slash "\/" */
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '+' ||
           ch == '/' || ch == '=' || ch == '\\';
}

/* The prompt's tokens, estimated: a token per 4 bytes of the request, but an inline
 * image's data at most IMAGE_TOKENS. */
static double prompt_estimate(const char *text, size_t len) {
    double tokens = (double)(len / 4 + 1);
    const char *p = text, *end = text + len;
    while ((p = memmem(p, (size_t)(end - p), ";base64,", 8)) != NULL) {
        const char *q = p += 8;
        while (q < end && is_base64_char(*q)) q++;
        double data = (double)(q - p) / 4;
        if (data > IMAGE_TOKENS) tokens -= data - IMAGE_TOKENS;
        p = q;
    }
    return tokens;
}

/* The call, reserved here, goes back to Lua for the ledger to confirm its team's
 * budget across processes: pending, est_usd, est_tokens, limit_usd, limit_tokens
 * (< 0: none). The pending handle keeps it until it is sent, refused or collected. */
static int push_pending(lua_State *L, call *c) {
    pending_ud *p = (pending_ud *)lua_newuserdata(L, sizeof *p);
    p->c = c;
    c->has_handle = 1;
    luaL_getmetatable(L, PENDING_MT);
    lua_setmetatable(L, -2);
    lua_pushnumber(L, c->est_usd);
    lua_pushnumber(L, c->est_tokens);
    lua_pushnumber(L, c->gate_usd);
    lua_pushnumber(L, c->gate_tokens);
    return 5;
}

/* A call of a request read into ri (text: len bytes, NUL-terminated, copied here). */
static int begin_call(lua_State *L, fb_fiber *f, int op, const char *text, size_t len, const request_info *ri,
                      int stream, const char *team, const char *run) {
    if (op == OP_CHAT && !ri->messages) return bad_request(L, "EINVAL", "'messages' must be a non-empty array");
    if (op == OP_EMBED && !ri->input) return bad_request(L, "EINVAL", "'input' is required");
    /* The reservation counts on it: a negative limit would reserve less than nothing. */
    if (op == OP_CHAT && !whole_or_absent(ri->max_tokens, ri->max_tokens_end, INT_MAX))
        return bad_request(L, "EINVAL", "'max_tokens' (or 'max_completion_tokens') must be a whole number >= 1");
    if (op == OP_CHAT && !whole_or_absent(ri->choices, ri->choices_end, MAX_CHOICES))
        return bad_request(L, "EINVAL", "'n' must be a whole number from 1 to %d", MAX_CHOICES);
    char *model = request_model(ri);
    if (!model) return bad_request(L, "EINVAL", "'model' is required");
    config *cfg = R.cfg;
    alias *al = find_alias(cfg, model);
    target direct = {0};
    if (!al && !set_target(cfg, &direct, model)) {
        char known[256];
        known_names(cfg, known, sizeof known);
        bad_request(L, "EALIAS", "unknown model '%.100s': not an alias nor provider/model (%s)", model, known);
        free(model);
        return 3;
    }
    /* A translation works on a tree; it is built once, and only then. */
    json_t *tree = NULL;
    if (op == OP_CHAT && (al ? chain_has(al, K_ANTHROPIC) : direct.p->kind == K_ANTHROPIC)) {
        json_error_t je;
        tree = json_loadb(text, len, 0, &je);
        if (!tree) {
            free(model);
            free(direct.model);
            return bad_request(L, "EINVAL", "the request is not valid JSON: %s", je.text);
        }
    }
    call *c = (call *)calloc(1, sizeof *c);
    char *copy = c ? (char *)malloc(len + 1) : NULL;
    if (!copy) {
        free(c);
        free(model);
        free(direct.model);
        json_decref(tree);
        return bad_request(L, "ENOMEM", "out of memory");
    }
    memcpy(copy, text, len + 1);
    uv_timer_init(fb_loop(), &c->timer);
    c->timer.data = c;
    c->next = R.live;
    if (R.live) R.live->prev = c;
    R.live = c;
    c->cfg = cfg;
    cfg->refs++;
    c->op = op;
    c->stream = stream;
    c->text = copy;
    c->text_len = len;
    c->mem = ri->mem;
    c->req = tree;
    c->alias_name = model;
    c->team = dup_str(team);
    c->run = dup_str(run);
    c->started = now_s();
    c->retry_after = -1;
    if (al) {
        c->al = al;
    } else {
        c->direct_t = direct;
        c->direct.name = c->alias_name;
        c->direct.t = &c->direct_t;
        c->direct.n = 1;
        c->al = &c->direct;
    }
    c->include_usage = ri->include_usage;
    /* Never more tokens than asked for: the reservation and, for Anthropic, the limit sent. */
    double completion = op == OP_EMBED ? 0
                      : ri->max_tokens && js_is_integer(ri->max_tokens, ri->max_tokens_end) ? (double)js_long(ri->max_tokens)
                      : cfg->default_max_tokens;
    /* n completions may each take the whole limit. */
    c->choices = ri->choices && js_is_integer(ri->choices, ri->choices_end) ? (int)js_long(ri->choices) : 1;
    completion *= c->choices;
    c->est_prompt = prompt_estimate(text, len);
    c->est_tokens = c->est_prompt + completion;
    c->est_usd = chain_price(c->al, c->est_prompt, completion);
    if (!reserve(c)) {
        snprintf(c->err_code, sizeof c->err_code, "EBUDGET");
        finish(c);
        return push_err(L, c);
    }
    if (R.ledger && c->gated) return push_pending(L, c);
    next_target(c);
    if (c->done) return push_err(L, c);     /* every provider's circuit is open */
    c->fiber = f;
    return fb_await(L, f, call_abort, c, 0);
}

/* Raises when the runtime is shutting down; pushes ENOCONFIG (returns 3) when there
 * is no configuration; 0 when a call can start. */
static int not_ready(lua_State *L) {
    if (R.closed || fb_closing()) return luaL_error(L, "router: the runtime is shutting down");
    if (!R.cfg) return fb_push_error(L, "ENOCONFIG", "the router is not configured (no providers and models)");
    return 0;
}

static void never_woken(void *op) { (void)op; }

static int start_call(lua_State *L, int op) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    const char *team = luaL_optstring(L, 2, NULL), *run = luaL_optstring(L, 3, NULL);
    fb_fiber *f = fb_check_current(L, op == OP_CHAT ? "router.chat" : "router.embeddings");
    if (R.stopping) return fb_await(L, f, never_woken, NULL, 0);
    int unready = not_ready(L);
    if (unready) return unready;
    request_info ri;
    if (!read_request(text, len, &ri)) {
        json_error_t je;
        json_t *doc = json_loadb(text, len, 0, &je);
        const char *why = doc ? (json_is_object(doc) ? "nested too deeply" : "another JSON value") : je.text;
        json_decref(doc);
        return bad_request(L, "EINVAL", "the request is not a JSON object: %s", why);
    }
    int stream = op == OP_CHAT && (lua_isnoneornil(L, 4) ? ri.stream : lua_toboolean(L, 4));
    return begin_call(L, f, op, text, len, &ri, stream, team, run);
}

/* chat(request_json [, team [, run [, stream]]]) */
static int r_chat(lua_State *L) { return start_call(L, OP_CHAT); }

/* chat_parts(model, members, messages [, team [, run [, stream]]]): a chat request
 * given as JSON texts its caller wrote with a JSON library (factory.objective's, from
 * cjson): members, its other members ("max_tokens":1024,...) or ""; messages, a list
 * of each message's JSON. They are not read again: the router puts the request
 * together and knows where each member lies, which saves parsing several kilobytes
 * of prompt per call. Text from outside goes through chat, which checks it. */
static int r_chat_parts(lua_State *L) {
    const char *model = luaL_checkstring(L, 1);
    size_t mlen;
    const char *more = luaL_checklstring(L, 2, &mlen);
    luaL_checktype(L, 3, LUA_TTABLE);
    const char *team = luaL_optstring(L, 4, NULL), *run = luaL_optstring(L, 5, NULL);
    int stream = lua_toboolean(L, 6);
    int count = (int)lua_objlen(L, 3);
    for (int i = 1; i <= count; i++) {
        lua_rawgeti(L, 3, i);
        if (lua_type(L, -1) != LUA_TSTRING) return luaL_argerror(L, 3, "expected a list of JSON texts");
        lua_pop(L, 1);
    }
    fb_fiber *f = fb_check_current(L, "router.chat");
    if (R.stopping) return fb_await(L, f, never_woken, NULL, 0);
    int unready = not_ready(L);
    if (unready) return unready;
    request_info ri;
    memset(&ri, 0, sizeof ri);
    buf b = {0};
    size_t at[3][2] = {{0}};
    int ok = buf_add(&b, "{", 1);
    at[0][0] = b.len;
    ok = ok && buf_add(&b, "\"model\":", 8);
    size_t value = b.len;
    ok = ok && buf_add_jstr(&b, model);
    at[0][1] = b.len;
    if (ok && mlen) {
        ok = buf_add(&b, ",", 1);
        at[1][0] = b.len;
        ok = ok && buf_add(&b, more, mlen);
        at[1][1] = b.len;
    }
    ok = ok && buf_add(&b, ",", 1);
    at[2][0] = b.len;
    ok = ok && buf_add(&b, "\"messages\":[", 12);
    for (int i = 1; ok && i <= count; i++) {
        lua_rawgeti(L, 3, i);
        size_t l;
        const char *m = lua_tolstring(L, -1, &l);
        ok = (i == 1 || buf_add(&b, ",", 1)) && buf_add(&b, m, l);
        lua_pop(L, 1);
    }
    ok = ok && buf_add(&b, "]", 1);
    at[2][1] = b.len;
    ok = ok && buf_add(&b, "}", 1);
    if (!ok) {
        free(b.data);
        return bad_request(L, "ENOMEM", "out of memory");
    }
    ri.model = b.data + value;
    ri.model_end = b.data + at[0][1];
    ri.messages = count > 0;
    ri.stream = stream;
    for (int i = 0; i < 3; i++) {
        if (at[i][1] == at[i][0]) continue;
        ri.mem.at[ri.mem.n][0] = at[i][0];
        ri.mem.at[ri.mem.n][1] = at[i][1];
        ri.mem.what[ri.mem.n++] = (unsigned char)(i == 0 ? M_MODEL : 0);
    }
    /* The few other members are read (max_tokens, for the reservation), in a copy of
     * their own: a handful of bytes. The router sets model, messages and stream. */
    buf own = {0};
    request_info mi;
    if (!(buf_add(&own, "{", 1) && buf_add(&own, more, mlen) && buf_add(&own, "}", 1))) ok = 0;
    else if (!read_request(own.data, own.len, &mi) || mi.mem.n < 0 || member_named(own.data, &mi.mem, "model")
             || member_named(own.data, &mi.mem, "messages") || stream_member(&mi.mem)) {
        free(b.data);
        free(own.data);
        return bad_request(L, "EINVAL", "the request's other members must be JSON members besides model, messages"
                           " and stream");
    }
    int n;
    if (ok) {
        ri.max_tokens = mi.max_tokens;
        ri.max_tokens_end = mi.max_tokens_end;
        ri.choices = mi.choices;
        ri.choices_end = mi.choices_end;
        n = begin_call(L, f, OP_CHAT, b.data, b.len, &ri, stream, team, run);
    } else {
        n = bad_request(L, "ENOMEM", "out of memory");
    }
    free(b.data);
    free(own.data);
    return n;
}

/* embeddings(request_json [, team [, run]]) */
static int r_embeddings(lua_State *L) { return start_call(L, OP_EMBED); }

static call *check_stream(lua_State *L) {
    stream_ud *s = (stream_ud *)luaL_checkudata(L, 1, STREAM_MT);
    if (!s->c) luaL_argerror(L, 1, "the stream is closed");
    return s->c;
}

static int stream_read(lua_State *L) {
    call *c = check_stream(L);
    double timeout = luaL_optnumber(L, 2, 0);
    if (c->fiber) return luaL_error(L, "stream:read: another fiber is already reading");
    if (c->head || c->done) return push_chunk(L, c);
    fb_fiber *f = fb_check_current(L, "stream:read");
    c->fiber = f;
    return fb_await(L, f, call_abort, c, timeout);
}

static int stream_close(lua_State *L) {
    stream_ud *s = (stream_ud *)luaL_checkudata(L, 1, STREAM_MT);
    call *c = s->c;
    if (!c) return 0;
    s->c = NULL;
    c->has_handle = 0;
    if (!c->done) {
        c->cancelled = 1;
        set_error(c, "ECANCELED", "the stream was closed");
        finish(c);
    }
    release(c);
    return 0;
}

/* stream:usage() -> prompt_tokens, completion_tokens, reported: the provider's counts
 * if it has sent them (an Anthropic stream does before its content, an OpenAI one in
 * its last chunk), else the router's estimate; once the stream has ended, the counts
 * the call was settled and recorded with. */
static int stream_usage(lua_State *L) {
    call *c = check_stream(L);
    long prompt = c->prompt_tokens, completion = c->completion_tokens;
    if (!c->done) usage_now(c, &prompt, &completion);
    lua_pushinteger(L, prompt);
    lua_pushinteger(L, completion);
    lua_pushboolean(L, c->have_usage);
    return 3;
}

static void push_json(lua_State *L, json_t *o) {
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) luaL_error(L, "router: out of memory");
    lua_pushstring(L, s);
    free(s);
}

/* models() -> JSON text of GET /v1/models */
static int r_models(lua_State *L) {
    json_t *data = json_array();
    for (int i = 0; R.cfg && i < R.cfg->naliases; i++)
        json_array_append_new(data, json_pack("{s:s,s:s,s:i,s:s}", "id", R.cfg->aliases[i].name, "object", "model",
                                              "created", 0, "owned_by", "factory"));
    push_json(L, json_pack("{s:s,s:o}", "object", "list", "data", data));
    return 1;
}

static int r_stats(lua_State *L) {
    json_t *provs = json_object(), *accs = json_object();
    int live = 0;
    for (call *c = R.live; c; c = c->next) live += !c->done;
    for (int i = 0; R.cfg && i < R.cfg->nproviders; i++) {
        provider *p = &R.cfg->providers[i];
        int queued = 0;
        for (call *c = p->qhead; c; c = c->qnext) queued++;
        const char *br = p->failures < R.cfg->breaker_failures ? "closed" : now_s() < p->open_until ? "open" : "half-open";
        json_object_set_new(provs, p->name, json_pack("{s:i,s:i,s:I,s:I,s:s}", "inflight", p->inflight, "queued", queued,
                                                      "requests", (json_int_t)p->requests, "errors",
                                                      (json_int_t)p->errors, "breaker", br));
    }
    for (account *a = R.accounts; a; a = a->next) {
        if (R.cfg) roll_day(R.cfg, a);
        double lu = -1, lt = -1;
        if (R.cfg) limits_of(R.cfg, a, &lu, &lt);
        json_t *o = json_pack("{s:f,s:f,s:f,s:f}", "spent_usd", a->usd, "spent_tokens", a->tokens, "reserved_usd",
                              a->r_usd, "reserved_tokens", a->r_tokens);
        if (lu >= 0) json_object_set_new(o, "limit_usd", json_real(lu));
        if (lt >= 0) json_object_set_new(o, "limit_tokens", json_real(lt));
        json_object_set_new(accs, a->key, o);
    }
    push_json(L, json_pack("{s:i,s:o,s:o}", "calls", live, "providers", provs, "budgets", accs));
    return 1;
}

/* set_budget("team"|"run", name, usd, tokens): nil (or < 0) keeps the configured limit. */
static int r_set_budget(lua_State *L) {
    const char *kind = luaL_checkstring(L, 1), *name = luaL_checkstring(L, 2);
    luaL_argcheck(L, strcmp(kind, "team") == 0 || strcmp(kind, "run") == 0, 1, "\"team\" or \"run\" expected");
    account *a = get_account(kind, name);
    if (!a) return luaL_error(L, "router: out of memory");
    a->lim_usd = luaL_optnumber(L, 3, -1);
    a->lim_tokens = luaL_optnumber(L, 4, -1);
    return 0;
}

/* count_spent("team"|"run", name, usd, tokens): spending this process did not see
 * (the store's record of today's calls, when it starts) counts, unless the account
 * has counted more already, so a restarted process grants no fresh day and counting
 * again is harmless. */
static int r_count_spent(lua_State *L) {
    const char *kind = luaL_checkstring(L, 1), *name = luaL_checkstring(L, 2);
    luaL_argcheck(L, strcmp(kind, "team") == 0 || strcmp(kind, "run") == 0, 1, "\"team\" or \"run\" expected");
    account *a = get_account(kind, name);
    if (!a) return luaL_error(L, "router: out of memory");
    roll_day(zone(), a);
    a->usd = fmax(a->usd, luaL_optnumber(L, 3, 0));
    a->tokens = fmax(a->tokens, luaL_optnumber(L, 4, 0));
    return 0;
}

static int r_prompt_tokens(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    lua_pushnumber(L, prompt_estimate(text, len));
    return 1;
}

static int r_day_start(lua_State *L) {
    lua_pushnumber(L, day_start(zone()));
    return 1;
}

/* clear_budget("team"|"run", name) */
static int r_clear_budget(lua_State *L) {
    const char *kind = luaL_checkstring(L, 1), *name = luaL_checkstring(L, 2);
    luaL_argcheck(L, strcmp(kind, "team") == 0 || strcmp(kind, "run") == 0, 1, "\"team\" or \"run\" expected");
    clear_account(kind, name);
    return 0;
}

static int r_record(lua_State *L) {
    R.recording = lua_toboolean(L, 1);
    return 0;
}

static void set_string(lua_State *L, const char *k, const char *v) {
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void set_number(lua_State *L, const char *k, double v) {
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void push_attempt(lua_State *L, const attempt_rec *a) {
    lua_createtable(L, 0, 7);
    set_string(L, "provider", a->provider);
    set_string(L, "model", a->model);
    if (a->status) set_number(L, "status", (double)a->status);
    if (a->has_code) set_string(L, "code", a->code);
    set_string(L, "outcome", a->outcome);
    if (a->latency_ms >= 0) set_number(L, "latency_ms", a->latency_ms);
    if (a->retry_after_s >= 0) set_number(L, "retry_after_s", a->retry_after_s);
}

static void push_record_table(lua_State *L, const record *r) {
    lua_createtable(L, 0, 16);
    set_string(L, "kind", r->op == OP_CHAT ? "chat" : "embeddings");
    set_string(L, "alias", r->alias);
    set_string(L, "provider", r->provider);
    set_string(L, "model", r->model);
    if (r->team) set_string(L, "team", r->team);
    if (r->run) set_string(L, "run", r->run);
    lua_pushboolean(L, r->stream);
    lua_setfield(L, -2, "stream");
    set_number(L, "prompt_tokens", (double)r->prompt_tokens);
    set_number(L, "completion_tokens", (double)r->completion_tokens);
    set_number(L, "cost_usd", r->cost_usd);
    set_number(L, "latency_ms", r->latency_ms);
    if (r->first_token_ms >= 0) set_number(L, "first_token_ms", r->first_token_ms);
    if (r->hold > 0) set_number(L, "hold", r->hold);
    set_string(L, "status", r->status);
    if (r->error) {
        set_string(L, "code", r->code);
        set_string(L, "error", r->error);
    }
    lua_createtable(L, r->nattempts, 0);
    for (int i = 0; i < r->nattempts; i++) {
        push_attempt(L, &r->attempts[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "attempts");
}

/* records() -> the records of the calls that ended since the last call, as a list
 * of tables (none: nothing). The list is taken first: a record is freed once its
 * table is built. */
static int r_records(lua_State *L) {
    record *r = R.rhead;
    if (!r) return 0;
    R.rhead = R.rtail = NULL;
    lua_newtable(L);
    for (int n = 1; r; n++) {
        record *next = r->next;
        push_record_table(L, r);
        lua_rawseti(L, -2, n);
        free_record(r);
        r = next;
    }
    return 1;
}

/* stop(reason) -> n: the process is about to end (factory run's Ctrl-C): each of the n
 * calls in flight ends now, cancelled, and is recorded and charged as when its caller
 * goes away (its prompt, if the provider had the request). The fibers waiting for
 * them are not woken, nor are those that start a call afterwards: acting on an error
 * they would write what the run did not do (an escalation, a failed stage) in the
 * moment before the process ends. */
static int r_stop(lua_State *L) {
    const char *reason = luaL_checkstring(L, 1);
    R.stopping = 1;
    int n = 0;
    call *next;
    for (call *c = R.live; c; c = next) {
        next = c->next;
        if (c->done) continue;
        c->cancelled = 1;
        set_error(c, "ECANCELED", "%s", reason);
        finish(c);
        n++;
    }
    lua_pushinteger(L, n);
    return 1;
}

/* lua_close: stop every transfer and timer; the calls go with their owners. */
static int r_gc(lua_State *L) {
    R.closed = 1;
    for (call *c = R.live; c; c = c->next) {
        if (c->http) hc_cancel(c->http);
        c->http = NULL;
        c->nacc = 0;    /* the accounts go now */
        uv_timer_stop(&c->timer);
        c->timer_kind = T_NONE;
    }
    cfg_unref(R.cfg);
    R.cfg = NULL;
    free_accounts(R.accounts);
    free_accounts(R.cleared);
    R.accounts = R.cleared = NULL;
    while (R.rhead) {
        record *r = R.rhead;
        R.rhead = r->next;
        free_record(r);
    }
    R.rtail = NULL;
    return 0;
}

/* Takes the call from its pending handle: it belongs to whoever acts on it now. */
static call *take_pending(lua_State *L) {
    pending_ud *p = (pending_ud *)luaL_checkudata(L, 1, PENDING_MT);
    call *c = p->c;
    if (!c) luaL_argerror(L, 1, "the call was sent or refused already");
    p->c = NULL;
    c->has_handle = 0;
    return c;
}

/* pending:send([hold]) -> as chat(): the ledger confirmed the call; hold (its id in the
 * store) goes into the call's record, whose writing lets the hold go. */
static int pending_send(lua_State *L) {
    fb_fiber *f = fb_check_current(L, "router: a held call");
    call *c = take_pending(L);
    c->hold = luaL_optnumber(L, 2, 0);
    if (c->done) {  /* stopped while the ledger was asked */
        int n = R.stopping ? fb_await(L, f, never_woken, NULL, 0) : push_err(L, c);
        release(c);
        return n;
    }
    next_target(c);
    if (c->done) return push_err(L, c);     /* every provider's circuit is open */
    c->fiber = f;
    return fb_await(L, f, call_abort, c, 0);
}

/* pending:refuse(code, message) -> nil, message, code: the ledger said no (or could
 * not be asked); the call ends unsent, recorded with that error. */
static int pending_refuse(lua_State *L) {
    const char *code = luaL_checkstring(L, 2), *msg = luaL_checkstring(L, 3);
    fb_fiber *f = fb_check_current(L, "router: a held call");
    call *c = take_pending(L);
    if (c->done) {  /* stopped while the ledger was asked */
        int n = R.stopping ? fb_await(L, f, never_woken, NULL, 0) : push_err(L, c);
        release(c);
        return n;
    }
    set_error(c, code, "%s", msg);
    finish(c);
    return push_err(L, c);
}

/* A pending call nobody sent or refused (its fiber was cancelled while the ledger
 * was asked) ends unsent. */
static int pending_gc(lua_State *L) {
    pending_ud *p = (pending_ud *)luaL_checkudata(L, 1, PENDING_MT);
    call *c = p->c;
    if (!c) return 0;
    p->c = NULL;
    c->has_handle = 0;
    if (!c->done) {
        c->cancelled = 1;
        set_error(c, "ECANCELED", "the call was never sent: its caller went away");
        finish(c);
    }
    release(c);
    return 0;
}

static const luaL_Reg pending_methods[] = {
    {"send", pending_send},
    {"refuse", pending_refuse},
    {NULL, NULL},
};

/* live_holds() -> { hold, ... }: the ledger's holds of the calls still in flight, which
 * their process keeps from expiring. */
static int r_live_holds(lua_State *L) {
    lua_newtable(L);
    int n = 0;
    for (call *c = R.live; c; c = c->next) {
        if (c->done || c->hold <= 0) continue;
        lua_pushnumber(L, c->hold);
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

/* ledger(on): whether calls of a team with a budget wait for the ledger (factory.budgets). */
static int r_ledger(lua_State *L) {
    R.ledger = lua_toboolean(L, 1);
    return 0;
}

static const luaL_Reg stream_methods[] = {
    {"read", stream_read},
    {"close", stream_close},
    {"usage", stream_usage},
    {NULL, NULL},
};

static const luaL_Reg router_functions[] = {
    {"configure", r_configure},
    {"chat", r_chat},
    {"chat_parts", r_chat_parts},
    {"embeddings", r_embeddings},
    {"models", r_models},
    {"stats", r_stats},
    {"set_budget", r_set_budget},
    {"clear_budget", r_clear_budget},
    {"count_spent", r_count_spent},
    {"day_start", r_day_start},
    {"prompt_tokens", r_prompt_tokens},
    {"record", r_record},
    {"records", r_records},
    {"stop", r_stop},
    {"ledger", r_ledger},
    {"live_holds", r_live_holds},
    {NULL, NULL},
};

int luaopen_factory_core_router(lua_State *L) {
    /* The HTTP client's module owns curl's global state and its teardown. */
    lua_getglobal(L, "require");
    lua_pushliteral(L, "factory.core.http_client");
    lua_call(L, 1, 0);
    if (luaL_newmetatable(L, STATE_MT)) {      /* a new Lua state: a fresh start */
        memset(&R, 0, sizeof R);
        lua_pushcfunction(L, r_gc);
        lua_setfield(L, -2, "__gc");
        lua_newuserdata(L, 1);
        lua_pushvalue(L, -2);
        lua_setmetatable(L, -2);
        luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, STREAM_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, stream_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, stream_close);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, PENDING_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, pending_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, pending_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, router_functions);
    return 1;
}
