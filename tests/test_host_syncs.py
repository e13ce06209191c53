"""Host synchronisations of one generate() call: at most 0.1 per generated token.

On the CPU a counter stands in for the device: a TorchFunctionMode counts every call that
reads a tensor back to the host (.cpu, .item, .tolist, bool/int/float of a tensor ...),
outside the model's own forward, and every host-to-device transfer goes through
``gptfast.generation.sampling_params.to_device`` (one non-blocking copy each), whose calls are counted. On
CUDA, torch's sync debug mode counts the real synchronisations of the whole call.
"""
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gptfast.runtime import extension
from gptfast.generation import generate as generation, sampling_params as sampling
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.generation.sampling_params import SamplingParams

TOKENS = 256
READBACKS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class CountReadbacks(TorchFunctionMode):
    """Counts readbacks of "device" tensors. What a readback returns, and what is computed
    from host tensors only, is host data: reading it again costs nothing."""

    def __init__(self):
        super().__init__()
        self.calls, self.paused, self._host = [], False, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = bool(inputs) and all(id(t) in self._host for t in inputs)
        if name in READBACKS and not on_host and not self.paused:
            self.calls.append(name)
        if name in READBACKS or on_host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._host[id(t)] = t  # held, so that its id is not reused
        return out


def tiny_model(device="cpu"):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=61, block_size=TOKENS + 8, n_layer=1, n_head=2, n_embd=32)
    return GPT(config, backend="torch").to(device).eval()


def params(batch=2):
    return [SamplingParams(max_new_tokens=TOKENS, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1,
                           presence_penalty=0.2, logit_bias={3: 1.0}, stop_token_ids=[60], min_new_tokens=TOKENS,
                           seed=i, ignore_eos=True) for i in range(batch)]


def test_generate_reads_the_device_only_at_its_syncs(monkeypatch):
    if extension.load_extension() is None:  # the twin's Python loop reads CPU state per step by design
        pytest.skip(f"C++ sampling extension unavailable: {extension.extension_status()}")
    model = tiny_model()
    counter = CountReadbacks()
    forward = model.forward

    def uncounted_forward(*args, **kwargs):  # the model's own checks belong to the model
        counter.paused = True
        try:
            return forward(*args, **kwargs)
        finally:
            counter.paused = False

    monkeypatch.setattr(model, "forward", uncounted_forward)
    copies = []
    real_to_device = sampling.to_device

    def counted_to_device(tensors, device):
        copies.append(len(tensors))
        return real_to_device(tensors, device)

    monkeypatch.setattr(sampling, "to_device", counted_to_device)
    monkeypatch.setattr(generation, "to_device", counted_to_device)
    with counter:
        results = generation.generate(model, [[1, 2, 3], [4]], params(), engine="cpp", sync_every=16)
    assert [len(r.token_ids) for r in results] == [TOKENS, TOKENS]
    syncs = 1 + TOKENS // 16  # the first token, then tokens 16, 32, ..., 256
    assert counter.calls == ["cpu"] * syncs, counter.calls  # one packed read per sync, nothing else
    assert len(counter.calls) / TOKENS <= 0.1
    assert len(copies) == 3  # sampling tensors, decode state, prefill inputs: one copy each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations")
def test_cuda_generate_syncs_at_most_every_tenth_token():
    model = tiny_model("cuda")
    generation.generate(model, [[1, 2, 3], [4]], params(), sync_every=16)  # warm-up: capture, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generation.generate(model, [[1, 2, 3], [4]], params(), sync_every=16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) / TOKENS <= 0.1, syncs
