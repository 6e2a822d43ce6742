"""The bridge-worker protocol's messages (model/worker_protocol.py, docs/worker.md): what is
packed is what is unpacked (callers' audio, which came from int16 frames, sample for
sample; the decoder's audio as the 16 bits the bridge's line plays, and the line plays it
exactly as it plays the decoder's float32), the bytes are the layout docs/worker.md
describes (messages built here by hand, with struct, not by the module), and every
malformed message raises ProtocolError (the connection is closed), never another
exception or a wrong value."""

from __future__ import annotations

import asyncio
import socket
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.line_audio import LineAudio
from model.voice import VoiceChunk
from model.worker_protocol import (AUDIO, MAX_ITEMS, PIECE_BYTES, RESULTS, VERSION, ProtocolError, control,
                                   line_pcm16, pack_audio, pack_results, parse_control, pieces, unpack_audio,
                                   unpack_results)

PREFIX = struct.Struct("<2sBBI")  # b"DL", version, kind, items
INT32_MAX = 2**31 - 1


def frames_audio(samples) -> np.ndarray:
    """What the agent hands a session: int16 frames times 1/32768, float32."""
    return np.asarray(samples).astype(np.int16) * np.float32(1.0 / 32768.0)


def raw(kind: int, items: int, ints=(), samples=(), *, magic: bytes = b"DL", version: int = VERSION) -> bytes:
    """A binary message by hand: the prefix, int32s (the tables, the ids), int16 samples."""
    return (PREFIX.pack(magic, version, kind, items) + struct.pack(f"<{len(ints)}i", *ints)
            + struct.pack(f"<{len(samples)}h", *samples))


# ---- the layout ------------------------------------------------------------------------------------


def test_audio_message_is_the_documented_layout():
    items = [(7, 9, frames_audio([1, -2, 32767])), (8, 10, frames_audio([])), (INT32_MAX, INT32_MAX,
                                                                                frames_audio([-32768]))]
    assert pack_audio(items) == raw(AUDIO, 3, [7, 9, 3, 8, 10, 0, INT32_MAX, INT32_MAX, 1], [1, -2, 32767, -32768])


def test_results_message_is_the_documented_layout():
    items = [(3, 10, [VoiceChunk((5, 6), (-1, 4095, 0), frames_audio([100, -100])),
                      VoiceChunk((), (7,), frames_audio([32767]), dropped=True)]),
             (4, 11, []),
             (5, 12, [VoiceChunk((1,), (), frames_audio([]))])]
    table = [3, 10, 2, 4, 11, 0, 5, 12, 1]
    chunks = [2, 3, 2, 0, 0, 1, 1, 1, 1, 0, 0, 0]  # text ids, speech codes, samples, dropped
    ids = [5, 6, -1, 4095, 0, 7, 1]
    assert pack_results(items) == raw(RESULTS, 3, table + chunks + ids, [100, -100, 32767])


def test_hand_built_results_unpack_as_documented():
    got = unpack_results(raw(RESULTS, 2, [1, 2, 1, 9, 8, 2] + [1, 2, 3, 0, 0, 1, 0, 1, 0, 0, 2, 0]
                             + [40, -1, 4095, 77], [1, -1, 32767, -32768, 0]))
    assert [(sid, seq, len(c)) for sid, seq, c in got] == [(1, 2, 1), (9, 8, 2)]
    first, second, third = got[0][2][0], *got[1][2]
    assert (first.text_ids, first.speech_codes, first.dropped) == ((40,), (-1, 4095), False)
    assert first.pcm.tolist() == [1 / 32768, -1 / 32768, 32767 / 32768]
    assert (second.text_ids, second.speech_codes, second.dropped, len(second.pcm)) == ((), (77,), True, 0)
    assert (third.text_ids, third.speech_codes, third.dropped) == ((), (), False)
    assert third.pcm.tolist() == [-1.0, 0.0]


# ---- round trips -----------------------------------------------------------------------------------


