"""The one place that maps errors to RFC 9457 problem documents."""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

from agent.api.schema import PROBLEM_TYPE_BASE, Problem
from agent.errors import XpuError

CONTENT_TYPE = "application/problem+json"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def problem_response(
    status: int, title: str, detail: str, instance: str | None, extra: dict[str, object] | None
) -> web.Response:
    body = Problem(
        type=PROBLEM_TYPE_BASE + _slug(title),
        title=title,
        status=status,
        detail=detail,
        instance=instance,
        extra=extra or None,
    )
    return web.Response(status=status, body=msgspec.json.encode(body), content_type=CONTENT_TYPE)


def from_error(error: XpuError, path: str) -> web.Response:
    return problem_response(error.status, error.title, error.detail, path, dict(error.extra))


def from_http(error: web.HTTPException, path: str) -> web.Response:
    detail = error.text or error.reason
    if detail.startswith(f"{error.status}:"):
        detail = detail.split(":", 1)[1].strip()
    response = problem_response(error.status, error.reason, detail, path, None)
    # RFC 9110: a 405 says which methods the resource has.
    if "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response
