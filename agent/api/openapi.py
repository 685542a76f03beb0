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
class Route:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    body: Any = None
    response: Any = None
    status: int = 200


_ERRORS = {
    "400": "Malformed input",
    "403": "Not allowed",
    "404": "Unknown id",
    "409": "Does not fit / conflict",
    "413": "Body too large",
    "503": "Backend or bus unavailable",
}


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
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": {
                str(route.status): {
                    "description": "OK",
                    "content": {"application/json": {"schema": lookup[route.response]}}
                    if route.response is not None
                    else {"application/json": {}},
                },
                **{code: {"description": d, "content": problem} for code, d in _ERRORS.items()},
            },
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
