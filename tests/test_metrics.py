"""Tests of metrics.py: FID, IS, KID, precision/recall and Laplacian variance against closed forms
and hand computations, the weight-file format, the feature pass, the CLI and the loss plot. CPU
only, no network: the Inception weights are random, in the format of pytorch-fid's
pt_inception-2015-12-05-6726825d.pth."""
import csv
import json
import math
import os
import pathlib
import random
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import metrics  # noqa: E402


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Random weights in the real file's format: the state dict of torchvision's Inception v3 with
    1008 classes and no aux head (pytorch-fid loads the real file into exactly these modules).
    Conv weights are scaled by sqrt(6) (He gain) so that the features are O(1), not ~1e-8."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.mul_(math.sqrt(6))
    path = tmp_path_factory.mktemp("weights") / metrics.FID_WEIGHTS_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def model(weights_file):
    return metrics.load_inception(weights_file, "cpu")


@pytest.fixture
def small_network(monkeypatch):
    """For the CLI tests, which check plumbing: on the 2-core CPU a 299x299 image takes ~0.25 s and
    a 2048x2048 sqrtm ~40 s, so here the network sees 75x75 inputs (its smallest) and the FID
    uses the first 64 pool3 features. Numerics are tested at full size elsewhere."""
    monkeypatch.setattr(metrics, "resize_299",
                        lambda x: F.interpolate(x, size=(75, 75), mode="bilinear", align_corners=False))
    forward = metrics.InceptionFID.forward
    monkeypatch.setattr(metrics.InceptionFID, "forward", lambda self, x: (lambda p, lg: (p[:, :64], lg))(
        *forward(self, x)))
    monkeypatch.setattr(metrics.InceptionFID, "FEATURES", 64)


def make_folder(path, n, seed, size=12, mode="RGB"):
    """n random PNGs; seed also shifts the brightness so that sets differ."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for i in range(n):
        arr = np.clip(rng.normal(60 + 40 * seed, 50, shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode).save(path / f"{i:06d}.png")
    return path


def run_cli(capsys, *argv):
    metrics.main([str(a) for a in argv])
    return capsys.readouterr()


def cli_error(capsys, *argv):
    """The message of a CLI run that must fail: one line 'error: ...', a non-zero exit."""
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, *argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg  # exit status 1
    return msg


@pytest.fixture
def no_feature_pass(monkeypatch):
    """For errors that must come before the (long) Inception pass."""
    monkeypatch.setattr(metrics, "compute_features", lambda *a, **k: pytest.fail("the feature pass ran"))


class OnDevice(torch.Tensor):
    """Stands for a tensor on an accelerator without float64 (MPS): every op that gives a float64
    result on it is recorded; .cpu() leaves the "device" (a plain tensor from there on)."""
    float64_ops = []

    def cpu(self):
        return self.as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            cls.float64_ops.append(func.__name__)
        return out


class StubInception:
    """Stands for the network where only the plumbing around it is tested: records the input
    shapes; outputs of the right shapes, "on the device"."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        return torch.rand(len(x), 2048).as_subclass(OnDevice), torch.rand(len(x), 1008).as_subclass(OnDevice)


# ------------------------------------------------------------------ FID

def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
    act = np.random.default_rng(0).normal(size=(500, 128)) * 3 + 1
    mu, sigma = metrics.stats_from_features(act)
    np.testing.assert_allclose(mu, act.mean(0))
    np.testing.assert_allclose(sigma, (act - mu).T @ (act - mu) / (len(act) - 1))   # np.cov, N-1
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * 2 * np.trace(sigma)


def test_fid_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma, mu1, mu2 = random_cov(rng, 64), rng.normal(size=64), rng.normal(size=64)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_general_gaussians_against_symmetric_form():
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): eigenvalues of a symmetric matrix
    rng = np.random.default_rng(3)
    s1, s2, mu1, mu2 = random_cov(rng, 48), random_cov(rng, 48), rng.normal(size=48), rng.normal(size=48)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_singular_product_retries_with_eps(capsys):
    # sqrtm of the product [[0, 1], [0, 0]] does not exist (inf); with eps on the diagonal
    # Tr sqrt((S1 + eps I)(S2 + eps I)) = 2 sqrt(eps (1 + eps)), so FID = 2 - 4 sqrt(eps (1 + eps)).
    s1, s2, mu, eps = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2), 1e-6
    fid = metrics.frechet_distance(mu, s1, mu, s2, eps=eps)
    assert fid == pytest.approx(2 - 4 * math.sqrt(eps * (1 + eps)), rel=1e-9)
    assert "singular product; adding 1e-06 to diagonal" in capsys.readouterr().err


def test_fid_rank_deficient_covariances_do_not_crash():
    rng = np.random.default_rng(4)                           # 6 images, 64 dims: rank 5
    fid = metrics.frechet_distance(*metrics.stats_from_features(rng.normal(size=(6, 64))),
                                   *metrics.stats_from_features(rng.normal(size=(6, 64)) + 1))
    assert math.isfinite(fid) and fid > 0


def test_fid_imaginary_component_tolerance():
    mu = np.zeros(2)
    # eigenvalue -1e-8: imaginary part 1e-4 on the diagonal, under pytorch-fid's atol 1e-3 -> real part kept
    assert metrics.frechet_distance(mu, np.diag([1.0, -1e-8]), mu, np.eye(2)) == pytest.approx(
        (1 - 1e-8) + 2 - 2 * 1.0, abs=1e-7)
    with pytest.raises(metrics.MetricsError, match="imaginary component"):
        metrics.frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
    with pytest.raises(metrics.MetricsError, match="different dimensions"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), mu, np.eye(2))


# ------------------------------------------------------------------ Inception Score

