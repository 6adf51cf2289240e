"""Feature extractors: the shipped digits classifier (accuracy recomputed from the data), digits-FID
sanity (real vs real small, noise large). The FID InceptionV3: tests/test_inception.py."""
import json

import numpy as np
import pytest
import torch

from fastddpm.data import load_dataset
from fastddpm.features import (DIGITS_CLASSIFIER_PATH, DIGITS_SPLIT_SEED, DigitsClassifier, digits_split,
                               get_extractor, load_digits_classifier)
from fastddpm.metrics import frechet_distance


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    tr, ho = digits_split(len(ds))
    x_tr, y_tr = ds.batch(tr)
    x_ho, y_ho = ds.batch(ho)
    return x_tr, y_tr, x_ho, y_ho


@pytest.fixture(scope="module")
def clf():
    return load_digits_classifier()


def test_split_is_fixed_disjoint_and_complete():
    tr, ho = digits_split(1797)
    assert len(tr) == 1438 and len(ho) == 359
    assert np.intersect1d(tr, ho).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, ho])), np.arange(1797))
    # the rule written in the docstring and the shipped json: last 20% of a seeded permutation
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(1797)
    assert np.array_equal(ho, np.sort(perm[-359:]))
    tr2, ho2 = digits_split(1797)
    assert np.array_equal(tr, tr2) and np.array_equal(ho, ho2)
    with pytest.raises(ValueError, match="holdout"):
        digits_split(100, holdout=1.5)


def test_shipped_classifier_heldout_accuracy(clf, digits):
    _, _, x_ho, y_ho = digits
    with open(DIGITS_CLASSIFIER_PATH.replace(".safetensors", ".json")) as fh:
        meta = json.load(fh)
    assert meta["split"]["seed"] == DIGITS_SPLIT_SEED
    with torch.no_grad():
        pred = clf.logits(x_ho).argmax(1)
    acc = (pred == y_ho).float().mean().item()
    assert acc >= 0.95, acc
    # every class is recognised (no class collapses)
    for c in range(10):
        assert (pred[y_ho == c] == c).float().mean().item() >= 0.8


def test_classifier_outputs_consistent(clf, digits):
    x = digits[2][:17]
    with torch.no_grad():
        f = clf(x)
        f2, p = clf.features_and_probs(x)
        lg = clf.logits(x)
    assert f.shape == (17, clf.dim) and p.shape == (17, 10)
    torch.testing.assert_close(f, f2)
    torch.testing.assert_close(p, torch.softmax(lg, 1))
    torch.testing.assert_close(p.sum(1), torch.ones(17))
    assert (f >= 0).all()  # ReLU features
    with pytest.raises(ValueError, match="channel"):
        clf(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="8x8"):
        clf(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="float tensor"):
        clf(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_digits_fid_real_small_noise_large(clf, digits):
    x_tr, _, x_ho, _ = digits

    def stats(x):
        with torch.no_grad():
            f = clf(x).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    s_tr, s_ho = stats(x_tr), stats(x_ho)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(x_ho.shape, generator=g) * 2 - 1
    s_noise = stats(noise)
    # same-size comparisons against the training statistics
    real = frechet_distance(*s_ho, *s_tr)
    fake = frechet_distance(*s_noise, *s_tr)
    blurred = torch.nn.functional.avg_pool2d(x_ho, 3, 1, 1, count_include_pad=False)
    mid = frechet_distance(*stats(blurred), *s_tr)
    assert real < 30.0, real
    assert fake > 20 * real, (fake, real)
    assert real < mid < fake, (real, mid, fake)


def test_get_extractor_errors():
    with pytest.raises(ValueError, match="'digits', 'inception'"):
        get_extractor("vgg")
    with pytest.raises(FileNotFoundError, match="train_digits_classifier"):
        load_digits_classifier("/nonexistent/clf.safetensors")


def test_classifier_roundtrip_from_other_path(tmp_path, clf, digits):
    from safetensors.torch import save_file

    model = DigitsClassifier(c1=4, c2=8, feature_dim=16)
    save_file(model.state_dict(), str(tmp_path / "c.safetensors"))
    (tmp_path / "c.json").write_text(json.dumps({"config": model.config}))
    loaded = get_extractor("digits", path=str(tmp_path / "c.safetensors"))
    x = digits[2][:5]
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x), model.logits(x))
    assert loaded.dim == 16

# InceptionV3: tests/test_inception.py
