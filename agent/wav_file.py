"""`WavWriter`: a PCM16 WAV file written as it goes, valid up to its last `sync()`.

A WAV header states its sizes up front, which a file still growing cannot know. So the
header is written first with sizes of zero, the samples are appended, and `sync()`
rewrites the two sizes (RIFF and data) in place. A process that dies between syncs leaves
a file whose header counts the samples up to its last sync: a valid WAV of that length,
the samples after it ignored by readers.

The order inside `sync()` keeps that true after a power loss too: the samples are flushed
and fsynced first, only then is the header updated (in the page cache; it reaches the disk
with the next fsync). The header on disk therefore never counts samples that are not on
disk; after a power loss it is one sync older than after a crash of the process.

Blocking I/O: the recorder's writer thread only (agent/recorder.py).
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

__all__ = ["WavWriter", "MAX_DATA_BYTES"]

_HEADER_BYTES = 44
MAX_DATA_BYTES = 0xFFFFFFFF - 36  # the RIFF size field is 32 bits: about 18.6 h of 16 kHz stereo


def _header(rate: int, channels: int) -> bytes:
    block = channels * 2
    return (b"RIFF" + struct.pack("<I", 36) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
            + b"data" + struct.pack("<I", 0))


class WavWriter:
    """Creates `path` (never over an existing file: FileExistsError) and writes its header."""

    def __init__(self, path: Path, rate: int, channels: int) -> None:
        self.path = Path(path)
        self.data_bytes = 0
        # The header goes into a private name first, which is then linked to `path`: the
        # file appears with its header (a reader never sees zero bytes) and never over an
        # existing one (link fails with FileExistsError).
        part = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        self._file = open(part, "xb")
        try:
            self._file.write(_header(rate, channels))
            self._file.flush()
            os.link(part, self.path)
        except BaseException:
            self._file.close()
            raise
        finally:
            os.unlink(part)

    def write(self, data: bytes | memoryview) -> None:
        """Append samples (bytes-like, little-endian int16 interleaved). OSError EFBIG when
        the file would pass the WAV size limit: nothing of `data` is written then."""
        n = memoryview(data).nbytes
        if self.data_bytes + n > MAX_DATA_BYTES:
            raise OSError(errno.EFBIG, f"{self.path.name}: a WAV file holds at most 4 GiB")
        self._file.write(data)
        self.data_bytes += n

    def sync(self) -> None:
        """Make the samples so far durable, then make the header count them."""
        self._file.flush()
        fd = self._file.fileno()
        os.fsync(fd)
        os.pwrite(fd, struct.pack("<I", 36 + self.data_bytes), 4)
        os.pwrite(fd, struct.pack("<I", self.data_bytes), _HEADER_BYTES - 4)

    def close(self) -> None:
        """Sync, make the final header durable too, close. Idempotent."""
        if self._file.closed:
            return
        try:
            self.sync()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
