"""Reproduce one of the five reports: its trainings at its own settings, scored, beside its numbers.

    python benchmarks/reproduce.py cifar10 --weights pt_inception-2015-12-05-6726825d.pth
    python benchmarks/reproduce.py mnist --lapvar-only --parallel 2     # no Inception weights needed
    python benchmarks/reproduce.py celeba-gans --dry-run                 # print the commands only
    python benchmarks/reproduce.py celeba-vae-gan-vaegan --quick --data fake --weights W   # a smoke run

REPORT is one of celeba-dcgan-vae, celeba-vae-gan-vaegan, mnist, celeba-gans, cifar10 (the README's
"Reproducing the reports" says what each report is and where we deliberately differ from it). Each
training runs through its script's real command line with --sample (and latent_edit.py sample --recon
writes the held-out reconstructions where the report scored those); metrics.py --json scores every sample
folder and the real held-out images (the 'Real' row); then OUT/REPORT.md gets a table of the published numbers beside ours, a
table of the runs (wall time, images/s, final losses, held-out -ELBO, Laplacian variance, IS, FID)
and copies of the grids and loss plots the report showed.

Run it again to continue: a run whose checkpoint has reached its epochs (or --max-steps) and whose
samples are written is skipped, a half-finished one continues with --resume, and the scores already
in OUT/REPORT.json are reused. --quick shrinks every run to a few optimizer steps and 5 samples (a
smoke run on a CPU: its numbers mean nothing).
"""
import argparse
import csv
import datetime
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import metrics  # noqa: E402

N = 10000                # images scored per model: the CIFAR-10 report's 10,000; the others do not say
QUICK = {"--max-steps": "2", "--batch-size": "16"}   # --quick: every run stops after 2 optimizer steps
QUICK_N = 5              # --quick: samples per model (the Inception Score then has 5 splits of 1)
EPOCHS, IS, FID, LAP, TIME, BEST = ("epochs", "Inception Score", "FID", "Laplacian variance", "training time",
                                    "epochs to the best result")

