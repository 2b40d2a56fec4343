/* core/fs.c — factory.core.fs: files and directories, and a directory watcher.
 *
 * Every operation is a job of plain POSIX calls. Inside a fiber the job runs on
 * libuv's thread pool and the fiber waits; outside one (start-up code, `factory
 * check`) it runs inline, so the same module serves both. A job owns copies of its
 * inputs (the fiber may be gone when it finishes) and is freed where it ends: by the
 * caller when inline, by the after-work callback otherwise, which delivers nothing
 * to a fiber that gave up.
 *
 * Failures: nil, "ENOENT: no such file or directory: PATH", "ENOENT".
 *
 * list(path, true) also returns each entry's type ("file", "directory", "link",
 * "other") from the directory itself, sparing a stat per entry. read_many(paths,
 * max) reads many files in one job: each result is the file's bytes, or false for
 * what is no regular file (links are not followed), is larger than max bytes or
 * cannot be read; a search over a tree pays one pool round trip per batch of files
 * instead of two per file.
 *
 * read_beneath / write_beneath confine a relative path to a root directory in the
 * kernel (openat2 with RESOLVE_BENEATH): `..`, absolute paths and symbolic links
 * that would leave the root fail with EXDEV, whatever is swapped in between a
 * check and the use. Agent file tools go through these.
 *
 * set_topdir marks a directory whose subdirectories are unrelated trees (worktrees):
 * ext2/3/4 then place each subdirectory in a block group of its own rather than
 * next to its siblings. Without a journal, ext4 skips every inode freed in the last
 * half minute when it allocates one in a group, so trees made and removed in turn
 * in one group make each new file slower than the last.
 */
#include "fiber.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define WATCHER_MT "factory.watcher"

enum { OP_READ, OP_WRITE, OP_APPEND, OP_LIST, OP_STAT, OP_EXISTS, OP_MKDIR_P, OP_REMOVE, OP_RENAME, OP_REALPATH,
       OP_READ_BENEATH, OP_WRITE_BENEATH, OP_SET_TOPDIR, OP_READ_MANY };

typedef struct {
    uv_work_t req;
    fb_fiber *fiber;        /* waiting for the result; NULL inline or once abandoned */
    int op;
    int flag;               /* stat: follow links; remove: recursive; write_beneath: parents */
    unsigned mode;          /* mkdir_p */
    char *path, *path2;     /* rename: from, to; *_beneath: root, relative path */
    char *buf;              /* data to write, bytes read, or the resolved path */
    size_t len;
    char **names;           /* list: each name behind its type's letter; read_many: the paths */
    size_t nnames;
    char **bufs;            /* read_many: each file's bytes, or NULL */
    size_t *lens;
    struct stat st;
    int found;
    int err;                /* errno of the failure, 0 on success */
    char *errpath;          /* what the failure concerns when it is not path */
} fs_job;

/* ---- errors -------------------------------------------------------------- */

/* Not fb_push_error: its fixed-size buffer would cut long paths. */
static int fs_push_error(lua_State *L, int uverr, const char *what) {
    char name[64], msg[256];
    uv_err_name_r(uverr, name, sizeof name);
    uv_strerror_r(uverr, msg, sizeof msg);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s: %s", name, msg, what);
    lua_pushstring(L, name);
    return 3;
}

/* Records errno as the job's failure, concerning `what` (default: the job's path),
 * unless an earlier failure is already recorded: that one is the cause. Returns -1. */
static int fs_fail(fs_job *j, const char *what) {
    if (j->err) return -1;
    j->err = errno ? errno : EIO;
    if (what) j->errpath = strdup(what);
    return -1;
}

/* ---- the jobs (run on a worker thread: no Lua here) ----------------------- */

static char *fs_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static int fs_write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads to EOF rather than trusting st_size, which is wrong for growing files and
 * for /proc. */
static void fs_read_fd(fs_job *j, int fd) {
    struct stat st;
    size_t cap = (fstat(fd, &st) == 0 && st.st_size > 0) ? (size_t)st.st_size + 1 : 4096;
    j->buf = malloc(cap);
    j->len = 0;
    while (j->buf) {
        if (j->len == cap) {
            char *nb = realloc(j->buf, cap * 2);
            if (!nb) break;
            j->buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, j->buf + j->len, cap - j->len);
        if (r == 0) break;
        if (r < 0) {
            if (errno == EINTR) continue;
            fs_fail(j, NULL);
            break;
        }
        j->len += (size_t)r;
    }
    if (!j->err && (!j->buf || j->len == cap)) {
        errno = ENOMEM;
        fs_fail(j, NULL);
    }
    close(fd);
}

