"""Training speed of the five model scripts against a conventional PyTorch pipeline, and FID
feature throughput of metrics.py against a plain loop. Prints a table and JSON.

    python benchmarks/train_speed.py                                  # on a GPU: everything, ~10 min
    python benchmarks/train_speed.py --compile                        # also each script with --compile
    python benchmarks/train_speed.py --models dcgan --warmup 3 --steps 10 --fid-images 100   # CPU

For each model at its CelebA default (64x64, its own default batch), in a fresh process each:

* ours: the script's own main() on `--data celeba`, served from data.py's uint8 cache of a
  generated folder of CelebA-sized JPEGs (178x218), repeated to CelebA's 202,599 training
  images; every option at its default (bf16 autocast and channels-last on CUDA, fused Adam).
* conventional: the same script and networks, but its batches come from torchvision's
  ImageFolder + DataLoader (--workers processes) decoding the JPEGs every epoch
  (Resize, CenterCrop, ToTensor, Normalize), float32 (--no-amp), no channels-last, and Adam as
  the plain `torch.optim.Adam(params, lr, betas)`. The training step itself is the script's,
  which already has no per-step host synchronisation: the ratio is conservative.
* pytorch/examples' dcgan/main.py (with --examples PATH, unmodified; its per-step log lines are
  timed as they arrive) on the same JPEG folder, at the same batch and image size.

Images/s is measured over --steps optimizer steps after --warmup steps (compilation, cuDNN
autotuning and DataLoader start-up fall in the warm-up), with the device synchronised at both
ends. FID: metrics.compute_features on --fid-images generated 64x64 images (DCGAN generator)
against a plain float32 loop over the same Inception network; also the end-to-end seconds from
generating the images to FID statistics (mu, sigma). Without the pytorch-fid weights
(--fid-weights, or torch.hub's cache) the network has random weights: the speed is the same.
"""
import argparse
import contextlib
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402

MODELS = ["dcgan", "mlp_gan", "vae_conv", "mlp_vae", "vaegan"]
CELEBA_TRAIN = 202_599  # img_align_celeba holds 202,599 images (all splits)


# ---------------------------------------------------------------- a CelebA-sized JPEG folder

def _write_faces(job):
    """JPEGs of 178x218 with smooth face-like content (a few KB each, as CelebA's)."""
    from PIL import Image, ImageDraw, ImageFilter
    folder, start, stop = job
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        bg = (np.linspace(0, 1, 218)[:, None, None] * (bottom - top) + top) * np.ones((1, 178, 1))
        img = Image.fromarray(bg.astype(np.uint8))
        d = ImageDraw.Draw(img)
        skin = tuple(int(v) for v in rng.uniform([150, 100, 80], [255, 200, 170]))
        hair = tuple(int(v) for v in rng.uniform(0, 120, 3))
        cx, cy = 89 + rng.normal(0, 4), 120 + rng.normal(0, 4)
        w, h = rng.uniform(38, 50), rng.uniform(52, 64)
        d.ellipse([cx - w - 8, cy - h - 14, cx + w + 8, cy + h * 0.4], fill=hair)
        d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=skin)
        for ex in (-1, 1):
            d.ellipse([cx + ex * 18 - 7, cy - 14, cx + ex * 18 + 7, cy - 6], fill=(40, 30, 30))
        d.chord([cx - 18, cy + 18, cx + 18, cy + 38], 0, 180, fill=(150, 60, 60))
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (218, 178, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def make_folders(work, distinct, total):
    """work/jpegs/faces: `distinct` JPEGs; work/celeba/faces: `total` entries, symbolic links that
    repeat them (an ImageFolder root with one class, as pytorch/examples' dcgan reads it)."""
    src = work / "jpegs" / "faces"
    if len(list(src.glob("*.jpg"))) != distinct:
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        step = 250
        with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(_write_faces, [(src, i, min(distinct, i + step)) for i in range(0, distinct, step)]))
    rep = work / "celeba" / "faces"
    if not rep.is_dir() or len(os.listdir(rep)) != total:
        shutil.rmtree(rep, ignore_errors=True)
        rep.mkdir(parents=True)
        for i in range(total):
            os.symlink(src / f"{i % distinct:06d}.jpg", rep / f"{i:06d}.jpg")
    return src, rep.parent


