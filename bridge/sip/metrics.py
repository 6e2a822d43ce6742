"""The SIP leg's Prometheus metrics, registered on the server's registry.

Labels are bounded: INVITE outcomes and outbound outcomes are fixed sets, `account` is an
account from the operator's accounts file, `direction` is in/out. Never a call id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .guard import AUTH_FAILURES
from .validate import REASONS as MALFORMED_REASONS

__all__ = ["SipMetrics", "INVITE_OUTCOMES", "OUTBOUND_OUTCOMES", "REFUSED_REASONS"]

INVITE_OUTCOMES = ("answered", "404", "486", "503", "403", "401", "rate_limited", "pending_limit", "banned",
                   "cancelled", "failed")
REFUSED_REASONS = ("rate_limited", "pending_source", "pending_total", "tcp_source", "tcp_total", "tcp_idle",
                   "tcp_partial")
OUTBOUND_OUTCOMES = ("answered", "busy", "declined", "no_answer", "failed", "refused")


class SipMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry}
        self.invites = Counter("duplexline_sip_invites_total",
                               "New inbound INVITEs by outcome (answered, 404, 486, 503, 403, 401, "
                               "rate_limited, pending_limit, banned, cancelled, failed)", ["outcome"], **kw)
        for outcome in INVITE_OUTCOMES:
            self.invites.labels(outcome=outcome)
        self.malformed = Counter("duplexline_sip_malformed_total",
                                 "SIP requests refused (400) or dropped at the front door as malformed, by "
                                 "reason", ["reason"], **kw)
        for reason in MALFORMED_REASONS:
            self.malformed.labels(reason=reason)
        self.refused = Counter("duplexline_sip_refused_total",
                               "Requests and TCP connections the front door refused or closed to protect "
                               "capacity, by reason", ["reason"], **kw)
        for reason in REFUSED_REASONS:
            self.refused.labels(reason=reason)
        self.auth_failures = Counter("duplexline_sip_auth_failures_total",
                                     "INVITEs that failed digest authentication, by reason", ["reason"], **kw)
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason=reason)
        self.auth_bans = Counter("duplexline_sip_auth_bans_total",
                                 "Temporary bans after repeated digest failures, by what was banned "
                                 "(source address or user name)", ["kind"], **kw)
        for kind in ("source", "user"):
            self.auth_bans.labels(kind=kind)
        self.reaped = Counter("duplexline_sip_calls_reaped_total",
                              "SIP calls hung up as dead, by reason (media-timeout, no-ack)", ["reason"], **kw)
        for reason in ("media-timeout", "no-ack"):
            self.reaped.labels(reason=reason)
        self.setup = Histogram("duplexline_sip_call_setup_seconds",
                               "Inbound call setup: INVITE received to 200 OK sent",
                               buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0, 2.0, 5.0), **kw)
        self.outbound = Counter("duplexline_sip_outbound_calls_total",
                                "Outbound calls by outcome", ["outcome"], **kw)
        for outcome in OUTBOUND_OUTCOMES:
            self.outbound.labels(outcome=outcome)
        self.active = Gauge("duplexline_sip_calls_active", "SIP calls with media, by direction",
                            ["direction"], **kw)
        self.registered = Gauge("duplexline_sip_registration_up",
                                "1 while the account is registered, 0 otherwise", ["account"], **kw)
        self.registration_failures = Counter("duplexline_sip_registration_failures_total",
                                             "Failed REGISTER attempts", ["account"], **kw)
        self.rtp_received = Counter("duplexline_sip_rtp_packets_received_total",
                                    "RTP packets received (counted when a call ends)", **kw)
        self.rtp_lost = Counter("duplexline_sip_rtp_packets_lost_total",
                                "RTP packets lost on the way to us, as the stack reports them", **kw)
        self.rtp_late = Counter("duplexline_sip_rtp_packets_late_total",
                                "RTP packets that reached the jitter buffer after their playout time", **kw)
        self.tick_lateness = Histogram("duplexline_sip_media_tick_lateness_seconds",
                                       "How late the shared 20 ms media tick ran",
                                       buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.1, 0.5), **kw)
        self.tick_duration = Histogram("duplexline_sip_media_tick_duration_seconds",
                                       "CPU time of one media tick over all calls",
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05), **kw)
        self.audio_warnings = Counter("duplexline_sip_audio_warnings_total",
                                      "Audio pacing warnings from the stack", ["direction"], **kw)
        self.dtmf_sent = Counter("duplexline_sip_dtmf_sent_digits_total", "DTMF digits sent", **kw)
        self.processes = Gauge("duplexline_sip_processes",
                               "Bridge processes sharing this SIP address, as this one sees them", **kw)
        self.processes.set(1)
        self.transfers = Counter("duplexline_sip_transfers_total", "Blind transfers by outcome",
                                 ["outcome"], **kw)
