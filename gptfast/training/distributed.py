"""torch.distributed plumbing for training: process group, model wrapping, full state dicts.

Launch with torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; without those variables everything runs as a single process. The process
group uses NCCL when the ranks train on CUDA devices and gloo on CPU.

Two ways to spread a model over ranks:

- DistributedDataParallel (default): every rank holds the whole model; gradients are
  averaged across ranks during backward.
- FSDP2 (``fsdp=True``, ``torch.distributed.fsdp.fully_shard``): parameters, gradients
  and optimizer state are sharded across ranks, each transformer block being gathered
  just in time for its forward and backward. For models that do not fit one device.
"""
import contextlib
import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist

from gptfast.runtime.devices import resolve_device


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context created the process group and destroys it at the end

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (a no-op on one rank)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, indexed by rank."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, what="device (--device)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistContext(device=dev)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev, owns_group=owns)


def _fully_shard():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # torch 2.4 / 2.5
        except ImportError:
            raise RuntimeError("--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch >= 2.4)") from None
    return fully_shard, MixedPrecisionPolicy


def wrap_model(model: torch.nn.Module, ctx: DistContext, fsdp: bool = False, param_dtype: Optional[torch.dtype] = None):
    """The module the training step calls: ``model`` itself, DDP around it, or ``model``
    sharded in place by FSDP2 (each transformer block a unit, the root holding the
    embeddings, the tied head and the final norm)."""
    if fsdp:
        if not ctx.enabled:
            raise ValueError("--fsdp needs more than one rank: launch with torchrun --nproc_per_node N")
        fully_shard, MixedPrecisionPolicy = _fully_shard()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    return model


@contextlib.contextmanager
def gradient_sync(train_model, enabled: bool, fsdp: bool):
    """Skip the cross-rank gradient reduction for all but the last micro-batch of a step."""
    if enabled:
        yield
        return
    if fsdp:
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)
    elif hasattr(train_model, "no_sync"):
        with train_model.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------
# Full (unsharded) state dicts, for checkpoints and export
# ---------------------------------------------------------------------------------------


def full_state_dicts(model, optimizer, fsdp: bool):
    """Model and optimizer state dicts with full tensors on the CPU (only meaningful on
    rank 0 under FSDP, where gathering them is a collective every rank must join)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state_dict(model, fsdp: bool) -> dict:
    """The model's full state dict (a collective under FSDP; the tensors land on rank 0's CPU)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model, optimizer, model_state: dict, optimizer_state: Optional[dict], fsdp: bool) -> None:
    """Load full state dicts (as written by :func:`full_state_dicts`) on every rank."""
    if not fsdp:
        model.load_state_dict(model_state)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective when distributed)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    ctx.all_reduce_max(t)
    return bool(t.item())


def run_agreed(ctx: DistContext, fn, run_here: bool = True):
    """Run ``fn`` where ``run_here`` and make a failure on any rank fail them all,
    instead of leaving the others waiting forever in the next collective."""
    result, error = None, None
    if run_here:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if any_rank(ctx, error is not None):
        if error is not None:
            raise error
        raise RuntimeError("another rank failed (see rank 0's error message)")
    return result
