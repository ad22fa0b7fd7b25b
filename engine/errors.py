"""Typed errors. Anything a user controls fails with one of these, never with `assert`.

Each message says what was wrong and what to change. Servers map them to responses:
ValidationError/MediaError -> bad request, CheckpointError -> misconfigured deployment,
ResourceExhausted -> retry with a smaller request, EngineFault -> restart the worker.
"""


class WanimateError(Exception):
    """Base class for every error the engine raises on purpose."""


class ValidationError(WanimateError, ValueError):
    """A request parameter is outside what the model or pipeline accepts."""


class MediaError(WanimateError):
    """An input image or video is missing, unreadable, corrupt or over a limit."""


class CheckpointError(WanimateError):
    """A checkpoint directory or file is missing, corrupt, or does not match the model."""


class FixtureError(WanimateError):
    """A parity fixture cannot be read or run (unknown kind, missing tensors)."""


class ResourceExhausted(WanimateError):
    """The request does not fit the device (memory, VRAM budget); the process stays healthy."""


class EngineFault(WanimateError):
    """An unrecoverable device fault; the worker should be restarted."""