static void fs_do_read(fs_job *j) {
    int fd = open(j->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) fs_fail(j, NULL);
    else fs_read_fd(j, fd);
}

static atomic_uint fs_tmp_seq;

/* Atomic replace of base in the directory dirfd (opened O_RDONLY): readers see the
 * old file or the new one, never a mix, and after a crash the file is one or the
 * other (fsync the data, then the directory). The new file keeps the old one's
 * permissions; a symlink named base is replaced by the file, not followed. `shown`
 * names the file in errors. */
static void fs_write_at(fs_job *j, int dirfd, const char *base, const char *shown) {
    size_t tmpcap = strlen(base) + 48;
    char *tmp = malloc(tmpcap);
    if (!tmp) {
        errno = ENOMEM;
        fs_fail(j, shown);
        return;
    }
    int fd = -1;
    for (int tries = 0; fd < 0 && tries < 100; tries++) {
        snprintf(tmp, tmpcap, ".%s.tmp-%ld-%u", base, (long)getpid(), atomic_fetch_add(&fs_tmp_seq, 1));
        fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) {
        fs_fail(j, shown);
        free(tmp);
        return;
    }
    struct stat old;
    if (fstatat(dirfd, base, &old, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(old.st_mode)) fchmod(fd, old.st_mode & 07777);
    if (fs_write_all(fd, j->buf, j->len) != 0 || fsync(fd) != 0) fs_fail(j, shown);
    if (close(fd) != 0) fs_fail(j, shown);
    if (!j->err && renameat(dirfd, tmp, dirfd, base) != 0) fs_fail(j, shown);
    if (j->err) unlinkat(dirfd, tmp, 0);
    free(tmp);
    /* Some file systems cannot fsync a directory (EINVAL); the rename stands. */
    if (!j->err && fsync(dirfd) != 0 && errno != EINVAL) fs_fail(j, shown);
}

static void fs_do_write(fs_job *j) {
    const char *slash = strrchr(j->path, '/');
    char *dir = slash ? strndup(j->path, (size_t)(slash - j->path) + 1) : strdup(".");
    int dfd = dir ? open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    if (dfd < 0) fs_fail(j, j->path);
    else {
        fs_write_at(j, dfd, slash ? slash + 1 : j->path, j->path);
        close(dfd);
    }
    free(dir);
}

/* ---- confined to a root (openat2) ------------------------------------------ */

static int fs_openat2(int dirfd, const char *path, int flags) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (unsigned long long)(flags | O_CLOEXEC);
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

static void fs_do_read_beneath(fs_job *j) {
    int root = open(j->path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) {
        fs_fail(j, j->path);
        return;
    }
    int fd = fs_openat2(root, j->path2, O_RDONLY);
    close(root);
    struct stat st;
    if (fd < 0) fs_fail(j, j->path2);
    else if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        close(fd);
        errno = EISDIR;
        fs_fail(j, j->path2);
    } else fs_read_fd(j, fd);
}

/* mkdir -p of the relative directory dir beneath root, one level at a time: each
 * level is made in its parent as opened beneath the root. dir is restored. */
static void fs_mkdirs_beneath(fs_job *j, int root, char *dir) {
    size_t n = strlen(dir);
    for (size_t i = 0; i <= n && !j->err; i++) {
        if (dir[i] != '/' && dir[i] != '\0') continue;
        char saved = dir[i];
        dir[i] = '\0';
        char *cut = strrchr(dir, '/');
        const char *name = cut ? cut + 1 : dir;
        if (cut) *cut = '\0';
        /* An absolute dir has "/" as its first parent: openat2 refuses it (EXDEV). */
        int pfd = fs_openat2(root, cut ? (cut == dir ? "/" : dir) : ".", O_PATH | O_DIRECTORY);
        if (cut) *cut = '/';
        if (pfd < 0) fs_fail(j, dir);
        else {
            if (*name && strcmp(name, ".") && strcmp(name, "..") && mkdirat(pfd, name, 0777) != 0 && errno != EEXIST)
                fs_fail(j, dir);
            close(pfd);
        }
        dir[i] = saved;
    }
}

/* Each directory above the file is created (with parents) one level at a time, the
 * level opened beneath the root before the next is made in it. */
