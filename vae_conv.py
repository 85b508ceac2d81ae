"""Deep convolutional VAE: variational autoencoder with the Hou et al. architecture.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114 (the
model and its loss); Hou, Shen, Sun & Qiu, "Deep Feature Consistent Variational
Autoencoder", WACV 2017, arXiv:1610.00291, Fig. 2 (the encoder and decoder).

    python vae_conv.py --data celeba --epochs 50               # the CelebA report, 64x64, MSE
    python vae_conv.py --data cifar10 --arch cifar10-report --epochs 100   # the CIFAR-10 report's VAE, BCE
    python vae_conv.py --resume runs/vae_conv-celeba/ckpt.pt --epochs 0 --sample 10000
    python vae_conv.py --resume runs/vae_conv-cifar10/ckpt.pt --epochs 0 --recon-samples 10000
    torchrun --nproc_per_node=2 vae_conv.py --data celeba       # data-parallel on 2 devices
"""
import argparse
import contextlib
import math
import os
import pickle
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import torchvision.utils as vutils

import data
import metrics


# -----------------------------------------------------------------------------
# Model. Hou et al. at 64x64: four stride-2 conv blocks down to width x 4 x 4 and four
# upsample-conv blocks back. Each halving of the image drops the FIRST encoder block and
# the LAST hidden decoder block (each doubling adds one), so the latent map is always
# width x 4 x 4: 32x32 has encoder 64-128-256 and decoder 128-64-C.

def _num_blocks(img_size, width):
    n = int(math.log2(img_size)) - 2  # 16 -> 2, 32 -> 3, 64 -> 4, 128 -> 5
    if img_size != 2 ** (n + 2) or n < 2:
        raise ValueError(f"--img-size must be a power of two >= 16, got {img_size}")
    if width >> (n - 1) < 1:
        raise ValueError(f"--width {width} is too small for {n} blocks at {img_size}px; use at least {2 ** (n - 1)}")
    return n


class VAE(nn.Module):
    def __init__(self, latent_dim=128, width=256, channels=3, img_size=64, recon="mse"):
        super().__init__()
        self.latent_dim, self.width, self.recon = latent_dim, width, recon
        self.start = (width, 4, 4)  # the decoder's first feature map
        n = _num_blocks(img_size, width)
        widths = [width >> k for k in reversed(range(n))]  # 64px: 32, 64, 128, 256
        layers, ch = [], channels
        for w in widths:  # B x ch x s x s -> B x w x s/2 x s/2, down to B x width x 4 x 4
            layers += [nn.Conv2d(ch, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2, True)]
            ch = w
        self.encoder = nn.Sequential(*layers, nn.Flatten())  # -> B x width*16
        self.fc_mu = nn.Linear(width * 16, latent_dim)       # -> B x latent
        self.fc_logvar = nn.Linear(width * 16, latent_dim)   # -> B x latent
        self.fc_z = nn.Linear(latent_dim, width * 16)        # B x latent -> B x width x 4 x 4
        layers = []
        for w in widths[-2::-1]:  # B x ch x s x s -> B x w x 2s x 2s (64px: 128, 64, 32)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, w, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(w), nn.LeakyReLU(0.2, True)]
            ch = w
        # B x ch x S/2 x S/2 -> B x C x S x S: tanh images in [-1, 1] for mse, logits for bce
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, channels, 3, 1, 1)]
        self.decoder = nn.Sequential(*layers, *([nn.Tanh()] if recon == "mse" else []))

    def encode(self, x):  # x: B x C x S x S in [-1, 1] -> mu, logvar: B x latent
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decoder_output(self, z):  # what the loss compares: tanh images (mse) or logits (bce)
        return self.decoder(self.fc_z(z).view(-1, *self.start))

    def decode(self, z):  # z: B x latent -> B x C x S x S images in [-1, 1], whatever the loss
        out = self.decoder_output(z)
        return out if self.recon == "mse" else torch.sigmoid(out) * 2 - 1

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        return self.decoder_output(reparameterise(mu, logvar, generator)), mu, logvar


