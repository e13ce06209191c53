"""The CPU decode kernels of csrc/cpu_linear.cpp: how fast they stream a model's weights.

A decode step multiplies a few rows by every weight matrix once, so what matters is the
rate at which the weights come from memory, not from a cache. This streams the linear
layers of ``--layers`` GPT-2 124M blocks (768 -> 2304, 768 -> 768, 768 -> 3072,
3072 -> 768: 28.3 MB of fp32 a block; the default 30 blocks, 850 MB, is well past this
machine's 480 MiB L3) one after the other, as a decode step does, with ``--rows`` rows
(the batch), and reports the weights' bytes over the time of one pass (best of
``--runs`` passes after a warm-up) for:

- ``gptfast fp32``: ``torch.ops.gptfast_cpu.fp32_linear_packed`` on ``fp32_pack`` weights;
- ``oneDNN fp32``: ``torch.ops.mkldnn._linear_pointwise`` on weights reordered by
  ``_reorder_linear_weight`` (what ``torch.compile``'s CPU freezing does), when this
  PyTorch build has it;
- ``F.linear fp32``: MKL on the row-major weights (what Hugging Face runs);
- ``gptfast int8``: ``int8_linear_packed`` on ``int8_pack`` weights (a quarter of the bytes);

beside a plain read of 1 GiB (``torch.sum``) in the same run: the machine's read rate.

    PYTHONPATH=$PWD python benchmarks/bench_cpu_linear.py [--rows 1,8] [--layers 30] [--runs 3]
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from gptfast.generation.cpu_linear import fp32_ops, int8_ops

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))  # (out, in) of one GPT-2 124M block


def best_pass(step, count: int, runs: int) -> float:
    """Seconds of the fastest of ``runs`` passes of ``step(0) .. step(count - 1)``, after one warm-up pass."""
    best = float("inf")
    for run in range(runs + 1):
        start = time.perf_counter()
        for i in range(count):
            step(i)
        if run:
            best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=lambda v: [int(r) for r in v.split(",")], default=[1, 8])
    parser.add_argument("--layers", type=int, default=30, help="GPT-2 124M blocks whose linear layers are streamed")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if fp32_ops() is None or int8_ops() is None:
        raise SystemExit("bench_cpu_linear: the gptfast C++ extension is not loaded (pip install --no-build-isolation -e .)")
    (fp32_pack, fp32_matmul), (int8_pack, int8_matmul) = fp32_ops(), int8_ops()
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers
    weights = [torch.randn(n, k, generator=gen) for n, k in shapes]
    biases = [torch.randn(n, generator=gen) for n, _ in shapes]
    int8 = [torch.randint(-127, 128, w.shape, dtype=torch.int8, generator=gen) for w in weights]
    scales = [torch.rand(w.shape[0], generator=gen) for w in weights]
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    fp32_packed, int8_packed = [fp32_pack(w) for w in weights], [int8_pack(q) for q in int8]
    # name -> (one layer's product, given layer index and input, weight bytes of a pass)
    impls = {"gptfast fp32": (lambda i, x: fp32_matmul(x, fp32_packed[i], shapes[i][0], biases[i]), fp32_bytes)}
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available():
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
        impls["oneDNN fp32"] = (lambda i, x: torch.ops.mkldnn._linear_pointwise(x, onednn[i], biases[i], "none", [], ""),
                                fp32_bytes)
    impls["F.linear fp32"] = (lambda i, x: F.linear(x, weights[i], biases[i]), fp32_bytes)
    impls["gptfast int8"] = (lambda i, x: int8_matmul(x, int8_packed[i], scales[i], biases[i]), fp32_bytes // 4)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"{args.layers} GPT-2 124M blocks, {fp32_bytes / 1e6:.0f} MB fp32 | load avg {os.getloadavg()[0]:.2f}")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=gen) for k in (768, 3072)}
        for name, (product, total) in impls.items():
            seconds = best_pass(lambda i: product(i, xs[shapes[i][1]]), len(shapes), args.runs)
            print(f"rows {rows:3d} | {name:14s} | {total / seconds / 1e9:5.1f} GB/s of weights | "
                  f"{seconds * 1e3:6.1f} ms a pass")
    big = torch.randn(256 * 1024 * 1024, generator=gen)  # 1 GiB
    big.sum()
    start = time.perf_counter()
    big.sum()
    print(f"read of 1 GiB (torch.sum): {big.numel() * 4 / (time.perf_counter() - start) / 1e9:.1f} GB/s | "
          f"load avg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
