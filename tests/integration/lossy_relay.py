"""A lossy line between a SIP caller and the bridge, for the line-quality tests: a
loopback UDP relay that stands in for each side toward the other, like a NAT with a SIP
ALG, and drops a share of the caller's RTP packets with a seeded RNG.

    caller (baresip) ──► twin of the bridge's port ─┐    ┌─► the bridge's port
    caller's port ◄──── twin of the caller's port ◄─┴────┴── the bridge

Every endpoint the relay learns of (a SIP port, an RTP/RTCP pair from an SDP body) gets a
twin socket on 127.0.0.1; a datagram that reaches X's twin from Y goes out to X from Y's
twin. Every `127.0.0.1:PORT`, `m=audio PORT` and `a=rtcp:PORT` in a SIP message is
rewritten on the way (the sender's endpoints to their twins, the receiver's twins back to
the real ports) and Content-Length follows. So the INVITE, the answer, the stack's own
re-INVITE and every in-dialog request and response take the relay, and neither side's
media can bypass it: the bridge measures exactly what the relay let through.

One thread, one selector; `close()` stops it within its 0.1 s poll and closes every socket.
"""

from __future__ import annotations

import random
import re
import selectors
import socket
import threading

__all__ = ["LossyRelay"]

_HOST = "127.0.0.1"
_ADDR = re.compile(rb"127\.0\.0\.1:(\d+)")
_SDP_PORT = re.compile(rb"^(m=audio |a=rtcp:)(\d+)", re.M)
_LENGTH = re.compile(rb"^(Content-Length|l)[ \t]*:[ \t]*\d+", re.M | re.I)


def _bind(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((_HOST, port))
    s.setblocking(False)
    return s


def _pair() -> tuple[socket.socket, socket.socket]:
    """Two sockets on an even port and the next one: RTP and RTCP (RFC 3550's pairing)."""
    for _ in range(200):
        rtp = _bind()
        port = rtp.getsockname()[1]
        if port % 2 == 0 and port < 65535:
            try:
                return rtp, _bind(port + 1)
            except OSError:
                pass
        rtp.close()
    raise OSError("no free even/odd port pair on 127.0.0.1")


def _is_rtp(data: bytes) -> bool:
    # RTP version 2, and not RTCP (packet types 192-223 sit where RTP has marker + type).
    return len(data) >= 12 and data[0] >> 6 == 2 and not 192 <= data[1] <= 223


class LossyRelay:
    """`sip_port`: where the caller dials instead of the bridge. `loss`: the share of the
    caller's RTP packets dropped on the way to the bridge (the other way is clean)."""

    def __init__(self, bridge_sip_port: int, *, loss: float = 0.05, seed: int = 1) -> None:
        self.loss = loss
        self.rtp_forwarded = 0  # caller -> bridge RTP packets the relay passed on
        self.rtp_dropped = 0  # ... and dropped
        self._rng = random.Random(seed)
        self._sel = selectors.DefaultSelector()
        self._twin: dict[int, socket.socket] = {}  # real port -> its twin socket
        self._real: dict[int, int] = {}  # twin port -> real port
        self._side: dict[int, str] = {}  # real port -> "caller" | "bridge"
        self._stop = False
        self.sip_port = self._learn(bridge_sip_port, "bridge")
        self._thread = threading.Thread(target=self._run, name="lossy-relay", daemon=True)

    def __enter__(self) -> "LossyRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for s in list(self._twin.values()):
            self._sel.unregister(s)
            s.close()
        self._twin.clear()

    @property
    def measured_loss(self) -> float:
        total = self.rtp_forwarded + self.rtp_dropped
        return self.rtp_dropped / total if total else 0.0

    # ---- endpoints ---------------------------------------------------------------------

    def _learn(self, port: int, side: str, twin: socket.socket | None = None) -> int:
        """The twin port of a real endpoint (made on first sight)."""
        if port in self._twin:
            return self._twin[port].getsockname()[1]
        twin = twin or _bind()
        self._twin[port] = twin
        self._side[port] = side
        self._real[twin.getsockname()[1]] = port
        self._sel.register(twin, selectors.EVENT_READ, port)
        return twin.getsockname()[1]

    def _learn_media(self, rtp_port: int, side: str) -> None:
        if rtp_port not in self._twin:
            rtp, rtcp = _pair()
            self._learn(rtp_port, side, rtp)
            self._learn(rtp_port + 1, side, rtcp)

    # ---- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(timeout=0.1):
                try:
                    data, (host, src) = key.fileobj.recvfrom(65535)
                except OSError:
                    continue
                self._forward(data, src, key.data)

    def _forward(self, data: bytes, src: int, dest: int) -> None:
        """`data` from real port `src` reached the twin of real port `dest`."""
        dest_side = self._side[dest]
        src_side = "bridge" if dest_side == "caller" else "caller"
        self._learn(src, src_side)
        if data[:1].isalpha():
            data = self._rewrite(data, src_side, dest_side)
        elif src_side == "caller" and _is_rtp(data):
            if self._rng.random() < self.loss:
                self.rtp_dropped += 1
                return
            self.rtp_forwarded += 1
        try:
            self._twin[src].sendto(data, (_HOST, dest))
        except OSError:
            pass  # the far end is gone: a datagram lost, as on a real line

    def _rewrite(self, msg: bytes, src_side: str, dest_side: str) -> bytes:
        """A SIP message on its way from `src_side` to `dest_side`."""
        head, sep, body = msg.partition(b"\r\n\r\n")
        for m in _SDP_PORT.finditer(body):
            if m.group(1) == b"m=audio ":
                self._learn_media(int(m.group(2)), src_side)

        def port(p: int) -> int:
            if p in self._real and self._side[self._real[p]] == dest_side:
                return self._real[p]  # a twin of the receiver's: back to the real port
            if p in self._real or self._side.get(p) == dest_side:
                return p  # already a twin, or the receiver's own port
            return self._learn(p, self._side.get(p, src_side))

        head = _ADDR.sub(lambda m: b"%s:%d" % (_HOST.encode(), port(int(m.group(1)))), head)
        body = _ADDR.sub(lambda m: b"%s:%d" % (_HOST.encode(), port(int(m.group(1)))), body)
        body = _SDP_PORT.sub(lambda m: m.group(1) + b"%d" % port(int(m.group(2))), body)
        if sep:
            head = _LENGTH.sub(lambda m: m.group(1) + b": %d" % len(body), head)
        return head + sep + body
