"""CosyVoice flow decoder (v1 and v2) against upstream's reference fixtures.

The reference fixtures (tests/unit/cosyvoice_reference.py) hold the official tensor inventories (names, shapes,
dtypes of the released `flow.pt` layouts), small random-weight state dicts built by the
upstream classes, and upstream's outputs on fixed inputs. Bounds are the README's
suggested ones: the float32 rounding scale measured against a float64 run of upstream."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from model.cosyvoice_encoder import EncoderConfig, chunk_keep_mask
from model.cosyvoice_estimator import EstimatorConfig
from model.cosyvoice_flow import CosyVoiceFlow, FlowConfig, euler_schedule, load_flow
from model.errors import CheckpointError, ConfigInvalid

from .cosyvoice_reference import REF, needs_ref


VERSIONS = ("v1", "v2")



pytestmark = [needs_ref, pytest.mark.usefixtures("one_torch_thread")]


def small_section(version: str) -> dict:
    return json.loads((REF / f"small-{version}" / "config.json").read_text())["flow"]


def small_config(version: str) -> FlowConfig:
    return FlowConfig.from_upstream(small_section(version), source=f"small-{version}/config.json")


@pytest.fixture(scope="module")
def flows() -> dict[str, CosyVoiceFlow]:
    return {v: load_flow(REF / f"small-{v}" / "flow.pt", small_config(v)) for v in VERSIONS}


@pytest.fixture(scope="module")
def vectors() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for v in VERSIONS:
        with np.load(REF / f"small-{v}" / "vectors.npz") as npz:
            out[v] = {k: torch.from_numpy(npz[k]) for k in npz.files}
    return out


@pytest.fixture(scope="module")
def prepared(flows, vectors):
    out = {}
    for v in VERSIONS:
        d = vectors[v]
        out[v] = flows[v].prepare(d["token"], d["prompt_token"], d["prompt_feat"], d["embedding"])
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, max_abs: float, rel_l2: float | None = None) -> None:
    got, want = got.detach().double(), want.double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= max_abs, f"max abs error {err:.3g} > {max_abs:g}"
    if rel_l2 is not None:
        rel = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
        assert rel <= rel_l2, f"relative L2 error {rel:.3g} > {rel_l2:g}"


def layout_digest(entries: list[tuple[str, tuple[int, ...]]]) -> str:
    """The inventory's rule: sha256 over names sorted by byte value, each as UTF-8 name,
    0x00, ndim as u64 LE, each dimension as u64 LE."""
    h = hashlib.sha256()
    for name, shape in sorted(entries, key=lambda e: e[0].encode()):
        h.update(name.encode() + b"\0" + struct.pack("<Q", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape))
    return h.hexdigest()


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("version", VERSIONS)
def test_official_size_layout_equals_the_inventory(version):
    inventory = json.loads((REF / f"inventory-{version}.json").read_text())["files"]["flow.pt"]
    config = FlowConfig.official_v1() if version == "v1" else FlowConfig.official_v2()
    with torch.device("meta"):
        model = CosyVoiceFlow(config)
    got = [(k, list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in model.state_dict().items()]
    want = [(t["name"], t["shape"], t["dtype"]) for t in inventory["tensors"]]
    assert got == want  # names, shapes, dtypes and the state_dict order
    assert len(got) == inventory["tensor_count"]
    assert sum(t.numel() for t in model.state_dict().values()) == inventory["parameter_count"]
    assert layout_digest([(k, tuple(t.shape)) for k, t in model.state_dict().items()]) \
        == inventory["layout_digest_sha256"]


@pytest.mark.parametrize("version", VERSIONS)
def test_small_state_dict_loads_strictly_with_the_published_layout(flows, version):
    state = torch.load(REF / f"small-{version}" / "flow.pt", weights_only=True)
    model = flows[version]
    assert list(model.state_dict()) == list(state)
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    weights = json.loads((REF / f"small-{version}" / "config.json").read_text())["weights"]
    assert layout_digest([(k, tuple(t.shape)) for k, t in state.items()]) == weights["flow_layout_digest_sha256"]
    assert sum(t.numel() for t in model.state_dict().values()) == weights["flow_parameters"]
    assert not any(k.startswith("decoder.") and "estimator" not in k for k in model.state_dict())


def test_official_configs():
    v1, v2 = FlowConfig.official_v1(), FlowConfig.official_v2()
    assert (v1.vocab_size, v1.input_frame_rate, v1.v1_frames(50), v1.v1_frames(20)) == (4096, 50, 86, 34)
    assert (v2.vocab_size, v2.input_frame_rate, v2.token_mel_ratio, v2.pre_lookahead_len) == (6561, 25, 2, 3)
    assert (v2.encoder.static_chunk_size, v2.estimator.static_chunk_size) == (25, 50)
    small = small_config("v2")
    assert small.encoder == EncoderConfig(64, 64, 4, 128, 2, 25, 3, 2, 4)
    assert small.estimator == EstimatorConfig(channels=(32,), attention_head_dim=32, n_blocks=2, num_mid_blocks=2,
                                              num_heads=2, causal=True, static_chunk_size=50)


@pytest.mark.parametrize("path,value", [
    (("encoder", "pos_enc_layer_type"), "rel_pos"),
    (("encoder", "use_cnn_module"), True),
    (("encoder", "macaron_style"), True),
    (("decoder", "estimator", "act_fn"), "snakebeta"),
    (("decoder", "cfm_params", "solver"), "midpoint"),
    (("class",), "MaskedDiffWithXvecV3"),
])
def test_unsupported_upstream_settings_are_refused_by_name(path, value):
    section = small_section("v1")
    target = section
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigInvalid) as info:
        FlowConfig.from_upstream(section, source="x.json")
    assert path[-1] in str(info.value) and "x.json" in str(info.value)


def test_v2_hardcoded_widths_must_equal_the_encoder_width():
    section = small_section("v2")
    section["encoder_hardcoded"]["up_layer_channels"] = 512
    with pytest.raises(ConfigInvalid, match="up_layer_channels"):
        FlowConfig.from_upstream(section)
    with pytest.raises(ConfigInvalid, match="input_size"):
        EncoderConfig(input_size=80, output_size=64, attention_heads=4, up_stride=2, num_up_blocks=4)


# --------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("version,variant", [("v1", ""), ("v1", "_padded"), ("v2", ""), ("v2", "_padded"),
                                             ("v2", "_streaming")])
def test_estimator_velocity(flows, vectors, version, variant):
    d = vectors[version]
    mask = d["estimator_in_mask_padded" if variant == "_padded" else "estimator_in_mask"]
    with torch.inference_mode():
        got = flows[version].decoder.estimator(d["estimator_in_x"], mask, d["estimator_in_mu"], d["estimator_in_t"],
                                               d["estimator_in_spks"], d["estimator_in_cond"],
                                               streaming=variant == "_streaming")
    assert_close(got, d["estimator_out_velocity" + variant], 2e-4, 3e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_padding_never_reaches_valid_frames(flows, vectors, version):
    d = vectors[version]
    mask = d["estimator_in_mask_padded"]
    noisy = [d[k].clone() for k in ("estimator_in_x", "estimator_in_mu", "estimator_in_cond")]
    for t in noisy:
        t[1, :, 131:] = 1e3
    est = flows[version].decoder.estimator
    with torch.inference_mode():
        clean = est(d["estimator_in_x"], mask, d["estimator_in_mu"], d["estimator_in_t"], d["estimator_in_spks"],
                    d["estimator_in_cond"])
        dirty = est(noisy[0], mask, noisy[1], d["estimator_in_t"], d["estimator_in_spks"], noisy[2])
    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=0)


def test_v2_streaming_estimator_is_chunk_causal(flows, vectors):
    """With streaming, the frames of chunk k (50 frames) depend on nothing after it."""
    d = vectors["v2"]
    x = d["estimator_in_x"].clone()
    est = flows["v2"].decoder.estimator
    args = (d["estimator_in_mask"], d["estimator_in_mu"], d["estimator_in_t"], d["estimator_in_spks"],
            d["estimator_in_cond"])
    with torch.inference_mode():
        before = est(x, *args, streaming=True)
        x[:, :, 100:] = torch.randn_like(x[:, :, 100:])
        after = est(x, *args, streaming=True)
        full = est(x, *args, streaming=False)
    torch.testing.assert_close(after[:, :, :100], before[:, :, :100], atol=1e-5, rtol=0)
    assert (after[:, :, 100:] - before[:, :, 100:]).abs().max() > 1e-2
    assert (full[:, :, :100] - after[:, :, :100]).abs().max() > 1e-3  # non-streaming looks ahead


def test_chunk_mask():
    keep = chunk_keep_mask(5, 2)
    assert keep.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0],
                                   [1, 1, 1, 1, 1]]
    assert chunk_keep_mask(5, 2, left_chunks=0)[4].int().tolist() == [0, 0, 0, 0, 1]
    assert bool(chunk_keep_mask(3, 0).all())


# --------------------------------------------------------------------------- flow pieces


@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_and_decoder_inputs(prepared, vectors, version):
    d, got = vectors[version], prepared[version]
    assert_close(got.encoder_out, d["flow_encoder_out"], 5e-5)
    assert_close(got.mu, d["flow_decoder_in_mu"], 5e-5)  # v1: pins the length regulator's 34-frame edges
    assert_close(got.spks, d["flow_decoder_in_spks"], 5e-5)
    assert torch.equal(got.cond, d["flow_decoder_in_cond"])
    assert torch.equal(got.mask, d["flow_decoder_in_mask"])
    assert got.prompt_frames == d["prompt_feat"].shape[1]


def test_euler_times_are_upstreams_running_sum(vectors):
    steps = euler_schedule(10)
    times = torch.stack([t for t, _ in steps])
    for v in VERSIONS:
        assert torch.equal(times, vectors[v]["flow_decoder_step_t"])
    assert abs(float(sum(dt for _, dt in steps)) + float(times[0]) - 1.0) < 1e-6


@pytest.mark.parametrize("version", VERSIONS)
def test_each_euler_step_given_the_running_x(flows, prepared, vectors, version):
    """x0 = flow_noise, x_{k+1} = x_k + dt_k (1.7 row0 - 0.7 row1) from upstream's rows;
    our estimator must give both rows at every step."""
    d, inp, decoder = vectors[version], prepared[version], flows[version].decoder
    rows = d["flow_decoder_step_velocity"]
    x = d["flow_noise"]
    with torch.inference_mode():
        for k, (t, dt) in enumerate(euler_schedule(10)):
            pair = decoder.velocity_pair(x, inp.mask, inp.mu, t, inp.spks, inp.cond)
            assert_close(pair, rows[k], 1e-3, 1e-4)
            x = x + dt * ((1.0 + 0.7) * rows[k, :1] - 0.7 * rows[k, 1:])


def test_v2_fixed_noise_is_upstreams_and_leaves_the_global_rng_alone(vectors):
    with torch.device("meta"):
        decoder = CosyVoiceFlow(small_config("v2")).decoder  # nothing drawn yet
    state = torch.get_rng_state()
    noise = decoder.fixed_noise(460)
    assert torch.equal(torch.get_rng_state(), state)
    assert noise.device.type == "cpu" and torch.equal(noise, vectors["v2"]["flow_noise"])
    with pytest.raises(ValueError, match="15000"):
        decoder.fixed_noise(15001)


@pytest.mark.parametrize("version", VERSIONS)
def test_flow_out_mel(flows, vectors, version):
    d = vectors[version]
    noise = d["flow_noise"] if version == "v1" else None  # v2: its own fixed noise
    mel = flows[version].inference(d["token"], d["prompt_token"], d["prompt_feat"], d["embedding"], noise=noise)
    assert mel.dtype == torch.float32
    assert_close(mel, d["flow_out_mel"], 5e-4, 5e-5)


def test_v2_streaming_calls(flows, vectors):
    d = vectors["v2"]
    flow = flows["v2"]
    for i, (offset, given, streaming, finalize, frames, *_rest) in enumerate(d["stream_calls"].tolist()):
        token = d[f"stream{i}_token"]
        assert token.shape[1] == given and torch.equal(token, d["token"][:, :given])
        inp = flow.prepare(token, d["prompt_token"], d["prompt_feat"], d["embedding"], streaming=bool(streaming),
                           finalize=bool(finalize))
        assert_close(inp.mu, d[f"stream{i}_decoder_in_mu"], 5e-5)
        mel = flow.inference(token, d["prompt_token"], d["prompt_feat"], d["embedding"], streaming=bool(streaming),
                             finalize=bool(finalize))
        assert mel.shape[2] == frames
        assert_close(mel, d[f"stream{i}_flow_out_mel"], 5e-4, 5e-5)


def test_bad_inputs_are_refused(flows, vectors):
    d = vectors["v1"]
    with pytest.raises(ValueError, match="v1 has no chunk-causal"):
        flows["v1"].inference(d["token"], d["prompt_token"], d["prompt_feat"], d["embedding"], streaming=True)
    with pytest.raises(ValueError, match="vocabulary"):
        flows["v1"].prepare(d["token"] + 4096, d["prompt_token"], d["prompt_feat"], d["embedding"])
    with pytest.raises(ValueError, match="noise"):
        flows["v1"].inference(d["token"], d["prompt_token"], d["prompt_feat"], d["embedding"],
                              noise=d["flow_noise"][:, :, :10])


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def v1_state() -> dict[str, torch.Tensor]:
    return torch.load(REF / "small-v1" / "flow.pt", weights_only=True)


def save(tmp_path: Path, state) -> Path:
    path = tmp_path / "flow.pt"
    torch.save(state, path)
    return path


def test_truncated_and_garbage_files_are_refused_by_name(tmp_path):
    data = (REF / "small-v1" / "flow.pt").read_bytes()
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("garbage.pt", b"not a checkpoint" * 64)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=name) as info:
            load_flow(path, small_config("v1"))
        assert info.value.path == path
    with pytest.raises(CheckpointError, match="no such file"):
        load_flow(tmp_path / "absent.pt", small_config("v1"))
    path = save(tmp_path, [1, 2, 3])
    with pytest.raises(CheckpointError, match="flat mapping"):
        load_flow(path, small_config("v1"))


def test_missing_extra_and_misshapen_keys_are_named(tmp_path, v1_state):
    state = dict(v1_state)
    del state["encoder.encoders.1.self_attn.pos_bias_v"]
    state["decoder.rand_noise"] = torch.zeros(1, 80, 10)
    state["encoder_proj.weight"] = torch.zeros(80, 65)
    path = save(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        load_flow(path, small_config("v1"))
    message = str(info.value)
    assert str(path) in message
    assert "missing 1 key(s): encoder.encoders.1.self_attn.pos_bias_v" in message
    assert "unexpected 1 key(s): decoder.rand_noise" in message
    assert "encoder_proj.weight is (80, 65), expected (80, 64)" in message


def test_a_file_of_the_other_family_or_size_is_refused():
    with pytest.raises(CheckpointError) as info:
        load_flow(REF / "small-v1" / "flow.pt", small_config("v2"))
    message = str(info.value)
    assert "small-v1/flow.pt" in message and "missing 108 key(s): encoder.pre_lookahead_layer" in message
    assert "input_embedding.weight is (4096, 64), expected (6561, 64)" in message
    small = torch.load(REF / "small-v1" / "flow.pt", weights_only=True)
    with pytest.raises(CheckpointError, match=r"shape mismatch: input_embedding.weight is \(4096, 64\), "
                       r"expected \(4096, 512\)"):
        with torch.device("meta"):  # the official size: build without allocating 105 M parameters
            CosyVoiceFlow.from_state_dict(small, FlowConfig.official_v1(), source="small-v1/flow.pt", device="meta")


def test_integer_tensors_are_refused(tmp_path, v1_state):
    state = dict(v1_state)
    state["encoder_proj.bias"] = torch.zeros(80, dtype=torch.int64)
    with pytest.raises(CheckpointError, match="not floating point: encoder_proj.bias"):
        load_flow(save(tmp_path, state), small_config("v1"))
