"""The WebRTC leg: browser calls over aiortc, signaled over the bridge's HTTP server.
docs/webrtc.md; the module map is docs/architecture.md.
"""