def test_is_of_uniform_predictions_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 1008), np.float32))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_of_confident_even_predictions_is_k():
    k = 7
    logits = np.zeros((10 * 3 * k, 1008), np.float32)
    logits[np.arange(len(logits)), np.tile(np.arange(k), 30)] = 60.0     # p(y|x) one-hot to 1e-23
    mean, std = metrics.inception_score(logits, splits=10, shuffle=False)   # each split: 3 of each class
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(k, rel=1e-9)  # shuffled


def test_is_matches_salimans_formula_with_torch_fidelity_shuffle():
    logits = np.random.default_rng(5).normal(scale=3, size=(230, 1008)).astype(np.float32)
    perm = np.random.RandomState(2020).permutation(230)                  # torch-fidelity's shuffle
    p = np.exp(logits[perm].astype(np.float64))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(10):                                                 # Salimans et al.'s code
        part = p[i * 230 // 10:(i + 1) * 230 // 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = metrics.inception_score(logits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)                 # ddof=0
    with pytest.raises(metrics.MetricsError, match="at least 10 images"):
        metrics.inception_score(logits[:9])


# ------------------------------------------------------------------ KID, precision and recall

def kid_by_hand(x, y, subsets, m, seed=2020):
    """Binkowski et al.'s unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair, on subsets
    drawn as torch-fidelity draws them (the set's, then the reference's); mean and std (ddof=0)."""
    d = x.shape[1]
    kernel = lambda a, b: (sum(float(u) * float(v) for u, v in zip(a, b)) / d + 1) ** 3  # noqa: E731
    k_xx = [[kernel(a, b) for b in x] for a in x]
    k_yy = [[kernel(a, b) for b in y] for a in y]
    k_xy = [[kernel(a, b) for b in y] for a in x]
    rng, values = np.random.RandomState(seed), []
    for _ in range(subsets):
        i, j = rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)
        xx = sum(k_xx[a][b] for a in i for b in i if a != b) / (m * (m - 1))
        yy = sum(k_yy[a][b] for a in j for b in j if a != b) / (m * (m - 1))
        xy = sum(k_xy[a][b] for a in i for b in j) / (m * m)
        values.append(xx + yy - 2 * xy)
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def precision_recall_by_hand(fake, real, k=3):
    """Kynkaanniemi et al.: phi is covered by a set if it lies in the ball around some member phi'
    of radius ||phi' - NN_k(phi')||; precision = covered fraction of fake by real, recall the reverse."""
    radii = lambda s: [sorted(math.dist(p, q) for q in s)[k] for p in s]  # noqa: E731  ([0]: p itself)
    covered = lambda q, s, r: any(math.dist(q, p) <= rp for p, rp in zip(s, r))  # noqa: E731
    r_fake, r_real = radii(fake), radii(real)
    return (sum(covered(q, real, r_real) for q in fake) / len(fake),
            sum(covered(q, fake, r_fake) for q in real) / len(real))


def feature_pair():
    rng = np.random.default_rng(9)
    return rng.normal(0.6, 1, (60, 16)), rng.normal(0, 1, (50, 16))   # precision 0.57, recall 0.52


def test_kid_equals_hand_computation_with_small_sets_notice(capsys):
    fake, real = feature_pair()
    mean, std = metrics.kernel_inception_distance(fake, real)         # 1000 > 50: subsets of 50
    assert "KID uses subsets of 50 feature vectors, not 1000" in capsys.readouterr().err
    hand_mean, hand_std = kid_by_hand(fake, real, 100, 50)
    assert mean == pytest.approx(hand_mean, rel=1e-10) and std == pytest.approx(hand_std, rel=1e-8)
    assert hand_mean > 10 * hand_std > 0                              # the sets differ, subsets vary


def test_kid_equals_hand_computation_with_subsets_of_the_sets():
    fake, real = feature_pair()
    mean, std = metrics.kernel_inception_distance(fake, real, subset_size=20)
    hand_mean, hand_std = kid_by_hand(fake, real, 100, 20)
    assert mean == pytest.approx(hand_mean, rel=1e-10) and std == pytest.approx(hand_std, rel=1e-8)
    same = metrics.kernel_inception_distance(real[:25], real[25:], subset_size=20)[0]
    assert abs(same) < mean / 10                                       # unbiased: about 0 for one distribution
    with pytest.raises(metrics.MetricsError, match="same d"):
        metrics.kernel_inception_distance(fake, real[:, :8])


@pytest.mark.parametrize("block", [1, 3, 7, 50, 64, metrics.PR_BLOCK])
def test_precision_recall_blocked_equal_hand_computation(block):
    fake, real = feature_pair()
    precision, recall = metrics.precision_recall(fake, real, block=block)
    assert (precision, recall) == precision_recall_by_hand(fake, real) == (34 / 60, 26 / 50)
    radii = metrics.knn_radii(real, block=block)                       # a reference's radii, reused
    assert metrics.precision_recall(fake, real, block=block, ref_radii=radii) == (precision, recall)


