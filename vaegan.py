"""VAE-GAN: a VAE whose reconstruction error is measured in a GAN discriminator's features.

Larsen, Sønderby, Larochelle & Winther, "Autoencoding beyond pixels using a learned similarity
metric", ICML 2016, arXiv:1512.09300: the architecture of its 64x64 experiments, the three losses,
and the updates of its Algorithm 1, with RMSprop at 3e-4 and batch 64.

    python vaegan.py --data celeba                             # the CelebA report: 64x64, gamma 15
    python vaegan.py --data mnist --epochs 5 --gamma 1.5       # MNIST resized to 32x32
    python vaegan.py --resume runs/vaegan-celeba/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 vaegan.py --data celeba        # data-parallel on 2 devices
"""
import argparse
import csv
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.utils as vutils
from torchvision.transforms.functional import to_pil_image

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


def build(cfg):
    """The networks from a config dict (vars(args) or a checkpoint's copy of it)."""
    return VAEGAN(cfg["latent_dim"], cfg["width"], cfg["channels"], cfg["img_size"])


def load_model(path, device="cpu"):
    """The VAE-GAN of a vaegan.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("script") != "vaegan":
        raise ValueError(f"{path} was written by {ckpt.get('script')!r}, not vaegan.py")
    model = build(ckpt["args"])
    for name in ("encoder", "decoder", "discriminator"):
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
#   - Dis minimises the cross-entropy -L_GAN (bce on logits: the safe form, also under autocast).
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


def vaegan_loss(x, mu, logvar, x_tilde, logits, feats, gamma):
    """Every term of one step. logits: Dis on [x, x~, x_p] (3B); feats: Dis_l on the same batch."""
    b = x.shape[0]
    mu, logvar, logits, feats = mu.float(), logvar.float(), logits.float(), feats.float()
    kl, f_mse = kl_divergence(mu, logvar), feature_mse(feats[b:2 * b], feats[:b])
    real, tilde, prior = logits.split(b)
    loss_dis = bce(real, 1.0) + bce(tilde, 0.0) + bce(prior, 0.0)
    gan_dec = bce(tilde, 1.0) + bce(prior, 1.0)
    with torch.no_grad():
        diag = {"pixel_mse": pixel_mse(x_tilde.float(), x), "D(x)": torch.sigmoid(real).mean(),
                "D(x_tilde)": torch.sigmoid(tilde).mean(), "D(x_p)": torch.sigmoid(prior).mean()}
    return {"loss_enc": kl + feats.shape[1] / 2 * f_mse, "loss_dec": gamma * f_mse + gan_dec, "loss_dis": loss_dis,
            "kl": kl, "feat_mse": f_mse, "gan_dec": gan_dec, **diag}


def average_gradients(params, world):
    """What DDP does, by hand: average every gradient over the ranks, in one all-reduce."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, (flat / world).split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def train_step(nets, opts, x, gamma, dis_layer, autocast=nullcontext, world=1, eps=None, z_p=None):
    """One iteration of Algorithm 1: one forward pass of the three networks, then each network's
    gradient of its own loss only (backward with inputs=), all of them before any optimizer step.
    Stepping between the backward passes is what breaks ports on modern PyTorch ("modified by an
    inplace operation"): the later backward needs the weights the step has just changed."""
    enc, dec, dis = nets
    b = x.shape[0]
    # One decoder call on [z, z_p] and one discriminator call on [x, x~, x_p]: BatchNorm sees the
    # joint batch, as in the authors' GAN pass, and f(x), f(x~) come from the same call.
    with autocast():
        mu, logvar = enc(x)                                        # B x latent each
        z = reparameterise(mu, logvar, eps)
        z_p = torch.randn(mu.shape, device=x.device) if z_p is None else z_p
        fakes = dec(torch.cat([z, z_p.to(z.dtype)]))              # 2B x C x S x S: [x~, x_p]
        logits, feats = dis(torch.cat([x, fakes]), dis_layer)      # 3B logits, 3B x N_l: [x, x~, x_p]
        t = vaegan_loss(x, mu, logvar, fakes[:b], logits, feats, gamma)
    losses = (t["loss_enc"], t["loss_dec"], t["loss_dis"])
    params = [list(n.parameters()) for n in nets]
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    for i, (loss, ps) in enumerate(zip(losses, params)):  # no GAN gradient reaches Enc, none of Dec's reaches Dis
        loss.backward(inputs=ps, retain_graph=i < 2)
    if world > 1:
        average_gradients([p for ps in params for p in ps], world)
    for opt in opts:
        opt.step()
    return t