class CifarReportVAE(VAE):
    """--arch cifar10-report: the VAE of the CIFAR-10 report, 32x32x3 only, layer by layer as its parameter
    table (counts at latent 512: encoder 21,931,264, decoder 4,831,447). encode, decode and forward are VAE's.
    Choice (the report states no activations): LeakyReLU(0.2) after every hidden layer, as the Hou et al.
    network above; padding 1 and output padding 1 are what its 3x3 kernels (from the counts) need to
    halve or double the map. The last layer gives logits for --recon bce (the report's BCE on [0, 1]
    pixels, this arch's default), or tanh images for --recon mse."""

    def __init__(self, latent_dim=512, recon="bce"):
        nn.Module.__init__(self)  # VAE's methods with these layers
        self.latent_dim, self.recon, self.start = latent_dim, recon, (1024, 2, 2)
        act = lambda: nn.LeakyReLU(0.2, True)
        self.encoder = nn.Sequential(                              # B x 3 x 32 x 32
            nn.Conv2d(3, 128, 3, 2, 1), act(),                     # -> B x 128 x 16 x 16        3,584
            nn.Conv2d(128, 256, 3, 2, 1), act(),                   # -> B x 256 x 8 x 8        295,168
            nn.Conv2d(256, 512, 3, 2, 1), act(),                   # -> B x 512 x 4 x 4      1,180,160
            nn.Conv2d(512, 1024, 3, 2, 1), act(),                  # -> B x 1024 x 2 x 2     4,719,616
            nn.Flatten(), nn.Linear(4096, 3072), act())            # -> B x 4096 -> B x 3072 12,585,984
        self.fc_mu = nn.Linear(3072, latent_dim)                   # -> B x 512              1,573,376
        self.fc_logvar = nn.Linear(3072, latent_dim)               # -> B x 512              1,573,376
        self.fc_z = nn.Linear(latent_dim, 4096)                    # B x 512 -> B x 1024 x 2 x 2   2,101,248
        self.decoder = nn.Sequential(act(),
            nn.ConvTranspose2d(1024, 256, 3, 2, 1, output_padding=1), act(),  # -> B x 256 x 4 x 4   2,359,552
            nn.ConvTranspose2d(256, 128, 3, 2, 1, output_padding=1), act(),   # -> B x 128 x 8 x 8     295,040
            nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=1), act(),    # -> B x 64 x 16 x 16     73,792
            nn.ConvTranspose2d(64, 3, 3, 2, 1, output_padding=1), act(),      # -> B x 3 x 32 x 32       1,731
            nn.ConvTranspose2d(3, 3, 3, 1, 1),                                # -> B x 3 x 32 x 32          84
            *([nn.Tanh()] if recon == "mse" else []))  # tanh images (mse) or logits (bce)


# What each --arch sets where a flag is left unset (the paper's image size: 64 on CelebA, else 32).
ARCH_DEFAULTS = {"paper": {"latent_dim": 128, "recon": "mse"},
                 "cifar10-report": {"latent_dim": 512, "recon": "bce", "img_size": 32, "channels": 3}}


def build(cfg):
    """The VAE from a config dict (vars(args) or a checkpoint's copy of it; one from before --arch is the paper's)."""
    if cfg.get("arch", "paper") == "cifar10-report":
        return CifarReportVAE(cfg["latent_dim"], cfg["recon"])
    return VAE(cfg["latent_dim"], cfg["width"], cfg["channels"], cfg["img_size"], cfg["recon"])


