"""CosyVoice's HiFT vocoder against upstream's own outputs (tests/unit/cosyvoice_reference.py).

The fixtures were made by running the upstream classes on small random-weight builds with
the noise and random phases zero: layouts at the official sizes (`inventory-vN.json`), the
small state dicts, and f0 / source / speech on a stored mel, plus v2's streaming calls.
Besides the README's end-to-end bounds, each half is checked alone from upstream's own
input to it (source from upstream's f0, speech from upstream's source): the end-to-end
bounds must allow for the sine phase amplifying f0 rounding, the halves need not, so a
subtle bug in one half cannot hide in the other's slack.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.cosyvoice_hift import HiFTConfig, HiFTGenerator, hift_state_from_checkpoint, load_hift
from model.errors import CheckpointError, ConfigInvalid

from .cosyvoice_reference import REF, needs_ref

VERSIONS = ("v1", "v2")
OFFICIAL = {"v1": HiFTConfig.official_v1, "v2": HiFTConfig.official_v2}
STREAM_CACHE = 3840  # v2 source_cache_len: samples cached and cross-faded between chunks


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(version: str) -> HiFTConfig:
    return HiFTConfig.from_cosyvoice(json.loads((REF / f"small-{version}" / "config.json").read_text())["hift"])


@pytest.fixture(scope="module")
def small():
    cache: dict[str, tuple[HiFTGenerator, dict[str, np.ndarray]]] = {}

    def get(version: str):
        if version not in cache:
            model = load_hift(REF / f"small-{version}" / "hift.pt", small_config(version))
            with np.load(REF / f"small-{version}" / "vectors.npz") as z:
                cache[version] = model, {k: z[k] for k in z.files if "hift" in k or "stream" in k}
        return cache[version]

    return get


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def layout_digest(layout: list[tuple[str, list[int]]]) -> str:
    """The inventory's rule: names sorted by bytes; name, 0x00, ndim u64le, dims u64le."""
    h = hashlib.sha256()
    for name, shape in sorted(layout, key=lambda item: item[0].encode()):
        h.update(name.encode() + b"\0" + struct.pack("<Q", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape))
    return h.hexdigest()


# --------------------------------------------------------------------------- layout


