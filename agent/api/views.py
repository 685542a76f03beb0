"""Core objects → API views (what the caller may see)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from agent import __version__
from agent.api import schema
from agent.core.caller import Caller
from agent.core.capacity import CardUse
from agent.core.pool import Peer, PeerDevice, Pool
from agent.core.service import EnforcementNote, NodeService
from agent.model import Health, Lease, Slice


def slice_view(
    service: NodeService, slice_: Slice, caller: Caller, token: str | None = None
) -> schema.SliceView:
    """``token``: the caller presented this slice token; the right one shows the slice as
    to its owner (a dispatched job's ``xpuctl run --slice`` reads its environment)."""
    usage = service.usage.get(slice_.id)
    note = service.notes.get(slice_.id, EnforcementNote())
    mine = caller.admin or caller.uid == slice_.owner_uid or service.holds_token(slice_, token)
    return schema.SliceView(
        id=slice_.id,
        device=slice_.device,
        memory_mib=slice_.memory_mib,
        compute_pct=slice_.compute_pct,
        owner_uid=slice_.owner_uid,
        state=slice_.state.value,
        labels=dict(slice_.labels),
        priority=slice_.priority,
        created_at=slice_.created_at,
        expires_at=slice_.expires_at,
        ended_at=slice_.ended_at,
        end_reason=slice_.end_reason,
        borrower=slice_.borrower,
        request_id=slice_.request_id if mine else None,
        cpu_milli=slice_.cpu_milli,
        host_memory_mib=slice_.host_memory_mib,
        processes=[
            schema.ProcessView(pid=p.pid, start_time=p.start_time) for p in slice_.processes
        ],
        usage=schema.SliceUsageView(
            memory_used_mib=round(usage.memory_used_mib, 1),
            compute_used_pct=round(usage.compute_used_pct, 1),
            throttled=note.throttled,
            last_action=note.last_action,
        )
        if usage
        else None,
        env=service.env(slice_) if mine and slice_.state.value == "active" else None,
    )


def device_view(service: NodeService, use: CardUse, caller: Caller) -> schema.DeviceView:
    device, on = use.device, use.slices
    sample = service.inventory.samples.get(device.id)
    return schema.DeviceView(
        id=device.id,
        backend=device.backend,
        vendor=device.vendor.value,
        model=device.model,
        index=device.index,
        uuid=device.uuid,
        pci_bus_id=device.pci_bus_id,
        health=device.health.value,
        health_reason=device.health_reason,
        memory_total_mib=device.memory_total_mib,
        memory_used_mib=round(sample.memory_used_mib, 1)
        if sample and sample.memory_used_mib is not None
        else None,
        utilisation_pct=round(sample.utilisation_pct, 1)
        if sample and sample.utilisation_pct is not None
        else None,
        temperature_c=sample.temperature_c if sample else None,
        power_w=sample.power_w if sample else None,
        allocated_memory_mib=use.memory_allocated_mib,
        allocated_compute_pct=use.compute_allocated_pct,
        slice_count=len(on),
        slices=[slice_view(service, s, caller) for s in on],
        unsliced_pids=list(service.unsliced.get(device.id, ())),
        hardware_partitions=list(device.hardware_partitions),
        enforcement=_enforcement(service, device.id),
    )


def _enforcement(service: NodeService, device_id: str) -> schema.EnforcementView | None:
    rung = service.rungs.get(device_id)
    if rung is None:
        return None
    return schema.EnforcementView(rung=rung.name, refused=dict(rung.refused))


def idle_amount(service: NodeService) -> schema.Amount:
    lendable = service.lendable()
    return schema.Amount(
        memory_mib=lendable.memory_mib, compute_pct=lendable.compute_pct, slices=lendable.slices
    )


def host_view(service: NodeService) -> schema.HostView:
    cpu_free, memory_free = service.host_free()
    return schema.HostView(
        cpu_milli=service.host.cpu_milli,
        memory_mib=service.host.memory_mib,
        cpu_free_milli=cpu_free,
        memory_free_mib=memory_free,
        enforced=service.host_limits.enforced,
        limits=service.host_limits.why,
    )


def node_view(service: NodeService, pool: Pool) -> schema.NodeView:
    capacity, allocated = service.totals()
    devices = list(service.inventory.devices.values())
    healthy = sum(1 for d in devices if d.health is Health.OK)
    link = pool.link()
    status, reasons = service.health()
    return schema.NodeView(
        node=service.config.node_name,
        zone=service.config.node.zone,
        version=__version__,
        uptime_s=round(service.clock() - service.started_at, 3),
        health=status,
        health_reasons=reasons,
        backends=[b.name for b in service.inventory.backends],
        devices=len(devices),
        devices_healthy=healthy,
        capacity=schema.Amount(
            memory_mib=capacity.memory_mib, compute_pct=capacity.compute_pct, slices=capacity.slices
        ),
        allocated=schema.Amount(
            memory_mib=allocated.memory_mib,
            compute_pct=allocated.compute_pct,
            slices=allocated.slices,
        ),
        free=schema.Amount(
            memory_mib=capacity.memory_mib - allocated.memory_mib,
            compute_pct=capacity.compute_pct - allocated.compute_pct,
            slices=capacity.slices - allocated.slices,
        ),
        idle=idle_amount(service),
        host=host_view(service),
        mqtt=schema.MqttView(
            enabled=link.enabled,
            connected=link.connected,
            url=link.url,
            state=link.state,
            protocol=link.protocol,
            connects=link.connects,
            received=link.received,
            published=link.published,
            dropped=dict(link.dropped),
            peers=link.peers,
            peers_incomplete=link.peers_incomplete,
            coalesced=link.coalesced,
            stalls=link.stalls,
        ),
    )


def peer_view(peer: Peer) -> schema.PeerView:
    return schema.PeerView(
        node=peer.node,
        state=peer.state,
        placeable=peer.placeable,
        age_s=round(peer.age_s, 3),
        agent=peer.agent,
        address=peer.address,
        devices=_device_views(peer.devices),
        lendable_memory_mib=peer.lendable_memory_mib,
        lendable_compute_pct=peer.lendable_compute_pct,
        lends=peer.lends,
    )


def _device_views(devices: Sequence[PeerDevice]) -> list[schema.PeerDeviceView]:
    return [
        schema.PeerDeviceView(
            id=d.id,
            model=d.model,
            vendor=d.vendor,
            health=d.health,
            memory_total_mib=d.memory_total_mib,
            memory_free_mib=d.memory_free_mib,
            compute_free_pct=d.compute_free_pct,
            slices=d.slices,
        )
        for d in devices
    ]


#: :class:`schema.PeerView` with its cards already encoded: the same fields in the same
#: order, all given (positional arguments build it three times faster than keywords).
_PeerWire: Any = msgspec.defstruct(
    "PeerWire",
    [
        (f.encode_name, msgspec.Raw if f.name == "devices" else f.type)
        for f in msgspec.structs.fields(schema.PeerView)
    ],
)
_WIRE_ORDER = (
    "node",
    "state",
    "placeable",
    "age_s",
    "agent",
    "address",
    "devices",
    "lendable_memory_mib",
    "lendable_compute_pct",
    "lends",
)
assert tuple(f.name for f in msgspec.structs.fields(schema.PeerView)) == _WIRE_ORDER


class PoolEncoder:
    """``GET /v1/pool``'s document: the bytes of ``[peer_view(p) for p in peers]``, but
    each peer's cards — nine tenths of it — are encoded once per change of them (its
    :class:`PeerDevice` tuple is replaced, never changed, when news of them arrives), not
    on every read: 10,000 peers of 8 cards took ~250 ms to encode afresh."""

    def __init__(self) -> None:
        self._cards: dict[str, tuple[tuple[PeerDevice, ...], msgspec.Raw]] = {}

    def encode(self, peers: Sequence[Peer], whole: bool = True) -> bytes:
        """``whole``: ``peers`` is the whole pool (not a filtered part of it), so cards of
        peers not in it are forgotten."""
        cache = self._cards
        wires = []
        for peer in peers:
            hit = cache.get(peer.node)
            if hit is None or hit[0] is not peer.devices:
                hit = (peer.devices, msgspec.Raw(msgspec.json.encode(_device_views(peer.devices))))
                cache[peer.node] = hit
            wires.append(
                _PeerWire(  # in _WIRE_ORDER
                    peer.node,
                    peer.state,
                    peer.placeable,
                    round(peer.age_s, 3),
                    peer.agent,
                    peer.address,
                    hit[1],
                    peer.lendable_memory_mib,
                    peer.lendable_compute_pct,
                    peer.lends,
                )
            )
        if whole and len(cache) > len(peers):  # peers gone
            keep = {p.node for p in peers}
            self._cards = {n: v for n, v in cache.items() if n in keep}
        return msgspec.json.encode(wires)


def lease_view(service: NodeService, lease: Lease, caller: Caller) -> schema.LeaseView:
    mine = caller.admin or caller.uid == lease.owner_uid
    pool = service.config.pool
    address = lease.address or lease.lender
    return schema.LeaseView(
        lender=lease.lender,
        slice_id=lease.slice_id,
        device=lease.device,
        memory_mib=lease.memory_mib,
        compute_pct=lease.compute_pct,
        expires_at=lease.expires_at,
        env=dict(lease.env) if mine and lease.state == "active" else {},
        owner_uid=lease.owner_uid,
        address=address,
        launcher=[w.format(address=address, node=lease.lender) for w in pool.launcher],
        remote_xpuctl=pool.remote_xpuctl,
        token_in_command=pool.token_in_command,
        state=lease.state,
        reason=lease.reason,
        ended_at=lease.ended_at,
    )
