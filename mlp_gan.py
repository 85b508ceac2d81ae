"""Vanilla GAN: a fully connected generator and discriminator.

Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville & Bengio, "Generative
Adversarial Nets", NeurIPS 2014, arXiv:1406.2661. The hidden sizes are the common PyTorch ones
(generator 128-256-512-1024, discriminator 512-256), as the vanilla-GAN-vs-DCGAN report used them.

    python mlp_gan.py --data mnist --epochs 50                 # the MNIST report, 28x28
    python mlp_gan.py --data celeba --img-size 64 --epochs 20   # against dcgan.py on CelebA
    python mlp_gan.py --resume runs/mlp_gan-mnist/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 mlp_gan.py --data mnist         # data-parallel on 2 devices
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics


# -----------------------------------------------------------------------------
# Models. Images are flattened: C*H*W numbers in, C*H*W numbers out.

class Generator(nn.Module):
    def __init__(self, latent_dim=100, channels=1, img_size=28):
        super().__init__()
        self.latent_dim, self.shape = latent_dim, (channels, img_size, img_size)
        layers, width = [], latent_dim
        for h in (128, 256, 512, 1024):  # B x width -> B x h
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2, True)]
            width = h
        layers += [nn.Linear(width, channels * img_size * img_size), nn.Tanh()]  # B x C*H*W in [-1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # z: B x latent_dim -> B x C x H x W
        return self.net(z).view(-1, *self.shape)


class Discriminator(nn.Module):
    def __init__(self, channels=1, img_size=28):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),                                    # B x C x H x W -> B x C*H*W
            nn.Linear(channels * img_size * img_size, 512), nn.LeakyReLU(0.2, True),
            nn.Linear(512, 256), nn.LeakyReLU(0.2, True),
            nn.Linear(256, 1))                               # B x 1 logit

    def forward(self, x):  # -> B logits (no sigmoid: the loss takes logits)
        return self.net(x).flatten()


def build(cfg):
    """Both networks from a config dict (vars(args) or a checkpoint's copy of it)."""
    channels = cfg["channels"] or 1
    return Generator(cfg["latent_dim"], channels, cfg["img_size"]), Discriminator(channels, cfg["img_size"])


def load_model(path, device="cpu"):
    """The generator of an mlp_gan.py checkpoint, in eval mode (call it on B x latent_dim)."""
    ckpt = data.read_checkpoint(path, "mlp_gan")  # DataError (a ValueError): one sentence if it is not one
    G, _ = build(ckpt["args"])
    G.load_state_dict(ckpt["G"])
    return G.to(device).eval()


# -----------------------------------------------------------------------------
# The loss, on D's logit l = log(D(x) / (1 - D(x))): binary cross-entropy on logits is the
# numerically safe -[y log D(x) + (1 - y) log(1 - D(x))]. The value function of eq. 1,
#   min_G max_D  E_x log D(x) + E_z log(1 - D(G(z))),
# trained as section 3 advises: G maximises log D(G(z)) instead (strong gradients early on).

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


# -----------------------------------------------------------------------------
# Algorithm 1 of the paper with k = 1: a step of D, then a step of G, on one minibatch.
# G and D are the training copies (DDP, torch.compile); D_fixed is D without DDP, for G's step.

def train_step(G, D, D_fixed, optG, optD, x, args):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        x_fake = G(torch.randn(x.shape[0], args.latent_dim, device=x.device))   # B x C x H x W
        d_real, d_fake = D(x), D(x_fake.detach())                               # B logits each
        # ascend log D(x) + log(1 - D(G(z))): descend the two cross-entropies, one backward
        loss_d_real, loss_d_fake = bce(d_real, 1.0), bce(d_fake, 0.0)
    optD.zero_grad(set_to_none=True)
    (loss_d_real + loss_d_fake).backward()
    optD.step()

    D_fixed.requires_grad_(False)  # G's step: no gradient for D's weights
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        d_g = D_fixed(x_fake)                                                   # the same fakes, D updated
        loss_g = bce(d_g, 1.0)                                                  # ascend log D(G(z))
    optG.zero_grad(set_to_none=True)
    loss_g.backward()
    optG.step()
    D_fixed.requires_grad_(True)
    mean_p = lambda logits: torch.sigmoid(logits.detach().float()).mean()     # the mean probability of "real"
    return {"loss_d": loss_d_real + loss_d_fake, "loss_d_real": loss_d_real, "loss_d_fake": loss_d_fake,
            "loss_g": loss_g, "D(x)": mean_p(d_real), "D(G(z))_before": mean_p(d_fake), "D(G(z))_after": mean_p(d_g)}


COLUMNS = ["step", "epoch", "loss_d", "loss_d_real", "loss_d_fake", "loss_g", "D(x)", "D(G(z))_before",
           "D(G(z))_after", "img_per_s"]   # losses.csv


# -----------------------------------------------------------------------------
# Settings: this model's flags; data.py adds those of the data and the run, metrics.py the evaluation's.

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_args(p, data="mnist", epochs=50, batch_size=128,
                  img_size="the dataset's own (28 for MNIST, 32 for CIFAR-10, 64 for CelebA)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for G and D")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (the DCGAN setting the reports used)")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z")
    metrics.add_args(p)
    return p


