"""SIP stack backends: one module per SIP stack, each implementing bridge/sip/stack.py's
interface (`Stack`, `StackAccount`, `StackCall`): baresip.py (the default) and pjsua2.py
(the optional `pjsua2` extra). `load` imports only the one asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import ConfigError

__all__ = ["BACKENDS", "MAX_CALLS", "CODECS", "INVITE_RATE", "load"]

BACKENDS = ("baresip", "pjsua2")
# The most calls one process can hold on each (baresip: 255 per process; the pjsua2 wheel:
# its compile-time PJSUA_MAX_CALLS). Here, not in the modules, so that settings can be
# checked without importing a stack.
MAX_CALLS = {"baresip": 255, "pjsua2": 4}
# New INVITEs a second the front door forwards to the stack, all sources together (None: no
# such limit). The pjsua2 wheel's select ioqueue has 64 handles, every INVITE takes two (its
# RTP and RTCP sockets) and a closed handle comes back only 500 ms later: a burst of INVITEs
# (the torture tier's UDP fuzz) used them up, and the wheel's PJ_DEBUG build aborts then.
INVITE_RATE = {"baresip": None, "pjsua2": 10.0}
# The operator's codec names each backend has (the pjsua2 wheel has no Opus).
CODECS = {"baresip": ("pcmu", "pcma", "g722", "opus"), "pjsua2": ("pcmu", "pcma", "g722")}
_INSTALL = {"baresip": "pip install baresip-python", "pjsua2": "pip install 'duplexline[pjsua2]' (GPLv2)"}


def load(name: str) -> ModuleType:
    """The backend's module; ConfigError when it is unknown or not installed."""
    if name not in BACKENDS:
        raise ConfigError("sip_backend", name, f"expected one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        raise ConfigError("sip_backend", name, f"its binding is not installed ({exc}); {_INSTALL[name]}") from None
