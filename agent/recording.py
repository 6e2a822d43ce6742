"""`CallRecording`: one call's stereo recording, as the event loop builds it frame by frame:
the caller on the left channel, the assistant on the right, 16 kHz.

The file's clock is the line's playout tick: every frame the transport sends to the
caller (`sent`, given at 16 kHz by the transport's `AudioSink.tap`) makes one stereo frame,
that frame on the right and, on the left, the oldest caller frame the agent heard
(`heard`, from `CallSession.feed`) and not yet written (silence when there is none).
Pairing the two streams in arrival order keeps them as they happened, and exactly so for
what the agent plays straight back: the echo agent's frame goes into the playout buffer
in the same order as the caller's frame into `_heard`, so both queues hold the same
number of frames and the echo lands at the resamplers' delay, never a frame off
(tests/integration/test_recording.py measures it). The file holds as many frames as the
CDR's `frames.out`.

EVENT LOOP THREAD, on the 20 ms path: `heard` and `sent` only append, interleave one
frame and offer it to the recorder's bounded queue, which never blocks (a full queue
drops the frame and counts it; the writer puts silence in its place, so the file keeps
the call's timeline).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Callable

import numpy as np

from .call import FRAME_SAMPLES

__all__ = ["CallRecording", "Offer"]

# Caller frames held for sends to come: 0.5 s. More means the line stopped sending while
# the caller did not (a transport stall); the oldest go, so memory and skew stay bounded.
_MAX_HEARD = 25

Offer = Callable[["CallRecording", int, np.ndarray], None]  # (recording, frame number, stereo frame)


class CallRecording:
    """Built by the `Recorder` (agent/recorder.py), which writes what `offer` takes.
    `on_first()` runs at the first frame (the recorder defers its work off the tick)."""

    def __init__(self, call_id: str, path: Path, offer: Offer, on_first: Callable[[], None] = lambda: None) -> None:
        self.call_id = call_id
        self.path = path
        self.offered = 0  # stereo frames handed to the writer: the next one's number
        self.dropped = 0  # of those, not queued (written as silence)
        self.ended = False  # set once, after the last offer; the writer then closes the file
        self._heard: collections.deque[np.ndarray] = collections.deque()
        self._offer = offer
        self._on_first = on_first

    def heard(self, frame: np.ndarray) -> None:
        """A caller frame the agent heard: int16 [320] at 16 kHz (kept, not copied: the
        transports hand the session fresh arrays)."""
        if len(self._heard) >= _MAX_HEARD:
            self._heard.popleft()
        self._heard.append(frame)

    def sent(self, frame: np.ndarray) -> None:
        """A frame sent to the caller, at 16 kHz: one stereo frame of the file."""
        if self.ended:
            return
        stereo = np.zeros(2 * FRAME_SAMPLES, "<i2")  # WAV is little-endian
        if self._heard:
            stereo[0::2] = self._heard.popleft()
        n = min(len(frame), FRAME_SAMPLES)  # exactly 320 at every line rate; never raise on the tick
        stereo[1:2 * n:2] = frame[:n]
        if self.offered == 0:
            self._on_first()
        self.offered += 1
        self._offer(self, self.offered - 1, stereo)

    def close(self) -> None:
        """The call ended: no more frames; the writer finishes the file."""
        self.ended = True
        self._heard.clear()
