"""The H200 targets of the issues (3-6, 14, 20-23), checked against measured rows.

Each target names the row(s) it reads; where those rows were not measured (a CPU run,
a budget cut, an error) the status is "not measured", never a guess.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gptfast.bench.results import Row
from gptfast.bench.suites import causal_attention as attention_suite  # its GPU grid's shapes

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"


def _find(rows: Sequence[Row], **fields) -> List[Row]:
    return [r for r in rows if all(getattr(r, k) == v for k, v in fields.items())]


def _one(rows, **fields) -> Optional[Row]:
    found = _find(rows, **fields)
    return found[0] if found else None


def _ratio(rows, numerator: str, denominator: str, **fields) -> Optional[float]:
    a, b = _one(rows, provider=numerator, **fields), _one(rows, provider=denominator, **fields)
    return None if a is None or b is None else b.time_ms / a.time_ms


def _at_least(value: Optional[float], goal: float, fmt: str) -> Tuple[str, str]:
    if value is None:
        return "", NOT_MEASURED
    return fmt.format(value), MET if value >= goal else MISSED


def _at_most(value: Optional[float], goal: float, fmt: str) -> Tuple[str, str]:
    if value is None:
        return "", NOT_MEASURED
    return fmt.format(value), MET if value <= goal else MISSED


@dataclass
class Target:
    issue: int
    text: str
    check: Callable[[Sequence[Row], Dict], Tuple[str, str]]


def _ln_fraction(mode, hidden, goal):
    def check(rows, extra):
        r = _one(rows, op="layer_norm", provider="gptfast", mode=mode, shape=f"16384x{hidden}", dtype="bfloat16")
        return _at_least(None if r is None else r.fraction_of_peak, goal, "{:.0%} of copy bandwidth")
    return check


def _ln_speedup(rows, extra):
    ratio = _ratio(rows, "gptfast", "torch", op="layer_norm", mode="fwd+bwd", shape="16384x768", dtype="bfloat16")
    return _at_least(ratio, 1.5, "{:.2f}× F.layer_norm")


def _attn_fwd_16k(rows, extra):
    r = _one(rows, op="causal_attention", provider="gptfast", mode="fwd", shape="B=1,H=32,T=16384,D=64", dtype="bfloat16")
    return _at_least(None if r is None else r.tflops, 400, "{:.0f} TFLOP/s")


def _host_syncs(rows, extra):
    profile = extra.get("profile") or {}
    if profile.get("device_type") != "cuda":
        return "", NOT_MEASURED
    return _at_most(profile.get("host_syncs_per_token"), 0.1, "{:.3f} syncs/token")


def _train_mfu(rows, extra):
    r = _one(rows, op="train_step", provider="gptfast", shape="gpt2-124M B=8 T=1024")
    return _at_least(None if r is None else r.mfu, 0.5, "MFU {:.0%}")


TRAIN_SHAPE = "gpt2-124M B=8 T=1024"


def _train_compiled_mfu(rows, extra):
    r = _one(rows, op="train_step", provider="gptfast+compile", shape=TRAIN_SHAPE)
    return _at_least(None if r is None else r.mfu, 0.4, "MFU {:.0%}")


def _train_vs_compile(rows, extra):
    ratio = _ratio(rows, "gptfast+compile", "torch.compile", op="train_step", shape=TRAIN_SHAPE)
    return _at_least(ratio, 1.15, "{:.2f}× torch.compile")


def _train_memory(rows, extra):
    fused = _one(rows, op="train_step", provider="gptfast+compile", shape=TRAIN_SHAPE)
    plain = _one(rows, op="train_step", provider="torch", shape=TRAIN_SHAPE)
    if fused is None or plain is None or not fused.peak_mem_mb or not plain.peak_mem_mb:
        return "", NOT_MEASURED
    return _at_most(fused.peak_mem_mb / plain.peak_mem_mb, 0.6, "{:.2f}× the torch backend's peak memory")


# ---- issues 20-22, and the decode / attention checks that earlier issues share -----------------


def _eager_host_time(rows, extra):
    """Issue 20: every (op, mode) of the overhead suite, gptfast's host time over torch's."""
    ratios = []
    for r in _find(rows, op="overhead", provider="gptfast"):
        torch_row = _one(rows, op="overhead", provider="torch", mode=r.mode, shape=r.shape)
        if torch_row is not None:
            ratios.append((r.time_ms / torch_row.time_ms, f"{r.shape.split()[0]} {r.mode}"))
    if not ratios:
        return "", NOT_MEASURED
    worst, where = max(ratios)
    return f"worst {worst:.2f}× torch's ({where}; {len(ratios)} calls)", MET if worst <= 2.0 else MISSED


def _hf_vs_sdpa(mode):
    def check(rows, extra):
        found = [r for r in _find(rows, op="hf_gpt2", provider="gptfast", mode=mode)]
        ratio = None if not found else _ratio(rows, "gptfast", "sdpa", op="hf_gpt2", mode=mode, shape=found[0].shape)
        return _at_least(ratio, 1.0, "{:.2f}× SDPA")
    return check


def _train_fused_vs_torch(rows, extra):
    ratio = _ratio(rows, "gptfast", "torch", op="train_step", shape=TRAIN_SHAPE)
    return _at_least(ratio, 1.0, "{:.2f}× the torch backend")


def _decode_rate(batch, goal):
    def check(rows, extra):
        r = _one(rows, op="decode", provider="gptfast", shape=f"gpt2-124M B={batch} new=256", dtype="bfloat16")
        return _at_least(None if r is None else r.tokens_per_s, goal, "{:,.0f} tokens/s")
    return check


def _decode_vs_compile(goal):
    def check(rows, extra):
        ratio = _ratio(rows, "gptfast", "torch.compile", op="decode", shape="gpt2-124M B=1 new=256", dtype="bfloat16")
        return _at_least(ratio, goal, "{:.2f}× torch.compile(reduce-overhead)")
    return check


def _int8_vs_bf16(goal):
    def check(rows, extra):
        ratio = _ratio(rows, "gptfast-int8", "gptfast", op="decode", shape="gpt2-124M B=1 new=256", dtype="bfloat16")
        return _at_least(ratio, goal, "{:.2f}× bf16 decode")
    return check


LONG, SHORT = (2048, 4096, 8192, 16384), (512, 1024)  # the attention targets' sequence lengths
BOTH_HEAD_DIMS = (64, 128)


def _attn_vs_sdpa(mode, goal, lengths=LONG, head_dims=(64,)):
    """The worst of gptfast's speedups over SDPA's default at the given head sizes and lengths
    (the GPU grid's shapes: B = tokens / T, H = width / D)."""
    def check(rows, extra):
        ratios = []
        for d in head_dims:
            for t in lengths:
                shape = f"B={attention_suite.TOKENS // t},H={attention_suite.MODEL_WIDTH // d},T={t},D={d}"
                ratio = _ratio(rows, "gptfast", "torch", op="causal_attention", mode=mode, shape=shape,
                               dtype="bfloat16")
                if ratio is not None:
                    ratios.append((ratio, d, t))
        if not ratios:
            return "", NOT_MEASURED
        worst, d, t = min(ratios)
        text = f"min {worst:.2f}× SDPA (at D={d}, T={t}, over {len(ratios)} shapes)"
        return text, MET if worst >= goal else MISSED
    return check


def _decode_fraction(goal: float, grouped: bool = False):
    """Every gptfast decode row at cache 32k, multi-head or grouped-query, at ``goal`` of copy bandwidth."""
    def check(rows, extra):
        found = [r for r in _find(rows, op="decode_attention", provider="gptfast", dtype="bfloat16")
                 if ",L=32768," in r.shape and ("H_kv=" in r.shape) == grouped]
        if not found or any(r.fraction_of_peak is None for r in found):
            return "", NOT_MEASURED
        worst = min(found, key=lambda r: r.fraction_of_peak)
        text = ", ".join(f"{r.shape.split(',')[0]}: {r.fraction_of_peak:.0%}" for r in found)
        return text, MET if worst.fraction_of_peak >= goal else MISSED
    return check


TARGETS = [
    Target(3, "layernorm fwd ≥ 85% of copy bandwidth, hidden 4096", _ln_fraction("fwd", 4096, 0.85)),
    Target(3, "layernorm fwd ≥ 70% of copy bandwidth, hidden 768", _ln_fraction("fwd", 768, 0.70)),
    Target(3, "layernorm bwd ≥ 70% of copy bandwidth, hidden 4096", _ln_fraction("bwd", 4096, 0.70)),
    Target(3, "layernorm fwd+bwd ≥ 1.5× F.layer_norm, hidden 768", _ln_speedup),
    Target(4, "causal fwd D=64 T=16k ≥ 400 TFLOP/s", _attn_fwd_16k),
    Target(4, "causal fwd D=64 ≥ 1.3× SDPA default at every T ≥ 2k", _attn_vs_sdpa("fwd", 1.3)),
    Target(4, "causal bwd D=64 ≥ 1.2× SDPA default (T ≥ 2k)", _attn_vs_sdpa("bwd", 1.2)),
    Target(4, "decode ≥ 80% of copy bandwidth at cache 32k", _decode_fraction(0.80)),
    Target(5, "decode GPT-2 124M B=1, 256 tokens ≥ 8,000 tokens/s", _decode_rate(1, 8000)),
    Target(5, "decode ≥ 1.3× torch.compile(reduce-overhead), same run", _decode_vs_compile(1.3)),
    Target(5, "host syncs per generated token ≤ 0.1 (profiler, CUDA)", _host_syncs),
    Target(14, "int8 decode GPT-2 124M B=1 ≥ 1.6× bf16 decode, same run", _int8_vs_bf16(1.6)),
    Target(6, "training GPT-2 124M T=1024 fused MFU ≥ 50%", _train_mfu),
    Target(23, "training GPT-2 124M T=1024 fused + compile MFU ≥ 40%", _train_compiled_mfu),
    Target(23, "training step fused + compile ≥ 1.15× torch.compile, same run", _train_vs_compile),
    Target(23, "training step fused + compile peak memory ≤ 0.6× torch backend", _train_memory),
    Target(20, "each fused op's eager host time ≤ 2× its torch counterpart's (overhead suite)", _eager_host_time),
    Target(20, "HF GPT-2 124M with gptfast ≥ 1.0× SDPA, fwd+bwd 8×1024", _hf_vs_sdpa("fwd+bwd")),
    Target(20, "HF GPT-2 124M with gptfast ≥ 1.0× SDPA, generate 8×(128+128)", _hf_vs_sdpa("generate")),
    Target(20, "fused training step ≥ 1.0× the torch backend's, same run", _train_fused_vs_torch),
    Target(21, "decode GPT-2 124M B=1 ≥ 5,000 tokens/s", _decode_rate(1, 5000)),
    Target(21, "decode B=1 ≥ 2.5× torch.compile(reduce-overhead), same run", _decode_vs_compile(2.5)),
    Target(21, "decode GPT-2 124M B=8 ≥ 30,000 tokens/s", _decode_rate(8, 30000)),
    Target(21, "int8 decode B=1 ≥ 1.3× bf16 decode, same run", _int8_vs_bf16(1.3)),
    Target(22, "causal fwd ≥ 1.0× SDPA default, D64 and D128, T ≥ 2k",
           _attn_vs_sdpa("fwd", 1.0, LONG, BOTH_HEAD_DIMS)),
    Target(22, "causal fwd ≥ 0.9× SDPA default, D64 and D128, T 512-1k",
           _attn_vs_sdpa("fwd", 0.9, SHORT, BOTH_HEAD_DIMS)),
    Target(22, "causal bwd ≥ 0.9× SDPA default, D64 and D128, T ≥ 2k",
           _attn_vs_sdpa("bwd", 0.9, LONG, BOTH_HEAD_DIMS)),
    Target(22, "grouped-query decode ≥ 80% of copy bandwidth at cache 32k", _decode_fraction(0.80, grouped=True)),
    Target(22, "multi-head decode ≥ 85% of copy bandwidth at cache 32k", _decode_fraction(0.85)),
]


def evaluate(rows: Sequence[Row], extra: Optional[Dict] = None) -> List[Tuple[Target, str, str]]:
    extra = extra or {}
    return [(t, *t.check(rows, extra)) for t in TARGETS]


def markdown(rows: Sequence[Row], extra: Optional[Dict] = None) -> str:
    lines = ["| issue | target (H200) | measured | status |", "|---|---|---|---|"]
    for target, measured, status in evaluate(rows, extra):
        lines.append(f"| {target.issue} | {target.text} | {measured} | {status} |")
    return "\n".join(lines)