def test_precision_recall_memory_is_block_bounded():
    """Every tensor made on the way, other than the features and row blocks of them (last dim d),
    has at most block x (block + k + 1) elements: no N x N distance matrix, whatever N."""
    fake, real = feature_pair()
    block, k, d = 7, metrics.PR_K, fake.shape[1]

    class Record(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.shapes, self.cdist = [], []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.cdist:
                self.cdist.append((args[0].shape[0], args[1].shape[0]))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
            return out

    with Record() as record:
        assert metrics.precision_recall(fake, real, block=block) == (34 / 60, 26 / 50)
    assert max(max(rows, cols) for rows, cols in record.cdist) == block
    made = [shape for shape in record.shapes if not shape or shape[-1] != d]
    assert max(math.prod(shape) for shape in made) == block * (block + k + 1) < len(fake) * len(real)


# ------------------------------------------------------------------ Laplacian variance

def laplacian_by_hand(img):
    """Direct loops: reflect-101 borders (index -1 -> 1, n -> n-2), population variance."""
    h, w = img.shape
    at = lambda i, j: float(img[abs(i) if i < h else 2 * h - 2 - i, abs(j) if j < w else 2 * w - 2 - j])  # noqa: E731
    lap = [at(i - 1, j) + at(i + 1, j) + at(i, j - 1) + at(i, j + 1) - 4 * at(i, j)
           for i in range(h) for j in range(w)]
    mean = sum(lap) / len(lap)
    return sum((v - mean) ** 2 for v in lap) / len(lap)


def test_laplacian_variance_hand_computed():
    img = np.random.default_rng(6).integers(0, 256, (5, 7), dtype=np.uint8)
    assert metrics.laplacian_variance(img[None])[0] == pytest.approx(laplacian_by_hand(img), rel=1e-12)
    checker = (np.indices((6, 6)).sum(0) % 2 * 255).astype(np.uint8)     # reflect-101 keeps the pattern
    flat = np.full((6, 6), 77, np.uint8)
    np.testing.assert_allclose(metrics.laplacian_variance(np.stack([checker, flat])), [1020.0 ** 2, 0.0])


def test_laplacian_variance_luma_is_opencv_fixed_point():
    # OpenCV 4: red 255 -> (9798*255 + 16384) >> 15 = 76; green -> 150; blue -> 29
    checker = np.indices((6, 6)).sum(0) % 2 * 255
    for channel, gray in ((0, 76), (1, 150), (2, 29)):
        rgb = np.zeros((1, 3, 6, 6), np.uint8)
        rgb[0, channel] = checker
        assert metrics.laplacian_variance(torch.from_numpy(rgb))[0] == (4.0 * gray) ** 2
    gray_img = np.random.default_rng(7).integers(0, 256, (1, 1, 8, 8), dtype=np.uint8)
    assert metrics.laplacian_variance(np.repeat(gray_img, 3, axis=1))[0] == metrics.laplacian_variance(gray_img)[0]
    sizes = [torch.zeros(3, 5, 5, dtype=torch.uint8), torch.from_numpy(np.repeat(gray_img[0], 3, 0))]
    np.testing.assert_allclose(metrics.laplacian_variance(sizes),            # list of mixed sizes
                               [0.0, laplacian_by_hand(gray_img[0, 0])], rtol=1e-12)


# ------------------------------------------------------------------ the network and its weights

def test_weight_file_format_loads_with_strict_keys(weights_file, model, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    assert set(model.state_dict()) == set(state) and len(state) == 566
    assert model.fc.weight.shape == (1008, 2048)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(metrics.MetricsError, match="1 keys missing"):
        metrics.load_inception(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(metrics.MetricsError, match="cannot be read"):
        metrics.load_inception(tmp_path / "junk.pth")
    with pytest.raises(metrics.MetricsError, match="--weights"):
        metrics.load_inception(tmp_path / "absent.pth")


def test_offline_without_cache_says_url_cache_and_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "FID_WEIGHTS_URL", "http://127.0.0.1:9/" + metrics.FID_WEIGHTS_FILE)
    with pytest.raises(metrics.MetricsError) as err:
        metrics.load_inception()
    msg = str(err.value)
    assert "http://127.0.0.1:9/" in msg and "--weights" in msg
    assert str(tmp_path / "hub" / "checkpoints" / metrics.FID_WEIGHTS_FILE) in msg


def test_feature_pass_gray_mixed_sizes_corrupt(model, tmp_path, capsys):
    rng = np.random.default_rng(8)
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "a.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"\x89PNG broken")
    out = metrics.compute_features(tmp_path, model, batch_size=50, lapvar=True, name="set")
    err = capsys.readouterr().err
    assert out["n"] == 2 and len(out["skipped"]) == 1 and "skipped 1 unreadable" in err
    assert err.count("different sizes") == 1
    with torch.inference_mode():   # each image alone, as pytorch-fid: ToTensor (/255), gray -> RGB
        alone = [model(torch.from_numpy(a).float().div(255).reshape(1, *a.shape[:2], -1).permute(0, 3, 1, 2)
                       .expand(1, 3, -1, -1)) for a in (gray, rgb)]
    np.testing.assert_allclose(out["pool3"], torch.cat([p for p, _ in alone]).double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["logits"], torch.cat([lg for _, lg in alone]).numpy(), rtol=1e-5, atol=1e-6)
    assert out["pool3"].dtype == np.float64 and out["pool3"].shape == (2, 2048)
    one_channel = metrics.compute_features(torch.from_numpy(gray)[None, None], model, progress=False)
    np.testing.assert_allclose(one_channel["pool3"][0], out["pool3"][0], rtol=1e-5, atol=1e-6)


def test_feature_pass_copies_each_batch_to_the_device_once(monkeypatch, tmp_path):
    transfers, real_to = [], torch.Tensor.to

    def spy(self, *args, **kwargs):                          # .to(device), not .to(dtype)
        if "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args):
            transfers.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    stub = StubInception()
    out = metrics.compute_features(images, stub, batch_size=3, lapvar=True, progress=False)
    assert out["n"] == 7 and stub.calls == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    assert len(transfers) == 3                                   # one per batch, not one per image
    make_folder(tmp_path / "a", 3, 0, size=8)                    # different sizes: each resized alone
    make_folder(tmp_path / "b", 2, 1, size=10, mode="L")
    transfers.clear()
    files = sorted((tmp_path / "a").glob("*.png")) + sorted((tmp_path / "b").glob("*.png"))
    out = metrics.compute_features(files, stub, batch_size=4, progress=False)
    assert out["n"] == 5 and len(transfers) == 2


def test_feature_pass_without_tf32_and_flags_restored(model, small_network):
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    saved, seen = flags(), []
    handle = model.register_forward_pre_hook(lambda module, inputs: seen.append(flags()))
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as a training script may
        metrics.compute_features(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), model, batch_size=2, progress=False)
        assert seen == [(False, False)] * 2 and flags() == (True, True)
        with pytest.raises(ZeroDivisionError):                  # restored after a failure as well
            metrics.compute_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), lambda x: 1 / 0, progress=False)
        assert flags() == (True, True)
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_feature_pass_makes_float64_on_the_cpu_only():
    OnDevice.float64_ops.clear()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = metrics.compute_features(images, StubInception(), batch_size=2, lapvar=True, progress=False)
    assert out["pool3"].dtype == np.float64 and out["pool3"].shape == (4, 2048)
    assert OnDevice.float64_ops == []                            # MPS has no float64