# Each report: its data, its runs (name: the script and the report's settings; --data, --data-root,
# --out, --device and --sample are added), the sets scored (label, folder under OUT), whether FID is
# computed (against the held-out split, the 'Real' row), the numbers it published exactly as printed
# (label: {measure: text}), the epochs whose grids it showed, and the commands run after the trainings.
REPORTS = {
    "celeba-dcgan-vae": {
        "title": "DCGAN vs deep convolutional VAE on CelebA 64x64, with attribute vectors",
        "data": "celeba",
        "runs": {"dcgan": ["dcgan.py", "--epochs", "60", "--batch-size", "128", "--latent-dim", "100"],
                 "vae_conv": ["vae_conv.py", "--epochs", "50", "--batch-size", "256", "--recon", "mse"]},
        "sets": [("DCGAN", "dcgan/samples"), ("VAE", "vae_conv/samples")],
        "fid": True,
        "published": {"DCGAN": {EPOCHS: "about 60 (faces after about 50)", TIME: "about 6.5 hours"},
                      "VAE": {EPOCHS: "about 50", TIME: "about 4.5 hours for 50 epochs"}},
        "grids": {},
        # The smile and eyeglasses vectors (CelebA's attributes: skipped with another --data).
        "after": [("vae_conv", "the smile vector: faces without a smile, reconstructed, then decode(z + 2.5 z_att)",
                   ["latent_edit.py", "attribute", "--ckpt", "{out}/vae_conv/ckpt.pt", "--attr", "Smiling",
                    "--intensity", "2.5", "--out", "{out}/figures/vae_conv_edit_Smiling.png"]),
                  ("vae_conv", "the eyeglasses vector, the same way",
                   ["latent_edit.py", "attribute", "--ckpt", "{out}/vae_conv/ckpt.pt", "--attr", "Eyeglasses",
                    "--intensity", "2.5", "--out", "{out}/figures/vae_conv_edit_Eyeglasses.png"]),
                  ("vae_conv", "the smile vector decoded: decode(k z_att), and added to the mean face",
                   ["latent_edit.py", "vector", "--ckpt", "{out}/vae_conv/ckpt.pt", "--attr", "Smiling",
                    "--out", "{out}/figures/vae_conv_vector_Smiling.png"])],
    },
    "celeba-vae-gan-vaegan": {
        "title": "VAE vs GAN vs VAE-GAN on CelebA: Inception Score, Laplacian variance, latent space",
        "data": "celeba",
        "runs": {"dcgan": ["dcgan.py", "--epochs", "500"],
                 "vaegan": ["vaegan.py", "--epochs", "200", "--gamma", "15"],
                 "vaegan-gamma1.5": ["vaegan.py", "--epochs", "200", "--gamma", "1.5"],
                 "vae_conv": ["vae_conv.py", "--epochs", "20", "--latent-dim", "128", "--recon", "mse"]},
        "sets": [("VAE", "vae_conv/samples"), ("GAN", "dcgan/samples"), ("VAE-GAN (gamma 15)", "vaegan/samples"),
                 ("VAE-GAN (gamma 1.5)", "vaegan-gamma1.5/samples")],
        "fid": False,  # the report's table 4.1 is IS and Laplacian variance
        "published": {"VAE": {EPOCHS: "about 20 (converged)", IS: "1.704", LAP: "251.79", BEST: "20"},
                      "GAN": {EPOCHS: "500 (stable after about 300)", IS: "2.650", LAP: "2506.18", BEST: "300"},
                      "VAE-GAN (gamma 15)": {EPOCHS: "200", IS: "1.231", LAP: "1360.62", BEST: "150"},
                      "VAE-GAN (gamma 1.5)": {EPOCHS: "200"},
                      "Real": {IS: "4.239", LAP: "1073.71"}},
        "grids": {"vae_conv": [1, 10, 20], "dcgan": [5, 300, 500], "vaegan": [5, 100, 150]},
        # The 2-D map of the trained 128-d VAE's codes (the first two principal directions).
        "after": [("vae_conv", "the VAE's codes of held-out images in 2-D",
                   ["latent_edit.py", "scatter", "--ckpt", "{out}/vae_conv/ckpt.pt",
                    "--out", "{out}/figures/vae_conv_scatter.png"])],
    },
    "mnist": {
        "title": "DCGAN vs fully connected VAE on MNIST (with the other three scripts beside them)",
        "data": "mnist",
        "runs": {"dcgan": ["dcgan.py", "--arch", "mnist-report", "--epochs", "10"],
                 "vaegan": ["vaegan.py", "--img-size", "32", "--width", "32", "--epochs", "1"],  # half width: CPU
                 "vae_conv": ["vae_conv.py", "--img-size", "32", "--recon", "bce", "--epochs", "3"],  # nats
                 "mlp_gan": ["mlp_gan.py", "--epochs", "20"],
                 "mlp_vae": ["mlp_vae.py", "--epochs", "5"]},
        "sets": [("DCGAN (the report's networks)", "dcgan/samples"), ("MLP VAE (the report's, latent 2)",
                 "mlp_vae/samples"), ("vanilla GAN (mlp_gan.py)", "mlp_gan/samples"),
                 ("conv VAE (vae_conv.py)", "vae_conv/samples"), ("VAE-GAN (vaegan.py)", "vaegan/samples")],
        "fid": True,
        "published": {"DCGAN (the report's networks)": {EPOCHS: "10 (longer made digits fade)"},
                      "MLP VAE (the report's, latent 2)": {EPOCHS: "about 5"}},
        "grids": {},
        "real_sizes": (28, 32),  # the Laplacian variance of the real test set at both sizes the models make
        "after": [],
    },
    "celeba-gans": {
        "title": "Vanilla GAN vs DCGAN on CelebA 64x64",
        "data": "celeba",
        "runs": {"dcgan": ["dcgan.py", "--arch", "celeba-gans-report", "--epochs", "50", "--batch-size", "256",
                           "--lr", "0.0002"],
                 "mlp_gan": ["mlp_gan.py", "--epochs", "50", "--batch-size", "256", "--lr", "0.0002"]},
        "sets": [("vanilla GAN", "mlp_gan/samples"), ("DCGAN", "dcgan/samples")],
        "fid": True,
        "published": {"vanilla GAN": {EPOCHS: "50"}, "DCGAN": {EPOCHS: "50"},
                      "both GANs": {TIME: "approximately four days (PyTorch 1.0)"}},
        "grids": {"mlp_gan": [1, 5, 50], "dcgan": list(range(2, 51, 2))},  # "25 grids with increasing epoch"
        # Sixteen DCGAN images "passed as real images by the discriminator": D's probability >= 0.5.
        "after": [("dcgan", "16 DCGAN samples the discriminator passed as real",
                   ["latent_edit.py", "sample", "--ckpt", "{out}/dcgan/ckpt.pt", "--d-filter", "0.5", "--grid", "4",
                    "--out", "{out}/figures/dcgan_passed.png"])],
    },
    "cifar10": {
        "title": "DCGAN vs VAE on CIFAR-10: IS and FID",
        "data": "cifar10",
        "runs": {"vae_conv": ["vae_conv.py", "--arch", "cifar10-report", "--recon", "bce", "--epochs", "100"],
                 "dcgan": ["dcgan.py", "--arch", "cifar10-report", "--flip", "--lr-decay", "linear",
                           "--epochs", "128"]},
        "sets": [("DCGAN", "dcgan/samples"), ("VAE (reconstructions of test images)", "vae_conv/recon"),
                 ("VAE (prior samples)", "vae_conv/samples")],
        "fid": True,
        "published": {"DCGAN": {EPOCHS: "128", IS: "5.48", FID: "58.4"},
                      "VAE (reconstructions of test images)": {EPOCHS: "100", IS: "2.9", FID: "163.3"}},
        "grids": {},
        # The report scored the VAE on reconstructed test images: decode(mu(x)) of the first N, into vae_conv/recon.
        "after": [("vae_conv", "the VAE's reconstructions of the first held-out images (the report's protocol)",
                   ["latent_edit.py", "sample", "--ckpt", "{out}/vae_conv/ckpt.pt", "--recon", "--n", "{n}",
                    "--out-dir", "{out}/vae_conv", "--out", "{out}/figures/vae_conv_recon.png"])],
    },
}
# The loss columns of the runs table, per script (the last logged row); vaegan: all of its own.
LOSSES = {"dcgan": ["loss_d", "loss_g"], "mlp_gan": ["loss_d", "loss_g"], "mlp_vae": ["recon", "kl"],
          "vae_conv": ["recon", "kl"], "vaegan": None}


