"""The sampler-step kernels and op with two and three history tensors (DPM-Solver++ 3M, UniPC).

mean = P x0c + Q x + R m + P2 x0_prev + P3 x0_prev2 + P4 x0_prev3 (columns 5, 9, 10 of an [S, 11]
table); the in-place kernel also shifts the history, x0_prev3 <- x0_prev2 <- x0_prev <- x0c, in the
same launch. Checked against the contract in float64 (interpreter on CPU), the functional kernel
against the in-place one bit for bit, and the Triton op against the reference op.
"""
import math

import pytest
import torch

from fastddpm.ops.philox import philox_normal
from references import sampler_step_float64

pytest.importorskip("triton")
import fastddpm.kernels.sampler_step as ks  # noqa: E402
from fastddpm.kernels.sampler_step import sampler_step_forward, sampler_step_inplace  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (3, 2, 5, 7)  # 70 elements per image: masked tail; with BLOCK 16, 15 programs in place
MODEL_T = torch.tensor([999, 500, 10, 1, 0], dtype=torch.int64)


def _rows(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, ks.NUM_COEFS, generator=g, dtype=torch.float64) * 2 - 1
    r[:, 6] = r[:, 6].abs()
    return r.float().to(DEVICE)


def _inputs(k, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype).to(DEVICE)
    m = torch.randn(SHAPE, generator=g).to(dtype).to(DEVICE)
    hist = [(torch.rand(SHAPE, generator=g) * 2 - 1).to(dtype).to(DEVICE) for _ in range(k)]
    return x, m, hist


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("philox", [False, True], ids=["noise", "philox"])
def test_functional_kernel_with_history_matches_float64(k, philox):
    coefs = _rows()
    x, m, hist = _inputs(k)
    step = torch.tensor([2], dtype=torch.int64, device=DEVICE)
    seed = torch.tensor([17], dtype=torch.int64, device=DEVICE)
    z = philox_normal(seed, SHAPE, step, stream=0, image_offset=3, device=DEVICE) if philox else torch.randn(SHAPE)
    noise = None if philox else z.to(DEVICE)
    h = hist + [None] * (3 - k)
    xp, x0 = sampler_step_forward(x, m, coefs, step, h[0], noise, seed, 3, True, False, h[1], h[2])
    want, want_x0 = sampler_step_float64(x, m, coefs, 2, z, clip=True, history=hist)
    torch.testing.assert_close(xp.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double().cpu(), want_x0.cpu(), rtol=1e-5, atol=1e-5)
    # each history tensor counts: dropping the oldest changes the result by exactly its term
    if k == 3:
        xp2, _ = sampler_step_forward(x, m, coefs, step, h[0], noise, seed, 3, True, False, h[1], None)
        torch.testing.assert_close((xp - xp2).double(), coefs[2, 10].double() * hist[2].double(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_block(monkeypatch):
    if os_interpreting():
        monkeypatch.setattr(ks, "INTERPRET_CONFIG", (16, 1))


def os_interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_inplace_kernel_shifts_the_history(small_block, k):
    coefs = _rows(seed=4)
    x, m, hist = _inputs(k, seed=5)
    step = torch.tensor([1], dtype=torch.int64, device=DEVICE)
    seed = torch.tensor([8], dtype=torch.int64, device=DEVICE)
    h = hist + [None] * (3 - k)
    want_prev, want_x0 = sampler_step_forward(x, m, coefs, step, h[0], None, seed, 0, False, False, h[1], h[2])
    bufs = [t.clone() for t in hist] + [None] * (3 - k)
    xb = x.clone()
    t_out = torch.zeros(SHAPE[0], dtype=torch.int64, device=DEVICE)
    done = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    sampler_step_inplace(xb, m, coefs, step, t_out, MODEL_T.to(DEVICE), done, bufs[0], seed, 0, False, False,
                         bufs[1], bufs[2])
    assert torch.equal(xb, want_prev)  # same body, same rounding
    assert torch.equal(bufs[0], want_x0)
    for i in range(1, k):  # x0_prev_{i+1} <- the old x0_prev_i, unchanged bits
        assert torch.equal(bufs[i], hist[i - 1])
    assert step.item() == 2 and done.item() == 0 and t_out.tolist() == [10] * SHAPE[0]


@pytest.mark.parametrize("k", [2, 3])
def test_ops_triton_equals_reference_with_history(small_block, k):
    from fastddpm.ops import use_backend
    from fastddpm.ops.sampler_step import sampler_step, sampler_step_

    coefs = _rows(seed=7)
    x, m, hist = _inputs(k, seed=9)
    h = hist + [None] * (3 - k)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    out = {}
    for backend in ("reference", "triton"):
        with use_backend(backend):
            f = sampler_step(x, m, coefs, torch.tensor([3], device=DEVICE), h[0], None, seed, 1, True, False, h[1], h[2])
            bufs = [t.clone() for t in hist] + [None] * (3 - k)
            xb, stp = x.clone(), torch.tensor([3], device=DEVICE)
            sampler_step_(xb, m, coefs, stp, torch.zeros(3, dtype=torch.int64, device=DEVICE), MODEL_T.to(DEVICE),
                          bufs[0], seed, 1, True, False, None, bufs[1], bufs[2])
        out[backend] = (f, xb, bufs)
    (f_r, x_r, b_r), (f_t, x_t, b_t) = out["reference"], out["triton"]
    for a, b in zip(f_t, f_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_t, x_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_r, f_r[0], rtol=0, atol=0)  # in place = functional on the reference path
    for a, b in zip(b_t[:k], b_r[:k]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(b_r[k - 1], hist[k - 2]) and torch.equal(b_r[0], f_r[1])


def test_opcheck_with_history():
    from fastddpm.ops.sampler_step import sampler_step  # noqa: F401  (registers both ops)

    coefs = _rows()
    x, m, hist = _inputs(3)
    torch.library.opcheck(torch.ops.fastddpm.sampler_step.default,
                          (x, m, coefs, torch.tensor([1], device=DEVICE), hist[0], None, None, 0, True, False,
                           hist[1], hist[2]))
    args = (x.clone(), m, coefs, torch.tensor([1], device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE),
            MODEL_T.to(DEVICE), hist[0].clone(), None, 0, True, False, None, hist[1].clone(), hist[2].clone())
    torch.library.opcheck(torch.ops.fastddpm.sampler_step_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_history_bad_arguments():
    from fastddpm.ops.sampler_step import sampler_step

    coefs = _rows()
    x, m, hist = _inputs(3)
    step = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="x0_prev2 needs x0_prev"):
        sampler_step(x, m, coefs, step, None, None, None, 0, True, False, hist[1])
    with pytest.raises(ValueError, match="x0_prev3 needs x0_prev2"):
        sampler_step(x, m, coefs, step, hist[0], None, None, 0, True, False, None, hist[2])
    with pytest.raises(ValueError, match="coefs"):  # a 9-column table has no P3
        sampler_step(x, m, coefs[:, :9].contiguous(), step, hist[0], None, None, 0, True, False, hist[1])
    with pytest.raises(ValueError, match="x0_prev2"):
        sampler_step(x, m, coefs, step, hist[0], None, None, 0, True, False, hist[1][:1])
    with pytest.raises(ValueError, match="x0_prev3 needs x0_prev2"):
        sampler_step_forward(x, m, coefs, step, hist[0], None, None, 0, True, False, None, hist[2])
    # the legacy 9-column layout is still read with at most one history tensor
    a, _ = sampler_step(x, m, coefs[:, :9].contiguous(), step, hist[0])
    b, _ = sampler_step(x, m, coefs, step, hist[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert math.isfinite(a.sum().item())
