"""`Recorder`: call recordings to files (`--record-dir DIR`): one stereo WAV (PCM16,
16 kHz, caller left, assistant right) per call that `--record` or its route's
`record: true` asks for. docs/recording.md.

Model of operation. At admission `attach` gives a recorded call a `CallRecording`
(agent/recording.py) fed by the session's caller frames and the transport's sent frames;
on the event loop that only builds one stereo frame per 20 ms tick and offers it to one
bounded queue, never blocking: a full queue drops the frame and counts it
(`duplexline_recording_frames_dropped_total{reason="queue_full"}`, a throttled warning).
One writer thread (WRITER THREAD below) does all file I/O: it creates a call's file at
its first frame (`DIR/<call id>-<hash>.wav`, never over an existing file), writes silence
for frames that were dropped (the file keeps the call's timeline), syncs each open file
about once a second (agent/wav_file.py: a crash loses at most about a second, and the
file stays a valid WAV up to its last sync) and closes a file once its call has ended and
every frame offered is written or accounted for. A file that cannot be created or written
loses that call's recording only (`reason="error"`).

The name is a function of the call id, so `GET /calls/{id}/recording` finds the file
without the store, after a restart too. Retention (`--record-retention-days`) runs at
start and hourly (agent/recording_retention.py).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .call import FRAME_RATE, FRAME_SAMPLES, AudioSink
from .once import stop_writer
from .record_metrics import RecordMetrics, Throttled
from .recording import CallRecording
from .recording_retention import keep_pruning, prune_once
from .wav_file import WavWriter

if TYPE_CHECKING:
    from .session import CallSession

__all__ = ["Recorder", "file_name"]

log = logging.getLogger(__name__)

_STOP = object()  # not None: the writer takes None for an idle round
_TICK = 0.2  # seconds between the writer's rounds of syncs and closes
_FRAME_BYTES = 2 * FRAME_SAMPLES * 2  # one stereo PCM16 frame
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


def file_name(call_id: str) -> str:
    """The recording's file name: the call id made safe for a file name (a SIP Call-ID is
    the caller's text), and a hash of the whole id, so two ids never share a file."""
    readable = _UNSAFE.sub("_", call_id)[:80].lstrip(".") or "call"
    return f"{readable}-{hashlib.sha256(call_id.encode()).hexdigest()[:10]}.wav"


class _Open:
    """WRITER THREAD: one call's file."""

    __slots__ = ("wav", "received", "frames", "synced_at")

    def __init__(self, wav: WavWriter | None, now: float) -> None:
        self.wav = wav  # None: it could not be created or written; its frames are dropped
        self.received = 0  # frames taken off the queue
        self.frames = 0  # frames in the file, silence for dropped ones included
        self.synced_at = now


