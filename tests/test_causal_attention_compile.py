"""The attention kernels' static compile entries are well formed.

Compiling them for sm_90 (no spills, HGMMA in the forward / dK-dV / dQ main loops,
shared memory within an H200 block's limit) is done by gptfast.compile_report and
tested in tests/test_compile_report.py, which visits ``attention`` through
``gptfast.kernels._registry.KERNEL_MODULES``.
"""
import pytest

attention_kernels = pytest.importorskip("gptfast.kernels.causal_attention")


def test_static_configs_cover_the_shipped_fast_paths():
    entries = attention_kernels.static_configs()
    names = {e["name"] for e in entries}
    for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        for head_dim in (64, 128, 256):
            assert f"{kernel}_d{head_dim}_bf16" in names
    for e in entries:
        assert set(e) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "require_hgmma"}
        # The signature types every argument, in order; constexprs are marked as such.
        assert list(e["signature"]) == list(e["fn"].arg_names), e["name"]
        for arg in e["constexprs"]:
            assert e["signature"][arg] == "constexpr", (e["name"], arg)
        assert set(e["divisible_by_16"]) <= {a for a, ty in e["signature"].items() if ty == "i32"}
        # Tensor cores are required of every main-loop kernel but dK/dV at D=256 (see
        # NO_TENSOR_CORES); the delta preprocess is a reduction, the dQ conversion elementwise.
        exempt = e["name"].startswith(("attention_bwd_delta", "attention_bwd_dkdv_d256", "attention_bwd_dq_convert"))
        assert e["require_hgmma"] == (not exempt)
    assert attention_kernels.NO_TENSOR_CORES == {("dkdv", 256)}


def test_static_configs_match_the_launch_tables():
    """What the report compiles is what the launchers pick for bf16 on CUDA."""
    import torch

    cuda = torch.device("cuda")
    for e in attention_kernels.static_configs():
        head_dim = e["constexprs"]["HEAD_DIM"]
        picker = {"attention_fwd": attention_kernels.forward_config,
                  "attention_bwd_dkdv": attention_kernels.dkdv_config,
                  "attention_bwd_dq": attention_kernels.dq_config}.get(e["name"].rsplit("_d", 1)[0])
        if picker is None:
            continue
        variant = e["name"].split("_bf16_", 1)[1].removesuffix("_positions") if "_bf16_" in e["name"] else None
        kernel = {"attention_fwd": "fwd", "attention_bwd_dkdv": "dkdv", "attention_bwd_dq": "dq"}[
            e["name"].rsplit("_d", 1)[0]]
        own = attention_kernels.VARIANT_TILES.get((kernel, head_dim, variant))
        if own is not None:  # a variant whose shipped tile spills compiles on its own tile
            assert (own.block_m, own.block_n, own.num_warps, own.num_stages) == (
                e["constexprs"]["BLOCK_M"], e["constexprs"]["BLOCK_N"], e["num_warps"], e["num_stages"]), e["name"]
            continue
        grouped = "_gqa" in e["name"]  # grouped-query launches of dK/dV have their own table
        cfg = picker(head_dim, torch.bfloat16, cuda, grouped=True) if grouped and "dkdv" in e["name"] else picker(
            head_dim, torch.bfloat16, cuda)
        assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (
            e["constexprs"]["BLOCK_M"], e["constexprs"]["BLOCK_N"], e["num_warps"], e["num_stages"]), e["name"]
