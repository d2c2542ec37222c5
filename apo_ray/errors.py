"""The errors a user sees. Every one derives from `ApoRayError`; the CLI and the jobs catch
that class, print its message on one line and exit 2 (anything else is a bug: traceback).

Each message names the thing to fix: a config key, a file and line, a prompt id, a directory.
The subclasses also derive from the builtin a caller would expect (ValueError, RuntimeError),
so library callers may catch either.
"""

from __future__ import annotations


class ApoRayError(Exception):
    """Base of every user-facing error: the message is the whole report."""


class ConfigError(ApoRayError, ValueError):
    """A configuration problem; the message names the offending key."""


class DataError(ApoRayError, ValueError):
    """Input data that cannot be used (a prompt row, a V* shard); the message names the file and row."""


class OutputLockedError(ApoRayError, RuntimeError):
    """Another live job is writing the same output directory."""


class VStarMismatchError(ApoRayError, ValueError):
    """Stage 1's output does not fit this Stage 2 run (missing prompt, other reward function)."""


class DivergedError(ApoRayError, RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the message names the step."""


class StorageError(ApoRayError, OSError):
    """Writing an output failed (disk full, permissions, object store); nothing half-written is left."""


def user_error(exc: BaseException) -> ApoRayError | None:
    """The ApoRayError behind `exc` (itself, or anywhere in its cause / context chain), else None.

    Ray wraps an actor's or a worker's exception in its own types; this finds ours inside.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # Ray Train's WorkerGroupError keeps each rank's exception (the lowest rank first)
        for _, failed in sorted((getattr(exc, "worker_failures", None) or {}).items()):
            found = user_error(failed)
            if found is not None:
                return found
        inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        inner = inner if inner is not None else getattr(exc, "controller_failure", None)  # Ray Train's ControllerError
        if isinstance(inner, BaseException) and id(inner) not in seen:
            exc = inner
            continue
        if isinstance(exc, ApoRayError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
