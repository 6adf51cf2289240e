"""The torch Philox reference (fastddpm.ops.philox) against Random123's known answers and against
Triton's own tl.philox / tl.randn pipeline run in the interpreter (bit for bit), plus normality and
batch-independence of the sampler's noise stream."""
import math

import pytest
import torch

from fastddpm.ops.philox import philox_normal, philox_uint32, philox_words

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Normals from identical words: the interpreter uses numpy's float32 log/cos/sqrt (within 2e-6 of
# torch's); a GPU uses libdevice log/cos and sqrt.approx (a few ulp), hence the looser GPU tolerance.
NORMAL_TOL = dict(rtol=1e-5, atol=2e-6) if DEVICE == "cuda" else dict(rtol=2e-6, atol=2e-6)


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


# Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors): counter (4 words), key (2), output (4).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_random123_known_answers(ctr, key, expected):
    words = philox_words(*(_t(c) for c in ctr), *(_t(k) for k in key))
    assert tuple(int(w.item()) for w in words) == expected


@triton.jit
def _philox_probe(SEED, STEP, W, Z, E, image_offset, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    # Same counters as kernels/sampler_step.py: c0 = element in image, c1 = image_offset + image,
    # c2 = step, c3 = stream; stores the four words and tl.randn's Box-Muller normal of (w0, w1).
    pid = tl.program_id(0)
    img = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    seed = tl.load(SEED)
    step = tl.load(STEP)
    c0 = offs.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + (image_offset + img).to(tl.uint32)
    c2 = zero + step.to(tl.uint32)
    c3 = zero + STREAM
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    base = img.to(tl.int64) * E + offs
    tl.store(W + base * 4 + 0, w0.to(tl.int64), mask=mask)
    tl.store(W + base * 4 + 1, w1.to(tl.int64), mask=mask)
    tl.store(W + base * 4 + 2, w2.to(tl.int64), mask=mask)
    tl.store(W + base * 4 + 3, w3.to(tl.int64), mask=mask)
    n, _ = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(w0), tl.random.uint_to_uniform_float(w1))
    tl.store(Z + base, n, mask=mask)


@triton.jit
def _randn_probe(SEED, Z, E, BLOCK: tl.constexpr):
    # tl.randn(seed, offset) itself: counters (offset, 0, 0, 0).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    tl.store(Z + offs, tl.randn(tl.load(SEED), offs), mask=mask)


def _run_probe(seed, n_images, per_image, step, stream, image_offset):
    s = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    st = torch.tensor([step], dtype=torch.int64, device=DEVICE)
    w = torch.zeros(n_images * per_image * 4, dtype=torch.int64, device=DEVICE)
    z = torch.zeros(n_images * per_image, dtype=torch.float32, device=DEVICE)
    block = 64
    _philox_probe[(triton.cdiv(per_image, block), n_images)](s, st, w, z, per_image, image_offset, STREAM=stream,
                                                             BLOCK=block)
    return s, st, w.reshape(n_images, per_image, 4), z.reshape(n_images, per_image)


@pytest.mark.parametrize("seed,step,stream,image_offset", [
    (0, 0, 0, 0),
    (12345, 7, 0, 3),
    (-7, 999, 1, 0),            # negative seed: both key words from the two's complement bits
    (2**40 + 3, 2**33 + 5, 0, 17),  # key high word non-zero; step truncated to 32 bits like the kernel
    (2**63 - 1, 1, 1, 2**31 + 1),
])
def test_words_bit_exact_vs_triton(seed, step, stream, image_offset):
    n_images, per_image = 3, 100  # per_image not a multiple of the block: masked tail
    s, st, w, z = _run_probe(seed, n_images, per_image, step, stream, image_offset)
    ref = torch.stack(philox_uint32(s, (n_images, per_image), st, stream, image_offset), dim=-1)
    assert ref.dtype == torch.int64 and int(ref.min()) >= 0 and int(ref.max()) < 2**32
    assert torch.equal(w.cpu(), ref.cpu())
    # Normals: same words, so only the float32 log/cos/sqrt implementations may differ (a few ulp).
    zr = philox_normal(s, (n_images, per_image), st, stream, image_offset)
    assert zr.dtype == torch.float32 and zr.shape == (n_images, per_image)
    torch.testing.assert_close(z.cpu(), zr.cpu(), **NORMAL_TOL)


