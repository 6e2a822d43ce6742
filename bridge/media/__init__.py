"""Media DSP for the bridge: G.711, streaming resampling, framing and playout.

Pure functions and small stateful objects over numpy; no I/O, no threads, no logging, no
third-party audio library besides stdlib `audioop` and libopus (`bridge.media.opus`,
imported on its own: it loads the C library on first use). Everything here is PCM16 mono in
native byte order, as bytes or 1-D int16 arrays (see `pcm`). One object per direction of
one call; the resampler's filter tables are shared process-wide (see `polyphase`).

    inbound   G.711 payload -> ulaw_decode -> Resampler(8000, 16000) -> Framer(16000)
    outbound  model audio -> Resampler(24000, 8000) -> PlayoutBuffer(8000) -> ulaw_encode

Errors are `MediaError` subclasses, raised before any state changes.
"""

from bridge.media.errors import BadFrameSize, BadPcm, EmptyFrame, MediaError, UnsupportedRate
from bridge.media.framer import Framer
from bridge.media.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from bridge.media.pcm import as_int16, check_rate, frame_samples
from bridge.media.playout import PlayoutBuffer
from bridge.media.polyphase import PolyphaseDesign, design
from bridge.media.resample import Resampler

__all__ = [
    "BadFrameSize",
    "BadPcm",
    "EmptyFrame",
    "Framer",
    "MediaError",
    "PlayoutBuffer",
    "PolyphaseDesign",
    "Resampler",
    "UnsupportedRate",
    "alaw_decode",
    "alaw_encode",
    "as_int16",
    "check_rate",
    "design",
    "frame_samples",
    "ulaw_decode",
    "ulaw_encode",
]
