"""The OpenAPI 3 document, derived from the route table and the msgspec schema types."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from agent.api.schema import Problem


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter, with the bounds the handler enforces."""

    name: str
    where: str  # "path" | "query" | "header"
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    """One route: the handler, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    body: Any = None
    response: Any = None
    status: int = 200
    #: Problem statuses the route can answer besides 500 (which every route can).
    errors: tuple[int, ...] = ()
    #: Other success statuses (e.g. 200 for a replayed allocation next to 201).
    also: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    #: The success body's media type when it is not JSON.
    media_type: str = "application/json"
    #: OpenAPI links from the success response: name → (operationId, {param: expression}).
    links: dict[str, tuple[str, dict[str, str]]] | None = None


_ERRORS = {
    400: "Malformed input: the detail names the field",
    403: "Not allowed",
    404: "Unknown id",
    409: "Does not fit, or conflicts with the current state",
    413: "Body too large",
    500: "Internal error",
    503: "Backend, bus or ledger unavailable",
    507: "The ledger cannot commit (disk full)",
}


_UNPARSABLE = {"text/plain": {"schema": {"type": "string"}}}


def openapi_document(routes: Sequence[Route], version: str) -> dict[str, Any]:
    types = [Problem]
    types += [r.body for r in routes if r.body is not None]
    types += [r.response for r in routes if r.response is not None]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    lookup = dict(zip(types, schemas, strict=True))
    problem = {"application/problem+json": {"schema": lookup[Problem]}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        declared = {p.name: p for p in route.params}
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": declared[name].schema if name in declared else {"type": "string"},
            }
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        params += [
            {"name": p.name, "in": p.where, "required": False, "schema": p.schema}
            | ({"description": p.description} if p.description else {})
            for p in route.params
            if p.where in ("query", "header")
        ]
        body = (
            {route.media_type: {"schema": lookup[route.response]}}
            if route.response is not None
            else {route.media_type: {"schema": {"type": "string"}}}
            if route.media_type != "application/json"
            else {"application/json": {"schema": {"type": "object"}}}
        )
        ok: dict[str, Any] = {"description": "OK", "content": body}
        if route.links:
            ok["links"] = {
                name: {"operationId": op, "parameters": parameters}
                for name, (op, parameters) in route.links.items()
            }
        responses: dict[str, Any] = {str(route.status): ok}
        for code in route.also:
            responses[str(code)] = {"description": "OK (repeated request)", "content": body}
        for code in sorted({*route.errors, 500}):
            responses[str(code)] = {"description": _ERRORS[code], "content": problem}
        # A request the HTTP layer cannot parse (a request line or header over aiohttp's
        # 8 KiB limit) is refused by aiohttp itself, before any route, in plain text.
        responses.setdefault("400", {"description": _ERRORS[400], "content": dict(problem)})
        responses["400"]["content"] = {**responses["400"]["content"], **_UNPARSABLE}
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": responses,
        }
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": lookup[route.body]}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "xpu-agent local API", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
