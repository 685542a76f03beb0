"""The impure side of enforcement, kept thin: signals to verified processes.

Identity: a :class:`Target` is opened from a (pid, start time) pair. It first takes a
pidfd (Linux >= 5.3) and only then checks the start time, so the pidfd is known to refer to
that very process; every later signal to the process goes through the pidfd and can never
reach a process that reuses the pid. Where pidfds are missing the start time is re-read
right before each signal instead. Group signals (``killpg``) have no pidfd form: before
each one the leader is checked to be alive through its pidfd (a live leader pins the pid,
hence the group id) and still leading its group.

Never signalled, whatever the caller asks: pid 1, the agent itself, and the agent's own
process group or session. A process is stopped as a group only when it leads its own group
and is not a session leader (a login shell), as ``xpuctl run`` arranges for its child;
otherwise only the single pid is stopped, so a user's shell group is never stopped.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from pathlib import Path

import structlog

from agent import processes
from agent.model import ProcessRef

log = structlog.get_logger(__name__)

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


#: Whether ``ref`` is still that very process (agent.processes: one reader).
matches = processes.same


def _protected(pid: int) -> bool:
    return pid <= 1 or pid == os.getpid()


class Target:
    """A verified process, and the group it leads when it may be stopped as a group."""

    def __init__(self, ref: ProcessRef, pidfd: int | None, group: bool) -> None:
        self.ref = ref
        self.group = group
        self._pidfd = pidfd
        self._warned = False

    def _denied(self, signum: int, exc: OSError) -> None:
        """An agent without CAP_KILL cannot signal other users' processes: say so once per
        process, not at every duty-cycle edge."""
        if not self._warned:
            self._warned = True
            log.warning("not permitted to signal", pid=self.ref.pid, signal=signum, error=str(exc))

    @classmethod
    def open(cls, ref: ProcessRef) -> Target | None:
        """None when the process is gone, is someone else now, or must never be signalled."""
        if _protected(ref.pid):
            return None
        pidfd: int | None = None
        if _HAVE_PIDFD:
            try:
                pidfd = os.pidfd_open(ref.pid)
            except ProcessLookupError:
                return None
            except OSError:
                pidfd = None  # kernel without pidfd (ENOSYS): re-check before each signal
        if not matches(ref):
            if pidfd is not None:
                os.close(pidfd)
            return None
        try:
            pgid, sid = os.getpgid(ref.pid), os.getsid(ref.pid)
            mine = {os.getpgid(0), os.getsid(0)}
        except OSError:
            pgid, sid, mine = -1, -1, set()
        group = pgid == ref.pid and sid != ref.pid and pgid not in mine
        return cls(ref, pidfd, group)

    def alive(self) -> bool:
        if self._pidfd is None:
            return matches(self.ref)
        # A pidfd becomes readable when its process exits.
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return not ready

    def signal(self, signum: int) -> bool:
        """Signal this process alone. False when it is gone (never someone else)."""
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif matches(self.ref):
                os.kill(self.ref.pid, signum)
            else:
                return False
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            self._denied(signum, exc)
            return False
        return True

    def signal_all(self, signum: int) -> bool:
        """Signal the group this process leads, or the process alone (see module doc)."""
        if not self.group:
            return self.signal(signum)
        if not self.alive():
            return False
        try:
            if os.getpgid(self.ref.pid) != self.ref.pid:
                self.group = False  # it left its group (setpgid): from now on the pid alone
                return self.signal(signum)
            os.killpg(self.ref.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            self._denied(signum, exc)
            return self.signal(signum)
        return True

    def stop(self) -> bool:
        return self.signal_all(signal.SIGSTOP)

    def resume(self) -> bool:
        return self.signal_all(signal.SIGCONT)

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def group_members(pgid: int) -> list[int]:
    """Every pid in process group ``pgid`` (from /proc; a few ms for a thousand processes)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


#: ``cpu.max`` period: the kernel's default (100 ms).
CPU_PERIOD_US = 100_000