def test_audio_round_trip_is_exact_for_every_int16_value():
    every = np.arange(-32768, 32768, dtype=np.int64)
    rng = np.random.default_rng(0)
    items = [(1, 7, frames_audio(every)),
             (42, 1, frames_audio(rng.integers(-32768, 32768, 3520))),  # a first chunk (with look-ahead)
             (3, 99, frames_audio(np.zeros(0))),  # nothing: allowed
             (INT32_MAX, INT32_MAX, frames_audio(np.array([-32768, 32767, 0, 1, -1])))]
    back = unpack_audio(pack_audio(items))
    assert [(sid, seq) for sid, seq, _ in back] == [(sid, seq) for sid, seq, _ in items]
    assert all(type(sid) is int and type(seq) is int for sid, seq, _ in back)
    for (_, _, sent), (_, _, got) in zip(items, back):
        assert got.dtype == np.float32
        assert got.shape == sent.shape
        assert np.array_equal(got.view(np.int32), sent.view(np.int32)), "not bit-exact"
        assert np.array_equal(np.round(got * 32768).astype(np.int64), np.round(sent * 32768).astype(np.int64))


def test_audio_out_of_range_is_clipped_not_wrapped():
    (_, _, got), = unpack_audio(pack_audio([(1, 1, np.array([1.5, -1.5, 1.0, -1.0], np.float32))]))
    assert got.tolist() == [32767 / 32768, -1.0, 32767 / 32768, -1.0]


def test_audio_between_int16_steps_is_rounded_to_the_nearest():
    steps = np.array([0.4, 0.6, -0.4, -0.6, 1.5, 2.5, 32766.7, -32767.6], np.float32) / np.float32(32768)
    (_, _, got), = unpack_audio(pack_audio([(1, 1, steps)]))
    assert (got * 32768).tolist() == [0, 1, 0, -1, 2, 2, 32767, -32768]  # half to even, as np.rint


def test_empty_audio_message_round_trips():
    assert unpack_audio(pack_audio([])) == []
    assert unpack_results(pack_results([])) == []


def test_results_round_trip_is_what_the_line_makes_of_the_audio():
    # Tokens exactly; audio as the 16 bits the bridge's line makes of it (line_pcm16),
    # back as float32 k / 32768 bit for bit.
    rng = np.random.default_rng(1)
    weird = np.array([np.inf, -np.inf, -0.0, 1e-45, np.finfo(np.float32).max, -1.0, 1.0, 0.99999, -0.99999,
                      np.nan], np.float32)
    chunks_a = [VoiceChunk((5, 6, 7), (100, -1, 4095, 0), rng.standard_normal(4800).astype(np.float32)),
                VoiceChunk((0, INT32_MAX), (-1, -1), weird, dropped=True)]
    chunks_b = [VoiceChunk((), (), np.zeros(0, np.float32))]
    items = [(3, 10, chunks_a), (4, 11, chunks_b), (5, 12, [])]
    with np.errstate(over="ignore", invalid="ignore"):  # inf and nan: what the line would make of them
        back = unpack_results(pack_results(items))
        expected = [[line_pcm16(c.pcm) for c in chunks] for _, _, chunks in items]
    assert [(sid, seq, len(c)) for sid, seq, c in back] == [(3, 10, 2), (4, 11, 1), (5, 12, 0)]
    for (_, _, sent), (_, _, got), want in zip(items, back, expected):
        for s, g, w in zip(sent, got, want):
            assert g.text_ids == s.text_ids and g.speech_codes == s.speech_codes and g.dropped is s.dropped
            assert type(g.text_ids) is tuple and type(g.speech_codes) is tuple
            assert all(type(t) is int for t in g.text_ids + g.speech_codes)
            assert g.pcm.dtype == np.float32 and g.pcm.shape == s.pcm.shape
            assert g.pcm.tobytes() == (w * np.float32(1 / 32768)).astype(np.float32).tobytes()
    assert back[0][2][1].pcm[:-1].tolist() == [32767 / 32768, -1.0, 0.0, 0.0, 32767 / 32768, -1.0, 32767 / 32768,
                                               32767 / 32768, -32767 / 32768]  # clipped, truncated
    assert not np.array_equal(back[0][2][0].pcm, chunks_a[0].pcm)  # 16 bits, not the float itself


@pytest.mark.parametrize("sid, seq, ids", [(2**31, 1, ()), (1, 2**31, ()), (1, 1, (2**31,)), (1, 1, (-2**31 - 1,))])
def test_values_outside_int32_are_refused_when_packed(sid, seq, ids):
    with pytest.raises(ProtocolError, match="int32"):
        pack_results([(sid, seq, [VoiceChunk(ids, (), np.zeros(1, np.float32))])])
    if not ids:
        with pytest.raises(ProtocolError, match="int32"):
            pack_audio([(sid, seq, np.zeros(1, np.float32))])


