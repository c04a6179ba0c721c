"""eqmail.children: cooperative child processes."""
import time

import gevent

from eqmail import children


def test_stdin_stdout_stderr_and_exit_code():
    f = children.run(["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"in put")
    assert (f.code, f.stdout, f.stderr, f.timed_out) == (3, b"in put", b"oops\n", False)


def test_extra_descriptor_like_checkpassword_fd3():
    f = children.run(["sh", "-c", "cat <&3"], extra_fd=3, extra_data=b"joe\0secret\0\0")
    assert f.code == 0 and f.stdout == b"joe\0secret\0\0"


def test_timeout_kills_the_child():
    t = time.time()
    f = children.run(["sleep", "10"], timeout=0.3)
    assert f.timed_out and f.code == -9
    assert time.time() - t < 3


def test_missing_program():
    f = children.run(["/nonexistent/prog"])
    assert f.code == -1 and f.error


def test_children_do_not_block_each_other():
    t = time.time()
    jobs = [gevent.spawn(children.run, ["sleep", "0.4"]) for _ in range(10)]
    gevent.joinall(jobs, timeout=10)
    assert all(j.value.code == 0 for j in jobs)
    assert time.time() - t < 2.5


def test_output_is_bounded():
    f = children.run(["sh", "-c", "head -c 200000 /dev/zero"])
    assert f.code == 0 and len(f.stdout) == children.MAX_OUTPUT


def test_cwd_and_environment(tmp_path):
    f = children.run(["sh", "-c", 'pwd; echo "$FOO"'], cwd=str(tmp_path),
                     env={"FOO": "bar", "PATH": "/usr/bin:/bin"})
    assert f.code == 0 and f.stdout == ("%s\nbar\n" % tmp_path).encode()
