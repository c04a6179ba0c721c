"""Resource budgets for the benchmark's peers: a CPU quota, a CPU set and a
memory limit, through the kernel's control groups.

    cg = Cgroup("eqmail-1cpu", cpus="0", cpu_share=0.2, memory_bytes=64 << 20)
    cg.create()
    subprocess.Popen(cg.wrap(["python3", "-m", "eqmail.daemon", ...]))   # runs inside
    ...
    cg.stats()    # peak memory, OOM kills, CPU time, throttling
    cg.remove()   # rmdir, once its processes are gone

cgroup v2 is used when /sys/fs/cgroup is a cgroup2 mount whose root offers
the cpu and memory controllers; otherwise cgroup v1 (the cpu, cpuacct,
cpuset and memory hierarchies, wherever they are mounted, co-mounted or not).
The new groups are made below the group the harness itself is in, in each
hierarchy, so they stay inside whatever limits the machine already sets.

A process enters the group before it does anything else: `wrap` puts
bench/cgexec.sh in front of the command, a shell that writes its own PID into
each cgroup.procs and then execs the command (as another user through
setpriv when asked), so the peer's memory is charged to the group from its
first page, and its children (workers, Postfix's daemons) are born inside.

Budget: `cpus` is the CPU set ("0" = one CPU, "0-1" = two); `cpu_share` the
quota per CPU of the set (0.2 = 20 %): cfs_quota_us = share x CPUs x period.
"""
from __future__ import annotations

import errno
import os
import time
from typing import Dict, List, Optional

CGEXEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cgexec.sh")
ROOT = "/sys/fs/cgroup"
PERIOD_US = 100000


class CgroupError(RuntimeError):
    pass


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _cpus_count(cpus: str) -> int:
    n = 0
    for part in cpus.split(","):
        if "-" in part:
            a, b = part.split("-")
            n += int(b) - int(a) + 1
        elif part.strip():
            n += 1
    return n


def version() -> Optional[int]:
    """2 when /sys/fs/cgroup is cgroup2 with cpu and memory, 1 when the v1
    cpu and memory hierarchies are mounted, else None."""
    try:
        controllers = _read(os.path.join(ROOT, "cgroup.controllers")).split()
        if "cpu" in controllers and "memory" in controllers:
            return 2
    except OSError:
        pass
    mounts = v1_mounts()
    if "cpu" in mounts and "memory" in mounts:
        return 1
    return None


def v1_mounts() -> Dict[str, str]:
    """controller -> mount point of its v1 hierarchy."""
    out = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4 or parts[2] != "cgroup":
                    continue
                for opt in parts[3].split(","):
                    if opt in ("cpu", "cpuacct", "cpuset", "memory"):
                        out.setdefault(opt, parts[1])
    except OSError:
        pass
    return out


