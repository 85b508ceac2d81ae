"""Score MNIST samples with an independent MNIST classifier: are they digits, and which ones?

Trains a small CNN on the real MNIST training set once (at 32x32, the size the conv scripts
train at; about a minute or two on one CPU core), caches it in --work, and scores folders of
sample PNGs as the scripts write them with `--sample N` into OUT/samples/:

  - share:      the share of the samples predicted as each class 0-9
  - entropy:    entropy of that class histogram in nats (uniform over 10 classes: ln 10 = 2.30;
                real test digits: about 2.30; a model that draws one class: 0)
  - confidence: the mean max-softmax probability (real digits: about 0.99; noise: lower)
  - FD:         Frechet distance between the classifier's penultimate features (128-d) of the
                samples and of the real MNIST test set (as FID, with this classifier instead of
                Inception; real test digits against themselves split in half: a few units)

    python benchmarks/mnist_classifier.py runs/vaegan-mnist/samples runs/dcgan-mnist/samples
    python benchmarks/mnist_classifier.py --real                  # the real test set, as a reference
    python benchmarks/mnist_classifier.py runs/x/samples --n 1000 --json scores.json

Images of another size are resized to 32x32 (bilinear, antialiased); RGB is converted to grey.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402

SIZE = 32


class Classifier(nn.Module):
    """conv 32 -> pool -> conv 64 -> pool -> conv 128 -> pool -> 128 features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(128 * 16, 128), nn.ReLU())
        self.out = nn.Linear(128, 10)

    def forward(self, x):  # x: B x 1 x 32 x 32 in [-1, 1] -> logits B x 10, features B x 128
        f = self.body(x)
        return self.out(f), f


def mnist(root, split):
    ds = data.load("mnist", root=root, split=split, img_size=SIZE, channels=1, verbose=False)
    return ds.images, ds.labels


def train_classifier(root, path, epochs=2, seed=0):
    torch.manual_seed(seed)
    images, labels = mnist(root, "train")
    model, g = Classifier(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * (len(images) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for i in range(len(images) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            x = data.to_float(images[idx])
            # A little augmentation (random shifts of up to 2 pixels) so that slightly off-centre
            # samples are still read as digits.
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(x)[0], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i % 100 == 0:
                print(f"classifier epoch {epoch + 1}/{epochs} step {i}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    test_x, test_y = mnist(root, "test")
    _, _, pred, _ = run_model(model, test_x)
    acc = (torch.from_numpy(pred) == test_y).float().mean().item()
    print(f"classifier test accuracy: {acc:.4f}", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state": model.state_dict(), "test_acc": acc}, path)
    return model


def load_classifier(root, work):
    path = os.path.join(work, "mnist_classifier.pt")
    if not os.path.exists(path):
        return train_classifier(root, path)
    model = Classifier()
    model.load_state_dict(torch.load(path, weights_only=True)["state"])
    return model.eval()


@torch.no_grad()
def run_model(model, images_u8):
    """uint8 N x 1 x 32 x 32 -> (features N x 128, probabilities N x 10, predicted class, max prob)."""
    feats, probs = [], []
    for i in range(0, len(images_u8), 500):
        logits, f = model(data.to_float(images_u8[i:i + 500]))
        feats.append(f), probs.append(logits.softmax(1))
    feats, probs = torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()
    return feats, probs, probs.argmax(1), probs.max(1)


def read_folder(folder, n=None):
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))[:n]
    if not names:
        sys.exit(f"error: no PNG files in {folder}")
    imgs = []
    for name in names:
        img = Image.open(os.path.join(folder, name)).convert("L")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.BILINEAR)
        imgs.append(np.asarray(img, dtype=np.uint8))
    return torch.from_numpy(np.stack(imgs))[:, None]


def score(model, images_u8, ref_stats):
    feats, probs, pred, conf = run_model(model, images_u8)
    share = np.bincount(pred, minlength=10) / len(pred)
    entropy = float(-sum(p * math.log(p) for p in share if p > 0))
    mu, sigma = metrics.stats_from_features(feats)
    return {"n": len(pred), "share": share.round(4).tolist(), "entropy": entropy,
            "confidence": float(conf.mean()), "fd": metrics.frechet_distance(mu, sigma, *ref_stats)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folders", nargs="*", help="folders of sample PNGs")
    p.add_argument("--data-root", default="data", help="where MNIST and the decoded cache live (as the scripts)")
    p.add_argument("--work", default="runs/mnist-classifier", help="where the trained classifier is cached")
    p.add_argument("--n", type=int, default=None, help="score the first N PNGs of each folder (sorted by name)")
    p.add_argument("--real", action="store_true", help="also score the first half of the real test set against the second")
    p.add_argument("--json", default=None, help="write the scores to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    model = load_classifier(args.data_root, args.work)
    test_x, _ = mnist(args.data_root, "test")
    results = {}
    if args.real:  # the reference: 5,000 test digits against the other 5,000
        half = len(test_x) // 2
        ref = metrics.stats_from_features(run_model(model, test_x[half:])[0])
        results["real test digits (half vs half)"] = score(model, test_x[:half][:args.n], ref)
    ref = metrics.stats_from_features(run_model(model, test_x)[0])
    for folder in args.folders:
        results[folder] = score(model, read_folder(folder, args.n), ref)

    print(f"{'samples':<50} {'n':>6} {'entropy':>8} {'conf':>6} {'FD':>9}   share of classes 0-9 (%)")
    for name, r in results.items():
        share = " ".join(f"{100 * s:3.0f}" for s in r["share"])
        print(f"{name[-50:]:<50} {r['n']:>6} {r['entropy']:>8.3f} {r['confidence']:>6.3f} {r['fd']:>9.1f}   {share}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
