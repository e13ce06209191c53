"""The pretraining and fine-tuning loop: ``train(cfg)``.

One optimizer step:

1. draw ``grad_accum`` micro-batches from this rank's data shard;
2. forward each (bf16 autocast on CUDA) and backward its loss, weighted by its share
   of the step's target tokens over all ranks, so the accumulated gradient is the exact
   token mean however prompts are masked or examples padded; gradients are reduced
   across ranks only on the last micro-batch;
3. clip the global gradient norm, set the warmup + cosine learning rate, AdamW step.

Every ``eval_interval`` steps the validation loss and perplexity are computed and rank 0
samples a few lines; every ``ckpt_interval`` steps a checkpoint is written atomically.
The RNG states, the data sampler's generator and the optimizer state all go into the
checkpoint, so ``resume=True`` reproduces the uninterrupted run's losses exactly.

Where the pieces live: settings in ``gptfast.training.config``, the model and tokenizer from
``gptfast.checkpoints.loader``, data in ``gptfast.training.data``, AdamW and the schedule in ``gptfast.training.optim``,
validation loss and samples in ``gptfast.training.evaluation``, console / metrics.jsonl /
throughput in ``gptfast.training.log``, checkpoints and the final export in
``gptfast.checkpoints.training_state``, ranks in ``gptfast.training.distributed``. This module is the loop.

Usage::

    from gptfast.training import TrainConfig, train, evaluate
    result = train(TrainConfig.from_preset("tiny", max_steps=200, out_dir="runs/tiny"))
    result.history[-1]  # (step, train_loss, val_loss, tokens_per_s, mfu)
"""
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from gptfast.checkpoints import training_state as ckpt_io
from gptfast.runtime.atomic_files import make_output_dir, remove_stale_temp_files
from gptfast.training.data import IGNORE_INDEX, BatchSampler, load_dataset
from gptfast.training.distributed import (
    DistContext,
    any_rank,
    full_model_state_dict,
    full_state_dicts,
    gradient_sync,
    init_distributed,
    load_full_state_dicts,
    run_agreed,
    wrap_model,
)
from gptfast.training.evaluation import evaluate, sample_text
from gptfast.checkpoints.loader import load_model_and_tokenizer
from gptfast.model import GPT
from gptfast.training.mfu import flops_per_token, mfu as model_flops_utilisation, resolve_peak_tflops
from gptfast.training.optim import build_optimizer, lr_at, set_lr
from gptfast.training.precision import autocast, autocast_dtype
from gptfast.training.config import TrainConfig
from gptfast.training.log import Throughput, TrainLog

__all__ = ["train", "TrainResult", "StepInfo"]

# Model settings of a TrainConfig, passed to the loader as GPTConfig overrides.
_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "dropout")


@dataclasses.dataclass
class StepInfo:
    """What the ``callback`` of :func:`train` sees after every optimizer step."""

    step: int  # optimizer steps done
    max_steps: int
    loss: float  # this step's training loss (token mean over ranks and micro-batches)
    lr: float
    tokens_per_s: Optional[float]  # at log steps
    mfu: Optional[float]  # at log steps, when a peak is known
    val_loss: Optional[float] = None  # at evaluation steps
    samples: Optional[List[str]] = None  # at evaluation steps, rank 0


@dataclasses.dataclass
class TrainResult:
    model: torch.nn.Module  # the trained GPT (unwrapped; sharded in place under FSDP)
    tokenizer: object
    history: list  # (step, train_loss, val_loss, tokens_per_s, mfu), at log and evaluation steps
    out_dir: Path
    step: int
    val_loss: Optional[float]
    rank: int = 0  # this process's rank (0 when not distributed)


def train(cfg: TrainConfig, *, callback: Optional[Callable[[StepInfo], Optional[bool]]] = None) -> TrainResult:
    """Train (or fine-tune) a model as ``cfg`` says; see the module docstring.

    ``callback(info)`` runs on every rank after every optimizer step; returning True
    (on any rank) ends the run early, with a final checkpoint and export. Under torchrun
    this creates the process group (NCCL on CUDA, gloo on CPU) and destroys it at the
    end, unless the caller had already initialised one, which it then uses and leaves.
    """
    cfg.validate()
    ctx = init_distributed(cfg.device)
    try:
        return _Run(cfg, ctx, callback).run()
    finally:
        ctx.shutdown()