def get_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("report", choices=list(REPORTS), help="which report to reproduce")
    p.add_argument("--data", default=None, help="dataset of every run; default: the report's (fake: a smoke test)")
    p.add_argument("--data-root", default="data", help="where datasets and the decoded cache live")
    p.add_argument("--out", default=None, help="one sub-folder per run, REPORT.md; default runs/reproduce-REPORT")
    p.add_argument("--epochs", default="", help="override the report's epochs: name=N pairs, e.g. dcgan=3,mlp_vae=20")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: each training stops after {QUICK['--max-steps']} steps of batch "
                        f"{QUICK['--batch-size']}, {QUICK_N} samples per model")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for metrics.py; default: "
                                                   "torch.hub's cache (downloaded when online)")
    p.add_argument("--lapvar-only", action="store_true", help="score the Laplacian variance only (no Inception)")
    p.add_argument("--device", default="auto", help="passed to every script and to metrics.py")
    p.add_argument("--parallel", type=int, default=1,
                   help="trainings at a time (on a CPU each gets its share of the cores)")
    return p.parse_args(argv)


def check_args(args):
    """Every flag, before any training: one sentence each."""
    spec = REPORTS[args.report]
    args.data = args.data or spec["data"]
    if args.data not in data.DATASETS and not os.path.isdir(args.data):
        sys.exit(f"error: --data {args.data} is neither a dataset ({', '.join(data.DATASETS)}) nor a folder")
    if args.parallel < 1:
        sys.exit(f"error: --parallel must be at least 1, got {args.parallel}")
    args.epoch_overrides = {}
    for pair in filter(None, args.epochs.split(",")):
        name, _, n = pair.partition("=")
        if name not in spec["runs"] or not n.isdigit() or int(n) < 1:
            sys.exit(f"error: --epochs {pair}: give name=N with N >= 1 and a name among {', '.join(spec['runs'])}")
        args.epoch_overrides[name] = n
    if args.lapvar_only and args.weights:
        sys.exit("error: --lapvar-only needs no Inception weights; drop --weights or --lapvar-only")
    try:
        data.resolve_device(args.device)
        if not args.lapvar_only and not args.dry_run:  # found (or downloaded) now, not after the trainings
            args.weights = metrics.weights_path(args.weights)
    except (metrics.MetricsError, data.DataError) as e:
        sys.exit(f"error: {e}" + ("" if args.weights else "; or pass --lapvar-only to score sharpness only"))
    args.out = os.path.abspath(args.out or os.path.join("runs", f"reproduce-{args.report}"))
    args.data_root = os.path.abspath(args.data_root)
    if os.path.isdir(args.data):
        args.data = os.path.abspath(args.data)
    if not args.dry_run:  # an output folder that cannot be written is found now
        try:
            os.makedirs(os.path.join(args.out, "figures"), exist_ok=True)
            tempfile.TemporaryFile(dir=args.out).close()
        except OSError as e:
            sys.exit(f"error: cannot write to --out {args.out} ({e.strerror}); choose another folder")