def load_model(path, device="cpu"):
    """The VAE of a vae_conv.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = read_checkpoint(path)  # ValueError with one sentence if it is not a vae_conv.py checkpoint
    model = build(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# The loss: the negative ELBO of Kingma & Welling (2014, eq. 10) per image, averaged over
# the batch:  -ELBO = -log p(x | z) + KL(q(z | x) || N(0, I)),  z ~ q(z | x).
#   reparameterisation (section 2.4):  z = mu + sigma * eps,  sigma = exp(logvar / 2),  eps ~ N(0, I)
#   KL in closed form (appendix B):    -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))
#   mse: sum over pixels of (x_hat - x)^2 with both in [0, 1] (a Gaussian decoder up to constants).
#        The reports and most VAE code use [0, 1] pixels; on our [-1, 1] values the error would be
#        4x larger, which silently weakens the KL term like beta = 1/4. So we rescale, (.)^2 / 4.
#   bce: sum over pixels of -[x log p + (1 - x) log(1 - p)], p = sigmoid(logits), x in [0, 1]
#        (a Bernoulli decoder on grey levels, as pytorch/examples' vae). The logits form is the
#        numerically safe one and is allowed under autocast.

def reparameterise(mu, logvar, generator=None):
    # eps ~ N(0, I) drawn where `generator` draws (a CPU one gives the same eps on every device)
    eps = torch.randn(mu.shape, dtype=mu.dtype, generator=generator,
                      device=generator.device if generator is not None else mu.device).to(mu.device)
    return mu + torch.exp(logvar / 2) * eps  # the standard deviation, not the log-variance


def vae_loss(out, x, mu, logvar, recon="mse", beta=1.0):
    """(total, recon, KL), each summed over an image and averaged over the batch."""
    out, mu, logvar, b = out.float(), mu.float(), logvar.float(), x.shape[0]
    if recon == "mse":  # out: tanh images in [-1, 1]
        rec = ((out - x) / 2).pow(2).sum() / b
    else:               # out: logits; targets [-1, 1] -> [0, 1]
        rec = F.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction="sum") / b
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / b
    return rec + beta * kl, rec, kl


# -----------------------------------------------------------------------------
# Settings: parsed, completed from a checkpoint, then checked in one place before any work.

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="celeba", help=f"one of {', '.join(data.DATASETS)}, or a folder of images")
    p.add_argument("--data-root", default="data", help="where datasets and the decoded cache live")
    p.add_argument("--arch", default="paper", choices=list(ARCH_DEFAULTS),
                   help="networks: paper (Hou et al., sized by --img-size and --width) or cifar10-report "
                        "(the CIFAR-10 report's VAE: 32x32x3, latent 512, BCE)")
    p.add_argument("--img-size", type=int, default=None, help="pixels; 64 for celeba, 32 otherwise (16, 32, 64, 128)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="image channels; default: the dataset's own")
    p.add_argument("--crop", type=int, default=None, help="center-crop this many pixels before resizing (108: CelebA face crop)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--epochs", type=int, default=50, help="total epochs (a resumed run continues to this count)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (Kingma & Welling's and pytorch/examples' vae; Hou et al. used 5e-4 at batch 64)")
    p.add_argument("--latent-dim", type=int, default=None, help="size of z; default 128 (Hou et al. used 100), 512 with --arch cifar10-report")
    p.add_argument("--width", type=int, default=256, help="channels of the deepest conv block; each shallower block halves it (--arch paper)")
    p.add_argument("--recon", default=None, choices=["mse", "bce"],
                   help="reconstruction loss: mse (tanh decoder) or bce (logits, [0, 1] targets); "
                        "default mse, bce with --arch cifar10-report")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (1: the ELBO)")
    p.add_argument("--out", default=None, help="output folder; default runs/vae_conv-<data>, or the --resume checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks")
    p.add_argument("--resume", default=None, help="ckpt.pt to continue from; flags not given again come from it")
    p.add_argument("--sample", type=int, default=0, help="after training, write this many single PNGs to OUT/samples/")
    p.add_argument("--temperature", type=float, default=1.0, help="--sample draws z ~ N(0, t^2 I) with this t (1: the prior)")
    p.add_argument("--recon-samples", type=int, default=0,
                   help="after training, write the reconstructions decode(mu) of the first N held-out images to OUT/recon_samples/")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps in all (0: no limit)")
    p.add_argument("--log-every", type=int, default=50, help="optimizer steps between log lines")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between FID/KID/IS evaluations into "
                   "OUT/eval.csv, keeping OUT/best.pt (None or 0: off; --resume keeps the checkpoint's)")
    p.add_argument("--eval-n", type=int, default=10000, help="generated images per evaluation")
    p.add_argument("--eval-ref", default=None, help="reference of the evaluations: dataset name, folder, .npy "
                   "features or .npz statistics (default: the dataset's test split, e.g. mnist:test)")
    p.add_argument("--weights", default=None, help="the FID Inception weight file (default: torch.hub cache)")
    return p, p.parse_args(argv)


# Flags that describe this invocation, never restored from a checkpoint.
RUNTIME_FLAGS = {"resume", "sample", "device", "amp", "compile", "sync_bn", "max_steps", "out", "temperature",
                 "recon_samples", "weights"}
# Flags that fix the network: a checkpoint only fits a VAE built with its own (--recon: tanh or logits out).
SHAPE_FLAGS = ["arch", "latent_dim", "width", "channels", "img_size", "recon"]


def read_checkpoint(path):
    """The dict a vae_conv.py run saved, or ValueError with one sentence saying why `path` is not one."""
    if not os.path.isfile(path):
        raise ValueError(f"the checkpoint {path} does not exist (or is not a file)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint; it was cut off while being written or copied")
    try:  # weights_only: tensors and plain containers only, so loading can never run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # PyTorch refused an object; never pass on its advice to lift that guard
        raise ValueError(f"{path} is not a checkpoint written by this project's scripts and may be unsafe "
                         "to load; nothing in it was run") from None
    except Exception as e:  # noqa: BLE001  (a text file, a truncated zip, ...)
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != "vae_conv":
        script = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} was not written by vae_conv.py (script: {script!r}); use that script with it")
    return ckpt


def restore_args(p, args, ckpt):
    """Every flag the user did not set again takes the checkpoint's value."""
    for k, v in ckpt["args"].items():
        if k not in RUNTIME_FLAGS and getattr(args, k, None) == p.get_default(k):
            setattr(args, k, v)


