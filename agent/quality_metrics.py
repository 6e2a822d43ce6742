"""Line quality metrics (`duplexline_line_*`): one sample per call, taken when it ends, by
transport (sip, webrtc). Labels are bounded; never a call id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from .store import Transport

__all__ = ["QualityMetrics"]

TRANSPORTS = tuple(str(t) for t in Transport)  # every label value, from the store's own enum
LOSS_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5)
JITTER_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
RTT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)
MOS_BUCKETS = (1.0, 2.0, 2.5, 3.0, 3.5, 3.8, 4.0, 4.2, 4.4, 4.5)


class QualityMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.loss = Histogram("duplexline_line_packet_loss_ratio",
                              "Per call: share of the caller's RTP packets that never reached the bridge",
                              ["transport"], buckets=LOSS_BUCKETS, **kw)
        self.jitter = Histogram("duplexline_line_jitter_seconds",
                                "Per call: inter-arrival jitter of the caller's RTP (RFC 3550), at the end",
                                ["transport"], buckets=JITTER_BUCKETS, **kw)
        self.rtt = Histogram("duplexline_line_rtt_seconds",
                             "Per call: round-trip time from RTCP, at the end (calls that measured one)",
                             ["transport"], buckets=RTT_BUCKETS, **kw)
        self.mos = Histogram("duplexline_line_mos",
                             "Per call: MOS estimated by the simplified ITU-T G.107 E-model (1..4.5)",
                             ["transport"], buckets=MOS_BUCKETS, **kw)
        self.concealed = Counter("duplexline_line_concealed_frames_total",
                                 "Caller frames the bridge filled with silence because none arrived",
                                 ["transport"], **kw)
        self.dead_air = Counter("duplexline_line_dead_air_total",
                                "Stretches of dead air: no caller audio for --dead-air-seconds (once each)",
                                ["transport"], **kw)
        for t in TRANSPORTS:  # every series from the start: dashboards show 0, not "no data"
            for metric in (self.loss, self.jitter, self.rtt, self.mos, self.concealed, self.dead_air):
                metric.labels(transport=t)