class _Run:
    """One run on this rank. ``__init__`` builds everything the loop touches (model, data,
    optimizer, sampler; a resumed run's state from its checkpoint); ``run`` is the loop."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, callback):
        self.cfg, self.ctx, self.callback = cfg, ctx, callback
        self.device = ctx.device
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = ckpt_io.checkpoint_path(self.out_dir)
        self.log = TrainLog(self.out_dir, enabled=ctx.is_main)
        run_agreed(ctx, self._prepare_out_dir, run_here=ctx.is_main)
        self.amp_dtype = autocast_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (the optimizer, the loss) in TF32
            torch.backends.cudnn.allow_tf32 = True

        loaded = self._load_model_and_tokenizer()
        self.model, self.tokenizer, self.tokenizer_path = loaded.model.train(), loaded.tokenizer, loaded.tokenizer_path
        self.block_size = cfg.block_size or self.model.config.block_size
        if self.block_size > self.model.config.block_size:
            source = f"the model in {cfg.init!r}" if cfg.init else "the model"
            raise ValueError(
                f"block_size (--block-size) {self.block_size} is longer than the context of {source}, "
                f"{self.model.config.block_size} tokens (a loaded model's context cannot grow)"
            )
        self.dataset, train_shard = self._load_data()
        self.finetune = self.dataset.kind == "finetune"
        self.train_model = wrap_model(self.model, ctx, fsdp=cfg.fsdp, param_dtype=self.amp_dtype if cfg.fsdp else None)
        if cfg.compile:
            # The whole model as one graph with the fused ops inside (opaque custom ops);
            # under DDP/FSDP dynamo splits the graph at the gradient buckets, so no fullgraph there.
            self.train_model = torch.compile(self.train_model, fullgraph=not ctx.enabled, dynamic=False,
                                             backend=cfg.compile_backend)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.sampler = BatchSampler(
            train_shard, cfg.batch_size, self.block_size, seed=cfg.seed * 10007 + ctx.rank + 1,
            pad_to_block=cfg.compile,  # one shape for the compiled graph
        )
        # Dropout differs per rank; the weights were initialised identically above.
        random.seed(cfg.seed + ctx.rank)
        np.random.seed(cfg.seed + ctx.rank)
        torch.manual_seed(cfg.seed + ctx.rank)
        self.peak_tflops = resolve_peak_tflops(cfg.mfu_peak, self.device, self.amp_dtype or torch.float32)
        self.flops_per_token = flops_per_token(
            self.model.num_params(), self.model.config.n_layer, self.model.config.n_embd, self.block_size
        )

        self.step = 0  # optimizer steps done
        self.history = []  # (step, loss, val_loss, tokens_per_s, mfu) at log and evaluation steps
        self.last_val = None  # the latest validation loss
        self.saved_step = -1  # the step of this run's checkpoint on disk (-1: none yet)
        self.evaluated_step = -1  # the step of the latest evaluation
        self.stop = False  # the callback asked to end the run
        self.compiled = False  # whether the compiled step has run (its first call compiles)
        self.throughput = Throughput()
        if cfg.resume:
            run_agreed(ctx, self._restore)
        self._announce()

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.progress:
            self.log.open_bar(cfg.max_steps, self.step)
        try:
            self.throughput.restart()  # tokens/s counts from the first step
            while self.step < cfg.max_steps and not self.stop:
                self.one_step()
            self.finish()
        finally:
            self.log.close()
        return TrainResult(self.model, self.tokenizer, list(self.history), self.out_dir, self.step, self.last_val,
                           self.ctx.rank)

    def one_step(self) -> None:
        """One optimizer step, then what is due after it: log, evaluation, callback, checkpoint."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        compiling = cfg.compile and not self.compiled
        if compiling:
            self.log.compiling()
            started = time.perf_counter()
        loss_sum, count, processed = self.train_step(lr)
        self.step += 1
        self.throughput.add(processed * self.ctx.world_size)
        if compiling:  # the compile is not training time: tokens/s counts from the next step
            self.log.compiled(time.perf_counter() - started)
            self.compiled = True
            self.throughput.restart()
        is_log = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
        is_eval = (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step == cfg.max_steps
        loss = self.global_loss(loss_sum, count) if is_log or is_eval or self.callback is not None else None
        tokens_per_s, mfu = self.rates() if is_log else (None, None)
        val_loss, samples = self.eval_and_sample() if is_eval else (None, None)
        record = None
        if is_log or is_eval:
            self.history.append((self.step, loss, val_loss, tokens_per_s, mfu))
            record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "val_loss": val_loss}
        self.log.step(self.step, cfg.max_steps, record)
        if self.callback is not None:
            info = StepInfo(self.step, cfg.max_steps, loss, lr, tokens_per_s, mfu, val_loss, samples)
            self.stop = any_rank(self.ctx, bool(self.callback(info)))
        if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps and not self.stop:
            self.save_checkpoint()

    def finish(self) -> None:
        """The end of the run (max_steps, or stopped): evaluation, checkpoint and export
        unless done at this step already."""
        if self.evaluated_step != self.step and self.step > 0:
            self.eval_and_sample()
        if self.saved_step != self.step:
            self.save_checkpoint()
        if self.cfg.export and _export_model(self.model, self.tokenizer_path, self.out_dir, self.ctx, self.cfg.fsdp):
            self.log.message(f"exported the model (Hugging Face format) to {self.out_dir}")
        # Leave together: when train() returns on any rank, rank 0's checkpoint and
        # export are on disk, and no rank tears the process group down while
        # another is still writing.
        self.ctx.barrier()

    # ---- one optimizer step ------------------------------------------------------------

    def train_step(self, lr: float):
        """One optimizer step; returns (this rank's loss sum, target tokens, tokens processed)."""
        cfg, ctx = self.cfg, self.ctx
        set_lr(self.optimizer, lr)
        batches = [self.sampler.next_batch() for _ in range(cfg.grad_accum)]
        counts = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
        global_count = float(sum(counts))
        if self.finetune and ctx.enabled:  # ranks hold different numbers of completion tokens
            global_count = ctx.all_reduce_sum(torch.tensor([global_count], device=self.device)).item()
        else:
            global_count *= ctx.world_size
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        processed = 0
        for i, (x, y) in enumerate(batches):
            x, y = self._to_device(x), self._to_device(y)
            last = i == len(batches) - 1
            with gradient_sync(self.train_model, enabled=last or not ctx.enabled, fsdp=cfg.fsdp):
                with autocast(self.device, self.amp_dtype), torch.profiler.record_function("forward"):
                    _, loss = self.train_model(x, targets=y, return_logits=False)  # no logits held
                # DDP averages over ranks, hence world_size / global_count: the sum is the global token mean.
                with torch.profiler.record_function("backward"):  # ranges for `gptfast profile train`
                    (loss * (counts[i] * ctx.world_size / global_count)).backward()
            loss_sum += loss.detach().float() * counts[i]
            processed += x.numel()
        with torch.profiler.record_function("optimizer"):
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, sum(counts), processed

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def global_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        """The step's token-mean loss over all ranks; a non-finite one ends the run."""
        totals = torch.stack([loss_sum.double(), torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        self.ctx.all_reduce_sum(totals)
        loss = (totals[0] / totals[1]).item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss is {loss} at step {self.step}; lower lr")
        return loss

    def rates(self):
        """(tokens/s, MFU) of the training time since the last log step."""
        tokens_per_s = self.throughput.take()
        mfu = model_flops_utilisation(tokens_per_s, self.flops_per_token, self.peak_tflops, self.ctx.world_size)
        return tokens_per_s, mfu

    # ---- evaluation and checkpoints (training time stops meanwhile) ----------------------

    def eval_and_sample(self):
        """Validation loss on every rank and, on rank 0, samples; returns (val_loss, samples)."""
        cfg = self.cfg
        with self.throughput.paused():
            result = evaluate(
                self.model, self.dataset.val, batch_size=cfg.batch_size, block_size=self.block_size,
                max_batches=cfg.eval_batches, dtype=self.amp_dtype, dist=self.ctx,
            )
            samples = None
            if self.ctx.is_main and cfg.sample_prompts and not cfg.fsdp:  # sharded weights: every rank would have to join
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):  # sampling must not shift the training RNG streams
                    samples = sample_text(
                        self.model, self.tokenizer, cfg.sample_prompts, cfg.sample_tokens,
                        cfg.sample_temperature, cfg.sample_top_k, seed=cfg.seed + self.step,
                    )
        self.last_val, self.evaluated_step = result.loss, self.step
        self.log.message(f"step {self.step}: val loss {result.loss:.4f}, perplexity {result.perplexity:.2f}")
        for text in samples or []:
            self.log.message("  sample: " + repr(text))
        return result.loss, samples

    def save_checkpoint(self) -> None:
        with self.throughput.paused():
            model_state, optimizer_state = full_state_dicts(self.model, self.optimizer, self.cfg.fsdp)
            rng_states = self.ctx.all_gather_object(ckpt_io.capture_rng_state(self.device))
            data_states = self.ctx.all_gather_object(self.sampler.state_dict())
            if self.ctx.is_main:
                ckpt_io.save_checkpoint(self.ckpt_path, {
                    "model_config": self.model.config.to_dict(),
                    "train_config": self.cfg.to_dict(),
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "scheduler": {"step": self.step, "lr": lr_at(max(self.step - 1, 0), self.cfg)},
                    "step": self.step,
                    "world_size": self.ctx.world_size,
                    "data": data_states,
                    "rng": rng_states,
                    "history": [list(h) for h in self.history],
                    "val_loss": self.last_val,
                })
            self.ctx.barrier()
        self.saved_step = self.step

    def _restore(self) -> None:
        state = ckpt_io.load_checkpoint(self.ckpt_path)
        ckpt_io.check_model_config(state["model_config"], self.model.config.to_dict(), self.ckpt_path)
        if state["world_size"] != self.ctx.world_size:
            raise ckpt_io.CheckpointMismatchError(
                f"{self.ckpt_path} was written by {state['world_size']} rank(s) but this run has {self.ctx.world_size}: "
                "resume with the same number of ranks (each rank's data shard and sampler state differ)"
            )
        changed = {
            k: (v, getattr(self.cfg, k)) for k, v in state["train_config"].items()
            if k not in ("resume", "overwrite", "max_steps", "progress", "out_dir") and getattr(self.cfg, k, v) != v
        }
        if changed:
            self.log.message("resume: settings changed since the checkpoint: "
                             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"], self.cfg.fsdp)
        self.sampler.load_state_dict(state["data"][self.ctx.rank])
        ckpt_io.restore_rng_state(state["rng"][self.ctx.rank], self.device)
        self.step = self.saved_step = state["step"]
        self.history = [tuple(h) for h in state["history"]]
        self.last_val = state.get("val_loss")
        self.log.rewind(self.step)  # the steps after the checkpoint run again: no duplicate rows
        self.log.message(f"resumed from {self.ckpt_path} at step {self.step}")

    # ---- setup -------------------------------------------------------------------------

    def _prepare_out_dir(self) -> None:
        cfg = self.cfg
        if cfg.resume and not self.ckpt_path.exists():
            raise FileNotFoundError(f"resume: there is no checkpoint at {self.ckpt_path}")
        if self.ckpt_path.exists() and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(
                f"{self.out_dir} already holds a checkpoint: pass --resume (resume=True) to continue it, --overwrite to start afresh, "
                "or choose another out directory"
            )
        make_output_dir(self.out_dir, "out_dir (--out)")
        remove_stale_temp_files(self.out_dir)  # left by a run killed mid-write
        if cfg.overwrite:
            self.log.restart()

    def _load_model_and_tokenizer(self):
        cfg = self.cfg
        overrides = {k: getattr(cfg, k) for k in _MODEL_KEYS}
        if cfg.init is None:
            overrides["block_size"] = cfg.block_size  # a new model's context is the training context
        return load_model_and_tokenizer(
            cfg.init, preset=cfg.model, tokenizer=cfg.tokenizer, overrides=overrides, vocab_from_tokenizer=True,
            backend=cfg.backend, device=self.device, seed=cfg.seed,
        )

    def _load_data(self):
        """The dataset (train/val splits) and this rank's shard of the training split."""
        cfg = self.cfg

        def load(progress):
            return load_dataset(
                cfg.data, self.tokenizer, val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir,
                corpus_max_bytes=cfg.corpus_cap, finetune=cfg.finetune, progress=progress,
            )

        # Each node's first rank tokenises (and fills the cache); the others then read the cache.
        first = self.ctx.local_rank == 0
        dataset = run_agreed(self.ctx, lambda: load(cfg.progress and self.ctx.is_main), run_here=first)
        if not first:
            dataset = load(False)
        dataset.check_block_size(self.block_size)
        train_shard = dataset.train.shard(self.ctx.rank, self.ctx.world_size)
        train_shard.check_block_size(self.block_size)
        return dataset, train_shard

    def _announce(self) -> None:
        """One line saying what is trained on what, and train_config.json in the run directory."""
        cfg, ctx = self.cfg, self.ctx
        self.log.message(
            f"training {self.model.num_params() / 1e6:.2f}M parameters ({self.model.backend} backend) on "
            f"{ctx.world_size} x {self.device.type}, {'bf16 autocast' if self.amp_dtype else 'fp32'}; data: "
            f"{self.dataset.description} ({self.dataset.kind}, {self.dataset.train.num_tokens:,} train / "
            f"{self.dataset.val.num_tokens:,} val tokens); block {self.block_size}, "
            f"{cfg.batch_size} x {cfg.grad_accum} x {ctx.world_size} sequences per step"
        )
        if ctx.is_main:
            with open(self.out_dir / "train_config.json", "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)


def _export_model(model, tokenizer_path, out_dir, ctx, fsdp: bool) -> bool:
    """The final weights in Hugging Face format, and the tokenizer's files, into ``out_dir``
    (so a run directory doubles as a model directory). Every rank calls (FSDP gathers the
    shards into a plain CPU model first); rank 0 writes. Returns whether this rank wrote."""
    if fsdp:
        full_state = full_model_state_dict(model, fsdp=True)
        if not ctx.is_main:
            return False
        model = GPT(model.config)
        model.load_state_dict(full_state)
    if not ctx.is_main:
        return False
    model.save_pretrained(out_dir)
    ckpt_io.export_tokenizer_files(tokenizer_path, out_dir)
    return True
