"""The training loop: plain torch, one process or many (distributed.py).

    AdamW (the paper's betas 0.9/0.95, weight decay 0.1 on matrices only) -> cosine
    schedule with warm-up (schedule.py) -> per step `grad_accum` micro-batches, the loss
    summed over their targets and divided once by the step's target count on every rank
    (so accumulation and world size do not change what a step computes) -> gradient
    clipping -> bf16 autocast on CUDA (fp32 on CPU) -> checkpoints every `save_every`
    steps and at the end (checkpoints.py) -> the final model folder OUT/model.

A resumed run restores model, optimizer, scheduler, RNG, data position and step, and on
the CPU reproduces the uninterrupted run's losses exactly. SIGINT/SIGTERM stop after the
current step with a checkpoint (a second SIGINT stops at once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from ..checkpoint import LoadedModel, save_model
from . import distributed as D
from .batch_plan import BatchPlan
from .checkpoints import (capture_rng, latest_checkpoint, load_checkpoint, prune_checkpoints, restore_rng,
                          save_checkpoint)
from .metrics import MetricsLog, Progress
from .objective import CausalLMObjective
from .schedule import cosine_scheduler, default_warmup
from .token_data import TokenDataset, pad_collate

__all__ = ["TrainConfig", "TrainResult", "TrainError", "train", "MODEL_DIR"]

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # OUT/model: the final model folder (serve --model / worker --model)
# What a checkpoint must agree on with the resuming run: anything else changes the data
# order or the schedule, and the run would not continue the one it claims to.
_RESUME_KEYS = ("dataset_size", "batch_size", "grad_accum", "world_size", "seed", "shuffle", "total_steps",
                "warmup_steps")


class TrainError(RuntimeError):
    """Training cannot start or resume as asked. Nothing was overwritten; the message says why."""


@dataclass
class TrainConfig:
    out: Path
    stage: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int | None = None  # None: 3% of the run
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = 1  # sequences per micro-batch, per process
    grad_accum: int = 1
    clip: float = 1.0  # max gradient norm; 0: no clipping
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    save_every: int = 500
    keep: int = 3  # checkpoints kept
    log_every: int = 1
    seed: int = 0
    shuffle: bool = True
    resume: bool = False
    device: str = "auto"
    bf16: bool | None = None  # bf16 autocast; None: on CUDA only
    fsdp: bool = False
    grad_checkpointing: bool = False
    num_workers: int = 0
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in OUT/model/training.json

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")


@dataclass
class TrainResult:
    start_step: int  # 0, or the checkpoint's step when resumed
    step: int  # the last completed step
    total_steps: int
    losses: list[tuple[int, float]]  # (step, mean loss over the step's targets), this run's steps
    tokens_per_s: float  # input tokens (all ranks) per second of this run's steps
    model_dir: Path | None  # the final model folder, when the run finished
    stopped: bool = False  # stopped early (signal or callback) after writing a checkpoint


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices (embeddings included); not biases and norm gains, as GPT-style runs do.
    decay, rest = [], []
    for p in module.parameters():  # tied embeddings/head appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _StopFlag:
    """SIGINT/SIGTERM ask for a stop after the current step; a second SIGINT is Ctrl-C."""

    def __init__(self) -> None:
        self.requested = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step, then writing a checkpoint")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class _Run:
    def __init__(self, loaded: LoadedModel, dataset: TokenDataset, config: TrainConfig, env: D.DistEnv,
                 collate: Callable | None) -> None:
        self.loaded, self.dataset, self.config, self.env = loaded, dataset, config, env
        self.collate = collate or getattr(dataset, "collate", None) or pad_collate
        self.device = D.resolve_device(config.device, env)
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        self.started_group = D.start(env, self.device)
        torch.manual_seed(config.seed)

        backbone = loaded.model.backbone
        backbone.to(device=self.device, dtype=torch.float32).train()  # fp32 master weights
        if config.grad_checkpointing:  # non-reentrant: the variant that works under DDP
            kwargs = {"use_reentrant": False}
            if hasattr(backbone, "activation_checkpointing_enable"):  # transformers' newer name
                backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.module = D.wrap(CausalLMObjective(backbone), env, self.device, config.fsdp, self.bf16)
        self.optimizer = torch.optim.AdamW(_param_groups(self.module, config.weight_decay), lr=config.lr,
                                           betas=config.betas, weight_decay=config.weight_decay)
        self.plan = BatchPlan(len(dataset), config.batch_size, config.grad_accum, env.world_size, env.rank,
                              config.seed, config.shuffle)
        self.total_steps = config.max_steps or config.epochs * self.plan.steps_per_epoch
        self.warmup_steps = (config.warmup_steps if config.warmup_steps is not None
                             else default_warmup(self.total_steps))
        self.warmup_steps = min(self.warmup_steps, self.total_steps)
        self.scheduler = cosine_scheduler(self.optimizer, self.total_steps, self.warmup_steps, config.min_lr_ratio)
        self.step, self.epoch, self.micro, self.elapsed = 0, 0, 0, 0.0

    # ---- checkpoints -------------------------------------------------------------------

    def plan_record(self) -> dict[str, Any]:
        p = self.plan
        return {"dataset_size": p.dataset_size, "batch_size": p.batch_size, "grad_accum": p.grad_accum,
                "world_size": p.world_size, "seed": p.seed, "shuffle": p.shuffle,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def save(self) -> None:
        fsdp = self.config.fsdp
        model_sd = D.model_state(self.module, fsdp)  # collective under FSDP: every rank
        optim_sd = D.optimizer_state(self.module, self.optimizer, fsdp)
        if self.env.is_main:
            save_checkpoint(self.config.out, self.step, {
                "step": self.step, "epoch": self.epoch, "micro": self.micro, "elapsed": self.elapsed,
                "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng(), "plan": self.plan_record(), "stage": self.config.stage})
            prune_checkpoints(self.config.out, self.config.keep)

    def resume(self) -> int | None:
        path = latest_checkpoint(self.config.out)
        if path is None:
            log.warning("--resume: no checkpoint in %s, starting at step 0", self.config.out)
            return None
        state = load_checkpoint(path)
        for key in _RESUME_KEYS:
            if state["plan"][key] != self.plan_record()[key]:
                raise TrainError(f"{path}: made with {key}={state['plan'][key]!r}, this run has "
                                 f"{self.plan_record()[key]!r}; resume with the same data and settings")
        D.load_states(self.module, self.optimizer, state["model"], state["optimizer"], self.config.fsdp, self.env)
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        self.elapsed = state["elapsed"]
        if self.env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return self.step

    # ---- data --------------------------------------------------------------------------

    def steps_from_position(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Each step's micro-batches from the saved position on, advancing the position as
        they are handed out (the position saved after a step is the next step's start)."""
        while True:
            batches = self.plan.micro_batches(self.epoch)[self.micro:]
            # Its own generator: a loader's worker seeds must not draw from the global RNG,
            # or a resumed run's RNG would differ from the uninterrupted one.
            loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.config.seed + self.epoch))
            group: list[dict[str, torch.Tensor]] = []
            for batch in loader:
                group.append(batch)
                if len(group) == self.config.grad_accum:
                    self.micro += len(group)
                    yield group
                    group = []
            if group:
                self.micro += len(group)
                yield group
            self.epoch, self.micro = self.epoch + 1, 0

    # ---- the step ----------------------------------------------------------------------

    def train_step(self, group: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """One optimizer step: (mean loss over the step's targets, gradient norm, input tokens)."""
        dev, env = self.device, self.env
        counts = torch.zeros(2, dtype=torch.float64, device=dev)
        for b in group:
            counts[0] += b["loss_mask"][:, 1:].sum()
            counts[1] += b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
        D.all_reduce_sum(counts, env)
        targets = max(int(counts[0].item()), 1)
        # The CPU autocasts too when asked (--precision bf16): slower there, but the same code path.
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, b in enumerate(group):
            last = i == len(group) - 1
            if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2: reduce once per step
                self.module.set_requires_gradient_sync(last)
            with D.no_sync(self.module, not last):
                ids, mask = b["input_ids"].to(dev, non_blocking=True), b["loss_mask"].to(dev, non_blocking=True)
                attn = b["attention_mask"].to(dev, non_blocking=True) if "attention_mask" in b else None
                with autocast:
                    summed = self.module(ids, mask, attn)
                # DDP and FSDP average gradients over ranks: scale back to a sum over all targets.
                (summed * (env.world_size / targets)).backward()
            loss_sum += summed.detach().double()
        D.all_reduce_sum(loss_sum, env)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip if self.config.clip > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.item() / targets, float(norm), int(counts[1].item())

    def stop_agreed(self, local: bool) -> bool:
        """Every rank must stop at the same step (a signal may reach them apart)."""
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return bool(D.all_reduce_sum(flag, self.env).item() > 0)

    # ---- the run -----------------------------------------------------------------------

    def run(self, on_step: Callable[[int, dict[str, Any]], bool | None] | None) -> TrainResult:
        config, env = self.config, self.env
        resumed = self.resume() if config.resume else None
        start_step = self.step
        metrics = MetricsLog(config.out, resume_step=resumed) if env.is_main else None
        progress = Progress(self.total_steps, self.step, f"stage {config.stage}", env.is_main and config.progress)
        losses: list[tuple[int, float]] = []
        run_tokens, run_seconds = 0, 0.0
        window_tokens, window_t0 = 0, time.perf_counter()
        stopped = False
        try:
            with _StopFlag() as flag:
                batches = self.steps_from_position()
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, norm, tokens = self.train_step(next(batches))
                    seconds = time.perf_counter() - t0
                    self.step += 1
                    self.elapsed += seconds
                    run_tokens, run_seconds = run_tokens + tokens, run_seconds + seconds
                    window_tokens += tokens
                    losses.append((self.step, loss))
                    record = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                              "tokens": tokens}
                    if metrics is not None and (self.step % config.log_every == 0 or self.step == self.total_steps):
                        now = time.perf_counter()
                        record.update(tokens_per_s=window_tokens / max(now - window_t0, 1e-9), elapsed=self.elapsed)
                        metrics.write(record)
                        window_tokens, window_t0 = 0, now
                    progress.update(self.step, loss, lr)
                    wants_stop = bool(on_step(self.step, record)) if on_step is not None else False
                    if self.stop_agreed(flag.requested or wants_stop) and self.step < self.total_steps:
                        self.save()
                        stopped = True
                        break
                    if self.step % config.save_every == 0 or self.step == self.total_steps:
                        self.save()
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
        model_dir = None if stopped else self.finish(losses)
        D.stop(self.started_group)
        return TrainResult(start_step, self.step, self.total_steps, losses,
                           run_tokens / max(run_seconds, 1e-9), model_dir, stopped)

    def finish(self, losses: list[tuple[int, float]]) -> Path | None:
        """Write OUT/model (rank 0): the trained backbone with the starting folder's codec."""
        model = self.loaded.model
        if self.config.fsdp:
            model = _gathered_model(model, D.model_state(self.module, fsdp=True))  # collective
        if not self.env.is_main:
            return None
        folder = save_model(model, self.config.out / MODEL_DIR, self.loaded.tokenizer, self.loaded.decoder)
        settings = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "meta"}
        record = {"stage": self.config.stage, "steps": self.step, "final_loss": losses[-1][1] if losses else None,
                  **self.plan_record(), **self.config.meta, "settings": settings}
        (folder / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        return folder


def _gathered_model(model, state: dict[str, torch.Tensor]):
    """FSDP: a CPU copy of the model from the gathered full state dict (rank 0 has it)."""
    from transformers import Qwen2ForCausalLM

    from ..omniflatten import OmniFlatten

    if not state:
        return model
    cfg = model.backbone.config
    with torch.device("meta"):
        backbone = Qwen2ForCausalLM(cfg)
    result = backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()}, strict=False,
                                      assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise TrainError(f"the gathered state does not match the backbone: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]}")
    if cfg.tie_word_embeddings:
        backbone.lm_head.weight = backbone.model.embed_tokens.weight
    backbone.model.rotary_emb = type(backbone.model.rotary_emb)(config=cfg)  # a real, non-meta buffer
    return OmniFlatten(model.config, backbone, model.vocab, "cpu")


def train(loaded: LoadedModel, dataset: TokenDataset, config: TrainConfig, env: D.DistEnv | None = None,
          collate: Callable | None = None,
          on_step: Callable[[int, dict[str, Any]], bool | None] | None = None) -> TrainResult:
    """Train `loaded.model` in place on `dataset` and write OUT/model. `on_step(step, record)`
    runs after every step; returning True stops the run there with a checkpoint (tests,
    embedding callers). A fresh run refuses an OUT that already holds checkpoints."""
    env = env or D.DistEnv()
    if not config.resume and latest_checkpoint(config.out) is not None:
        raise TrainError(f"{config.out} already holds checkpoints: pass --resume to continue them, "
                         "or choose a new --out")
    return _Run(loaded, dataset, config, env, collate).run(on_step)
