"""`LineAudio`: one call's audio between the line (any codec rate) and the agent (16 kHz
frames), built from bridge/media.

    inbound   receive(pcm at line rate) -> Resampler(line, 16000) -> Framer -> 20 ms frames
    outbound  play(pcm, rate) -> Resampler(rate, line) -> PlayoutBuffer -> next_frame()

It is the agent's `AudioSink`: the agent plays at whatever rate it produces (16 kHz for
echo, the decoder's 22.05/24 kHz for the model) and one resampler per source rate brings it
to the line rate. A recorded call's `tap` hears each frame `next_frame` sends, resampled
to 16 kHz (agent/recording.py). Event loop only (the playout buffer is single-threaded by design).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from agent.call import FRAME_RATE
from bridge.media import Framer, PlayoutBuffer, Resampler

__all__ = ["LineAudio", "AGENT_RATE"]

AGENT_RATE = FRAME_RATE  # what the agent takes: 16 kHz frames


class LineAudio:
    def __init__(self, line_rate: int, *, max_playout_ms: float = 4000.0) -> None:
        self.line_rate = line_rate
        self._inbound = Resampler(line_rate, AGENT_RATE)
        self._framer = Framer(AGENT_RATE)
        self._outbound: dict[int, Resampler] = {}
        self.playout = PlayoutBuffer(line_rate, max_ms=max_playout_ms)
        self._tap: Callable[[np.ndarray], None] | None = None
        self._tap_resampler: Resampler | None = None

    # ---- inbound (caller -> agent) -----------------------------------------------------

    def receive(self, pcm: np.ndarray | bytes) -> list[np.ndarray]:
        """PCM16 at the line rate, any length -> whole 20 ms frames at 16 kHz."""
        return self._framer.push(self._inbound.process(pcm))

    # ---- outbound (agent -> caller): the AudioSink -------------------------------------

    def play(self, pcm: np.ndarray, rate: int) -> None:
        resampler = self._outbound.get(rate)
        if resampler is None:
            resampler = self._outbound[rate] = Resampler(rate, self.line_rate)
        samples = np.clip(pcm * 32768.0, -32768, 32767).astype(np.int16) if pcm.dtype != np.int16 else pcm
        self.playout.push(resampler.process(samples))

    def flush(self) -> float:
        return self.playout.flush()

    @property
    def depth_ms(self) -> float:
        return self.playout.depth_ms

    def tap(self, listener: Callable[[np.ndarray], None]) -> None:
        """Hand `listener` each frame `next_frame` sends from now on, at 16 kHz: 320 samples
        at every line rate (8, 16, 24, 48 kHz: whole samples per 20 ms)."""
        self._tap = listener
        self._tap_resampler = Resampler(self.line_rate, AGENT_RATE)

    def next_frame(self) -> np.ndarray:
        """Exactly one 20 ms frame at the line rate (silence when nothing is queued)."""
        frame = self.playout.pop_frame()
        if self._tap is not None:
            self._tap(self._tap_resampler.process(frame))  # type: ignore[union-attr]
        return frame
