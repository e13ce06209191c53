"""The training step on the fused path: the loss as ``linear_cross_entropy`` (no logits
held, ``return_logits=False``), its agreement with the torch backend's logits-then-loss
step by the error-ratio rule, and ``gptfast train --compile`` (whole model, fullgraph)
giving the eager run's losses with the compile warm-up shown. CPU, tiny models; the fused
backend under TRITON_INTERPRET=1 (tests/conftest.py), in float32."""
import copy
import warnings

import pytest
import torch

from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.ops._dispatch import use_triton
from gptfast.testing import assert_error_ratio
from gptfast.training import train
from gptfast.training.config import TrainConfig

CONFIG = GPTConfig(vocab_size=77, block_size=24, n_layer=2, n_head=2, n_embd=32)
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0)), reason="needs CUDA or TRITON_INTERPRET=1")


def _batch(B=2, T=21, ignored=True):
    """Token ids and targets, T not a multiple of any block, some targets ignored."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, CONFIG.vocab_size, (B, T), generator=g)
    if ignored:
        targets[0, :5] = -100
        targets[1, -1] = -100
    return idx, targets


def _step(model, idx, targets, **kwargs):
    """Loss and parameter gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, **kwargs)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_return_logits_false_gives_the_same_loss_and_no_logits():
    torch.manual_seed(0)
    model = GPT(CONFIG, backend="torch").train()
    idx, targets = _batch()
    _, loss_logits, grads_logits = _step(model, idx, targets)
    logits, loss, grads = _step(model, idx, targets, return_logits=False)
    assert logits is None
    torch.testing.assert_close(loss, loss_logits, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_logits[name], rtol=1e-5, atol=1e-7, msg=name)


def test_return_logits_false_needs_targets_and_keeps_the_all_ignored_warning():
    model = GPT(CONFIG, backend="torch")
    idx, _ = _batch()
    with pytest.raises(ValueError, match="return_logits=False .* needs targets"):
        model(idx, return_logits=False)
    with pytest.warns(RuntimeWarning, match="every target is -100"):
        _, loss = model(idx, torch.full_like(idx, -100), return_logits=False)
    assert loss.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(idx, _batch()[1], return_logits=False)


@needs_triton
def test_fused_training_step_equals_the_torch_backend_by_the_error_ratio_rule():
    """The fused step (fused layernorm / attention / GELU, loss through linear_cross_entropy)
    against the torch backend's usual step (logits, then F.cross_entropy), both judged
    against the float64 reference."""
    torch.manual_seed(0)
    fused = GPT(CONFIG, backend="fused").train()
    plain = copy.deepcopy(fused).set_backend("torch")
    exact = copy.deepcopy(fused).set_backend("reference").double()
    idx, targets = _batch()
    logits, loss_f, grads_f = _step(fused, idx, targets, return_logits=False)
    assert logits is None
    _, loss_t, grads_t = _step(plain, idx, targets)
    _, loss_x, grads_x = _step(exact, idx, targets)
    assert_error_ratio(loss_f, loss_t, loss_x, what="loss")
    for name, g in grads_f.items():
        assert_error_ratio(g, grads_t[name], grads_x[name], max_ratio=5.0, what=f"grad {name}")


# ---- gptfast train --compile -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "t.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 40)
    return str(path)


def _config(tmp_path, data_file, **overrides):
    base = dict(model="tiny", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, max_steps=3, lr=3e-3,
                warmup_steps=1, eval_interval=0, eval_batches=1, ckpt_interval=0, log_interval=1, data=data_file,
                cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), progress=False, sample_prompts=[],
                device="cpu", seed=0, export=False)
    return TrainConfig.from_dict({**base, **overrides})


def _losses(cfg):
    losses = {}
    train(cfg, callback=lambda info: losses.__setitem__(info.step, info.loss))
    return losses


@pytest.mark.parametrize("backend", ["torch", pytest.param("fused", marks=needs_triton)])
def test_compiled_training_gives_the_eager_losses_and_shows_the_compile(backend, tmp_path, data_file, capsys):
    torch._dynamo.reset()
    eager = _losses(_config(tmp_path / "eager", data_file, backend=backend))
    capsys.readouterr()
    compiled = _losses(_config(tmp_path / "compiled", data_file, backend=backend, compile=True,
                               compile_backend="aot_eager"))
    out = capsys.readouterr().out
    assert "compiling the training step" in out
    assert "compiled: the first step took" in out
    assert compiled.keys() == eager.keys() == {1, 2, 3}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6), step


def test_compile_backend_is_validated():
    with pytest.raises(ValueError, match="compile_backend must be one of .* got 'nope'"):
        TrainConfig.from_dict(dict(compile_backend="nope")).validate()


# ---- the bench's training rows -------------------------------------------------------------------


def test_e2e_train_rows_are_the_four_providers_and_the_cpu_ones_run():
    """GPU grid: fused and torch backends, eager and compiled, in one run. CPU: the torch
    rows (a compiled step with aot_eager) run; the fused ones are listed as GPU-only."""
    from gptfast.bench.suites import e2e

    gpu_cases, _ = e2e.cases(torch.device("cuda"), quick=True)
    train_rows = {c.provider for c in gpu_cases if c.op == "train_step"}
    assert train_rows == {"torch", "torch.compile", "gptfast", "gptfast+compile"}
    cpu_cases, skipped = e2e.cases(torch.device("cpu"), quick=True)
    assert {c.provider for c in cpu_cases if c.op == "train_step"} == {"torch", "torch.compile"}
    assert {s.provider for s in skipped if s.op == "train_step"} >= {"gptfast", "gptfast+compile"}
    torch._dynamo.reset()
    steps = {}
    for provider in ("torch", "torch.compile"):
        run_step, sets = e2e._build_train(provider, 2, 16, torch.device("cpu"))
        steps[provider] = [run_step(sets[0]).item() for _ in range(2)]
    assert steps["torch"][1] < steps["torch"][0]  # AdamW stepped between the two calls
    assert steps["torch.compile"] == pytest.approx(steps["torch"], rel=1e-5)
