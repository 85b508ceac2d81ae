"""VAE-GAN: a VAE whose reconstruction error is measured in a GAN discriminator's features.

Larsen, Sønderby, Larochelle & Winther, "Autoencoding beyond pixels using a learned similarity
metric", ICML 2016, arXiv:1512.09300: the architecture of its 64x64 experiments, the three losses,
and the updates of its Algorithm 1, with RMSprop at 3e-4 and batch 64. Kept in balance as GANs
need: the discriminator normalises real images, reconstructions and prior samples each in its own
BatchNorm batch (--separate-dis, ours), weighs real against generated images (--real-weight) and
skips the update of whichever of decoder and discriminator is too far ahead (--margin), the last
two the authors' training tricks. Without them, on MNIST the discriminator rejects every prior
sample from the first steps (D(x_p) ~ 0) and samples from the prior are not digits.

    python vaegan.py --data celeba                             # the CelebA report: 64x64, gamma 15
    python vaegan.py --data mnist --epochs 5 --gamma 1.5       # MNIST resized to 32x32
    python vaegan.py --resume runs/vaegan-celeba/ckpt.pt --epochs 0 --sample 10000 --recon-samples 10000
    torchrun --nproc_per_node=2 vaegan.py --data celeba        # data-parallel on 2 devices
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
import torchvision.utils as vutils

import data
import metrics


# -----------------------------------------------------------------------------
# Models: the paper's 64x64 networks (its architecture table; the authors' architectures.img64x64
# has them too, with a 1024-unit encoder layer where the paper says 2048), all 5x5 kernels. Every
# size has the same layers; only the map behind the dense layers, S/8 x S/8, follows --img-size
# (8x8 at 64, 4x4 at 32). --width scales every layer; 64 is the paper's. PyTorch's default init.

def _down(cin, cout):  # B x cin x s x s -> B x cout x s/2 x s/2 (BatchNorm follows: no bias)
    return [nn.Conv2d(cin, cout, 5, 2, 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def _up(cin, cout):    # B x cin x s x s -> B x cout x 2s x 2s
    return [nn.ConvTranspose2d(cin, cout, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def _map_side(img_size, width):
    if img_size % 8 or img_size < 16:
        raise ValueError(f"--img-size must be a multiple of 8 from 16 up (16, 32, 64, ...), got {img_size}")
    if width < 2 or width % 2:
        raise ValueError(f"--width must be an even number >= 2, got {width}")
    return img_size // 8


class Encoder(nn.Module):
    def __init__(self, latent_dim=128, width=64, channels=3, img_size=64):
        super().__init__()
        s, w = _map_side(img_size, width), width
        # B x C x S x S -> B x 4w x S/8 x S/8 (64, 128, 256 channels) -> B x 32w (2048 units)
        self.net = nn.Sequential(*_down(channels, w), *_down(w, 2 * w), *_down(2 * w, 4 * w), nn.Flatten(),
                                 nn.Linear(4 * w * s * s, 32 * w, bias=False), nn.BatchNorm1d(32 * w), nn.ReLU())
        self.fc_mu, self.fc_logvar = nn.Linear(32 * w, latent_dim), nn.Linear(32 * w, latent_dim)

    def forward(self, x):  # x: B x C x S x S in [-1, 1] -> mu, logvar: B x latent
        h = self.net(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    def __init__(self, latent_dim=128, width=64, channels=3, img_size=64):
        super().__init__()
        s, w = _map_side(img_size, width), width
        # B x latent -> B x 4w x S/8 x S/8 -> transposed convs 256, 128, 32 -> B x C x S x S in [-1, 1]
        self.net = nn.Sequential(nn.Linear(latent_dim, 4 * w * s * s, bias=False), nn.BatchNorm1d(4 * w * s * s),
                                 nn.ReLU(), nn.Unflatten(1, (4 * w, s, s)),
                                 *_up(4 * w, 4 * w), *_up(4 * w, 2 * w), *_up(2 * w, w // 2),
                                 nn.Conv2d(w // 2, channels, 5, 1, 2), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, width=64, channels=3, img_size=64):
        super().__init__()
        s, w = _map_side(img_size, width), width
        # B x C x S x S -> 32 (stride 1, no BatchNorm) -> 128, 256, 256 at S/8 -> 512 units -> 1 logit.
        # No in-place ReLU: the output of a conv is kept as the feature map Dis_l.
        self.net = nn.Sequential(nn.Conv2d(channels, w // 2, 5, 1, 2), nn.ReLU(),
                                 *_down(w // 2, 2 * w), *_down(2 * w, 4 * w), *_down(4 * w, 4 * w))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * s * s, 8 * w, bias=False),
                                  nn.BatchNorm1d(8 * w), nn.ReLU(), nn.Linear(8 * w, 1))
        self.conv_at = [i for i, m in enumerate(self.net) if isinstance(m, nn.Conv2d)]

    def forward(self, x, layer=4):  # -> B logits, B x N_l features: the output of conv `layer` (1-4)
        for i, m in enumerate(self.net):
            x = m(x)
            if i == self.conv_at[layer - 1]:
                feats = x.flatten(1)
        return self.head(x).flatten(), feats


class VAEGAN(nn.Module):
    """The three networks; .encode(x) -> (mu, logvar) and .decode(z) are what latent_edit.py uses."""

    def __init__(self, latent_dim=128, width=64, channels=3, img_size=64):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(latent_dim, width, channels, img_size)
        self.decoder = Decoder(latent_dim, width, channels, img_size)
        self.discriminator = Discriminator(width, channels, img_size)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):  # z: B x latent -> B x C x S x S in [-1, 1]
        return self.decoder(z)


NETS = ("encoder", "decoder", "discriminator")  # each has its own loss, optimizer and checkpoint entry


def build(cfg):
    """The networks from a config dict (vars(args) or a checkpoint's copy of it)."""
    return VAEGAN(cfg["latent_dim"], cfg["width"], cfg["channels"], cfg["img_size"])


def load_model(path, device="cpu"):
    """The VAE-GAN of a vaegan.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = read_checkpoint(path)  # ValueError with one sentence if it is not a vaegan.py checkpoint
    model = build(ckpt["args"])
    for name in NETS:
        getattr(model, name).load_state_dict(ckpt[name])
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# The losses (section 2 of the paper), per image and averaged over the batch:
#   L_prior = KL(q(z|x) || N(0, I)) = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))
#   L_llike = -log N(Dis_l(x) | Dis_l(x~), I) = 1/2 sum over the N_l features of (Dis_l(x~) - Dis_l(x))^2
#             + const, with x~ = Dec(z), z ~ q(z|x): a Gaussian likelihood on discriminator features.
#             Dis_l: the output of the discriminator's 4th conv before its BatchNorm, as the authors'
#             celeba_aegan.py (recon_depth=9) and lucabergamini/VAEGAN-PYTORCH. feat_mse = the mean
#             of those squares, so L_llike = N_l / 2 * feat_mse.
#   L_GAN   = log Dis(x) + log(1 - Dis(Dec(z))) + log(1 - Dis(Dec(z_p))),  z_p ~ N(0, I)
# Algorithm 1: Enc <- grad(L_prior + L_llike); Dec <- grad(gamma L_llike - L_GAN); Dis <- grad(L_GAN).
#   - Dis minimises the cross-entropy -L_GAN (bce on logits: the safe form, also under autocast),
#     its real and generated images weighted as the authors' real_vs_gen_weight w (--real-weight):
#       loss_dis = 2 * (w * dis_real + (1 - w) * dis_fake),  dis_real = -log Dis(x),
#       dis_fake = -1/2 [log(1 - Dis(Dec(z))) + log(1 - Dis(Dec(z_p)))]   (batch means).
#     w = 1/2 (the default, theirs): -log Dis(x) - 1/2 log(1 - Dis(x~)) - 1/2 log(1 - Dis(x_p)).
#     w = None: -L_GAN itself, the three cross-entropies with weight 1 (Algorithm 1 as written).
#     w = 1/3 is 2/3 of that: the same direction, but not the same RMSprop step where gradients are
#     as small as its eps (measured: up to 15% of a step apart after one step), hence None.
#   - Dec takes the non-saturating form of -L_GAN: it minimises -log Dis(x~) - log Dis(Dec(z_p)).
#   - gamma multiplies feat_mse, the mean over features: the scale of the report's gamma = 15 (the
#     PyTorch ports it ran use ((Dis_l(x~) - Dis_l(x))^2).mean()); the paper's gamma on the summed
#     L_llike is ours * 2 / N_l. The encoder gets the summed L_llike, the Gaussian log-likelihood
#     that balances its KL as in a VAE (and as the authors' code, sum over features and images).

def reparameterise(mu, logvar, eps=None):
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype) if eps is None else eps
    return mu + torch.exp(logvar / 2) * eps  # the standard deviation, not the log-variance


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def kl_divergence(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / mu.shape[0]


def feature_mse(f_tilde, f_x):
    return (f_tilde - f_x).pow(2).mean()


def pixel_mse(x_tilde, x):  # for monitoring only: sum over [0, 1]-scaled pixels, as vae_conv.py's recon
    return ((x_tilde - x) / 2).pow(2).sum() / x.shape[0]


def vaegan_loss(x, mu, logvar, x_tilde, logits, feats, gamma, real_weight=0.5):  # real_weight: w or None
    """Every term of one step. logits: Dis on [x, x~, x_p] (3B); feats: Dis_l on the same batch."""
    b = x.shape[0]
    mu, logvar, logits, feats = mu.float(), logvar.float(), logits.float(), feats.float()
    kl, f_mse = kl_divergence(mu, logvar), feature_mse(feats[b:2 * b], feats[:b])
    real, tilde, prior = logits.split(b)
    dis_real, dis_fake = bce(real, 1.0), (bce(tilde, 0.0) + bce(prior, 0.0)) / 2
    if real_weight is None:  # -L_GAN = -log Dis(x) - log(1 - Dis(Dec(z))) - log(1 - Dis(Dec(z_p)))
        loss_dis = dis_real + 2 * dis_fake
    else:  # the authors' real_vs_gen_weight w; x2 so that w = 1/2 is dis_real + dis_fake
        loss_dis = 2 * (real_weight * dis_real + (1 - real_weight) * dis_fake)
    gan_dec = bce(tilde, 1.0) + bce(prior, 1.0)
    with torch.no_grad():
        diag = {"pixel_mse": pixel_mse(x_tilde.float(), x), "D(x)": torch.sigmoid(real).mean(),
                "D(x_tilde)": torch.sigmoid(tilde).mean(), "D(x_p)": torch.sigmoid(prior).mean(),
                "dis_real": dis_real.detach(), "dis_fake": dis_fake.detach()}
    return {"loss_enc": kl + feats.shape[1] / 2 * f_mse, "loss_dec": gamma * f_mse + gan_dec, "loss_dis": loss_dis,
            "kl": kl, "feat_mse": f_mse, "gan_dec": gan_dec, **diag}


# -----------------------------------------------------------------------------
# Settings: parsed, completed from a checkpoint, then checked in one place before any work.

def number_or_none(v):
    return None if v.lower() == "none" else float(v)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="celeba", help=f"one of {', '.join(data.DATASETS)}, or a folder of images")
    p.add_argument("--data-root", default="data", help="where datasets and the decoded cache live")
    p.add_argument("--img-size", type=int, default=None, help="pixels, a multiple of 8; 64 for celeba, 32 otherwise")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="image channels; default: the dataset's own")
    p.add_argument("--crop", type=int, default=None, help="center-crop this many pixels before resizing (108: CelebA face crop)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--epochs", type=int, default=15, help="total epochs (a resumed run continues to this count); "
                   "15: the authors' 150 x 250 batches of 64, about 15 passes over CelebA's training images")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of all three optimizers")
    p.add_argument("--optim", default="rmsprop", choices=["rmsprop", "adam"], help="rmsprop: the paper; adam: betas (0.5, 0.999)")
    p.add_argument("--latent-dim", type=int, default=128, help="size of z")
    p.add_argument("--width", type=int, default=64, help="channels of the first encoder conv; every layer scales with it")
    p.add_argument("--gamma", type=float, default=15.0, help="decoder update: weight of feat_mse (the mean squared Dis_l error) against the GAN loss; "
                   "15 is the report's best, it also tried 1.5")
    p.add_argument("--dis-layer", type=int, default=4, choices=[1, 2, 3, 4],
                   help="Dis_l: the discriminator conv (counted from the input) whose output, before its BatchNorm, "
                   "measures reconstructions; 4 as the authors' code (the last, 3rd strided conv)")
    # Keeping the GAN in balance: what makes prior samples digits after one MNIST epoch (README).
    p.add_argument("--separate-dis", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: the discriminator sees x, x~ and x_p as three batches, each with its own BatchNorm "
                   "statistics; --no-separate-dis: one joint batch of 3B, as the authors' code")
    p.add_argument("--real-weight", type=number_or_none, default=0.5, help="the authors' real_vs_gen_weight w, in "
                   "(0, 1): loss_dis = 2 (w bce(real) + (1 - w) bce(fakes)); 'none': the paper's sum of the three "
                   "cross-entropies, as Algorithm 1")
    p.add_argument("--margin", type=number_or_none, default=0.35,
                   help="the authors' balancing: no discriminator update while its cost on real images or on fakes "
                   "is below equilibrium - margin, no decoder update while one is above equilibrium + margin; "
                   "'none': update both always, as Algorithm 1")
    p.add_argument("--equilibrium", type=float, default=0.68, help="the discriminator cost (nats) the balancing "
                   "aims at, the authors' 0.68 (~ ln 2: a discriminator that cannot tell)")
    p.add_argument("--lr-decay", type=float, default=1.0, help="multiply the learning rates by this after every "
                   "epoch, as the authors anneal theirs; 1: constant")
    p.add_argument("--out", default=None, help="output folder; default runs/vaegan-<data>, or the --resume checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the three networks")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks")
    p.add_argument("--resume", default=None, help="ckpt.pt to continue from; flags not given again come from it")
    p.add_argument("--sample", type=int, default=0, help="after training, write this many single PNGs to OUT/samples/")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="--sample draws z ~ N(0, t^2 I) (the training grids: t = 1)")
    p.add_argument("--recon-samples", type=int, default=0, help="after training, write the reconstructions "
                   "decode(mu) of the first N held-out images as single PNGs to OUT/recon_samples/")
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
# Flags that fix the networks' shapes (and, --optim, the optimizers' state): a checkpoint only
# fits networks and optimizers built with its own.
SHAPE_FLAGS = ["latent_dim", "width", "channels", "img_size", "optim"]


def read_checkpoint(path):
    """The dict a vaegan.py run saved, or ValueError with one sentence saying why `path` is not one."""
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
    if not isinstance(ckpt, dict) or ckpt.get("script") != "vaegan":
        script = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} was not written by vaegan.py (script: {script!r}); use that script with it")
    # A checkpoint from before issue #17's flags trained the original way: one joint discriminator
    # batch, the paper's plain sum, no balancing, no decay. It resumes that way.
    for k, v in {"separate_dis": False, "real_weight": None, "margin": None, "equilibrium": 0.68,
                 "lr_decay": 1.0}.items():
        ckpt["args"].setdefault(k, v)
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
                    "--crop": args.crop or 0, "--eval-every": args.eval_every,
                    "--recon-samples": args.recon_samples}.items():
        if v < 0:
            sys.exit(f"error: {flag} cannot be negative, got {v}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        sys.exit(f"error: --lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.gamma) and args.gamma >= 0):
        sys.exit(f"error: --gamma must be a number >= 0, got {args.gamma}")
    if args.real_weight is not None and not 0 < args.real_weight < 1:
        sys.exit(f"error: --real-weight must be between 0 and 1 (both excluded) or 'none', got {args.real_weight}")
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin >= 0):
        sys.exit(f"error: --margin must be a number >= 0 or 'none', got {args.margin}")
    if not (math.isfinite(args.equilibrium) and args.equilibrium > 0):
        sys.exit(f"error: --equilibrium must be a positive number of nats, got {args.equilibrium}")
    if not 0 < args.lr_decay <= 1:
        sys.exit(f"error: --lr-decay must be in (0, 1] (1: constant learning rate), got {args.lr_decay}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        sys.exit(f"error: --temperature must be a positive number, got {args.temperature}")
    if args.recon_samples and not data.has_test_split(args.data):
        sys.exit(f"error: --recon-samples reconstructs held-out images, and {args.data} has no held-out split; "
                 f"use one of {', '.join(data.DATASETS)}")
    if args.img_size is not None and args.img_size < 1:
        sys.exit(f"error: --img-size must be a positive multiple of 8, got {args.img_size}")
    if args.eval_every and args.eval_n < 2:
        sys.exit(f"error: --eval-n must be at least 2 (FID needs a covariance), got {args.eval_n}")
    if args.eval_every:
        try:  # from the name alone: nothing is loaded yet
            metrics.check_set(args.eval_ref or "")
        except metrics.MetricsError as e:
            sys.exit(f"error: --eval-ref: {e}" if args.eval_ref else f"error: --data {args.data} has no test "
                     "split; give --eval-every its reference with --eval-ref (dataset, folder, .npy or .npz)")
    if ddp and args.sync_bn and device.type != "cuda":  # else SyncBatchNorm raises from inside PyTorch
        sys.exit("error: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); "
                 "drop --sync-bn to keep BatchNorm per rank")
    check_size(args, device)
    done = ckpt["epoch"] if ckpt else 0
    if args.epochs <= done and not (args.sample or args.recon_samples):
        sys.exit(f"error: nothing to train: {f'{args.resume} has finished {done} epochs' if ckpt else '--epochs is 0'} "
                 f"and no --sample or --recon-samples was asked for; raise --epochs to train on")
    if ckpt and args.epochs > done and 0 < args.max_steps <= ckpt["step"]:
        sys.exit(f"error: nothing to train: {args.resume} is already at step {ckpt['step']} and --max-steps "
                 f"is {args.max_steps}; raise --max-steps or drop it")
    for k in SHAPE_FLAGS if ckpt else []:  # a flag given again that the checkpoint does not fit
        if ckpt["args"].get(k) is not None and getattr(args, k) not in (None, ckpt["args"][k]):
            flag = "--" + k.replace("_", "-")
            sys.exit(f"error: {args.resume} was trained with {flag} {ckpt['args'][k]}, which {flag} "
                     f"{getattr(args, k)} does not fit; drop {flag} to use the checkpoint's")
    if args.optim == "adam" and args.margin is not None:  # see train_step: a zero gradient is no skip for Adam
        sys.exit("error: --margin skips an update by zeroing its gradient, which stops RMSprop but not Adam "
                 "(its momentum moves the weights on); with --optim adam add --margin none")
    if rank == 0:  # an output folder that cannot be written is found now, not after the first epoch
        try:
            os.makedirs(args.out, exist_ok=True)
            tempfile.TemporaryFile(dir=args.out).close()
        except OSError as e:
            sys.exit(f"error: cannot write to the output folder {args.out} ({e.strerror or e}); choose another --out")


def check_size(args, device):
    """Refuse what cannot fit before allocating any of it: a dry run on the meta device (shapes
    only, no memory) counts the parameters, 4 float32 copies each (weights, gradients, the
    optimizer's one or two moments), and every layer's output for one step (kept for backward)."""
    cfg, outputs = {**vars(args), "img_size": args.img_size or 64, "channels": args.channels or 3}, []
    try:
        with torch.device("meta"):
            model = build(cfg)
            for m in (m for m in model.modules() if not list(m.children())):
                m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
            x = torch.zeros(args.batch_size, cfg["channels"], cfg["img_size"], cfg["img_size"])
            mu, _ = model.encode(x)                                     # as train_step: Enc on B,
            model.discriminator(torch.cat([x, model.decode(torch.cat([mu, mu]))]))  # Dec on 2B, Dis on 3B
    except ValueError as e:  # a size the architecture cannot take
        sys.exit(f"error: {e}")
    need = 4 * (4 * sum(p.numel() for p in model.parameters()) + sum(outputs))
    have = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        sys.exit(f"error: training at --img-size {cfg['img_size']} with --batch-size {args.batch_size} needs about "
                 f"{need / 2**30:.0f} GiB but the {device.type} device has {have / 2**30:.0f} GiB; "
                 "lower --img-size, --batch-size or --width")


# -----------------------------------------------------------------------------
# Networks, optimizers and the checkpoint: the one place that saves and loads them.

def make_networks(args, ckpt, device, memory_format=torch.contiguous_format):
    """The three networks with the checkpoint's weights on the device, then one optimizer each.
    The optimizer state is loaded only once the parameters have their final device, dtype and
    memory layout: RMSprop's and Adam's moments must match all three (the fused CUDA kernels check)."""
    model = build(vars(args))
    if ckpt:
        for name in NETS:
            getattr(model, name).load_state_dict(ckpt[name])
    model.to(device, memory_format=memory_format)
    nets = [getattr(model, n) for n in NETS]
    # RMSprop as the paper (it has no fused kernel: foreach everywhere), or Adam, fused on CUDA.
    if args.optim == "adam":
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opts = [torch.optim.Adam(n.parameters(), lr=args.lr, betas=(0.5, 0.999), **fused) for n in nets]
    else:
        opts = [torch.optim.RMSprop(n.parameters(), lr=args.lr, foreach=True) for n in nets]
    if ckpt:
        for name, opt in zip(NETS, opts):
            load_optimizer(opt, ckpt["opt_" + name])
    return (model, *opts)  # opts in the order of NETS


def load_optimizer(opt, state):
    opt.load_state_dict(state)  # moves each state tensor to its parameter's device and dtype ...
    for group in opt.param_groups:  # ... but keeps the saved strides: re-lay them as the parameter's
        for p in group["params"]:
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)


def save_checkpoint(path, model, opts, args, epoch, batch, step, fixed_z):
    """ckpt.pt: where the run stands (epoch = whole epochs done, batch = batches done in the next),
    written to a temporary file and renamed: a crash or a full disk never tears the old one."""
    state = {"script": "vaegan", "args": vars(args), "epoch": epoch, "batch": batch, "step": step,
             **{n: getattr(model, n).state_dict() for n in NETS},
             **{"opt_" + n: opt.state_dict() for n, opt in zip(NETS, opts)},
             "fixed_z": fixed_z.cpu()}
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
# The paper's training step, its Algorithm 1, and the held-out losses at each epoch end.

def average_gradients(params, world):
    """What DDP does, by hand: average every gradient over the ranks, in one all-reduce."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, (flat / world).split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def discriminate(dis, x, fakes, dis_layer, separate):
    """Dis on [x, x~, x_p] -> 3B logits, 3B x N_l features. separate: three calls, so that each
    BatchNorm normalises real images, reconstructions and prior samples with their own batch
    statistics (ours); else one call on the joint batch of 3B, as the authors' code, in which the
    discriminator tells the kinds apart by their batch statistics within a few steps (README)."""
    if not separate:
        return dis(torch.cat([x, fakes]), dis_layer)
    outs = [dis(part, dis_layer) for part in (x, *fakes.chunk(2))]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def balance(dis_real, dis_fake, margin, equilibrium):
    """The authors' GAN balancing (andersbll/autoencoding_beyond_pixels, model/aegan.py,
    GradientDescent.train_epoch), from the discriminator's costs on real images and on fakes:
    no discriminator update while either is below equilibrium - margin (it is too far ahead), no
    decoder update while either is above equilibrium + margin (it is too far ahead); if neither
    would be updated, both are. -> (decoder's, discriminator's) 0/1 float tensors, on the device."""
    dis_on = torch.minimum(dis_real, dis_fake) >= equilibrium - margin
    dec_on = torch.maximum(dis_real, dis_fake) <= equilibrium + margin
    neither = ~(dec_on | dis_on)
    return (dec_on | neither).float(), (dis_on | neither).float()


def train_step(nets, opts, x, gamma, dis_layer, amp=False, world=1, eps=None, z_p=None,
               separate_dis=True, real_weight=0.5, margin=0.35, equilibrium=0.68):
    """One iteration of Algorithm 1: one forward pass of the three networks, then each network's
    gradient of its own loss only (backward with inputs=), all of them before any optimizer step.
    Stepping between the backward passes is what breaks ports on modern PyTorch ("modified by an
    inplace operation"): the later backward needs the weights the step has just changed."""
    enc, dec, dis = nets
    b = x.shape[0]
    # One decoder call on [z, z_p] (BatchNorm sees the joint batch, as the authors' code) and the
    # discriminator on [x, x~, x_p], in one call or three (separate_dis).
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        mu, logvar = enc(x)                                        # B x latent each
        z = reparameterise(mu, logvar, eps)
        z_p = torch.randn(mu.shape, device=x.device) if z_p is None else z_p
        fakes = dec(torch.cat([z, z_p.to(z.dtype)]))              # 2B x C x S x S: [x~, x_p]
        logits, feats = discriminate(dis, x, fakes, dis_layer, separate_dis)  # 3B, 3B x N_l: [x, x~, x_p]
        t = vaegan_loss(x, mu, logvar, fakes[:b], logits, feats, gamma, real_weight)
    # The balancing, with no host sync: each update flag (0 or 1) multiplies its network's loss, and
    # a zero gradient leaves RMSprop's weights bit for bit as they were. Unlike the authors' true skip,
    # RMSprop's running average of squared gradients still decays (by alpha = 0.99) and the backward
    # pass is still computed. Under torchrun every rank decides on the costs averaged over the ranks.
    dec_on = dis_on = torch.ones((), device=x.device)
    if margin is not None:
        costs = torch.stack([t["dis_real"], t["dis_fake"]])
        if world > 1:
            dist.all_reduce(costs)
        dec_on, dis_on = balance(*(costs / world), margin, equilibrium)
    t["dec_step"], t["dis_step"] = dec_on, dis_on
    losses = (t["loss_enc"], t["loss_dec"] * dec_on, t["loss_dis"] * dis_on)
    params = [list(n.parameters()) for n in nets]
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    for i, (loss, ps) in enumerate(zip(losses, params)):  # no GAN gradient reaches Enc, none of Dec's reaches Dis
        loss.backward(inputs=ps, retain_graph=i < 2)
    if world > 1:
        average_gradients([p for ps in params for p in ps], world)
    for name, ps in zip(("enc", "dec", "dis"), params):  # the norm of each network's update direction
        t["gnorm_" + name] = torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])
    for opt in opts:
        opt.step()
    return t


