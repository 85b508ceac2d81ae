"""Checks shared by tests/test_vae_conv.py and tests/test_mlp_vae.py: hand-computed loss cases,
a Monte-Carlo KL estimate, what a run's output folder must hold, and the single PNGs of --sample
recomputed from the checkpoint alone."""
import csv
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributions import Normal

import data

# KL(N(mu, diag(exp(logvar))) || N(0, I)) by hand, two images of a 2-d latent:
#   image 1: mu = 0, logvar = 0                -> 0
#   image 2: mu = (1, 0), logvar = (0, ln 4)   -> dim 1: -1/2 (1 + 0 - 1 - 1) = 1/2
#                                                 dim 2: -1/2 (1 + ln 4 - 0 - 4) = 3/2 - ln 2
#   batch mean: (2 - ln 2) / 2
KL_MU = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
KL_LOGVAR = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])
KL_HAND = (2 - math.log(2)) / 2

# Bernoulli cross-entropy by hand, one 1 x 2 x 2 image (pixels in [-1, 1], targets (x + 1) / 2):
#   logit 0     (p = 1/2), target 0   -> ln 2
#   logit ln 3  (p = 3/4), target 1   -> -ln(3/4)
#   logit -ln 3 (p = 1/4), target 0   -> -ln(3/4)
#   logit 0     (p = 1/2), target 1/2 -> ln 2
BCE_LOGITS = torch.tensor([0.0, math.log(3), -math.log(3), 0.0]).view(1, 1, 2, 2)
BCE_X = torch.tensor([-1.0, 1.0, -1.0, 0.0]).view(1, 1, 2, 2)
BCE_HAND = 2 * math.log(2) + 2 * math.log(4 / 3)


def monte_carlo_kl(reparameterise, mu, logvar, n=200_000):
    """Batch mean of E_q[log q(z) - log p(z)], z drawn with the script's own reparameterisation:
    checks the closed form and that sigma = exp(logvar / 2)."""
    torch.manual_seed(0)
    total = 0.0
    for m, lv in zip(mu, logvar):
        z = reparameterise(m.expand(n, -1), lv.expand(n, -1))
        log_q = Normal(m, torch.exp(lv / 2)).log_prob(z).sum(1)
        log_p = Normal(0.0, 1.0).log_prob(z).sum(1)
        total += (log_q - log_p).mean().item()
    return total / len(mu)


def rows(out):
    with open(os.path.join(out, "losses.csv"), newline="") as f:
        return list(csv.DictReader(f))


def check_run_folder(out, size, epochs=1, steps=2):
    """The files of a run that stopped after `steps` logged steps in its `epochs`-th epoch."""
    for f in [f"grid_epoch_{epochs:03d}.png", f"recon_epoch_{epochs:03d}.png", "losses.csv", "losses.png", "ckpt.pt"]:
        assert os.path.exists(os.path.join(out, f)), f
    side = 8 * size + 9 * 2  # 8 x 8 images with 2-pixel padding
    assert Image.open(os.path.join(out, f"grid_epoch_{epochs:03d}.png")).size == (side, side)
    # 32 inputs in rows of 8, each row above its reconstructions: 8 rows of 8.
    assert Image.open(os.path.join(out, f"recon_epoch_{epochs:03d}.png")).size == (side, side)
    r = rows(out)
    assert list(r[0]) == ["step", "epoch", "loss", "recon", "kl", "img_per_s", "test_loss", "test_recon", "test_kl"]
    train, test = [x for x in r if x["loss"]], [x for x in r if x["test_loss"]]
    assert len(train) == steps and all(x["test_loss"] == "" for x in train)
    # One held-out row per finished epoch, its training cells blank.
    assert [int(x["epoch"]) for x in test] == list(range(1, epochs + 1)) and all(x["loss"] == "" for x in test)
    for x in train:
        assert float(x["loss"]) == pytest.approx(float(x["recon"]) + float(x["kl"]), rel=1e-4)
    return r


def heldout_kl(model, images, batch=256):
    """Batch mean of the closed-form KL over held-out uint8 images, from a loaded model's encode."""
    kl = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            mu, logvar = model.encode(data.to_float(images[i:i + batch]))
            kl += (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())).item()
    return kl / len(images)


def read_pngs(folder, n, size, mode):
    """The n single PNGs folder/000000.png ... (nothing else there) as uint8 n x C x size x size."""
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(n)]
    images = []
    for i in range(n):
        img = Image.open(os.path.join(folder, f"{i:06d}.png"))
        assert img.size == (size, size) and img.mode == mode
        images.append(torch.from_numpy(np.array(img)).view(size, size, -1).permute(2, 0, 1))
    return torch.stack(images)


def to_uint8(images):
    """[-1, 1] -> 0..255, rounded: 0 -> 127.5 -> 128, -1 -> 0, 1 -> 255."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def prior_samples(script, out, n, temperature, seed=0):
    """decode(t * eps), eps ~ N(0, I) drawn n x latent by a CPU generator seeded with --seed + 1, decoded by
    the checkpoint's model: --sample n is t = 1 (the script's stream)."""
    model = script.load_model(os.path.join(out, "ckpt.pt"))
    eps = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return to_uint8(model.decode(temperature * eps))
