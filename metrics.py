"""metrics.py: Inception Score, FID, KID, precision/recall and Laplacian variance of image sets; loss plots.

Each number is defined exactly as the reference tool that published tables use computes it:

* FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
  arXiv:1706.08500) as mseitzer/pytorch-fid computes it: pool3 features of the TensorFlow Inception graph
  ported to PyTorch, mean and np.cov (N-1) in float64, Frechet distance with scipy.linalg.sqrtm.
* IS (Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498) as toshas/torch-fidelity
  computes it: the same network's 1008-way logits without the fc bias, 10 splits of a fixed (seed 2020) shuffle.
* KID (Binkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401) as torch-fidelity: the unbiased MMD^2
  with the kernel (x.y / d + 1)^3 on the pool3 features, 100 random subsets of 1,000 per set (seed 2020).
* Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models", arXiv:1904.06991) as torch-fidelity, k = 3, on the pool3 features (torch-fidelity's
  default features are VGG-16's, so its default numbers differ).
* Laplacian variance (sharpness; the VAE/GAN/VAE-GAN reports' blur measure) as OpenCV's
  cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var(), per image, averaged.

One feature pass gives all of them, through pytorch-fid's input pipeline (PyTorch bilinear resize to 299,
2x - 1); torch-fidelity resizes like TF 1.x and scales by (x - 128) / 128, so its IS can differ in the last
digits. A set is an image folder, a dataset name of data.py (mnist, ...), a features file (.npy, N x 2048
pool3 features from --save-features: no IS or Laplacian variance) or a statistics file (.npz with mu and
sigma, pytorch-fid's format: FID only).

    python metrics.py runs/dcgan-cifar10/samples --ref cifar10      # IS, FID, KID, P/R, Laplacian var.
    python metrics.py runs/vae_conv-mnist/samples runs/vaegan-mnist/samples --ref mnist --json
    python metrics.py my_images/ --save-features my_feats.npy         # a reusable reference
    python metrics.py my_images/ --save-stats my_stats.npz            # FID statistics (pytorch-fid's)
    python metrics.py runs/vae_conv-mnist/samples --lapvar-only       # no network needed
    python metrics.py --plot runs/dcgan-mnist/losses.csv              # redraw losses.png
"""
import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import linalg
import torchvision.utils as vutils
from torchvision.models import inception as tv_inception

import data

# pytorch-fid src/pytorch_fid/inception.py: FID_WEIGHTS_URL (TF inception-2015-12-05 ported to PyTorch)
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_DIMS = 2048             # pool3 features; fewer images than this -> rank-deficient covariance
IS_SPLITS = 10              # torch-fidelity defaults.py: isc_splits=10, samples_shuffle=True, rng_seed=2020
IS_SEED = 2020
KID_SUBSETS = 100           # torch-fidelity defaults.py: kid_subsets=100, kid_subset_size=1000, rng_seed=2020
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
PR_K = 3                    # torch-fidelity defaults.py: prc_neighborhood=3 (Kynkaenniemi et al.'s k)
PR_BLOCK = 2048             # feature vectors per block of the precision/recall distances (memory bound)


class MetricsError(ValueError):
    """An expected failure; str(e) is one plain sentence for the user."""


_shown_notes = None     # inside _each_note_once: the set of notes printed so far


def note(msg):
    if _shown_notes is not None:
        if msg in _shown_notes:
            return
        _shown_notes.add(msg)
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _each_note_once(shown):
    """Inside: a note already in the set shown is not printed again (TrainingEval: once per run)."""
    global _shown_notes
    saved, _shown_notes = _shown_notes, shown
    try:
        yield
    finally:
        _shown_notes = saved


@contextlib.contextmanager
def evaluating(*nets, exact=None):
    """Inside: nets in eval mode, no gradients; exact=device: plain float32 there too (no autocast, no TF32
    matmuls or convolutions), for a number that must not move with the device. All comes back after."""
    modes, tf32 = [n.training for n in nets], (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for n in nets:
        n.eval()
    if exact is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    off = torch.autocast(torch.device(exact).type, enabled=False) if exact is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), off:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for n, mode in zip(nets, modes):
            n.train(mode)


# ------------------------------------------------------------------ the FID Inception network
# pytorch-fid fid_inception_v3(): torchvision's Inception v3 with 1008 classes and four kinds of
# block patched so that the network computes what the TensorFlow graph computes.

def _branch_pool(x, kind):
    if kind == "avg":   # pytorch-fid FIDInceptionA/C/E_1: TF's average pool ignores the zero padding
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    # pytorch-fid FIDInceptionE_2: the TF graph's last block max-pools here
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(tv_inception.InceptionA):
    def _forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [b1, b5, b3, self.branch_pool(_branch_pool(x, "avg"))]


class FIDInceptionC(tv_inception.InceptionC):
    def _forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return [b1, b7, bd, self.branch_pool(_branch_pool(x, "avg"))]


class FIDInceptionE(tv_inception.InceptionE):
    """pytorch-fid FIDInceptionE_1 (pool="avg", Mixed_7b) and FIDInceptionE_2 (pool="max", Mixed_7c)."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return [b1, b3, bd, self.branch_pool(_branch_pool(x, self.pool))]


def resize_299(x):
    """pytorch-fid InceptionV3.forward (resize_input): bilinear to 299 x 299, align_corners=False."""
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


class InceptionFID(tv_inception.Inception3):
    """Images in [0, 1] -> (pool3 features N x 2048, logits without fc bias N x 1008). The modules of
    torchvision's inception_v3(aux_logits=False, num_classes=1008): its state_dict keys are the weight file's."""

    FEATURES = FID_DIMS                                          # pool3: what FID, KID and P/R compare

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def forward(self, x):                                        # N x 3 x H x W in [0, 1]
        x = 2 * resize_299(x) - 1                                # N x 3 x 299 x 299 in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.maxpool1(x)                                     # N x 64 x 73 x 73
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))   # N x 192 x 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,    # -> N x 288 x 35 x 35
                      self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,    # -> N x 768 x 17 x 17
                      self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):   # -> N x 2048 x 8 x 8
            x = block(x)
        pool3 = torch.flatten(self.avgpool(x), 1)                # N x 2048 (FID)
        logits = pool3 @ self.fc.weight.T                        # N x 1008: torch-fidelity "logits_unbiased" (IS)
        return pool3, logits


def weights_path(weights=None):
    """--weights PATH, else torch.hub's cache, else download into that cache (short timeout)."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise MetricsError(f"the weights file {weights} does not exist; pass the path of "
                               f"{FID_WEIGHTS_FILE} (from {FID_WEIGHTS_URL}) with --weights")
        return str(weights)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        note(f"downloading the FID Inception weights from {FID_WEIGHTS_URL}")
        with data.download_timeout():
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, progress=True)  # temp file + rename
    except Exception as e:  # noqa: BLE001  (URLError, timeout, HTTP errors: all mean "not available")
        raise MetricsError(f"the FID Inception weights are not in the cache {cached} and could not be "
                           f"downloaded from {FID_WEIGHTS_URL} ({e.__class__.__name__}); download that "
                           f"file to {cached} or pass its path with --weights PATH") from None
    return cached


