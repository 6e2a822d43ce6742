"""The one error of the synthetic-data tools: bad input data or an unusable output folder."""

from .errors import BridgeError

__all__ = ["DataError"]


class DataError(BridgeError, ValueError):
    """A dialogue file, a manifest or the output folder is unusable; the message names
    the file and line (where there is one) and what to fix."""
