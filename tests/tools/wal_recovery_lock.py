"""Holds a SQLite WAL database as a process recovering its WAL index would, for the
sqlite backend spec (tests/core/db_sqlite_spec.lua): while this runs, every other
connection that starts a read finds the index changing under it and the recovery
locks taken, and gets SQLITE_BUSY (SQLITE_BUSY_RECOVERY) until they are released.

    python3 tests/tools/wal_recovery_lock.py DB_PATH SECONDS

Takes the WAL_WRITE_LOCK and WAL_RECOVER_LOCK bytes of DB_PATH-shm (POSIX record
locks, as SQLite's unix VFS takes them), makes the index header's two copies differ
(a reader then wants to recover the index), prints "locked", holds for SECONDS and
exits, releasing the locks; the next reader recovers the index from the WAL.
"""
import fcntl
import os
import sys
import time

# SQLite's wal.c: the header's two 48-byte copies, the checkpoint info, then one
# lock byte each from offset 120: WAL_WRITE_LOCK, WAL_CKPT_LOCK, WAL_RECOVER_LOCK, ...
HEADER = 48
LOCKS = 120
WRITE_LOCK, RECOVER_LOCK = LOCKS + 0, LOCKS + 2
CHANGE_COUNTER = 8

path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path + "-shm", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, WRITE_LOCK)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, RECOVER_LOCK)
at = HEADER + CHANGE_COUNTER
byte = os.pread(fd, 1, at)
os.pwrite(fd, bytes([byte[0] ^ 0xFF]), at)
print("locked", flush=True)
time.sleep(seconds)
os.close(fd)
