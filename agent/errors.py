"""One root exception, one subclass per thing a caller handles differently.

``agent.api.problems`` maps them to HTTP statuses; ``xpuctl`` maps statuses to exit codes.
"""

from __future__ import annotations


class XpuError(Exception):
    """Root of every error the agent raises on purpose."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class ConfigError(XpuError):
    """A configuration file or value is invalid; names the key."""

    status = 400
    title = "Invalid configuration"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


class BadRequest(XpuError):
    status = 400
    title = "Bad request"


class Forbidden(XpuError):
    status = 403
    title = "Forbidden"


class NotFound(XpuError):
    status = 404
    title = "Not found"


class Conflict(XpuError):
    """The request does not fit, or conflicts with the current state."""

    status = 409
    title = "Conflict"


class DoesNotFit(Conflict):
    title = "Does not fit"


class PayloadTooLarge(XpuError):
    status = 413
    title = "Payload too large"


class Unavailable(XpuError):
    """A backend or the bus is not available right now."""

    status = 503
    title = "Service unavailable"


class BackendError(XpuError):
    """A device backend failed (driver error, hung tool, unparsable output)."""

    status = 503
    title = "Backend error"


class AlreadyRunning(XpuError):
    """Another agent holds this state directory or serves this socket: refuse to start."""

    status = 409
    title = "Already running"


class StorageFull(XpuError):
    """The ledger cannot commit because its disk is full: nothing was changed. Reads go on,
    enforcement goes on; writes succeed again by themselves once there is space."""

    status = 507
    title = "Insufficient storage"


class LedgerUnavailable(XpuError):
    """The ledger cannot commit for another I/O reason: nothing was changed."""

    status = 503
    title = "Ledger unavailable"
