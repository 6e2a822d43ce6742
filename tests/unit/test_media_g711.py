"""G.711 against an independent transcription of the ITU-T reference (Sun's g711.c).

Every one of the 65,536 PCM16 inputs is encoded and every one of the 256 codes decoded,
and each result compared with the reference algorithm below, written out in plain Python
with its segment tables: no table or code is shared with the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge.media import (
    BadPcm,
    EmptyFrame,
    MediaError,
    alaw_decode,
    alaw_encode,
    ulaw_decode,
    ulaw_encode,
)

# -- the reference: Sun Microsystems g711.c (public domain), transcribed --------------------

SEG_AEND = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)
SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
QUANT_MASK = 0x0F
SEG_SHIFT = 4
SEG_MASK = 0x70
SIGN_BIT = 0x80
BIAS = 0x84
CLIP = 8159


def _search(value: int, table: tuple[int, ...]) -> int:
    """Index of the first segment end >= value; len(table) when above all."""
    for i, end in enumerate(table):
        if value <= end:
            return i
    return len(table)


def ref_linear2ulaw(pcm: int) -> int:
    pcm >>= 2  # arithmetic shift: 14-bit magnitude
    if pcm < 0:
        pcm = -pcm
        mask = 0x7F
    else:
        mask = 0xFF
    if pcm > CLIP:
        pcm = CLIP
    pcm += BIAS >> 2
    seg = _search(pcm, SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    uval = (seg << 4) | ((pcm >> (seg + 1)) & 0x0F)
    return uval ^ mask


def ref_ulaw2linear(code: int) -> int:
    code = ~code & 0xFF
    t = ((code & QUANT_MASK) << 3) + BIAS
    t <<= (code & SEG_MASK) >> SEG_SHIFT
    return (BIAS - t) if code & SIGN_BIT else (t - BIAS)


def ref_linear2alaw(pcm: int) -> int:
    pcm >>= 3  # 13-bit
    if pcm >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        pcm = -pcm - 1
    seg = _search(pcm, SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << SEG_SHIFT
    aval |= (pcm >> 1) & QUANT_MASK if seg < 2 else (pcm >> seg) & QUANT_MASK
    return aval ^ mask


def ref_alaw2linear(code: int) -> int:
    code ^= 0x55
    t = (code & QUANT_MASK) << 4
    seg = (code & SEG_MASK) >> SEG_SHIFT
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t += 0x108
        t <<= seg - 1
    return t if code & SIGN_BIT else -t


ALL_PCM = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = bytes(range(256))


# -- exactness -------------------------------------------------------------------------------


def test_ulaw_encode_every_input_matches_reference() -> None:
    expected = bytes(ref_linear2ulaw(int(v)) for v in ALL_PCM)
    got = ulaw_encode(ALL_PCM.tobytes())
    assert got == expected


def test_alaw_encode_every_input_matches_reference() -> None:
    expected = bytes(ref_linear2alaw(int(v)) for v in ALL_PCM)
    got = alaw_encode(ALL_PCM.tobytes())
    assert got == expected


def test_ulaw_decode_every_code_matches_reference() -> None:
    expected = np.array([ref_ulaw2linear(c) for c in ALL_CODES], dtype=np.int16)
    got = np.frombuffer(ulaw_decode(ALL_CODES), dtype=np.int16)
    np.testing.assert_array_equal(got, expected)


def test_alaw_decode_every_code_matches_reference() -> None:
    expected = np.array([ref_alaw2linear(c) for c in ALL_CODES], dtype=np.int16)
    got = np.frombuffer(alaw_decode(ALL_CODES), dtype=np.int16)
    np.testing.assert_array_equal(got, expected)


def test_reference_spot_values() -> None:
    """Anchor the transcription itself to well-known G.711 facts."""
    assert ref_linear2ulaw(0) == 0xFF and ref_linear2alaw(0) == 0xD5  # silence codes
    assert ref_ulaw2linear(0x00) == -32124 and ref_ulaw2linear(0x80) == 32124
    assert ref_ulaw2linear(0xFF) == 0 and ref_ulaw2linear(0x7F) == 0
    assert ref_alaw2linear(0xD5) == 8 and ref_alaw2linear(0x55) == -8
    assert ref_alaw2linear(0xAA) == 32256 and ref_alaw2linear(0x2A) == -32256


@pytest.mark.parametrize(
    ("encode", "decode"), [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)]
)
def test_decode_then_encode_is_identity_on_codes(encode, decode) -> None:
    """Every code's expansion re-encodes to itself (µ-law's two zeros excepted)."""
    again = encode(decode(ALL_CODES))
    differ = [c for c, d in zip(ALL_CODES, again, strict=True) if c != d]
    assert differ in ([], [0x7F])  # µ-law 0x7F (-0) re-encodes as 0xFF (+0)


# -- argument forms --------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [ulaw_encode, alaw_encode])
def test_encode_accepts_arrays_and_buffers(encode) -> None:
    pcm = np.array([0, 1000, -1000, 32767, -32768], dtype=np.int16)
    want = encode(pcm.tobytes())
    assert encode(pcm) == want
    assert encode(bytearray(pcm.tobytes())) == want
    assert encode(memoryview(pcm.tobytes())) == want
    wide = np.repeat(pcm, 2)
    assert encode(wide[::2]) == want  # a strided view is made contiguous


@pytest.mark.parametrize("decode", [ulaw_decode, alaw_decode])
def test_decode_accepts_buffers(decode) -> None:
    want = decode(ALL_CODES)
    assert decode(bytearray(ALL_CODES)) == want
    assert decode(memoryview(ALL_CODES)) == want
    assert decode(np.frombuffer(ALL_CODES, np.uint8)) == want


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [ulaw_encode, alaw_encode])
def test_encode_rejects_odd_length(encode) -> None:
    with pytest.raises(BadPcm, match="even number of bytes, got 3"):
        encode(b"\x00\x01\x02")
    with pytest.raises(BadPcm, match="even number"):
        encode(bytearray(5))


@pytest.mark.parametrize("encode", [ulaw_encode, alaw_encode])
def test_encode_rejects_empty(encode) -> None:
    for empty in (b"", bytearray(), memoryview(b""), np.zeros(0, np.int16)):
        with pytest.raises(EmptyFrame):
            encode(empty)


@pytest.mark.parametrize("decode", [ulaw_decode, alaw_decode])
def test_decode_rejects_empty(decode) -> None:
    for empty in (b"", bytearray(), np.zeros(0, np.uint8)):
        with pytest.raises(EmptyFrame):
            decode(empty)


def test_wrong_types_are_media_errors() -> None:
    with pytest.raises(BadPcm, match="int16"):
        ulaw_encode(np.zeros(4, np.float32))
    with pytest.raises(BadPcm, match="1-D"):
        ulaw_encode(np.zeros((2, 2), np.int16))
    with pytest.raises(BadPcm, match="bytes-like"):
        ulaw_encode("abcd")  # type: ignore[arg-type]
    with pytest.raises(BadPcm, match="uint8"):
        ulaw_decode(np.zeros(4, np.int16))
    with pytest.raises(MediaError):
        alaw_decode([1, 2, 3])  # type: ignore[arg-type]


def test_media_errors_are_value_errors() -> None:
    """Callers that already catch ValueError for bad input keep working."""
    with pytest.raises(ValueError):
        ulaw_encode(b"\x00")
