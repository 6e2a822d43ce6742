"""The bridge-worker protocol's messages (model/worker_protocol.py, docs/worker.md): what is
packed is what is unpacked (callers' audio, which came from int16 frames, sample for
sample; the decoder's audio as the 16 bits the bridge's line plays, and the line plays it
exactly as it plays the decoder's float32), and every malformed message raises
ProtocolError (the connection is closed), never another exception or a wrong value."""

from __future__ import annotations

import asyncio
import json
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

PREFIX = struct.Struct("<2sBBI")


def frames_audio(samples: np.ndarray) -> np.ndarray:
    """What the agent hands a session: int16 frames times 1/32768, float32."""
    return samples.astype(np.int16) * np.float32(1.0 / 32768.0)


def raw(kind: int, header, payload: bytes = b"", *, magic: bytes = b"DL", version: int = VERSION,
        head_len: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(magic, version, kind, len(head) if head_len is None else head_len) + head + payload


# ---- round trips -----------------------------------------------------------------------------------


def test_audio_round_trip_is_exact_for_every_int16_value():
    every = np.arange(-32768, 32768, dtype=np.int64)
    rng = np.random.default_rng(0)
    items = [(1, 7, frames_audio(every)),
             (42, 1, frames_audio(rng.integers(-32768, 32768, 3520))),  # a first chunk (with look-ahead)
             (3, 99, frames_audio(np.zeros(0))),  # nothing: allowed
             (2**31, 2**40, frames_audio(np.array([-32768, 32767, 0, 1, -1])))]
    back = unpack_audio(pack_audio(items))
    assert [(sid, seq) for sid, seq, _ in back] == [(sid, seq) for sid, seq, _ in items]
    for (_, _, sent), (_, _, got) in zip(items, back):
        assert got.dtype == np.float32
        assert got.shape == sent.shape
        assert np.array_equal(got.view(np.int32), sent.view(np.int32)), "not bit-exact"
        assert np.array_equal(np.round(got * 32768).astype(np.int64), np.round(sent * 32768).astype(np.int64))


def test_audio_out_of_range_is_clipped_not_wrapped():
    (_, _, got), = unpack_audio(pack_audio([(1, 1, np.array([1.5, -1.5, 1.0, -1.0], np.float32))]))
    assert got.tolist() == [32767 / 32768, -1.0, 32767 / 32768, -1.0]


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
                VoiceChunk((0,), (-1, -1), weird, dropped=True)]
    chunks_b = [VoiceChunk((), (), np.zeros(0, np.float32))]
    items = [(3, 10, chunks_a), (4, 11, chunks_b), (5, 12, [])]
    with np.errstate(over="ignore", invalid="ignore"):  # inf and nan: what the line would make of them
        back = unpack_results(pack_results(items))
        expected = [[line_pcm16(c.pcm) for c in chunks] for _, _, chunks in items]
    assert [(sid, seq, len(c)) for sid, seq, c in back] == [(3, 10, 2), (4, 11, 1), (5, 12, 0)]
    for (_, _, sent), (_, _, got), want in zip(items, back, expected):
        for s, g, w in zip(sent, got, want):
            assert g.text_ids == s.text_ids and g.speech_codes == s.speech_codes and g.dropped == s.dropped
            assert all(type(t) is int for t in g.text_ids + g.speech_codes)
            assert g.pcm.dtype == np.float32 and g.pcm.shape == s.pcm.shape
            assert g.pcm.tobytes() == (w * np.float32(1 / 32768)).astype(np.float32).tobytes()
    assert back[0][2][1].pcm[:-1].tolist() == [32767 / 32768, -1.0, 0.0, 0.0, 32767 / 32768, -1.0, 32767 / 32768,
                                               32767 / 32768, -32767 / 32768]  # clipped, truncated
    assert not np.array_equal(back[0][2][0].pcm, chunks_a[0].pcm)  # 16 bits, not the float itself


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
    played = line_plays(pcm)
    assert np.array_equal(played, line_plays(sent * np.float32(1 / 32768)))
    assert np.array_equal(played, sent)
    assert len(np.unique(played)) == 65536  # every int16 value came up: the comparison covers them


def test_control_round_trip():
    text = control("align", sid=3, age=0.125, frame=0.02)
    assert parse_control(text) == {"t": "align", "sid": 3, "age": 0.125, "frame": 0.02}


# ---- malformed messages ----------------------------------------------------------------------------

GOOD_AUDIO = pack_audio([(1, 1, frames_audio(np.arange(10)))])
GOOD_RESULTS = pack_results([(1, 1, [VoiceChunk((1,), (2,), np.ones(4, np.float32))])])


@pytest.mark.parametrize("unpack, good", [(unpack_audio, GOOD_AUDIO), (unpack_results, GOOD_RESULTS)],
                         ids=["audio", "results"])