static void fs_do_write_beneath(fs_job *j) {
    const char *rel = j->path2, *slash = strrchr(rel, '/');
    const char *base = slash ? slash + 1 : rel;
    if (!*base || !strcmp(base, ".") || !strcmp(base, "..")) {
        errno = EISDIR;
        fs_fail(j, rel);
        return;
    }
    int root = open(j->path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) {
        fs_fail(j, j->path);
        return;
    }
    char *dir = slash ? strndup(rel, (size_t)(slash - rel)) : strdup(".");
    if (!dir) {
        close(root);
        errno = ENOMEM;
        fs_fail(j, rel);
        return;
    }
    if (j->flag && slash) fs_mkdirs_beneath(j, root, dir);
    int dfd = j->err ? -1 : fs_openat2(root, dir, O_RDONLY | O_DIRECTORY);
    if (!j->err && dfd < 0) fs_fail(j, rel);
    close(root);
    free(dir);
    if (dfd < 0) return;
    fs_write_at(j, dfd, base, rel);
    close(dfd);
}

/* A filesystem without inode flags (tmpfs, overlayfs...) answers ENOTTY: reported
 * as ENOTSUP, which callers treat as "nothing to do here". */
static void fs_do_set_topdir(fs_job *j) {
    int fd = open(j->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        fs_fail(j, NULL);
        return;
    }
    int flags = 0;
    int rc = ioctl(fd, FS_IOC_GETFLAGS, &flags);
    if (rc == 0 && !(flags & FS_TOPDIR_FL)) {
        flags |= FS_TOPDIR_FL;
        rc = ioctl(fd, FS_IOC_SETFLAGS, &flags);
    }
    if (rc != 0) {
        if (errno == ENOTTY || errno == EINVAL) errno = ENOTSUP;
        fs_fail(j, NULL);
    }
    close(fd);
}

static void fs_do_append(fs_job *j) {
    int fd = open(j->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        fs_fail(j, NULL);
        return;
    }
    if (fs_write_all(fd, j->buf, j->len) != 0) fs_fail(j, NULL);
    if (close(fd) != 0) fs_fail(j, NULL);
}

static int fs_name_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A listing's entries sort by the name behind their type's letter. */
static int fs_entry_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a + 1, *(char *const *)b + 1);
}

/* 'f'ile, 'd'irectory, 'l'ink or 'o'ther; the directory's word for it when it has
 * one, else lstat's. */
static char fs_entry_type(int dirfd, const struct dirent *e) {
    switch (e->d_type) {
    case DT_REG: return 'f';
    case DT_DIR: return 'd';
    case DT_LNK: return 'l';
    case DT_UNKNOWN: break;
    default: return 'o';
    }
    struct stat st;
    if (fstatat(dirfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) return 'o';
    return S_ISREG(st.st_mode) ? 'f' : S_ISDIR(st.st_mode) ? 'd' : S_ISLNK(st.st_mode) ? 'l' : 'o';
}

static void fs_do_list(fs_job *j) {
    DIR *d = opendir(j->path);
    if (!d) {
        fs_fail(j, NULL);
        return;
    }
    size_t cap = 0;
    struct dirent *e;
    for (errno = 0; (e = readdir(d)); errno = 0) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (j->nnames == cap) {
            cap = cap ? cap * 2 : 16;
            char **nn = realloc(j->names, cap * sizeof *nn);
            if (!nn) break;
            j->names = nn;
        }
        size_t n = strlen(e->d_name);
        char *entry = malloc(n + 2);
        if (!entry) break;
        entry[0] = j->flag ? fs_entry_type(dirfd(d), e) : 'o';
        memcpy(entry + 1, e->d_name, n + 1);
        j->names[j->nnames++] = entry;
    }
    if (errno) fs_fail(j, NULL);
    closedir(d);
    if (j->nnames) qsort(j->names, j->nnames, sizeof *j->names, fs_entry_cmp);
}

/* One file of read_many: its bytes, or NULL for what it leaves out. */
static char *fs_read_one(const char *path, size_t max, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) return NULL;
    struct stat st;
    char *buf = NULL;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (size_t)st.st_size <= max &&
        (buf = malloc((size_t)st.st_size + 1))) {
        size_t got = 0, want = (size_t)st.st_size + 1;  /* one more: a file that grew is left out */
        int failed = 0;
        while (got < want) {
            ssize_t r = read(fd, buf + got, want - got);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) failed = 1;
            if (r <= 0) break;
            got += (size_t)r;
        }
        if (failed || got > (size_t)st.st_size) {
            free(buf);
            buf = NULL;
        }
        *len = got;
    }
    close(fd);
    return buf;
}

