"""DCGAN: deep convolutional generative adversarial network.

Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional Generative
Adversarial Networks", ICLR 2016, arXiv:1511.06434. The layer sizes are those of pytorch/examples'
dcgan, which follows the paper; --arch builds the networks of the reports this project reproduces.

    python dcgan.py --data celeba --epochs 60                  # the CelebA 64x64 report
    python dcgan.py --data mnist --epochs 5                    # MNIST resized to 32x32
    python dcgan.py --resume runs/dcgan-mnist/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 dcgan.py --data mnist          # data-parallel on 2 devices
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics


# -----------------------------------------------------------------------------
# Models. The depth follows the image size: one up-sampling block per doubling
# from 4x4 to the output size, the channel count halving each time and ending
# at ngf. 64x64 gives the paper's 512 -> 256 -> 128 -> 64 stack.

def _num_blocks(img_size):
    n = int(math.log2(img_size)) - 3  # 32 -> 2, 64 -> 3, 128 -> 4
    if img_size != 2 ** (n + 3) or n < 1:
        raise ValueError(f"--img-size must be a power of two >= 16, got {img_size}")
    return n


class Generator(nn.Module):
    def __init__(self, latent_dim=100, ngf=64, channels=3, img_size=64):
        super().__init__()
        self.latent_dim = latent_dim
        n = _num_blocks(img_size)
        ch = ngf * 2 ** n
        # z: B x latent x 1 x 1 -> B x ch x 4 x 4
        layers = [nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n):  # B x ch x s x s -> B x ch/2 x 2s x 2s
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        # B x ngf x S/2 x S/2 -> B x C x S x S, in [-1, 1]
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # z: B x latent_dim
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, ndf=64, channels=3, img_size=64):
        super().__init__()
        n = _num_blocks(img_size)
        # B x C x S x S -> B x ndf x S/2 x S/2 (no BatchNorm on the first layer, as in the paper)
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for _ in range(n):  # B x ch x s x s -> B x 2ch x s/2 x s/2, down to 4x4
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]  # B x ch x 4 x 4 -> B x 1 x 1 x 1
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # -> B logits (no sigmoid: the loss takes logits)
        return self.net(x).flatten()


# -----------------------------------------------------------------------------
# The reports' networks (--arch), each written out as the report's table. Every D here returns
# logits: where a report prints a final Sigmoid, ours is inside the loss (BCE with logits).

class Cifar10ReportGenerator(nn.Module):
    """The CIFAR-10 report's generator table: 11,429,632 parameters at 32x32x3, latent 100."""
    def __init__(self, latent_dim=100, channels=3):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            # B x 100 x 1 x 1 -> B x 1024 x 2 x 2 (409,600: a 2x2 kernel)
            nn.ConvTranspose2d(latent_dim, 1024, 2, 1, 0, bias=False), nn.BatchNorm2d(1024), nn.ReLU(True),
            nn.ConvTranspose2d(1024, 512, 4, 2, 1, bias=False),  # -> B x 512 x 4 x 4 (8,388,608)
            nn.BatchNorm2d(512), nn.ReLU(True),
            nn.ConvTranspose2d(512, 256, 4, 2, 1, bias=False),   # -> B x 256 x 8 x 8 (2,097,152)
            nn.BatchNorm2d(256), nn.ReLU(True),
            nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False),   # -> B x 128 x 16 x 16 (524,288)
            nn.BatchNorm2d(128), nn.ReLU(True),
            nn.ConvTranspose2d(128, channels, 4, 2, 1, bias=False), nn.Tanh())  # -> B x 3 x 32 x 32 (6,144)

    def forward(self, z):  # z: B x latent_dim
        return self.net(z[:, :, None, None])