# ---------------------------------------------------------------- one measurement (child process)

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wraps a loader's epoch(): marks the time when batch `warmup` and batch `warmup + steps`
    are handed out (each after the steps before it have finished: the device is synchronised)."""

    def __init__(self, warmup, steps, batch):
        self.warmup, self.steps, self.batch, self.marks = warmup, steps, batch, []

    def wrap(self, epoch_fn):
        timer = self

        def epoch(loader, e=0, start=0):
            for i, x in enumerate(epoch_fn(loader, e, start=start)):
                if e == 0 and i in (timer.warmup, timer.warmup + timer.steps):
                    _sync(x.device)
                    timer.marks.append(time.perf_counter())
                yield x
        return epoch

    def rate(self):
        if len(self.marks) != 2:
            raise RuntimeError(f"the timed window was not reached ({len(self.marks)} of 2 marks): "
                               "fewer steps in one epoch than --warmup + --steps + 1?")
        return self.steps * self.batch / (self.marks[1] - self.marks[0])


def conventional_loader(folder, size, channels, crop, workers):
    """A stand-in for data.Loader: torchvision ImageFolder + DataLoader decoding the JPEGs every
    epoch, float32 batches in [-1, 1] copied to the device as they come (no pinned memory, no
    channels-last)."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    tf = T.Compose(([T.CenterCrop(crop)] if crop else []) + ([T.Grayscale()] if channels == 1 else []) +
                   [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)])

    class ConventionalLoader:
        def __init__(self, images, batch_size, device, seed=0, **ignored):
            self.device = torch.device(device)
            self.images = images  # as data.Loader's: a VAE's end-of-epoch reconstructions take their first 32
            self.loader = torch.utils.data.DataLoader(
                D.ImageFolder(folder, tf), batch_size, shuffle=True, num_workers=workers, drop_last=True,
                generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.loader)

        def epoch(self, epoch=0, start=0):  # (start: the scripts' resume; the benchmark starts at 0)
            for i, (x, _) in enumerate(self.loader):
                if i >= start:
                    yield x.to(self.device)
    return ConventionalLoader