def check_args(args, run):
    """mlp_gan.py's own flags (data.Run has checked the shared ones), before any data is read."""
    metrics.check_args(args, run)
    if not 0 <= args.beta1 < 1:  # also false for NaN
        data.fail(f"--beta1 must be in [0, 1), got {args.beta1}")
    args.img_size = args.img_size or data.DEFAULT_IMG_SIZE.get(args.data, data.FOLDER_IMG_SIZE)
    run.check_memory(lambda b: dry_run(args, b), "--img-size or --batch-size")


def make_networks(args, run):
    """G and D with PyTorch's default initialisation (as the reference implementations) or the checkpoint's
    weights, on the device, and their Adam optimizers with beta1 = 0.5."""
    G, D = build(vars(args))
    run.restore(G=G, D=D)
    optG, optD = (torch.optim.Adam(n.parameters(), lr=args.lr, betas=(args.beta1, 0.999), **run.fused) for n in (G, D))
    run.restore(optG=optG, optD=optD)
    return G, D, optG, optD


def dry_run(args, b):
    """Both networks on a batch of b: what data.Run.check_memory measures on the meta device (shapes only)."""
    G, D = build(vars(args))
    D(G(torch.zeros(b, args.latent_dim)))
    return G, D


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- Setup: flags (a resumed run's are its checkpoint's unless typed), device, ranks, output folder.
    run = data.Run(get_parser(), argv, "mlp_gan", check_args, ["latent_dim", "channels", "img_size"])
    args, device = run.args, run.device
    loader = run.loader()                        # [-1, 1] batches on the device, from a uint8 cache

    # --- Networks: G and D (plain: saved, sampled, evaluated) and the copies that train (DDP, torch.compile).
    G, D, optG, optD = make_networks(args, run)
    nets = run.wrap(G), run.wrap(D), run.wrap(D, ddp=False)
    fixed_z = run.fixed_noise(64, args.latent_dim)
    run.show(G=G, D=D)
    samples = lambda i, b, g: G(torch.randn(b, args.latent_dim, device=device, generator=g))  # b x C x H x W
    evaluation = metrics.TrainingEval.start(run, {"samples": samples}, G)
    log = metrics.LossLog(run, COLUMNS)

    # --- Training; at the end of each epoch: ckpt.pt, a grid of the fixed z, losses.png, the evaluation.
    with run.stop_signals():
        while run.training():
            G.train(), D.train()
            for x in run.batches(loader):
                run.set_lr(args.lr, optG, optD)
                values = train_step(*nets, optG, optD, x, args)
                if run.step_done(values):
                    log.row(values)
            metrics.end_epoch(run, log, evaluation, G, lambda: G(fixed_z))   # ckpt.pt, grid, losses.png, eval
    run.finish()
    metrics.write_samples(run, samples, G)                 # --sample N: single PNGs for metrics.py


if __name__ == "__main__":
    main()
