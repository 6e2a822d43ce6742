"""The SIP leg: the front door (front.py) in front of a SIP stack (stack.py, the interface;
backends/, one module per SIP stack), one `SipCall` per call, registrations, call control
over HTTP. docs/sip.md; the module map is docs/architecture.md.
"""
