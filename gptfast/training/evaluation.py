"""What a model is scored on during and after training: the validation loss
(:func:`evaluate`) and a few sampled continuations (:func:`sample_text`)."""
import dataclasses
import math
from typing import List, Optional

import torch

from gptfast.training.data import IGNORE_INDEX, Dataset
from gptfast.training.distributed import DistContext
from gptfast.training.precision import autocast


@dataclasses.dataclass
class EvalResult:
    loss: float  # mean cross-entropy per target token (nats)
    perplexity: float
    tokens: int  # target tokens scored, over all ranks


def base_module(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT under torch.compile and DDP wrappers (FSDP2 shards in place: nothing to peel)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _check_count(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


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

    ``data``: a :class:`gptfast.training.data.Dataset` (its validation split is used) or one split.
    Pretraining data is scored on consecutive non-overlapping windows of ``block_size``
    (default: the model's context); fine-tuning data on its completion tokens only.
    ``max_batches`` caps the batches per rank; ``dtype`` enables autocast; ``dist``
    spreads the batches over ranks and sums the result (every rank must call).
    """
    _check_count("batch_size", batch_size, allow_none=False)
    _check_count("block_size", block_size)
    _check_count("max_batches", max_batches)
    split = data.val if isinstance(data, Dataset) else data
    gpt = base_module(model)
    block_size = gpt.config.block_size if block_size is None else block_size
    if block_size > gpt.config.block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's context of {gpt.config.block_size} tokens")
    device = next(gpt.parameters()).device
    ctx = dist or DistContext(device=device)
    was_training = gpt.training
    gpt.eval()
    try:
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        for x, y in split.eval_batches(batch_size, block_size, max_batches, ctx.rank, ctx.world_size):
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                _, loss = gpt(x, targets=y, return_logits=False)
            n = (y != IGNORE_INDEX).sum()
            totals[0] += loss.double() * n
            totals[1] += n
        ctx.all_reduce_sum(totals)
    finally:
        gpt.train(was_training)
    if totals[1].item() == 0:
        raise ValueError(f"there is nothing to score: the {getattr(split, 'name', 'data')} split has no target tokens "
                         f"in windows of {block_size}")
    loss = (totals[0] / totals[1]).item()
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=int(totals[1].item()))


@torch.no_grad()
def sample_text(model, tokenizer, prompts, max_new_tokens: int, temperature: float = 0.8, top_k=None,
                seed: int = 0) -> List[str]:
    """Continue each prompt with ``gptfast.generate`` (the C++ sampling loop); returns
    prompt + continuation texts. Prompts are cut to fit the context; an empty one starts
    from the end-of-text token (or a newline).

    The KV cache it sets up stays on the model, so the next evaluation reuses it (and,
    on CUDA, the captured decode graph); training forwards do not touch it."""
    from gptfast.generation.generate import generate
    from gptfast.generation.sampling_params import SamplingParams

    gpt = base_module(model)
    block = gpt.config.block_size
    fallback = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n")
    prompt_ids = [(tokenizer.encode(p) or fallback)[-(block - 1):] for p in prompts]
    new_tokens = min(max_new_tokens, block - max(len(ids) for ids in prompt_ids))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k or 0, seed=seed)
    was_training = gpt.training
    gpt.eval()
    try:
        results = generate(gpt, prompt_ids, params, tokenizer=tokenizer)
    finally:
        gpt.train(was_training)
    return [tokenizer.decode(ids) + r.text for ids, r in zip(prompt_ids, results)]
