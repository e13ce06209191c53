"""gptfast inside Hugging Face transformers models (gptfast.integrations.hf).

Tiny random GPT-2 and Llama (grouped-query: 4 query heads, 2 kv heads) models built with
transformers' own classes (nothing is downloaded); on the CPU the kernels run under the
Triton interpreter. ``attn_implementation="gptfast"`` must equal ``"eager"`` by the
error-ratio rule (logits and every parameter gradient, fp32 and fp16, against eager in
float64), generate the same tokens on a left-padded batch with DynamicCache and
StaticCache, compile whole after ``apply_gptfast``, and fall back to SDPA (one warning)
for what the kernels cannot express.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("gptfast.integrations.hf")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from gptfast import nn as gnn  # noqa: E402
from gptfast.ops import _dispatch  # noqa: E402
from gptfast.testing import assert_error_ratio  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.skipif(not _dispatch.use_triton(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")),
                       reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 61


def _gpt2(**overrides):
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(DEVICE)


def _llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DEVICE)


MODELS = {"gpt2": _gpt2, "llama-gqa": _llama}


def _with(model, attn: str, dtype=None):
    """A copy of ``model`` (in ``dtype``) using attention implementation ``attn``."""
    copy_ = copy.deepcopy(model)
    if dtype is not None:
        copy_ = copy_.to(dtype)
    copy_.set_attn_implementation(attn)
    return copy_


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.float().square().mean().backward()
    return [logits.detach()] + [p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None]


def _no_fallback():
    """A context that turns gptfast's fallback warning into an error."""
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.filterwarnings("error", message="gptfast attention")
    return catcher


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_gradients_equal_eager(name, dtype, tmp_path):
    base = MODELS[name]()
    base.save_pretrained(tmp_path)
    loaded = type(base).from_pretrained(tmp_path, attn_implementation="gptfast").to(DEVICE, dtype)
    assert loaded.config._attn_implementation == "gptfast"
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    catcher = _no_fallback()
    try:
        fused = _logits_and_grads(loaded, ids)
    finally:
        catcher.__exit__(None, None, None)
    plain = _logits_and_grads(_with(base, "eager", dtype), ids)
    exact = _logits_and_grads(_with(base, "eager", torch.float64), ids)
    assert len(fused) == len(plain) == len(exact) == 1 + len(list(base.parameters()))
    for i, (f, p, e) in enumerate(zip(fused, plain, exact)):
        assert_error_ratio(f, p, e, max_ratio=4.0, what=f"{name} {dtype} tensor {i}")


