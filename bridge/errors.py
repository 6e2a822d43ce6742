"""Errors of the bridge layer. One root, `BridgeError`; each says what to do."""

__all__ = ["BridgeError", "ConfigError"]


class BridgeError(Exception):
    """Root of the bridge's errors."""


class ConfigError(BridgeError, ValueError):
    """A setting is invalid. Nothing was started; fix the named flag or variable."""

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"invalid {field}={value!r}: {why}")
