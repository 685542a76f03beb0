"""The local API: aiohttp on a Unix socket (or a socket systemd handed us).

Routes are declared once in :data:`ROUTES`; the OpenAPI document is derived from the same
table, so the two cannot drift.

Size: the route table and one short handler per route, which is how the OpenAPI
document is generated from the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiohttp import web

from agent import __version__
from agent.api import schema, views
from agent.api.gate import ConnectionGate, GatedListener
from agent.api.openapi import Param, Route, openapi_document
from agent.api.peercred import peer_credentials
from agent.api.problems import from_error, from_http, problem_response
from agent.core.caller import Caller, is_admin
from agent.core.pool import Peer, Pool, parse_models
from agent.core.service import NodeService
from agent.errors import BadRequest, NotFound, PayloadTooLarge, XpuError
from agent.instance import refuse_live_socket
from agent.model import SLICE_TOKEN_HEADER, SliceRequest

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", NodeService)
POOL = web.AppKey("pool", Pool)
METRICS: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics")
POOL_ENCODER = web.AppKey("pool-encoder", views.PoolEncoder)
POOL_CACHE: web.AppKey[dict[str, tuple[float, bytes]]] = web.AppKey("pool-cache")
#: Pool documents of at least this many peers are encoded off the loop and reused for up
#: to POOL_CACHE_S seconds (readers polling a big pool cost one encoding a second).
POOL_CACHE_FROM = 1000
POOL_CACHE_S = 1.0
#: Bytes of a large document written at a time (see ``_send_large``).
SEND_PIECE = 256 * 1024
CALLER = "xpu.caller"
STOP_GRACE_S = 2.0
JSON = "application/json"


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type=JSON)


def caller_of(request: web.Request) -> Caller:
    caller: Caller = request[CALLER]
    return caller


async def _body(request: web.Request, kind: type[msgspec.Struct]) -> Any:
    if (
        request.content_length is not None
        and request.content_length > request.app[SERVICE].config.api.max_body_bytes
    ):
        raise PayloadTooLarge(f"body over {request.app[SERVICE].config.api.max_body_bytes} bytes")
    try:
        async with asyncio.timeout(request.app[SERVICE].config.api.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise BadRequest("the body did not arrive in time") from None
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICE].config.api.max_body_bytes
        raise PayloadTooLarge(f"body over {limit} bytes") from None
    try:
        return msgspec.convert(_integral(msgspec.json.decode(raw)), type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None


def _integral(value: Any) -> Any:
    """JSON Schema counts ``3160.0`` as an integer (2020-12 §6.1.1); msgspec's strict
    typing does not. Integral floats become ints before validation, so a body the OpenAPI
    document admits is never refused for its spelling; nothing else is coerced."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _query_flag(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "0")
    if text not in _FLAGS:
        raise BadRequest(f"{name} must be one of {', '.join(_FLAGS)}, got {text[:40]!r}")
    return _FLAGS[text]


def _query_text(request: web.Request, name: str, longest: int) -> str | None:
    text = request.query.get(name)
    if text is not None and len(text) > longest:
        raise BadRequest(f"{name} must be at most {longest} characters, got {len(text)}")
    return text


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``low..high``, else a 400 that names it."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be {low}..{high}, got {value}")
    return value


# -- middleware -----------------------------------------------------------------------------