static void fs_do_read_many(fs_job *j) {
    j->bufs = calloc(j->nnames ? j->nnames : 1, sizeof *j->bufs);
    j->lens = calloc(j->nnames ? j->nnames : 1, sizeof *j->lens);
    if (!j->bufs || !j->lens) {
        errno = ENOMEM;
        fs_fail(j, NULL);
        return;
    }
    for (size_t i = 0; i < j->nnames; i++) j->bufs[i] = fs_read_one(j->names[i], j->len, &j->lens[i]);
}

static void fs_do_exists(fs_job *j) {
    if (lstat(j->path, &j->st) == 0) j->found = 1;
    else if (errno != ENOENT && errno != ENOTDIR) fs_fail(j, NULL);
}

static void fs_do_mkdir_p(fs_job *j) {
    char *p = j->path;
    for (char *s = strchr(p + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = '\0';
        int rc = mkdir(p, (mode_t)j->mode);
        if (rc != 0 && errno != EEXIST) fs_fail(j, p);
        *s = '/';
        if (j->err) return;
    }
    if (mkdir(p, (mode_t)j->mode) == 0) return;
    struct stat st;
    if (errno != EEXIST) fs_fail(j, NULL);
    else if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode)) errno = ENOTDIR, fs_fail(j, NULL);
}

/* Removes name (relative to dirfd) and everything under it. Directories are opened
 * with O_NOFOLLOW and entries examined with lstat semantics, so a symlink is removed
 * as a link and what it points to is never touched. `full` names it in errors. */
static int fs_remove_at(fs_job *j, int dirfd, const char *name, const char *full) {
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return fs_fail(j, full);
    if (!S_ISDIR(st.st_mode)) return unlinkat(dirfd, name, 0) == 0 ? 0 : fs_fail(j, full);
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return fs_fail(j, full);
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return fs_fail(j, full);
    }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (errno = 0, e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *child = fs_join(full, e->d_name);
        if (!child) {
            errno = ENOMEM;
            rc = fs_fail(j, full);
            break;
        }
        rc = fs_remove_at(j, fd, e->d_name, child);
        free(child);
    }
    if (rc == 0 && errno) rc = fs_fail(j, full);
    closedir(d);
    if (rc == 0 && unlinkat(dirfd, name, AT_REMOVEDIR) != 0) rc = fs_fail(j, full);
    return rc;
}

static void fs_do_remove(fs_job *j) {
    if (j->flag) {
        fs_remove_at(j, AT_FDCWD, j->path, j->path);
        return;
    }
    struct stat st;
    if (lstat(j->path, &st) != 0) fs_fail(j, NULL);
    else if ((S_ISDIR(st.st_mode) ? rmdir(j->path) : unlink(j->path)) != 0) fs_fail(j, NULL);
}

static void fs_job_run(fs_job *j) {
    switch (j->op) {
    case OP_READ: fs_do_read(j); break;
    case OP_WRITE: fs_do_write(j); break;
    case OP_APPEND: fs_do_append(j); break;
    case OP_LIST: fs_do_list(j); break;
    case OP_STAT:
        if ((j->flag ? stat(j->path, &j->st) : lstat(j->path, &j->st)) != 0) fs_fail(j, NULL);
        break;
    case OP_EXISTS: fs_do_exists(j); break;
    case OP_MKDIR_P: fs_do_mkdir_p(j); break;
    case OP_REMOVE: fs_do_remove(j); break;
    case OP_RENAME:
        if (rename(j->path, j->path2) != 0) {
            fs_fail(j, NULL);
            size_t n = strlen(j->path) + strlen(j->path2) + 5;
            if ((j->errpath = malloc(n))) snprintf(j->errpath, n, "%s -> %s", j->path, j->path2);
        }
        break;
    case OP_REALPATH:
        if (!(j->buf = realpath(j->path, NULL))) fs_fail(j, NULL);
        else j->len = strlen(j->buf);
        break;
    case OP_READ_BENEATH: fs_do_read_beneath(j); break;
    case OP_WRITE_BENEATH: fs_do_write_beneath(j); break;
    case OP_SET_TOPDIR: fs_do_set_topdir(j); break;
    case OP_READ_MANY: fs_do_read_many(j); break;
    }
}

/* ---- running a job -------------------------------------------------------- */

static void fs_job_free(fs_job *j) {
    for (size_t i = 0; i < j->nnames; i++) {
        free(j->names[i]);
        if (j->bufs) free(j->bufs[i]);
    }
    free(j->names);
    free(j->bufs);
    free(j->lens);
    free(j->path);
    free(j->path2);
    free(j->buf);
    free(j->errpath);
    free(j);
}

static const char *fs_type_name(mode_t m) {
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "directory";
    if (S_ISLNK(m)) return "link";
    return "other";
}

