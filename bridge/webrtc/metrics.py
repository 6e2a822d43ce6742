"""The WebRTC leg's Prometheus metrics (`duplexline_webrtc_*`, base units, bounded labels:
an offer outcome, an end reason, a direction; never a call id).

Per-frame facts (decode errors, late packets, send resyncs) are counted in the peer's own
`PeerStats` on the hot path and added here once, when the call ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["WebRtcMetrics", "OFFER_OUTCOMES", "END_REASONS", "end_reason_label"]

OFFER_OUTCOMES = ("answered", "unauthorized", "bad-content-type", "bad-json", "not-an-offer", "too-large",
                  "bad-sdp", "no-audio", "unsupported-media", "unsupported-codec", "server-full", "busy",
                  "draining", "duplicate", "refused", "peer-failed", "too-many-pending",
                  "too-many-pending-source")
END_REASONS = ("remote-hangup", "connection-lost", "ice-timeout", "media-timeout", "operator", "shutdown",
               "drain-timeout", "offer-failed", "error", "other")
CONNECT_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def end_reason_label(reason: str) -> str:
    return reason if reason in END_REASONS else "other"


class WebRtcMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.offers = Counter("duplexline_webrtc_offers_total", "WebRTC offers, by outcome", ["outcome"], **kw)
        self.peers = Gauge("duplexline_webrtc_peers", "Open WebRTC peer connections", **kw)
        self.connect = Histogram("duplexline_webrtc_connect_seconds",
                                 "From the answer sent to the peer connection connected",
                                 buckets=CONNECT_BUCKETS, **kw)
        self.ended = Counter("duplexline_webrtc_calls_ended_total", "WebRTC calls ended, by reason",
                             ["reason"], **kw)
        self.messages = Counter("duplexline_webrtc_datachannel_messages_total",
                                "Data channel messages, by direction (in: from the page)", ["direction"], **kw)
        self.decode_errors = Counter("duplexline_webrtc_decode_errors_total",
                                     "Received Opus packets that did not decode", **kw)
        self.late_packets = Counter("duplexline_webrtc_late_packets_total",
                                    "Received packets older than one already decoded (dropped)", **kw)
        self.send_resyncs = Counter("duplexline_webrtc_send_resyncs_total",
                                    "Times a call's 20 ms send clock fell 200 ms behind and skipped ahead", **kw)
        self.handler_errors = Counter("duplexline_webrtc_audio_handler_errors_total",
                                      "Frames a call's audio handler failed on (a bug: see the call's log)", **kw)
        for outcome in OFFER_OUTCOMES:
            self.offers.labels(outcome=outcome)
        for reason in END_REASONS:
            self.ended.labels(reason=reason)
        for direction in ("in", "out"):
            self.messages.labels(direction=direction)
