"""Do the speed options change the results? Short real-MNIST trainings of each model script with
and without each option, compared against the spread between seeds. Writes per model a PNG of
the loss curves, and prints a table (also written as summary.md) to --out.

    python benchmarks/amp_compile_curves.py --data-root data --models dcgan,mlp_gan --steps 300
    python benchmarks/amp_compile_curves.py --options amp,compile --device cuda     # on a GPU

Each run is the script's own main() on `--data mnist` in a fresh process, seed 0 unless said:

  base, seed1 ...      the defaults of the device, seeds 0 .. --seeds-1: the yardstick
  amp                  --amp: bfloat16 autocast (on by default on CUDA; there, `base` is --no-amp)
  channels-last        networks and batches in channels-last memory format (the CUDA default)
  plain-optim          Adam/RMSprop as the for-loop implementation (foreach=False, fused=False)
  fused-optim          Adam with fused=True (the CUDA default; RMSprop has no fused kernel)
  compile              --compile (torch.compile)

On CUDA `base` is --no-amp with the CUDA defaults (channels-last, fused Adam), so there the
channels-last and fused-optim rows repeat it; the script is meant for amp and compile there.

The device-side NaN flag changes no number (it only moves the host check to log steps), so it
has no run. For every logged loss the table gives the mean over the second half of the run,
and for each option its distance from the mean of the seeds in units of their standard
deviation (|z|): a value within the seeds' own scatter (|z| below about 3) is "unchanged".
A GAN's trajectory is chaotic: any rounding change (channels-last alone) moves it as far as a
new seed does, so the yardstick needs several seeds.
"""
import argparse
import csv
import json
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ["dcgan", "mlp_gan", "vae_conv", "mlp_vae", "vaegan"]
CONV = {"dcgan", "vae_conv", "vaegan"}  # the models channels-last applies to
OPTIONS = ["amp", "channels-last", "plain-optim", "fused-optim", "compile"]
EXTRA = {"vaegan": ["--width", "16"]}  # a quarter of the paper's width: CPU time (--full-width to drop it)
NOT_LOSSES = {"step", "epoch", "img_per_s", "loss_d_real", "loss_d_fake"}
OPTION_COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def colour(config):
    """base black, other seeds grey, each option its own colour."""
    if config == "base":
        return (0, 0, 0)
    if config.startswith("seed"):
        return (175, 175, 175)
    return OPTION_COLOURS[OPTIONS.index(config) % len(OPTION_COLOURS)]


def child(spec):
    """One run: patch what the option needs, then the script's main()."""
    import importlib
    import torch
    import torch.nn as nn
    import data
    option = spec["option"]
    if option == "channels-last":
        real_to, real_init = nn.Module.to, data.Loader.__init__

        def to(self, *a, **k):
            if "memory_format" in k:
                k["memory_format"] = torch.channels_last
            return real_to(self, *a, **k)

        def init(self, *a, **k):
            real_init(self, *a, **dict(k, channels_last=True))
        nn.Module.to, data.Loader.__init__ = to, init
    if option in ("plain-optim", "fused-optim"):
        for name in ("Adam", "RMSprop"):
            real = getattr(torch.optim, name)
            impl = {"foreach": False, **({"fused": option == "fused-optim"} if name == "Adam" else {})}

            def make(real=real, impl=impl):
                class Optim(real):
                    def __init__(self, params, *a, fused=None, foreach=None, **k):
                        super().__init__(params, *a, **k, **impl)
                return Optim
            setattr(torch.optim, name, make())
    script = importlib.import_module(spec["model"])
    script.main(spec["argv"])


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c not in NOT_LOSSES and not c.startswith(("D(", "test_"))] if rows else []
    # Step rows only (a VAE adds a held-out row at the epoch end with the same step).
    seen, out = set(), []
    for r in rows:
        if r["step"] not in seen and r.get(cols[0], "") != "":
            seen.add(r["step"])
            out.append(r)
    cols = [c for c in cols if all(r.get(c, "") != "" for r in out)]
    return cols, [[float(r[c]) for r in out] for c in cols], [int(r["step"]) for r in out]