def _left_padded_prompts():
    """3 prompts of lengths 7, 3 and 5, left-padded to 7 (pad id 1)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, VOCAB, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    for row, length in enumerate((7, 3, 5)):
        ids[row, :7 - length], mask[row, :7 - length] = 1, 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padded_generate_equals_eager(name, cache, monkeypatch):
    base = MODELS[name]().eval()
    ids, mask = _left_padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    if cache == "static":
        # On CUDA, transformers compiles the decode step of a static cache by itself; this test
        # is about the eager kernels, so keep the steps eager on every machine.
        kwargs.update(cache_implementation="static", disable_compile=True)
    calls = {"causal": 0, "decode": 0}
    for op in calls:
        real = getattr(hf.ops, f"{op}_attention")
        monkeypatch.setattr(hf.ops, f"{op}_attention",
                            lambda *a, _real=real, _op=op, **kw: calls.__setitem__(_op, calls[_op] + 1) or _real(*a, **kw))
    catcher = _no_fallback()
    try:
        got = _with(base, "gptfast").generate(ids, **kwargs)
    finally:
        catcher.__exit__(None, None, None)
    want = _with(base, "eager").generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert calls["causal"] and calls["decode"], calls  # prefill on the causal kernel, steps on decode


def test_apply_compile_train_step_and_unapply():
    base = _gpt2()
    model = copy.deepcopy(base)
    originals = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    keys, attn = list(model.state_dict()), model.config._attn_implementation
    assert hf.apply_gptfast(model) is model
    assert model.config._attn_implementation == "gptfast"
    swapped = [m for m in model.modules() if isinstance(m, gnn.LayerNorm)]
    assert len(swapped) == len(originals) == 5 and not any(type(m) is torch.nn.LayerNorm for m in model.modules())
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def loss_fn(m, ids):
        logits = m(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # a graph break raises
    loss = compiled(model, ids)
    loss.backward()  # through the compiled graph's AOTAutograd backward (gptfast's backward op)
    eager = _with(base, "eager")
    want = loss_fn(eager, ids)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(sorted(model.named_parameters()), sorted(eager.named_parameters())):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)

    assert hf.unapply_gptfast(model) is model
    assert model.config._attn_implementation == attn
    for name, m in model.named_modules():
        if name in originals:
            assert m is originals[name]
    assert not any(isinstance(m, gnn.LayerNorm) for m in model.modules())
    with pytest.raises(ValueError, match="not patched"):
        hf.unapply_gptfast(model)


def _fallback_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "gptfast attention" in str(w.message)]


def _four_d_mask():
    """A bidirectional-prefix mask the kernels cannot express: (B, 1, T, T), additive (as
    eager and SDPA both read a float mask)."""
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    mask[:4, :4] = True
    additive = torch.zeros(11, 11).masked_fill(~mask, torch.finfo(torch.float32).min)
    return additive.expand(2, 1, 11, 11).to(DEVICE)


@pytest.mark.parametrize("case", ["4d-mask", "right-padding"])
def test_fallbacks_warn_once_and_equal_eager(case):
    base = _gpt2()
    ids = torch.randint(2, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    if case == "4d-mask":
        mask = _four_d_mask()
    else:
        mask = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
        mask[1, 8:] = 0
    model, eager = _with(base, "gptfast"), _with(base, "eager")
    with torch.no_grad():
        first, warned = _fallback_warnings(lambda: model(ids, attention_mask=mask).logits)
        second, warned_again = _fallback_warnings(lambda: model(ids, attention_mask=mask).logits)
        want = eager(ids, attention_mask=mask).logits
    assert len(warned) == 1 and not warned_again, [str(w.message) for w in warned + warned_again]
    rows = slice(None) if case == "4d-mask" else (slice(None), slice(0, 8))  # right pads' own logits are arbitrary
    torch.testing.assert_close(first[rows], want[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)


def test_dropout_in_training_falls_back_to_sdpa():
    base = _gpt2(attn_pdrop=0.5)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    model, sdpa = _with(base, "gptfast").train(), _with(base, "sdpa").train()
    torch.manual_seed(7)
    got, warned = _fallback_warnings(lambda: model(ids).logits)
    torch.manual_seed(7)
    want = sdpa(ids).logits
    assert len(warned) == 1 and "dropout" in str(warned[0].message)
    torch.testing.assert_close(got, want)


def test_mask_function_returns_none_for_plain_causal():
    ones = torch.ones(2, 5, dtype=torch.bool)
    assert hf.gptfast_mask(2, 5, 5, attention_mask=ones) is None
    assert hf.gptfast_mask(2, 5, 5) is None
    padded = ones.clone()
    padded[0, :2] = False
    assert torch.equal(hf.gptfast_mask(2, 5, 5, attention_mask=padded), padded)
    assert torch.equal(hf.gptfast_mask(2, 1, 8, q_offset=4, attention_mask=ones), ones)  # StaticCache: 5 of 8 valid
    assert torch.equal(hf.gptfast_mask(2, 1, 8, q_offset=4), ones)  # the same without a 2-D mask


def test_static_cache_without_attention_mask_equals_eager():
    """A StaticCache forward without an attention mask: the unwritten cache is not attended to."""
    from transformers import StaticCache

    base = _gpt2().eval()
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    outs = []
    for attn in ("gptfast", "eager"):
        model = _with(base, attn)
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            first = model(ids, past_key_values=cache, use_cache=True).logits
            step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        outs.append((first, step))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(sliding_window=4), dict(output_attentions=True), dict(is_causal=False)],
                         ids=["sliding-window", "output-attentions", "non-causal"])
def test_attention_function_falls_back_for_what_the_kernels_cannot_express(kwargs):
    """Called as transformers calls it: such calls run transformers' SDPA attention (its
    result, exactly), with one warning per model config."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.config, module.is_causal = GPT2Config(), True
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=gen).to(DEVICE) for _ in range(3))
    (got, _), warned = _fallback_warnings(lambda: hf.gptfast_attention_forward(module, q, k, v, None, **kwargs))
    _, warned_again = _fallback_warnings(lambda: hf.gptfast_attention_forward(module, q, k, v, None, **kwargs))
    want, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)
    assert len(warned) == 1 and not warned_again
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _masks():
    """Every mask kind the kernels refuse, for (2, 6) ids: the model-level input."""
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    prefix = causal.clone()
    prefix[:3, :3] = True
    return {
        "4d-bool": prefix.expand(2, 1, 6, 6),
        "4d-float": torch.zeros(6, 6).masked_fill(~prefix, torch.finfo(torch.float32).min).expand(2, 1, 6, 6),
        "2d-float-left": torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0], [1.0] * 6]),
        "2d-right-padding": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]),
        "2d-holes": torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1]]),
    }


