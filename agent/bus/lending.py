"""Lending idle capacity to peers: request/response over the bus (DESIGN.md §6).

This module holds what both sides share; the lender is :mod:`agent.bus.lender` (its inbox
:mod:`agent.bus.inbox`), the borrower :mod:`agent.bus.borrower`.

A borrower sends ``borrow`` / ``renew`` / ``release`` (and ``place``) into the lender's inbox
``{root}/{zone}/nodes/{lender}/rpc/{method}``, naming its own ``.../rpc/reply`` as the MQTT 5
response topic, with correlation data and a message expiry (over 3.1.1 the same travel in
the payload). The lender answers there.

The **lender** allocates a slice with ``borrower`` set and a TTL (``pool.lease_ttl_s`` unless
asked for less or more) and returns its id, card, environment and expiry. The slice ends
when its TTL lapses (the agent's expiry task) or when a local allocation preempts it; a
borrower whose status goes ``offline`` keeps its leases for ``pool.borrower_grace_s`` at
most — one that comes back (reconnected, or restarted: they are in its ledger) renews them
at once on its new session, a dead one lets them lapse. When a lent slice ends its
processes are ended too (:mod:`agent.enforce.loop`): the lease governs the job. A lease
that ends without being returned is announced to the borrower with a ``notice`` carrying
the reason and the lease token, so that only the lender can have sent it. Renew and
release must carry the token too: nobody but the borrower can extend or end its lease.

The **borrower** keeps its leases in its ledger (and in memory), renews each at half its
TTL — and all at once on every new bus session —, records ``lease.*`` events (they reach
its events topic like every event), and returns them on request.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from agent.bus import payloads
from agent.bus.connection import Outgoing
from agent.core.caller import Caller
from agent.errors import (
    BadRequest,
    DoesNotFit,
    Forbidden,
    NotFound,
    Unavailable,
    XpuError,
)

#: How long a borrower waits for an answer (also the request's message expiry).
RPC_TIMEOUT_S = 5.0
#: How long a reply may wait in our outgoing queue before it is pointless.
REPLY_EXPIRY_S = 30
#: Lenders tried in turn when no node is named.
MAX_LENDERS_TRIED = 3
#: 3.1.1 carries the expiry in the payload: allow this much clock skew.
CLOCK_SKEW_S = 30.0
RENEW_CHECK_S = 0.5

Send = Callable[[Outgoing, bool], None]


def system_caller() -> Caller:
    """The agent itself, acting for a peer."""
    return Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), admin=True)


_ERRORS: dict[int, type[XpuError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    409: DoesNotFit,
}


def error_of(reply: payloads.Reply) -> XpuError:
    kind = _ERRORS.get(reply.status, Unavailable)
    return kind(f"{reply.node}: {reply.detail or reply.title}", lender=reply.node)