# ------------------------------------------------------------------ command line

def test_cli_save_stats_npz_several_folders_json(small_network, weights_file, tmp_path, capsys):
    a, b = make_folder(tmp_path / "a", 10, 1), make_folder(tmp_path / "b", 11, 2, size=16, mode="L")
    r = make_folder(tmp_path / "r", 12, 0)
    common = ["--weights", weights_file, "--device", "cpu", "--data-root", tmp_path / "data"]
    run_cli(capsys, r, "--save-stats", tmp_path / "r.npz", *common)
    with np.load(tmp_path / "r.npz", allow_pickle=False) as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64) and int(f["n"]) == 12
    res = json.loads(run_cli(capsys, a, b, "--ref", tmp_path / "r.npz", "--json", *common).out)
    assert list(res) == [str(a), str(b), str(tmp_path / "r.npz")]
    for name, n in ((str(a), 10), (str(b), 11)):
        assert {"is_mean", "is_std", "fid", "lapvar", "n"} <= set(res[name]) and res[name]["n"] == n
        assert res[name]["fid"] > 0 and res[name]["is_mean"] >= 1 and res[name]["lapvar"] > 0
    assert res[str(tmp_path / "r.npz")]["reference"] and res[str(tmp_path / "r.npz")]["fid"] is None
    # the same FID from the reference folder itself, and from the functions directly
    res2 = json.loads(run_cli(capsys, a, "--ref", r, "--json", *common).out)
    assert res2[str(a)]["fid"] == pytest.approx(res[str(a)]["fid"], rel=1e-9)
    model = metrics.load_inception(weights_file)
    fa = metrics.compute_features(a, model, progress=False)
    fr = metrics.compute_features(r, model, progress=False)
    fid = metrics.frechet_distance(*metrics.stats_from_features(fa["pool3"]), *metrics.stats_from_features(fr["pool3"]))
    assert res[str(a)]["fid"] == pytest.approx(fid, rel=1e-9)
    assert res[str(a)]["is_mean"] == pytest.approx(metrics.inception_score(fa["logits"])[0], rel=1e-12)
    table = run_cli(capsys, a, b, "--ref", tmp_path / "r.npz", *common).out.splitlines()
    assert table[0].startswith("| set") and len(table) == 5 and "(reference)" in table[-1]


def test_cli_dataset_reference_is_cached(small_network, weights_file, tmp_path, capsys):
    a = make_folder(tmp_path / "a", 10, 1)
    common = ["--weights", weights_file, "--device", "cpu", "--data-root", tmp_path / "data", "--n", 10, "--json"]
    first = json.loads(run_cli(capsys, a, "--ref", "fake", *common).out)
    cache = tmp_path / "data" / "cache" / "fid_stats_fake_10.npz"
    with np.load(cache) as f:                                   # features too: KID and precision/recall
        assert f["features"].dtype == np.float32 and f["features"].shape == (10, 64)
        old_format = {k: f[k] for k in f.files if k != "features"}
    out = run_cli(capsys, a, "--ref", "fake", *common)
    assert "reference statistics and features from" in out.err
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert first[str(a)][key] is not None
        assert json.loads(out.out)[str(a)][key] == pytest.approx(first[str(a)][key], rel=1e-12)
    np.savez(cache, **old_format)                               # a cache of an older metrics.py: recomputed
    out = run_cli(capsys, a, "--ref", "fake", *common)
    assert "has no features (an older metrics.py wrote it); computing them again" in out.err
    assert json.loads(out.out)[str(a)]["kid"] == pytest.approx(first[str(a)]["kid"], rel=1e-12)
    assert "features" in np.load(cache).files


def test_cli_kid_precision_recall_and_a_features_file_reference(small_network, weights_file, tmp_path, capsys):
    r = make_folder(tmp_path / "r", 12, 0)
    a = make_folder(tmp_path / "a", 5, 1)
    for i in range(5):                                        # a: 5 images of r and 5 others
        (a / f"r{i}.png").write_bytes((r / f"{i:06d}.png").read_bytes())
    common = ["--weights", weights_file, "--device", "cpu", "--data-root", tmp_path / "data"]
    run_cli(capsys, r, "--save-features", tmp_path / "r.npy", *common)
    saved = np.load(tmp_path / "r.npy")
    assert saved.dtype == np.float32 and saved.shape == (12, 64)
    by_folder = json.loads(run_cli(capsys, a, "--ref", r, "--json", *common).out)[str(a)]
    out = run_cli(capsys, a, "--ref", tmp_path / "r.npy", "--json", *common)
    by_file = json.loads(out.out)[str(a)]
    assert "KID uses subsets of 10 feature vectors, not 1000" in out.err
    assert by_file["fid"] == pytest.approx(by_folder["fid"], rel=1e-9)
    for key in ("kid", "kid_std", "precision", "recall"):
        assert by_file[key] == pytest.approx(by_folder[key], rel=1e-12)
    # against hand computations on the features of the same pass
    model = metrics.load_inception(weights_file)
    fa = metrics.compute_features(a, model, progress=False)["pool3"]
    kid, kid_std = kid_by_hand(fa, saved.astype(np.float64), 100, 10)
    assert by_file["kid"] == pytest.approx(kid, rel=1e-9)
    assert by_file["kid_std"] == pytest.approx(kid_std, rel=1e-6)
    assert (by_file["precision"], by_file["recall"]) == precision_recall_by_hand(fa, saved.astype(np.float64))
    assert by_file["precision"] == 0.5 and by_file["recall"] > 0   # a's 5 copies of r's images are covered
    # a features file as a set: FID, KID, P/R against the reference, no IS or Laplacian variance ("-")
    table = run_cli(capsys, a, tmp_path / "r.npy", "--ref", r, *common).out.splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["set", "n", "IS (mean +- std)", "FID", "KID (mean +- std)", "precision", "recall",
                      "Laplacian var. (mean +- std)"]
    row = dict(zip(header, (c.strip() for c in table[3].strip("|").split("|"))))
    assert row["set"] == str(tmp_path / "r.npy") and row["n"] == "12"
    assert row["IS (mean +- std)"] == row["Laplacian var. (mean +- std)"] == "-"
    assert row["precision"] == row["recall"] == "1.0000" and row["KID (mean +- std)"] != "-"