@needs_ref
@pytest.mark.parametrize("version", VERSIONS)
def test_official_size_layout_equals_inventory(version):
    inventory = json.loads((REF / f"inventory-{version}.json").read_text())["files"]["hift.pt"]
    with torch.device("meta"):
        model = HiFTGenerator(OFFICIAL[version]())
    got = [(k, list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in model.state_dict().items()]
    assert got == [(t["name"], t["shape"], t["dtype"]) for t in inventory["tensors"]]
    assert layout_digest([(k, s) for k, s, _ in got]) == inventory["layout_digest_sha256"]
    assert sum(p.numel() for p in model.parameters()) == inventory["parameter_count"]


@needs_ref
@pytest.mark.parametrize("version", VERSIONS)
def test_small_build_differs_from_official_only_where_documented(version):
    changed = json.loads((REF / f"small-{version}" / "config.json").read_text())["changed_from_official"]
    assert changed["hift.base_channels"]["official"] == 512
    assert changed["hift.f0_predictor.cond_channels"]["official"] == 512
    mine = OFFICIAL[version]()
    small_cfg = small_config(version)
    assert small_cfg == replace(mine, base_channels=changed["hift.base_channels"]["small"],
                                f0_channels=changed["hift.f0_predictor.cond_channels"]["small"])
    assert mine.samples_per_frame == {"v1": 256, "v2": 480}[version]


@needs_ref
@pytest.mark.parametrize("version", VERSIONS)
def test_small_state_dict_loads_strictly(version, small):
    model, _ = small(version)
    state = torch.load(REF / f"small-{version}" / "hift.pt", weights_only=True)
    mine = model.state_dict()
    assert list(mine) == list(state)
    assert all(torch.equal(mine[k], v) for k, v in state.items())
    assert not model.training


# --------------------------------------------------------------------------- numerics


@needs_ref
@pytest.mark.parametrize("version", VERSIONS)
def test_f0_source_speech_match_upstream(version, small):
    model, z = small(version)
    mel = torch.from_numpy(z["hift_in_mel"])
    with torch.inference_mode():
        f0 = model.f0(mel)
        speech, source = model(mel, stochastic=False)
        # Each half from upstream's own input to it: only float32 op-order rounding remains.
        source_alone = model.source(torch.from_numpy(z["hift_out_f0"]), stochastic=False)
        speech_alone = model.decode(mel, torch.from_numpy(z["hift_out_source"]))
    ref_f0, ref_source, ref_speech = z["hift_out_f0"], z["hift_out_source"], z["hift_out_speech"]
    assert f0.shape == ref_f0.shape and source.shape == ref_source.shape and speech.shape == ref_speech.shape
    assert speech.shape[-1] == mel.shape[-1] * model.config.samples_per_frame

    assert max_abs(f0, ref_f0) <= 1e-5 * np.abs(ref_f0).max()  # seen 9e-5 / 6e-4 Hz of 350 Hz
    assert max_abs(source_alone, ref_source) <= 1e-6  # seen 3e-8
    assert max_abs(speech_alone, ref_speech) <= 2e-6  # seen 2e-7
    assert max_abs(source, ref_source) <= 3e-3 and rel_l2(source, ref_source) <= 5e-3  # seen 1.5e-4 / 2.7e-4
    assert max_abs(speech, ref_speech) <= 5e-4 and rel_l2(speech, ref_speech) <= 2e-3  # seen 5e-5 / 2e-4


@needs_ref
def test_v2_streaming_chunks_match_upstream(small):
    """Each call as `CosyVoice2Model.token2wav` makes it: HiFT on the stored mel (8 cached
    frames + the new ones) with the previous call's last source samples in front; the
    first 3840 samples cross-faded (np.hamming(7680), float64) with the previous call's
    last 3840; all calls but the final keep their last 3840 back. The stored cache
    source of call i+1 is upstream's source of call i: ours must end the same way."""
    model, z = small("v2")
    calls = z["stream_calls"]
    window = np.hamming(2 * STREAM_CACHE)
    previous_tail = None
    yielded = 0
    for i, call in enumerate(calls):
        mel = torch.from_numpy(z[f"stream{i}_hift_in_mel"])
        cache = torch.from_numpy(z[f"stream{i}_hift_in_cache_source"])
        assert mel.shape[-1] == call[5] and cache.shape[-1] == call[6]
        with torch.inference_mode():
            speech, source = model(mel, cache, stochastic=False)
        assert torch.equal(source[..., :cache.shape[-1]], cache)
        if i + 1 < len(calls):
            ref_cache = z[f"stream{i + 1}_hift_in_cache_source"]
            assert max_abs(source[..., -STREAM_CACHE:], ref_cache) <= 3e-3  # seen 2.5e-4
        chunk = speech.numpy().astype(np.float64)
        if previous_tail is not None:
            head = chunk[:, :STREAM_CACHE]
            chunk[:, :STREAM_CACHE] = head * window[:STREAM_CACHE] + previous_tail * window[STREAM_CACHE:]
        if not call[3]:  # not finalize: hold the tail back for the next fade
            previous_tail = chunk[:, -STREAM_CACHE:].copy()
            chunk = chunk[:, :-STREAM_CACHE]
        ref = z[f"stream{i}_speech"]
        assert chunk.shape == ref.shape and chunk.shape[-1] == call[7]
        assert max_abs(chunk.astype(np.float32), ref) <= 5e-4  # seen 3.3e-5
        assert rel_l2(chunk.astype(np.float32), ref) <= 2e-3  # seen 1.5e-4
        yielded += chunk.shape[-1]
    assert yielded == 192000


@needs_ref
@pytest.mark.parametrize("version", VERSIONS)
def test_noise_has_upstreams_level_and_is_seedable(version, small):
    model, z = small(version)
    f0 = torch.from_numpy(z["hift_out_f0"])
    with torch.inference_mode():
        clean = model.m_source.sines(f0, stochastic=False)
        noisy = model.m_source.sines(f0, stochastic=True, generator=torch.Generator().manual_seed(1))
        again = model.m_source.sines(f0, stochastic=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    voiced = (f0 > model.config.voiced_threshold).repeat_interleave(model.config.samples_per_frame, dim=1)
    # The fundamental has no random phase, so its difference is the noise alone.
    noise = (noisy - clean)[..., 0]
    assert noise[voiced].std().item() == pytest.approx(model.config.nsf_sigma, rel=0.05)
    assert noise[~voiced].std().item() == pytest.approx(model.config.nsf_alpha / 3, rel=0.05)
    assert torch.all(clean[~voiced] == 0)


# --------------------------------------------------------------------------- loading


@needs_ref
@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
def test_old_weight_norm_keys_and_prefix_load_to_the_same_output(small, tmp_path):
    model, z = small("v1")
    state = torch.load(REF / "small-v1" / "hift.pt", weights_only=True)
    old = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                  "weight_v")
        old["generator." + key] = value
    assert sum(k.endswith(".weight_g") for k in old) == sum(k.endswith("original0") for k in state) > 50
    # torch's older weight norm names its tensors exactly so.
    legacy = torch.nn.utils.weight_norm(torch.nn.Conv1d(2, 2, 3))
    assert {"weight_g", "weight_v"} <= set(legacy.state_dict())
    path = tmp_path / "old.pt"
    torch.save(old, path)
    reloaded = load_hift(path, small_config("v1"))
    mel = torch.from_numpy(z["hift_in_mel"][:, :, :40])
    with torch.inference_mode():
        assert torch.equal(reloaded(mel, stochastic=False)[0], model(mel, stochastic=False)[0])


def _small_state(version: str = "v1") -> tuple[dict[str, torch.Tensor], HiFTConfig]:
    return torch.load(REF / f"small-{version}" / "hift.pt", weights_only=True), small_config(version)


@needs_ref
def test_corrupt_or_missing_file_is_refused_by_name(tmp_path):
    data = (REF / "small-v1" / "hift.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    config = small_config("v1")
    for path in (truncated, garbage, tmp_path / "absent.pt"):
        with pytest.raises(CheckpointError, match=path.name) as info:
            load_hift(path, config)
        assert info.value.path == path
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"conv_pre.bias": torch.zeros(2)}, "step": torch.tensor(3)}, nested)
    with pytest.raises(CheckpointError, match="flat mapping"):
        load_hift(nested, config)