# -----------------------------------------------------------------------------

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
    p.add_argument("--out", default=None, help="output folder; default runs/vaegan-<data>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the three networks")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks")
    p.add_argument("--resume", default=None, help="ckpt.pt to continue from; flags not given again come from it")
    p.add_argument("--sample", type=int, default=0, help="after training, write this many single PNGs to OUT/samples/")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--log-every", type=int, default=50, help="optimizer steps between log lines")
    args = p.parse_args(argv)
    return p, args


# Flags that describe this invocation, never restored from a checkpoint.
RUNTIME_FLAGS = {"resume", "sample", "device", "amp", "compile", "sync_bn", "max_steps"}
NETS = ("encoder", "decoder", "discriminator")
LOGGED = ("kl", "feat_mse", "pixel_mse", "loss_dis", "gan_dec", "D(x)", "D(x_tilde)", "D(x_p)")


def restore_args(p, args, ckpt):
    """Every flag the user did not set again takes the checkpoint's value."""
    for k, v in ckpt["args"].items():
        if k not in RUNTIME_FLAGS and getattr(args, k, None) == p.get_default(k):
            setattr(args, k, v)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def save_atomic(obj, path):
    """Write to a temporary file and rename it into place: a crash never leaves a torn file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    p, args = get_args(argv)

    # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python vaegan.py` is rank 0 of 1.
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device)
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)

    ckpt = None
    if args.resume:
        try:
            ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated or not a checkpoint at all
            sys.exit(f"error: cannot read checkpoint {args.resume}: {e}")
        if not isinstance(ckpt, dict) or ckpt.get("script") != "vaegan":
            sys.exit(f"error: {args.resume} was not written by vaegan.py "
                     f"(script: {ckpt.get('script') if isinstance(ckpt, dict) else '?'}); use that script to resume it")
        restore_args(p, args, ckpt)
    if ddp and args.sync_bn and device.type != "cuda":  # else SyncBatchNorm raises from inside PyTorch
        sys.exit("error: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); "
                 "drop --sync-bn to keep BatchNorm per rank")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    args.img_size = args.img_size or (64 if args.data == "celeba" else 32)
    args.out = args.out or os.path.join("runs", f"vaegan-{os.path.basename(os.path.normpath(args.data))}")
    torch.manual_seed(args.seed + rank)

    # Data: decoded once into a uint8 cache, then served as [-1, 1] batches on the device.
    # The held-out split (where the dataset has one) gives the test losses at each epoch end.
    train = args.epochs > (ckpt["epoch"] if ckpt else 0)
    test_images = None
    if train:
        try:
            ds = data.load(args.data, root=args.data_root, split="train", img_size=args.img_size,
                           channels=args.channels, crop=args.crop)
            if data.has_test_split(args.data):
                test_images = data.load(args.data, root=args.data_root, split="test", img_size=args.img_size,
                                        channels=args.channels, crop=args.crop).images
            loader = data.Loader(ds.images, args.batch_size, device, seed=args.seed, flip=args.flip,
                                 rank=rank, world_size=world, channels_last=device.type == "cuda")
        except data.DataError as e:
            sys.exit(f"error: {e}")
        args.channels = ds.images.shape[1]
        # The fixed inputs of recon_epoch_NNN.png: the first 32 training images, in rows of 8.
        n_recon, row_len = min(32, len(ds.images)), min(8, len(ds.images))
        recon_x = data.to_float(ds.images[:n_recon - n_recon % row_len]).to(device)
    else:
        args.channels = args.channels or 3  # sampling only: the checkpoint normally says
    log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))

    # Networks and one optimiser each: RMSprop as the paper (PyTorch's default initialisation).
    try:
        model = build(vars(args))
    except ValueError as e:
        sys.exit(f"error: {e}")
    nets = [getattr(model, n) for n in NETS]
    if args.optim == "adam":
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opts = [torch.optim.Adam(n.parameters(), lr=args.lr, betas=(0.5, 0.999), **fused) for n in nets]
    else:
        opts = [torch.optim.RMSprop(n.parameters(), lr=args.lr, foreach=True) for n in nets]
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    epoch, step = 0, 0
    if ckpt:
        try:
            for name, net, opt in zip(NETS, nets, opts):
                net.load_state_dict(ckpt[name]), opt.load_state_dict(ckpt["opt_" + name])
        except (RuntimeError, ValueError, KeyError) as e:
            sys.exit(f"error: {args.resume} does not fit these settings ({str(e).splitlines()[0]}); "
                     "drop the conflicting flags to use the checkpoint's own")
        epoch, step, fixed_z = ckpt["epoch"], ckpt["step"], ckpt["fixed_z"]
        log(f"resumed from {args.resume}: epoch {epoch}, step {step}")
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=memory)
    fixed_z = fixed_z.to(device)
    log("   ".join(f"{n}: {sum(t.numel() for t in net.parameters()):,} parameters" for n, net in zip(NETS, nets)))

    # Data-parallel without DDP: DDP reduces gradients from hooks that expect one forward and one
    # full backward per step, but here one forward feeds three backward passes restricted with
    # inputs=. So under torchrun every rank starts from rank 0's weights, and train_step averages
    # the three gradient sets by hand (one all-reduce) before any step: the arithmetic of DDP.
    # BatchNorm statistics stay per-rank unless --sync-bn (rank 0's running averages are saved).
    if ddp:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            nets = [getattr(model, n) for n in NETS]
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    train_nets = [torch.compile(n) for n in nets] if args.compile else nets
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def save_checkpoint(done_epochs):
        save_atomic({"script": "vaegan", "args": vars(args), "epoch": done_epochs, "step": step,
                     **{n: net.state_dict() for n, net in zip(NETS, nets)},
                     **{"opt_" + n: opt.state_dict() for n, opt in zip(NETS, opts)},
                     "fixed_z": fixed_z.cpu()}, os.path.join(args.out, "ckpt.pt"))

    def evaluate(images):
        """Held-out KL, feature MSE and pixel MSE per image, eval mode, z sampled from a fixed seed."""
        gen, sums = torch.Generator(device).manual_seed(args.seed), torch.zeros(3, device=device)
        model.eval()
        with torch.no_grad(), autocast():
            for i in range(0, len(images), 256):
                x = data.to_float(images[i:i + 256].to(device))
                mu, logvar = model.encode(x)
                eps = torch.randn(mu.shape, device=device, generator=gen).to(mu.dtype)
                x_tilde = model.decode(reparameterise(mu, logvar, eps)).float()
                feats = model.discriminator(torch.cat([x, x_tilde]), args.dis_layer)[1].float()
                terms = (kl_divergence(mu.float(), logvar.float()), feature_mse(feats[len(x):], feats[:len(x)]),
                         pixel_mse(x_tilde, x))
                sums += torch.stack(terms) * len(x)
        model.train()
        return (sums / len(images)).tolist()

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "losses.csv")
    columns = ["step", "epoch", *LOGGED, "img_per_s", "test_kl", "test_feat_mse", "test_pixel_mse"]
    if rank == 0 and (not ckpt or not os.path.exists(csv_path)):
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(columns)

    def write_row(row):
        if rank == 0:
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])

    total_steps = args.epochs * len(loader) if train else 0
    stop = interrupted = False

    def on_ctrl_c(*_):  # finish the current step, save, exit; a second Ctrl-C kills at once
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGINT, on_ctrl_c)

    def check_finite(where):  # one host sync, only at log steps and epoch ends
        flag = bad.float()
        if ddp:  # every rank stops together, so none is left waiting in an all-reduce
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            sys.exit(f"error: the losses became NaN/inf {where}; stopping. The last good checkpoint is "
                     f"{os.path.join(args.out, 'ckpt.pt')} (try a lower --lr or --gamma)")
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    while train and epoch < args.epochs and not stop:
        model.train()
        t0, seen = time.perf_counter(), 0
        for x in loader.epoch(epoch):  # x: B x C x S x S in [-1, 1], already on the device
            b = x.shape[0]
            t = train_step(train_nets, opts, x, args.gamma, args.dis_layer, autocast, world)
            step += 1
            seen += b * world
            # Only a flag on the device: no host synchronisation inside the step.
            bad |= ~torch.isfinite(t["loss_enc"].detach() + t["loss_dec"].detach() + t["loss_dis"].detach())
            stop = bool(args.max_steps and step >= args.max_steps) or interrupted
            if step % args.log_every == 0 or stop:
                check_finite(f"by step {step}")
                rate = seen / (time.perf_counter() - t0)
                eta = (total_steps - step) * b * world / rate
                v = {k: t[k].item() for k in LOGGED}
                log(f"[{epoch + 1}/{args.epochs}][{step}/{total_steps}] KL {v['kl']:.2f} feat_mse {v['feat_mse']:.4f} "
                    f"pixel_mse {v['pixel_mse']:.2f}  Loss_D {v['loss_dis']:.3f} GAN_dec {v['gan_dec']:.3f}  "
                    f"D(x) {v['D(x)']:.2f} D(x~) {v['D(x_tilde)']:.2f} D(x_p) {v['D(x_p)']:.2f}  "
                    f"{rate:.0f} img/s  ETA {eta / 60:.1f} min")
                write_row([step, epoch + 1, *v.values(), rate, "", "", ""])
            if stop:
                break

        # End of epoch (or of the run): held-out losses, fixed-z samples and reconstructions
        # in eval mode, plot, checkpoint.
        check_finite(f"in epoch {epoch + 1}")
        epoch += 0 if interrupted else 1  # an interrupted epoch is run again from its start
        if rank == 0 and not interrupted:
            t1 = time.perf_counter()
            msg = f"====> epoch {epoch} ({t1 - t0:.1f} s)"
            if test_images is not None:
                test = evaluate(test_images)
                write_row([step, epoch] + [""] * (len(LOGGED) + 1) + test)
                msg += (f", test KL {test[0]:.2f} feat_mse {test[1]:.4f} pixel_mse {test[2]:.2f} "
                        f"({time.perf_counter() - t1:.1f} s)")
            log(msg)
        if rank == 0:
            model.eval()
            with torch.no_grad():
                grid = model.decode(fixed_z).float()
                pairs = torch.stack([recon_x, model.decode(model.encode(recon_x)[0]).float()], 1)
            model.train()
            vutils.save_image(grid, os.path.join(args.out, f"grid_epoch_{epoch:03d}.png"),
                              nrow=8, normalize=True, value_range=(-1, 1))
            # Rows of 8 inputs, each above its 8 reconstructions decode(mu).
            pairs = pairs.view(-1, row_len, 2, *recon_x.shape[1:]).transpose(1, 2).flatten(0, 2)
            vutils.save_image(pairs, os.path.join(args.out, f"recon_epoch_{epoch:03d}.png"),
                              nrow=row_len, normalize=True, value_range=(-1, 1))
            metrics.plot_losses(csv_path, os.path.join(args.out, "losses.png"))
            save_checkpoint(epoch)
        if interrupted:
            log(f"interrupted: checkpoint saved to {os.path.join(args.out, 'ckpt.pt')}")
            stop = True

    # Samples for metrics.py: N single PNGs decoded from fresh z ~ N(0, I), eval mode.
    if args.sample and rank == 0:
        out = os.path.join(args.out, "samples")
        os.makedirs(out, exist_ok=True)
        model.eval()
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        with torch.no_grad():
            for i in range(0, args.sample, 500):
                z = torch.randn(min(500, args.sample - i), args.latent_dim, device=device, generator=gen)
                imgs = ((model.decode(z).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
                for j, img in enumerate(imgs):  # [-1, 1] -> uint8 C x H x W -> 1- or 3-channel PNG
                    to_pil_image(img).save(os.path.join(out, f"{i + j:06d}.png"))
        log(f"wrote {args.sample} samples to {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
