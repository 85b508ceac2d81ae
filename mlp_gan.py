"""Vanilla GAN: a fully connected generator and discriminator.

Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville & Bengio,
"Generative Adversarial Nets", NeurIPS 2014, arXiv:1406.2661. The hidden sizes
are the common PyTorch ones (generator 128-256-512-1024, discriminator 512-256),
as the vanilla-GAN-vs-DCGAN report used them.

    python mlp_gan.py --data mnist --epochs 50                 # the MNIST report, 28x28
    python mlp_gan.py --data celeba --img-size 64 --epochs 20   # against dcgan.py on CelebA
    python mlp_gan.py --resume runs/mlp_gan-mnist/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 mlp_gan.py --data mnist         # data-parallel on 2 devices
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
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import torchvision.utils as vutils

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
    return (Generator(cfg["latent_dim"], cfg["channels"], cfg["img_size"]),
            Discriminator(cfg["channels"], cfg["img_size"]))


def load_model(path, device="cpu"):
    """The generator of an mlp_gan.py checkpoint, in eval mode (call it on B x latent_dim)."""
    ckpt = read_checkpoint(path)  # ValueError with one sentence if it is not an mlp_gan.py checkpoint
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
    p.add_argument("--epochs", type=int, default=50, help="total epochs (a resumed run continues to this count)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for G and D")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (the paper lowers it from 0.9)")
    p.add_argument("--lr-decay", default="none", choices=["none", "linear"], help="linear: decay to 0 over the run")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z")
    p.add_argument("--out", default=None, help="output folder; default runs/mlp_gan-<data>, or the --resume checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks")
    p.add_argument("--resume", default=None, help="ckpt.pt to continue from; flags not given again come from it")
    p.add_argument("--sample", type=int, default=0, help="after training, write this many single PNGs to OUT/samples/")
    p.add_argument("--truncation", type=float, default=None, help="--sample: redraw each |z_i| > T (std units; None: off)")
    p.add_argument("--d-filter", type=float, default=None, help="--sample: write only sigmoid(D) >= P (None: off)")
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
RUNTIME_FLAGS = {"resume", "sample", "truncation", "d_filter", "device", "amp", "compile", "sync_bn", "max_steps",
                 "out", "weights"}
# Flags that fix the networks' shapes: a checkpoint only fits networks built with its own.
SHAPE_FLAGS = ["latent_dim", "channels", "img_size"]


def read_checkpoint(path):
    """The dict an mlp_gan.py run saved, or ValueError with one sentence saying why `path` is not one."""
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
    if not isinstance(ckpt, dict) or ckpt.get("script") != "mlp_gan":
        script = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} was not written by mlp_gan.py (script: {script!r}); use that script with it")
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
    for flag, v in {"--batch-size": args.batch_size, "--latent-dim": args.latent_dim,
                    "--log-every": args.log_every}.items():
        if v < 1:
            sys.exit(f"error: {flag} must be at least 1, got {v}")
    for flag, v in {"--epochs": args.epochs, "--sample": args.sample, "--max-steps": args.max_steps,
                    "--crop": args.crop or 0, "--eval-every": args.eval_every}.items():
        if v < 0:
            sys.exit(f"error: {flag} cannot be negative, got {v}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        sys.exit(f"error: --lr must be a positive number, got {args.lr}")
    if not 0 <= args.beta1 < 1:  # also false for NaN
        sys.exit(f"error: --beta1 must be in [0, 1), got {args.beta1}")
    if args.img_size < 1:
        sys.exit(f"error: --img-size must be a positive number of pixels, got {args.img_size}")
    if args.truncation is not None and not (math.isfinite(args.truncation) and args.truncation > 0):
        sys.exit(f"error: --truncation must be a positive number of standard deviations, got {args.truncation}")
    if args.d_filter is not None and not 0 <= args.d_filter < 1:  # also refuses nan
        sys.exit(f"error: --d-filter is a probability in [0, 1), got {args.d_filter}")
    for flag, v in {"--truncation": args.truncation, "--d-filter": args.d_filter}.items():
        if v is not None and not args.sample:
            sys.exit(f"error: {flag} changes only the images --sample writes; add --sample N")
    world = int(os.environ["WORLD_SIZE"]) if ddp else 1
    if args.batch_size // world < 2:  # BatchNorm1d normalises each feature over the batch
        sys.exit(f"error: --batch-size {args.batch_size} leaves fewer than 2 images per rank, too few for the "
                 f"generator's BatchNorm; use at least {2 * world}")
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
    check_size(args, device)
    done = ckpt["epoch"] if ckpt else 0
    if args.epochs <= done and not args.sample:
        sys.exit(f"error: nothing to train: {f'{args.resume} has finished {done} epochs' if ckpt else '--epochs is 0'} "
                 f"and no --sample was asked for; raise --epochs to train on")
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
    moments), and every layer's output for one batch (kept for the backward pass)."""
    outputs = []
    with torch.device("meta"):
        G, D = build({**vars(args), "channels": args.channels or 3})
        for m in (m for net in (G, D) for m in net.modules() if not list(m.children())):
            m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
        D(G(torch.zeros(args.batch_size, args.latent_dim)))
    need = 4 * (4 * sum(p.numel() for net in (G, D) for p in net.parameters()) + sum(outputs))
    have = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        sys.exit(f"error: training at --img-size {args.img_size} with --batch-size {args.batch_size} needs about "
                 f"{need / 2**30:.0f} GiB but the {device.type} device has {have / 2**30:.0f} GiB; "
                 "lower --img-size or --batch-size")