class Cifar10ReportDiscriminator(nn.Module):
    """The CIFAR-10 report's discriminator table: 4,309,441 parameters at 32x32x3. 5x5 convs
    without bias, LeakyReLU BEFORE BatchNorm (as the report orders them), a linear head."""
    def __init__(self, channels=3):
        super().__init__()
        self.net = nn.Sequential(
            # B x 3 x 32 x 32 -> B x 64 x 16 x 16 (4,800 parameters)
            nn.Conv2d(channels, 64, 5, 2, 2, bias=False), nn.LeakyReLU(0.2, True),
            # -> B x 128 x 8 x 8 (204,800 + 256)
            nn.Conv2d(64, 128, 5, 2, 2, bias=False), nn.LeakyReLU(0.2, True), nn.BatchNorm2d(128),
            # -> B x 256 x 4 x 4 (819,200 + 512)
            nn.Conv2d(128, 256, 5, 2, 2, bias=False), nn.LeakyReLU(0.2, True), nn.BatchNorm2d(256),
            # -> B x 512 x 2 x 2 (3,276,800 + 1,024)
            nn.Conv2d(256, 512, 5, 2, 2, bias=False), nn.LeakyReLU(0.2, True), nn.BatchNorm2d(512),
            # flatten B x 2048 -> B x 1 (2,049); the report's Sigmoid is in our loss
            nn.Flatten(), nn.Linear(2048, 1))

    def forward(self, x):  # -> B logits
        return self.net(x).flatten()