def set_flag(cmd, flag, value):
    """cmd with flag's value replaced (or the flag appended)."""
    if flag in cmd:
        cmd = list(cmd)
        cmd[cmd.index(flag) + 1] = value
        return cmd
    return cmd + [flag, value]


def common(args):
    """--data-root and --device where they are not the scripts' defaults."""
    return ((["--data-root", args.data_root] if args.data_root != os.path.join(ROOT, "data") else []) +
            (["--device", args.device] if args.device != "auto" else []))


def plan(args, spec):
    """{run: its command} at the report's settings, and [(run it follows, caption, command)] of the steps
    after the trainings."""
    n = str(QUICK_N if args.quick else N)
    runs = {}
    for name, (script, *settings) in spec["runs"].items():
        cmd = [sys.executable, script, "--data", args.data, *settings, "--out", os.path.join(args.out, name),
               "--sample", n] + common(args)
        if name in args.epoch_overrides:
            cmd = set_flag(cmd, "--epochs", args.epoch_overrides[name])
        for flag, value in QUICK.items() if args.quick else []:
            cmd = set_flag(cmd, flag, value)
        runs[name] = cmd
    after = []
    for run, caption, (script, *rest) in spec["after"]:
        if "--attr" in rest and args.data != "celeba":
            continue  # Smiling and Eyeglasses are CelebA's attributes: with another --data the edits are skipped
        cmd = [sys.executable, script] + [a.format(out=args.out, n=n) for a in rest] + common(args)
        if "--d-filter" in cmd and args.quick:  # two steps of training leave D undecided: keep every sample
            cmd = set_flag(cmd, "--d-filter", "0")
        after.append((run, caption, cmd))
    return runs, after


def show(cmd):
    """A command as the user would type it: python, paths relative to the current folder."""
    here = os.getcwd() + os.sep
    return shlex.join(["python"] + [os.path.relpath(a) if a.startswith(here) else a for a in cmd[1:]])


def count_pngs(folder):
    return len(glob.glob(os.path.join(folder, "*.png")))


def flag_value(cmd, flag, default=None):
    return cmd[cmd.index(flag) + 1] if flag in cmd else default


def resume_or_skip(cmd):
    """None when the run is done (trained to its epochs or --max-steps, its images written); else the
    command to run: the fresh one, or with --resume (--epochs 0: only the images are missing)."""
    out = flag_value(cmd, "--out")
    ckpt_path = os.path.join(out, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        return cmd
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, not a checkpoint)
        sys.exit(f"error: {ckpt_path} cannot be read ({type(e).__name__}); delete {out} to start that run again")
    if ckpt["args"]["data"] != flag_value(cmd, "--data"):
        sys.exit(f"error: {out} was trained on --data {ckpt['args']['data']}, not {flag_value(cmd, '--data')}; "
                 f"use another --out")
    max_steps = int(flag_value(cmd, "--max-steps", 0))
    trained = ckpt["epoch"] >= int(flag_value(cmd, "--epochs")) or 0 < max_steps <= ckpt["step"]
    written = count_pngs(os.path.join(out, "samples")) >= int(flag_value(cmd, "--sample", 0))
    if trained and written:
        return None
    cmd = cmd + ["--resume", ckpt_path]
    return set_flag(cmd, "--epochs", "0") if trained else cmd


