"""A MOS estimate from what the line's stack measures: the ITU-T G.107 E-model, simplified
as it is commonly used for VoIP monitoring. Pure functions, no state.

    d      = RTT/2 + 2·jitter + 20 ms        one-way delay: network, a jitter buffer of twice
                                              the jitter, one 20 ms packet
    Id     = 0.024·d + 0.11·(d − 177.3)·H(d − 177.3)
                                              delay impairment (Cole & Rosenbluth, "Voice over
                                              IP performance monitoring", ACM SIGCOMM CCR 2001:
                                              their fit of G.107's Id; H is the unit step)
    Ie,eff = Ie + (95 − Ie)·Ppl / (Ppl + Bpl)  loss impairment, G.107 (2015) eq. 7-29 with random
                                              loss (BurstR = 1); Ppl in percent
    R      = 93.2 − Id − Ie,eff               93.2: G.107's R with every other parameter at its
                                              default (Ro − Is, A = 0)
    MOS    = 1 + 0.035·R + 7·10⁻⁶·R·(R − 60)·(100 − R), 1 below R = 0, 4.5 above R = 100
                                              G.107 Annex B

Ie and Bpl per codec are G.113 Appendix I's for G.711 (Ie 0; Bpl 4.3 without packet loss
concealment, 25.1 with). The bridge hears a lost G.711 or G.722 packet as silence, so
those get 4.3. G.722 is wideband, which the narrowband E-model does not rate (G.107.1
does); it is scored here as G.711, an underestimate of its quality. Opus is not in G.113;
libopus conceals lost frames, so it is scored as G.711 with concealment. So the number
compares calls and flags bad lines; it is not a listening test.
"""

from __future__ import annotations

__all__ = ["CODEC_IMPAIRMENT", "r_factor", "mos_from_r", "mos"]

PACKET_MS = 20.0
R_DEFAULT = 93.2
# codec -> (Ie, Bpl); unknown codecs are scored as G.711
CODEC_IMPAIRMENT = {"pcmu": (0.0, 4.3), "pcma": (0.0, 4.3), "g722": (0.0, 4.3), "opus": (0.0, 25.1)}


def r_factor(rtt_ms: float, jitter_ms: float, loss: float, codec: str | None = None) -> float:
    """R (0..100) for a round trip, an inter-arrival jitter (both ms) and a packet loss
    fraction (0..1)."""
    ie, bpl = CODEC_IMPAIRMENT.get(codec or "", CODEC_IMPAIRMENT["pcmu"])
    d = max(0.0, rtt_ms) / 2 + 2 * max(0.0, jitter_ms) + PACKET_MS
    delay = 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)
    ppl = 100.0 * min(1.0, max(0.0, loss))
    equipment = ie + (95.0 - ie) * ppl / (ppl + bpl)
    return max(0.0, min(100.0, R_DEFAULT - delay - equipment))


def mos_from_r(r: float) -> float:
    """G.107 Annex B: R to an estimated MOS (1.0 .. 4.5)."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return max(1.0, 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r))


def mos(rtt_ms: float, jitter_ms: float, loss: float, codec: str | None = None) -> float:
    return mos_from_r(r_factor(rtt_ms, jitter_ms, loss, codec))