/* Pushes the job's results (or its failure) onto L. */
static int fs_job_push(lua_State *L, fs_job *j) {
    if (j->err) return fs_push_error(L, uv_translate_sys_error(j->err), j->errpath ? j->errpath : j->path);
    switch (j->op) {
    case OP_READ:
    case OP_READ_BENEATH:
    case OP_REALPATH:
        lua_pushlstring(L, j->buf, j->len);
        break;
    case OP_LIST:
        lua_createtable(L, (int)j->nnames, 0);
        for (size_t i = 0; i < j->nnames; i++) {
            lua_pushstring(L, j->names[i] + 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        if (!j->flag) break;
        lua_createtable(L, (int)j->nnames, 0);
        for (size_t i = 0; i < j->nnames; i++) {
            char t = j->names[i][0];
            lua_pushstring(L, t == 'f' ? "file" : t == 'd' ? "directory" : t == 'l' ? "link" : "other");
            lua_rawseti(L, -2, (int)i + 1);
        }
        return 2;
    case OP_READ_MANY:
        lua_createtable(L, (int)j->nnames, 0);
        for (size_t i = 0; i < j->nnames; i++) {
            if (j->bufs[i]) lua_pushlstring(L, j->bufs[i], j->lens[i]);
            else lua_pushboolean(L, 0);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    case OP_STAT:
        lua_createtable(L, 0, 4);
        lua_pushstring(L, fs_type_name(j->st.st_mode));
        lua_setfield(L, -2, "type");
        lua_pushnumber(L, (lua_Number)j->st.st_size);
        lua_setfield(L, -2, "size");
        lua_pushnumber(L, (lua_Number)j->st.st_mtim.tv_sec + (lua_Number)j->st.st_mtim.tv_nsec / 1e9);
        lua_setfield(L, -2, "mtime");
        lua_pushinteger(L, (lua_Integer)(j->st.st_mode & 07777));
        lua_setfield(L, -2, "mode");
        break;
    case OP_EXISTS:
        lua_pushboolean(L, j->found);
        break;
    default:
        lua_pushboolean(L, 1);
        break;
    }
    return 1;
}

static void fs_work_cb(uv_work_t *req) { fs_job_run((fs_job *)req->data); }

static void fs_after_cb(uv_work_t *req, int status) {
    fs_job *j = (fs_job *)req->data;
    fb_fiber *f = j->fiber;
    if (!f) {
        fs_job_free(j);
        return;
    }
    lua_State *co = fb_co(f);
    lua_checkstack(co, 4);
    int n = status < 0 ? fs_push_error(co, status, j->path) : fs_job_push(co, j);
    fs_job_free(j);
    fb_wake(f, n);
}

static void fs_job_abort(void *op) { ((fs_job *)op)->fiber = NULL; }

/* Runs j inline outside a fiber, on the thread pool inside one; frees j. */
static int fs_job_start(lua_State *L, fs_job *j) {
    fb_fiber *f = fb_current(L);
    j->req.data = j;
    if (f && !fb_closing()) {
        j->fiber = f;
        if (uv_queue_work(fb_loop(), &j->req, fs_work_cb, fs_after_cb) == 0)
            return fb_await(L, f, fs_job_abort, j, 0);
        j->fiber = NULL;
    }
    fs_job_run(j);
    int n = fs_job_push(L, j);
    fs_job_free(j);
    return n;
}

static const char *fs_check_path(lua_State *L, int idx) {
    size_t len;
    const char *p = luaL_checklstring(L, idx, &len);
    if (len == 0) luaL_argerror(L, idx, "empty path");
    if (strlen(p) != len) luaL_argerror(L, idx, "path contains a NUL byte");
    return p;
}

/* A job for op on the path at argument 1. Raises, allocating nothing, on a bad
 * path or out of memory. */
static fs_job *fs_job_new(lua_State *L, int op) {
    const char *path = fs_check_path(L, 1);
    fs_job *j = calloc(1, sizeof *j);
    if (j && !(j->path = strdup(path))) {
        free(j);
        j = NULL;
    }
    if (!j) luaL_error(L, "fs: out of memory");
    j->op = op;
    return j;
}

/* ---- Lua functions ---------------------------------------------------------- */

static int fs_read(lua_State *L) { return fs_job_start(L, fs_job_new(L, OP_READ)); }
static int fs_list(lua_State *L) {
    int types = lua_toboolean(L, 2);
    fs_job *j = fs_job_new(L, OP_LIST);
    j->flag = types;
    return fs_job_start(L, j);
}
static int fs_exists(lua_State *L) { return fs_job_start(L, fs_job_new(L, OP_EXISTS)); }
static int fs_realpath(lua_State *L) { return fs_job_start(L, fs_job_new(L, OP_REALPATH)); }
static int fs_set_topdir(lua_State *L) { return fs_job_start(L, fs_job_new(L, OP_SET_TOPDIR)); }

/* Arguments are checked before anything is allocated: a raise must not leak. */
static int fs_put(lua_State *L, int op) {
    fs_check_path(L, 1);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    fs_job *j = fs_job_new(L, op);
    if (!(j->buf = malloc(len ? len : 1))) {
        fs_job_free(j);
        return luaL_error(L, "fs: out of memory");
    }
    memcpy(j->buf, data, len);
    j->len = len;
    return fs_job_start(L, j);
}

static int fs_write(lua_State *L) { return fs_put(L, OP_WRITE); }
static int fs_append(lua_State *L) { return fs_put(L, OP_APPEND); }

#define READ_MANY_MAX 4096    /* paths in one job */

static int fs_read_many(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Number max = luaL_checknumber(L, 2);
    size_t n = lua_objlen(L, 1);
    if (n > READ_MANY_MAX) return luaL_argerror(L, 1, "more than 4096 paths");
    if (!(max >= 0)) return luaL_argerror(L, 2, "expected a size in bytes");
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, (int)i);
        size_t len;
        const char *p = lua_tolstring(L, -1, &len);
        if (!p || len == 0 || strlen(p) != len) return luaL_argerror(L, 1, "expected a list of paths");
        lua_pop(L, 1);
    }
    fs_job *j = calloc(1, sizeof *j);
    if (j) j->names = calloc(n ? n : 1, sizeof *j->names);
    for (size_t i = 0; j && j->names && i < n; i++) {
        lua_rawgeti(L, 1, (int)i + 1);
        j->names[i] = strdup(lua_tostring(L, -1));
        lua_pop(L, 1);
        if (!j->names[i]) break;
        j->nnames = i + 1;
    }
    if (!j || !j->names || j->nnames != n || !(j->path = strdup("(read_many)"))) {
        if (j) fs_job_free(j);
        return luaL_error(L, "fs: out of memory");
    }
    j->op = OP_READ_MANY;
    j->len = max >= (lua_Number)SIZE_MAX ? SIZE_MAX : (size_t)max;
    return fs_job_start(L, j);
}

static int fs_stat(lua_State *L) {
    int follow = lua_toboolean(L, 2);
    fs_job *j = fs_job_new(L, OP_STAT);
    j->flag = follow;
    return fs_job_start(L, j);
}

static int fs_mkdir_p(lua_State *L) {
    lua_Integer mode = luaL_optinteger(L, 2, 0777);
    luaL_argcheck(L, mode >= 0 && mode <= 07777, 2, "mode must be between 0 and 07777");
    fs_job *j = fs_job_new(L, OP_MKDIR_P);
    j->mode = (unsigned)mode;
    return fs_job_start(L, j);
}

static int fs_remove(lua_State *L) {
    int recursive = 0;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "recursive");
        recursive = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    fs_job *j = fs_job_new(L, OP_REMOVE);
    j->flag = recursive;
    return fs_job_start(L, j);
}

