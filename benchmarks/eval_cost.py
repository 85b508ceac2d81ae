"""Cost of the evaluation during training (--eval-every, metrics.TrainingEval): one evaluation of
N generated images against a precomputed reference, and the KID + precision/recall step alone.

    python benchmarks/eval_cost.py                              # N = 2,000 32x32 images, 10,000 x 10,000 KID/PR
    python benchmarks/eval_cost.py --n 200 --kid-pr-n 0         # a quick look on a busy CPU
    python benchmarks/eval_cost.py --device cuda --n 10000      # on a GPU

* One evaluation: metrics.TrainingEval(ref=REF.npy, n=N).evaluate(...) exactly as a model script
  calls it, with a set function that returns N x 3 x 32 x 32 random images EVAL_BATCH at a time
  (a generator's own cost is the script's, not the evaluation's). The reference is --ref-n
  random 2048-d feature vectors saved as a features file (--save-features' format), so it is
  read, not computed. Reported: the evaluation's wall time (eval.csv's `seconds`: the Inception
  pass, FID with its 2048 x 2048 matrix square root, IS, KID, precision/recall, Laplacian
  variance, the csv row and eval.png), and the FID, KID and precision/recall steps timed again on
  the same features; the rest is the Inception pass (with IS, Laplacian variance, csv and plot).
  The reference's k-NN radii are computed once per run, in the first evaluation (included).
* KID + precision/recall alone: metrics.kernel_inception_distance and metrics.precision_recall
  on --kid-pr-n x --kid-pr-n random 2048-d features (float32), as compare_to_reference calls them.

Without --weights the Inception network has random weights in the real file's format (the
tests' format): the cost does not depend on the values. Set OMP_NUM_THREADS for the CPU threads.
"""
import argparse
import json
import math
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import metrics  # noqa: E402


def random_weights(path):
    """The FID Inception's state dict with random values (tests/test_metrics.py's weights_file)."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.mul_(math.sqrt(6))         # He gain: features O(1)
    torch.save(state, path)
    return path


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="generated images per evaluation (0: skip)")
    p.add_argument("--ref-n", type=int, default=2000, help="reference feature vectors")
    p.add_argument("--kid-pr-n", type=int, default=10000, help="feature vectors per set for KID + P/R alone (0: skip)")
    p.add_argument("--img-size", type=int, default=32, help="generated image size, pixels")
    p.add_argument("--batch-size", type=int, default=metrics.EVAL_BATCH, help="images per Inception pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--weights", help="the real pt_inception weights (default: random, same cost)")
    args = p.parse_args()
    device = data.resolve_device(args.device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "n": args.n, "ref_n": args.ref_n,
              "img_size": args.img_size, "batch_size": args.batch_size}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.n:
            weights = args.weights or random_weights(os.path.join(tmp, metrics.FID_WEIGHTS_FILE))
            ref = os.path.join(tmp, "ref.npy")
            metrics.save_features(ref, rng.normal(size=(args.ref_n, 2048)).astype(np.float32))
            ev, result["setup_s"] = timed(metrics.TrainingEval, ref, args.n, os.path.join(tmp, "run"),
                                          weights=weights, device=device, batch_size=args.batch_size)
            make = lambda i, count, g: torch.rand(count, 3, args.img_size, args.img_size, device=device,  # noqa: E731
                                                  generator=g) * 2 - 1
            passes = []                                          # keep the pass's output for the breakdown
            ev.features = lambda name, fn, pass_=ev.features: passes.append(pass_(name, fn)) or passes[-1]
            ev.evaluate(1, 1, {"samples": make})
            result["evaluation_s"] = ev.last["seconds"]
            # The scoring again on the same features (the radii of the reference are cached by now).
            features, ref_f = passes[0]["pool3"], ev.ref["features"]
            stats, result["fid_s"] = timed(metrics.stats_from_features, features)
            _, t = timed(metrics.frechet_distance, *stats, ev.ref["mu"], ev.ref["sigma"])
            result["fid_s"] += t
            _, result["kid_s"] = timed(metrics.kernel_inception_distance, features, ref_f)
            _, result["pr_s"] = timed(metrics.precision_recall, features, ref_f, device=device,
                                      ref_radii=metrics.knn_radii(ref_f, device=device))
            # the rest: the Inception pass (almost all of it), IS, Laplacian variance, csv row, eval.png
            result["rest_s"] = result["evaluation_s"] - result["fid_s"] - result["kid_s"] - result["pr_s"]
            result["images_per_s_of_the_rest"] = args.n / result["rest_s"]
        if args.kid_pr_n:
            a = rng.normal(size=(args.kid_pr_n, 2048)).astype(np.float32)
            b = (rng.normal(size=(args.kid_pr_n, 2048)) + 0.1).astype(np.float32)
            _, result["kid_alone_s"] = timed(metrics.kernel_inception_distance, a, b)
            _, result["pr_alone_s"] = timed(metrics.precision_recall, a, b, device=device)
            result["kid_pr_n"] = args.kid_pr_n
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for key, value in result.items():
        print(f"{key:24s} {value:.2f}" if isinstance(value, float) else f"{key:24s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
