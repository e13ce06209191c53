"""Pretraining and fine-tuning loop: ``train(cfg)`` and ``evaluate(model, data)``.

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

Usage::

    from gptfast.training import TrainConfig, train, evaluate
    result = train(TrainConfig.from_preset("tiny", max_steps=200, out_dir="runs/tiny"))
    result.history[-1]  # (step, train_loss, val_loss, tokens_per_s, mfu)
"""
import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from gptfast import checkpoint as ckpt_io
from gptfast.data import IGNORE_INDEX, BatchSampler, Dataset, load_dataset
from gptfast.distributed import (
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
from gptfast.mfu import flops_per_token, mfu as model_flops_utilisation, resolve_peak_tflops
from gptfast.train_config import TRAIN_PRESETS, TrainConfig, load_config_file

__all__ = [
    "TrainConfig",
    "TRAIN_PRESETS",
    "TrainResult",
    "StepInfo",
    "EvalResult",
    "train",
    "evaluate",
    "lr_at",
    "build_optimizer",
    "sample_text",
    "load_config_file",
]


@dataclasses.dataclass
class EvalResult:
    loss: float  # mean cross-entropy per target token (nats)
    perplexity: float
    tokens: int  # target tokens scored, over all ranks


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


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, cosine decay to ``min_lr`` at ``lr_decay_steps``, then flat."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.final_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm
    weights, the parameters with ndim < 2); the fused implementation on CUDA, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # e.g. parameter types the fused kernel rejects
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA (or when asked for), none in float32."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"dtype bfloat16 was requested but {torch.cuda.get_device_name(device)} does not support it")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _base_module(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT under torch.compile and DDP wrappers (FSDP2 shards in place: nothing to peel)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _param_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.device


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data,
    *,
    batch_size: int = 8,
    block_size: Optional[int] = None,
    max_batches: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    dist: Optional[DistContext] = None,
) -> EvalResult:
    """Mean next-token loss and perplexity of ``model`` on ``data``.

    ``data``: a :class:`gptfast.data.Dataset` (its validation split is used) or one split.
    Pretraining data is scored on consecutive non-overlapping windows of ``block_size``
    (default: the model's context); fine-tuning data on its completion tokens only.
    ``max_batches`` caps the batches per rank; ``dtype`` enables autocast; ``dist``
    spreads the batches over ranks and sums the result (every rank must call).
    """
    split = data.val if isinstance(data, Dataset) else data
    gpt = _base_module(model)
    block_size = block_size or gpt.config.block_size
    if block_size > gpt.config.block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's context of {gpt.config.block_size} tokens")
    device = _param_device(gpt)
    ctx = dist or DistContext(device=device)
    was_training = gpt.training
    gpt.eval()
    try:
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        for x, y in split.eval_batches(batch_size, block_size, max_batches, ctx.rank, ctx.world_size):
            x, y = x.to(device), y.to(device)
            with _autocast(device, dtype):
                _, loss = gpt(x, targets=y)
            n = (y != IGNORE_INDEX).sum()
            totals[0] += loss.double() * n
            totals[1] += n
        ctx.all_reduce_sum(totals)
    finally:
        gpt.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=int(totals[1].item()))