def load_inception(weights=None, device="cpu"):
    """The FID Inception network with the pytorch-fid weights, in eval mode on device."""
    path = weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, not a PyTorch file, pickled code)
        raise MetricsError(f"{path} cannot be read as a PyTorch weights file ({e.__class__.__name__}); "
                           f"download {FID_WEIGHTS_URL} again") from None
    with torch.random.fork_rng(devices=[]):   # its random init (overwritten below) must not move the
        model = InceptionFID()                # caller's RNG: a training script's stream stays its own
    if not isinstance(state, dict):
        raise MetricsError(f"{path} does not hold a state dict; it is not {FID_WEIGHTS_FILE}")
    own = model.state_dict()
    # Files saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked (unused in eval mode); every
    # other key must match exactly.
    state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise MetricsError(f"{path} is not the FID Inception weight file {FID_WEIGHTS_FILE}: {len(missing)} keys "
                           f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetricsError(f"{path} has tensors of the wrong shape for the FID Inception network "
                           f"({str(e).splitlines()[-1].strip()})") from None
    model.requires_grad_(False).eval().to(device)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


# ------------------------------------------------------------------ one pass over a set of images

def _batches(source, batch_size, skipped):
    """Yield uint8 batches: B x C x H x W tensors of a tensor source (where it is: one copy a batch), lists of
    C x H x W tensors read from files; unreadable files are appended to skipped."""
    for start in range(0, len(source), batch_size):
        chunk = source[start:start + batch_size]
        if isinstance(chunk, torch.Tensor):
            yield chunk
            continue
        images = []
        for path in chunk:
            try:
                images.append(data.read_image(path, channels=3))
            except data.DataError:
                skipped.append(path)
        if images:
            yield images


def _model_input(images, device):
    """uint8 C x H x W images -> N x 3 x H x W float in [0, 1] on device, as pytorch-fid's PIL .convert("RGB")
    + ToTensor (gray replicated). One host -> device copy of the batch's uint8 pixels (one per image would make
    a GPU wait on many small transfers); images of different sizes are each resized to 299 x 299 there."""
    if isinstance(images, torch.Tensor):                                   # B x C x H x W, one size
        x = images.to(device).float().div(255).expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last if x.is_cuda else torch.contiguous_format)
    shapes = [im.shape for im in images]
    pixels = torch.cat([im.reshape(-1) for im in images]).to(device)
    xs = [p.view(shape).float().div(255).expand(3, -1, -1).unsqueeze(0)
          for p, shape in zip(pixels.split([s.numel() for s in shapes]), shapes)]
    if any(shape != shapes[0] for shape in shapes):
        xs = [resize_299(x) for x in xs]
    x = torch.cat(xs)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def compute_features(source, model=None, batch_size=50, device="cpu", lapvar=False, name="images",
                     progress=True):
    """One pass over source (uint8 N x C x H x W with C = 1 or 3, a list of image paths, or a folder):
    {n, pool3 (n x 2048 float64) and logits (n x 1008 float32) if model, lapvar (n float64) if lapvar, else
    None, skipped (unreadable files, left out with a warning)}."""
    if isinstance(source, (str, pathlib.Path)):
        source = data.list_images(source)
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(source, torch.Tensor) and (source.dtype != torch.uint8 or source.dim() != 4
                                             or source.shape[1] not in (1, 3)):
        raise MetricsError(f"{name}: expected uint8 images N x C x H x W with C = 1 or 3, "
                           f"got {source.dtype} {tuple(source.shape)}")
    device = torch.device(device)
    pool3, logits, lap, skipped, sizes = [], [], [], [], set()
    done, t0, last_print = 0, time.time(), 0.0
    show = progress and model is not None
    with torch.inference_mode(), evaluating(exact=device):
        for images in _batches(source, batch_size, skipped):
            if len(sizes) < 2:
                sizes.update([tuple(images.shape[2:])] if isinstance(images, torch.Tensor) else
                             (tuple(im.shape[1:]) for im in images))
                if len(sizes) > 1:
                    (h1, w1), (h2, w2) = sorted(sizes)[:2]
                    note(f"note: {name} has images of different sizes ({h1}x{w1}, {h2}x{w2}, ...); "
                         f"each is resized to 299x299 on its own")
            if model is not None:
                p, lg = model(_model_input(images, device))
                pool3.append(p.cpu().double().numpy())        # float64 on the CPU: MPS has none
                logits.append(lg.cpu().float().numpy())
            if lapvar:
                lap.append(laplacian_variance(images))
            done += len(images)
            if show and time.time() - last_print > 1.0:
                last_print = time.time()
                print(f"\r{name}: {done}/{len(source)} images, {done / (last_print - t0):.1f} images/s",
                      end="", file=sys.stderr, flush=True)
    if show:
        elapsed = max(time.time() - t0, 1e-9)
        print(f"\r{name}: {done} images in {elapsed:.1f} s ({done / elapsed:.1f} images/s)", file=sys.stderr)
    if skipped:
        note(f"warning: skipped {len(skipped)} unreadable file(s) of {name}, e.g. {skipped[0]}")
    if done == 0:
        raise MetricsError(f"{name} has no readable images")
    return {"n": done, "skipped": skipped,
            "pool3": np.concatenate(pool3) if pool3 else None,
            "logits": np.concatenate(logits) if logits else None,
            "lapvar": np.concatenate(lap) if lap else None}


# ------------------------------------------------------------------ FID

def stats_from_features(pool3):
    """pytorch-fid calculate_activation_statistics: mu = mean over images, sigma = np.cov (N-1)."""
    act = np.asarray(pool3, dtype=np.float64)
    if act.ndim != 2 or act.shape[0] < 2:
        raise MetricsError(f"a covariance needs at least 2 feature vectors, got shape {act.shape}")
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID eq. in Heusel et al.
    2017), step by step as pytorch-fid calculate_frechet_distance:

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"the two sets' statistics have different dimensions "
                           f"(mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape})")
    diff = mu1 - mu2
    # pytorch-fid calls sqrtm(..., disp=False) (deprecated, removed in SciPy 1.18) and then checks
    # finiteness itself; here the same check, with sqrtm's singular-matrix warning silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():      # product (almost) singular: retry with eps on the diagonal
            note(f"warning: fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):                # numerical error may leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f"the matrix square root in the FID has an imaginary component of "
                               f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are too "
                               f"ill-conditioned: use more images")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------ Inception Score

def inception_score(logits, splits=IS_SPLITS, shuffle=True, seed=IS_SEED):
    """(mean, std) of IS = exp(E_x KL(p(y|x) || p(y))) over splits, as torch-fidelity isc_features_to_metric:
    rows shuffled by np.random.RandomState(2020).permutation, float64 softmax over all 1008 classes, split i =
    rows [i*N//splits, (i+1)*N//splits), p(y) = the split's mean of p(y|x), std with ddof=0 (as np.std and
    Salimans et al.'s code)."""
    logits = torch.as_tensor(np.asarray(logits)).double()
    n = logits.shape[0]
    if logits.dim() != 2 or n < splits:
        raise MetricsError(f"the Inception Score with {splits} splits needs at least {splits} images, got {n}")
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_py = p[rows].mean(dim=0, keepdim=True).log()                # log p(y) of this split
        kl = (p[rows] * (log_p[rows] - log_py)).sum(dim=1)             # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------ KID, precision and recall
# Both compare two sets of pool3 feature vectors: "features" (the set being evaluated, e.g.
# generated images; torch-fidelity's input1) and "ref_features" (the reference; input2).

def _check_feature_pair(features, ref_features):
    shapes = np.shape(features), np.shape(ref_features)
    if len(shapes[0]) != 2 or len(shapes[1]) != 2 or shapes[0][1] != shapes[1][1]:
        raise MetricsError(f"the two sets' features must be N x d with the same d, got shapes "
                           f"{shapes[0]} and {shapes[1]}")


