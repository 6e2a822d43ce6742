"""`LineAudio`: one call's audio between the line (any codec rate) and the agent (16 kHz
frames), built from bridge/media.

    inbound   receive(pcm at line rate) -> Resampler(line, 16000) -> Framer -> 20 ms frames
    outbound  play(pcm, rate) -> Resampler(rate, line) -> PlayoutBuffer -> next_frame()

It is the agent's `AudioSink`: the agent plays at whatever rate it produces (16 kHz for
echo, the decoder's 22.05/24 kHz for the model) and one resampler per source rate brings it
to the line rate. A recorded call's `tap` hears each frame `next_frame` sends, resampled
to 16 kHz (agent/recording.py). Event loop only (the playout buffer is single-threaded by design).

Batched (the SIP media tick, bridge/sip/media.py): `receive_into` stages the line audio in
a tick's `ResampleBatch` and `received` frames its output once the batch has run; between
`defer_play(batch)` and `defer_play(None)` the agent's `play` stages its audio in a batch
too, and `settle` pushes those outputs into the playout, in order, before the tick's
writes. The samples are the same as `receive`/`play` alone give (bridge/media/batch_resample.py).
A `flush` drops staged audio with the queued; `depth_ms` counts only what `settle` pushed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from agent.call import FRAME_RATE
from bridge.media import Framer, PlayoutBuffer, Resampler
from bridge.media.batch_resample import ResampleBatch

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
        self._defer: ResampleBatch | None = None  # plays are staged here (see defer_play)
        self._pending: list[int] = []  # their tickets, in play order

    # ---- inbound (caller -> agent) -----------------------------------------------------

    def receive(self, pcm: np.ndarray | bytes) -> list[np.ndarray]:
        """PCM16 at the line rate, any length -> whole 20 ms frames at 16 kHz."""
        return self._framer.push(self._inbound.process(pcm))

    def receive_into(self, batch: ResampleBatch, pcm: np.ndarray | bytes) -> int:
        """`receive`, staged: returns the ticket for `received` once `batch` has run."""
        return batch.add(self._inbound, pcm)

    def received(self, batch: ResampleBatch, ticket: int) -> list[np.ndarray]:
        return self._framer.push(batch.result(ticket))

    # ---- outbound (agent -> caller): the AudioSink -------------------------------------

    def play(self, pcm: np.ndarray, rate: int) -> None:
        resampler = self._outbound.get(rate)
        if resampler is None:
            resampler = self._outbound[rate] = Resampler(rate, self.line_rate)
        samples = np.clip(pcm * 32768.0, -32768, 32767).astype(np.int16) if pcm.dtype != np.int16 else pcm
        if self._defer is None:
            self.playout.push(resampler.process(samples))
        else:
            self._pending.append(self._defer.add(resampler, samples))

    def defer_play(self, batch: ResampleBatch | None) -> None:
        """From now on stage `play`'s audio in `batch` (None: play at once again)."""
        self._defer = batch

    def settle(self, batch: ResampleBatch) -> None:
        """Push the staged plays' outputs (`batch` has run) into the playout, in order."""
        if self._pending:
            for ticket in self._pending:
                self.playout.push(batch.result(ticket))
            self._pending.clear()

    def flush(self) -> float:
        self._pending.clear()  # staged this tick, flushed before it was queued
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
