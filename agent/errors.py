"""Errors of the agent layer. One root, `AgentError`.

Each docstring says whether the operation took effect and what the caller should do.
Ordinary outcomes that a caller must handle (a call that is already gone, a store that
cannot be reached right now) are subclasses, so `except AgentError` never hides a bug
of another layer.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "InvalidConfig",
    "StaleSession",
    "DuplicateCall",
    "StoreUnavailable",
    "StoreClosed",
    "CorruptRecord",
]


class AgentError(Exception):
    """Root of the agent layer's errors."""


class InvalidConfig(AgentError, ValueError):
    """A configuration value is invalid. Nothing was built; fix the named field."""

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        self.why = why
        super().__init__(f"invalid {field}={value!r}: {why}")


class StaleSession(AgentError, LookupError):
    """The call is not live in the store: never put, already ended, or reaped because its
    lease expired (another bridge marked it ended). Nothing changed.

    The caller should drop its handle; if the call is still up on the wire, hang it up:
    the rest of the system already counts it as gone. `record` is the ended record when
    the store still has it, else None.
    """

    def __init__(self, call_id: str, why: str, record: object | None = None) -> None:
        self.call_id = call_id
        self.record = record
        super().__init__(f"call {call_id!r}: {why}")


class DuplicateCall(AgentError, ValueError):
    """`put` found a live call with the same id. Nothing changed; the existing record
    stands. The caller should refuse the new call (a retransmitted INVITE or an id
    collision), not overwrite the live one."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        super().__init__(f"call {call_id!r} is already live in the store")


class StoreUnavailable(AgentError, ConnectionError):
    """The store's backend cannot be reached.

    From `start()`: nothing was started; check the store URL (`--redis`) and that the
    server runs. From a read (`get` of a call this bridge does not hold, `list_calls`,
    `live_count`, `events`): nothing was read; answer 503 or retry later. Writes on the
    call path never raise this: they are kept locally and applied on reconnect.
    """


class StoreClosed(AgentError, RuntimeError):
    """The store was closed before this call. Nothing happened; the process is stopping,
    so the caller should stop too."""


class CorruptRecord(AgentError, ValueError):
    """A stored record or event could not be decoded (written by an incompatible version
    or edited by hand). Nothing changed. Listings skip it and log; `get` raises so the
    API can answer 500 naming the key."""

    def __init__(self, what: str, why: str) -> None:
        self.what = what
        super().__init__(f"cannot decode {what}: {why}")