@torch.no_grad()
def sample_text(model, tokenizer, prompts, max_new_tokens: int, temperature: float = 0.8, top_k=None, seed: int = 0) -> List[str]:
    """Continue each prompt; returns prompt + continuation texts. Samples with the C++
    sampling loop through ``gptfast.generate`` when that is available, else ``GPT.generate``.

    The KV cache it sets up stays on the model, so the next evaluation reuses it (and,
    on CUDA, the captured decode graph); training forwards do not touch it."""
    gpt = _base_module(model)
    block = gpt.config.block_size
    fallback = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n")
    prompt_ids = [(tokenizer.encode(p) or fallback)[-(block - 1):] for p in prompts]
    new_tokens = min(max_new_tokens, block - max(len(ids) for ids in prompt_ids))
    was_training = gpt.training
    gpt.eval()
    try:
        try:
            from gptfast.generation import generate
            from gptfast.sampling import SamplingParams
        except ImportError:  # generation layer not installed: the model's own loop
            outs = [gpt.generate(ids, new_tokens, temperature=temperature, top_k=top_k, seed=seed)[0].tolist() for ids in prompt_ids]
            return [tokenizer.decode(out) for out in outs]
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k or 0, seed=seed)
        results = generate(gpt, prompt_ids, params, tokenizer=tokenizer)
        return [tokenizer.decode(ids) + r.text for ids, r in zip(prompt_ids, results)]
    finally:
        gpt.train(was_training)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


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
    def __init__(self, cfg: TrainConfig, ctx: DistContext, callback):
        self.cfg, self.ctx, self.callback = cfg, ctx, callback
        self.device = ctx.device
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = ckpt_io.checkpoint_path(self.out_dir)
        self.history = []
        self.step = 0
        self.last_val = None
        self.bar = None

    # ---- logging -------------------------------------------------------------------

    def log(self, message: str) -> None:
        if not self.ctx.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def _write_metrics(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- setup ---------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        cfg = self.cfg
        if cfg.resume and not self.ckpt_path.exists():
            raise FileNotFoundError(f"resume: there is no checkpoint at {self.ckpt_path}")
        if self.ckpt_path.exists() and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(
                f"{self.out_dir} already holds a checkpoint: pass --resume (resume=True) to continue it, --overwrite to start afresh, "
                "or choose another out directory"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)

    def _build_model_and_tokenizer(self):
        from gptfast.config import GPTConfig
        from gptfast.model import GPT
        from gptfast.tokenizer import load_tokenizer

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.init is not None:
            changed = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if getattr(cfg, k) is not None]
            if changed:
                raise ValueError(f"{changed} cannot be changed when starting from init={cfg.init!r}")
            model, init_tokenizer = ckpt_io.load_model_dir(cfg.init, backend=cfg.backend)
            tokenizer = load_tokenizer(cfg.tokenizer or init_tokenizer)
            if cfg.dropout is not None:
                model.config.dropout = cfg.dropout
                for module in model.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = cfg.dropout
            self.tokenizer_path = cfg.tokenizer or init_tokenizer
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
            overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "dropout") if getattr(cfg, k) is not None}
            overrides["vocab_size"] = cfg.vocab_size or tokenizer.vocab_size
            if cfg.block_size is not None:
                overrides["block_size"] = cfg.block_size  # a new model's context is the training context
            model = GPT(GPTConfig.from_preset(cfg.model, **overrides), backend=cfg.backend)
            self.tokenizer_path = cfg.tokenizer
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {model.config.vocab_size}"
            )
        self.block_size = cfg.block_size or model.config.block_size
        if self.block_size > model.config.block_size:
            raise ValueError(
                f"block_size {self.block_size} is longer than the model's context of {model.config.block_size} tokens"
            )
        return model, tokenizer

    def _load_data(self, tokenizer):
        """The dataset (train/val splits) and this rank's shard of the training split."""
        cfg = self.cfg

        def load(progress):
            return load_dataset(
                cfg.data, tokenizer, val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir,
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

    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        run_agreed(ctx, self._check_out_dir, run_here=ctx.is_main)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (the optimizer, the loss) in TF32
            torch.backends.cudnn.allow_tf32 = True

        model, self.tokenizer = self._build_model_and_tokenizer()
        self.dataset, train_shard = self._load_data(self.tokenizer)
        self.finetune = self.dataset.kind == "finetune"

        self.model = model.to(self.device)
        self.train_model = wrap_model(self.model, ctx, fsdp=cfg.fsdp, param_dtype=self.amp_dtype if cfg.fsdp else None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = build_optimizer(self.model, cfg, self.device)

        self.sampler = BatchSampler(
            train_shard, cfg.batch_size, self.block_size, seed=cfg.seed * 10007 + ctx.rank + 1,
            pad_to_block=cfg.compile,  # one shape for the compiled graph
        )
        # Dropout differs per rank; the weights were initialised identically above.
        random.seed(cfg.seed + ctx.rank)
        np.random.seed(cfg.seed + ctx.rank)
        torch.manual_seed(cfg.seed + ctx.rank)

        if cfg.resume:
            run_agreed(ctx, self._restore)

        peak = resolve_peak_tflops(cfg.mfu_peak, self.device, self.amp_dtype or torch.float32)
        self.peak_tflops = peak
        self.flops_per_token = flops_per_token(
            self.model.num_params(), self.model.config.n_layer, self.model.config.n_embd, self.block_size
        )
        self.log(
            f"training {self.model.num_params() / 1e6:.2f}M parameters ({self.model.backend} backend) on "
            f"{ctx.world_size} x {self.device.type}, {'bf16 autocast' if self.amp_dtype else 'fp32'}; data: "
            f"{self.dataset.description} ({self.dataset.kind}, {self.dataset.train.num_tokens:,} train / "
            f"{self.dataset.val.num_tokens:,} val tokens); block {self.block_size}, "
            f"{cfg.batch_size} x {cfg.grad_accum} x {ctx.world_size} sequences per step"
        )
        if ctx.is_main:
            with open(self.out_dir / "train_config.json", "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)

    # ---- checkpoints -----------------------------------------------------------------

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
            self.log("resume: settings changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"], self.cfg.fsdp)
        self.sampler.load_state_dict(state["data"][self.ctx.rank])
        ckpt_io.restore_rng_state(state["rng"][self.ctx.rank], self.device)
        self.step = state["step"]
        self.history = [tuple(h) for h in state["history"]]
        self.last_val = state.get("val_loss")
        self.log(f"resumed from {self.ckpt_path} at step {self.step}")

    def save_checkpoint(self) -> None:
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

    def export(self) -> None:
        """Final weights in Hugging Face format, into the run directory (rank 0)."""
        if self.cfg.fsdp:  # gather the shards into a plain CPU model first
            from gptfast.model import GPT

            full_state = full_model_state_dict(self.model, fsdp=True)
            if not self.ctx.is_main:
                return
            plain = GPT(self.model.config)
            plain.load_state_dict(full_state)
        else:
            plain = self.model
        if self.ctx.is_main:
            plain.save_pretrained(self.out_dir)
            ckpt_io.export_tokenizer_files(self.tokenizer_path, self.out_dir)
            self.log(f"exported the model (Hugging Face format) to {self.out_dir}")

    # ---- steps -----------------------------------------------------------------------

    def train_step(self, lr: float):
        """One optimizer step; returns (this rank's loss sum, target tokens, tokens processed)."""
        cfg, ctx = self.cfg, self.ctx
        for group in self.optimizer.param_groups:
            group["lr"] = lr
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
                with _autocast(self.device, self.amp_dtype), torch.profiler.record_function("forward"):
                    _, loss = self.train_model(x, targets=y)
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

    def _global_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        totals = torch.stack([loss_sum.double(), torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        self.ctx.all_reduce_sum(totals)
        return (totals[0] / totals[1]).item()

    def run_eval(self) -> tuple:
        cfg = self.cfg
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
        return result, samples

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        self.setup()
        self.saved_step = self.step if cfg.resume else -1
        if ctx.is_main and cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        want_every_loss = self.callback is not None
        last_log_time, tokens_since_log = time.perf_counter(), 0
        eval_done_at = -1
        stop = False
        try:
            while self.step < cfg.max_steps and not stop:
                lr = lr_at(self.step, cfg)
                loss_sum, count, processed = self.train_step(lr)
                self.step += 1
                tokens_since_log += processed * ctx.world_size
                is_log = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
                is_eval = (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step == cfg.max_steps
                loss = tokens_per_s = mfu = None
                if is_log or is_eval or want_every_loss:
                    loss = self._global_loss(loss_sum, count)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"training diverged: loss is {loss} at step {self.step}; lower lr")
                if is_log:
                    elapsed = time.perf_counter() - last_log_time
                    tokens_per_s = tokens_since_log / max(elapsed, 1e-9)
                    mfu = model_flops_utilisation(tokens_per_s, self.flops_per_token, self.peak_tflops, ctx.world_size)
                    last_log_time, tokens_since_log = time.perf_counter(), 0
                    if self.bar is None:  # no progress bar (e.g. torchrun logs): one line per log step
                        self.log(f"step {self.step}/{cfg.max_steps}: {self._postfix(loss, lr, tokens_per_s, mfu)}")
                val_loss = samples = None
                if is_eval:
                    paused = time.perf_counter()
                    result, samples = self.run_eval()
                    val_loss = self.last_val = result.loss
                    eval_done_at = self.step
                    self._report_eval(result, samples)
                    last_log_time += time.perf_counter() - paused  # tokens/s counts training time only
                if is_log or is_eval:
                    self.history.append((self.step, loss, val_loss, tokens_per_s, mfu))
                    self._write_metrics({"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                                         "mfu": mfu, "val_loss": val_loss})
                if self.bar is not None:
                    self.bar.update(1)
                    if is_log:
                        self.bar.set_postfix_str(self._postfix(loss, lr, tokens_per_s, mfu), refresh=False)
                if self.callback is not None:
                    info = StepInfo(self.step, cfg.max_steps, loss, lr, tokens_per_s, mfu, val_loss, samples)
                    stop = any_rank(ctx, bool(self.callback(info)))
                if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps and not stop:
                    paused = time.perf_counter()
                    self.save_checkpoint()
                    last_log_time += time.perf_counter() - paused
            if eval_done_at != self.step and self.step > 0:
                result, samples = self.run_eval()
                self.last_val = result.loss
                self._report_eval(result, samples)
            if self.saved_step != self.step:
                self.save_checkpoint()
            if cfg.export:
                self.export()
            # Leave together: when train() returns on any rank, rank 0's checkpoint and
            # export are on disk, and no rank tears the process group down while
            # another is still writing.
            ctx.barrier()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        return TrainResult(self.model, self.tokenizer, list(self.history), self.out_dir, self.step, self.last_val, ctx.rank)

    @staticmethod
    def _postfix(loss, lr, tokens_per_s, mfu) -> str:
        parts = [f"loss {loss:.4f}", f"lr {lr:.2e}", f"{tokens_per_s:,.0f} tok/s"]
        parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
        return ", ".join(parts)

    def _report_eval(self, result: EvalResult, samples) -> None:
        self.log(f"step {self.step}: val loss {result.loss:.4f}, perplexity {result.perplexity:.2f}")
        for text in samples or []:
            self.log("  sample: " + repr(text))
