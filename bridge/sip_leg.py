"""The sip leg: placeholder until it lands. `start()` returns a leg object with
`drain()` and `async close()`, or None when the leg is not available."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


async def start(settings, manager, *args):
    log.warning("the sip leg is not built yet: sip calls are not answered")
    return None