class CgroupTree:
    """Slice cgroups under a cgroup v2 directory delegated to the agent
    (``enforcement.cgroup_root``): ``<root>/<slice id>``.

    Freezing a cgroup (``cgroup.freeze``) stops every task in it, including children forked
    a moment ago, without the job-control side effects of SIGSTOP (the parent sees no
    stopped child, the state is not ``T``). Processes leave a slice's cgroup for the root
    directory itself when they are let go, so a released slice's cgroup can be removed.
    """

    def __init__(self, root: Path, mount: Path | None) -> None:
        self.root = root
        self._mount = mount
        #: pid -> the cgroup (relative to the mount) it came from, to send it back there.
        self._origin: dict[int, str] = {}

    @classmethod
    def open(cls, root: str) -> CgroupTree | None:
        """None (with a warning) when ``root`` is not a writable cgroup v2 directory with a
        freezer (kernel >= 5.2); the agent then stops processes with signals."""
        if not root:
            return None
        path = Path(root)
        try:
            path.mkdir(parents=False, exist_ok=True)
        except OSError as exc:
            log.warning("cgroup_root unusable; using signals", path=root, error=str(exc))
            return None
        probe = [path / "cgroup.procs", path / "cgroup.freeze"]
        if not all(p.exists() for p in probe) or not os.access(probe[0], os.W_OK):
            log.warning(
                "cgroup_root is not a writable cgroup v2 directory with a freezer; using signals",
                path=root,
            )
            return None
        return cls(path, _cgroup2_mount_of(path))

    def _ours(self, cgroup: str) -> bool:
        """Is ``cgroup`` (relative to the mount) inside our tree?"""
        if self._mount is None:
            return False
        return (self._mount / cgroup.lstrip("/")).is_relative_to(self.root)

    def _dir(self, slice_id: str) -> Path:
        return self.root / slice_id

    def place(self, slice_id: str, pids: list[int]) -> list[int]:
        """Move ``pids`` into the slice's cgroup; returns those moved."""
        where = self._dir(slice_id)
        where.mkdir(exist_ok=True)
        moved = []
        for pid in pids:
            origin = _cgroup_of(pid)
            try:
                (where / "cgroup.procs").write_text(str(pid))
            except OSError:
                continue  # exited meanwhile, or a kernel thread
            moved.append(pid)
            if origin is not None and not self._ours(origin):
                self._origin.setdefault(pid, origin)
        return moved

    def limit(self, slice_id: str, cpu_milli: int, memory_mib: int) -> bool:
        """Give the slice's cgroup ``cpu.max`` (``cpu_milli`` of a CPU per period) and
        ``memory.max`` (0: no limit); False where the controllers cannot be had."""
        try:
            enabled = set((self.root / "cgroup.subtree_control").read_text().split())
            if not {"cpu", "memory"} <= enabled:
                (self.root / "cgroup.subtree_control").write_text("+cpu +memory")
            where = self._dir(slice_id)
            where.mkdir(exist_ok=True)
            if cpu_milli:
                quota = max(1000, cpu_milli * CPU_PERIOD_US // 1000)
                (where / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            if memory_mib:
                (where / "memory.max").write_text(str(memory_mib * 1024 * 1024))
        except OSError as exc:
            log.warning("host limits not applied", slice=slice_id, error=str(exc))
            return False
        return True

    def device_memory_cgroup(self, slice_id: str) -> Path | None:
        """The slice's cgroup with the ``dmem`` controller enabled for it (the driver's
        memory limits act through it): its path, or ``None`` where it cannot be had."""
        try:
            enabled = set((self.root / "cgroup.subtree_control").read_text().split())
            if "dmem" not in enabled:
                (self.root / "cgroup.subtree_control").write_text("+dmem")
            where = self._dir(slice_id)
            where.mkdir(exist_ok=True)
        except OSError as exc:
            log.warning("no dmem cgroup for the slice", slice=slice_id, error=str(exc))
            return None
        return where

    def freeze(self, slice_id: str, frozen: bool) -> bool:
        try:
            (self._dir(slice_id) / "cgroup.freeze").write_text("1" if frozen else "0")
        except OSError:
            return False
        return True

    def evict(self, pids: list[int]) -> None:
        """Move ``pids`` back to the cgroup they came from, else to the (never frozen) root."""
        for pid in pids:
            origin = self._origin.pop(pid, None)
            back = self._mount / origin.lstrip("/") if origin and self._mount else None
            for target in (back, self.root):
                if target is None:
                    continue
                try:
                    (target / "cgroup.procs").write_text(str(pid))
                    break
                except OSError:
                    continue

    def dissolve(self, slice_id: str) -> None:
        """Thaw the slice's cgroup, move its processes to the root and remove it."""
        where = self._dir(slice_id)
        if not where.exists():
            return
        self.freeze(slice_id, False)
        with contextlib.suppress(OSError):
            self.evict([int(p) for p in (where / "cgroup.procs").read_text().split()])
        with contextlib.suppress(OSError):
            where.rmdir()

    def thaw_all(self) -> list[str]:
        """At start: thaw every slice cgroup a previous run may have left frozen."""
        thawed = []
        for child in sorted(self.root.iterdir()):
            freeze = child / "cgroup.freeze"
            if child.is_dir() and freeze.exists():
                with contextlib.suppress(OSError):
                    if freeze.read_text().strip() == "1":
                        thawed.append(child.name)
                    freeze.write_text("0")
        return thawed


def _cgroup_of(pid: int) -> str | None:
    """The process's cgroup v2 path (``0::/path`` in /proc/<pid>/cgroup)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _cgroup2_mount_of(path: Path) -> Path | None:
    """The cgroup2 mount point that holds ``path`` (from /proc/self/mountinfo)."""
    best: Path | None = None
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if not right.startswith("cgroup2 "):
            continue
        point = Path(left.split()[4])
        if path.is_relative_to(point) and (best is None or len(point.parts) > len(best.parts)):
            best = point
    return best


def signal_once(ref: ProcessRef, signum: int, *, then_continue: bool = False) -> bool:
    """Signal one verified process (memory and unsliced actions). ``then_continue`` also
    sends SIGCONT so that a process the duty cycle holds stopped can act on a SIGTERM."""
    target = Target.open(ref)
    if target is None:
        return False
    try:
        sent = target.signal(signum)
        if sent and then_continue:
            target.signal(signal.SIGCONT)
        return sent
    finally:
        target.close()


def terminate(ref: ProcessRef, signum: int) -> bool:
    """Signal a verified process and the group it leads, then SIGCONT it (a process held
    stopped must be able to act on a SIGTERM): ending the job of a lease that ended."""
    target = Target.open(ref)
    if target is None:
        return False
    try:
        sent = target.signal_all(signum)
        if sent and signum != signal.SIGKILL:
            target.signal_all(signal.SIGCONT)
        return sent
    finally:
        target.close()


def resume_once(ref: ProcessRef) -> bool:
    """SIGCONT a verified process (and the group it leads): crash recovery."""
    target = Target.open(ref)
    if target is None:
        return False
    try:
        return target.resume()
    finally:
        target.close()
