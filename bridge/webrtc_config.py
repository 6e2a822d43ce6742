"""The WebRTC leg's settings and their command-line options (see bridge/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WebRtcSettings", "WEBRTC_OPTIONS"]


@dataclass(frozen=True)
class WebRtcSettings:
    """Filled in by the WebRTC leg."""


WEBRTC_OPTIONS: tuple = ()