@needs_ref
def test_mismatched_keys_and_shapes_are_refused_by_name(tmp_path):
    state, config = _small_state()
    renamed = dict(state)
    renamed["conv_pre.bias_typo"] = renamed.pop("conv_pre.bias")
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    with pytest.raises(CheckpointError, match=r"renamed\.pt") as info:
        load_hift(path, config)
    assert "missing 1 key(s): conv_pre.bias" in str(info.value)
    assert "unexpected 1 key(s): conv_pre.bias_typo" in str(info.value)

    reshaped = dict(state)
    reshaped["m_source.l_linear.weight"] = torch.zeros(1, 10)
    path = tmp_path / "reshaped.pt"
    torch.save(reshaped, path)
    with pytest.raises(CheckpointError, match=r"m_source\.l_linear\.weight is \(1, 10\), expected \(1, 9\)"):
        load_hift(path, config)

    # A v1 file is not a v2 model: the third stage's keys are missing, shapes differ.
    with pytest.raises(CheckpointError, match=r"hift\.pt.*missing .*ups\.2") as info:
        load_hift(REF / "small-v1" / "hift.pt", small_config("v2"))
    assert "shape mismatch" in str(info.value)

    both = dict(state)
    both["conv_pre.weight_g"] = both["conv_pre.parametrizations.weight.original0"]
    path = tmp_path / "both.pt"
    torch.save(both, path)
    with pytest.raises(CheckpointError, match="conv_pre.weight_g"):
        load_hift(path, config)


# --------------------------------------------------------------------------- config and inputs


def test_config_from_upstream_arguments_and_validation():
    v2 = HiFTConfig.from_cosyvoice({"class": "HiFTGenerator", "sampling_rate": 24000, "upsample_rates": [8, 5, 3],
                                    "upsample_kernel_sizes": [16, 11, 7],
                                    "source_resblock_kernel_sizes": [7, 7, 11],
                                    "source_resblock_dilation_sizes": [[1, 3, 5]] * 3,
                                    "f0_predictor": {"class": "ConvRNNF0Predictor", "num_class": 1,
                                                     "in_channels": 80, "cond_channels": 512}})
    assert v2 == HiFTConfig.official_v2() and v2.sine_generator == "SineGen2"
    with pytest.raises(ConfigInvalid, match="'nb_harmonic'.*unknown"):
        HiFTConfig.from_cosyvoice({"nb_harmonic": 8}, source="hift.yaml")
    with pytest.raises(ConfigInvalid, match="upsample_kernel_sizes"):
        HiFTConfig(upsample_rates=(8, 8), upsample_kernel_sizes=(16, 15))
    with pytest.raises(ConfigInvalid, match="source_resblock_kernel_sizes"):
        HiFTConfig(upsample_rates=(8, 5, 3), upsample_kernel_sizes=(16, 11, 7))
    with pytest.raises(ConfigInvalid, match="sine_generator"):
        HiFTConfig(sine_generator="SineGen3")


@pytest.mark.parametrize("official", [HiFTConfig.official_v1, HiFTConfig.official_v2])
def test_random_model_lengths_limit_and_cache(official):
    config = replace(official(), base_channels=16, f0_channels=8)
    torch.manual_seed(0)
    model = HiFTGenerator(config).eval()
    mel = torch.randn(2, 80, 7) * 3
    with torch.inference_mode():
        speech, source = model(mel, generator=torch.Generator().manual_seed(0))
        assert speech.shape == (2, 7 * config.samples_per_frame) and source.shape == (2, 1, speech.shape[-1])
        assert speech.abs().max() <= config.audio_limit
        cache = torch.full((2, 1, config.samples_per_frame), 0.5)
        _, cached = model(mel, cache, stochastic=False)
        assert torch.equal(cached[..., :config.samples_per_frame], cache)
        with pytest.raises(ValueError, match="cache_source"):
            model(mel, torch.zeros(2, 1, speech.shape[-1] + 1))
        with pytest.raises(ValueError, match="mel must be"):
            model(mel.transpose(1, 2))


def test_key_renaming_rules():
    t = torch.zeros(1)
    renamed = hift_state_from_checkpoint({"generator.ups.0.weight_g": t, "ups.0.weight_v": t,
                                          "source_downs.0.weight": t})
    assert list(renamed) == ["ups.0.parametrizations.weight.original0", "ups.0.parametrizations.weight.original1",
                             "source_downs.0.weight"]
