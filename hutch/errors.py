"""The one error tree of hutch.

Every component raises these; exactly one place per wire boundary turns them into bytes
(`hutch.agent.connect` for the in-sandbox agent, `hutch.api` for the control plane).
Each class carries a wire `code` (Connect-style, lower snake case) and an HTTP status, so a
boundary never needs a table of its own.

    HutchError                       internal            500
    ├── InvalidArgument              invalid_argument    400
    ├── Unauthenticated              unauthenticated     401
    ├── PermissionDenied             permission_denied   403
    ├── NotFound                     not_found           404
    ├── AlreadyExists                already_exists      409
    ├── FailedPrecondition           failed_precondition 400
    ├── Canceled                     canceled            499
    ├── DeadlineExceeded             deadline_exceeded   504
    ├── ResourceExhausted            resource_exhausted  429
    │   └── QuotaExceeded
    ├── Unimplemented                unimplemented       501
    ├── Unavailable                  unavailable         503
    │   ├── CapacityError            no room for another instance
    │   └── InstanceCrashed          the instance died under a request
    └── IsolationError               internal            500
        └── BackendUnavailable       the runtime backend cannot run on this host

This module imports nothing: the agent, which must start in a few milliseconds inside the
sandbox, uses it too.
"""

from __future__ import annotations


class HutchError(Exception):
    """Base of every error hutch raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidArgument(HutchError):
    """The request itself is wrong (bad field, bad path, bad id)."""

    code = "invalid_argument"
    http_status = 400


class Unauthenticated(HutchError):
    """No credentials, or credentials nobody issued."""

    code = "unauthenticated"
    http_status = 401


class PermissionDenied(HutchError):
    """The caller is known but may not do this (e.g. a path the sandbox user may not touch)."""

    code = "permission_denied"
    http_status = 403


class NotFound(HutchError):
    """The thing named does not exist (or is not visible to this caller)."""

    code = "not_found"
    http_status = 404


class AlreadyExists(HutchError):
    code = "already_exists"
    http_status = 409


class FailedPrecondition(HutchError):
    """The target is in the wrong state for the operation (e.g. a directory where a file is needed)."""

    code = "failed_precondition"
    http_status = 400


class Paused(FailedPrecondition):
    """The session is paused: its traffic waits for a resume (E2B's connect), not for a retry."""

    code = "paused"
    http_status = 409


class Canceled(HutchError):
    code = "canceled"
    http_status = 499


class DeadlineExceeded(HutchError):
    code = "deadline_exceeded"
    http_status = 504


class ResourceExhausted(HutchError):
    """A limit was hit (disk full, too many processes)."""

    code = "resource_exhausted"
    http_status = 429


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota would be exceeded."""


class TooLarge(HutchError):
    """A request's body is over the size hutch takes for it."""

    code = "too_large"
    http_status = 413


class Unimplemented(HutchError):
    code = "unimplemented"
    http_status = 501


class Unavailable(HutchError):
    """Try again later: the service or the instance cannot answer now."""

    code = "unavailable"
    http_status = 503


class CapacityError(Unavailable):
    """No room on this host for another instance."""


class InstanceCrashed(Unavailable):
    """The instance died while serving a request."""


class IsolationError(HutchError):
    """Setting up or tearing down the isolation of an instance failed."""


class BackendUnavailable(IsolationError):
    """The runtime backend cannot run on this host (missing binary, no root, no cgroups)."""


# Wire code -> class, for clients that turn an answer back into an exception.
BY_CODE: dict[str, type[HutchError]] = {
    cls.code: cls
    for cls in (
        HutchError,
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Paused,
        Canceled,
        DeadlineExceeded,
        ResourceExhausted,
        TooLarge,
        Unimplemented,
        Unavailable,
    )
}


def from_wire(code: str, message: str) -> HutchError:
    """The exception for a `{"code","message"}` answer (unknown codes become `HutchError`)."""
    return BY_CODE.get(code, HutchError)(message)


def from_status(status: int, message: str) -> HutchError:
    """The exception for an HTTP error status whose body carries no wire code."""
    for cls in BY_CODE.values():
        if cls.http_status == status and cls is not HutchError:
            return cls(message)
    return HutchError(message)