def kernel_inception_distance(features, ref_features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                              seed=KID_SEED):
    """(mean, std) of KID as torch-fidelity kid_features_to_metric: the unbiased MMD^2 with the kernel k(x, y) =
    (x.y / d + 1)^3 on each of `subsets` pairs of random subsets of subset_size vectors per set, in float64
    (np.random.RandomState(seed).choice without replacement, the set's subset first), std with ddof=0 (np.std).
    A set smaller than subset_size makes the subsets that size (torch-fidelity refuses), with a note."""
    _check_feature_pair(features, ref_features)
    n, n_ref, d = len(features), len(ref_features), np.shape(features)[1]
    m = min(subset_size, n, n_ref)
    if m < 2:
        raise MetricsError(f"KID needs at least 2 feature vectors per set, got {n} and {n_ref}")
    if m < subset_size:
        note(f"note: KID uses subsets of {m} feature vectors, not {subset_size}: a set has only "
             f"{m} (torch-fidelity refuses this; the estimate is noisier)")
    rng = np.random.RandomState(seed)
    mmd2 = []
    for _ in range(subsets):
        x = np.asarray(features[rng.choice(n, m, replace=False)], dtype=np.float64)      # m x d
        y = np.asarray(ref_features[rng.choice(n_ref, m, replace=False)], dtype=np.float64)
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))  # k = (a.b / d + 1)^3
        # MMD_u^2 = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
        #           - 2 sum_{i, j} k(x_i, y_j) / m^2
        mmd2.append((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                    - 2 * k_xy.sum() / (m * m))
    return float(np.mean(mmd2)), float(np.std(mmd2))


@evaluating(exact="cpu")  # no TF32 in the distances (a flag of CUDA's; autocast off)
def knn_radii(features, k=PR_K, block=PR_BLOCK, device="cpu"):
    """||phi - NN_k(phi)|| for each row phi of features: the distance to its k-th nearest neighbour in the same
    set (Kynkaenniemi et al. 2019). Float32 distances (torch.cdist), as torch-fidelity on its float32 features,
    block x (block + k + 1) at a time: the k + 1 smallest so far are kept while the columns pass in blocks."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    if len(x) <= k:
        raise MetricsError(f"precision and recall with k = {k} need more than {k} feature vectors per set, "
                           f"got {len(x)}")
    radii = []
    for rows in x.split(block):
        smallest = rows.new_empty(len(rows), 0)
        for cols in x.split(block):
            both = torch.cat([smallest, torch.cdist(rows, cols)], dim=1)
            smallest = both.topk(min(k + 1, both.shape[1]), dim=1, largest=False).values
        radii.append(smallest[:, k])          # the (k+1)-th smallest: the nearest is phi itself, at 0
    return torch.cat(radii)


@evaluating(exact="cpu")
def precision_recall(features, ref_features, k=PR_K, block=PR_BLOCK, device="cpu", ref_radii=None):
    """(precision, recall) of Kynkaenniemi et al. 2019 with k nearest neighbours, as torch-fidelity
    prc_features_to_metric (there on VGG-16 features by default), distances block x block (see knn_radii).
    ref_radii: knn_radii of ref_features, when already computed (several sets against one reference)."""
    _check_feature_pair(features, ref_features)
    radii = knn_radii(features, k, block, device)
    ref_radii = knn_radii(ref_features, k, block, device) if ref_radii is None else ref_radii.to(device)
    fake = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    real = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
    for i in range(0, len(fake), block):
        for j in range(0, len(real), block):
            dist = torch.cdist(fake[i:i + block], real[j:j + block])
            # f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi')|| for at least one phi' in Phi
            fake_in_real[i:i + block] |= (dist <= ref_radii[j:j + block]).any(dim=1)
            real_in_fake[j:j + block] |= (dist <= radii[i:i + block, None]).any(dim=0)
    precision = fake_in_real.double().mean().item()     # 1/|Phi_g| sum over phi_g of f(phi_g, Phi_r)
    recall = real_in_fake.double().mean().item()        # 1/|Phi_r| sum over phi_r of f(phi_r, Phi_g)
    return precision, recall


# ------------------------------------------------------------------ Laplacian variance

# OpenCV 4 cvtColor RGB2GRAY for 8-bit images (color_rgb.simd.hpp, RGB2Gray<uchar>): ITU-R 601
# luma in 15-bit fixed point, rounded half up: Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15.
# (OpenCV 3 used 14 bits, 4899/9617/1868; a few pixels can differ by 1.) Gray stays gray exactly.
LUMA_15BIT = (9798, 19235, 3735)
LAPLACIAN_3X3 = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], dtype=torch.float64)


def laplacian_variance(images_uint8):
    """Per-image variance of the Laplacian of the 8-bit luma, float64 (N,): OpenCV's cv2.Laplacian(gray,
    cv2.CV_64F).var() (ksize=1: kernel [[0,1,0],[1,-4,1],[0,1,0]], BORDER_DEFAULT = reflect-101, population
    variance) of uint8 N x C x H x W or N x H x W (C = 1 or 3), or of a list of C x H x W images of any sizes."""
    if isinstance(images_uint8, (list, tuple)):
        return np.concatenate([laplacian_variance(im.unsqueeze(0) if isinstance(im, torch.Tensor)
                                                  else np.asarray(im)[None]) for im in images_uint8])
    x = images_uint8 if isinstance(images_uint8, torch.Tensor) else torch.from_numpy(np.array(images_uint8))
    if x.dtype != torch.uint8:
        raise MetricsError(f"laplacian_variance needs 8-bit images, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.cpu().to(torch.int32)                                         # float64 below: MPS has none
    if x.shape[1] == 3:
        r, g, b = LUMA_15BIT
        x = (r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3] + (1 << 14)) >> 15
    gray = x.double()                                                   # N x 1 x H x W
    mode = "reflect" if min(gray.shape[-2:]) > 1 else "replicate"       # reflect-101 (gfedcb|abcdefgh|gfedcba)
    lap = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode=mode), LAPLACIAN_3X3.view(1, 1, 3, 3))
    return lap.flatten(1).var(dim=1, unbiased=False).numpy()            # numpy .var(): ddof=0


# ------------------------------------------------------------------ sets: folder, .npz, .npy or dataset

STAT_KEYS = ("n", "is_mean", "is_std", "lapvar", "lapvar_std", "weights_sha256")   # stored beside mu and sigma


def load_stats(path, with_features=False):
    """A statistics .npz (pytorch-fid's format: mu, sigma; ours adds n, IS and Laplacian var.).
    with_features: also its pool3 features (N x d float32, in the reference cache only), if any."""
    expected = "give a file written by metrics.py --save-stats or pytorch-fid --save-stats"
    # A .npz is a zip archive of .npy arrays. For anything else (empty, text, a .npy, a truncated
    # download) np.load would try .npy and pickle formats and fail with misleading messages.
    if not zipfile.is_zipfile(path):
        raise MetricsError(f"{path} is not a .npz file (a zip archive of arrays); {expected}")
    try:
        with np.load(path, allow_pickle=False) as f:           # a member that is no .npy: bytes
            arrays = {k: np.asarray(f[k]) for k in f.files if k != "features" or with_features}
    except (OSError, ValueError, zipfile.BadZipFile) as e:     # ValueError: pickled object arrays
        raise MetricsError(f"{path} cannot be read as a .npz statistics file ({data._reason(e, strerror=True)}); "
                           f"{expected}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise MetricsError(f"{path} has no 'mu' and 'sigma' arrays (it has {sorted(arrays)}); "
                           f"it is not a pytorch-fid statistics file")
    try:
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    except (TypeError, ValueError):
        raise MetricsError(f"{path}: mu and sigma are not numbers ({arrays['mu'].dtype}, "
                           f"{arrays['sigma'].dtype}); it is not a pytorch-fid statistics file") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise MetricsError(f"{path}: mu has shape {mu.shape} but sigma has shape {sigma.shape}; "
                           f"expected (d,) and (d, d)")
    _check_dims(mu.size, path, "statistics")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsError(f"{path} holds NaN or inf statistics; compute them again with metrics.py --save-stats")
    stats = {"mu": mu, "sigma": sigma}
    stats.update({k: arrays[k].item() for k in STAT_KEYS if k in arrays})
    if "features" in arrays:
        stats["features"] = _checked_features(arrays["features"], path)
    return stats


def save_stats(path, stats, with_features=False):
    """Write stats as a .npz (pytorch-fid's mu and sigma, and ours), atomically; with_features: the pool3
    features too (the reference cache: KID and precision/recall need them)."""
    keys = ("mu", "sigma") + STAT_KEYS + (("features",) if with_features else ())
    arrays = {k: v for k, v in stats.items() if v is not None and k in keys}
    _write_atomically(path, lambda f: np.savez(f, **arrays), "the statistics file")


def _checked_features(features, path):
    """features as float32 N x d (lossless: the network computes in float32), or a MetricsError."""
    if not isinstance(features, np.ndarray) or features.ndim != 2 or features.dtype.kind != "f":
        what = f"{features.dtype} {features.shape}" if isinstance(features, np.ndarray) else "no single array"
        raise MetricsError(f"{path} holds {what}, not float features N x d; give a file written by "
                           f"metrics.py --save-features")
    _check_dims(features.shape[1], path, "features")
    if len(features) < 2:
        raise MetricsError(f"{path} holds {len(features)} feature vector(s); FID, KID and precision/recall "
                           f"need at least 2")
    if not np.isfinite(features).all():
        raise MetricsError(f"{path} holds NaN or inf values; compute the features again with "
                           f"metrics.py --save-features")
    return features.astype(np.float32, copy=False)


def _check_dims(d, path, what):
    """A reference of another size is refused when it is opened, not after the feature pass over the samples."""
    if d != InceptionFID.FEATURES:
        raise MetricsError(f"{path} holds {d}-dimensional {what}, but the FID Inception network's pool3 "
                           f"features are {InceptionFID.FEATURES}-dimensional; give a file written by metrics.py "
                           f"--save-features or --save-stats (or pytorch-fid --dims {InceptionFID.FEATURES})")


def load_features(path):
    """A features file (.npy, N x d, written by --save-features): a set's pool3 features."""
    if not os.path.isfile(path):
        raise MetricsError(f"features file {path} does not exist")
    try:
        features = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:                 # text, empty, pickled objects
        raise MetricsError(f"{path} cannot be read as a .npy features file ({data._reason(e, strerror=True)}); "
                           f"give a file written by metrics.py --save-features") from None
    if isinstance(features, np.lib.npyio.NpzFile):               # a .npz renamed: "no single array"
        features.close()
        features = None
    return _checked_features(features, path)


def save_features(path, features):
    """Write a set's pool3 features as a float32 .npy (N x d), atomically."""
    _write_atomically(path, lambda f: np.save(f, np.asarray(features, dtype=np.float32)), "the features file")


def _write_atomically(path, write, what):
    """write(file object) into a temporary file, renamed onto path: a crash never leaves a torn file. A full
    disk (found only now) gives a MetricsError, and the temporary file is removed."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise MetricsError(f"cannot write {what} {path} ({data._reason(e, strerror=True)})") from None


def check_writable(path, what):
    """An output path that cannot be written, found before the work: path is no folder, its nearest existing
    ancestor is one, and a file can be created there (tried and removed: permission bits say nothing to root)."""
    path = pathlib.Path(path).absolute()
    if path.is_dir():
        raise MetricsError(f"cannot write {what} to {path}: it is a folder; give a file name")
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise MetricsError(f"cannot write {what} to {path}: {folder} is a file, not a folder")
    try:
        tempfile.NamedTemporaryFile(dir=folder).close()
    except OSError as e:
        raise MetricsError(f"cannot write {what} to {path} ({data._reason(e, strerror=True)}); "
                           f"choose another path") from None


def _first_n(items, spec, args, what):
    """--n: the first N images (or feature vectors) of a set."""
    if args.n is not None and len(items) < args.n:
        note(f"note: {spec} has {len(items)} {what}, fewer than --n {args.n}; using all")
    return items[:args.n] if args.n is not None else items


def check_set(spec):
    """What spec names, from its name alone (no file read, no network loaded: check_args calls it for
    --eval-ref): "npz", "features", "folder" or "dataset", else a MetricsError."""
    if spec.endswith(".npz"):
        if not os.path.isfile(spec):
            raise MetricsError(f"statistics file {spec} does not exist")
        return "npz"
    if spec.endswith(".npy"):
        if not os.path.isfile(spec):
            raise MetricsError(f"features file {spec} does not exist")
        return "features"
    if os.path.isdir(spec):
        return "folder"
    name, _, split = spec.partition(":")
    if name in data.DATASETS and split in ("", "train", "test"):
        return "dataset"
    raise MetricsError(f"{spec} is not an image folder, a .npz statistics file, a .npy features file or "
                       f"a dataset name ({', '.join(data.DATASETS)}, optionally with :test)")


def open_set(spec, args):
    """("npz", stats), ("features", N x d array), ("folder", [paths]) or ("dataset", (name, split)). Files
    are read here, so that a bad one fails before any long pass."""
    kind = check_set(spec)
    if kind == "npz":
        return "npz", load_stats(spec)
    if kind == "features":
        return "features", _first_n(load_features(spec), spec, args, "feature vectors")
    if kind == "folder":
        return "folder", _first_n(data.list_images(spec), spec, args, "images")
    name, _, split = spec.partition(":")
    return "dataset", (name, split or "train")


def evaluate_set(spec, opened, args, get_model):
    """IS, FID statistics, pool3 features and Laplacian variance of one set (opened = open_set(spec, args)):
    a dict with n, mu, sigma, features (N x 2048 float32), is_mean, is_std, lapvar, lapvar_std where
    available: a .npz gives mu and sigma only, a .npy no IS or Laplacian variance (those need the images)."""
    kind, where = opened
    if kind == "npz":
        return {"n": None, **where}
    if kind == "features":
        if args.lapvar_only:
            return {"n": len(where)}
        mu, sigma = stats_from_features(where)
        return {"n": len(where), "mu": mu, "sigma": sigma, "features": where}
    cache = None
    if kind == "dataset":
        name, split = where
        images = _first_n(data.load(name, root=args.data_root, split=split, verbose=False).images,
                          spec, args, "images")
        tag = name if split == "train" else f"{name}-{split}"
        # The key is the set and the weights, not the device: the pass is plain float32 (evaluating(exact=)),
        # so CPU and GPU statistics agree to float32 precision.
        cache = pathlib.Path(args.data_root) / "cache" / f"fid_stats_{tag}_{len(images)}.npz"
        where = images
    if len(where) < 2 and not args.lapvar_only:
        raise MetricsError(f"{spec} has only {len(where)} image; IS and FID need at least 2 "
                           f"(and {FID_DIMS} or more for an unbiased FID)")
    if cache is not None and not args.lapvar_only and cache.is_file():
        stats = load_stats(cache, with_features=True)
        if stats.get("weights_sha256") == get_model.sha256() and stats.get("is_mean") is not None:
            if stats.get("features") is not None:
                note(f"{spec}: reference statistics and features from {cache}")
                return stats
            note(f"note: {cache} has no features (an older metrics.py wrote it); computing them again "
                 f"for KID and precision/recall")
    model = None if args.lapvar_only else get_model()
    out = compute_features(where, model, args.batch_size, get_model.device, lapvar=True, name=spec)
    stats = set_stats(spec, out, args.splits)
    if model is not None and cache is not None:
        stats["weights_sha256"] = get_model.sha256()
        try:
            save_stats(cache, stats, with_features=True)
        except MetricsError as e:           # the cache only saves time next run: not worth failing for
            note(f"warning: {e}; the reference statistics are not cached")
    return stats


def set_stats(spec, out, splits=IS_SPLITS):
    """A set's numbers from its feature pass (compute_features' dict): n, lapvar, lapvar_std and, with pool3
    features, mu, sigma, features (N x 2048 float32), is_mean, is_std."""
    stats = {"n": out["n"], "lapvar": float(out["lapvar"].mean()), "lapvar_std": float(out["lapvar"].std())}
    if out["pool3"] is not None:
        stats["mu"], stats["sigma"] = stats_from_features(out["pool3"])
        stats["features"] = out["pool3"].astype(np.float32)     # lossless: the network's output is float32
        used = min(splits, out["n"])
        if used < splits:
            note(f"note: {spec} has {out['n']} images; the Inception Score uses {used} splits")
        stats["is_mean"], stats["is_std"] = inception_score(out["logits"], used)
        if out["n"] < FID_DIMS:
            note(f"warning: {spec} has {out['n']} images, fewer than {FID_DIMS}: its covariance is "
                 f"rank-deficient and an FID against it is biased (papers use 10,000-50,000)")
    return stats


class LazyInception:
    """Loads the network on first use only (.npz and cached sets need no network)."""

    def __init__(self, weights, device):
        self.weights, self.device, self.model, self._sha = weights, data.resolve_device(device), None, None

    def __call__(self):
        if self.model is None:
            self.model = load_inception(self.weights, self.device)
        return self.model

    def sha256(self):
        """The weight file's SHA-256 (16 hex digits): the reference cache's key."""
        if self._sha is None:
            with open(weights_path(self.weights), "rb") as f:
                self._sha = hashlib.sha256(f.read()).hexdigest()[:16]
        return self._sha


# ------------------------------------------------------------------ loss plots (Pillow only)

PLOT_W, PANEL_H = 960, 320
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def _font(size=13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                    # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo, hi, count=5):
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5 * max(abs(lo), 1.0), hi + 0.5 * max(abs(hi), 1.0)
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _group_panels(series):
    """-> [(title, names)]: columns named D(...) share a probability panel, throughput (..._per_s) gets its own,
    the others share loss panels of similar magnitude (a new one where a median |value| is 30x the smallest)."""
    probs = [k for k in series if k.startswith("D(")]
    rates = [k for k in series if k.endswith("per_s")]
    scale = {k: float(np.median(np.abs([v for _, v in series[k]]))) + 1e-12 for k in series}
    groups, base = [], None
    for k in sorted((k for k in series if k not in probs + rates), key=scale.get):
        if not groups or scale[k] > 30 * base:
            groups.append([])
            base = scale[k]
        groups[-1].append(k)
    groups = [[k for k in series if k in g] for g in groups]                # csv column order
    panels = [(", ".join(g) if len(g) <= 4 else "losses", g) for g in groups]
    if probs:
        panels.append(("discriminator outputs (probability)", probs))
    if rates:
        panels.append(("training speed (images/s)", rates))
    return panels or [("no data yet", [])]


def _draw_panel(draw, top, title, names, series, epoch_starts, font):
    """One panel: grid, round ticks, faint epoch boundaries, curves (dots for sparse ones), legend."""
    left, right, top_px, bottom = 80, PLOT_W - 20, top + 28, top + PANEL_H - 45
    xs, ys = zip(*([pt for k in names for pt in series[k]] or [(0.0, 0.0), (1.0, 1.0)]))
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = (0.0, 1.0) if title.startswith("discriminator") else (min(ys), max(ys))
    xt, yt = _nice_ticks(xlo, xhi), _nice_ticks(ylo, yhi)
    xlo, xhi, ylo, yhi = min(xlo, xt[0]), max(xhi, xt[-1]), min(ylo, yt[0]), max(yhi, yt[-1])

    def px(x, y):
        return (left + (x - xlo) / (xhi - xlo) * (right - left),
                bottom - (y - ylo) / (yhi - ylo) * (bottom - top_px))

    for e in epoch_starts:
        draw.line([px(e, ylo), px(e, yhi)], fill="#eeeeee")
    for t in yt:
        y = px(xlo, t)[1]
        draw.line([(left, y), (right, y)], fill="#dddddd")
        label = f"{t:.4g}"
        draw.text((left - 6 - draw.textlength(label, font=font), y - 7), label, fill="black", font=font)
    for t in xt:
        x = px(t, ylo)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        label = f"{t:.6g}"
        draw.text((x - draw.textlength(label, font=font) / 2, bottom + 6), label, fill="black", font=font)
    draw.rectangle([left, top_px, right, bottom], outline="black")
    draw.text((left, top + 6), title, fill="black", font=font)
    draw.text(((left + right) / 2 - 12, bottom + 22), "step", fill="black", font=font)
    colors = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(names)}
    for k in sorted(names, key=lambda k: -len(series[k])):          # sparse series drawn on top
        pts = [px(x, y) for x, y in series[k]]
        if len(pts) > 1:
            draw.line(pts, fill=colors[k], width=1 if len(pts) > 500 else 2)
        if len(pts) <= 50:
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[k])
    if names:                                                        # legend, top right, on top
        lx = right - 46 - max(draw.textlength(k, font=font) for k in names)
        draw.rectangle([lx - 6, top_px + 5, right - 6, top_px + 13 + 18 * len(names)], fill="white",
                       outline="#999999")
        for i, k in enumerate(names):
            ly = top_px + 9 + 18 * i
            draw.line([(lx, ly + 7), (lx + 22, ly + 7)], fill=colors[k], width=3)
            draw.text((lx + 28, ly), k, fill="black", font=font)


def start_log(csv_path, columns, after_step=None, source=None):
    """A run's CSV log (losses.csv, eval.csv): a new file with its header, or on resume (after_step: the
    checkpoint's step) the rows of source (default: csv_path itself) up to that step, each value under its
    own column name: rows a killed run logged after its last checkpoint would otherwise come twice. A line that
    a power cut or a kill damaged (NUL bytes, torn in the middle) is left out with a warning."""
    rows, source, damaged = [], source or csv_path, 0
    if after_step is not None and os.path.exists(source):
        with open(source, newline="", errors="replace") as f:                 # (one row a line: no quoted newlines)
            header, *old = [line for line in f.read().replace("\0", "").splitlines() if line] or [""]
        header = next(csv.reader([header]))
        for line in old:
            try:
                r = next(csv.reader([line]))
                keep = int(r[0]) <= after_step
            except (csv.Error, ValueError):
                damaged += 1
                continue
            if keep:
                rows.append([dict(zip(header, r)).get(c, "") for c in columns])
    if damaged:
        print(f"warning: left out {damaged} damaged line(s) of {source}", file=sys.stderr)
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([columns] + rows)


def log_row(csv_path, row):
    """Append one row to losses.csv (floats to 6 significant digits, "" for a blank cell)."""
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def read_losses(csv_path):
    """losses.csv (columns step, epoch, then loss terms and diagnostics; blank cells skipped) -> ({column:
    [(step, value), ...]} for columns with any finite number, epoch start steps); a header alone: no series."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise MetricsError(f"{csv_path} does not exist; give the losses.csv of a run") from None
    except IsADirectoryError:
        raise MetricsError(f"{csv_path} is a folder; give the losses.csv of a run") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:    # binary file: UnicodeDecodeError
        raise MetricsError(f"{csv_path} cannot be read as a CSV text file ({data._reason(e, strerror=True)})") from None
    names = [k for k in (rows[0].keys() if rows else []) if k not in ("step", "epoch")]
    series, epoch_starts, last_epoch = {k: [] for k in names}, [], None
    for i, row in enumerate(rows):
        try:
            x = float(row.get("step") or i)
        except ValueError:
            continue
        if row.get("epoch") not in (None, "", last_epoch):
            if last_epoch is not None:
                epoch_starts.append(x)
            last_epoch = row["epoch"]
        for k in names:
            try:
                y = float(row[k])
            except (TypeError, ValueError):
                continue
            if math.isfinite(y):
                series[k].append((x, y))
    return {k: v for k, v in series.items() if v}, epoch_starts


def plot_losses(csv_path, png_path):
    """Draw losses.csv as a PNG of PLOT_W x PANEL_H*panels pixels, one panel per group of quantities (a file
    with no numbers yet: one empty panel, "no data yet")."""
    return _draw_losses(*read_losses(csv_path), png_path)


def _draw_losses(series, epoch_starts, png_path, panels=None):
    panels = panels or _group_panels(series)
    img = Image.new("RGB", (PLOT_W, PANEL_H * len(panels)), "white")
    draw, font = ImageDraw.Draw(img), _font()
    for i, (title, group) in enumerate(panels):
        _draw_panel(draw, i * PANEL_H, title, group, series, epoch_starts[:200], font)
    _write_atomically(png_path, lambda f: img.save(f, format="PNG"), "the plot")
    return pathlib.Path(png_path)


def plot_csv(csv_path):
    """--plot: redraw a losses.csv as a PNG beside it; unlike plot_losses (every epoch end of a training run),
    a file with nothing to plot is an error: the user asked for a picture of this very file."""
    series, epoch_starts = read_losses(csv_path)
    if not series:
        raise MetricsError(f"{csv_path} has no rows of numbers to plot; give the losses.csv of a run "
                           f"that has logged at least one step")
    png_path = pathlib.Path(csv_path).with_suffix(".png")
    check_writable(png_path, "the plot")
    return _draw_losses(series, epoch_starts, png_path)


# ------------------------------------------------------------------ a training run's pictures, samples and losses

def _fail_writing(run, e):
    """A picture of a run that could not be written (e.g. a full disk): one sentence, and the way back."""
    data.fail(f"{e}; {os.path.join(run.out, 'ckpt.pt')} holds step {run.step}. Free some disk space, then resume")


def save_grid(run, name, images, nrow=8):
    """OUT/<name>_epoch_NNN.png: images in [-1, 1] as one grid, written to a temporary file and renamed."""
    path = os.path.join(run.out, f"{name}_epoch_{run.label:03d}.png")
    grid = vutils.make_grid(images.float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    try:
        _write_atomically(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"), "the grid")
    except MetricsError as e:
        _fail_writing(run, e)


def save_recon(run, x, x_hat):
    """OUT/recon_epoch_NNN.png: rows of 8 inputs x, each above its 8 reconstructions x_hat."""
    row = min(8, len(x))
    n = len(x) - len(x) % row
    pairs = torch.stack([x[:n].float(), x_hat[:n].float()], 1)                 # n x 2 x C x H x W
    save_grid(run, "recon", pairs.view(-1, row, 2, *x.shape[1:]).transpose(1, 2).flatten(0, 2), nrow=row)


def end_epoch(run, log, evaluation, net, grid, images=None, reconstruct=None):
    """Rank 0 at the end of an epoch (or of the run, after a stop), in an order a kill cannot break: ckpt.pt
    first (best.pt is a copy of it); then, with net in eval mode, OUT/grid_epoch_NNN.png of grid() (the fixed z's
    samples) and, for a VAE, recon_epoch_NNN.png: the first 32 training images above reconstruct(x); losses.png;
    last the evaluation (eval.csv, best.pt) where --eval-every makes one due."""
    if run.rank:
        return
    run.save()
    with evaluating(net):
        save_grid(run, "grid", grid())
        if reconstruct is not None:
            x = data.to_float(images[:32].to(run.device))                    # 32 x C x H x W in [-1, 1]
            save_recon(run, x, reconstruct(x))
    log.plot()
    if evaluation:
        evaluation.after_epoch()


def write_samples(run, make, *nets):
    """--sample N: OUT/samples/000000.png ... on rank 0 from make(i, b, g) -> b images in [-1, 1] from number i,
    500 at a time, their noise from g (a generator on the device seeded --seed + 1), the nets in eval mode."""
    a = run.args
    if not a.sample or run.rank:
        return
    folder, g = os.path.join(run.out, "samples"), torch.Generator(run.device).manual_seed(a.seed + 1)
    try:
        with evaluating(*nets):
            for i in range(0, a.sample, 500):
                data.write_pngs(make(i, min(500, a.sample - i), g), folder, first=i)
    except data.DataError as e:
        data.fail(e)
    except KeyboardInterrupt:
        data.interrupted(f"while writing {folder}")
    run.log(f"wrote {a.sample} samples to {folder}")


class LossLog:
    """losses.csv of a training run (rank 0 writes it) and its plot losses.png: columns step, epoch, the
    script's values, img_per_s and, for a VAE, its held-out values. A resumed run keeps the rows up to the
    checkpoint's step (from the checkpoint's folder when it branched off)."""

    def __init__(self, run, columns):
        self.run, self.columns = run, list(columns)
        self.csv, self.png = os.path.join(run.out, "losses.csv"), os.path.join(run.out, "losses.png")
        self.on = run.rank == 0 and run.train
        if self.on:
            source = run.ckpt and os.path.join(os.path.dirname(os.path.abspath(run.args.resume)), "losses.csv")
            start_log(self.csv, self.columns, run.step if run.ckpt else None, source)

    def row(self, values):
        """At a log step: one line on stdout and a row of losses.csv; values (tensors) read in one host sync."""
        run, a = self.run, self.run.args
        numbers = dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).tolist()))
        rate = run.seen / (time.perf_counter() - run.t0)
        eta = ((a.epochs - run.epoch) * run.n - run.batch) * a.batch_size / rate
        run.log(f"[{run.epoch + 1}/{a.epochs}][{run.batch}/{run.n}] step {run.step}  "
                + "  ".join(f"{k} {v:.4g}" for k, v in numbers.items()) + f"  {rate:.0f} img/s  ETA {eta / 60:.1f} min")
        self._write({"step": run.step, "epoch": run.epoch + 1, **numbers, "img_per_s": rate})

    def held_out(self, model, images, batch_size, terms):
        """A VAE's held-out losses at an epoch's end (rank 0; not after a stop signal): the mean over images
        (uint8) of terms(x, g), per-image means of a batch x in [-1, 1] whose noise comes from g (a CPU generator
        seeded --seed), in plain float32 with the model in eval mode, so that they do not move with the device
        or --amp. A line, and a row of losses.csv whose training cells are blank."""
        run = self.run
        if images is None or not self.on or run.signum:
            return
        t0, g, total = time.perf_counter(), torch.Generator().manual_seed(run.args.seed), 0
        with evaluating(model, exact=run.device):
            for i in range(0, len(images), batch_size):
                x = data.to_float(images[i:i + batch_size].to(run.device))     # B x C x H x W, float32
                total = total + terms(x, g) * len(x)
        values = dict(zip([c for c in self.columns if c.startswith("test_")], (total / len(images)).tolist()))
        run.log(f"====> epoch {run.label}, held out: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                + f" ({time.perf_counter() - t0:.1f} s)")
        self._write({"step": run.step, "epoch": run.label, **values})

    def _write(self, row):
        if self.on:
            log_row(self.csv, [row.get(c, "") for c in self.columns])

    def plot(self):
        """losses.png, redrawn from losses.csv."""
        if self.on:
            try:
                plot_losses(self.csv, self.png)
            except MetricsError as e:
                _fail_writing(self.run, e)


# ------------------------------------------------------------------ command line

def _fmt(value, spec, std=None):
    if value is None:
        return "-"
    return f"{value:{spec}}" + (f" +- {std:{spec}}" if std is not None else "")


COMPARED = ("fid", "kid", "kid_std", "precision", "recall")     # a set against the reference
STATS_ONLY = "is statistics only: pass a features file from --save-features for KID and precision/recall"


def compare_to_reference(spec, stats, ref, args, device):
    """FID (from mu and sigma) and KID, precision and recall (from the features, where both sets have them)
    of one set against the reference. The reference's k-NN radii are kept in ref, computed once for all sets."""
    out = dict.fromkeys(COMPARED)
    if "mu" not in stats or "mu" not in ref:                    # --lapvar-only
        return out
    features, ref_features = stats.get("features"), ref.get("features")
    both = features is not None and ref_features is not None
    note(f"{spec}: FID against {args.ref} (a {ref['mu'].size}x{ref['mu'].size} matrix square root)"
         + (f", KID and precision/recall (k = {PR_K})" if both else ""))
    out["fid"] = frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"])
    if not both:
        if ref_features is not None:                            # else main said it of the reference
            note(f"note: {spec} {STATS_ONLY}")
        return out
    out["kid"], out["kid_std"] = kernel_inception_distance(features, ref_features)
    if min(len(features), len(ref_features)) <= PR_K:
        note(f"note: precision and recall need more than {PR_K} images per set; {spec} has {len(features)}, "
             f"{args.ref} {len(ref_features)}")
        return out
    if "radii" not in ref:
        ref["radii"] = knn_radii(ref_features, device=device)
    out["precision"], out["recall"] = precision_recall(features, ref_features, device=device,
                                                       ref_radii=ref["radii"])
    return out


def json_safe(value):
    """value with every NaN or inf (an undefined number, e.g. the Inception Score of 2 images) as None: null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_table(rows):
    header = ["set", "n", "IS (mean +- std)", "FID", "KID (mean +- std)", "precision", "recall",
              "Laplacian var. (mean +- std)"]
    cells = [[name, _fmt(r.get("n"), "d"), _fmt(r.get("is_mean"), ".2f", r.get("is_std")),
              _fmt(r.get("fid"), ".2f"), _fmt(r.get("kid"), ".5f", r.get("kid_std")),
              _fmt(r.get("precision"), ".4f"), _fmt(r.get("recall"), ".4f"),
              _fmt(r.get("lapvar"), ".1f", r.get("lapvar_std"))]
             for name, r in rows]
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]
    line = lambda c: "| " + " | ".join(s.ljust(w) if i == 0 else s.rjust(w)  # noqa: E731
                                       for i, (s, w) in enumerate(zip(c, widths))) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


def print_results(rows, ref, args):
    """The table (or --json) of rows [(spec, stats)], the reference set last ("-" or null: not available, e.g.
    IS of a features file, or anything compared to the reference itself)."""
    if ref is not None:
        rows = rows + [(f"{args.ref} (reference)", {**ref, **dict.fromkeys(COMPARED), "reference": True})]
    if args.json:
        keys = ("n", "is_mean", "is_std") + COMPARED + ("lapvar", "lapvar_std")
        out = {spec: {**{k: s.get(k) for k in keys}, "reference": s.get("reference", False)}
               for spec, s in rows}
        if ref is not None and args.ref not in out:             # the reference under its own name
            out[args.ref] = out.pop(f"{args.ref} (reference)")
        print(json.dumps(json_safe(out), indent=2, allow_nan=False))
    else:
        print_table(rows)


# ------------------------------------------------------------------ evaluation during training (--eval-every)

EVAL_BATCH = 100      # images per call of a set's function and per Inception pass
# eval.csv columns of each set (prefixed "recon_" etc. for sets other than "samples"): the stats key of each
EVAL_KEYS = {"fid": "fid", "kid": "kid", "kid_std": "kid_std", "is": "is_mean", "is_std": "is_std",
             "precision": "precision", "recall": "recall", "lapvar": "lapvar"}
# eval.png: one panel per measure (their scales differ by orders of magnitude), every set's curve in it
EVAL_PANELS = (("FID (lower is better)", ("fid",)), ("KID (lower is better)", ("kid",)),
               ("Inception Score", ("is",)), ("precision (realism) and recall (coverage)", ("precision", "recall")),
               ("Laplacian variance (higher is sharper)", ("lapvar",)))


def add_args(p):
    """The evaluation flags of the model scripts."""
    p.add_argument("--eval-every", type=int, default=0, help="epochs between FID/KID/IS evaluations into "
                   "OUT/eval.csv, keeping OUT/best.pt (0: off)")
    p.add_argument("--eval-n", type=int, default=10000, help="generated images per evaluation")
    p.add_argument("--eval-ref", default=None, help="reference of the evaluations: dataset name, folder, .npy "
                   "features or .npz statistics (default: the dataset's test split, e.g. mnist:test)")
    p.add_argument("--weights", default=None, help="the FID Inception weight file (default: torch.hub's cache)")


def check_args(args, run):
    """The evaluation flags, one sentence each, before any data is read (from their names alone)."""
    if args.eval_every < 0:
        data.fail(f"--eval-every cannot be negative, got {args.eval_every}")
    if not (args.eval_every and run.train):
        return
    if args.eval_ref is None and data.has_test_split(args.data):
        args.eval_ref = f"{args.data}:test"
    if args.eval_n < 2:
        data.fail(f"--eval-n must be at least 2 (FID needs a covariance), got {args.eval_n}")
    if args.eval_ref is None:
        data.fail(f"--data {args.data} has no test split; give --eval-every its reference with --eval-ref "
                  f"(dataset, folder, .npy or .npz)")
    try:
        check_set(args.eval_ref)
    except MetricsError as e:
        data.fail(f"--eval-ref: {e}")
    old = run.ckpt["args"] if run.ckpt else {}
    if old.get("eval_every") and os.path.realpath(run.out) == os.path.dirname(os.path.realpath(args.resume)):
        for flag, key in (("--eval-ref", "eval_ref"), ("--eval-n", "eval_n")):  # eval.csv and best.pt go on
            if old.get(key) not in (None, getattr(args, key)):
                data.fail(f"{flag} {getattr(args, key)} is not the {old[key]} that {run.out}'s eval.csv and best.pt "
                          f"were scored with, and FIDs against two references do not compare; drop {flag}, or "
                          f"resume with a fresh --out to start another series")


def _number(cell):
    """An eval.csv cell as a float; inf where it is blank or damaged (a row that cannot be the best)."""
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.inf


def _due(epoch, batch, step, cfg):
    """Whether a run standing here evaluates: every eval_every whole epochs, and where it ends."""
    return (batch == 0 and epoch % cfg["eval_every"] == 0) or epoch >= cfg["epochs"] or \
        bool(cfg.get("max_steps") and step >= cfg["max_steps"])


class TrainingEval:
    """--eval-every E --eval-n N --eval-ref REF: every E epochs and at the end, FID, KID, IS, precision/recall
    and Laplacian variance of N images made in memory (no PNGs) against a reference computed once; a row of
    OUT/eval.csv, the curves in OUT/eval.png, and OUT/best.pt when the samples' FID is the lowest so far.

    Made before the first step, so that a missing network or a bad reference stops the run there: it loads
    the Inception network and REF (as metrics.py --ref; a dataset is cached in DATA_ROOT/cache) and starts
    eval.csv, keeping on resume (after_step) the rows up to the checkpoint's step and their best FID. sets:
    the names of evaluate()'s sets, "samples" first ("recon" too for a VAE). Their images come from
    make(i, b, g): b images from number i, their noise from g, a generator seeded `seed` at every evaluation,
    so that each one scores the same z and none moves the training's random stream (IS and KID draw from
    their own numpy RandomState)."""

    def __init__(self, ref, n, out_dir, weights=None, device="cpu", data_root="data", after_step=None,
                 sets=("samples",), batch_size=EVAL_BATCH, log=print, seed=0):
        check_set(ref)                                   # a bad REF: one sentence, nothing loaded yet
        if n < 2:
            raise MetricsError(f"an evaluation needs at least 2 images (FID's covariance), not {n}")
        self.n, self.sets, self.batch_size, self.log, self.seed = n, tuple(sets), batch_size, log, seed
        self.csv, self.png = os.path.join(out_dir, "eval.csv"), os.path.join(out_dir, "eval.png")
        check_writable(self.csv, "the evaluation log")
        self.shown = set()                               # notes printed so far: each once per run
        # What evaluate_set and compare_to_reference read: as `metrics.py SAMPLES --ref REF`.
        self.args = argparse.Namespace(ref=ref, n=None, lapvar_only=False, batch_size=batch_size,
                                       splits=IS_SPLITS, data_root=data_root)
        self.net = LazyInception(weights, device)
        self.net()                                       # offline without weights: metrics.py's sentence
        try:
            with _each_note_once(self.shown):
                self.ref = evaluate_set(ref, open_set(ref, self.args), self.args, self.net)
                if self.ref.get("features") is None:
                    note(f"note: the reference {STATS_ONLY}")
        except data.DataError as e:                      # e.g. the dataset is not under DATA_ROOT
            raise MetricsError(str(e)) from None
        self.columns = ["step", "epoch", "n"] + [self.prefix(name) + column for name in self.sets
                                                 for column in EVAL_KEYS] + ["seconds"]
        os.makedirs(out_dir, exist_ok=True)
        start_log(self.csv, self.columns, after_step)
        with open(self.csv, newline="") as f:           # the best FID of the rows kept on resume
            self.steps = [(int(r["step"]), _number(r.get("fid"))) for r in csv.DictReader(f)]
        self.best = min((fid for _, fid in self.steps), default=math.inf)
        self.last = None                                 # the last evaluation's row {column: value}

    @classmethod
    def start(cls, run, sets, *models, held_out=None):
        """A model script's evaluation (run: data.Run): rank 0's TrainingEval, or None without --eval-every.
        sets: {"samples": make, "recon": make}; models: the networks make uses (in eval mode while it does);
        held_out: the images "recon" reconstructs. A resumed run first redoes the evaluation a kill lost: its
        checkpoint stands where one was due and eval.csv has no row of its step."""
        a = run.args
        if not (a.eval_every and run.train and run.rank == 0):
            return None
        if held_out is not None and len(held_out) < a.eval_n:
            data.fail(f"--eval-n {a.eval_n} asks for more reconstructions than the {len(held_out)} held-out images "
                      f"of {a.data}; lower --eval-n")
        try:
            ev = cls(a.eval_ref, a.eval_n, run.out, a.weights, run.device, a.data_root, run.step if run.ckpt else None,
                     tuple(sets), log=run.log, seed=a.seed + 2)
        except (MetricsError, data.DataError) as e:
            data.fail(e)
        except KeyboardInterrupt:
            data.interrupted(f"while computing the features of the reference {a.eval_ref}; nothing was trained")
        ev.run, ev.make, ev.models = run, sets, models
        old = run.ckpt["args"] if run.ckpt else {}
        if old.get("eval_every") and _due(run.epoch, run.batch, run.step, old) and run.step not in dict(ev.steps):
            run.log(f"evaluating step {run.step} again: the run that saved {a.resume} stopped before its evaluation")
            ev.after_epoch(again=True)
        return ev

    def after_epoch(self, again=False):
        """At an epoch's end (rank 0, after ckpt.pt is saved): the evaluation, where one is due (not after a stop
        signal: a resumed run makes it up). best.pt is written before eval.csv's row: a kill between them
        leaves no row without its best.pt."""
        run = self.run
        if not again and (run.signum or not _due(run.epoch, run.batch, run.step, vars(run.args))):
            return
        with evaluating(*self.models):
            try:
                self.evaluate(run.step, run.label, self.make, on_best=lambda: run.save("best.pt"))
            except MetricsError as e:  # e.g. FID's square root of a degenerate covariance: a lost row, not a lost run
                print(f"warning: the evaluation at step {run.step} failed ({e}); training goes on", file=sys.stderr)

    @staticmethod
    def prefix(name):
        return "" if name == "samples" else f"{name}_"

    def features(self, name, make):
        """compute_features' dict of self.n images of make(i, count, g) -> count x C x H x W in [-1, 1], batch
        by batch: each becomes the pixels --sample writes (data.to_uint8) and goes through the network at
        once; only the features are kept, never the n images."""
        outs, done, g = [], 0, torch.Generator(self.net.device).manual_seed(self.seed)
        while done < self.n:
            count = min(self.batch_size, self.n - done)
            x = make(done, count, g)                                               # B x C x H x W
            if not isinstance(x, torch.Tensor) or len(x) != count:
                raise MetricsError(f"{name}: asked for {count} images, got {type(x).__name__} "
                                   f"{tuple(getattr(x, 'shape', ()))}")
            u8 = data.to_uint8(x)                                                  # as data.write_pngs
            out = compute_features(u8, self.net(), count, self.net.device, lapvar=True, name=name,
                                   progress=False)
            out["pool3"] = out["pool3"].astype(np.float32)   # lossless (the network's output is float32)
            outs.append(out)
            done += count
            del x, u8                                    # the batch goes before the next is made
        return {"n": done, **{k: np.concatenate([o[k] for o in outs]) for k in ("pool3", "logits", "lapvar")}}

    def evaluate(self, step, epoch, make, on_best=None):
        """Score self.n images of each set of make ({"samples": fn, "recon": fn}; fn(i, count, g) -> count x C x
        H x W in [-1, 1], C = 1 or 3) without TF32: a row of eval.csv (after on_best(), when the samples' FID is
        the lowest so far), eval.png redrawn, one line logged. Returns whether the FID is the lowest so far."""
        if set(make) != set(self.sets):
            raise MetricsError(f"evaluate() was given the sets {sorted(make)}, not {sorted(self.sets)}")
        t0 = time.perf_counter()
        row = {"step": step, "epoch": epoch, "n": self.n}
        with torch.no_grad(), evaluating(exact=self.net.device), _each_note_once(self.shown):
            for name in self.sets:
                stats = set_stats(name, self.features(name, make[name]), self.args.splits)
                stats.update(compare_to_reference(name, stats, self.ref, self.args, self.net.device))
                row.update({self.prefix(name) + col: stats.get(key) for col, key in EVAL_KEYS.items()})
        row["seconds"] = time.perf_counter() - t0
        is_best = row["fid"] is not None and row["fid"] < self.best
        if is_best and on_best:
            on_best()
        log_row(self.csv, [row[c] for c in self.columns])            # None: a blank cell
        plot_eval(self.csv, self.png)
        self.best, self.last = row["fid"] if is_best else self.best, row
        self.steps.append((step, row["fid"]))
        self.log(f"eval step {step} (epoch {epoch}, {self.n} images, {row['seconds']:.1f} s): " + " | ".join(
            f"{name} FID {_fmt(row[p + 'fid'], '.2f')} KID {_fmt(row[p + 'kid'], '.4f', row[p + 'kid_std'])} "
            f"IS {_fmt(row[p + 'is'], '.2f', row[p + 'is_std'])} precision {_fmt(row[p + 'precision'], '.3f')} "
            f"recall {_fmt(row[p + 'recall'], '.3f')} Laplacian var. {_fmt(row[p + 'lapvar'], '.1f')}"
            for name, p in ((name, self.prefix(name)) for name in self.sets)) + (" (best FID)" if is_best else ""))
        return is_best


def plot_eval(csv_path, png_path):
    """Draw eval.csv as a PNG: a panel per measure of EVAL_PANELS with numbers, each set's curve in it."""
    series, epoch_starts = read_losses(csv_path)
    panels = [(title, [k for k in series if k in columns or k.split("_", 1)[-1] in columns])
              for title, columns in EVAL_PANELS]
    return _draw_losses(series, epoch_starts, png_path, [(t, names) for t, names in panels if names])


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", nargs="*", metavar="SAMPLES",
                   help="image folder(s), .npz statistics, .npy features, or dataset names (mnist, cifar10:test, ...)")
    p.add_argument("--ref", help="reference set for FID, KID, precision and recall: folder, .npy features, "
                                 "dataset name, or .npz statistics (FID only)")
    p.add_argument("--n", type=int, help="use the first N images of each folder/dataset (default: all)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--weights", help=f"path of {FID_WEIGHTS_FILE} (default: torch.hub cache, downloaded when online)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the (single) set's FID statistics")
    p.add_argument("--save-features", metavar="OUT.npy", help="save the (single) set's pool3 features "
                                                              "(float32 N x 2048): a reference for all metrics")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--lapvar-only", action="store_true", help="only the Laplacian variance (no network)")
    p.add_argument("--splits", type=int, default=IS_SPLITS, help="Inception Score splits")
    p.add_argument("--data-root", default="data", help="dataset root; reference statistics and "
                                                       "features are cached in DATA_ROOT/cache")
    p.add_argument("--plot", metavar="CSV", help="redraw CSV (a losses.csv) as a PNG beside it")
    return p