# -----------------------------------------------------------------------------
# Networks, optimizers and the checkpoint: the one place that saves and loads them.

def make_networks(args, ckpt, device, memory_format=torch.contiguous_format):
    """G and D with the checkpoint's weights on the device, then their Adam optimizers. The
    optimizer state is loaded only once the parameters have their final device, dtype and memory
    layout: Adam's moments must match all three (the fused CUDA kernels check). memory_format is
    dcgan.py's argument; .to() applies it to 4-D weights only, and a Linear layer's are 2-D."""
    G, D = build(vars(args))  # PyTorch's default initialisation, as the reference implementations
    if ckpt:
        G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
    G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    # Adam with beta1 = 0.5, the DCGAN setting the reports used for both GANs. One fused kernel
    # per step on CUDA, foreach elsewhere.
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optG = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999), **fused)
    optD = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999), **fused)
    if ckpt:
        load_optimizer(optG, ckpt["optG"]), load_optimizer(optD, ckpt["optD"])
    return G, D, optG, optD


def load_optimizer(opt, state):
    opt.load_state_dict(state)  # moves each state tensor to its parameter's device and dtype ...
    for group in opt.param_groups:  # ... but keeps the saved strides: re-lay them as the parameter's
        for p in group["params"]:
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)


def save_checkpoint(path, G, D, optG, optD, args, epoch, batch, step, fixed_z):
    """ckpt.pt: where the run stands (epoch = whole epochs done, batch = batches done in the next),
    written to a temporary file and renamed: a crash or a full disk never tears the old one."""
    state = {"script": "mlp_gan", "args": vars(args), "epoch": epoch, "batch": batch, "step": step,
             "G": G.state_dict(), "D": D.state_dict(), "optG": optG.state_dict(), "optD": optD.state_dict(),
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
# The paper's training step, Algorithm 1 of Goodfellow et al. with one D step per G step.

def train_step(nets, optG, optD, real, args, amp):
    z = torch.randn(real.shape[0], args.latent_dim, device=real.device)

    # (1) D step: maximise log D(x) + log(1 - D(G(z))). Both terms are summed before one
    # backward, so DDP reduces D's gradients once.
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        fake = nets.G_train(z)                                       # B x C x H x W
        out_real, out_fake = nets.D_train(real), nets.D_train(fake.detach())  # B logits each
        loss_d_real, loss_d_fake = bce(out_real, 1.0), bce(out_fake, 0.0)
        loss_d = loss_d_real + loss_d_fake
    optD.zero_grad(set_to_none=True)
    loss_d.backward()
    optD.step()

    # (2) G step: maximise log D(G(z)), reusing the same fake batch. D's parameters are frozen
    # so no gradient is computed for them (and D runs without DDP: no reduction wanted).
    nets.D.requires_grad_(False)
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        out_g = nets.D_for_G(fake)
        loss_g = bce(out_g, 1.0)
    optG.zero_grad(set_to_none=True)
    loss_g.backward()
    optG.step()
    nets.D.requires_grad_(True)
    # D(x) and D(G(z)) before/after D's step are mean probabilities: sigmoid of the logits.
    return [loss_d, loss_d_real, loss_d_fake, loss_g] + \
        [torch.sigmoid(o.detach().float()).mean() for o in (out_real, out_fake, out_g)]


# -----------------------------------------------------------------------------
# The loss log: the columns of losses.csv (metrics.start_log and metrics.log_row write it).

COLUMNS = ["step", "epoch", "loss_d", "loss_d_real", "loss_d_fake", "loss_g",
           "D(x)", "D(G(z))_before", "D(G(z))_after", "img_per_s"]


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
# Sampling: --sample N single PNGs for metrics.py, from fresh z, networks in eval mode, no grad.

SAMPLE_BATCH = 500  # images generated at a time
D_FILTER_PATIENCE = 10  # --d-filter: batches drawn before an acceptance below 1% stops the run


def truncated_normal(n, dim, T=None, device="cpu", generator=None):
    """n x dim draws of z ~ N(0, I) where every component with |z_i| > T is redrawn until all lie
    within T: the truncation trick (Brock, Donahue & Simonyan 2019, arXiv 1809.11096, section 3.1),
    less varied but more typical samples as T shrinks. T = None: plain N(0, I)."""
    z = torch.randn(n, dim, device=device, generator=generator)
    if T is not None:
        out = z.abs() > T  # n x dim: the components to redraw
        while out.any():
            z[out] = torch.randn(int(out.sum()), device=device, generator=generator)
            out = z.abs() > T
    return z


def write_samples(G, D, args, device, log):
    """OUT/samples/000000.png ... With --d-filter P only images the discriminator passes as real,
    sigmoid(D(G(z))) >= P, are written (the CelebA GAN report showed samples "passed as real
    images by the discriminator"), drawing batches until N are. If after D_FILTER_PATIENCE batches
    fewer than 1% passed, D rejects almost everything and the run stops instead of drawing on."""
    G.eval(), D.eval()
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    folder, written, drawn, passed = os.path.join(args.out, "samples"), 0, 0, 0
    with torch.no_grad():
        while written < args.sample:
            n = SAMPLE_BATCH if args.d_filter is not None else min(SAMPLE_BATCH, args.sample - written)
            x = G(truncated_normal(n, args.latent_dim, args.truncation, device, gen))  # n x C x H x W
            drawn += n
            if args.d_filter is not None:
                x = x[torch.sigmoid(D(x).float()) >= args.d_filter]  # D's logit -> probability of "real"
                passed += len(x)
            x = x[:args.sample - written]
            try:
                data.write_pngs(x, folder, first=written)
            except data.DataError as e:
                sys.exit(f"error: {e}")
            written += len(x)
            if (args.d_filter is not None and written < args.sample and drawn >= D_FILTER_PATIENCE * SAMPLE_BATCH
                    and passed < 0.01 * drawn):
                sys.exit(f"error: --d-filter {args.d_filter}: the discriminator passed only {passed} of {drawn} "
                         f"samples, so it rejects almost everything (a collapsed or over-confident D); {written} of "
                         f"{args.sample} were written to {folder}; lower --d-filter or use another checkpoint")
    if args.d_filter is not None:
        log(f"--d-filter {args.d_filter}: the discriminator passed {passed} of {drawn} samples "
            f"({100 * passed / drawn:.1f}%)")
    log(f"wrote {args.sample} samples to {folder}")


def score_samples(evaluator, G, args, device, step, epoch):
    """--eval-every: FID, KID, IS, precision/recall and Laplacian variance of --eval-n samples of G
    in eval mode (metrics.TrainingEval), the same z at every evaluation, drawn from their own
    generator so that training's random stream is untouched. True when the FID is the lowest yet."""
    gen = torch.Generator(device).manual_seed(args.seed + 2)
    samples = lambda b: G(torch.randn(b, args.latent_dim, device=device, generator=gen))  # b x C x S x S
    G.eval()
    try:
        best = evaluator.evaluate(step, epoch, {"samples": samples})
    except metrics.MetricsError as e:  # e.g. FID's square root of a degenerate covariance: a lost row, not a lost run
        print(f"warning: the evaluation at step {step} failed ({e}); training goes on", file=sys.stderr)
        best = False
    G.train()
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
                            os.path.join("runs", f"mlp_gan-{os.path.basename(os.path.normpath(args.data))}"))
    if args.img_size is None:  # the dataset's own size (a folder of images: data.py's default)
        args.img_size = data.DEFAULT_IMG_SIZE.get(args.data, data.FOLDER_IMG_SIZE)
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
    loader = None
    if train:
        try:
            ds = data.load(args.data, root=args.data_root, split="train", img_size=args.img_size,
                           channels=args.channels, crop=args.crop)
            args.channels = ds.images.shape[1]
            loader = data.Loader(ds.images, args.batch_size, device, seed=args.seed, flip=args.flip,
                                 rank=rank, world_size=world)
        except data.DataError as e:
            sys.exit(f"error: {e}")
    args.channels = args.channels or 1  # sampling only: the checkpoint normally says
    log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    # --eval-every: the Inception network and the reference are loaded now, so that a missing weight
    # file or a bad reference stops the run before its first step, not after an epoch.
    evaluator = None
    if args.eval_every and train and rank == 0:
        try:
            evaluator = metrics.TrainingEval(args.eval_ref, args.eval_n, args.out, args.weights, device,
                                             args.data_root, after_step=step if ckpt else None, log=log)
        except (metrics.MetricsError, data.DataError) as e:
            sys.exit(f"error: {e}")

    # --- Networks: G and D (plain, for the checkpoint and sampling) and the copies that train:
    # DDP averages gradients over ranks (BatchNorm stays per rank unless --sync-bn), and
    # torch.compile fuses kernels. Linear layers have no memory format to choose.
    G, D, optG, optD = make_networks(args, ckpt, device)
    fixed_z = (ckpt["fixed_z"] if ckpt else
               torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))).to(device)
    log(f"G: {sum(p.numel() for p in G.parameters()):,} parameters   "
        f"D: {sum(p.numel() for p in D.parameters()):,} parameters")
    if ckpt:
        log(f"resumed from {args.resume}: epoch {epoch + 1}, batch {batch}, step {step}")
    if ddp and args.sync_bn:
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    nets = SimpleNamespace(G=G, D=D, G_train=G, D_train=D, D_for_G=D)
    if ddp:
        ids = [device] if device.type == "cuda" else None
        nets.G_train, nets.D_train = DDP(G, device_ids=ids), DDP(D, device_ids=ids)
    if args.compile:
        nets.G_train, nets.D_train, nets.D_for_G = map(torch.compile, (nets.G_train, nets.D_train, D))

    # --- Training: epochs of the paper's step, logged to losses.csv; each epoch (or the run,
    # when it stops early) ends with a grid of the fixed z, the loss plot and the checkpoint.
    ckpt_path, csv_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "losses.csv")
    if rank == 0 and train:
        metrics.start_log(csv_path, COLUMNS, after_step=step if ckpt else None)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    n = len(loader) if train else 1  # batches per epoch
    signum = 0
    with stop_signals() as caught:
        while train and epoch < args.epochs and not signum:
            G.train(), D.train()
            t0, seen, first = time.perf_counter(), 0, min(batch, n)
            for batch, real in enumerate(loader.epoch(epoch, start=first), start=first):  # B x C x H x W
                if args.lr_decay == "linear":  # lr_t = lr (1 - t / T) over the run, the CIFAR-10 report
                    for opt in (optG, optD):
                        opt.param_groups[0]["lr"] = args.lr * (1 - (epoch * n + batch) / (args.epochs * n))
                losses = train_step(nets, optG, optD, real, args, args.amp)
                step, seen = step + 1, seen + real.shape[0] * world
                bad |= ~torch.isfinite(losses[0].detach() + losses[3].detach())  # a flag on the device, no sync
                at_max = bool(args.max_steps and step >= args.max_steps)
                if step % args.log_every == 0 or at_max or (caught and not ddp):
                    signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"by step {step}")
                    rate = seen / (time.perf_counter() - t0)
                    row = [step, epoch + 1] + [v.item() for v in losses] + [rate]
                    eta = (args.epochs * n - epoch * n - batch - 1) * real.shape[0] * world / rate
                    log(f"[{epoch + 1}/{args.epochs}][{batch + 1}/{n}] step {step} Loss_D {row[2]:.4f} "
                        f"Loss_G {row[5]:.4f} D(x) {row[6]:.4f} D(G(z)) {row[7]:.4f} / {row[8]:.4f}  "
                        f"{rate:.0f} img/s  ETA {eta / 60:.1f} min")
                    if rank == 0:
                        metrics.log_row(csv_path, row)
                if at_max or signum:
                    break
            signum = agree_to_stop(bad, caught, ddp, ckpt_path, f"in epoch {epoch + 1}")
            # Where the run stands: whole epochs done, and batches done in the next one.
            batch = batch + 1 if first < n else n
            epoch, batch = (epoch + 1, 0) if batch == n else (epoch, batch)
            if rank == 0:  # end of epoch (or of the run): grid of the fixed z in eval mode, plot, checkpoint
                G.eval()
                with torch.no_grad():
                    grid = G(fixed_z).float()
                G.train()
                label = epoch if batch == 0 else epoch + 1  # a partial epoch is named after itself
                vutils.save_image(grid, os.path.join(args.out, f"grid_epoch_{label:03d}.png"),
                                  nrow=8, normalize=True, value_range=(-1, 1))
                metrics.plot_losses(csv_path, os.path.join(args.out, "losses.png"))
                save_checkpoint(ckpt_path, G, D, optG, optD, args, epoch, batch, step, fixed_z)
                last = epoch == args.epochs or bool(args.max_steps and step >= args.max_steps)
                if evaluator and not signum and ((batch == 0 and epoch % args.eval_every == 0) or last):
                    if score_samples(evaluator, G, args, device, step, label):  # the lowest FID so far
                        save_checkpoint(os.path.join(args.out, "best.pt"), G, D, optG, optD, args, epoch, batch, step, fixed_z)
            if args.max_steps and step >= args.max_steps:
                break
    if signum:
        log(f"stopped by signal {signum}: checkpoint saved to {ckpt_path}; continue with --resume {ckpt_path}")
        if ddp:
            dist.destroy_process_group()
        sys.exit(128 + signum)  # 130 for Ctrl-C, as shells expect

    # --- Sampling: N single PNGs from fresh z for metrics.py (optionally truncated, D-filtered).
    if args.sample and rank == 0:
        write_samples(G, D, args, device, log)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