/* read_beneath(root, relpath), write_beneath(root, relpath, data [, {parents = true}]) */
static fs_job *fs_beneath_job(lua_State *L, int op) {
    fs_check_path(L, 1);
    const char *rel = fs_check_path(L, 2);
    fs_job *j = fs_job_new(L, op);
    if (!(j->path2 = strdup(rel))) {
        fs_job_free(j);
        luaL_error(L, "fs: out of memory");
    }
    return j;
}

static int fs_read_beneath(lua_State *L) { return fs_job_start(L, fs_beneath_job(L, OP_READ_BENEATH)); }

static int fs_write_beneath(lua_State *L) {
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    int parents = 0;
    if (!lua_isnoneornil(L, 4)) {
        luaL_checktype(L, 4, LUA_TTABLE);
        lua_getfield(L, 4, "parents");
        parents = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    fs_check_path(L, 1);
    fs_check_path(L, 2);
    fs_job *j = fs_beneath_job(L, OP_WRITE_BENEATH);
    j->flag = parents;
    if (!(j->buf = malloc(len ? len : 1))) {
        fs_job_free(j);
        return luaL_error(L, "fs: out of memory");
    }
    memcpy(j->buf, data, len);
    j->len = len;
    return fs_job_start(L, j);
}

static int fs_rename(lua_State *L) {
    fs_check_path(L, 1);
    const char *to = fs_check_path(L, 2);
    fs_job *j = fs_job_new(L, OP_RENAME);
    if (!(j->path2 = strdup(to))) {
        fs_job_free(j);
        return luaL_error(L, "fs: out of memory");
    }
    return fs_job_start(L, j);
}

/* ---- the watcher --------------------------------------------------------------
 *
 * A uv_fs_event on the directory collects the names that changed; a debounce timer
 * closes the batch once no event came for `debounce` seconds (or a second after its
 * first event, so a file written continuously cannot starve the reader). Batches
 * accumulate while nobody waits, so no change is lost between two next() calls.
 * The handles keep the loop alive only while a fiber waits in next(): a forgotten
 * watcher does not stop the process from exiting.
 */

#define WATCH_MAX_BATCH_MS 1000

typedef struct {
    uv_fs_event_t event;
    uv_timer_t timer;
    fb_fiber *fiber;        /* waiting in next() */
    char **names;           /* distinct names changed in the current batch */
    size_t n, cap;
    uint64_t debounce_ms;
    uint64_t batch_start;   /* loop time of the batch's first event */
    int err;                /* a libuv error from the event handle, not yet reported */
    int open_handles;
} fs_watcher;

static void watch_free_names(fs_watcher *w) {
    for (size_t i = 0; i < w->n; i++) free(w->names[i]);
    w->n = 0;
}

static void watch_handle_closed(uv_handle_t *h) {
    fs_watcher *w = (fs_watcher *)h->data;
    if (--w->open_handles > 0) return;
    watch_free_names(w);
    free(w->names);
    free(w);
}

static void watch_close_handles(fs_watcher *w) {
    uv_fs_event_stop(&w->event);
    uv_close((uv_handle_t *)&w->event, watch_handle_closed);
    uv_close((uv_handle_t *)&w->timer, watch_handle_closed);
}

static void watch_stop_waiting(fs_watcher *w) {
    w->fiber = NULL;
    uv_unref((uv_handle_t *)&w->event);
}

/* Pushes the batch as a sorted list and starts a new one. */
static void watch_push_batch(lua_State *L, fs_watcher *w) {
    if (w->n) qsort(w->names, w->n, sizeof *w->names, fs_name_cmp);
    lua_createtable(L, (int)w->n, 0);
    for (size_t i = 0; i < w->n; i++) {
        lua_pushstring(L, w->names[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    watch_free_names(w);
}

/* Hands the batch, or the pending error, to the waiting fiber if there is one. */
static void watch_deliver(fs_watcher *w) {
    fb_fiber *f = w->fiber;
    if (!f) return;
    lua_State *co = fb_co(f);
    lua_checkstack(co, 4);
    int n = 1;
    if (w->err) {
        n = fs_push_error(co, w->err, "watcher");
        w->err = 0;
    } else {
        watch_push_batch(co, w);
    }
    watch_stop_waiting(w);
    fb_wake(f, n);
}

static void watch_timer_cb(uv_timer_t *t) { watch_deliver((fs_watcher *)t->data); }

static void watch_event_cb(uv_fs_event_t *h, const char *filename, int events, int status) {
    fs_watcher *w = (fs_watcher *)h->data;
    if (status < 0) {
        w->err = status;
        watch_deliver(w);
        return;
    }
    const char *name = filename ? filename : "";
    size_t i = 0;
    while (i < w->n && strcmp(w->names[i], name) != 0) i++;
    if (i == w->n) {
        if (w->n == w->cap) {
            size_t cap = w->cap ? w->cap * 2 : 8;
            char **nn = realloc(w->names, cap * sizeof *nn);
            if (!nn) return;
            w->names = nn;
            w->cap = cap;
        }
        if (!(w->names[w->n] = strdup(name))) return;
        if (w->n++ == 0) w->batch_start = uv_now(fb_loop());
    }
    uint64_t now = uv_now(fb_loop());
    uint64_t limit = w->batch_start + (w->debounce_ms > WATCH_MAX_BATCH_MS ? w->debounce_ms : WATCH_MAX_BATCH_MS);
    uint64_t delay = w->debounce_ms;
    if (now + delay > limit) delay = limit > now ? limit - now : 0;
    uv_timer_start(&w->timer, watch_timer_cb, delay, 0);
}

static fs_watcher **watch_check(lua_State *L) {
    fs_watcher **ud = (fs_watcher **)luaL_checkudata(L, 1, WATCHER_MT);
    if (!*ud) luaL_argerror(L, 1, "the watcher is closed");
    return ud;
}

/* fs.watch(dir [, { debounce = seconds }]) -> watcher | nil, err, code */
static int fs_watch(lua_State *L) {
    const char *dir = fs_check_path(L, 1);
    double debounce = 0.05;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "debounce");
        if (!lua_isnil(L, -1)) debounce = luaL_checknumber(L, -1);
        lua_pop(L, 1);
        luaL_argcheck(L, debounce >= 0 && debounce < 3600, 2, "debounce must be between 0 and 3600 seconds");
    }
    fs_watcher **ud = (fs_watcher **)lua_newuserdata(L, sizeof *ud);
    *ud = NULL;
    fs_watcher *w = calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "fs.watch: out of memory");
    w->debounce_ms = (uint64_t)(debounce * 1000.0 + 0.5);
    uv_fs_event_init(fb_loop(), &w->event);
    uv_timer_init(fb_loop(), &w->timer);
    w->event.data = w->timer.data = w;
    w->open_handles = 2;
    uv_unref((uv_handle_t *)&w->event);
    uv_unref((uv_handle_t *)&w->timer);
    int rc = uv_fs_event_start(&w->event, watch_event_cb, dir, 0);
    if (rc != 0) {
        watch_close_handles(w);
        return fs_push_error(L, rc, dir);
    }
    *ud = w;
    luaL_getmetatable(L, WATCHER_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static void watch_abort(void *op) { watch_stop_waiting((fs_watcher *)op); }

/* w:next([timeout]) -> sorted list of changed names | nil, err, code */
static int watch_next(lua_State *L) {
    fs_watcher *w = *watch_check(L);
    double timeout = luaL_optnumber(L, 2, 0);
    fb_fiber *f = fb_check_current(L, "watcher:next");
    if (w->fiber) return luaL_error(L, "watcher:next: another fiber is already waiting on this watcher");
    if (w->err) {
        int err = w->err;
        w->err = 0;
        return fs_push_error(L, err, "watcher");
    }
    if (w->n > 0 && !uv_is_active((uv_handle_t *)&w->timer)) {
        watch_push_batch(L, w);
        return 1;
    }
    w->fiber = f;
    uv_ref((uv_handle_t *)&w->event);
    return fb_await(L, f, watch_abort, w, timeout);
}

/* Idempotent. A fiber waiting in next() gets nil, "ECANCELED: ...". */
static int watch_close(lua_State *L) {
    fs_watcher **ud = (fs_watcher **)luaL_checkudata(L, 1, WATCHER_MT);
    fs_watcher *w = *ud;
    if (!w) return 0;
    *ud = NULL;
    fb_fiber *f = w->fiber;
    watch_stop_waiting(w);
    watch_close_handles(w);
    if (f) {
        lua_State *co = fb_co(f);
        lua_checkstack(co, 3);
        fb_wake(f, fb_push_error(co, "ECANCELED", "the watcher was closed"));
    }
    return 0;
}

/* Only reached when nothing refers to the watcher, so no fiber is waiting on it,
 * except while lua_close collects everything: then waking one is not allowed, and
 * the fiber's own collection aborts its wait. */
static int watch_gc(lua_State *L) {
    fs_watcher **ud = (fs_watcher **)luaL_checkudata(L, 1, WATCHER_MT);
    if (*ud) {
        (*ud)->fiber = NULL;
        watch_close_handles(*ud);
        *ud = NULL;
    }
    return 0;
}

static int watch_tostring(lua_State *L) {
    fs_watcher **ud = (fs_watcher **)luaL_checkudata(L, 1, WATCHER_MT);
    lua_pushfstring(L, "watcher (%s)", *ud ? "open" : "closed");
    return 1;
}

static const luaL_Reg watcher_methods[] = {
    {"next",  watch_next},
    {"close", watch_close},
    {NULL, NULL},
};

static const luaL_Reg fs_functions[] = {
    {"read",     fs_read},
    {"read_many", fs_read_many},
    {"write",    fs_write},
    {"append",   fs_append},
    {"list",     fs_list},
    {"stat",     fs_stat},
    {"exists",   fs_exists},
    {"mkdir_p",  fs_mkdir_p},
    {"remove",   fs_remove},
    {"rename",   fs_rename},
    {"realpath", fs_realpath},
    {"set_topdir", fs_set_topdir},
    {"read_beneath",  fs_read_beneath},
    {"write_beneath", fs_write_beneath},
    {"watch",    fs_watch},
    {NULL, NULL},
};

int luaopen_factory_core_fs(lua_State *L) {
    if (luaL_newmetatable(L, WATCHER_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, watcher_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, watch_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, watch_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fs_functions);
    return 1;
}
