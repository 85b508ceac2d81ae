"""Check metrics.py against the reference implementations on the same images and weights; time it.

Compares, on N real MNIST test digits (gray) and N synthetic RGB images (data.py's "fake"):
  * pool3 features, mu/sigma and FID with mseitzer/pytorch-fid (get_activations,
    calculate_frechet_distance), same weight file, batch size and images; feature-pass time;
  * the Inception Score with toshas/torch-fidelity (isc_features_to_metric on the same logits),
    and torch-fidelity's own feature extractor end to end (its resize and [-1, 1] scaling differ
    slightly from pytorch-fid's, which metrics.py follows, so small differences are expected);
  * the seconds of one 2048x2048 Frechet step; the Laplacian variance of the MNIST test set.

The reference packages are not project dependencies; install them into a scratch folder:
    pip install --target /tmp/refpkgs --no-deps pytorch-fid==0.3.0 torch-fidelity==0.4.0 tqdm
    OMP_NUM_THREADS=1 python benchmarks/check_metrics_vs_reference.py --ref-packages /tmp/refpkgs \
        --mnist data/MNIST/raw/t10k-images-idx3-ubyte --n 100 --threads 1
Without --weights (an offline machine cannot download pt_inception-2015-12-05-6726825d.pth) the
check uses random weights in that file's exact format (keys, shapes; conv weights at He scale so
features are O(1)), placed in a private torch.hub cache from which both tools load it.
"""
import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import metrics  # noqa: E402


def read_idx_images(path):
    """MNIST idx3-ubyte -> uint8 N x 28 x 28."""
    raw = pathlib.Path(path).read_bytes()
    magic, n, rows, cols = np.frombuffer(raw[:16], ">i4")
    assert magic == 2051, f"{path} is not an idx3-ubyte image file"
    return np.frombuffer(raw[16:], np.uint8).reshape(n, rows, cols)


def random_weights(path):
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.mul_(6 ** 0.5)
    torch.save(state, path)