def child(spec):
    """Run one script's main() as `spec` says; returns a result dict."""
    import importlib
    import torch.nn as nn
    work, kind, name = pathlib.Path(spec["work"]), spec["kind"], spec["model"]
    device = torch.device(spec["device"])
    script = importlib.import_module(name)
    args = script.get_parser().parse_args([])
    batch = spec.get("batch_size") or args.batch_size
    timer = Timer(spec["warmup"], spec["steps"], batch)
    asked = {}
    real_load = data.load

    def load(name_or_folder, root="data", split="train", img_size=None, channels=None, crop=None, **kw):
        # celeba -> data.py's cache of the generated folder, repeated to CelebA's size (train).
        asked.update(size=img_size or data.DEFAULT_IMG_SIZE["celeba"], channels=channels or 3, crop=crop)
        base = real_load(spec["distinct"], root=str(work), img_size=asked["size"], channels=asked["channels"],
                         crop=crop, cache_dir=str(work / "cache"), verbose=False)
        if split != "train" or kind == "conventional":  # held-out set, recon rows: the distinct images
            return base
        idx = torch.arange(spec["images"]) % len(base.images)
        return data.ImageSet(base.name, base.images[idx])
    data.load = load

    if kind == "conventional":
        class Conventional:  # built when the script asks, once data.load has told the image size
            def __new__(cls, *a, **k):
                loader_cls = conventional_loader(spec["folder"], asked["size"], asked["channels"],
                                                 asked["crop"], spec["workers"])
                loader_cls.epoch = timer.wrap(loader_cls.epoch)
                return loader_cls(*a, **k)
        data.Loader = Conventional
        real_to = nn.Module.to

        def to(self, *a, **k):  # no channels-last weights
            k.pop("memory_format", None)
            return real_to(self, *a, **k)
        nn.Module.to = to
        real_adam = torch.optim.Adam

        class PlainAdam(real_adam):  # what `optim.Adam(params, lr, betas)` gives
            def __init__(self, params, *a, fused=None, foreach=None, **k):
                super().__init__(params, *a, **k)
        torch.optim.Adam = PlainAdam
    else:
        data.Loader.epoch = timer.wrap(data.Loader.epoch)

    argv = ["--data", "celeba", "--data-root", str(work), "--device", str(device),
            "--out", str(work / "runs" / f"{name}-{kind}"), "--batch-size", str(batch),
            "--max-steps", str(spec["warmup"] + spec["steps"] + 1), "--epochs", "1", "--seed", "0"]
    argv += ["--no-amp"] if kind == "conventional" else []
    argv += ["--compile"] if kind == "compiled" else []
    shutil.rmtree(work / "runs" / f"{name}-{kind}", ignore_errors=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the script's own log goes to the child's log
        script.main(argv)
    return {"model": name, "kind": kind, "img_size": asked["size"], "batch": batch, "img_per_s": timer.rate(),
            "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- FID feature throughput

def fid_child(spec):
    import dcgan
    import metrics
    device = torch.device(spec["device"])
    n, bs = spec["fid_images"], spec["fid_batch"]
    try:
        model = metrics.load_inception(spec["fid_weights"], device)
        weights = "pytorch-fid"
    except metrics.MetricsError:
        model = metrics.InceptionFID().requires_grad_(False).eval().to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        weights = "random (speed only)"
    plain = metrics.InceptionFID().requires_grad_(False).eval().to(device)  # float32, contiguous
    plain.load_state_dict(model.state_dict())
    G, _ = dcgan.build(dict(latent_dim=100, ngf=64, ndf=64, channels=3, img_size=64))
    G = G.to(device).eval()

    def generate():
        out = torch.empty(n, 3, 64, 64, dtype=torch.uint8)
        with torch.no_grad():
            for i in range(0, n, 500):
                z = torch.randn(min(500, n - i), 100, device=device)
                out[i:i + len(z)] = ((G(z).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        return out

    def ours(images):
        feats = metrics.compute_features(images, model, bs, device, progress=False)["pool3"]
        return feats

    def plain_loop(images):
        feats = []
        with torch.no_grad():
            for i in range(0, len(images), bs):
                x = images[i:i + bs].to(device).float() / 255
                feats.append(plain(x)[0].cpu().double().numpy())
        return np.concatenate(feats)

    warm = generate()[:2 * bs]
    ours(warm), plain_loop(warm)  # cuDNN autotuning, allocator
    _sync(device)
    t0 = time.perf_counter()
    images = generate()
    t1 = time.perf_counter()
    f_ours = ours(images)
    t2 = time.perf_counter()
    mu, sigma = metrics.stats_from_features(f_ours) if hasattr(metrics, "stats_from_features") else (None, None)
    t3 = time.perf_counter()
    f_plain = plain_loop(images)
    t4 = time.perf_counter()
    return {"kind": "fid", "images": n, "batch": bs, "weights": weights,
            "ours_img_per_s": n / (t2 - t1), "plain_img_per_s": n / (t4 - t3),
            "generate_s": t1 - t0, "stats_s": t3 - t2, "end_to_end_s": t3 - t0,
            "max_feature_diff": float(np.abs(f_ours - f_plain).max())}


# ---------------------------------------------------------------- pytorch/examples dcgan

def examples_dcgan(path, folder, batch, warmup, steps, device, workers, log):
    """Images/s of pytorch/examples' dcgan/main.py, unmodified: its per-step log lines are
    timestamped as they arrive (each follows .item() calls, so the device has caught up), and
    the process is stopped once the window is over."""
    cmd = [sys.executable, "-u", str(path), "--dataset", "folder", "--dataroot", str(folder),
           "--batchSize", str(batch), "--imageSize", "64", "--workers", str(workers), "--niter", "1",
           "--manualSeed", "0", "--outf", tempfile.mkdtemp(prefix="examples_dcgan_")]
    cmd += ["--cuda"] if device.type == "cuda" else []
    marks = []
    with open(log, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True) as p:
        try:
            for line in p.stdout:
                f.write(line)
                m = re.match(r"\[0/1\]\[(\d+)/\d+\]", line)
                if m and int(m.group(1)) + 1 in (warmup, warmup + steps):  # step i+1 has finished
                    marks.append(time.perf_counter())
                    if len(marks) == 2:
                        break
        finally:
            p.kill()
    if len(marks) != 2:
        raise RuntimeError(f"pytorch/examples dcgan stopped early; see {log}")
    return {"model": "dcgan", "kind": "examples", "img_size": 64, "batch": batch,
            "img_per_s": steps * batch / (marks[1] - marks[0])}


# ---------------------------------------------------------------- main

def machine(device):
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_child(spec, log):
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(r.stderr)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        return {"model": spec.get("model"), "kind": spec["kind"], "error": f"exit {r.returncode}: {tail}"}
    return json.loads(lines[-1][7:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated scripts to measure")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "train_speed"),
                   help="JPEG folders, data.py cache and runs (reused between runs)")
    p.add_argument("--jpegs", type=int, default=2000, help="distinct generated JPEGs")
    p.add_argument("--images", type=int, default=CELEBA_TRAIN, help="images per epoch (the JPEGs repeated)")
    p.add_argument("--batch-size", type=int, default=None, help="default: each script's own default")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps; default 30 on CUDA, 3 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 200 on CUDA, 10 on CPU")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes of the conventional pipelines")
    p.add_argument("--repeat", type=int, default=1, help="measure each pipeline this many times, interleaved; "
                   "the table gives the median (for a busy machine)")
    p.add_argument("--compile", action="store_true", help="also time each script with --compile")
    p.add_argument("--no-conventional", action="store_true", help="time only the scripts")
    p.add_argument("--examples", default=None, help="path to pytorch/examples' dcgan/main.py: time it too")
    p.add_argument("--fid-images", type=int, default=None, help="0: skip; default 50000 on CUDA, 100 on CPU")
    p.add_argument("--fid-batch", type=int, default=None, help="default 200 on CUDA, 50 on CPU")
    p.add_argument("--fid-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (default: torch.hub cache)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # one measurement, in its own process
        spec = json.loads(args.child)
        result = fid_child(spec) if spec["kind"] == "fid" else child(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (30 if gpu else 3)
    steps = args.steps if args.steps is not None else (200 if gpu else 10)
    fid_images = args.fid_images if args.fid_images is not None else (50_000 if gpu else 100)
    fid_batch = args.fid_batch or (200 if gpu else 50)
    work = pathlib.Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    missing = [m for m in models if not (REPO / f"{m}.py").is_file()]
    if missing:
        sys.exit(f"error: no such script: {', '.join(missing)}")

    t0 = time.time()
    distinct, folder = make_folders(work, args.jpegs, args.images)
    print(f"JPEG folder: {args.jpegs} distinct 178x218 JPEGs ({sum(f.stat().st_size for f in distinct.iterdir()) / args.jpegs / 1024:.1f} KB "
          f"each), {args.images:,} entries in {folder} ({time.time() - t0:.0f} s)", file=sys.stderr)
    info = machine(device)
    info["load_before"] = os.getloadavg()
    base = {"work": str(work), "distinct": str(distinct), "folder": str(folder), "images": args.images,
            "device": str(device), "warmup": warmup, "steps": steps, "workers": args.workers,
            "batch_size": args.batch_size}
    kinds = ["ours"] + (["compiled"] if args.compile else []) + ([] if args.no_conventional else ["conventional"])
    results = []
    for m in models:
        for rep in range(args.repeat):  # interleaved, so that a change of load hits every pipeline
            for kind in kinds:
                print(f"{m} {kind} ...", file=sys.stderr, flush=True)
                r = run_child(dict(base, model=m, kind=kind), work / "logs" / f"{m}-{kind}.log")
                r["load"] = os.getloadavg()[0]
                print(f"  {r.get('img_per_s', 0):,.1f} img/s (load {r['load']:.2f})" if "error" not in r
                      else f"  {r['error']}", file=sys.stderr)
                results.append(r)
            if m == "dcgan" and args.examples:
                print("pytorch/examples dcgan ...", file=sys.stderr, flush=True)
                batch = args.batch_size or 128
                try:
                    r = examples_dcgan(args.examples, folder, batch, warmup, steps, device, args.workers,
                                       work / "logs" / "examples-dcgan.log")
                except RuntimeError as e:
                    r = {"model": "dcgan", "kind": "examples", "error": str(e)}
                r["load"] = os.getloadavg()[0]
                print(f"  {r.get('img_per_s', 0):,.1f} img/s (load {r['load']:.2f})", file=sys.stderr)
                results.append(r)
    fid = None
    if fid_images:
        print(f"FID features of {fid_images} images ...", file=sys.stderr, flush=True)
        fid = run_child(dict(base, kind="fid", fid_images=fid_images, fid_batch=fid_batch,
                             fid_weights=args.fid_weights), work / "logs" / "fid.log")
    info["load_after"] = os.getloadavg()

    # The table: one row per model, images/s per pipeline and the ratios.
    def rate(m, kind):  # the median of the repeats
        rates = [r["img_per_s"] for r in results if r.get("model") == m and r["kind"] == kind and "img_per_s" in r]
        return statistics.median(rates) if rates else None
    cols = kinds + (["examples"] if args.examples else [])
    head = f"{'model':<9} {'size':>4} {'batch':>5} " + " ".join(f"{k:>13}" for k in cols) + \
        ("   ours/conv" if "conventional" in kinds else "") + ("   ours/examples" if args.examples else "")
    print(f"\ntraining images/s on {info.get('gpu', info['cpu'])} ({info['cores']} CPU cores), torch {info['torch']}; "
          f"{warmup} warm-up + {steps} timed steps{f', median of {args.repeat}' if args.repeat > 1 else ''}; "
          f"conventional: ImageFolder + DataLoader({args.workers} workers)")
    print(head)
    for m in models:
        r = next((r for r in results if r.get("model") == m and "img_size" in r), {})
        cells = [rate(m, k) for k in cols]
        line = f"{m:<9} {r.get('img_size', '?'):>4} {r.get('batch', '?'):>5} " + \
            " ".join(f"{c:>13,.1f}" if c else f"{'-' if k == 'examples' and m != 'dcgan' else 'error':>13}"
                     for k, c in zip(cols, cells))
        if "conventional" in kinds and rate(m, "ours") and rate(m, "conventional"):
            line += f"   {rate(m, 'ours') / rate(m, 'conventional'):>9.2f}x"
        if args.examples and m == "dcgan" and rate(m, "ours") and rate(m, "examples"):
            line += f"   {rate(m, 'ours') / rate(m, 'examples'):>13.2f}x"
        print(line)
    if fid and "error" not in fid:
        print(f"\nFID features, {fid['images']} generated 64x64 images, batch {fid['batch']} ({fid['weights']} weights): "
              f"metrics.py {fid['ours_img_per_s']:,.1f} img/s, plain float32 loop {fid['plain_img_per_s']:,.1f} img/s "
              f"({fid['ours_img_per_s'] / fid['plain_img_per_s']:.2f}x); generate + features + statistics "
              f"{fid['end_to_end_s']:.1f} s; largest feature difference {fid['max_feature_diff']:.2e}")
    elif fid:
        print(f"\nFID: {fid['error']}")
    print(f"load average (1, 5, 15 min): before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}")
    out = {"machine": info, "settings": dict({k: base[k] for k in ("images", "warmup", "steps", "workers", "device")},
                                             repeat=args.repeat),
           "command": " ".join([os.path.basename(sys.executable), "benchmarks/train_speed.py"] + (argv or sys.argv[1:])),
           "results": results, "fid": fid}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    failed = [f"{r.get('model') or ''} {r['kind']}".strip() for r in results + [fid] if r and "error" in r]
    if failed:  # after the table and the JSON: a broken pipeline must not pass for a measured one
        sys.exit(f"error: {len(failed)} of {len(results) + bool(fid)} measurements failed ({', '.join(failed)}); "
                 f"their logs are in {work / 'logs'}")


if __name__ == "__main__":
    main()