def pick_device(name, ddp):
    try:  # "auto": cuda, then mps, then cpu; a device that is not there is one sentence
        device = metrics.resolve_device(name)
    except metrics.MetricsError as e:
        sys.exit(f"error: {e}")
    if ddp and device.type == "cuda":  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def check_args(args, ckpt, device, ddp, rank):
    """Every flag, in one place, before any data is read or network built: one sentence each."""
    positive = {"--batch-size": args.batch_size, "--latent-dim": args.latent_dim, "--log-every": args.log_every,
                "--width": args.width}
    for flag, v in positive.items():
        if v < 1:
            sys.exit(f"error: {flag} must be at least 1, got {v}")
    for flag, v in {"--epochs": args.epochs, "--sample": args.sample, "--max-steps": args.max_steps,
                    "--crop": args.crop or 0, "--eval-every": args.eval_every, "--recon-samples": args.recon_samples}.items():
        if v < 0:
            sys.exit(f"error: {flag} cannot be negative, got {v}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        sys.exit(f"error: --lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.beta) and args.beta >= 0):
        sys.exit(f"error: --beta must be a number >= 0 (0: no KL term), got {args.beta}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        sys.exit(f"error: --temperature must be a positive number (1: samples from the prior N(0, I)), "
                 f"got {args.temperature}")
    if args.img_size is not None and args.img_size < 1:
        sys.exit(f"error: --img-size must be a positive power of two, got {args.img_size}")
    if args.recon_samples and not data.has_test_split(args.data):
        sys.exit(f"error: --recon-samples reconstructs a held-out split, which only the named datasets "
                 f"({', '.join(data.DATASETS)}) have and {args.data} does not; drop --recon-samples")
    if args.eval_every and args.eval_n < 2:
        sys.exit(f"error: --eval-n must be at least 2 (FID needs a covariance), got {args.eval_n}")
    if args.eval_every:
        try:  # from the name alone: nothing is loaded yet
            metrics.check_set(args.eval_ref or "")
        except metrics.MetricsError as e:
            sys.exit(f"error: --eval-ref: {e}" if args.eval_ref else f"error: --data {args.data} has no test "
                     "split; give --eval-every its reference with --eval-ref (dataset, folder, .npy or .npz)")
    if ddp and args.sync_bn and device.type != "cuda":  # else DDP raises from inside PyTorch
        sys.exit("error: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); "
                 "drop --sync-bn to keep BatchNorm per rank")
    done = ckpt["epoch"] if ckpt else 0
    if args.epochs <= done and not (args.sample or args.recon_samples):
        sys.exit(f"error: nothing to train: {f'{args.resume} has finished {done} epochs' if ckpt else '--epochs is 0'} "
                 f"and no --sample or --recon-samples was asked for; raise --epochs to train on")
    if ckpt and args.epochs > done and 0 < args.max_steps <= ckpt["step"]:
        sys.exit(f"error: nothing to train: {args.resume} is already at step {ckpt['step']} and --max-steps "
                 f"is {args.max_steps}; raise --max-steps or drop it")
    for k in SHAPE_FLAGS if ckpt else []:  # a flag given again that changes the network
        if ckpt["args"].get(k) is not None and getattr(args, k) not in (None, ckpt["args"][k]):
            flag = "--" + k.replace("_", "-")
            sys.exit(f"error: {args.resume} was trained with {flag} {ckpt['args'][k]}, which {flag} "
                     f"{getattr(args, k)} does not fit; drop {flag} to use the checkpoint's")
    if args.arch == "cifar10-report" and (args.img_size, args.channels) != (32, 3):
        sys.exit(f"error: --arch cifar10-report is the CIFAR-10 report's VAE for 32x32 RGB images, which --img-size "
                 f"{args.img_size} --channels {args.channels} does not fit; drop --img-size and --channels")
    check_size(args, device)
    if rank == 0:  # an output folder that cannot be written is found now, not after the first epoch
        try:
            os.makedirs(args.out, exist_ok=True)
            tempfile.TemporaryFile(dir=args.out).close()
        except OSError as e:
            sys.exit(f"error: cannot write to the output folder {args.out} ({e.strerror or e}); choose another --out")


