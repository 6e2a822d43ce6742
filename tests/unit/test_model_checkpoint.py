"""Model folders: save -> load gives identical outputs; bad files fail naming the file;
`duplexline model init --tiny` writes a loadable model."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from model.checkpoint import build_model, load_model, save_model, tiny_config, write_tiny_model
from model.config import OmniFlattenConfig
from model.errors import CheckpointError, ConfigInvalid
from model.omniflatten import OmniFlattenSession


def run_chunks(model, n=4):
    rng = random.Random(0)
    s = OmniFlattenSession(model, prompt=[3])
    v = model.vocab
    return [s.step([v.speech_id(rng.randrange(v.speech_codes)) for _ in range(model.layout.user)]).token_ids
            for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny"
    model = build_model(tiny_config(), seed=4)
    save_model(model, folder)
    return model, folder


def test_save_load_identical_outputs(saved):
    model, folder = saved
    loaded = load_model(folder)
    assert loaded.model.vocab == model.vocab
    assert run_chunks(loaded.model) == run_chunks(model)
    assert loaded.decoder.sample_rate == 22050


def test_write_tiny_model_includes_a_tokenizer(tmp_path):
    path = write_tiny_model(tmp_path / "t", seed=1)
    loaded = load_model(path)
    codes = loaded.tokenizer.encode(np.zeros(16000, dtype=np.float32))
    assert len(codes) == 50
    with pytest.raises(CheckpointError, match="not empty"):
        write_tiny_model(path)


def test_model_init_command(tmp_path):
    out = tmp_path / "cli-model"
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "model", "init", "--tiny", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "untrained" in proc.stdout
    assert (out / "backbone" / "model.safetensors").exists() and (out / "config.json").exists()


def copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_config(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(tmp_path / "nope")
    bad = copy_folder(saved[1], tmp_path / "b")
    (bad / "config.json").unlink()
    with pytest.raises(ConfigInvalid, match="config.json"):
        load_model(bad)


def test_truncated_weights_name_the_file(tmp_path, saved):
    bad = copy_folder(saved[1], tmp_path / "b")
    weights = bad / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(bad)


def test_missing_weights_name_the_file(tmp_path, saved):
    bad = copy_folder(saved[1], tmp_path / "b")
    (bad / "backbone" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        load_model(bad)


def test_mismatched_config_is_refused(tmp_path, saved):
    bad = copy_folder(saved[1], tmp_path / "b")
    cfg = json.loads((bad / "backbone" / "config.json").read_text())
    cfg["hidden_size"] = 32
    (bad / "backbone" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(bad)
    bad2 = copy_folder(saved[1], tmp_path / "c")
    top = json.loads((bad2 / "config.json").read_text())
    top["speech_codebook_size"] = 1024
    (bad2 / "config.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_model(bad2)


def test_decoder_mismatch_is_refused(tmp_path, saved):
    bad = copy_folder(saved[1], tmp_path / "b")
    dec = json.loads((bad / "decoder.json").read_text())
    dec["sample_rate"] = 24000
    (bad / "decoder.json").write_text(json.dumps(dec))
    with pytest.raises(CheckpointError, match="decoder.json"):
        load_model(bad)


@pytest.mark.parametrize("change, field", [
    ({"mode": "four-stream"}, "mode"),
    ({"speech_token_rate": 30}, "speech_token_rate"),
    ({"context_length": 20}, "context_length"),
    ({"sampling": {"temperature": -1}}, "sampling.temperature"),
    ({"text_chunk": 0}, "text_chunk"),
    ({"bogus": 1}, "bogus"),
])
def test_config_errors_name_the_field(change, field):
    data = tiny_config().to_dict()
    data.update(change)
    with pytest.raises(ConfigInvalid, match=field.replace(".", r"\.")):
        OmniFlattenConfig.from_dict(data)


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(mode="two-stream")
    cfg.save(tmp_path / "c.json")
    again = OmniFlattenConfig.load(tmp_path / "c.json")
    assert again == cfg and again.layout.user == 5 and again.layout.text == 0
