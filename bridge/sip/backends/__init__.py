"""SIP stack backends: one module per SIP stack, each implementing bridge/sip/stack.py's
interface (`Stack`, `StackAccount`, `StackCall`). Today: baresip (baresip.py).
"""
