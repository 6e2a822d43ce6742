"""Per-call full-duplex sessions, session state, metrics. Knows calls, not SIP or WebRTC."""
