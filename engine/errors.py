"""The engine's own error types. Every message is one sentence written for the person using the studio."""
from __future__ import annotations


class StudioError(Exception):
    """Base class: anything the user can act on. The CLI prints ``str(error)`` and exits 1."""


class UsageError(StudioError):
    """The request itself is wrong (unknown generator, bad option, missing prompt). CLI exit status 2."""


class OptionError(UsageError):
    """An option value is of the wrong type or out of range."""


class ModelError(StudioError):
    """A model folder is missing, incomplete, corrupt or of an unknown family."""


class ParityError(ModelError):
    """An exported graph does not match PyTorch within its tolerance (the ONNX parity gate refused it)."""

    def __init__(self, message: str, failures: list | None = None):
        super().__init__(message)
        self.failures = list(failures or [])


class PluginError(StudioError):
    """A plugin failed to load, registered something invalid, or raised."""


class GenerationError(StudioError):
    """A generator raised while generating."""


class CancelledError(StudioError):
    """The generation was cancelled by the user."""


class StateError(StudioError):
    """The state folder (settings, history, outputs) cannot be read or written."""


def describe_exception(exc: BaseException) -> tuple:
    """(one line for people, the traceback text for "details"): a StudioError's own sentence, else the type and
    message of anything else."""
    import traceback

    message = str(exc) if isinstance(exc, StudioError) else f"{type(exc).__name__}: {exc}"
    return message, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