def rel(a, b):
    """max |a - b| / max |b|"""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-packages", nargs="*", default=[], help="folders holding pytorch_fid, torch_fidelity")
    p.add_argument("--mnist", default="data/MNIST/raw/t10k-images-idx3-ubyte", help="MNIST t10k-images-idx3-ubyte")
    p.add_argument("--n", type=int, default=200, help="images per set for the feature comparison")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--repeats", type=int, default=2, help="alternating timed runs per tool (best is kept)")
    p.add_argument("--weights", help="a real pt_inception-2015-12-05-6726825d.pth (default: random weights)")
    p.add_argument("--skip-fid-step", action="store_true", help="skip the 2048x2048 sqrtm steps (slow on CPU)")
    args = p.parse_args()
    sys.path[:0] = args.ref_packages
    from pytorch_fid import fid_score, inception as pfid_inception
    torch.set_num_threads(args.threads)

    work = pathlib.Path(tempfile.mkdtemp(prefix="metrics_check_"))
    os.environ["TORCH_HOME"] = str(work)                  # private hub cache, read by both tools
    weights = work / "hub" / "checkpoints" / metrics.FID_WEIGHTS_FILE
    weights.parent.mkdir(parents=True)
    shutil.copy(args.weights, weights) if args.weights else random_weights(weights)
    print(f"weights: {'real file ' + args.weights if args.weights else 'random, real format'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}")

    # ---- image sets: real MNIST test digits (gray PNG) and synthetic RGB shapes (PNG)
    have_mnist = os.path.isfile(args.mnist)
    mnist = read_idx_images(args.mnist) if have_mnist else None
    sets = {}
    for name, arrays, mode in (("mnist", mnist[:args.n] if have_mnist else None, "L"),
                               ("fake", data.load("fake", split="test", verbose=False).images[:args.n]
                                .permute(0, 2, 3, 1).numpy(), "RGB")):
        if arrays is None:
            continue
        folder = work / name
        folder.mkdir()
        for i, arr in enumerate(arrays):
            Image.fromarray(arr, mode).save(folder / f"{i:06d}.png")
        sets[name] = sorted(folder.glob("*.png"))
    names = list(sets)

    # ---- feature pass: ours vs pytorch-fid, same files, batch size, weights
    ours_model = metrics.load_inception(device="cpu")     # from the hub cache, like pytorch-fid
    pfid_model = pfid_inception.InceptionV3([pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    warm = sets[names[0]][:2]
    metrics.compute_features(warm, ours_model, progress=False)
    fid_score.get_activations(warm, pfid_model, 2, 2048, "cpu", 0)
    ours, pfid, best = {}, {}, {}                         # best (min) time per tool and set, alternating runs
    for _ in range(args.repeats):
        for name in names:
            ours[name], t = timed(metrics.compute_features, sets[name], ours_model, args.batch_size, "cpu",
                                  name=name, progress=False)
            best[("ours", name)] = min(t, best.get(("ours", name), t))
            pfid[name], t = timed(fid_score.get_activations, sets[name], pfid_model, args.batch_size, 2048, "cpu", 0)
            best[("pfid", name)] = min(t, best.get(("pfid", name), t))
    t_ours, t_pfid = (sum(best[(tool, n)] for n in names) for tool in ("ours", "pfid"))
    total = sum(len(sets[n]) for n in names)
    print(f"\nfeature pass, {total} images ({' + '.join(f'{len(sets[n])} {n}' for n in names)}), "
          f"best of {args.repeats} alternating runs, scaled to 1000 images:")
    print(f"  metrics.py   {1000 * t_ours / total:7.1f} s / 1000 images ({total / t_ours:.2f} images/s)")
    print(f"  pytorch-fid  {1000 * t_pfid / total:7.1f} s / 1000 images ({total / t_pfid:.2f} images/s)"
          f"  [get_activations, num_workers=0]")
    stats_o, stats_p = {}, {}
    for name in names:
        stats_o[name] = metrics.stats_from_features(ours[name]["pool3"])
        stats_p[name] = (np.mean(pfid[name], axis=0), np.cov(pfid[name], rowvar=False))  # pytorch-fid's lines
        print(f"  {name}: pool3 max|diff|/max|x| = {rel(ours[name]['pool3'], pfid[name]):.2e}, "
              f"mu {rel(stats_o[name][0], stats_p[name][0]):.2e}, sigma {rel(stats_o[name][1], stats_p[name][1]):.2e}")

    # ---- the Frechet function alone, identical inputs (first 256 dims: fast), then the full FID
    a, b = names[0], names[-1]
    sub = lambda s: (s[0][:256], s[1][:256, :256])  # noqa: E731
    f_ref = fid_score.calculate_frechet_distance(*sub(stats_p[a]), *sub(stats_p[b]))
    f_our = metrics.frechet_distance(*sub(stats_p[a]), *sub(stats_p[b]))
    print(f"\nfrechet_distance vs calculate_frechet_distance, same 256-d stats: {f_our:.10g} vs {f_ref:.10g} "
          f"(rel diff {abs(f_our - f_ref) / abs(f_ref):.1e})")
    if not args.skip_fid_step and len(names) > 1:
        fid_o, t_fd = timed(metrics.frechet_distance, *stats_o[a], *stats_o[b])
        try:
            fid_p, t_fdp = timed(fid_score.calculate_frechet_distance, *stats_p[a], *stats_p[b])
            ref_txt = f"pytorch-fid (its features) {fid_p:.8g} in {t_fdp:.1f} s; rel diff {abs(fid_o - fid_p) / abs(fid_p):.1e}"
        except ValueError as e:
            ref_txt = f"pytorch-fid raised {e}"
        print(f"FID {a} vs {b} (2048-d): metrics.py {fid_o:.8g} in {t_fd:.1f} s (one 2048x2048 Frechet "
              f"step); {ref_txt}")

    # ---- Inception Score: torch-fidelity's function on the same logits, and its own extractor
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_isc import isc_features_to_metric
    except ImportError as e:
        print(f"\ntorch-fidelity not importable ({e}); IS comparison skipped")
    else:
        print()
        tf_model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights), verbose=False)
        for name in names:
            logits = ours[name]["logits"]
            ref = isc_features_to_metric(torch.from_numpy(logits))
            mine = metrics.inception_score(logits)
            print(f"  {name}: IS on the same logits  metrics.py {mine[0]:.10f} +- {mine[1]:.10f}   torch-fidelity "
                  f"{ref['inception_score_mean']:.10f} +- {ref['inception_score_std']:.10f}")
            u8 = torch.stack([data.read_image(f, channels=3) for f in sets[name]])
            with torch.inference_mode():
                feats = [tf_model(u8[i:i + args.batch_size]) for i in range(0, len(u8), args.batch_size)]
            tf_pool3 = torch.cat([f[0] for f in feats]).double().numpy()
            tf_logits = torch.cat([f[1] for f in feats])
            ref2 = isc_features_to_metric(tf_logits)
            print(f"  {name}: torch-fidelity end to end (its resize, (x-128)/128): pool3 rel diff "
                  f"{rel(ours[name]['pool3'], tf_pool3):.2e}, IS {ref2['inception_score_mean']:.6f} vs ours {mine[0]:.6f}")

    # ---- Laplacian variance of real MNIST test images
    if have_mnist:
        lv, t = timed(metrics.laplacian_variance, mnist)
        print(f"\nLaplacian variance, MNIST test ({len(mnist)} images, {args.mnist}): mean {lv.mean():.2f}, "
              f"std {lv.std():.2f}, median {np.median(lv):.2f} ({t:.2f} s)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