class MnistReportDiscriminator(nn.Module):
    """The MNIST report's printed discriminator: 166,789 parameters at 32x32x1."""
    def __init__(self, channels=1):
        super().__init__()
        self.net = nn.Sequential(
            # B x 1 x 32 x 32 -> B x 32 x 16 x 16 (512 parameters)
            nn.Conv2d(channels, 32, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
            # -> B x 64 x 8 x 8 (32,768 + 128)
            nn.Conv2d(32, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.LeakyReLU(0.2, True),
            # -> B x 128 x 4 x 4 (131,072 + 256)
            nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2, True),
            # -> B x 1 x 2 x 2 (2,048), flatten B x 4 -> B x 1 (5); the report's Sigmoid is in our loss
            nn.Conv2d(128, 1, 4, 2, 1, bias=False), nn.Flatten(), nn.Linear(4, 1))

    def forward(self, x):  # -> B logits
        return self.net(x).flatten()


class CelebaGansReportDiscriminator(nn.Module):
    """The vanilla-GAN-vs-DCGAN CelebA report's DCGAN discriminator: four 4x4 stride-2 convs with
    LeakyReLU, filters starting at 32, no BatchNorm (so the convs keep PyTorch's bias), one linear
    unit: 694,241 parameters at 64x64x3."""
    def __init__(self, channels=3, img_size=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.LeakyReLU(0.2, True),  # B x 3 x 64 x 64 -> B x 32 x 32 x 32
            nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2, True),        # -> B x 64 x 16 x 16
            nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2, True),       # -> B x 128 x 8 x 8
            nn.Conv2d(128, 256, 4, 2, 1), nn.LeakyReLU(0.2, True),      # -> B x 256 x 4 x 4
            nn.Flatten(), nn.Linear(256 * (img_size // 16) ** 2, 1))    # B x 4096 -> B x 1; its sigmoid is in our loss

    def forward(self, x):  # -> B logits
        return self.net(x).flatten()


ARCHS = ["paper", "cifar10-report", "mnist-report", "celeba-gans-report"]
REPORT_SHAPE = {"cifar10-report": (32, None), "mnist-report": (32, 1)}  # (img_size, channels) a report fixes


def init_weights(m):
    """Paper, section 4: all weights from N(0, 0.02), the report networks' Linear heads too, and
    their biases (where a report network has them) from 0; BatchNorm scale from N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build(cfg):
    """Both networks from a config dict (vars(args) or a checkpoint's copy of it)."""
    arch = cfg.get("arch", "paper")  # a config without it: the paper's networks
    latent, C, S = cfg["latent_dim"], cfg["channels"] or 3, cfg["img_size"]
    if arch == "cifar10-report":
        return Cifar10ReportGenerator(latent, C), Cifar10ReportDiscriminator(C)
    if arch == "mnist-report":  # the report's printed G is the paper's at 32x32x1 with ngf 64
        return Generator(latent, 64, C, S), MnistReportDiscriminator(C)
    if arch == "celeba-gans-report":  # its G is the paper's with ngf 128: 1024 -> 512 -> 256 -> 128
        return Generator(latent, 128, C, S), CelebaGansReportDiscriminator(C, S)
    return Generator(latent, cfg["ngf"], C, S), Discriminator(cfg["ndf"], C, S)


def load_model(path, device="cpu"):
    """The generator of a dcgan.py checkpoint, in eval mode (call it on B x latent_dim)."""
    ckpt = data.read_checkpoint(path, "dcgan", upgrade)  # DataError (a ValueError): one sentence if it is not one
    G, _ = build(ckpt["args"])
    G.load_state_dict(ckpt["G"])
    return G.to(device).eval()


# -----------------------------------------------------------------------------
# The loss. D outputs a logit l = log(D(x) / (1 - D(x))); binary cross-entropy on
# logits is the numerically safe form of -[y log D(x) + (1 - y) log(1 - D(x))].
#   D maximises  log D(x) + log(1 - D(G(z)))   (Goodfellow et al. 2014, eq. 1)
#   G maximises  log D(G(z))                   (the non-saturating generator loss)

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


# -----------------------------------------------------------------------------
# The paper's training step: Algorithm 1 of Goodfellow et al. with one D step per G step.
# G and D are the copies that train (DDP under torchrun, compiled with --compile); D_for_G is D
# without DDP: G's step must not average D's gradients, which it does not compute.

def train_step(G, D, D_for_G, optG, optD, real, args):
    z = torch.randn(real.shape[0], args.latent_dim, device=real.device)       # B x latent

    # (1) D step: maximise log D(x) + log(1 - D(G(z))), both terms in one backward pass
    # (so DDP reduces D's gradients once).
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=args.amp):
        fake = G(z)                                                           # B x C x S x S
        out_real, out_fake = D(real), D(fake.detach())                        # B logits each
        loss_d_real, loss_d_fake = bce(out_real, 1.0), bce(out_fake, 0.0)
        loss_d = loss_d_real + loss_d_fake
    optD.zero_grad(set_to_none=True)
    loss_d.backward()
    optD.step()

    # (2) G step: maximise log D(G(z)) on the same fake batch; D's weights frozen meanwhile.
    D_for_G.requires_grad_(False)
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=args.amp):
        out_g = D_for_G(fake)
        loss_g = bce(out_g, 1.0)
    optG.zero_grad(set_to_none=True)
    loss_g.backward()
    optG.step()
    D_for_G.requires_grad_(True)
    # D(x) and D(G(z)) before and after D's step: mean probabilities, the sigmoid of the logits.
    p = lambda logits: torch.sigmoid(logits.detach().float()).mean()
    return {"loss_d": loss_d, "loss_d_real": loss_d_real, "loss_d_fake": loss_d_fake, "loss_g": loss_g,
            "D(x)": p(out_real), "D(G(z))_before": p(out_fake), "D(G(z))_after": p(out_g)}


# losses.csv: the step's values, and the images per second.
COLUMNS = ["step", "epoch", "loss_d", "loss_d_real", "loss_d_fake", "loss_g", "D(x)", "D(G(z))_before",
           "D(G(z))_after", "img_per_s"]


# -----------------------------------------------------------------------------
# Settings: the paper's flags here; data.py adds the data and run flags, metrics.py the evaluation's.

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_args(p, data="celeba", epochs=60, batch_size=128, img_size="64 for celeba, 32 otherwise; 16-128")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for G and D")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (the paper lowers it from 0.9)")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z")
    p.add_argument("--arch", default="paper", choices=ARCHS, help="the paper's networks, or a report's (README)")
    p.add_argument("--ngf", type=int, default=None, help="--arch paper: generator width, its last hidden layer (64)")
    p.add_argument("--ndf", type=int, default=None, help="--arch paper: discriminator width, its first layer (64)")
    metrics.add_args(p)
    return p


SHAPE_FLAGS = ["arch", "latent_dim", "ngf", "ndf", "channels", "img_size"]  # a checkpoint fits only its own


def upgrade(cfg):
    """A checkpoint from before --arch holds the paper's networks (so a typed --arch is checked against it)."""
    cfg.setdefault("arch", "paper")


