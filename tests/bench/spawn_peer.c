/* tests/bench/spawn_peer.c — the reference points for bench_spawn.sh.
 *
 *   spawn_peer posix N CONC [MB]   posix_spawn + waitpid, CONC children in flight
 *   spawn_peer uv N CONC [MB]      libuv's uv_spawn on its loop, CONC in flight
 *
 * Each runs /bin/true N times and prints processes per second. MB allocates and
 * touches that many MiB first: fork (uv_spawn in libuv 1.44) copies the page
 * tables of all of it for every child; posix_spawn (CLONE_VM|CLONE_VFORK) does not.
 */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <uv.h>

static char *child_argv[] = {"/bin/true", NULL};
static char *child_env[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", NULL};
static int total, started, finished, failed;
static char *volatile ballast;   /* kept reachable so the compiler keeps the pages */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void run_posix(int conc) {
    int in_flight = 0;
    while (finished < total) {
        while (in_flight < conc && started < total) {
            pid_t pid;
            if (posix_spawn(&pid, child_argv[0], NULL, NULL, child_argv, child_env) != 0) {
                perror("posix_spawn");
                exit(1);
            }
            started++;
            in_flight++;
        }
        int status;
        if (waitpid(-1, &status, 0) < 0) {
            perror("waitpid");
            exit(1);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
        in_flight--;
        finished++;
    }
}

static void start_uv(uv_loop_t *loop);

static void on_closed(uv_handle_t *h) { free(h); }

static void on_exit_uv(uv_process_t *h, int64_t status, int sig) {
    if (status != 0 || sig != 0) failed++;
    finished++;
    uv_close((uv_handle_t *)h, on_closed);
    start_uv(h->loop);
}

static void start_uv(uv_loop_t *loop) {
    if (started >= total) return;
    uv_stdio_container_t stdio[3] = {{.flags = UV_IGNORE}, {.flags = UV_IGNORE}, {.flags = UV_IGNORE}};
    uv_process_options_t opts;
    memset(&opts, 0, sizeof opts);
    opts.file = child_argv[0];
    opts.args = child_argv;
    opts.env = child_env;
    opts.exit_cb = on_exit_uv;
    opts.stdio = stdio;
    opts.stdio_count = 3;
    uv_process_t *h = malloc(sizeof *h);
    int rc = uv_spawn(loop, h, &opts);
    if (rc) {
        fprintf(stderr, "uv_spawn: %s\n", uv_strerror(rc));
        exit(1);
    }
    started++;
}

int main(int argc, char **argv) {
    if (argc < 4 || (strcmp(argv[1], "posix") && strcmp(argv[1], "uv"))) {
        fprintf(stderr, "usage: spawn_peer posix|uv N CONC [MB]\n");
        return 2;
    }
    total = atoi(argv[2]);
    int conc = atoi(argv[3]);
    size_t mb = argc > 4 ? (size_t)atol(argv[4]) : 0;
    if (mb) {
        ballast = malloc(mb << 20);
        if (!ballast) {
            fprintf(stderr, "cannot allocate %zu MiB\n", mb);
            return 1;
        }
        memset(ballast, 1, mb << 20);
    }
    double t0 = now();
    if (strcmp(argv[1], "posix") == 0) {
        run_posix(conc);
    } else {
        uv_loop_t *loop = uv_default_loop();
        for (int i = 0; i < conc; i++) start_uv(loop);
        uv_run(loop, UV_RUN_DEFAULT);
    }
    double dt = now() - t0;
    if (failed) {
        fprintf(stderr, "%d of %d children failed\n", failed, total);
        return 1;
    }
    printf("%.0f\n", total / dt);
    return 0;
}
