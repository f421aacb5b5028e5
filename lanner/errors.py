"""Typed errors. Anything a client can cause is an `InvalidRequest` or a
`CapacityExceeded`; the engine rejects such a request before it touches shared
state, so other requests never see it."""


class LannerError(Exception):
    """Base class of every error lanner raises on purpose."""


class InvalidRequest(LannerError, ValueError):
    """The request itself is malformed: bad sampling parameters, an empty or
    over-long prompt, token ids outside the vocabulary."""


class ModelNotFound(InvalidRequest):
    """The request names a model this server does not serve (HTTP 404)."""


class CapacityExceeded(LannerError):
    """The request is well formed but can never be served by this engine, for
    example because it needs more KV-cache blocks than exist."""


class UnsupportedModel(LannerError, ValueError):
    """The model's architecture or one of its options is not implemented."""


class ServerOverloaded(LannerError):
    """Too many requests are waiting; the client may retry later (HTTP 429)."""


class EngineDead(LannerError, RuntimeError):
    """The engine hit an unrecoverable error and accepts no more work."""


class ConfigError(LannerError, ValueError):
    """An engine option is invalid or inconsistent with the model."""


def without_frames(error: BaseException) -> BaseException:
    """`error` with its traceback dropped, for an error handed to another thread or kept for a
    reader. Its frames hold the request (a prompt may be megabytes) and, through the future or
    mailbox that keeps the error, form a reference cycle that only a full garbage collection
    frees: rejected requests would pile up."""
    return error.with_traceback(None)