def check_size(args, device):
    """Refuse what cannot fit before allocating any of it: a dry run on the meta device (shapes
    only, no memory) counts the parameters, 4 float32 copies each (weights, gradients, Adam's two
    moments), and every layer's output for one batch (kept for the backward pass)."""
    outputs, channels = [], args.channels or 3
    try:
        with torch.device("meta"):
            model = build({**vars(args), "channels": channels})
            for m in (m for m in model.modules() if not list(m.children())):
                m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
            model(torch.zeros(args.batch_size, channels, args.img_size, args.img_size))
    except ValueError as e:  # a size the architecture cannot take
        sys.exit(f"error: {e}")
    need = 4 * (4 * sum(p.numel() for p in model.parameters()) + sum(outputs))
    have = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        sys.exit(f"error: training at --img-size {args.img_size} with --batch-size {args.batch_size} needs about "
                 f"{need / 2**30:.0f} GiB but the {device.type} device has {have / 2**30:.0f} GiB; "
                 "lower --img-size, --batch-size or --width")


# -----------------------------------------------------------------------------
# Network, optimizer and the checkpoint: the one place that saves and loads them.

def make_networks(args, ckpt, device, memory_format=torch.contiguous_format):
    """The VAE with the checkpoint's weights on the device, then its Adam optimizer. The optimizer
    state is loaded only once the parameters have their final device, dtype and memory layout:
    Adam's moments must match all three (the fused CUDA kernels check)."""
    model = build(vars(args))  # PyTorch's default initialisation
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(device, memory_format=memory_format)
    # Adam with its default betas. One fused kernel per step on CUDA, foreach elsewhere.
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, **fused)
    if ckpt:
        load_optimizer(opt, ckpt["opt"])
    return model, opt


def load_optimizer(opt, state):
    opt.load_state_dict(state)  # moves each state tensor to its parameter's device and dtype ...
    for group in opt.param_groups:  # ... but keeps the saved strides: re-lay them as the parameter's
        for p in group["params"]:
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)


def save_checkpoint(path, model, opt, args, epoch, batch, step, fixed_z):
    """ckpt.pt: where the run stands (epoch = whole epochs done, batch = batches done in the next),
    written to a temporary file and renamed: a crash or a full disk never tears the old one."""
    state = {"script": "vae_conv", "args": vars(args), "epoch": epoch, "batch": batch, "step": step,
             "model": model.state_dict(), "opt": opt.state_dict(), "fixed_z": fixed_z.cpu()}
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # RuntimeError: PyTorch's zip writer on a full disk
        if os.path.lexists(path + ".tmp"):
            os.remove(path + ".tmp")
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was saved"
        sys.exit(f"error: could not write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0]}); "
                 f"{kept}. Free some disk space, then resume")


# -----------------------------------------------------------------------------
# The paper's training step (Kingma & Welling, Algorithm 1: a minibatch, one z per image,
# a gradient step on the negative ELBO), and the held-out loss.

def train_step(model, opt, x, args, amp):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out, mu, logvar = model(x)  # B x C x S x S, B x latent, B x latent
        loss, rec, kl = vae_loss(out, x, mu, logvar, args.recon, args.beta)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, rec, kl


