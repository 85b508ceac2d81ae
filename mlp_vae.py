"""Fully connected VAE: the variational autoencoder of Kingma & Welling on flattened images.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114. Hidden
sizes 512-256 and a 2-d latent, as the MNIST report used them (a 2-d latent space can
be drawn as a plane: see latent_edit.py).

    python mlp_vae.py --data mnist                                # the MNIST report, 28x28, 10 epochs
    python mlp_vae.py --data mnist --latent-dim 20                # as pytorch/examples' vae
    python mlp_vae.py --resume runs/mlp_vae-mnist/ckpt.pt --epochs 0 --sample 10000
    python mlp_vae.py --resume runs/mlp_vae-mnist/ckpt.pt --epochs 0 --recon-samples 10000
    torchrun --nproc_per_node=2 mlp_vae.py --data mnist           # data-parallel on 2 devices
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
# Model. Images are flattened: C*H*W numbers in, C*H*W logits out.

class VAE(nn.Module):
    def __init__(self, latent_dim=2, channels=1, img_size=28):
        super().__init__()
        self.latent_dim, self.shape = latent_dim, (channels, img_size, img_size)
        d = channels * img_size * img_size
        self.encoder = nn.Sequential(nn.Flatten(),                       # B x C x H x W -> B x C*H*W
                                     nn.Linear(d, 512), nn.ReLU(True),   # -> B x 512
                                     nn.Linear(512, 256), nn.ReLU(True))  # -> B x 256
        self.fc_mu = nn.Linear(256, latent_dim)                           # -> B x latent
        self.fc_logvar = nn.Linear(256, latent_dim)                       # -> B x latent
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(True),  # B x latent -> B x 256
                                     nn.Linear(256, 512), nn.ReLU(True),         # -> B x 512
                                     nn.Linear(512, d))                          # -> B x C*H*W logits

    def encode(self, x):  # x: B x C x H x W in [-1, 1] -> mu, logvar: B x latent
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decoder_output(self, z):  # what the loss compares: B x C x H x W logits
        return self.decoder(z).view(-1, *self.shape)

    def decode(self, z):  # z: B x latent -> B x C x H x W images in [-1, 1] (the sigmoid, rescaled)
        return torch.sigmoid(self.decoder_output(z)) * 2 - 1

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        return self.decoder_output(reparameterise(mu, logvar, generator)), mu, logvar


def build(cfg):
    """The VAE from a config dict (vars(args) or a checkpoint's copy of it)."""
    return VAE(cfg["latent_dim"], cfg["channels"], cfg["img_size"])


def load_model(path, device="cpu"):
    """The VAE of an mlp_vae.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = read_checkpoint(path)  # ValueError with one sentence if it is not an mlp_vae.py checkpoint
    model = build(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# The loss: the negative ELBO of Kingma & Welling (2014, eq. 10) per image, averaged over
# the batch:  -ELBO = -log p(x | z) + KL(q(z | x) || N(0, I)),  z ~ q(z | x).
#   reparameterisation (section 2.4):  z = mu + sigma * eps,  sigma = exp(logvar / 2),  eps ~ N(0, I)
#   -log p(x | z), a Bernoulli decoder (appendix C.1): sum over pixels of
#        -[x log p + (1 - x) log(1 - p)],  p = sigmoid(logits),  x the grey level in [0, 1]
#        (not binarised, as pytorch/examples' vae). The logits form is the numerically safe one
#        and is allowed under autocast.
#   KL in closed form (appendix B):    -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))

def reparameterise(mu, logvar, generator=None):
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(logvar / 2) * eps  # the standard deviation, not the log-variance


def vae_loss(logits, x, mu, logvar):
    """(total, recon, KL), each summed over an image and averaged over the batch."""
    logits, mu, logvar, b = logits.float(), mu.float(), logvar.float(), x.shape[0]
    rec = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="sum") / b  # [-1, 1] -> [0, 1]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / b
    return rec + kl, rec, kl


# -----------------------------------------------------------------------------
# Settings: parsed, completed from a checkpoint, then checked in one place before any work.

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="mnist", help=f"one of {', '.join(data.DATASETS)}, or a folder of images")
    p.add_argument("--data-root", default="data", help="where datasets and the decoded cache live")
    p.add_argument("--img-size", type=int, default=None, help="pixels; default: the dataset's own (28 for MNIST, 32 for CIFAR-10, 64 for CelebA)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="image channels; default: the dataset's own")
    p.add_argument("--crop", type=int, default=None, help="center-crop this many pixels before resizing (108: CelebA face crop)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--epochs", type=int, default=10, help="total epochs (a resumed run continues to this count)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (as pytorch/examples' vae)")
    p.add_argument("--latent-dim", type=int, default=2, help="size of z (2: the latent plane can be drawn)")
    p.add_argument("--out", default=None, help="output folder; default runs/mlp_vae-<data>, or the --resume checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast of the training step; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks (this model has none)")
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
# Flags that fix the network's shapes: a checkpoint only fits a network built with its own.
SHAPE_FLAGS = ["latent_dim", "channels", "img_size"]


def read_checkpoint(path):
    """The dict an mlp_vae.py run saved, or ValueError with one sentence saying why `path` is not one."""
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
    if not isinstance(ckpt, dict) or ckpt.get("script") != "mlp_vae":
        script = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} was not written by mlp_vae.py (script: {script!r}); use that script with it")
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
    positive = {"--batch-size": args.batch_size, "--latent-dim": args.latent_dim, "--log-every": args.log_every}
    for flag, v in positive.items():
        if v < 1:
            sys.exit(f"error: {flag} must be at least 1, got {v}")
    for flag, v in {"--epochs": args.epochs, "--sample": args.sample, "--max-steps": args.max_steps,
                    "--crop": args.crop or 0, "--eval-every": args.eval_every, "--recon-samples": args.recon_samples}.items():
        if v < 0:
            sys.exit(f"error: {flag} cannot be negative, got {v}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        sys.exit(f"error: --lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        sys.exit(f"error: --temperature must be a positive number (1: samples from the prior N(0, I)), "
                 f"got {args.temperature}")
    if args.img_size is not None and args.img_size < 1:
        sys.exit(f"error: --img-size must be at least 1 pixel, got {args.img_size}")
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
    if ddp and args.sync_bn and device.type != "cuda":  # as in the other scripts, whose DDP would raise
        sys.exit("error: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); "
                 "drop --sync-bn (this model has no BatchNorm to synchronise)")
    check_size(args, device)
    done = ckpt["epoch"] if ckpt else 0
    if args.epochs <= done and not (args.sample or args.recon_samples):
        sys.exit(f"error: nothing to train: {f'{args.resume} has finished {done} epochs' if ckpt else '--epochs is 0'} "
                 f"and no --sample or --recon-samples was asked for; raise --epochs to train on")
    if ckpt and args.epochs > done and 0 < args.max_steps <= ckpt["step"]:
        sys.exit(f"error: nothing to train: {args.resume} is already at step {ckpt['step']} and --max-steps "
                 f"is {args.max_steps}; raise --max-steps or drop it")
    for k in SHAPE_FLAGS if ckpt else []:  # a flag given again that changes a network's shape
        if ckpt["args"].get(k) is not None and getattr(args, k) not in (None, ckpt["args"][k]):
            flag = "--" + k.replace("_", "-")
            sys.exit(f"error: {args.resume} was trained with {flag} {ckpt['args'][k]}, which {flag} "
                     f"{getattr(args, k)} does not fit; drop {flag} to use the checkpoint's")
    if rank == 0:  # an output folder that cannot be written is found now, not after the first epoch
        try:
            os.makedirs(args.out, exist_ok=True)
            tempfile.TemporaryFile(dir=args.out).close()
        except OSError as e:
            sys.exit(f"error: cannot write to the output folder {args.out} ({e.strerror or e}); choose another --out")


def check_size(args, device):
    """Refuse what cannot fit before allocating any of it: a dry run on the meta device (shapes
    only, no memory) counts the parameters, 4 float32 copies each (weights, gradients, Adam's two
    moments), and every layer's output for one batch (kept for the backward pass). The dataset's
    own size is not known yet: 64 pixels and 3 channels, no default is larger."""
    outputs, size = [], args.img_size or 64
    with torch.device("meta"):
        model = build({**vars(args), "img_size": size, "channels": args.channels or 3})
        for m in (m for m in model.modules() if not list(m.children())):
            m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
        model(torch.zeros(args.batch_size, *model.shape))
    need = 4 * (4 * sum(p.numel() for p in model.parameters()) + sum(outputs))
    have = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        sys.exit(f"error: training at --img-size {size} with --batch-size {args.batch_size} needs about "
                 f"{need / 2**30:.0f} GiB but the {device.type} device has {have / 2**30:.0f} GiB; "
                 "lower --img-size or --batch-size")


# -----------------------------------------------------------------------------
# The network, its optimizer and the checkpoint: the one place that saves and loads them.

def make_networks(args, ckpt, device, memory_format=torch.contiguous_format):
    """The VAE with the checkpoint's weights on the device, then its Adam optimizer. The optimizer
    state is loaded only once the parameters have their final device, dtype and memory layout:
    Adam's moments must match all three (the fused CUDA kernels check). Linear layers have no
    channels-last layout; memory_format is taken so that every script's make_networks reads alike."""
    model = build(vars(args))  # PyTorch's default initialisation
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(device, memory_format=memory_format)
    # Adam with its default betas, as pytorch/examples' vae. One fused kernel per step on CUDA, foreach elsewhere.
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
    state = {"script": "mlp_vae", "args": vars(args), "epoch": epoch, "batch": batch, "step": step,
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
# The paper's training step (Algorithm 1 of Kingma & Welling with one z per image, L = 1):
# one gradient step on the minibatch's negative ELBO; and the same loss on held-out images.

def train_step(model, opt, x, amp):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out, mu, logvar = model(x)                 # B x C x H x W logits; B x latent, twice
        loss, rec, kl = vae_loss(out, x, mu, logvar)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, rec, kl


def evaluate(model, images, batch_size, seed):
    """Held-out (total, recon, KL) per image: the negative ELBO in nats. As pytorch/examples' vae,
    one sampled z per image (from a fixed seed, so epochs compare), not mu. A reported likelihood
    must not depend on the device, so this is float32 whatever --amp says (bf16 moves it 0.1-0.4%)."""
    device = next(model.parameters()).device
    gen, sums = torch.Generator(device).manual_seed(seed), torch.zeros(3, device=device)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for i in range(0, len(images), batch_size):
            x = data.to_float(images[i:i + batch_size].to(device))  # float32 B x C x H x W in [-1, 1]
            out, mu, logvar = model(x, generator=gen)
            sums += torch.stack(vae_loss(out, x, mu, logvar)) * len(x)
    model.train()
    return (sums / len(images)).tolist()


# -----------------------------------------------------------------------------
# The loss log: one row per logged step, and a held-out row (training cells blank) at each epoch end.

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
        restore_args(p, args, ckpt)
    ddp = "RANK" in os.environ  # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device, ddp)
    # A resumed run continues in its checkpoint's folder, wherever that folder has moved.
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                            os.path.join("runs", f"mlp_vae-{os.path.basename(os.path.normpath(args.data))}"))
    args.eval_every = args.eval_every or 0  # after restore_args: an explicit 0 turns a resumed run's off
    if args.eval_every and args.eval_ref is None and data.has_test_split(args.data):
        args.eval_ref = f"{args.data}:test"
    check_args(args, ckpt, device, ddp, rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
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
            loader = data.Loader(ds.images, args.batch_size, device, seed=args.seed, flip=args.flip,
                                 rank=rank, world_size=world)
        if data.has_test_split(args.data) and (train or args.recon_samples):
            test_images = data.load(args.data, root=args.data_root, split="test", img_size=args.img_size,
                                    channels=args.channels, crop=args.crop).images
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if test_images is not None and args.recon_samples > len(test_images):  # known once the split is read
        sys.exit(f"error: --recon-samples {args.recon_samples} asks for more images than the {len(test_images)} "
                 f"of the {args.data} held-out split; lower --recon-samples")
    if train:
        args.img_size, args.channels = ds.images.shape[-1], ds.images.shape[1]
        # The fixed inputs of recon_epoch_NNN.png: the first 32 training images, in rows of 8.
        n_recon, row_len = min(32, len(ds.images)), min(8, len(ds.images))
        recon_x = data.to_float(ds.images[:n_recon - n_recon % row_len]).to(device)
    elif test_images is not None:  # --recon-samples without training: the held-out images say
        args.img_size, args.channels = test_images.shape[-1], test_images.shape[1]
    else:  # sampling only: the checkpoint normally says
        args.img_size = args.img_size or data.DEFAULT_IMG_SIZE.get(args.data, 64)
        args.channels = args.channels or 1
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
    # trains: DDP averages gradients over ranks, torch.compile fuses kernels.
    model, opt = make_networks(args, ckpt, device)  # Linear layers only: the default memory format
    fixed_z = (ckpt["fixed_z"] if ckpt else
               torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))).to(device)
    count = lambda *ms: sum(t.numel() for m in ms for t in m.parameters())
    log(f"encoder: {count(model.encoder, model.fc_mu, model.fc_logvar):,} parameters   "
        f"decoder: {count(model.decoder):,} parameters")
    if ckpt:
        log(f"resumed from {args.resume}: epoch {epoch + 1}, batch {batch}, step {step}")
    model_train = DDP(model, device_ids=[device] if device.type == "cuda" else None) if ddp else model
    if args.compile:
        model_train = torch.compile(model_train)

    # --- Training: epochs of the paper's step, logged to losses.csv; each epoch (or the run, when
    # it stops early) ends with the held-out loss, the grids of the fixed z and of reconstructions,
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
            t0, seen, first, loss_sum = time.perf_counter(), 0, min(batch, n), torch.zeros((), device=device)
            for batch, x in enumerate(loader.epoch(epoch, start=first), start=first):  # B x C x S x S
                loss, rec, kl = train_step(model_train, opt, x, args.amp)
                step, seen, loss_sum = step + 1, seen + x.shape[0] * world, loss_sum + loss.detach()
                bad |= ~torch.isfinite(loss.detach())  # a flag on the device, no sync
                at_max = bool(args.max_steps and step >= args.max_steps)
                if step % args.log_every == 0 or at_max or (caught and not ddp):
                    signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"by step {step}")
                    rate = seen / (time.perf_counter() - t0)
                    row = [step, epoch + 1, loss.item(), rec.item(), kl.item(), rate]
                    eta = (args.epochs * n - epoch * n - batch - 1) * x.shape[0] * world / rate
                    log(f"[{epoch + 1}/{args.epochs}][{batch + 1}/{n}] step {step} loss {row[2]:.2f} = recon "
                        f"{row[3]:.2f} + KL {row[4]:.2f}  {rate:.0f} img/s  ETA {eta / 60:.1f} min")
                    if rank == 0:
                        metrics.log_row(csv_path, row + [""] * 3)
                if at_max or signum:
                    break
            # Where the run stands: whole epochs done, and batches done in the next one.
            batch = batch + 1 if first < n else n
            n_run = batch - first  # batches trained in this pass, for the mean training loss
            epoch, batch = (epoch + 1, 0) if batch == n else (epoch, batch)
            label = epoch if batch == 0 else epoch + 1  # a partial epoch is named after itself
            signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"in epoch {label}")
            if rank == 0:  # end of epoch (or of the run): held-out loss, grids in eval mode, plot, checkpoint
                msg = f"====> epoch {label}: train loss {loss_sum.item() / max(n_run, 1):.4f} per image"
                if test_images is not None and (batch == 0 or not signum):  # not when a signal cut an epoch
                    test = evaluate(model, test_images, args.batch_size, args.seed)
                    metrics.log_row(csv_path, [step, label] + [""] * 4 + test)
                    msg += f", test loss {test[0]:.4f} = recon {test[1]:.4f} + KL {test[2]:.4f}"
                log(f"{msg} ({time.perf_counter() - t0:.1f} s)")
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
