"""Who is asking, and what they may do (DESIGN.md §3 "Who may do what").

Identities come from ``SO_PEERCRED`` on the API socket, never from the request body.
"""

from __future__ import annotations

import grp
from dataclasses import dataclass

from agent.errors import Forbidden
from agent.model import Slice


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int
    admin: bool

    @property
    def name(self) -> str:
        return "root" if self.uid == 0 else f"uid {self.uid}"


def supplementary_groups(pid: int) -> set[int]:
    """The peer's groups from /proc (SO_PEERCRED carries only the primary gid)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def is_admin(uid: int, gid: int, pid: int, admin_group: str) -> bool:
    if uid == 0:
        return True
    if not admin_group:
        return False
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    return group.gr_gid == gid or group.gr_gid in supplementary_groups(pid)


def require_owner(caller: Caller, slice_: Slice, action: str) -> None:
    if caller.admin or caller.uid == slice_.owner_uid:
        return
    raise Forbidden(
        f"{caller.name} may not {action} slice {slice_.id} owned by uid {slice_.owner_uid}"
    )


def require_process_owner(caller: Caller, pid: int, process_uid: int) -> None:
    if caller.admin or caller.uid == process_uid:
        return
    raise Forbidden(f"{caller.name} may not bind process {pid} of uid {process_uid}")