def run_trainings(todo, args, state):
    """Runs {name: cmd}, --parallel at a time, each logging to OUT/name/train.log; on a CPU each gets
    its own cores. The wall time of each adds to state['wall_s'] (a resumed run keeps counting)."""
    cpu = data.resolve_device(args.device).type == "cpu"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    share = max(1, len(cores) // args.parallel)
    queue, running, free = list(todo.items()), {}, list(range(args.parallel))
    while queue or running:
        while queue and free:
            (name, cmd), slot = queue.pop(0), free.pop(0)
            env, pin = dict(os.environ), None
            if cpu and cores:  # one slot's cores and as many threads: runs do not fight over cores
                mine = cores[slot * share:(slot + 1) * share] or cores
                env.setdefault("OMP_NUM_THREADS", str(len(mine)))  # one already set wins
                pin = lambda mine=mine: os.sched_setaffinity(0, mine)  # noqa: E731
            print("$", show(cmd), flush=True)
            log = open(os.path.join(flag_value(cmd, "--out"), "train.log"), "a")
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              preexec_fn=pin), time.time(), slot, log)
        try:
            time.sleep(1)
        except KeyboardInterrupt:  # Ctrl-C reached the runs too: each saves its checkpoint and stops
            for name, (proc, t0, *_) in running.items():
                proc.wait()
                state["wall_s"][name] = state["wall_s"].get(name, 0) + time.time() - t0  # the time it did train
            save_state(args, state)
            sys.exit("stopped: each run saved its checkpoint; run the same command again to continue")
        for name, (proc, t0, slot, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            free.append(slot)
            log.close()
            state["wall_s"][name] = state["wall_s"].get(name, 0) + time.time() - t0
            save_state(args, state)
            if proc.returncode != 0:
                for other_name, (other, other_t0, *_) in running.items():  # they save their checkpoint on SIGTERM
                    other.terminate()
                    other.wait()
                    state["wall_s"][other_name] = state["wall_s"].get(other_name, 0) + time.time() - other_t0
                save_state(args, state)
                sys.exit(f"error: {name} failed (exit {proc.returncode}); see {args.out}/{name}/train.log, "
                         f"then run the same command again to continue")
            print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)


def load_state(args):
    """OUT/REPORT.json of an earlier invocation: the runs' wall times, the scores (dropped when the
    number of images scored changed)."""
    path, n = os.path.join(args.out, "REPORT.json"), QUICK_N if args.quick else N
    state = {"n": n, "wall_s": {}, "scores": {}}
    if os.path.isfile(path):
        with open(path) as f:
            state.update(json.load(f))
    if state["n"] != n:
        state.update(n=n, scores={})
    return state


def save_state(args, state):
    with open(os.path.join(args.out, "REPORT.json"), "w") as f:
        json.dump(state, f, indent=1)


def metrics_command(args, sets, ref):
    """metrics.py --json on sets (FID against ref, unless None), the report's number of images each."""
    cmd = [sys.executable, "metrics.py", *sets, "--n", str(QUICK_N if args.quick else N), "--json"]
    cmd += (["--ref", ref] if ref else []) + common(args)
    return cmd + (["--lapvar-only"] if args.lapvar_only else ["--weights", args.weights] if args.weights else [])


def real_set(args):
    """The 'Real' row: the held-out split of a dataset (a folder: itself)."""
    return f"{args.data}:test" if args.data in data.DATASETS else args.data


def score(args, spec, state):
    """metrics.py --json on every set not scored yet (and the real held-out images), into state['scores']
    keyed by folder relative to OUT: IS, FID against the held-out split, Laplacian variance."""
    n, real, scores = QUICK_N if args.quick else N, real_set(args), state["scores"]
    missing = lambda key: key not in scores or (scores[key]["is_mean"] is None and not args.lapvar_only)  # noqa: E731
    todo = [os.path.join(args.out, folder) for _, folder in spec["sets"] if missing(folder)]
    with_ref = bool(spec["fid"] and todo)  # the reference comes back as a row of its own
    if missing(real) and not with_ref:
        todo.append(real)
    if todo:
        cmd = metrics_command(args, todo, real if with_ref else None)
        print("$", show(cmd), flush=True)
        with open(os.path.join(args.out, "metrics.log"), "a") as log:
            r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        if r.returncode != 0:
            sys.exit(f"error: metrics.py failed (exit {r.returncode}); see {args.out}/metrics.log")
        for key, value in json.loads(r.stdout).items():  # a run's folder, relative to OUT; the real set
            scores[os.path.relpath(key, args.out) if key.startswith(args.out + os.sep) else key] = value
    for size in spec.get("real_sizes", ()):  # the real test set at each size the models make
        key = f"{real} at {size}x{size}"
        if key not in scores:
            test = data.load(args.data, root=args.data_root, split="test", img_size=size, verbose=False).images[:n]
            v = metrics.laplacian_variance(test)
            scores[key] = {"lapvar": float(v.mean()), "lapvar_std": float(v.std()), "is_mean": None, "is_std": None}
    save_state(args, state)


