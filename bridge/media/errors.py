"""Errors of the media DSP: one root, `MediaError`, and one subclass per kind of bad input.

Every media error is raised before any state changes: a frame that was refused left the
codec, resampler, framer or playout buffer exactly as it was, so the caller may drop the
frame (count it) and go on with the next one. None of them is ever a reason to end a call's
neighbours; at worst the one call's leg is misconfigured (`UnsupportedRate`).

`MediaError` is a `ValueError` (the input was wrong) and a `BridgeError` (the layer's root).
"""

from __future__ import annotations

from bridge.errors import BridgeError

__all__ = ["BadFrameSize", "BadPcm", "EmptyFrame", "MediaError", "UnsupportedRate"]


class MediaError(BridgeError, ValueError):
    """Root of the media errors. Nothing took effect; the message names what was wrong."""


class BadPcm(MediaError):
    """The audio itself is malformed: odd byte count, wrong dtype or shape.

    Nothing was consumed. Drop the frame and count it; a leg that keeps sending such
    frames is negotiated wrongly (check the codec and sample width).
    """


class EmptyFrame(BadPcm):
    """A codec was given zero bytes. Nothing to decode or encode; skip the packet."""


class UnsupportedRate(MediaError):
    """A sample rate, or a pair of rates, cannot be served (not a positive integer in
    range, or a ratio whose filter would be unreasonably large). Nothing was built; fix
    the configured or negotiated rate.
    """


class BadFrameSize(MediaError):
    """A frame duration does not give a whole number of samples at the rate, or is not
    positive. Nothing was built; choose a duration such that rate * ms / 1000 is whole.
    """