def _check_cli(p, args):
    """The command line's checks, before any set is opened (a usage error exits with 2)."""
    if not args.samples:
        p.error("give at least one SAMPLES set (or --plot CSV)")
    if args.batch_size < 1 or (args.n is not None and args.n < 1) or args.splits < 1:
        p.error("--batch-size, --n and --splits must be positive")
    if args.save_features and not args.save_features.endswith(".npy"):
        raise MetricsError(f"--save-features {args.save_features}: give a file name ending in .npy "
                           f"(that is how metrics.py recognises a features file)")
    for flag, path, what in (("--save-stats", args.save_stats, "the statistics"),
                             ("--save-features", args.save_features, "the features")):
        if path and (len(args.samples) != 1 or args.lapvar_only):
            raise MetricsError(f"{flag} takes exactly one SAMPLES set and needs the network (not --lapvar-only)")
        if path:
            check_writable(path, what)


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    try:
        if args.plot:
            print(plot_csv(args.plot))
            return
        _check_cli(p, args)
        get_model = LazyInception(args.weights, args.device)     # a bad --device fails here
        specs = args.samples + ([args.ref] if args.ref else [])
        opened = {spec: open_set(spec, args) for spec in specs}  # bad paths fail before long work
        if args.save_features and opened[args.samples[0]][0] == "npz":
            raise MetricsError(f"--save-features needs images or a features file; {args.samples[0]} "
                               f"is statistics only (mu and sigma)")
        ref = evaluate_set(args.ref, opened[args.ref], args, get_model) if args.ref else None
        if ref is not None and "mu" in ref and ref.get("features") is None:
            note(f"note: the reference {STATS_ONLY}")
        rows = []
        for spec in args.samples:
            stats = evaluate_set(spec, opened[spec], args, get_model)
            if ref is not None:
                stats.update(compare_to_reference(spec, stats, ref, args, get_model.device))
            features = stats.pop("features", None)               # N x 2048: kept for --save-features only
            rows.append((spec, stats))
        print_results(rows, ref, args)                           # first: a failing write loses nothing
        if args.save_stats:
            save_stats(args.save_stats, rows[0][1])
            note(f"saved FID statistics of {args.samples[0]} to {args.save_stats}")
        if args.save_features:
            save_features(args.save_features, features)
            note(f"saved the pool3 features of {args.samples[0]} ({len(features)} x {features.shape[1]}) "
                 f"to {args.save_features}")
    except (MetricsError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        data.interrupted("before the results were printed; nothing was written")


if __name__ == "__main__":
    main()