def check_args(args, run):
    """dcgan.py's own flags (data.Run has checked the shared ones), before any data is read."""
    metrics.check_args(args, run)
    if not 0 <= args.beta1 < 1:  # also refuses nan
        data.fail(f"--beta1 must be in [0, 1), got {args.beta1}")
    size, channels = REPORT_SHAPE.get(args.arch, (None, None))  # what a report's network fixes
    if args.arch != "paper" and (args.ngf, args.ndf) != (None, None):
        data.fail(f"--arch {args.arch} has the report's own widths; --ngf and --ndf change only --arch paper")
    if size and args.img_size not in (None, size):
        data.fail(f"--arch {args.arch} is the report's {size}x{size} network, which --img-size {args.img_size} "
                  f"does not fit; drop --img-size")
    if channels and args.channels not in (None, channels):
        data.fail(f"--arch {args.arch} is the report's {channels}-channel network, which --channels {args.channels} "
                  f"does not fit; drop --channels")
    args.img_size = args.img_size or size or (64 if args.data == "celeba" else 32)
    args.channels = args.channels or channels
    if args.arch == "paper":
        args.ngf, args.ndf = args.ngf or 64, args.ndf or 64
        if min(args.ngf, args.ndf) < 1:
            data.fail(f"--ngf and --ndf must be at least 1, got {args.ngf} and {args.ndf}")
    run.check_memory(lambda b: dry_run(args, b))


def dry_run(args, b):
    """Both networks on a batch of b: what data.Run.check_memory measures on the meta device (shapes only)."""
    G, D = build(vars(args))
    D(G(torch.zeros(b, args.latent_dim)))
    return G, D


def make_networks(args, run):
    """G and D, initialised as the paper says or from the checkpoint, on the device, and their optimizers."""
    G, D = build(vars(args))
    G.apply(init_weights), D.apply(init_weights)
    run.restore(run.memory_format(cpu=True), G=G, D=D)  # channels-last: faster with cuDNN, and with oneDNN on the CPU
    # Adam with beta1 = 0.5, as the paper.
    optG, optD = (torch.optim.Adam(net.parameters(), lr=args.lr, betas=(args.beta1, 0.999), **run.fused)
                  for net in (G, D))
    run.restore(optG=optG, optD=optD)
    return G, D, optG, optD


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- Setup: the flags (on --resume the checkpoint's are the defaults; typed ones win), every one checked
    # before any data is read; the device, the ranks (torchrun) and the output folder.
    run = data.Run(get_parser(), argv, "dcgan", check_args, SHAPE_FLAGS, upgrade)
    args, device = run.args, run.device

    # --- Data: decoded once into a uint8 cache, then served as [-1, 1] batches on the device.
    loader = run.loader(channels_last=run.memory_format(cpu=True) == torch.channels_last)

    # --- Networks: G and D (plain: saved, sampled, evaluated) and the copies that train.
    G, D, optG, optD = make_networks(args, run)
    G_train, D_train, D_for_G = run.wrap(G), run.wrap(D), run.wrap(D, ddp=False)
    fixed_z = run.fixed_noise(64, args.latent_dim)                           # 64 x latent: the grids' z
    run.show(G=G, D=D)
    samples = lambda i, b, g: G(torch.randn(b, args.latent_dim, device=device, generator=g))  # b x C x S x S
    evaluation = metrics.TrainingEval.start(run, {"samples": samples}, G)   # --eval-every (None: off)
    log = metrics.LossLog(run, COLUMNS)

    # --- Training: epochs of the paper's step. Each epoch (or the run, when it stops early) ends with the
    # checkpoint, a grid of the fixed z, the loss plot and, every --eval-every epochs, the evaluation.
    with run.stop_signals():
        while run.training():
            G.train(), D.train()
            for real in run.batches(loader):                                # B x C x S x S in [-1, 1]
                run.set_lr(args.lr, optG, optD)                            # --lr-decay
                losses = train_step(G_train, D_train, D_for_G, optG, optD, real, args)
                if run.step_done(losses):                                  # a log step
                    log.row(losses)
            metrics.end_epoch(run, log, evaluation, G, lambda: G(fixed_z))   # ckpt.pt, grid, losses.png, eval
    run.finish()

    # --- Sampling: --sample N single PNGs from fresh z ~ N(0, I), for metrics.py.
    metrics.write_samples(run, samples, G)


if __name__ == "__main__":
    main()
