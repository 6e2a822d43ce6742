"""The training loop (model/train/trainer.py): the loss counts only the masked-in targets;
training lowers it; an interrupted run resumes at its checkpoint's step and reproduces
the uninterrupted run's losses exactly; the final folder loads with the trained weights;
the cosine schedule follows its formula; DDP and FSDP over two gloo processes match one
process and resume exactly."""

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import LoadedModel, build_model, load_model, save_model, tiny_config
from model.decoder_standin import StandInToneDecoder
from model.train import train_cli
from model.train.checkpoints import latest_checkpoint
from model.train.objective import CausalLMObjective
from model.train.schedule import cosine_scheduler
from model.train.token_data import TokenJsonlDataset, pad_collate
from model.train.trainer import TrainConfig, TrainError, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]


def tiny_loaded(seed=1):
    config = tiny_config()
    decoder = StandInToneDecoder(config.decoder_sample_rate, config.speech_token_rate, config.speech_codebook_size)
    return LoadedModel(build_model(config, seed=seed), None, decoder)


def pattern_samples(vocab, n, pairs=12, seed=0):
    """User text token u, then the assistant's speech code (5u + 3) mod 32: a bigram to
    learn. Only the assistant's tokens are targets."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids, mask = [], []
        for _ in range(pairs):
            u = rng.randrange(32)
            ids += [u, vocab.speech_id((5 * u + 3) % 32)]
            mask += [False, True]
        out.append({"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask)})
    return out


def mean_loss(backbone, batch):
    with torch.no_grad():
        total = CausalLMObjective(backbone)(batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
    return total.item() / batch["loss_mask"][:, 1:].sum().item()


def reference_loss(backbone, ids, mask):
    """Independently: full logits, position t scored against token t+1 where mask[t+1]."""
    with torch.no_grad():
        logits = backbone(input_ids=ids).logits
    picked = mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][picked], ids[:, 1:][picked], reduction="sum").item()


# ---- the loss ------------------------------------------------------------------------


def test_loss_is_cross_entropy_on_masked_targets_only():
    model = tiny_loaded().model
    backbone = model.backbone
    objective = CausalLMObjective(backbone)
    torch.manual_seed(0)
    ids = torch.randint(0, model.vocab.size, (2, 20))
    mask = torch.rand(2, 20) < 0.5
    mask[:, -1] = False
    with torch.no_grad():
        ours = objective(ids, mask).item()
    assert ours == pytest.approx(reference_loss(backbone, ids, mask), rel=1e-5)

    # The last token is only ever a target: masked out, its value cannot matter ...
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % model.vocab.size
    with torch.no_grad():
        assert objective(changed, mask).item() == ours
    # ... masked in, it must.
    mask_in = mask.clone()
    mask_in[:, -1] = True
    with torch.no_grad():
        a, b = objective(ids, mask_in).item(), objective(changed, mask_in).item()
    ref_a, ref_b = reference_loss(backbone, ids, mask_in), reference_loss(backbone, changed, mask_in)
    assert abs(a - b) > 1e-3  # an untrained model's logits are nearly flat: small, but there
    assert a - b == pytest.approx(ref_a - ref_b, abs=2e-4)


def test_right_padding_adds_nothing():
    model = tiny_loaded().model
    objective = CausalLMObjective(model.backbone)
    short, long_ = pattern_samples(model.vocab, 2, pairs=4)[0], pattern_samples(model.vocab, 2, pairs=9)[1]
    batch = pad_collate([short, long_])
    with torch.no_grad():
        together = objective(batch["input_ids"], batch["loss_mask"], batch["attention_mask"]).item()
        alone = sum(objective(s["input_ids"][None], s["loss_mask"][None]).item() for s in (short, long_))
    assert together == pytest.approx(alone, rel=1e-5)


# ---- the schedule --------------------------------------------------------------------


def test_cosine_schedule_follows_the_formula():
    total, warmup, floor, peak = 20, 4, 0.1, 2e-3
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = cosine_scheduler(opt, total, warmup, floor)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [peak * (s + 1) / warmup if s < warmup else
                peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
                for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[warmup - 1] == pytest.approx(peak) and seen[warmup] == pytest.approx(peak)
    assert all(a > b for a, b in zip(seen[warmup:], seen[warmup + 1:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(peak * floor)  # after the last step


# ---- training ------------------------------------------------------------------------


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    loaded = tiny_loaded()
    data = pattern_samples(loaded.model.vocab, 16)
    fixed = pad_collate(data[:8])
    before = mean_loss(loaded.model.backbone, fixed)
    config = TrainConfig(out=tmp_path, lr=1e-2, batch_size=4, max_steps=24, warmup_steps=2, save_every=100,
                         device="cpu", progress=False)
    result = train(loaded, data, config)
    after = mean_loss(loaded.model.backbone, fixed)
    assert before > 7.5  # about ln(4360): the untrained model guesses
    assert after < before - 3.0, (before, after)
    assert result.losses[-1][1] < result.losses[0][1] - 3.0


def test_bf16_autocast_computes_in_bfloat16_with_fp32_weights(tmp_path):
    runs = {}
    for bf16 in (False, True):
        loaded = tiny_loaded()
        config = TrainConfig(out=tmp_path / str(bf16), lr=1e-3, batch_size=4, max_steps=2, device="cpu",
                             progress=False, bf16=bf16)
        runs[bf16] = train(loaded, pattern_samples(loaded.model.vocab, 8), config).losses
        assert all(p.dtype == torch.float32 for p in loaded.model.backbone.parameters())
    assert runs[True] != runs[False]  # bfloat16 rounding shows ...
    assert [v for _, v in runs[True]] == pytest.approx([v for _, v in runs[False]], rel=2e-2)  # ... and no more


def run_config(out, **changes):
    # 12 samples, micro-batches of 2, 2 per step: 3 steps an epoch, 6 in all (crosses an epoch).
    base = dict(out=out, lr=5e-3, batch_size=2, grad_accum=2, epochs=2, warmup_steps=2, min_lr_ratio=0.1,
                save_every=2, keep=2, device="cpu", progress=False)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    loaded = tiny_loaded()
    result = train(loaded, pattern_samples(loaded.model.vocab, 12), run_config(out))
    return out, loaded, result


def log_records(out, key):
    return [r[key] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]


def log_losses(out):
    return list(zip(log_records(out, "step"), log_records(out, "loss")))


def test_resume_continues_at_the_same_step_with_the_same_losses(uninterrupted, tmp_path):
    whole_out, whole_model, whole = uninterrupted
    assert [s for s, _ in whole.losses] == [1, 2, 3, 4, 5, 6]

    def crash_at_3(step, record):
        if step == 3:
            raise RuntimeError("the machine went away")

    first = tiny_loaded()
    data = pattern_samples(first.model.vocab, 12)
    with pytest.raises(RuntimeError, match="went away"):
        train(first, data, run_config(tmp_path), on_step=crash_at_3)
    assert latest_checkpoint(tmp_path).name == "step-00000002.pt"
    with pytest.raises(TrainError, match="--resume"):  # a fresh run would clobber it
        train(tiny_loaded(), data, run_config(tmp_path))

    # Resume from step 2; then stop cleanly after step 5 (a signal does the same).
    second = train(tiny_loaded(), data, run_config(tmp_path, resume=True), on_step=lambda s, r: s == 5)
    assert (second.start_step, second.step, second.stopped) == (2, 5, True)
    assert second.model_dir is None
    third = train(tiny_loaded(seed=99), data, run_config(tmp_path, resume=True))  # the seed is overwritten
    assert (third.start_step, third.step) == (5, 6)

    assert second.losses + third.losses == whole.losses[2:]  # exactly, not approximately
    assert log_losses(tmp_path) == log_losses(whole_out)
    final = load_model(third.model_dir).model.backbone.state_dict()
    for key, value in whole_model.model.backbone.state_dict().items():
        assert torch.equal(final[key], value), key


def test_resume_refuses_other_settings(uninterrupted):
    out, loaded, _ = uninterrupted
    with pytest.raises(TrainError, match="grad_accum=2"):
        train(tiny_loaded(), pattern_samples(loaded.model.vocab, 12), run_config(out, resume=True, grad_accum=1))


def test_final_folder_loads_with_the_trained_weights(uninterrupted):
    out, loaded, result = uninterrupted
    assert result.model_dir == out / "model"
    reloaded = load_model(result.model_dir)
    assert reloaded.model.config.text_size == loaded.model.config.text_size
    trained = loaded.model.backbone.state_dict()
    saved = reloaded.model.backbone.state_dict()
    assert set(saved) == set(trained)
    for key, value in trained.items():
        assert torch.equal(saved[key], value), key
    assert json.loads((out / "model" / "training.json").read_text())["steps"] == 6
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep=2


def test_trains_on_the_stage_samples_with_their_collate(tmp_path):
    """The data engineer's stage-1 samples and collate, through the loop; activation
    checkpointing recomputes the same losses."""
    import numpy as np

    from model.train import samples
    from model.train.shards import PairCodes

    rng = np.random.default_rng(0)
    records = [PairCodes(f"p{i}", rng.integers(0, 4096, int(rng.integers(20, 60))),
                         rng.integers(0, 256, int(rng.integers(5, 15)))) for i in range(6)]
    losses = []
    for checkpointing in (False, True):
        loaded = tiny_loaded()
        dataset = samples.TrainDataset(records, loaded.model.config, 1)
        config = TrainConfig(out=tmp_path / str(checkpointing), lr=1e-3, batch_size=4, max_steps=2, device="cpu",
                             progress=False, grad_checkpointing=checkpointing)
        losses.append(train(loaded, dataset, config, collate=samples.collate).losses)
    assert losses[0] == losses[1] and len(losses[0]) == 2


# ---- the command ---------------------------------------------------------------------


def write_tokens(path, vocab, n):
    with path.open("w") as f:
        for s in pattern_samples(vocab, n):
            f.write(json.dumps({"input_ids": s["input_ids"].tolist(), "loss_mask": s["loss_mask"].tolist()}) + "\n")


def parse(*argv):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_command_from_a_bare_qwen2_folder_and_a_codec_folder(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    codec = save_model(tiny_loaded().model, tmp_path / "codec")
    torch.manual_seed(3)
    qwen = Qwen2ForCausalLM(Qwen2Config(**tiny_config().backbone))
    qwen.save_pretrained(tmp_path / "qwen")
    (tmp_path / "qwen" / "tokenizer.json").write_text("{}")
    text_rows = qwen.get_input_embeddings().weight.detach().clone()
    vocab = load_model(codec).model.vocab
    write_tokens(tmp_path / "tokens.jsonl", vocab, 8)

    args = parse("--stage", 2, "--backbone", tmp_path / "qwen", "--codec", codec, "--data", tmp_path / "tokens.jsonl",
                 "--out", tmp_path / "out", "--max-steps", 2, "--batch-size", 4, "--lr", "1e-9", "--device", "cpu",
                 "--no-progress")
    assert train_cli.run(args) == 0
    model = load_model(tmp_path / "out" / "model").model
    assert model.vocab == vocab and model.config.text_size == 256
    rows = model.backbone.get_input_embeddings().weight
    assert rows.shape[0] == vocab.size
    assert torch.allclose(rows[:256], text_rows, atol=1e-6)  # the Qwen2's text rows kept (lr 1e-9)
    assert (tmp_path / "out" / "model" / "backbone" / "tokenizer.json").exists()
    assert train_cli.run(args) == 2  # OUT holds checkpoints: refused without --resume


def test_command_refuses_a_manifest_and_fsdp_without_torchrun(tmp_path, capsys):
    save_model(tiny_loaded().model, tmp_path / "m")
    (tmp_path / "manifest.jsonl").write_text('{"version": 1, "id": "a", "audio": "a.wav", "text": "hi"}\n')
    args = parse("--stage", 1, "--model", tmp_path / "m", "--data", tmp_path / "manifest.jsonl",
                 "--out", tmp_path / "o")
    assert train_cli.run(args) == 2
    assert "shards" in capsys.readouterr().err
    write_tokens(tmp_path / "tokens.jsonl", tiny_loaded().model.vocab, 4)
    args = parse("--stage", 1, "--model", tmp_path / "m", "--data", tmp_path / "tokens.jsonl", "--out", tmp_path / "o",
                 "--fsdp", "--device", "cpu")
    assert train_cli.run(args) == 2
    assert "torchrun" in capsys.readouterr().err


# ---- two processes -------------------------------------------------------------------


def torchrun_train(tmp_path, *argv):
    with socket.socket() as s:  # a free port (torchrun's --standalone rendezvous hangs on some hosts)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "model.train.train_cli", *map(str, argv)]
    # Its own process group: on a timeout the ranks go with the launcher (a hung rank must
    # not outlive the test).
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in 90 s: {err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow  # two torchrun launches of two processes each: about 20 s on two cores
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_and_resume(tmp_path, sharding):
    """torchrun, two CPU processes with gloo, DDP or FSDP2: micro-batches of 2 on each rank
    must give the same losses and gradient norms as one process with micro-batches of 4
    (the same samples every step), rank 0 must write the same final model, and a resume
    from the step-1 checkpoint must reproduce step 2 exactly."""
    save_model(tiny_loaded().model, tmp_path / "m")
    write_tokens(tmp_path / "tokens.jsonl", tiny_loaded().model.vocab, 16)
    out = tmp_path / sharding
    argv = ["--stage", "1", "--model", tmp_path / "m", "--data", tmp_path / "tokens.jsonl", "--lr", "5e-3",
            "--max-steps", "2", "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--batch-size", "2",
            "--save-every", "1", "--out", out] + (["--fsdp"] if sharding == "fsdp" else [])
    torchrun_train(tmp_path, *argv)
    one = tiny_loaded()
    single = train(one, TokenJsonlDataset(tmp_path / "tokens.jsonl"),
                   TrainConfig(out=tmp_path / "one", lr=5e-3, batch_size=4, max_steps=2, warmup_steps=0,
                               device="cpu", progress=False))
    two = log_losses(out)
    assert [s for s, _ in two] == [1, 2]
    assert [v for _, v in two] == pytest.approx([v for _, v in single.losses], rel=1e-5)
    # The gradient too (Adam would hide a mis-scaled one in the weights).
    assert log_records(out, "grad_norm") == pytest.approx(log_records(tmp_path / "one", "grad_norm"), rel=1e-4)
    weights = load_model(out / "model").model.backbone.state_dict()
    for key, value in one.model.backbone.state_dict().items():
        # Adam turns rounding-level gradient differences into ~1e-5 steps; a rank that
        # missed the all-reduce would be off by about the learning rate (5e-3 a step).
        assert torch.allclose(weights[key], value, atol=1e-4), key

    (out / "checkpoints" / "step-00000002.pt").unlink()
    torchrun_train(tmp_path, *argv, "--resume")
    assert log_losses(out) == two
    resumed = load_model(out / "model").model.backbone.state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in weights.items())
