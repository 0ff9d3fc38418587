"""Error tree: each class owns the gRPC status it maps to, so local and remote raise the same types."""

from __future__ import annotations


class NestvecError(Exception):
    """Base of every error nestvec raises on purpose."""

    grpc_status: str = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgumentError(NestvecError, ValueError):
    """Bad input: wrong dimension, NaN, duplicate ids, bad filter, unknown codec spec..."""

    grpc_status = "INVALID_ARGUMENT"


class NotFoundError(NestvecError, LookupError):
    grpc_status = "NOT_FOUND"


class AlreadyExistsError(NestvecError):
    grpc_status = "ALREADY_EXISTS"


class FailedPreconditionError(NestvecError):
    """The request is well formed but does not fit the collection (other model, unfitted codec)."""

    grpc_status = "FAILED_PRECONDITION"


class ResourceExhaustedError(NestvecError):
    grpc_status = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(NestvecError):
    """Missing or unknown API key (remote only)."""

    grpc_status = "UNAUTHENTICATED"


class PermissionDeniedError(NestvecError):
    """A read-only key asked for a write (remote only)."""

    grpc_status = "PERMISSION_DENIED"


class UnavailableError(NestvecError):
    """The server could not be reached, after retries (remote only)."""

    grpc_status = "UNAVAILABLE"


def invalid(field: str, problem: str) -> InvalidArgumentError:
    """An InvalidArgumentError whose message starts with the offending field."""
    return InvalidArgumentError(f"{field}: {problem}", field=field)