class Recorder:
    def __init__(self, directory: Path, metrics: RecordMetrics, *, record_all: bool = False,
                 retention_days: float | None = None, maxsize: int = 16384, sync_every: float = 1.0) -> None:
        """`maxsize`: stereo frames queued at most (16384: 5.5 call-minutes, 1.3 s of 255
        calls, 21 MB)."""
        self.directory = Path(directory)
        self.record_all = record_all
        self.retention_days = retention_days
        self._metrics = metrics
        self._queue_full = metrics.recording_dropped.labels(reason="queue_full")
        self._failed = metrics.recording_dropped.labels(reason="error")
        self._sync_every = sync_every
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._pruning: asyncio.Task | None = None
        self._opening: collections.deque[CallRecording] = collections.deque()  # loop -> writer
        self._files: dict[CallRecording, _Open] = {}  # WRITER THREAD
        self._warn = Throttled(log)

    def path_for(self, call_id: str) -> Path:
        return self.directory / file_name(call_id)

    # ---- lifecycle (event loop) ------------------------------------------------------------

    async def start(self) -> None:
        """Raises OSError naming the folder when it cannot be created or written: recording
        the operator asked for must not fail silently at the first call."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write recordings to {self.directory} (--record-dir): "
                          f"{exc.strerror}") from exc
        if self.retention_days:
            await prune_once(self.directory, self.retention_days, self._metrics.recordings_deleted)
            self._pruning = asyncio.get_running_loop().create_task(
                keep_pruning(self.directory, self.retention_days, self._metrics.recordings_deleted),
                name="recording-retention")
        self._thread = threading.Thread(target=self._run, name="call-recorder", daemon=True)
        self._thread.start()
        log.info("recordings to %s (%s)%s", self.directory,
                 "every call" if self.record_all else "calls of routes with record: true",
                 f", kept {self.retention_days:g} days" if self.retention_days else "")

    async def close(self, timeout: float = 5.0) -> None:
        """After the last call ended: write what is queued and close every file, within
        `timeout` seconds."""
        if self._pruning is not None:
            self._pruning.cancel()
            await asyncio.gather(self._pruning, return_exceptions=True)
            self._pruning = None
        thread, self._thread = self._thread, None
        if thread is not None and not await asyncio.to_thread(stop_writer, self._queue, thread, _STOP, timeout):
            log.warning("recording writer did not finish within %.0f s; %d frames not written", timeout,
                        self._queue.qsize())

    # ---- calls (event loop) ------------------------------------------------------------------

    def attach(self, session: "CallSession", sink: AudioSink) -> CallRecording | None:
        """At admission: record the call when `--record` or its route asks. The file, the
        `recording` event and the CDR's `recording` come with the first frame sent."""
        if not (self.record_all or session.info.record) or self._thread is None:
            return None
        loop = asyncio.get_running_loop()
        path = self.path_for(session.info.call_id)
        recording = CallRecording(session.info.call_id, path, self._offer,
                                  lambda: loop.call_soon(self._started, session, recording))
        session.recording = recording
        sink.tap(recording.sent)
        return recording

    def _started(self, session: "CallSession", recording: CallRecording) -> None:
        self._opening.append(recording)  # the writer creates the file even if every frame is dropped
        session.detail.recording = str(recording.path)
        session.emit("recording", {"file": recording.path.name})

    def _offer(self, recording: CallRecording, seq: int, frame: np.ndarray) -> None:
        """THE 20 MS PATH: queue the frame or count it dropped; never blocks, never logs
        more than the throttled warning."""
        try:
            self._queue.put_nowait((recording, seq, frame))
        except queue.Full:
            recording.dropped += 1
            self._queue_full.inc()
            self._warn.warn("recording writer behind (%d frames queued): frames dropped, silence in their "
                            "place", self._queue.maxsize)

    # ---- WRITER THREAD -------------------------------------------------------------------------

    def _run(self) -> None:
        next_round = 0.0
        try:
            while True:
                try:
                    item = self._queue.get(timeout=_TICK)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if item is not None:
                    self._write(*item)
                now = time.monotonic()
                if now >= next_round:
                    next_round = now + _TICK
                    self._round(now)
        finally:
            self._round(time.monotonic())
            for recording, f in list(self._files.items()):  # shutting down: every file gets its sizes
                self._finish(recording, f)

    def _file(self, recording: CallRecording) -> _Open:
        f = self._files.get(recording)
        if f is None:
            wav = None
            try:
                wav = WavWriter(recording.path, FRAME_RATE, 2)
            except OSError as exc:
                self._warn.warn("cannot record call %s to %s: %s", recording.call_id, recording.path, exc)
            f = self._files[recording] = _Open(wav, time.monotonic())
        return f

    def _write(self, recording: CallRecording, seq: int, frame: np.ndarray) -> None:
        f = self._file(recording)
        f.received += 1
        if f.wav is None:
            self._failed.inc()
            return
        try:
            if seq > f.frames:  # frames dropped before this one: silence keeps the timeline
                f.wav.write(bytes(_FRAME_BYTES * (seq - f.frames)))
            f.wav.write(frame)
            f.frames = seq + 1
        except OSError as exc:
            self._fail(recording, f, exc)
            self._failed.inc()

    def _round(self, now: float) -> None:
        """Create the files of calls that started, close those of calls that ended, sync the
        rest about once a second."""
        while self._opening:
            self._file(self._opening.popleft())
        for recording, f in list(self._files.items()):
            if recording.ended and f.received + recording.dropped >= recording.offered:
                self._finish(recording, f)
            elif f.wav is not None and now - f.synced_at >= self._sync_every:
                f.synced_at = now
                try:
                    f.wav.sync()
                except OSError as exc:
                    self._fail(recording, f, exc)

    def _finish(self, recording: CallRecording, f: _Open) -> None:
        del self._files[recording]
        if f.wav is None:
            return
        try:
            if recording.offered > f.frames:  # the last frames were dropped
                f.wav.write(bytes(_FRAME_BYTES * (recording.offered - f.frames)))
                f.frames = recording.offered
            f.wav.close()
        except OSError as exc:
            self._fail(recording, f, exc)
            return
        log.info("call %s recorded: %s, %.1f s", recording.call_id, f.wav.path, f.frames * FRAME_SAMPLES / FRAME_RATE)

    def _fail(self, recording: CallRecording, f: _Open, exc: OSError) -> None:
        """The file cannot be written: keep what it holds (its sizes as far as they go) and
        drop the rest of the call's frames."""
        self._warn.warn("recording of call %s stopped: cannot write %s: %s", recording.call_id, recording.path, exc)
        wav, f.wav = f.wav, None
        if wav is not None:
            try:
                wav.close()
            except OSError:
                pass
