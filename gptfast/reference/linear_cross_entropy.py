"""Reference twin of ``gptfast.ops.linear_cross_entropy``: the logits in full, then the
cross-entropy spelled out (log-sum-exp, the target's logit, a masked mean).

Written for exactness, never for speed: it holds every logit (and autograd holds their
gradient). The logits are computed in the inputs' dtype and the statistics in at least
float32 (float64 inputs stay float64), as the fused op does. It never imports the
kernels it judges.
"""
import torch


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100):
    """Mean over the targets that are not ``ignore_index`` of ``logsumexp(z) - z[target]``,
    ``z = hidden @ weight.T``; 0 (with zero gradients) when every target is ignored.

    hidden (..., C); weight (V, C); targets hidden.shape[:-1] integers.
    """
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = targets.reshape(-1).long()
    counted = flat != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, torch.where(counted, flat, 0)[:, None])[:, 0]
    losses = torch.where(counted, lse - picked, 0.0)
    return losses.sum() / counted.sum().clamp(min=1)