@pytest.mark.parametrize("kind", sorted(_masks()))
def test_fallback_equals_sdpa_on_every_refused_mask(kind):
    """What the fallback runs is transformers' SDPA attention: the same logits as
    ``attn_implementation="sdpa"`` (fp32, every row), prefill and one cached step after."""
    base = _gpt2().eval()
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    mask = _masks()[kind].to(DEVICE)
    outs = {}
    for attn in ("gptfast", "sdpa"):
        model = _with(base, attn)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(ids[:, :6], attention_mask=mask, use_cache=True)
            steps = [out.logits]
            if mask.dim() == 2:  # one decode step over the cache, the mask grown by one seen token
                grown = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                steps.append(model(ids[:, 6:], attention_mask=grown, past_key_values=out.past_key_values).logits)
        outs[attn] = steps
    for got, want in zip(outs["gptfast"], outs["sdpa"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float_padding_mask_means_what_its_boolean_means():
    """A 2-D float mask handed to the attention function (the kernels refuse it) is read as
    transformers reads one: nonzero = seen."""
    module = torch.nn.Module()
    module.config, module.is_causal = GPT2Config(), True
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=gen).to(DEVICE) for _ in range(3))
    boolean = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6], dtype=torch.bool, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = hf.gptfast_attention_forward(module, q, k, v, boolean.float())
        want, _ = hf.gptfast_attention_forward(module, q, k, v, boolean)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("length", [3, 5, 9])
def test_mask_that_fits_no_sequence_is_an_error(length):
    """A 2-D mask without one column per token seen: a ValueError naming the mask and its
    shape, through the model (with and without a cache) and the attention function."""
    model = _with(_gpt2().eval(), "gptfast")
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    mask = torch.ones(2, length, dtype=torch.long, device=DEVICE)
    mask[0, 0] = 0
    for call in (lambda: model(ids, attention_mask=mask), lambda: model(ids, attention_mask=mask, use_cache=False)):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"attention_mask of shape \(2, {length}\) fits no"):
            call()
    module = torch.nn.Module()
    module.config, module.is_causal = GPT2Config(), True
    q = torch.randn(2, 2, 6, 16, device=DEVICE)
    if length < 6:  # longer is a StaticCache's valid length when the cache is long enough
        with pytest.raises(ValueError, match=rf"attention_mask of shape \(2, {length}\) fits no"):
            hf.gptfast_attention_forward(module, q, q, q, mask.bool())


@pytest.mark.parametrize("what", ["linear", "gptfast-gpt", "none"])
def test_apply_gptfast_says_what_it_accepts(what):
    from gptfast.config import GPTConfig
    from gptfast.model import GPT

    model = {"linear": lambda: torch.nn.Linear(2, 2), "none": lambda: None,
             "gptfast-gpt": lambda: GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))}[what]()
    with pytest.raises(TypeError, match=r"apply_gptfast: model must be a transformers PreTrainedModel.*got "
                                        + {"linear": "Linear", "none": "NoneType", "gptfast-gpt": "a gptfast GPT"}[what]):
        hf.apply_gptfast(model)