def own_paths() -> Dict[str, str]:
    """controller -> this process's group path ('' key: the v2 path)."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            num, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "" and num == "0":
                out[""] = path
            for c in controllers.split(","):
                out[c] = path
    return out


def describe() -> str:
    v = version()
    if v == 2:
        return "cgroup v2 (%s)" % ROOT
    if v == 1:
        m = v1_mounts()
        return "cgroup v1 (%s)" % ", ".join("%s at %s" % (c, m[c]) for c in sorted(m))
    return "no usable cgroups"


class Cgroup:
    def __init__(self, name: str, cpus: str, cpu_share: float, memory_bytes: int):
        self.name = name
        self.cpus = cpus
        self.cpu_share = cpu_share
        self.memory_bytes = memory_bytes
        self.version = version()
        self.dirs: Dict[str, str] = {}   # controller (or "" for v2) -> directory
        self.created = False

    # -- set-up

    def create(self) -> "Cgroup":
        if self.version is None:
            raise CgroupError("no cgroup v2 with cpu+memory and no v1 cpu+memory hierarchies")
        quota = int(round(self.cpu_share * _cpus_count(self.cpus) * PERIOD_US))
        own = own_paths()
        if self.version == 2:
            parent = os.path.join(ROOT, own.get("", "/").lstrip("/"))
            try:
                enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
                missing = [c for c in ("cpu", "cpuset", "memory") if c not in enabled]
                if missing:
                    _write(os.path.join(parent, "cgroup.subtree_control"),
                           " ".join("+" + c for c in missing))
            except OSError as e:
                raise CgroupError("cannot enable cpu/cpuset/memory below %s: %s (a v2 group "
                                  "with processes of its own cannot delegate)" % (parent, e))
            d = os.path.join(parent, self.name)
            self._mkdir(d)
            self.dirs[""] = d
            _write(os.path.join(d, "cpu.max"), "%d %d" % (quota, PERIOD_US))
            try:
                _write(os.path.join(d, "cpuset.cpus"), self.cpus)
            except OSError:
                pass  # cpuset not delegated: the quota still holds
            _write(os.path.join(d, "memory.max"), self.memory_bytes)
            try:
                _write(os.path.join(d, "memory.swap.max"), 0)
            except OSError:
                pass
        else:
            mounts = v1_mounts()
            for c in ("cpu", "cpuacct", "cpuset", "memory"):
                if c not in mounts:
                    continue
                d = os.path.join(mounts[c], own.get(c, "/").lstrip("/"), self.name)
                if d not in self.dirs.values():
                    self._mkdir(d)
                self.dirs[c] = d
            cpu = self.dirs["cpu"]
            _write(os.path.join(cpu, "cpu.cfs_period_us"), PERIOD_US)
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), quota)
            if "cpuset" in self.dirs:
                d = self.dirs["cpuset"]
                # a new cpuset has no CPUs and no memory nodes: set both
                mems = _read(os.path.join(os.path.dirname(d), "cpuset.mems")).strip()
                _write(os.path.join(d, "cpuset.mems"), mems)
                _write(os.path.join(d, "cpuset.cpus"), self.cpus)
            mem = self.dirs["memory"]
            _write(os.path.join(mem, "memory.limit_in_bytes"), self.memory_bytes)
            try:  # no swap past the limit either (only where swap accounting exists)
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), self.memory_bytes)
            except OSError:
                pass
        self.created = True
        return self

    def _mkdir(self, d: str) -> None:
        try:
            os.mkdir(d)
        except FileExistsError:  # left by an interrupted run: reuse when empty
            if self._procs_in(d):
                raise CgroupError("%s exists and holds processes" % d)

    def procs_files(self) -> List[str]:
        return sorted({os.path.join(d, "cgroup.procs") for d in self.dirs.values()})

    def wrap(self, cmd: List[str], uid: Optional[int] = None,
             gid: Optional[int] = None) -> List[str]:
        """`cmd` run inside this group (and as uid:gid when given): run the
        result as root."""
        out = ["/bin/sh", CGEXEC] + self.procs_files() + ["--"]
        if uid is not None:
            out += ["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid, "--clear-groups", "--"]
        return out + list(cmd)

    # -- figures

    @staticmethod
    def _procs_in(d: str) -> List[int]:
        try:
            return [int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()]
        except OSError:
            return []

    def pids(self) -> List[int]:
        d = self.dirs.get("") or self.dirs.get("memory")
        return self._procs_in(d) if d else []

    def memory_now(self) -> Dict[str, int]:
        """Charged bytes now, and the anonymous part (the processes' own memory,
        without the page cache of the Maildir and queue files)."""
        if self.version == 2:
            d = self.dirs[""]
            stat = self._kv(os.path.join(d, "memory.stat"))
            return {"charged": int(_read(os.path.join(d, "memory.current"))),
                    "anon": stat.get("anon", 0)}
        d = self.dirs["memory"]
        stat = self._kv(os.path.join(d, "memory.stat"))
        return {"charged": int(_read(os.path.join(d, "memory.usage_in_bytes"))),
                "anon": stat.get("rss", 0) + stat.get("shmem", 0)}

    @staticmethod
    def _kv(path: str) -> Dict[str, int]:
        out = {}
        try:
            for line in _read(path).splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                    out[parts[0]] = int(parts[1])
        except OSError:
            pass
        return out

    def stats(self) -> dict:
        """peak_bytes (the kernel's high-water mark of charged memory, page
        cache included), oom_kills, failcnt (v1: times the limit was hit),
        cpu_s (CPU time of the group), throttled periods and seconds."""
        out: dict = {"version": self.version, "cpus": self.cpus, "cpu_share": self.cpu_share,
                     "memory_limit": self.memory_bytes}
        if self.version == 2:
            d = self.dirs[""]
            try:
                out["peak_bytes"] = int(_read(os.path.join(d, "memory.peak")))
            except OSError:
                out["peak_bytes"] = None  # kernels before 5.19: only the sampled figure
            ev = self._kv(os.path.join(d, "memory.events"))
            out["oom_kills"] = ev.get("oom_kill", 0)
            out["oom_events"] = ev.get("oom", 0)
            out["limit_hits"] = ev.get("max", 0)
            cs = self._kv(os.path.join(d, "cpu.stat"))
            out["cpu_s"] = cs.get("usage_usec", 0) / 1e6
            out["nr_throttled"] = cs.get("nr_throttled", 0)
            out["throttled_s"] = cs.get("throttled_usec", 0) / 1e6
        else:
            mem = self.dirs["memory"]
            out["peak_bytes"] = int(_read(os.path.join(mem, "memory.max_usage_in_bytes")))
            out["limit_hits"] = int(_read(os.path.join(mem, "memory.failcnt")))
            oc = self._kv(os.path.join(mem, "memory.oom_control"))
            out["oom_kills"] = oc.get("oom_kill", 0)
            out["under_oom"] = oc.get("under_oom", 0)
            if "cpuacct" in self.dirs:
                out["cpu_s"] = int(_read(os.path.join(self.dirs["cpuacct"],
                                                      "cpuacct.usage"))) / 1e9
            cs = self._kv(os.path.join(self.dirs["cpu"], "cpu.stat"))
            out["nr_throttled"] = cs.get("nr_throttled", 0)
            out["throttled_s"] = cs.get("throttled_time", 0) / 1e9
        return out

    # -- tear-down

    def remove(self, timeout: float = 15.0) -> None:
        """rmdir every directory once the group's processes are gone (the
        peer must have been stopped)."""
        deadline = time.time() + timeout
        for d in sorted(set(self.dirs.values()), reverse=True):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.time() > deadline:
                        raise CgroupError("rmdir %s: %s (processes %s)"
                                          % (d, e, self._procs_in(d)))
                    time.sleep(0.2)
        self.dirs.clear()
        self.created = False

    def stop(self) -> None:   # for the harness's list of things to stop
        if self.created:
            self.remove()