def test_cli_statistics_reference_gives_fid_only_and_says_why_once(small_network, weights_file, tmp_path,
                                                                   capsys):
    r, a = make_folder(tmp_path / "r", 12, 0), make_folder(tmp_path / "a", 10, 1)
    b = make_folder(tmp_path / "b", 10, 2)
    common = ["--weights", weights_file, "--device", "cpu"]
    run_cli(capsys, r, "--save-stats", tmp_path / "r.npz", *common)
    out = run_cli(capsys, a, b, "--ref", tmp_path / "r.npz", "--json", *common)
    res = json.loads(out.out)
    for name in (str(a), str(b)):
        assert res[name]["fid"] > 0
        assert [res[name][k] for k in ("kid", "kid_std", "precision", "recall")] == [None] * 4
    reason = ("note: the reference is statistics only: pass a features file from --save-features for KID "
              "and precision/recall")
    assert out.err.splitlines().count(reason) == 1 and out.err.count("statistics only") == 1


def test_cli_lapvar_only_through_the_script(tmp_path):
    a = make_folder(tmp_path / "a", 3, 1)
    proc = subprocess.run([sys.executable, str(ROOT / "metrics.py"), str(a), "--lapvar-only", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)[str(a)]
    values = metrics.laplacian_variance([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                                         for p in sorted(a.glob("*.png"))])
    assert res["n"] == 3 and res["fid"] is None and res["is_mean"] is None
    assert res["lapvar"] == pytest.approx(values.mean(), rel=1e-12)
    assert res["lapvar_std"] == pytest.approx(values.std(), rel=1e-12)


def test_cli_errors_are_one_sentence(weights_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "metrics.py"), str(tmp_path / "empty")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no image files")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    def error_of(*argv):
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, *argv, "--weights", weights_file, "--device", "cpu")
        return str(e.value.code)

    make_folder(tmp_path / "one", 1, 0)
    assert "has only 1 image" in error_of(tmp_path / "one")
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(3))
    assert "no 'mu' and 'sigma'" in error_of(tmp_path / "one", "--ref", tmp_path / "nomu.npz")
    np.savez(tmp_path / "mismatch.npz", mu=np.zeros(3), sigma=np.eye(4))
    assert "mu has shape (3,) but sigma has shape (4, 4)" in error_of(tmp_path / "mismatch.npz")
    assert "is not an image folder" in error_of(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, tmp_path / "mismatch.npz", "--weights", tmp_path / "absent.pth")
    assert "mu has shape" in str(e.value.code)
    make_folder(tmp_path / "two", 2, 0)
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, tmp_path / "two", "--weights", tmp_path / "absent.pth")
    assert str(e.value.code).startswith("error: the weights file") and "--weights" in str(e.value.code)


# Tests run as root, for whom read-only permission bits do not stop a write: the unwritable paths
# lie under a regular file, are folders, or are in /proc.
@pytest.mark.parametrize("where", ["under_a_file", "deeper_under_a_file", "a_folder", "proc"])
def test_cli_unwritable_save_stats_fails_before_the_pass(where, no_feature_pass, weights_file, tmp_path, capsys):
    make_folder(tmp_path / "a", 2, 0)
    (tmp_path / "file.txt").write_text("x")
    out = {"under_a_file": tmp_path / "file.txt" / "stats.npz", "a_folder": tmp_path / "a",
           "deeper_under_a_file": tmp_path / "file.txt" / "sub" / "stats.npz",
           "proc": pathlib.Path("/proc/self/stats.npz")}[where]
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    msg = cli_error(capsys, tmp_path / "a", "--save-stats", out, "--weights", weights_file, "--device", "cpu")
    assert msg.startswith(f"error: cannot write the statistics to {out}")


@pytest.mark.parametrize("case,expected", [
    ("under_a_file", "cannot write the features to"),
    ("a_folder", "it is a folder"),
    ("not_npy", "give a file name ending in .npy"),
    ("statistics_set", "is statistics only"),
    ("two_sets", "--save-features takes exactly one SAMPLES set"),
])
def test_cli_bad_save_features_fails_before_the_pass(case, expected, no_feature_pass, weights_file, tmp_path,
                                                     capsys):
    a, b = make_folder(tmp_path / "a", 2, 0), make_folder(tmp_path / "b", 2, 1)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.npy").mkdir()
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    sets = {"statistics_set": [tmp_path / "s.npz"], "two_sets": [a, b]}.get(case, [a])
    out = {"under_a_file": tmp_path / "file.txt" / "f.npy", "a_folder": tmp_path / "folder.npy",
           "not_npy": tmp_path / "f.txt"}.get(case, tmp_path / "f.npy")
    common = ["--weights", weights_file, "--device", "cpu"]
    assert expected in cli_error(capsys, *sets, "--save-features", out, *common)
    assert not out.is_file()