def test_matches_tl_randn_with_its_counters():
    # tl.randn(seed, offset) uses counters (offset, 0, 0, 0): image 0 at step 0, stream 0, offset 0.
    seed, e = 987654321, 300
    s = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    z = torch.zeros(e, dtype=torch.float32, device=DEVICE)
    _randn_probe[(triton.cdiv(e, 128),)](s, z, e, BLOCK=128)
    zr = philox_normal(s, (1, e), torch.zeros(1, dtype=torch.int64, device=DEVICE))
    torch.testing.assert_close(z.cpu(), zr[0].cpu(), **NORMAL_TOL)


def test_normality_and_moments():
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 100_000
    z = philox_normal(torch.tensor([2024]), (10, 100, 100), torch.tensor([3])).double().flatten()
    assert torch.isfinite(z).all()
    se = 1.0 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2.0) * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15.0) * se       # skewness (Var z^3 = 15)
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96.0) * se  # kurtosis (Var z^4 = 96)
    stat, p = scipy_stats.kstest(z.numpy(), "norm")
    assert p > 1e-3, (stat, p)
    # Adjacent elements are uncorrelated.
    corr = (z[1:] * z[:-1]).mean().item()
    assert abs(corr) < 5 * se


def test_streams_steps_seeds_images_are_distinct_and_uncorrelated():
    shape = (4, 3, 16, 16)
    base = philox_normal(torch.tensor([5]), shape, torch.tensor([10]))
    others = [
        philox_normal(torch.tensor([6]), shape, torch.tensor([10])),
        philox_normal(torch.tensor([5]), shape, torch.tensor([11])),
        philox_normal(torch.tensor([5]), shape, torch.tensor([10]), stream=1),
        philox_normal(torch.tensor([5]), shape, torch.tensor([10]), image_offset=1),
    ]
    se = 1.0 / math.sqrt(base.numel())
    for o in others:
        assert not torch.equal(o, base)
        assert abs((o * base).double().mean().item()) < 5 * se
    # images of one batch are distinct
    assert abs((base[0] * base[1]).double().mean().item()) < 5 / math.sqrt(base[0].numel())


def test_image_noise_independent_of_batch_size_and_offset():
    seed, step = torch.tensor([77]), torch.tensor([42])
    full = philox_normal(seed, (8, 3, 5, 7), step)
    part = philox_normal(seed, (3, 3, 5, 7), step, image_offset=4)
    assert torch.equal(part, full[4:7])
    single = philox_normal(seed, (1, 3, 5, 7), step, image_offset=6)
    assert torch.equal(single[0], full[6])
    # deterministic
    assert torch.equal(philox_normal(seed, (8, 3, 5, 7), step), full)


def test_chunking_does_not_change_the_stream(monkeypatch):
    import fastddpm.ops.philox as ph

    seed, step = torch.tensor([3]), torch.tensor([1])
    ref = philox_normal(seed, (5, 2, 3, 3), step, image_offset=2)
    monkeypatch.setattr(ph, "_CHUNK", 20)  # 18 elements per image: one image per chunk
    assert torch.equal(ph.philox_normal(seed, (5, 2, 3, 3), step, image_offset=2), ref)


def test_bad_arguments_raise_value_error():
    seed, step = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match="seed"):
        philox_normal(torch.tensor([1.0]), (2, 3), step)
    with pytest.raises(ValueError, match="step"):
        philox_normal(seed, (2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        philox_normal(seed, (), step)
    with pytest.raises(ValueError, match="stream"):
        philox_normal(seed, (2, 3), step, stream=-1)
    with pytest.raises(ValueError, match="image_offset"):
        philox_normal(seed, (2, 3), step, image_offset=-2)
