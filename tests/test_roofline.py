"""benchmarks/roofline.py: the lower bound is max(bytes / bandwidth, FLOPs / peak), checked by hand."""
import pytest

from benchmarks import roofline


def test_bound_is_the_larger_of_memory_and_compute_time():
    row = {"bytes": 3.35e9, "flops": 989e12 * 2e-3, "rate": "bf16"}  # H100: 1 ms of bytes, 2 ms of math
    assert roofline.bound_s(row, "H100") == pytest.approx(2e-3)
    row["flops"] = 0.0
    assert roofline.bound_s(row, "H100") == pytest.approx(1e-3)
    assert roofline.bound_s(row, "H200") == pytest.approx(3.35e9 / 4.8e12)
    assert roofline.fraction_of_bound(2e-3, row, "H100") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gpu"):
        roofline.bound_s(row, "V100")
    with pytest.raises(ValueError, match="measured_s"):
        roofline.fraction_of_bound(0.0, row, "H100")


def test_rows_cover_every_kernel_with_model_bytes():
    from fastddpm.kernels.attention import modelled_hbm_bytes

    rows = roofline.rows()
    kernels = {r["kernel"] for r in rows}
    assert {"attention forward", "attention backward", "group_norm_silu forward",
            "group_norm_silu backward"} <= kernels
    fwd = next(r for r in rows if r["kernel"] == "attention forward" and r["shape"].startswith("256x1x256x256"))
    assert fwd["bytes"] == modelled_hbm_bytes(256, 1, 256, 256, 2)["fwd_fused"]
    assert fwd["flops"] == 4 * 256 * 256 * 256 * 256  # QK^T and PV, 2 FLOPs per multiply-add
    for r in rows:
        assert r["bound_us_H200"] <= r["bound_us_H100"] <= r["bound_us_A100"], r
