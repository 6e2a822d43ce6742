"""The bridge: SIP and WebRTC legs, the media DSP, and the command line (composition root).

Imports go bridge -> agent -> model, never back.
"""
