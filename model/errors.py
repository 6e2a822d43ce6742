"""Errors of the model layer. One root, `ModelError`; each says what to do."""

__all__ = ["ModelError", "ConfigInvalid", "CheckpointError", "EngineFull", "StaleSession"]


class ModelError(Exception):
    """Root of the model layer's errors."""


class ConfigInvalid(ModelError, ValueError):
    """A model configuration field is missing or wrong. Nothing was built; fix the named field."""

    def __init__(self, field: str, why: str, source: str | None = None) -> None:
        self.field = field
        where = f" in {source}" if source else ""
        super().__init__(f"model config field {field!r}{where}: {why}")


class CheckpointError(ModelError):
    """A model file is missing, truncated or does not match the configuration. Nothing was
    loaded; the message names the file and what was expected."""

    def __init__(self, path: object, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: {why}")


class EngineFull(ModelError):
    """Not admitted: no free slot, or the measured step time leaves no room in the chunk
    period. No session was opened; refuse the call (SIP 486/503) before answering it."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason  # bounded label for metrics: "no_slot", "deadline", "draining"
        super().__init__(f"engine full ({reason}): {detail}")


class StaleSession(ModelError):
    """The session handle refers to a slot that was already closed (and maybe reused).
    Nothing was done; the session is already gone."""
