"""The GAN vs VAE comparison on MNIST, measured: train the five scripts, sample, and tabulate.

Runs each model script through its real command line (two at a time, one CPU core or one GPU
each), then writes 10,000 samples per model and computes, for the table in README.md:
wall time, training images/s, final losses, the held-out negative ELBO of the VAEs (nats per
image, from their losses.csv), and the Laplacian variance of the samples and of the real test
set. FID and IS need the Inception weights: the command for them is printed at the end.

    python benchmarks/mnist_comparison.py --data-root data --out runs/mnist-comparison
    python benchmarks/mnist_comparison.py --epochs dcgan=5,mlp_gan=30,mlp_vae=30,vae_conv=10,vaegan=3
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402

# The GAN vs VAE report's five models on MNIST; the conv models at 32x32 as that report resized.
# vae_conv uses BCE here so that its negative ELBO is in nats, comparable with mlp_vae's.
MODELS = {
    "dcgan": ["dcgan.py", "--img-size", "32"],
    "mlp_gan": ["mlp_gan.py"],
    "mlp_vae": ["mlp_vae.py"],
    "vae_conv": ["vae_conv.py", "--img-size", "32", "--recon", "bce"],
    "vaegan": ["vaegan.py", "--img-size", "32", "--width", "32"],  # half the paper's width: CPU budget
}
# Loss columns shown in the table, per script (the last logged row).
LOSSES = {"dcgan": ["loss_d", "loss_g"], "mlp_gan": ["loss_d", "loss_g"], "mlp_vae": ["recon", "kl"],
          "vae_conv": ["recon", "kl"], "vaegan": None}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarise(name, out, wall):
    rows = read_csv(os.path.join(out, "losses.csv"))
    last = [r for r in rows if r.get("img_per_s")][-1]
    cols = LOSSES[name] or [c for c in rows[0] if c not in ("step", "epoch", "img_per_s") and not c.startswith("test")]
    rates = [float(r["img_per_s"]) for r in rows if r.get("img_per_s")]
    test = [r for r in rows if r.get("test_loss")]
    return {"epochs": int(float(last["epoch"])), "steps": int(last["step"]), "wall_s": round(wall, 1),
            "img_per_s": round(sum(rates) / len(rates), 1),
            "final_losses": {c: float(last[c]) for c in cols if last.get(c)},
            "test_neg_elbo": float(test[-1]["test_loss"]) if test else None}


def lapvar_of_folder(folder):
    imgs = torch.stack([data.read_image(p, channels=1) for p in data.list_images(folder)])
    v = metrics.laplacian_variance(imgs)
    return float(v.mean()), float(v.std())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="data", help="holds MNIST/raw (torchvision layout)")
    p.add_argument("--out", default="runs/mnist-comparison", help="one sub-folder per model")
    p.add_argument("--epochs", default="dcgan=3,mlp_gan=20,mlp_vae=20,vae_conv=3,vaegan=1",
                   help="epochs per model, name=N pairs")
    p.add_argument("--models", default=",".join(MODELS), help="which models to run")
    p.add_argument("--sample", type=int, default=10000, help="samples per model for the Laplacian variance")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each pinned to one core on CPU)")
    p.add_argument("--device", default="auto", help="passed to every script")
    p.add_argument("--max-steps", type=int, default=0, help="passed to every script (a smoke run)")
    args = p.parse_args()
    epochs = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.epochs.split(",")))
    models = args.models.split(",")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    # Longest first, so the two slots finish close together.
    queue = sorted(models, key=lambda m: -epochs[m] * {"dcgan": 6, "vaegan": 20, "vae_conv": 3}.get(m, 0.3))
    running, results, cores = {}, {}, list(range(os.cpu_count() or 1))
    t_all = time.time()
    while queue or running:
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            out = os.path.abspath(os.path.join(args.out, name))
            os.makedirs(out, exist_ok=True)
            cmd = [sys.executable, *MODELS[name], "--data", "mnist", "--data-root", args.data_root,
                   "--epochs", str(epochs[name]), "--out", out, "--sample", str(args.sample),
                   "--device", args.device, "--log-every", "100", "--max-steps", str(args.max_steps)]
            core = cores[len(running) % len(cores)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if hasattr(os, "sched_setaffinity") and args.device in ("auto", "cpu") and not torch.cuda.is_available():
                cmd = ["taskset", "-c", str(core)] + cmd
            print("$", " ".join(cmd), flush=True)
            log = open(os.path.join(out, "train.log"), "w")
            running[name] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT),
                             time.time(), out)
        time.sleep(2)
        for name, (proc, t0, out) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    sys.exit(f"error: {name} failed (exit {proc.returncode}); see {out}/train.log")
                results[name] = summarise(name, out, time.time() - t0)
                results[name]["lapvar"] = lapvar_of_folder(os.path.join(out, "samples"))
                print(f"{name}: {json.dumps(results[name])}", flush=True)

    for size in (28, 32):  # the real test set at both sizes the models produce
        test = data.load("mnist", root=args.data_root, split="test", img_size=size).images
        v = metrics.laplacian_variance(test)
        results[f"MNIST test {size}x{size}"] = {"lapvar": (float(v.mean()), float(v.std()))}

    print(f"\nall runs: {time.time() - t_all:.0f} s wall\n")
    print("| model | epochs | wall time | train img/s | final losses | held-out -ELBO (nats) | Laplacian variance |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        lv = "%.0f ± %.0f" % r["lapvar"]
        if "wall_s" not in r:
            print(f"| {name} (real) | | | | | | {lv} |")
            continue
        losses = ", ".join(f"{k} {v:.3f}" for k, v in r["final_losses"].items())
        elbo = f"{r['test_neg_elbo']:.1f}" if r["test_neg_elbo"] is not None else "-"
        print(f"| {name} | {r['epochs']} | {r['wall_s'] / 60:.1f} min | {r['img_per_s']:.0f} | {losses} | {elbo} | {lv} |")
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nFID and IS (need the Inception weights): python metrics.py "
          + " ".join(os.path.join(args.out, m, "samples") for m in models) + " --ref mnist --n 10000")


if __name__ == "__main__":
    main()