@web.middleware
async def identity_and_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE]
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        cred = peer_credentials(sock)
        admin = is_admin(cred.uid, cred.gid, cred.pid, service.config.api.admin_group)
        request[CALLER] = Caller(uid=cred.uid, gid=cred.gid, pid=cred.pid, admin=admin)
    else:
        # The optional loopback TCP listener serves /metrics only; it has no identity.
        request[CALLER] = Caller(uid=-1, gid=-1, pid=0, admin=False)
        if request.path != "/metrics":
            return problem_response(403, "Forbidden", "only /metrics is served on TCP", None, None)
    try:
        return await handler(request)
    except XpuError as exc:
        return from_error(exc, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http(exc, request.path)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("unhandled API error", path=request.path, method=request.method)
        return problem_response(500, "Internal error", "see the agent's log", request.path, None)


# -- handlers -------------------------------------------------------------------------------


async def get_health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    status, reasons = service.health()
    return _json(
        schema.HealthView(
            status=status,
            reasons=reasons,
            version=__version__,
            uptime_s=round(time.time() - service.started_at, 3),
            node=service.config.node_name,
        )
    )


async def get_node(request: web.Request) -> web.Response:
    return _json(views.node_view(request.app[SERVICE], request.app[POOL]))


async def get_devices(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    caller = caller_of(request)
    return _json([views.device_view(service, u, caller) for u in service.card_uses().values()])


async def get_device(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    device = service.device(request.match_info["id"])
    return _json(views.device_view(service, service.card_uses()[device.id], caller_of(request)))


async def get_slices(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    history = _query_flag(request, "history")
    caller = caller_of(request)
    return _json([views.slice_view(service, s, caller) for s in await service.slices(history)])


def _asked(
    body: schema.AllocateBody | schema.PlaceBody | schema.BorrowBody, uid: int, **more: Any
) -> SliceRequest:
    """What a body asks for (cards, models, host CPU and memory), for ``uid``."""
    return SliceRequest(
        memory_mib=body.memory_mib,
        compute_pct=body.compute_pct,
        owner_uid=uid,
        models=parse_models(body.model),
        cpu_milli=body.cpu_milli,
        host_memory_mib=body.host_memory_mib,
        **more,
    )


async def post_slices(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body: schema.AllocateBody = await _body(request, schema.AllocateBody)
    caller = caller_of(request)
    slice_, created = await service.allocate(
        caller,
        _asked(
            body,
            caller.uid,
            device=body.device,
            ttl_s=body.ttl_s,
            labels=body.labels,
            priority=body.priority,
            request_id=body.request_id,
        ),
    )
    return _json(views.slice_view(service, slice_, caller), status=201 if created else 200)


#: A slice token is 32 characters; the header is refused (400) beyond this.
TOKEN_MAX = 128


def _token(request: web.Request) -> str | None:
    token = request.headers.get(SLICE_TOKEN_HEADER) or None
    if token is not None and len(token) > TOKEN_MAX:
        raise BadRequest(f"{SLICE_TOKEN_HEADER} must be at most {TOKEN_MAX} characters")
    return token


async def get_slice(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    slice_ = await service.get(request.match_info["id"])
    return _json(views.slice_view(service, slice_, caller_of(request), _token(request)))


async def delete_slice(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    caller = caller_of(request)
    ended = await service.release(caller, request.match_info["id"])
    return _json(views.slice_view(service, ended, caller))


async def post_processes(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body: schema.BindBody = await _body(request, schema.BindBody)
    caller = caller_of(request)
    token = _token(request)
    slice_ = await service.bind(caller, request.match_info["id"], body.pid, token=token)
    return _json(views.slice_view(service, slice_, caller, token), status=201)


async def delete_process(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    caller = caller_of(request)
    text = request.match_info["pid"]
    if not text.isdigit() or not 1 <= int(text) <= 2**22:
        raise BadRequest(f"pid must be an integer 1..{2**22}, got {text[:40]!r}")
    pid = int(text)
    slice_ = await service.unbind(caller, request.match_info["id"], pid)
    return _json(views.slice_view(service, slice_, caller))


async def get_pool(request: web.Request) -> web.StreamResponse:
    """Every peer (filtered by ``node``, ``model`` or ``placeable``). The pool keeps each
    peer's view until news of it arrives, and each peer's cards are encoded once per
    change (:class:`views.PoolEncoder`). A large pool's document (14 MB for 10,000 peers
    of 8 cards) is encoded in a thread, so that the loop serves others meanwhile, and
    reused for up to ``POOL_CACHE_S``, so that many readers polling it cost one encoding a
    second, not one each; per-peer reads (``/v1/pool/peers/{node}``) and small pools are
    always fresh."""
    cache = request.app[POOL_CACHE]
    key = request.query_string
    now = time.monotonic()
    hit = cache.get(key)
    if hit is not None and now - hit[0] < POOL_CACHE_S:
        return await _send_large(request, hit[1])
    node = _query_text(request, "node", 253)
    model = _query_text(request, "model", 256)
    placeable = _query_flag(request, "placeable")
    peers: Sequence[Peer] = request.app[POOL].peers()
    whole = node is None and not model and not placeable
    if node is not None:
        peers = [p for p in peers if p.node == node]
    if model:
        wanted = parse_models(model)
        peers = [p for p in peers if p.has_model(wanted)]
    if placeable:
        peers = [p for p in peers if p.placeable]
    encoder = request.app[POOL_ENCODER]
    if len(peers) < POOL_CACHE_FROM:
        return web.Response(body=encoder.encode(peers, whole), content_type=JSON)
    body = await asyncio.to_thread(encoder.encode, peers, whole)
    if len(cache) > 64:
        cache.clear()
    cache[key] = (now, body)
    return await _send_large(request, body)


async def _send_large(request: web.Request, body: bytes) -> web.StreamResponse:
    """A big document in pieces, each written once the last has left: handed over whole,
    asyncio's transport copies all of it and moves what is left of its buffer after each
    send (Python 3.11), several megabytes per read of a large pool on the loop, and other
    requests wait behind that."""
    if len(body) <= SEND_PIECE:
        return web.Response(body=body, content_type=JSON)
    response = web.StreamResponse(headers={"Content-Type": JSON})
    response.content_length = len(body)
    await response.prepare(request)
    view = memoryview(body)
    for start in range(0, len(body), SEND_PIECE):
        await response.write(view[start : start + SEND_PIECE])
    await response.write_eof()
    return response


async def get_peer(request: web.Request) -> web.Response:
    node = request.match_info["node"]
    peer = request.app[POOL].peer(node)
    if peer is None:
        raise NotFound(f"no peer {node!r} in the pool")
    return _json(views.peer_view(peer))


async def post_place(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body: schema.PlaceBody = await _body(request, schema.PlaceBody)
    ranked = service.place(
        _asked(body, caller_of(request).uid),
        request.app[POOL].placeable(),
        body.limit,
    )
    return _json(
        [
            schema.CandidateView(
                node=p.node,
                device=p.device,
                model=p.model,
                score=round(p.score, 6),
                memory_free_after_mib=p.memory_free_after_mib,
                compute_free_after_pct=p.compute_free_after_pct,
                local=p.local,
            )
            for p in ranked
        ]
    )


async def post_borrow(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body: schema.BorrowBody = await _body(request, schema.BorrowBody)
    caller = caller_of(request)
    wanted = service.normalise(_asked(body, caller.uid, ttl_s=body.ttl_s))
    holder = await service.process_of(caller) if body.hold else None
    lease = await request.app[POOL].borrow(caller, wanted, body.node, holder)
    return _json(views.lease_view(service, lease, caller), status=201)


async def get_leases(request: web.Request) -> web.Response:
    caller = caller_of(request)
    service = request.app[SERVICE]
    leases = request.app[POOL].leases()
    return _json([views.lease_view(service, lease, caller) for lease in leases])


async def get_lease(request: web.Request) -> web.Response:
    """One lease, held or ended lately (``state`` and ``reason`` say how it ended)."""
    caller = caller_of(request)
    lease = await request.app[POOL].lease(request.match_info["id"])
    if lease is None:
        raise NotFound(f"no borrowed lease {request.match_info['id']!r}")
    return _json(views.lease_view(request.app[SERVICE], lease, caller))


async def delete_lease(request: web.Request) -> web.Response:
    caller = caller_of(request)
    lease = await request.app[POOL].give_back(caller, request.match_info["id"])
    return _json(views.lease_view(request.app[SERVICE], lease, caller))


def _event_view(event: Any) -> schema.EventView:
    return schema.EventView(
        seq=event.seq, ts=event.ts, kind=event.kind, slice_id=event.slice_id, data=dict(event.data)
    )


async def get_events(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    after = _query_int(request, "after", 0, 0, 2**63 - 1)
    limit = _query_int(request, "limit", 100, 1, 10_000)
    follow = _query_flag(request, "follow")
    if not follow:
        return _json([_event_view(e) for e in await service.events(after, limit)])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async with service.hub.follow() as queue:
        last = after
        for event in await service.events(after, limit):
            await response.write(msgspec.json.encode(_event_view(event)) + b"\n")
            last = event.seq
        while True:
            event = await queue.get()
            if event.seq <= last:
                continue
            await response.write(msgspec.json.encode(_event_view(event)) + b"\n")


async def get_openapi(request: web.Request) -> web.Response:
    return _json(openapi_document(ROUTES, __version__))


async def get_metrics(request: web.Request) -> web.Response:
    render = request.app.get(METRICS)
    if render is None:
        raise NotFound("metrics are not enabled")
    # The full media type (text format 0.0.4): Prometheus 3 refuses a bare text/plain.
    return web.Response(
        body=render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


_WRITE = (400, 403, 404, 409, 413, 503, 507)
_ID = Param("id", "path", {"type": "string", "minLength": 1, "maxLength": 128})
_PID = Param("pid", "path", {"type": "integer", "minimum": 1, "maximum": 2**22})
_TOKEN = Param(
    SLICE_TOKEN_HEADER, "header", {"type": "string", "maxLength": TOKEN_MAX}, "the slice's token"
)
_FLAG = {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", get_health, "Liveness", response=schema.HealthView),
    Route("GET", "/v1/node", get_node, "Node summary", response=schema.NodeView),
    Route("GET", "/v1/devices", get_devices, "Devices", response=list[schema.DeviceView]),
    Route(
        "GET",
        "/v1/devices/{id}",
        get_device,
        "One device",
        response=schema.DeviceView,
        errors=(404,),
        params=(_ID,),
    ),
    Route(
        "GET",
        "/v1/slices",
        get_slices,
        "Slices",
        response=list[schema.SliceView],
        errors=(400,),
        params=(Param("history", "query", _FLAG, "include ended slices"),),
    ),
    Route(
        "POST",
        "/v1/slices",
        post_slices,
        "Allocate a slice",
        body=schema.AllocateBody,
        response=schema.SliceView,
        status=201,
        also=(200,),
        errors=_WRITE,
        links={
            "GetSlice": ("get_slice", {"id": "$response.body#/id"}),
            "ReleaseSlice": ("delete_slice", {"id": "$response.body#/id"}),
            "BindProcess": ("post_processes", {"id": "$response.body#/id"}),
        },
    ),
    Route(
        "GET",
        "/v1/slices/{id}",
        get_slice,
        "One slice (its environment to its owner, or with the slice's token)",
        response=schema.SliceView,
        errors=(400, 404),
        params=(_ID, _TOKEN),
    ),
    Route(
        "DELETE",
        "/v1/slices/{id}",
        delete_slice,
        "Release (a repeated release answers the ended slice)",
        response=schema.SliceView,
        errors=(403, 404, 503, 507),
        params=(_ID,),
    ),
    Route(
        "POST",
        "/v1/slices/{id}/processes",
        post_processes,
        "Bind a process (of yours, to a slice of yours or whose token you present)",
        body=schema.BindBody,
        response=schema.SliceView,
        status=201,
        errors=_WRITE,
        params=(_ID, _TOKEN),
    ),
    Route(
        "DELETE",
        "/v1/slices/{id}/processes/{pid}",
        delete_process,
        "Unbind a process",
        response=schema.SliceView,
        errors=(400, 403, 404, 503, 507),
        params=(_ID, _PID),
    ),
    Route(
        "GET",
        "/v1/pool",
        get_pool,
        "Peers as last heard",
        response=list[schema.PeerView],
        errors=(400,),
        params=(
            Param("node", "query", {"type": "string", "maxLength": 253}, "only this peer"),
            Param("model", "query", {"type": "string", "maxLength": 256}, "A|B: card models"),
            Param("placeable", "query", _FLAG, "only peers a request can be placed on"),
        ),
    ),
    Route(
        "GET",
        "/v1/pool/peers/{node}",
        get_peer,
        "One peer as last heard",
        response=schema.PeerView,
        errors=(404,),
        params=(Param("node", "path", {"type": "string", "minLength": 1, "maxLength": 253}),),
    ),
    Route(
        "POST",
        "/v1/pool/place",
        post_place,
        "Ranked candidates",
        body=schema.PlaceBody,
        response=list[schema.CandidateView],
        errors=(400, 413),
    ),
    Route(
        "POST",
        "/v1/pool/borrow",
        post_borrow,
        "Borrow from a peer",
        body=schema.BorrowBody,
        response=schema.LeaseView,
        status=201,
        errors=(400, 403, 404, 409, 413, 503, 507),
        links={"ReturnLease": ("delete_lease", {"id": "$response.body#/slice_id"})},
    ),
    Route("GET", "/v1/pool/leases", get_leases, "Leases borrowed", response=list[schema.LeaseView]),
    Route(
        "GET",
        "/v1/pool/leases/{id}",
        get_lease,
        "One borrowed lease, held or ended lately",
        response=schema.LeaseView,
        errors=(404,),
        params=(_ID,),
    ),
    Route(
        "DELETE",
        "/v1/pool/leases/{id}",
        delete_lease,
        "Return a borrowed lease",
        response=schema.LeaseView,
        errors=(403, 404, 503),
        params=(_ID,),
    ),
    Route(
        "GET",
        "/v1/events",
        get_events,
        "Events (newline-delimited JSON with follow=1)",
        response=list[schema.EventView],
        errors=(400,),
        params=(
            Param("after", "query", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10_000}),
            Param("follow", "query", _FLAG, "stream new events until the client closes"),
        ),
    ),
    Route("GET", "/v1/openapi.json", get_openapi, "This document", response=None),
    Route(
        "GET",
        "/metrics",
        get_metrics,
        "Prometheus exposition",
        response=None,
        errors=(404,),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    ),
)


def build_app(
    service: NodeService, pool: Pool, metrics: Callable[[], bytes] | None = None
) -> web.Application:
    app = web.Application(
        middlewares=[identity_and_problems], client_max_size=service.config.api.max_body_bytes
    )
    app[SERVICE] = service
    app[POOL] = pool
    app[POOL_ENCODER] = views.PoolEncoder()
    app[POOL_CACHE] = {}
    if metrics is not None:
        app[METRICS] = metrics
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    return app


@dataclass(slots=True)
class ApiServer:
    """Runs the app on the configured socket path, or on a socket systemd passed us.

    The listening socket is ours (not an aiohttp site) so that every connection passes the
    :class:`~agent.api.gate.ConnectionGate` before aiohttp sees it; aiohttp's keep-alive
    timer closes a connection that sends no complete request within
    ``api.header_timeout_s`` (the first one included), and a body must arrive within
    ``api.body_timeout_s``.
    """

    app: web.Application
    runner: web.AppRunner | None = None
    listener: GatedListener | None = None

    async def start(self, path: Path, group: str, inherited: socket.socket | None) -> None:
        config = self.app[SERVICE].config.api
        # Streams (events --follow) never finish by themselves: give in-flight requests
        # two seconds on stop, not aiohttp's 60 (systemd would SIGKILL us first).
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=STOP_GRACE_S,
            keepalive_timeout=config.header_timeout_s,
        )
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        gate = ConnectionGate(config.max_connections, config.max_connections_per_uid)
        if inherited is not None:
            self.listener = GatedListener(inherited, server, gate)
            return
        await asyncio.to_thread(_prepare_socket_path, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Create the socket with no access for others from the first instant.
        old = os.umask(0o117)
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(config.backlog)
        set_socket_group(path, group)
        self.listener = GatedListener(sock, server, gate)

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.runner is not None:
            await self.runner.cleanup()


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_live_socket(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def set_socket_group(path: Path, group: str) -> None:
    """Mode 0660 with ``group``; without that group, owner-only with a warning."""
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        gid = None
        log.warning("socket group not found; socket is owner-only", group=group, socket=str(path))
    if gid is not None:
        try:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
            return
        except PermissionError:
            log.warning("cannot give the socket to its group", group=group, socket=str(path))
    os.chmod(path, 0o600)