@pytest.mark.parametrize("content,expected", [
    (b"", "cannot be read as a .npy features file"),
    (b"1,2\n3,4\n", "cannot be read as a .npy features file"),
    ("vector", "holds float64 (5,), not float features N x d"),
    ("integers", "holds int64 (5, 3), not float features N x d"),
    ("npz", "holds no single array"),
    ("one_row", "holds 1 feature vector(s); FID, KID and precision/recall need at least 2"),
    ("nan", "holds NaN or inf values"),
    ("16 x 100", "holds 100-dimensional features, but the FID Inception network's pool3 features are 2048-dimensional"),
    ("absent", "does not exist"),
])
def test_cli_bad_features_file_is_one_sentence_before_any_pass(content, expected, no_feature_pass, weights_file,
                                                               tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    nan = np.zeros((2, 2048))
    nan[1, 0] = np.nan
    arrays = {"vector": np.zeros(5), "integers": np.zeros((5, 3), np.int64), "one_row": np.zeros((1, 2048)),
              "nan": nan, "16 x 100": np.zeros((16, 100))}
    if content in arrays:
        np.save(bad, arrays[content])
    elif content == "npz":
        np.savez(tmp_path / "x.npz", features=np.zeros((3, 2)))
        (tmp_path / "x.npz").rename(bad)
    elif content != "absent":
        bad.write_bytes(content)
    make_folder(tmp_path / "a", 2, 0)
    common = ["--weights", weights_file, "--device", "cpu"]
    assert expected in cli_error(capsys, tmp_path / "a", "--ref", bad, *common)
    assert expected in cli_error(capsys, tmp_path / "a", bad, *common)


def test_cli_results_are_printed_before_a_late_write_fails(small_network, weights_file, tmp_path, capsys,
                                                          monkeypatch):
    make_folder(tmp_path / "a", 3, 0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(SystemExit) as e:
        metrics.main([str(tmp_path / "a"), "--save-stats", str(tmp_path / "s.npz"), "--json",
                      "--weights", str(weights_file), "--device", "cpu"])
    assert e.value.code == (f"error: cannot write the statistics file {tmp_path / 's.npz'} "
                            f"(OSError: No space left on device)")
    assert json.loads(capsys.readouterr().out)[str(tmp_path / "a")]["n"] == 3
    assert list(tmp_path.glob("s.npz*")) == []                  # no temporary file left behind


def test_cli_unwritable_reference_cache_is_a_warning(small_network, weights_file, tmp_path, capsys):
    a = make_folder(tmp_path / "a", 10, 1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cache").write_text("a file where the cache folder would be")
    out = run_cli(capsys, a, "--ref", "fake", "--n", 10, "--json", "--weights", weights_file, "--device", "cpu",
                  "--data-root", tmp_path / "data")
    assert json.loads(out.out)[str(a)]["fid"] > 0
    assert "warning: cannot write the statistics file" in out.err and "not cached" in out.err


@pytest.mark.parametrize("device,expected", [
    ("nonsense", "is not a device"), ("cuda:x", "is not a device"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("mps", "MPS is not available", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_cli_bad_device_is_one_sentence(device, expected, no_feature_pass, weights_file, tmp_path, capsys):
    make_folder(tmp_path / "a", 2, 0)
    assert expected in cli_error(capsys, tmp_path / "a", "--device", device, "--weights", weights_file)


@pytest.mark.parametrize("content,expected", [
    (b"", "is not a .npz file"),
    (b"mu,sigma\n1,2\n", "is not a .npz file"),
    ("npy", "is not a .npz file"),                               # one .npy array, renamed
    ("no_mu", "no 'mu' and 'sigma' arrays"),
    ("strings", "mu and sigma are not numbers"),
])
def test_cli_bad_statistics_file_is_one_sentence_before_any_pass(content, expected, no_feature_pass,
                                                                 weights_file, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    if content == "npy":
        np.save(tmp_path / "x.npy", np.zeros(3))
        (tmp_path / "x.npy").rename(bad)
    elif content == "no_mu":
        np.savez(bad, mean=np.zeros(3), cov=np.eye(3))
    elif content == "strings":
        np.savez(bad, mu=np.array(["a"]), sigma=np.array([["b"]]))
    else:
        bad.write_bytes(content)
    make_folder(tmp_path / "a", 2, 0)
    common = ["--weights", weights_file, "--device", "cpu"]
    assert expected in cli_error(capsys, tmp_path / "a", "--ref", bad, *common)
    assert expected in cli_error(capsys, tmp_path / "a", bad, *common)     # after a folder: still first


# ------------------------------------------------------------------ loss plot

def test_plot_losses_writes_png_with_blank_cells(tmp_path, capsys):
    rows = ["step,epoch,loss_D,loss_G,D(x),D(G(z)),val_loss"]
    for step in range(1, 41):
        val = f"{1.5 - step / 100:.3f}" if step % 10 == 0 else ""                 # only some rows
        rows.append(f"{step},{step // 10},{1.3 - step / 80:.4f},{0.9 + step / 50:.4f},"
                    f"{0.5 + step / 100:.3f},{0.5 - step / 100:.3f},{val}")
    (tmp_path / "losses.csv").write_text("\n".join(rows) + "\n")
    png = metrics.plot_losses(tmp_path / "losses.csv", tmp_path / "losses.png")
    with Image.open(png) as img:                         # a loss panel and a D(.) panel
        assert img.size == (metrics.PLOT_W, 2 * metrics.PANEL_H) and img.mode == "RGB"
        assert len(img.getcolors(1 << 16)) > 10          # something was drawn
    run_cli(capsys, "--plot", tmp_path / "losses.csv")   # the CLI redraws beside the csv
    assert (tmp_path / "losses.png").is_file()


def test_plot_losses_of_a_header_only_csv_draws_an_empty_panel(tmp_path):
    # the training scripts redraw at every epoch end; a run stopped before its first log row has
    # only the header, and that must not crash the script
    (tmp_path / "losses.csv").write_text("step,epoch,loss_D,loss_G\n")
    png = metrics.plot_losses(tmp_path / "losses.csv", tmp_path / "losses.png")
    with Image.open(png) as img:
        assert img.size == (metrics.PLOT_W, metrics.PANEL_H)


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist"),
    ("folder", "is a folder"),
    ("binary", "cannot be read as a CSV text file"),
    ("empty", "has no rows of numbers"),
    ("header_only", "has no rows of numbers"),
    ("text", "has no rows of numbers"),                          # rows, but no numbers
    ("png_is_a_folder", "cannot write the plot"),
])
def test_cli_plot_errors_are_one_sentence(case, expected, tmp_path, capsys):
    csv_path = tmp_path / "losses.csv"
    contents = {"binary": bytes(range(256)) * 4, "empty": b"", "header_only": b"step,epoch,loss_D\n",
                "text": b"hello world\nnot a losses file\n", "png_is_a_folder": b"step,epoch,loss\n1,0,0.5\n"}
    if case == "folder":
        csv_path.mkdir()
    elif case in contents:
        csv_path.write_bytes(contents[case])
    if case == "png_is_a_folder":
        (tmp_path / "losses.png").mkdir()
    assert expected in cli_error(capsys, "--plot", csv_path)
    assert not (tmp_path / "losses.png").is_file() and not list(tmp_path.glob("*.tmp"))   # nothing drawn


# ------------------------------------------------------------------ evaluation during training (TrainingEval)

def in_batches(images):
    """A set function as the scripts pass them: fn(i, count, g) -> images i .. i + count - 1 (float, [-1, 1])."""
    return lambda i, count, g: images[i:i + count].clone()


def folder_images(folder):
    """The PNGs of a folder as float images in [-1, 1] (exactly their pixels: (u8 / 127.5 - 1))."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in sorted(folder.glob("*.png"))]).float() / 127.5 - 1


def eval_rows(out):
    with open(out / "eval.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("channels", [1, 3])
def test_training_eval_equals_the_cli_on_the_pngs_that_sample_writes(channels, small_network, weights_file,
                                                                       tmp_path, capsys):
    r = make_folder(tmp_path / "r", 12, 0, size=16, mode="L" if channels == 1 else "RGB")
    g = torch.Generator().manual_seed(channels)
    samples = torch.rand(10, channels, 16, 16, generator=g) * 2.2 - 1.1    # outside [-1, 1] too: clamped
    near = folder_images(r)[:10, :channels]                                # the reference's, plus noise
    recon = near + 0.05 * torch.randn(near.shape, generator=g)
    ev = metrics.TrainingEval(str(r), 10, tmp_path / "run", weights=weights_file, device="cpu",
                              data_root=tmp_path / "data", sets=("samples", "recon"), batch_size=4)
    ev.evaluate(7, 1, {"samples": in_batches(samples), "recon": in_batches(recon)})
    assert capsys.readouterr().out.startswith("eval step 7 (epoch 1, 10 images, ")     # the log line
    data.write_pngs(samples, tmp_path / "samples")            # what --sample and --recon-samples write
    data.write_pngs(recon, tmp_path / "recon_samples")
    res = json.loads(run_cli(capsys, tmp_path / "samples", tmp_path / "recon_samples", "--ref", r, "--json",
                             "--batch-size", 4, "--weights", weights_file, "--device", "cpu").out)
    row = eval_rows(tmp_path / "run")[0]
    assert list(row) == ["step", "epoch", "n"] + [p + c for p in ("", "recon_") for c in metrics.EVAL_KEYS] + \
        ["seconds"]
    assert (row["step"], row["epoch"], row["n"]) == ("7", "1", "10") and float(row["seconds"]) > 0
    for prefix, folder in (("", "samples"), ("recon_", "recon_samples")):
        cli = res[str(tmp_path / folder)]
        for column, key in metrics.EVAL_KEYS.items():
            assert cli[key] is not None
            assert ev.last[prefix + column] == pytest.approx(cli[key], rel=1e-6), (prefix, column)
            assert float(row[prefix + column]) == pytest.approx(cli[key], rel=1e-5)   # 6 digits in the csv


def test_training_eval_log_best_checkpoint_and_resume(small_network, weights_file, tmp_path):
    r = make_folder(tmp_path / "r", 12, 0)
    good = folder_images(r)                                       # the reference's own images: FID ~ 0
    bad = folder_images(make_folder(tmp_path / "b", 12, 3))       # much brighter noise
    kw = dict(weights=weights_file, device="cpu", data_root=tmp_path / "data")
    out = tmp_path / "run"
    ev = metrics.TrainingEval(str(r), 12, out, **kw)
    assert [ev.evaluate(10, 1, {"samples": in_batches(bad)}), ev.evaluate(20, 2, {"samples": in_batches(good)}),
            ev.evaluate(30, 3, {"samples": in_batches(bad)})] == [True, True, False]
    rows = eval_rows(out)
    fid = [float(row["fid"]) for row in rows]
    assert [row["step"] for row in rows] == ["10", "20", "30"] and fid[1] < 0.01 * fid[0]
    assert fid[2] == pytest.approx(fid[0], rel=1e-5)                # the same images, the same numbers
    with Image.open(out / "eval.png") as img:                     # FID, KID, IS, P/R, Laplacian var.
        img.verify()
        assert img.format == "PNG" and img.size == (metrics.PLOT_W, 5 * metrics.PANEL_H)
    # Resume from a checkpoint of step 20: row 30 (logged after it) goes, the best is step 20's.
    ev = metrics.TrainingEval(str(r), 12, out, after_step=20, **kw)
    assert [row["step"] for row in eval_rows(out)] == ["10", "20"] and ev.best == fid[1]
    assert ev.evaluate(30, 3, {"samples": in_batches(bad)}) is False
    # Resume from step 10: the best is step 10's FID, which the good images beat.
    ev = metrics.TrainingEval(str(r), 12, out, after_step=10, **kw)
    assert [row["step"] for row in eval_rows(out)] == ["10"] and ev.best == fid[0]
    assert ev.evaluate(20, 2, {"samples": in_batches(good)}) is True
    assert [row["step"] for row in eval_rows(out)] == ["10", "20"]
    metrics.TrainingEval(str(r), 12, out, **kw)                   # a new run: a new log
    assert eval_rows(out) == []


def test_training_eval_statistics_reference_gives_fid_only_and_notes_once(small_network, weights_file, tmp_path,
                                                                          capsys):
    r = make_folder(tmp_path / "r", 12, 0)
    run_cli(capsys, r, "--save-stats", tmp_path / "r.npz", "--weights", weights_file, "--device", "cpu")
    images = folder_images(make_folder(tmp_path / "a", 10, 1))
    ev = metrics.TrainingEval(str(tmp_path / "r.npz"), 10, tmp_path / "run", weights=weights_file, device="cpu")
    for step in (5, 10):
        ev.evaluate(step, step // 5, {"samples": in_batches(images)})
    err = capsys.readouterr().err
    for row in eval_rows(tmp_path / "run"):
        assert [row[k] for k in ("kid", "kid_std", "precision", "recall")] == [""] * 4
        assert float(row["fid"]) > 0 and float(row["is"]) >= 1 and float(row["lapvar"]) > 0
    assert err.count("note: the reference is statistics only") == 1
    assert err.count("warning: samples has 10 images, fewer than 2048") == 1     # once per run, not per epoch
    with Image.open(tmp_path / "run" / "eval.png") as img:                       # FID, IS, Laplacian var.
        assert img.size == (metrics.PLOT_W, 3 * metrics.PANEL_H)


def test_training_eval_dataset_reference_is_computed_once_and_cached(monkeypatch, small_network, weights_file,
                                                                    tmp_path, capsys):
    monkeypatch.setitem(data.FAKE_SIZE, "test", 24)             # a small fake:test
    kw = dict(weights=weights_file, device="cpu", data_root=tmp_path / "data")
    first = metrics.TrainingEval("fake:test", 10, tmp_path / "run", **kw)
    assert (tmp_path / "data" / "cache" / "fid_stats_fake-test_24.npz").is_file()
    capsys.readouterr()
    again = metrics.TrainingEval("fake:test", 10, tmp_path / "run", **kw)
    assert "reference statistics and features from" in capsys.readouterr().err
    assert np.array_equal(again.ref["features"], first.ref["features"]) and len(first.ref["features"]) == 24


def test_training_eval_bad_reference_or_no_network_fails_before_any_work(no_feature_pass, weights_file,
                                                                         monkeypatch, tmp_path, capsys):
    a = make_folder(tmp_path / "a", 2, 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.npy").write_text("not features")
    cheap = [str(tmp_path / "absent.npy"), str(tmp_path / "absent.npz"), "nowhere", "mnist:valid"]
    for ref in cheap + [str(tmp_path / "empty"), str(tmp_path / "text.npy")]:
        with pytest.raises(metrics.MetricsError) as err:
            metrics.TrainingEval(ref, 10, tmp_path / "run", weights=weights_file, device="cpu")
        # the sentence of `metrics.py SAMPLES --ref REF`
        assert cli_error(capsys, a, "--ref", ref, "--weights", weights_file, "--device", "cpu") == f"error: {err.value}"
        if ref in cheap:                                          # the scripts' check_args: nothing read
            with pytest.raises(metrics.MetricsError, match=str(err.value).split(" ")[0]):
                metrics.check_set(ref)
    for ref in (str(a), str(tmp_path / "empty"), "mnist", "cifar10:test", "fake:train"):
        metrics.check_set(ref)
    with pytest.raises(metrics.MetricsError, match="at least 2 images"):
        metrics.TrainingEval(str(a), 1, tmp_path / "run", weights=weights_file, device="cpu")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))               # offline, no weights (see the test above)
    monkeypatch.setattr(metrics, "FID_WEIGHTS_URL", "http://127.0.0.1:9/" + metrics.FID_WEIGHTS_FILE)
    with pytest.raises(metrics.MetricsError) as err:
        metrics.TrainingEval(str(a), 10, tmp_path / "run", device="cpu")
    assert cli_error(capsys, a, "--device", "cpu") == f"error: {err.value}"
    assert not (tmp_path / "run").exists()                        # no eval.csv started


def test_training_eval_keeps_one_batch_without_grad_tf32_or_the_global_rng(small_network, weights_file, tmp_path):
    r = make_folder(tmp_path / "r", 12, 0)
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    ev = metrics.TrainingEval(str(r), 10, tmp_path / "run", weights=weights_file, device="cpu", batch_size=4)
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    made, seen = [], []
    handle = ev.net().register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    gen = torch.Generator().manual_seed(0)

    def make(i, count, g):
        assert all(ref() is None for ref in made)                 # every earlier batch was let go
        assert not torch.is_grad_enabled() and flags() == (False, False)
        x = torch.rand(count, 3, 12, 12, generator=gen) * 2 - 1   # its own generator
        made.append(weakref.ref(x))
        return x

    saved = flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True    # as a training script may
    try:
        ev.evaluate(1, 1, {"samples": make})            # neither it nor the set-up moved the global RNGs
        assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
        assert random.getstate() == rng[2] and flags() == (True, True)
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert len(made) == 3 and seen == [4, 4, 2]                  # 10 images, 4 at a time
