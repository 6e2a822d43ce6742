"""Flattening: round trips, chunk order, loss mask, half-duplex/ASR/TTS layouts."""

import pytest
from hypothesis import given, settings, strategies as st

from model.config import ChunkLayout
from model.flatten import (Chunk, Turn, asr_sample, chunks_to_streams, flatten, half_duplex_sample,
                           streams_to_chunks, tts_sample, unflatten)
from model.vocab import SPECIAL_TOKENS, Vocabulary

VOCAB = Vocabulary(text_size=100, speech_codes=50)
THREE = ChunkLayout(10, 2, 10)
TWO = ChunkLayout(5, 0, 5)
speech_ids = st.integers(VOCAB.speech_base, VOCAB.special_base - 1)
text_ids = st.integers(0, VOCAB.text_size - 1)


def test_vocabulary_layout_order():
    assert VOCAB.speech_id(0) == 100 and VOCAB.speech_id(49) == 149
    names = [VOCAB.name_of(VOCAB.special_base + i) for i in range(len(SPECIAL_TOKENS))]
    assert names == ["[ASR]", "[TTS]", "[SOS]", "[EOS]", "[SOT]", "[EOT]", "<silent_text>", "<silent_speech>"]
    assert VOCAB.size == 158
    assert VOCAB.code_of(VOCAB.silent_speech) == -1
    with pytest.raises(ValueError):
        VOCAB.speech_id(50)
    with pytest.raises(ValueError):
        VOCAB.code_of(5)


@settings(max_examples=60, deadline=None)
@given(st.lists(speech_ids, max_size=45), st.lists(text_ids, max_size=9), st.lists(speech_ids, max_size=45),
       st.lists(text_ids, max_size=4))
def test_flatten_unflatten_identity(user, text, speech, prefix):
    chunks = streams_to_chunks(user, text, speech, THREE, VOCAB)
    flat = flatten(chunks, THREE, prefix)
    assert len(flat.ids) == len(prefix) + len(chunks) * THREE.length
    assert unflatten(flat.ids, THREE, len(prefix)) == chunks
    u, t, s = chunks_to_streams(chunks)
    assert u[:len(user)] == user and t[:len(text)] == text and s[:len(speech)] == speech
    assert set(u[len(user):]) <= {VOCAB.silent_speech}
    assert set(t[len(text):]) <= {VOCAB.silent_text}
    assert set(s[len(speech):]) <= {VOCAB.silent_speech}


@settings(max_examples=30, deadline=None)
@given(st.lists(speech_ids, min_size=1, max_size=30), st.lists(speech_ids, max_size=30))
def test_two_stream_round_trip(user, speech):
    chunks = streams_to_chunks(user, [], speech, TWO, VOCAB)
    flat = flatten(chunks, TWO)
    assert unflatten(flat.ids, TWO) == chunks


def test_chunk_order_and_loss_mask_cover_only_the_assistant():
    user = [VOCAB.speech_id(i) for i in range(10)]
    chunk = Chunk(tuple(user), (1, 2), tuple(VOCAB.speech_id(40 + i) for i in range(10)))
    flat = flatten([chunk, chunk], THREE, prefix=[7])
    assert flat.ids[1:11] == user and flat.ids[11:13] == [1, 2]
    assert flat.loss_mask == [False] + ([False] * 10 + [True] * 12) * 2


def test_bad_chunks_are_refused():
    with pytest.raises(ValueError, match="chunk 0 has"):
        flatten([Chunk((1,), (), ())], THREE)
    with pytest.raises(ValueError, match="whole number"):
        unflatten(list(range(23)), THREE)
    with pytest.raises(ValueError, match="no text stream"):
        streams_to_chunks([VOCAB.silent_speech], [1], [], TWO, VOCAB)


def test_asr_tts_half_duplex_layouts():
    v = VOCAB.special
    sp, tx = [VOCAB.speech_id(3), VOCAB.speech_id(4)], [9, 8]
    asr = asr_sample(sp, tx, VOCAB)
    assert asr.ids == [v("[ASR]"), v("[SOS]"), *sp, v("[EOS]"), v("[SOT]"), *tx, v("[EOT]")]
    assert asr.loss_mask == [False] * 6 + [True] * 3
    tts = tts_sample(tx, sp, VOCAB)
    assert tts.ids == [v("[TTS]"), v("[SOT]"), *tx, v("[EOT]"), v("[SOS]"), *sp, v("[EOS]")]
    assert tts.loss_mask == [False] * 6 + [True] * 3
    hd = half_duplex_sample([Turn("user", tuple(tx), tuple(sp)), Turn("assistant", (5,), (sp[0],))], VOCAB)
    assert hd.ids[:8] == [v("[SOS]"), *sp, v("[EOS]"), v("[SOT]"), *tx, v("[EOT]")]
    assert hd.ids[8:] == [v("[SOT]"), 5, v("[EOT]"), v("[SOS]"), sp[0], v("[EOS]")]
    assert hd.loss_mask == [False] * 8 + [True] * 6
    with pytest.raises(ValueError):
        half_duplex_sample([Turn("system", (), ())], VOCAB)
