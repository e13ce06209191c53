"""Time the decode_attention split kernel's variants on a GPU (not part of the suite).

    python benchmarks/decode_attention_variants.py [--quick] [--json FILE]

For each shape (multi-head and grouped-query B8 D128 at a 32k cache, GPT-2's B1 H12 D64
at 1k and 32k): the heuristic launch, forced split counts (1 = the one-pass path), and
every tuning candidate of the head size (``CANDIDATES``), against SDPA, each checked
against SDPA first. Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``)
on inputs larger than the L2 cache; GB/s counts K and V once (plus q and out).
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # (batch, heads, kv_heads, cache_len, head_dim)
    (8, 32, 32, 32768, 128),
    (8, 32, 8, 32768, 128),
    (1, 12, 12, 1024, 64),
    (1, 12, 12, 32768, 64),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="built-in config and heuristic splits only")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    import triton.testing

    import gptfast  # noqa: F401  (mounts kernels/ as gptfast.kernels)
    from gptfast.kernels import decode_attention as kd

    rows = []
    for b, h, hkv, s, d in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        lens = torch.full((b,), s, device="cuda", dtype=torch.int32)
        scale = d ** -0.5
        nbytes = (2 * b * hkv * s * d + 2 * b * h * d) * 2
        want = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=hkv != h).squeeze(2)
        default_splits = kd.split_plan(s, kd.choose_num_splits(b * hkv, s, kd.sm_count(q.device)), 64)[1]
        variants = [("sdpa", lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=hkv != h)),
                    (f"heuristic (splits={default_splits})",
                     lambda: kd.decode_attention(q, k, v, lens, scale))]
        if not args.quick:
            for n in sorted({1, max(1, default_splits // 2), 2 * default_splits}):
                variants.append((f"splits={n}", lambda n=n: kd.decode_attention(q, k, v, lens, scale, num_splits=n)))
            for cfg in kd.CANDIDATES["split"][kd.config_key(d, q.dtype)][1:]:
                variants.append((f"config {cfg.tag()}",
                                 lambda cfg=cfg: kd.decode_attention(q, k, v, lens, scale, config=cfg)))
        for name, fn in variants:
            out = fn()
            out = out.squeeze(2) if out.dim() == 4 else out
            err = (out.float() - want.float()).abs().max().item()
            us = 1000 * triton.testing.do_bench_cudagraph(fn, rep=30)
            gbps = nbytes / us / 1e3
            row = {"shape": f"B{b} H{h}/{hkv} S{s} D{d}", "variant": name, "us": round(us, 2),
                   "GB/s": round(gbps), "max_err_vs_sdpa": err}
            rows.append(row)
            print(f"{row['shape']:<24} {name:<28} {us:10.2f} us {gbps:8.0f} GB/s  err {err:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