def summarise(out):
    """Epochs, steps, mean images/s, final losses and held-out loss of one run, from its files."""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(out, "losses.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("img_per_s")]
    cols = LOSSES[ckpt["script"]] or [c for c in rows[0] if c not in ("step", "epoch", "img_per_s")
                                      and not c.startswith("test")]
    test = [r for r in rows if r.get("test_loss")]
    epochs = f"{ckpt['epoch']}" + (f" + {ckpt['batch']} batches" if ckpt.get("batch") else "")
    return {"epochs": epochs, "steps": ckpt["step"],
            "img_per_s": sum(float(r["img_per_s"]) for r in logged) / max(1, len(logged)),
            "losses": {c: float(logged[-1][c]) for c in cols if logged and logged[-1].get(c)},
            "test_loss": float(test[-1]["test_loss"]) if test else None}


def fmt(value, std=None, spec=".2f"):
    return "-" if value is None else f"{value:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def minutes(s):
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def copy_figures(args, spec, runs, after):
    """OUT/figures/: each run's grids at the epochs the report showed (those that exist), its last grid
    and losses.png; the latent_edit.py figures (the D-filtered samples among them). [(caption, path)]."""
    figures, shown = os.path.join(args.out, "figures"), []
    for name in runs:
        out = os.path.join(args.out, name)
        grids = sorted(glob.glob(os.path.join(out, "grid_epoch_*.png")))
        wanted = [g for g in (os.path.join(out, f"grid_epoch_{e:03d}.png") for e in spec["grids"].get(name, []))
                  if g in grids]
        for path in wanted + [g for g in grids[-1:] if g not in wanted] + [os.path.join(out, "losses.png")]:
            if os.path.isfile(path):
                target = os.path.join(figures, f"{name}_{os.path.basename(path)}")
                shutil.copyfile(path, target)
                shown.append((f"{name}: {os.path.basename(path)}", target))
    for _, caption, cmd in after:
        shown.append((caption, flag_value(cmd, "--out")))
    return shown


def write_report(args, spec, runs, after, state):
    """OUT/REPORT.md: the published numbers beside ours, the runs, the figures, the commands."""
    scores, wall, n, real = state["scores"], state["wall_s"], QUICK_N if args.quick else N, real_set(args)
    weights = "needs the Inception weights"
    summaries = {name: summarise(os.path.join(args.out, name)) for name in runs}
    lines = [f"# Reproduction: {spec['title']}", "",
             f"`python benchmarks/reproduce.py {shlex.join(args.argv)}` · {datetime.date.today()} · "
             f"device {data.resolve_device(args.device)} · torch {torch.__version__}", ""]
    if args.quick:
        lines += ["**--quick: a smoke run of a few optimizer steps; these numbers mean nothing.**", ""]
    lines += ["## Published and ours", "",
              f"Published: as the report printed it (\"not published\": it gives none; \"not in the report\": a "
              f"row of ours only). Ours: {n:,} images per "
              f"set; IS and Laplacian variance: mean ± std; 'Real': the first {n:,} images of {real}"
              + (", the FID reference" if spec["fid"] else "") + "; training time: the run's wall time "
              "(training and sampling) on this device.", "",
              "| model | measure | published | ours |", "| --- | --- | --- | --- |"]
    rows = [(label, folder.split("/")[0], scores[folder]) for label, folder in spec["sets"]]
    rows.append(("Real", None, scores[real]))
    for label, run, s in rows:
        published = spec["published"].get(label, {})
        absent = "not published" if label in spec["published"] else "not in the report"  # a row of ours only
        fid = (weights if args.lapvar_only else fmt(s["fid"])) if run else "the reference"
        ours = {EPOCHS: summaries[run]["epochs"] if run else None,     # None: not a measure of this row
                IS: weights if args.lapvar_only else fmt(s["is_mean"], s["is_std"]),
                FID: fid if spec["fid"] else None,
                LAP: fmt(s["lapvar"], s["lapvar_std"], ".1f"),
                TIME: minutes(wall[run]) if run else None}
        for measure in (EPOCHS, IS, FID, LAP, TIME, BEST):
            if measure in published or ours.get(measure) is not None:
                value = ours.get(measure) or "not tracked (each run keeps its last epoch)"
                lines.append(f"| {label} | {measure} | {published.get(measure, absent)} | {value} |")
    for label, published in spec["published"].items():  # a time the report gives for all its runs together
        if label not in [r[0] for r in rows]:
            lines.append(f"| {label} | {TIME} | {published[TIME]} | {minutes(sum(wall[r] for r in runs))} |")
    lines += ["", "## Runs", "",
              "| run | epochs | steps | wall time | train img/s | final losses (last logged step) | "
              "held-out -ELBO | Laplacian variance | IS | FID |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summaries.items():
        s = next(scores[f] for _, f in spec["sets"] if f.split("/")[0] == name)   # the run's first set
        losses = ", ".join(f"{k} {v:.3f}" for k, v in r["losses"].items())
        is_, fid = (weights, weights) if args.lapvar_only else (fmt(s["is_mean"], s["is_std"]), fmt(s.get("fid")))
        lines.append(f"| {name} | {r['epochs']} | {r['steps']} | {minutes(wall[name])} | {r['img_per_s']:.0f} | "
                     f"{losses} | {fmt(r['test_loss'], spec='.1f')} | {fmt(s['lapvar'], s['lapvar_std'], '.0f')} | "
                     f"{is_} | {fid if spec['fid'] else '-'} |")
    for key in [real] + [k for k in scores if k.startswith(f"{real} at ")]:   # the real images
        s = scores[key]
        lines.append(f"| real {key} | | | | | | | {fmt(s['lapvar'], s['lapvar_std'], '.0f')} | "
                     f"{fmt(s['is_mean'], s['is_std'])} | |")
    lines += ["", "## Figures", ""]
    lines += [f"{caption}\n\n![]({os.path.relpath(path, args.out)})\n"
              for caption, path in copy_figures(args, spec, runs, after)]
    lines += ["## Commands", "", "```bash"] + [show(c) for c in list(runs.values()) + [c for *_, c in after]]
    lines += ["```", ""]
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:lines.index("## Figures")] + [f"wrote {args.out}/REPORT.md"]))


