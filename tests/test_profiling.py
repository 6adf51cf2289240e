"""The device-independent counters against hand-counted closed forms."""
import torch

import fastddpm.ops as ops
from fastddpm.profiling import count_flops, count_ops, saved_bytes


def test_saved_bytes_of_linear_and_dedup():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    # Linear saves its input (4x16 fp32) and the weight (a parameter: excluded)
    assert saved_bytes(lambda: lin(x), exclude=lin.parameters()) == 4 * 16 * 4
    # the same input saved by two ops counts once; tanh saves its output (4x8) as a new storage
    assert saved_bytes(lambda: torch.tanh(lin(x)) + lin(x), exclude=lin.parameters()) == 4 * 16 * 4 + 4 * 8 * 4


def test_group_norm_op_saves_only_input_and_stats():
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    got = saved_bytes(lambda: ops.group_norm_silu(x, w, b, groups=4), exclude=[w, b])
    assert got == x.numel() * 4 + 2 * (2 * 4) * 4  # x, mean [2,4] and rstd [2,4], fp32


def test_count_ops_counts_custom_op_once():
    x = torch.randn(2, 8, 4, 4)
    w, b = torch.ones(8), torch.zeros(8)
    counts = count_ops(lambda: ops.group_norm_silu(x, w, b, groups=4))
    assert counts["fastddpm.group_norm_silu"] == 1
    assert sum(counts.values()) == 1  # nothing else is dispatched: no views, no casts


def test_count_flops_matmul_and_attention():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = torch.randn(1, 2, 10, 8)
    assert count_flops(lambda: ops.attention(q, q, q)) == 4 * 2 * 10 * 10 * 8


def test_count_flops_cpu_sdpa_equals_fused_attention():
    q = torch.randn(1, 2, 10, 8)
    sdpa = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert sdpa == count_flops(lambda: ops.attention(q, q, q)) == 4 * 2 * 10 * 10 * 8
