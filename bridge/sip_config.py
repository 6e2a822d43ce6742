"""The SIP leg's settings and their command-line options (see bridge/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SipSettings", "SIP_OPTIONS"]


@dataclass(frozen=True)
class SipSettings:
    """Filled in by the SIP leg."""


SIP_OPTIONS: tuple = ()