class TestMalformedBinary:
    def test_good_message_parses(self, unpack, good):
        assert len(unpack(good)) == 1

    def test_wrong_magic(self, unpack, good):
        with pytest.raises(ProtocolError, match="prefix"):
            unpack(b"XL" + good[2:])

    def test_wrong_version(self, unpack, good):
        for version in (0, VERSION + 1, 255):
            with pytest.raises(ProtocolError, match="version"):
                unpack(good[:2] + bytes([version]) + good[3:])

    def test_wrong_kind(self, unpack, good):
        other = RESULTS if unpack is unpack_audio else AUDIO
        for kind in (other, 0, 3, 255):
            with pytest.raises(ProtocolError, match="kind"):
                unpack(good[:3] + bytes([kind]) + good[4:])

    def test_shorter_than_prefix(self, unpack, good):
        for n in range(PREFIX.size):
            with pytest.raises(ProtocolError):
                unpack(good[:n])

    def test_header_not_json(self, unpack, good):
        kind = AUDIO if unpack is unpack_audio else RESULTS
        for header in (b"not json", b"\xff\xfe{}", b"", b'{"items": [1, 2', b"[]", b'"items"', b"{}", b"null",
                       b'{"items": {"a": 1}}', b'{"items": 7}'):
            with pytest.raises(ProtocolError):
                unpack(raw(kind, header))

    def test_header_length_past_the_message(self, unpack, good):
        n = PREFIX.unpack_from(good)[3]
        body = good[PREFIX.size:]
        for extra in (1, 100, 2**32 - 1 - n):
            with pytest.raises(ProtocolError):
                unpack(good[:4] + struct.pack("<I", n + extra) + body)

    def test_header_length_past_the_message_with_an_empty_payload(self, unpack, good):
        # The header alone is valid JSON: a length past the end must still be refused.
        kind = AUDIO if unpack is unpack_audio else RESULTS
        head = b'{"items":[]}'
        with pytest.raises(ProtocolError):
            unpack(raw(kind, head, head_len=len(head) + 8))

    def test_samples_past_the_payload(self, unpack, good):
        with pytest.raises(ProtocolError, match="past"):
            unpack(good[:-1])
        with pytest.raises(ProtocolError, match="past"):
            unpack(good[:-4])

    def test_trailing_bytes(self, unpack, good):
        for extra in (b"\x00", b"\x00" * 4, b"junk" * 100):
            with pytest.raises(ProtocolError):
                unpack(good + extra)

    def test_too_many_items(self, unpack, good):
        kind = AUDIO if unpack is unpack_audio else RESULTS
        item = [1, 1, 0] if unpack is unpack_audio else [1, 1, []]
        assert len(unpack(raw(kind, {"items": [item] * MAX_ITEMS}))) == MAX_ITEMS
        with pytest.raises(ProtocolError, match="items"):
            unpack(raw(kind, {"items": [item] * (MAX_ITEMS + 1)}))


@pytest.mark.parametrize("item", [[1, 1], [1, 1, 2, 3], [1, "x", 0], 7, None, {"sid": 1}, "123", [1, 1, -1],
                                  [1, 1, None], [1.5, 1, 0], [1, 1, 0.5], [1, 1, 2.0], [True, 1, 0], [1, 1, True],
                                  ["1", 1, 0], [1, [1], 0]])
def test_bad_audio_item(item):
    # Whatever the payload (none, or as long as a loose reading of the item would want),
    # a malformed item is refused, never read as something else.
    loose = 2 * int(item[2]) if isinstance(item, list) and len(item) == 3 and isinstance(item[2], (int, float)) \
        and item[2] >= 0 else 6
    for payload in (b"", b"\x00" * loose):
        with pytest.raises(ProtocolError):
            unpack_audio(raw(AUDIO, {"items": [item]}, payload))


@pytest.mark.parametrize("item", [
    [1, 1], [1, 1, [], 4], 7, None, "abc", [1, 1, 5], [1, 1, [5]], [1, 1, [[[1], [2], False]]],
    [1, 1, [[[1], [2], False, -1]]], [1, 1, [[[1], [2], False, "4"]]], [1, 1, [[[1], [2], False, 1.5]]],
    [1, 1, [[1, [2], False, 1]]], [1, 1, [[["a"], [2], False, 1]]], [1, 1, [[[1], [2.5], False, 1]]],
    [1, 1, [[[1], [2], "yes", 1]]], [1, 1, [[[1], [2], 0, 1]]], ["1", 1, []], [1, None, []], [True, 1, []],
    [1, 1, [[[1], [2], False, 1]], 9], [1, 1, [[[1], [2], False, True]]], [1, 1, [[[True], [2], False, 1]]],
    [1, 1, [[[1], 2, False, 1]]], [1, 1, [["12", [2], False, 1]]], [1, 1, [[[1], [2], False, 1, 0]]],
])
def test_bad_results_item(item):
    for payload in (b"", b"\x00" * 4):
        with pytest.raises(ProtocolError):
            unpack_results(raw(RESULTS, {"items": [item]}, payload))


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