def main(argv=None):
    args = get_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    check_args(args)
    spec = REPORTS[args.report]
    runs, after = plan(args, spec)
    if args.dry_run:
        sets = [os.path.join(args.out, folder) for _, folder in spec["sets"]]
        scoring = metrics_command(args, sets, real_set(args)) if spec["fid"] else \
            metrics_command(args, sets + [real_set(args)], None)
        print("\n".join(show(c) for c in list(runs.values()) + [c for *_, c in after] + [scoring]))
        return
    state = load_state(args)
    todo = {}  # the runs to (re)start: a run that starts over, or whose images change, is scored again
    for name, cmd in runs.items():
        cmd = resume_or_skip(cmd)
        if cmd is None:
            print(f"{name}: finished, skipped")
            continue
        os.makedirs(flag_value(cmd, "--out"), exist_ok=True)
        state["wall_s"][name] = state["wall_s"].get(name, 0) if "--resume" in cmd else 0
        state["scores"] = {k: v for k, v in state["scores"].items() if not k.startswith(name + "/")}
        todo[name] = cmd
    run_trainings(todo, args, state)
    trained = {name for name, cmd in todo.items() if flag_value(cmd, "--epochs") != "0"}  # not only sampled
    for run, _, cmd in after:  # after its run trained on, or when its output is missing
        target = flag_value(cmd, "--out")  # a figure, or a folder whose samples/ it fills
        written = count_pngs(os.path.join(target, "samples")) >= int(flag_value(cmd, "--sample", 1))
        if run in trained or not (os.path.isfile(target) or written):
            print("$", show(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                sys.exit(f"error: {show(cmd)} failed; see its message above")
    score(args, spec, state)
    write_report(args, spec, runs, after, state)


if __name__ == "__main__":
    main()