def plot(path, title, curves, steps):
    """curves: {config: {column: values}}: one panel per column, moving averages of 5 points."""
    from PIL import Image, ImageDraw
    configs = list(curves)
    legend = [k for k in configs if not k.startswith("seed")]
    legend.insert(1, "seed1 ... (grey)")
    cols = list(next(iter(curves.values())))
    w, h, pad = 520, 220, 40
    img = Image.new("RGB", (w * min(2, len(cols)), (h + 10) * ((len(cols) + 1) // 2) + 40 + 16 * len(legend)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 5), title, fill="black")
    for i, c in enumerate(cols):
        x0, y0 = (i % 2) * w, 25 + (i // 2) * (h + 10)
        series = {k: [statistics.fmean(v[c][max(0, j - 4):j + 1]) for j in range(len(v[c]))] for k, v in curves.items()}
        lo = min(min(s) for s in series.values())
        hi = max(max(s) for s in series.values())
        hi = hi if hi > lo else lo + 1
        d.rectangle([x0 + pad, y0, x0 + w - 10, y0 + h - 20], outline=(200, 200, 200))
        d.text((x0 + pad + 5, y0 + 3), c, fill="black")
        d.text((x0 + 2, y0), f"{hi:.3g}", fill="black")
        d.text((x0 + 2, y0 + h - 32), f"{lo:.3g}", fill="black")
        d.text((x0 + w - 60, y0 + h - 18), f"step {steps[-1]}", fill="black")
        for k, s in sorted(series.items(), key=lambda kv: kv[0] == "base"):  # base drawn last, on top
            pts = [(x0 + pad + (w - pad - 10) * j / max(1, len(s) - 1), y0 + (h - 20) * (hi - v) / (hi - lo))
                   for j, v in enumerate(s)]
            d.line(pts, fill=colour(k), width=1 if k.startswith("seed") else 2)
    y = img.height - 16 * len(legend) - 8
    for j, k in enumerate(legend):
        d.line([(10, y + 16 * j + 6), (40, y + 16 * j + 6)], fill=colour(k.split()[0]), width=3)
        d.text((48, y + 16 * j), k, fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {', '.join(OPTIONS)}")
    p.add_argument("--data-root", default="data", help="holds MNIST/raw (the cache is written under it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, default=5, help="runs of the defaults, seeds 0, 1, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--out", default="/tmp/amp_curves")
    p.add_argument("--full-width", action="store_true", help="every model at its default width")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    out = pathlib.Path(args.out)
    options = [o for o in args.options.split(",") if o]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        p.error(f"unknown options: {', '.join(sorted(unknown))}")
    seeds = {"base": 0, **{f"seed{i}": i for i in range(1, args.seeds)}}
    cuda = args.device.startswith("cuda")
    table = [f"# Speed options on real MNIST ({args.steps} steps, batch {args.batch_size}, device {args.device})", "",
             f"| model | loss | seeds 0-{args.seeds - 1}: mean (sd) of the 2nd-half means | " + " | ".join(f"{o} (z)" for o in options) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in options) + " |"]
    for model in args.models.split(","):
        configs = list(seeds) + [o for o in options if o != "channels-last" or model in CONV]
        curves, steps = {}, None
        for cfg in configs:
            run = out / "runs" / f"{model}-{cfg}"
            argv_ = ["--data", "mnist", "--data-root", args.data_root, "--device", args.device, "--out", str(run),
                     "--max-steps", str(args.steps), "--epochs", "1", "--batch-size", str(args.batch_size),
                     "--log-every", str(args.log_every), "--seed", str(seeds.get(cfg, 0))]
            argv_ += ["--amp"] if cfg == "amp" else (["--no-amp"] if cuda else [])  # base: float32 everywhere
            argv_ += ["--compile"] if cfg == "compile" else []
            argv_ += [] if args.full_width else EXTRA.get(model, [])
            t0 = time.time()
            if not (run / "ckpt.pt").is_file():  # written when a run ends: finished runs are kept
                spec = {"model": model, "option": cfg, "argv": argv_}
                r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=REPO,
                                   capture_output=True, text=True)
                (out / "logs").mkdir(parents=True, exist_ok=True)
                (out / "logs" / f"{model}-{cfg}.log").write_text(r.stdout + r.stderr)
                if r.returncode != 0:
                    print(f"{model} {cfg}: failed, see {out / 'logs'}", file=sys.stderr)
                    continue
            cols, values, steps_ = read_csv(run / "losses.csv")
            curves[cfg] = dict(zip(cols, values))
            steps = steps or steps_
            print(f"{model} {cfg}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if not all(s in curves for s in seeds):
            continue
        plot(out / f"{model}.png", f"{model}.py on MNIST: {args.steps} steps, batch {args.batch_size}, {args.device}",
             curves, steps)
        for col in curves["base"]:
            half = lambda v: statistics.fmean(v[len(v) // 2:])  # noqa: E731
            by_seed = [half(curves[s][col]) for s in seeds]
            mu, sd = statistics.fmean(by_seed), statistics.stdev(by_seed)
            cells = []
            for o in options:
                if o in curves and col in curves[o]:
                    v = half(curves[o][col])
                    cells.append(f"{v:.3f} ({abs(v - mu) / sd:.1f})" if sd > 0 else f"{v:.3f}")
                else:
                    cells.append("-")
            table.append(f"| {model} | {col} | {mu:.3f} ({sd:.3f}) | " + " | ".join(cells) + " |")
    text = "\n".join(table) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