def evaluate(model, images, args, device):
    """Held-out (total, recon, KL) per image: the negative ELBO when beta = 1. As pytorch/examples'
    vae, one sampled z per image, not mu, with eps from a CPU generator of a fixed seed, so that
    epochs and devices compare. A reported likelihood must not depend on the device either: plain
    float32 (no autocast, no TF32 convolutions or matmuls), batched, no grad, eval mode."""
    gen, sums = torch.Generator().manual_seed(args.seed), torch.zeros(3, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for i in range(0, len(images), args.batch_size):
                x = data.to_float(images[i:i + args.batch_size]).to(device)  # B x C x S x S, float32
                out, mu, logvar = model(x, generator=gen)
                sums += torch.stack(vae_loss(out, x, mu, logvar, args.recon, args.beta)) * len(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.train()
    return (sums / len(images)).tolist()


# -----------------------------------------------------------------------------
# The loss log: one row per logged step, and one held-out row per epoch (training cells blank).

COLUMNS = ["step", "epoch", "loss", "recon", "kl", "img_per_s", "test_loss", "test_recon", "test_kl"]


# -----------------------------------------------------------------------------
# Stopping: Ctrl-C (SIGINT) and SIGTERM (what torchrun sends its workers on Ctrl-C) only raise a
# flag; the step in flight finishes, the checkpoint is saved and the run exits with 128 + signal.
# NaN/inf losses stop it too, keeping the last good checkpoint. All ranks agree at log steps.

@contextlib.contextmanager
def stop_signals():
    """While training, Ctrl-C and SIGTERM only add their number to the list this yields; the
    previous handlers come back when the block ends, however it ends."""
    caught, previous = [], {}

    def handler(signum, _frame):
        caught.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def agree_to_stop(bad, caught, ddp, ckpt_path, where):
    """The one host sync: any rank's non-finite loss or stop signal, known to every rank."""
    flags = torch.stack([bad.float(), torch.tensor(float(caught[0] if caught else 0), device=bad.device)])
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, signum = flags.tolist()
    if nonfinite:
        kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was saved"
        sys.exit(f"error: the losses became NaN/inf {where}; stopping: {kept} (try a lower --lr)")
    return int(signum)


# -----------------------------------------------------------------------------
# Single images for metrics.py: prior samples (--sample) and held-out reconstructions (--recon-samples).

def write_singles(model, codes, n, folder, log):
    """decode(codes(i, b)), b codes from number i on, as n single PNGs folder/000000.png ... (data.write_pngs,
    the files metrics.py reads), 500 at a time, in eval mode without grad; a failed write is one sentence."""
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 500):
            try:
                data.write_pngs(model.decode(codes(i, min(500, n - i))), folder, first=i)
            except data.DataError as e:
                sys.exit(f"error: {e}")
    log(f"wrote {n} images to {folder}")


def score_samples(evaluator, model, test_images, args, device, step, epoch):
    """--eval-every: FID, KID, IS, precision/recall and Laplacian variance (metrics.TrainingEval) of
    --eval-n prior samples decode(z), z ~ N(0, I), and of the reconstructions decode(mu(x)) of the
    first --eval-n held-out images: the gap between the two is the VAE's "prior hole". The same z at
    every evaluation, from their own generator, so that training's random stream is untouched.
    True when the samples' FID is the lowest yet."""
    gen = torch.Generator(device).manual_seed(args.seed + 2)
    sets = {"samples": lambda b: model.decode(torch.randn(b, args.latent_dim, device=device, generator=gen))}
    if test_images is not None:  # TrainingEval asks for its images EVAL_BATCH at a time, in order
        held_out = iter(test_images[:args.eval_n].split(metrics.EVAL_BATCH))
        sets["recon"] = lambda b: model.decode(model.encode(data.to_float(next(held_out)).to(device))[0])
    model.eval()
    try:
        best = evaluator.evaluate(step, epoch, sets)
    except metrics.MetricsError as e:  # e.g. FID's square root of a degenerate covariance: a lost row, not a lost run
        print(f"warning: the evaluation at step {step} failed ({e}); training goes on", file=sys.stderr)
        best = False
    model.train()
    return best


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- Setup: flags (completed from the checkpoint), device, ranks, everything checked.
    p, args = get_args(argv)
    try:
        ckpt = read_checkpoint(args.resume) if args.resume else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    if ckpt:
        ckpt["args"].setdefault("arch", "paper")  # a checkpoint from before --arch has the paper's networks
        restore_args(p, args, ckpt)
    ddp = "RANK" in os.environ  # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device, ddp)
    # A resumed run continues in its checkpoint's folder, wherever that folder has moved.
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                            os.path.join("runs", f"vae_conv-{os.path.basename(os.path.normpath(args.data))}"))
    for k, v in ARCH_DEFAULTS[args.arch].items():  # flags left unset take their --arch's value
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.img_size is None:
        args.img_size = 64 if args.data == "celeba" else 32
    args.eval_every = args.eval_every or 0  # after restore_args: an explicit 0 turns a resumed run's off
    if args.eval_every and args.eval_ref is None and data.has_test_split(args.data):
        args.eval_ref = f"{args.data}:test"
    check_args(args, ckpt, device, ddp, rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    # Channels-last (NHWC) convolutions are faster with cuDNN; the CPU and MPS keep the default layout.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(args.seed + rank)
    epoch, batch, step = (ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]) if ckpt else (0, 0, 0)
    train = epoch < args.epochs

    # --- Data: decoded once into a uint8 cache, then served as [-1, 1] batches on the device.
    # The held-out split (where the dataset has one) gives the test loss at each epoch end and
    # the images of --recon-samples.
    loader = test_images = None
    try:
        if train:
            ds = data.load(args.data, root=args.data_root, split="train", img_size=args.img_size,
                           channels=args.channels, crop=args.crop)
            args.channels = ds.images.shape[1]
            loader = data.Loader(ds.images, args.batch_size, device, seed=args.seed, flip=args.flip,
                                 rank=rank, world_size=world,
                                 channels_last=memory_format == torch.channels_last)
        if data.has_test_split(args.data) and (train or args.recon_samples):
            test_images = data.load(args.data, root=args.data_root, split="test", img_size=args.img_size,
                                    channels=args.channels, crop=args.crop).images
            args.channels = test_images.shape[1]
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if test_images is not None and args.recon_samples > len(test_images):  # known once the split is read
        sys.exit(f"error: --recon-samples {args.recon_samples} asks for more images than the {len(test_images)} "
                 f"of the {args.data} held-out split; lower --recon-samples")
    if train:
        # The fixed inputs of recon_epoch_NNN.png: the first 32 training images, in rows of 8.
        n_recon, row_len = min(32, len(ds.images)), min(8, len(ds.images))
        recon_x = data.to_float(ds.images[:n_recon - n_recon % row_len]).to(device)
    args.channels = args.channels or 3  # sampling only: the checkpoint normally says
    log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    # --eval-every: the Inception network and the reference are loaded now, so that a missing weight
    # file or a bad reference stops the run before its first step, not after an epoch.
    evaluator = None
    if args.eval_every and train and rank == 0:
        if test_images is not None and len(test_images) < args.eval_n:
            sys.exit(f"error: --eval-n {args.eval_n} asks for more reconstructions than the {len(test_images)} "
                     f"held-out images of {args.data}; lower --eval-n")
        try:  # VAEs score their reconstructions of held-out images too
            evaluator = metrics.TrainingEval(args.eval_ref, args.eval_n, args.out, args.weights, device,
                                             args.data_root, after_step=step if ckpt else None, log=log,
                                             sets=("samples", "recon") if test_images is not None else ("samples",))
        except (metrics.MetricsError, data.DataError) as e:
            sys.exit(f"error: {e}")

    # --- Network: the VAE (plain, for the checkpoint, evaluation and sampling) and the copy that
    # trains: DDP averages gradients over ranks (BatchNorm stays per rank unless --sync-bn), and
    # torch.compile fuses kernels.
    model, opt = make_networks(args, ckpt, device, memory_format)
    fixed_z = (ckpt["fixed_z"] if ckpt else
               torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))).to(device)
    count = lambda *ms: sum(t.numel() for m in ms for t in m.parameters())
    log(f"encoder: {count(model.encoder, model.fc_mu, model.fc_logvar):,} parameters   "
        f"decoder: {count(model.fc_z, model.decoder):,} parameters")
    if ckpt:
        log(f"resumed from {args.resume}: epoch {epoch + 1}, batch {batch}, step {step}")
    if ddp and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_train = DDP(model, device_ids=[device] if device.type == "cuda" else None) if ddp else model
    if args.compile:
        model_train = torch.compile(model_train)

    # --- Training: epochs of the paper's step, logged to losses.csv; each epoch (or the run,
    # when it stops early) ends with the held-out loss, samples of the fixed z and reconstructions,
    # the loss plot and the checkpoint.
    ckpt_path, csv_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "losses.csv")
    if rank == 0 and train:
        metrics.start_log(csv_path, COLUMNS, after_step=step if ckpt else None)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    n = len(loader) if train else 1  # batches per epoch
    signum = 0
    with stop_signals() as caught:
        while train and epoch < args.epochs and not signum:
            model.train()
            t0, seen, first = time.perf_counter(), 0, min(batch, n)
            loss_sum = torch.zeros((), device=device)  # this epoch's training losses, summed on the device
            for batch, x in enumerate(loader.epoch(epoch, start=first), start=first):  # B x C x S x S
                loss, rec, kl = train_step(model_train, opt, x, args, args.amp)
                step, seen = step + 1, seen + x.shape[0] * world
                loss_sum += loss.detach()
                bad |= ~torch.isfinite(loss.detach())  # a flag on the device, no sync
                at_max = bool(args.max_steps and step >= args.max_steps)
                if step % args.log_every == 0 or at_max or (caught and not ddp):
                    signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"by step {step}")
                    rate = seen / (time.perf_counter() - t0)
                    row = [step, epoch + 1, loss.item(), rec.item(), kl.item(), rate]
                    eta = (args.epochs * n - epoch * n - batch - 1) * x.shape[0] * world / rate
                    log(f"[{epoch + 1}/{args.epochs}][{batch + 1}/{n}] step {step} loss {row[2]:.2f} = recon "
                        f"{row[3]:.2f} + {args.beta:g} * KL {row[4]:.2f}  {rate:.0f} img/s  ETA {eta / 60:.1f} min")
                    if rank == 0:
                        metrics.log_row(csv_path, row + [""] * 3)
                if at_max or signum:
                    break
            # Where the run stands: whole epochs done, and batches done in the next one.
            batch = batch + 1 if first < n else n
            ran = batch - first  # batches trained in this epoch by this run
            epoch, batch = (epoch + 1, 0) if batch == n else (epoch, batch)
            label = epoch if batch == 0 else epoch + 1  # the epoch these steps were in: a partial one is named after itself
            signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"in epoch {label}")
            if rank == 0 and not signum:  # a stop signal saves at once, without the held-out pass
                t1 = time.perf_counter()
                msg = f"====> epoch {label}: train loss {loss_sum.item() / max(ran, 1):.4f} per image ({t1 - t0:.1f} s)"
                if test_images is not None:
                    test = evaluate(model, test_images, args, device)
                    metrics.log_row(csv_path, [step, label] + [""] * 4 + test)
                    msg += (f", test loss {test[0]:.4f} = recon {test[1]:.4f} + {args.beta:g} * KL {test[2]:.4f} "
                            f"({time.perf_counter() - t1:.1f} s)")
                log(msg)
            if rank == 0:  # samples of the fixed z and reconstructions decode(mu), in eval mode; plot; checkpoint
                model.eval()
                with torch.no_grad():
                    grid = model.decode(fixed_z).float()
                    pairs = torch.stack([recon_x, model.decode(model.encode(recon_x)[0]).float()], 1)
                model.train()
                vutils.save_image(grid, os.path.join(args.out, f"grid_epoch_{label:03d}.png"),
                                  nrow=8, normalize=True, value_range=(-1, 1))
                # Rows of 8 inputs, each above its 8 reconstructions.
                pairs = pairs.view(-1, row_len, 2, *recon_x.shape[1:]).transpose(1, 2).flatten(0, 2)
                vutils.save_image(pairs, os.path.join(args.out, f"recon_epoch_{label:03d}.png"),
                                  nrow=row_len, normalize=True, value_range=(-1, 1))
                metrics.plot_losses(csv_path, os.path.join(args.out, "losses.png"))
                save_checkpoint(ckpt_path, model, opt, args, epoch, batch, step, fixed_z)
                last = epoch == args.epochs or bool(args.max_steps and step >= args.max_steps)
                if evaluator and not signum and ((batch == 0 and epoch % args.eval_every == 0) or last):
                    if score_samples(evaluator, model, test_images, args, device, step, label):  # the lowest FID so far
                        save_checkpoint(os.path.join(args.out, "best.pt"), model, opt, args, epoch, batch, step, fixed_z)
            if args.max_steps and step >= args.max_steps:
                break
    if signum:
        log(f"stopped by signal {signum}: checkpoint saved to {ckpt_path}; continue with --resume {ckpt_path}")
        if ddp:
            dist.destroy_process_group()
        sys.exit(128 + signum)  # 130 for Ctrl-C, as shells expect

    # --- Single PNGs for metrics.py: N prior samples decode(z), z ~ N(0, t^2 I) = t * eps (--temperature t;
    # t = 1 is the model's prior), and the reconstructions decode(mu(x)) of the first N held-out images,
    # the mean code, no sampling (how the CIFAR-10 report scored its VAE).
    if args.sample and rank == 0:
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        prior = lambda i, b: args.temperature * torch.randn(b, args.latent_dim, device=device, generator=gen)
        write_singles(model, prior, args.sample, os.path.join(args.out, "samples"), log)
    if args.recon_samples and rank == 0:
        mean_codes = lambda i, b: model.encode(data.to_float(test_images[i:i + b]).to(device))[0]  # mu, b x latent
        write_singles(model, mean_codes, args.recon_samples, os.path.join(args.out, "recon_samples"), log)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