def evaluate(model, images, dis_layer, seed):
    """Held-out KL, feature MSE and pixel MSE per image: eval mode, no gradients, batches of 256,
    z ~ q(z|x) with eps from a CPU generator of a fixed seed, so that epochs and devices compare.
    The numbers must not depend on the device or the speed options either: plain float32 (no
    autocast after --amp training, no TF32 convolutions or matmuls)."""
    device = next(model.parameters()).device
    gen, sums = torch.Generator().manual_seed(seed), torch.zeros(3, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for i in range(0, len(images), 256):
                x = data.to_float(images[i:i + 256].to(device))       # B x C x S x S, float32
                mu, logvar = model.encode(x)
                eps = torch.randn(mu.shape, generator=gen).to(device)
                x_tilde = model.decode(reparameterise(mu, logvar, eps))
                feats = model.discriminator(torch.cat([x, x_tilde]), dis_layer)[1]  # 2B x N_l: [x, x~]
                terms = (kl_divergence(mu, logvar), feature_mse(feats[len(x):], feats[:len(x)]), pixel_mse(x_tilde, x))
                sums += torch.stack(terms) * len(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.train()
    return (sums / len(images)).tolist()


# -----------------------------------------------------------------------------
# The loss log: one row per logged step, and one held-out row (its training cells blank) per epoch end.

LOGGED = ("kl", "feat_mse", "pixel_mse", "loss_dis", "gan_dec", "D(x)", "D(x_tilde)", "D(x_p)",
          "dis_real", "dis_fake", "dec_step", "dis_step", "gnorm_enc", "gnorm_dec", "gnorm_dis")
COLUMNS = ["step", "epoch", *LOGGED, "img_per_s", "test_kl", "test_feat_mse", "test_pixel_mse"]


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
        sys.exit(f"error: the losses became NaN/inf {where}; stopping: {kept} (try a lower --lr or --gamma)")
    return int(signum)


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
        restore_args(p, args, ckpt)
    ddp = "RANK" in os.environ  # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device, ddp)
    # A resumed run continues in its checkpoint's folder, wherever that folder has moved.
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                            os.path.join("runs", f"vaegan-{os.path.basename(os.path.normpath(args.data))}"))
    args.eval_every = args.eval_every or 0  # after restore_args: an explicit 0 turns a resumed run's off
    if args.eval_every and args.eval_ref is None and data.has_test_split(args.data):
        args.eval_ref = f"{args.data}:test"
    check_args(args, ckpt, device, ddp, rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # cuDNN's NHWC
    args.img_size = args.img_size or (64 if args.data == "celeba" else 32)
    torch.manual_seed(args.seed + rank)
    epoch, batch, step = (ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]) if ckpt else (0, 0, 0)
    train = epoch < args.epochs

    # --- Data: decoded once into a uint8 cache, then served as [-1, 1] batches on the device.
    # The held-out split (where the dataset has one) gives the test losses at each epoch end and
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
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if args.recon_samples > (0 if test_images is None else len(test_images)):  # known now, before training
        sys.exit(f"error: --recon-samples {args.recon_samples} asks for more reconstructions than the "
                 f"{len(test_images)} held-out images of {args.data}; ask for at most {len(test_images)}")
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
        try:  # VAE-GANs score their reconstructions of held-out images too
            evaluator = metrics.TrainingEval(args.eval_ref, args.eval_n, args.out, args.weights, device,
                                             args.data_root, after_step=step if ckpt else None, log=log,
                                             sets=("samples", "recon") if test_images is not None else ("samples",))
        except (metrics.MetricsError, data.DataError) as e:
            sys.exit(f"error: {e}")

    # --- Networks: the three (plain, for the checkpoint, evaluation and sampling), one optimizer
    # each, and the copies that train (torch.compile fuses kernels). Data-parallel without DDP:
    # DDP reduces gradients from hooks that expect one forward and one full backward per step,
    # but here one forward feeds three backward passes restricted with inputs=. So under torchrun
    # every rank starts from rank 0's weights, and train_step averages the three gradient sets by
    # hand (one all-reduce) before any step: the arithmetic of DDP. BatchNorm statistics stay per
    # rank unless --sync-bn (rank 0's running averages are saved).
    model, *opts = make_networks(args, ckpt, device, memory_format)  # opts: Enc's, Dec's, Dis's
    fixed_z = (ckpt["fixed_z"] if ckpt else
               torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))).to(device)
    log("   ".join(f"{n}: {sum(t.numel() for t in getattr(model, n).parameters()):,} parameters" for n in NETS))
    if ckpt:
        log(f"resumed from {args.resume}: epoch {epoch + 1}, batch {batch}, step {step}")
    if ddp:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    nets = [getattr(model, n) for n in NETS]
    train_nets = [torch.compile(n) for n in nets] if args.compile else nets

    # --- Training: epochs of Algorithm 1, logged to losses.csv; each epoch (or the run, when it
    # stops early) ends with the held-out losses (not after a stop signal), a grid of the fixed z,
    # the reconstructions of the fixed inputs, the loss plot and the checkpoint.
    ckpt_path, csv_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "losses.csv")
    if rank == 0 and train:
        metrics.start_log(csv_path, COLUMNS, after_step=step if ckpt else None)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    n = len(loader) if train else 1  # batches per epoch
    signum = 0
    with stop_signals() as caught:
        while train and epoch < args.epochs and not signum:
            model.train()
            for opt in opts:  # --lr-decay, as the authors' per-epoch annealing: lr * decay^(epochs done)
                for group in opt.param_groups:
                    group["lr"] = args.lr * args.lr_decay ** epoch
            t0, seen, first = time.perf_counter(), 0, min(batch, n)
            for batch, x in enumerate(loader.epoch(epoch, start=first), start=first):  # B x C x S x S in [-1, 1]
                t = train_step(train_nets, opts, x, args.gamma, args.dis_layer, args.amp, world,
                               separate_dis=args.separate_dis, real_weight=args.real_weight, margin=args.margin,
                               equilibrium=args.equilibrium)
                step, seen = step + 1, seen + x.shape[0] * world
                bad |= ~torch.isfinite(t["loss_enc"].detach() + t["loss_dec"].detach() + t["loss_dis"].detach())  # no sync
                at_max = bool(args.max_steps and step >= args.max_steps)
                if step % args.log_every == 0 or at_max or (caught and not ddp):
                    signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"by step {step}")
                    rate = seen / (time.perf_counter() - t0)
                    v = dict(zip(LOGGED, torch.stack([t[k].detach().float() for k in LOGGED]).tolist()))  # one sync
                    eta = (args.epochs * n - epoch * n - batch - 1) * x.shape[0] * world / rate
                    log(f"[{epoch + 1}/{args.epochs}][{batch + 1}/{n}] step {step} KL {v['kl']:.2f} "
                        f"feat_mse {v['feat_mse']:.4f} pixel_mse {v['pixel_mse']:.2f}  Loss_D {v['loss_dis']:.3f} "
                        f"GAN_dec {v['gan_dec']:.3f}  D(x) {v['D(x)']:.2f} D(x~) {v['D(x_tilde)']:.2f} "
                        f"D(x_p) {v['D(x_p)']:.2f}  updates dec {v['dec_step']:.0f} dis {v['dis_step']:.0f}  "
                        f"{rate:.0f} img/s  ETA {eta / 60:.1f} min")
                    if rank == 0:
                        metrics.log_row(csv_path, [step, epoch + 1, *v.values(), rate, "", "", ""])
                if at_max or signum:
                    break
            # Where the run stands: whole epochs done, and batches done in the next one.
            batch = batch + 1 if first < n else n
            epoch, batch = (epoch + 1, 0) if batch == n else (epoch, batch)
            label = epoch if batch == 0 else epoch + 1  # a partial epoch is named after itself
            signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"in epoch {label}")
            if rank == 0 and not signum:
                t1 = time.perf_counter()
                msg = f"====> epoch {label} ({t1 - t0:.1f} s)"
                if test_images is not None:
                    test = evaluate(model, test_images, args.dis_layer, args.seed)
                    metrics.log_row(csv_path, [step, label] + [""] * (len(LOGGED) + 1) + test)
                    msg += (f", test KL {test[0]:.2f} feat_mse {test[1]:.4f} pixel_mse {test[2]:.2f} "
                            f"({time.perf_counter() - t1:.1f} s)")
                log(msg)
            if rank == 0:
                model.eval()
                with torch.no_grad():
                    grid = model.decode(fixed_z).float()
                    pairs = torch.stack([recon_x, model.decode(model.encode(recon_x)[0]).float()], 1)
                model.train()
                vutils.save_image(grid, os.path.join(args.out, f"grid_epoch_{label:03d}.png"),
                                  nrow=8, normalize=True, value_range=(-1, 1))
                # Rows of 8 inputs, each above its 8 reconstructions decode(mu).
                pairs = pairs.view(-1, row_len, 2, *recon_x.shape[1:]).transpose(1, 2).flatten(0, 2)
                vutils.save_image(pairs, os.path.join(args.out, f"recon_epoch_{label:03d}.png"),
                                  nrow=row_len, normalize=True, value_range=(-1, 1))
                metrics.plot_losses(csv_path, os.path.join(args.out, "losses.png"))
                save_checkpoint(ckpt_path, model, opts, args, epoch, batch, step, fixed_z)
                last = epoch == args.epochs or bool(args.max_steps and step >= args.max_steps)
                if evaluator and not signum and ((batch == 0 and epoch % args.eval_every == 0) or last):
                    if score_samples(evaluator, model, test_images, args, device, step, label):  # lowest FID yet
                        save_checkpoint(os.path.join(args.out, "best.pt"), model, opts, args, epoch, batch, step,
                                        fixed_z)
            if args.max_steps and step >= args.max_steps:
                break
    if signum:
        log(f"stopped by signal {signum}: checkpoint saved to {ckpt_path}; continue with --resume {ckpt_path}")
        if ddp:
            dist.destroy_process_group()
        sys.exit(128 + signum)  # 130 for Ctrl-C, as shells expect

    # --- Sampling: N single PNGs for metrics.py, eval mode: decoded from fresh z ~ N(0, t^2 I) (the
    # temperature t), and the reconstructions decode(mu) of the first held-out images.
    if args.sample and rank == 0:
        model.eval()
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        with torch.no_grad():
            for i in range(0, args.sample, 500):
                z = args.temperature * torch.randn(min(500, args.sample - i), args.latent_dim, device=device,
                                                   generator=gen)  # t * N(0, I) = N(0, t^2 I)
                try:
                    data.write_pngs(model.decode(z), os.path.join(args.out, "samples"), first=i)
                except data.DataError as e:
                    sys.exit(f"error: {e}")
        log(f"wrote {args.sample} samples to {os.path.join(args.out, 'samples')}")
    if args.recon_samples and rank == 0:
        model.eval()
        with torch.no_grad():
            for i in range(0, args.recon_samples, 500):
                x = data.to_float(test_images[i:min(i + 500, args.recon_samples)]).to(device)  # B x C x S x S
                try:
                    data.write_pngs(model.decode(model.encode(x)[0]), os.path.join(args.out, "recon_samples"), first=i)
                except data.DataError as e:
                    sys.exit(f"error: {e}")
        log(f"wrote {args.recon_samples} reconstructions of held-out images to "
            f"{os.path.join(args.out, 'recon_samples')}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
