"""How fast data.py is: cache build and reload, and training batches per second against
torchvision's ImageFolder + DataLoader. Prints one table.

    python benchmarks/data_speed.py --data-root ../shared/datasets           # real MNIST + 20,000 JPEGs
    python benchmarks/data_speed.py --jpegs 2000 --batches 20                 # a quicker run

The JPEG folder (178x218, CelebA's size, inside a class subfolder so ImageFolder accepts it) is
generated once under --work and reused; every cache is rebuilt from scratch on each run.
"""
import argparse
import os
import pathlib
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def write_jpegs(job):
    folder, start, stop = job
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        ramp = np.linspace(0, 1, 178)[None, :, None] * rng.uniform(0, 255, 3) + \
            np.linspace(0, 1, 218)[:, None, None] * rng.uniform(0, 255, 3)
        arr = np.clip(ramp / 2 + rng.normal(0, 20, (218, 178, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=90)


def jpeg_folder(work, n):
    """work/jpegs/faces/000000.jpg ...: n JPEGs of 178x218 (made once, reused while n matches)."""
    folder = work / "jpegs" / "faces"
    if len(list(folder.glob("*.jpg"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        step = 500
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(write_jpegs, [(folder, i, min(n, i + step)) for i in range(0, n, step)]))
    return folder


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def build_and_reload(name, root, cache, img_size):
    """(seconds to build the cache from nothing, seconds to load it again, number of images)."""
    shutil.rmtree(cache, ignore_errors=True)
    load = lambda: data.load(name, root=root, img_size=img_size, cache_dir=cache, download=False, verbose=False)  # noqa: E731
    ds, build = timed(load)
    ds, reload = timed(load)
    return build, reload, len(ds)


def batches_per_second(batches, n):
    """Batches per second over n batches, after one warm-up batch."""
    it = iter(batches)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def imagefolder_batches(folder, size, batch_size, workers, device):
    import torchvision.datasets as D
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    loader = torch.utils.data.DataLoader(D.ImageFolder(folder, tf), batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=True)
    while True:
        yield from (x.to(device, non_blocking=True) for x, _ in loader)


def loader_batches(ds, batch_size, device, flip):
    loader = data.Loader(ds.images, batch_size, device, flip=flip)
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "../shared/datasets"),
                   help="holds MNIST/raw (skipped when absent)")
    p.add_argument("--work", default="data/bench", help="generated JPEGs and caches")
    p.add_argument("--jpegs", type=int, default=20000, help="images in the generated folder")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="batches timed per loader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    work = pathlib.Path(args.work)
    rows = []
    import torchvision.datasets  # noqa: F401  (imported before any timing)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    mnist = pathlib.Path(args.data_root) / "MNIST" / "raw"
    if mnist.is_dir():
        root = work / "mnist_root"                      # a link, so no cache is written into data-root
        (root / "MNIST").mkdir(parents=True, exist_ok=True)
        if not (root / "MNIST" / "raw").exists():
            (root / "MNIST" / "raw").symlink_to(mnist.resolve())
        for size in (28, 32):
            build, reload, n = build_and_reload("mnist", root, work / "cache", size)
            rows.append((f"mnist {n} images -> {size}x{size}", "cache build / reload (s)", f"{build:.2f} / {reload:.2f}"))
    else:
        print(f"no MNIST in {mnist}: skipping it", flush=True)

    folder = jpeg_folder(work, args.jpegs)
    build, reload, n = build_and_reload(str(folder), work, work / "cache", args.img_size)
    rows.append((f"{n} JPEGs 178x218 -> {args.img_size}x{args.img_size}", "cache build / reload (s)",
                 f"{build:.2f} / {reload:.2f}"))

    ds = data.load(str(folder), root=work, img_size=args.img_size, cache_dir=work / "cache", verbose=False)
    bs, n = args.batch_size, args.batches
    for flip in (False, True):
        rate = batches_per_second(loader_batches(ds, bs, args.device, flip), n)
        rows.append((f"data.Loader{' flip=True' if flip else ''}, {args.device}", f"batches/s at {bs}", f"{rate:.1f}"))
    rate = batches_per_second(imagefolder_batches(folder.parent, args.img_size, bs, args.workers, args.device), n)
    rows.append((f"ImageFolder + DataLoader({args.workers} workers)", f"batches/s at {bs}", f"{rate:.1f}"))

    rows.append(("load average at the end (other processes)", "", f"{os.getloadavg()[0]:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
