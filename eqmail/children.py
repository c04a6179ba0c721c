"""children -- run a child process from a greenlet without blocking the hub.

SUMMARY
    `run(argv, ...)` starts a program, feeds its stdin, collects its stdout
    and stderr (bounded), waits for it with a timeout and returns a
    `Finished`.  Everything waits cooperatively: the pipes are non-blocking
    and watched by gevent, the exit status is polled with
    ``waitpid(pid, WNOHANG)``.  Used for qmail-spp plugins and
    checkpassword programs, so a slow one stalls only its own session.

WHY NOT gevent.subprocess
    gevent.subprocess installs libev's SIGCHLD handler, which reaps every
    child of the process with ``waitpid(-1)``.  eqmaild also runs programs
    from threadpool threads (local deliveries, beforemote filters) with the
    stdlib subprocess module; their exit status would be stolen and read as
    success.  Waiting for our own pid only keeps both working.

EXTRA DESCRIPTORS
    `extra_fd` puts a pipe on a given descriptor of the child (qmail's
    checkpassword protocol reads its input on fd 3) and writes bytes to it.
    Children are started with os.posix_spawnp, whose file actions place the
    pipes without running Python code between fork and exec (not safe in a
    process with threads, as preexec_fn would be).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from .cpu import unpinned

#: Bytes kept of a child's stdout and of its stderr.
MAX_OUTPUT = 65536


@dataclass
class Finished:
    """How a child ended.  `code` is the exit code, or -signal when killed;
    `timed_out` when eqmail killed it after the timeout; `error` when it
    could not be started."""

    code: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    error: Optional[str] = None


def run(argv: Sequence[str], stdin: bytes = b"", timeout: float = 60.0,
        env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
        extra_fd: Optional[int] = None, extra_data: bytes = b"") -> Finished:
    """Run `argv` to its end (or `timeout` seconds, then SIGKILL).

    Never raises for the child's behaviour; a program that cannot be
    started gives Finished(code=-1, error=...).
    """
    import gevent
    import gevent.os

    pipes = [os.pipe() for _ in range(3 if extra_fd is None else 4)]
    # child side: stdin read end, stdout/stderr write ends, extra read end
    child_ends = [pipes[0][0], pipes[1][1], pipes[2][1]] + (
        [pipes[3][0]] if extra_fd is not None else [])
    targets = [0, 1, 2] + ([extra_fd] if extra_fd is not None else [])
    # posix_spawn's file actions move the pipes onto 0, 1, 2 (and fd 3 for
    # checkpassword) without running Python code in the child, which is not
    # safe in a process with threads; every other descriptor of eqmaild is
    # close-on-exec (PEP 446)
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in zip(child_ends, targets)]
    if cwd is not None:
        argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd] + list(argv)
    try:
        with unpinned():
            pid = os.posix_spawnp(argv[0], list(argv),
                                  dict(os.environ if env is None else env),
                                  file_actions=actions, setsid=True)
    except OSError as e:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        return Finished(-1, error=e.strerror or str(e))
    for fd in child_ends:
        os.close(fd)
    stdin_fd, stdout_fd, stderr_fd = pipes[0][1], pipes[1][0], pipes[2][0]
    extra_w = pipes[3][1] if extra_fd is not None else None
    deadline = time.time() + timeout
    out = {"stdout": bytearray(), "stderr": bytearray()}

    def feed(fd: int, data: bytes) -> None:
        try:
            gevent.os.make_nonblocking(fd)
            view = memoryview(data)
            while view:
                view = view[gevent.os.nb_write(fd, view):]
        except OSError:
            pass  # the child did not read it all: its business
        finally:
            os.close(fd)

    def drain(fd: int, name: str) -> None:
        gevent.os.make_nonblocking(fd)
        buf = out[name]
        while True:
            try:
                chunk = gevent.os.nb_read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if len(buf) < MAX_OUTPUT:
                buf += chunk[:MAX_OUTPUT - len(buf)]

    jobs = [gevent.spawn(feed, stdin_fd, stdin),
            gevent.spawn(drain, stdout_fd, "stdout"),
            gevent.spawn(drain, stderr_fd, "stderr")]
    if extra_w is not None:
        jobs.append(gevent.spawn(feed, extra_w, extra_data))
    status = wait(pid, deadline)
    timed_out = status is None
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        status = wait(pid, time.time() + 5)
    gevent.joinall(jobs, timeout=2)
    for g in jobs:
        g.kill(block=False)
    for fd in (stdout_fd, stderr_fd):
        try:
            os.close(fd)
        except OSError:
            pass
    code = -1 if status is None else (
        os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
    return Finished(code, bytes(out["stdout"]), bytes(out["stderr"]), timed_out)


def wait(pid: int, deadline: float) -> Optional[int]:
    """The wait status of `pid`, or None at the deadline.  Cooperative."""
    import gevent

    delay = 0.001
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return status
        if time.time() >= deadline:
            return None
        gevent.sleep(delay)
        delay = min(delay * 2, 0.05)