def line_plays(pcm: np.ndarray, rate: int = 22050) -> np.ndarray:
    """The int16 samples the bridge's line plays for `pcm` at its own rate (no resampling)."""
    line = LineAudio(rate, max_playout_ms=1000.0 * len(pcm) / rate + 1000.0)
    with np.errstate(over="ignore", invalid="ignore"):
        line.play(pcm, rate)
    frame = rate // 50
    return np.concatenate([line.next_frame() for _ in range(-(-len(pcm) // frame))])[:len(pcm)]


def test_line_pcm16_is_what_the_line_plays():
    # The remote audio must sound exactly like the local one: the line plays the decoder's
    # float32 and the worker's int16 (back as k / 32768) as the same samples. Fails if
    # either conversion changes alone (rounding instead of truncation, another scale).
    edges = np.arange(-32769, 32769, dtype=np.float64) / 32768
    near = np.concatenate([np.nextafter(edges.astype(np.float32), np.float32(np.inf)),
                           np.nextafter(edges.astype(np.float32), np.float32(-np.inf)), edges.astype(np.float32)])
    rng = np.random.default_rng(2)
    pcm = np.concatenate([near, rng.uniform(-1.2, 1.2, 20000).astype(np.float32),
                          np.array([np.inf, -np.inf, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32)])
    with np.errstate(over="ignore"):
        sent = line_pcm16(pcm)
        packed = unpack_results(pack_results([(1, 1, [VoiceChunk((), (), pcm)])]))[0][2][0].pcm
    played = line_plays(pcm)
    assert np.array_equal(played, line_plays(sent * np.float32(1 / 32768)))
    assert np.array_equal(played, sent)
    assert np.array_equal(packed, sent * np.float32(1 / 32768))  # pack_results converts as line_pcm16 does
    assert len(np.unique(played)) == 65536  # every int16 value came up: the comparison covers them


def test_control_round_trip():
    text = control("align", sid=3, age=0.125, frame=0.02)
    assert parse_control(text) == {"t": "align", "sid": 3, "age": 0.125, "frame": 0.02}


# ---- malformed messages ----------------------------------------------------------------------------

GOOD_AUDIO = pack_audio([(1, 1, frames_audio(np.arange(10))), (2, 1, frames_audio(np.arange(3)))])
GOOD_RESULTS = pack_results([(1, 1, [VoiceChunk((1,), (2, 3), np.ones(4, np.float32))]),
                             (2, 1, [VoiceChunk((4,), (), np.ones(2, np.float32), dropped=True)])])
TABLE_BYTES = {AUDIO: 4 * 6, RESULTS: 4 * (6 + 8 + 4)}  # the int32s before the samples in the two above


@pytest.mark.parametrize("kind, unpack, good", [(AUDIO, unpack_audio, GOOD_AUDIO), (RESULTS, unpack_results,
                                                                                     GOOD_RESULTS)],
                         ids=["audio", "results"])
class TestMalformedBinary:
    def test_good_message_parses(self, kind, unpack, good):
        assert len(unpack(good)) == 2
        assert len(good) == PREFIX.size + TABLE_BYTES[kind] + 2 * (13 if kind == AUDIO else 6)

    def test_wrong_magic(self, kind, unpack, good):
        with pytest.raises(ProtocolError, match="prefix"):
            unpack(b"XL" + good[2:])

    def test_wrong_version(self, kind, unpack, good):
        for version in (0, 2, VERSION + 1, 255):
            with pytest.raises(ProtocolError, match="version"):
                unpack(good[:2] + bytes([version]) + good[3:])

    def test_wrong_kind(self, kind, unpack, good):
        for other in ({AUDIO, RESULTS} - {kind}).pop(), 0, 3, 255:
            with pytest.raises(ProtocolError, match="kind"):
                unpack(good[:3] + bytes([other]) + good[4:])

    def test_shorter_than_prefix(self, kind, unpack, good):
        for n in range(PREFIX.size):
            with pytest.raises(ProtocolError, match="prefix"):
                unpack(good[:n])

    def test_truncated_anywhere(self, kind, unpack, good):
        # Cut in the tables, the ids or the samples: refused, never read short.
        for n in range(PREFIX.size, len(good)):
            with pytest.raises(ProtocolError, match="past"):
                unpack(good[:n])

    def test_trailing_bytes(self, kind, unpack, good):
        for extra in (b"\x00", b"\x00" * 2, b"\x00" * 4, b"junk" * 100):
            with pytest.raises(ProtocolError, match="longer"):
                unpack(good + extra)

    def test_item_count_past_the_table(self, kind, unpack, good):
        for items in (3, 100, MAX_ITEMS):
            with pytest.raises(ProtocolError):
                unpack(good[:4] + struct.pack("<I", items) + good[8:])

    def test_too_many_items(self, kind, unpack, good):
        empty = [1, 1, 0] * MAX_ITEMS  # sessions with nothing: allowed, up to MAX_ITEMS
        assert len(unpack(raw(kind, MAX_ITEMS, empty))) == MAX_ITEMS
        for items in (MAX_ITEMS + 1, 2**32 - 1):
            with pytest.raises(ProtocolError, match="items"):
                unpack(raw(kind, items, empty + [1, 1, 0]))

    def test_negative_sid_or_seq(self, kind, unpack, good):
        for at in (0, 1, 3, 4):  # sid, seq of the first and the second item
            with pytest.raises(ProtocolError, match="negative"):
                unpack(poke(good, at, -1))

    def test_negative_or_huge_count(self, kind, unpack, good):
        # The first item's samples (audio) or chunks (results): below zero, or past the
        # payload however large (int32 sums cannot wrap round to a plausible length).
        for count in (-1, -2**31, 2**31 - 1, 2**30):
            with pytest.raises(ProtocolError, match="negative|past"):
                unpack(poke(good, 2, count))
        every = raw(kind, 3, [1, 1, INT32_MAX] * 3)
        with pytest.raises(ProtocolError, match="past"):
            unpack(every)


def poke(message: bytes, index: int, value: int) -> bytes:
    """`message` with its int32 number `index` (after the prefix) set to `value`."""
    at = PREFIX.size + 4 * index
    return message[:at] + struct.pack("<i", value) + message[at + 4:]


@pytest.mark.parametrize("index", [6, 7, 8, 10, 11, 12])  # text, speech, samples of either chunk
@pytest.mark.parametrize("value", [-1, -2**31, 2**31 - 1, 1000])
def test_bad_chunk_count(index, value):
    with pytest.raises(ProtocolError, match="negative|past|longer"):
        unpack_results(poke(GOOD_RESULTS, index, value))


@pytest.mark.parametrize("value", [2, -1, 255, 2**31 - 1])
def test_dropped_flag_is_0_or_1(value):
    for index in (9, 13):
        with pytest.raises(ProtocolError, match="negative|dropped"):
            unpack_results(poke(GOOD_RESULTS, index, value))


def test_counts_shifted_between_chunks_are_refused_or_read_as_sent():
    # Samples moved from one chunk to the other still add up: a different message, read
    # as exactly that (the tables say where each chunk's audio is), never past its end.
    moved = unpack_results(poke(poke(GOOD_RESULTS, 8, 5), 12, 1))
    assert [len(c.pcm) for _, _, cs in moved for c in cs] == [5, 1]
    with pytest.raises(ProtocolError):
        unpack_results(poke(GOOD_RESULTS, 8, 5))  # one more sample than the payload holds


def test_ids_may_be_negative_counts_may_not():
    # Speech codes are -1 when silent: ids are any int32; a count is never negative.
    assert unpack_results(poke(GOOD_RESULTS, 14, -2**31))[0][2][0].text_ids == (-2**31,)


@pytest.mark.parametrize("text", ["", "not json", "[]", '"ping"', "7", '{"sid": 1}', '{"t": 3}', '{"t": null}',
                                  "\ud800"])
def test_bad_control(text):
    with pytest.raises(ProtocolError):
        parse_control(text)


def test_per_pass_sends_what_one_pass_of_the_loop_added_as_one_message():
    from model.worker_protocol import PerPass

    async def main():
        loop = asyncio.get_running_loop()
        sent: list[list[int]] = []
        batch = PerPass(loop, sent.append)
        for i in range(3):
            batch.add(i)  # the same pass: one message
        assert sent == []  # nothing before the pass ends
        await asyncio.sleep(0)
        batch.add(3)
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # an empty pass sends nothing
        return sent

    assert asyncio.run(main()) == [[0, 1, 2], [3]]


# ---- a tick in pieces ------------------------------------------------------------------------------


def test_pieces_keep_order_and_the_limit():
    sizes = [50, 50, 50, 300, 10, 90, 1, 100]
    got = list(pieces(list(range(len(sizes))), sizes.__getitem__, limit=100))
    assert got == [[0, 1], [2], [3], [4, 5], [6], [7]]  # one item over the limit travels alone
    assert list(pieces([], len)) == []


class PausingSocket:
    """A WebSocket whose first send waits (a full socket: aiohttp's send waits to drain)."""

    def __init__(self, unpack) -> None:
        self.unpack = unpack
        self.closed = False
        self.sent: list[list] = []
        self.release = asyncio.Event()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(self.unpack(data))
        if len(self.sent) == 1:
            await self.release.wait()


async def passes_until(check, passes: int = 50) -> None:
    """Let the event loop run until `check()`, for a bounded number of passes (no clock)."""
    for _ in range(passes):
        if check():
            return
        await asyncio.sleep(0)
    assert check()


async def two_batches(link, ws, add) -> list[list]:
    """A tick of 40 sessions in one pass, then (while its first message waits on the
    socket) another of 40: the messages, as sent."""
    for sid in range(40):
        add(sid, 1)
    await passes_until(lambda: ws.sent)
    for sid in range(40):
        add(sid, 2)
    for _ in range(10):
        await asyncio.sleep(0)  # passes of the loop: the second batch is flushed and its task started
    ws.release.set()
    await passes_until(lambda: sum(len(m) for m in ws.sent) == 80)
    return ws.sent


def assert_in_pieces_and_in_order(sent: list[list], nbytes) -> None:
    assert len(sent) > 2  # a tick went in several messages
    assert all(sum(nbytes(item) for item in m) <= PIECE_BYTES for m in sent)
    order = [(item[1], item[0]) for m in sent for item in m]
    assert order == [(seq, sid) for seq in (1, 2) for sid in range(40)]  # no session's chunk overtakes another


def test_a_bridge_sends_a_tick_in_pieces_one_batch_after_the_other():
    from model import worker_client

    async def main():
        ws = PausingSocket(unpack_audio)
        link = worker_client._Link(SimpleNamespace(), "w", ws)  # the parts _write_audio uses
        chunk = np.zeros(3200, np.float32)  # 6.4 kB of int16: a 128 kB piece holds 20
        return await two_batches(link, ws, lambda sid, seq: link.queue_audio(sid, seq, chunk))

    assert_in_pieces_and_in_order(asyncio.run(main()), lambda item: 2 * len(item[2]))


def test_a_worker_sends_a_tick_of_results_in_pieces_one_batch_after_the_other():
    from model import worker_server

    async def main():
        ws = PausingSocket(unpack_results)
        link = worker_server._Link(SimpleNamespace(), ws, "bridge")
        chunk = VoiceChunk((1, 2), tuple(range(10)), np.zeros(4410, np.float32))
        return await two_batches(link, ws, lambda sid, seq: link._results.add((sid, seq, [chunk])))

    assert_in_pieces_and_in_order(asyncio.run(main()), lambda item: 2 * sum(len(c.pcm) for c in item[2]))


def test_a_bridge_refuses_a_worker_of_another_version():
    from aiohttp import WSMsgType, web
    from prometheus_client import CollectorRegistry

    from model.errors import EngineFull
    from model.worker_client import RemoteVoiceEngine

    async def main():
        seen: list = []

        async def ws_handler(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str(control("hello", version=VERSION - 1, worker_id="old", model_id="m", slots=4,
                                      chunk_seconds=0.2, decoder_rate=22050, silent_text=0, lead_seconds=0.0,
                                      draining=False))
            seen.append((await ws.receive(timeout=5)).type)  # the bridge hangs up, sends nothing
            return ws

        app = web.Application()
        app.add_routes([web.get("/ws", ws_handler)])
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        registry = CollectorRegistry()
        engine = RemoteVoiceEngine(registry, bridge_id="b", urls=["127.0.0.1:%d" % sock.getsockname()[1]])
        await engine.start()
        try:
            with pytest.raises(EngineFull) as refused:
                await engine.open_session()
            assert "unreachable" in str(refused.value)
            assert registry.get_sample_value("duplexline_engine_placements_total", {"outcome": "unreachable"}) == 1
        finally:
            await engine.close()
            await runner.cleanup()
        return seen

    assert asyncio.run(main()) == [WSMsgType.CLOSE]
