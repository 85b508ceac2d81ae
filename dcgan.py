"""DCGAN: deep convolutional generative adversarial network.

Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016, arXiv:1511.06434.
The layer sizes are those of pytorch/examples' dcgan, which follows the paper.

    python dcgan.py --data celeba --epochs 60                  # the CelebA 64x64 report
    python dcgan.py --data mnist --epochs 5                    # MNIST resized to 32x32
    python dcgan.py --resume runs/dcgan-mnist/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 dcgan.py --data mnist          # data-parallel on 2 devices
"""
import argparse
import csv
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.utils as vutils
from torchvision.transforms.functional import to_pil_image

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


def init_weights(m):
    """Paper, section 4: all weights from N(0, 0.02); BatchNorm scale from N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build(cfg):
    """Both networks from a config dict (vars(args) or a checkpoint's copy of it)."""
    G = Generator(cfg["latent_dim"], cfg["ngf"], cfg["channels"], cfg["img_size"])
    D = Discriminator(cfg["ndf"], cfg["channels"], cfg["img_size"])
    return G, D


def load_model(path, device="cpu"):
    """The generator of a dcgan.py checkpoint, in eval mode (call it on B x latent_dim)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("script") != "dcgan":
        raise ValueError(f"{path} was written by {ckpt.get('script')!r}, not dcgan.py")
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

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="celeba", help=f"one of {', '.join(data.DATASETS)}, or a folder of images")
    p.add_argument("--data-root", default="data", help="where datasets and the decoded cache live")
    p.add_argument("--img-size", type=int, default=None, help="pixels; 64 for celeba, 32 otherwise (16, 32, 64, 128)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="image channels; default: the dataset's own")
    p.add_argument("--crop", type=int, default=None, help="center-crop this many pixels before resizing (108: CelebA face crop)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--epochs", type=int, default=60, help="total epochs (a resumed run continues to this count)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for G and D")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (the paper lowers it from 0.9)")
    p.add_argument("--lr-decay", default="none", choices=["none", "linear"], help="linear: decay to 0 over the run")
    p.add_argument("--latent-dim", type=int, default=100, help="size of z")
    p.add_argument("--ngf", type=int, default=64, help="generator width (channels of its last hidden layer)")
    p.add_argument("--ndf", type=int, default=64, help="discriminator width (channels of its first layer)")
    p.add_argument("--out", default=None, help="output folder; default runs/dcgan-<data>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks")
    p.add_argument("--resume", default=None, help="ckpt.pt to continue from; flags not given again come from it")
    p.add_argument("--sample", type=int, default=0, help="after training, write this many single PNGs to OUT/samples/")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--log-every", type=int, default=50, help="optimizer steps between log lines")
    args = p.parse_args(argv)
    return p, args


# Flags that describe this invocation, never restored from a checkpoint.
RUNTIME_FLAGS = {"resume", "sample", "device", "amp", "compile", "sync_bn", "max_steps"}


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

    # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python dcgan.py` is rank 0 of 1.
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
        if not isinstance(ckpt, dict) or ckpt.get("script") != "dcgan":
            sys.exit(f"error: {args.resume} was not written by dcgan.py "
                     f"(script: {ckpt.get('script') if isinstance(ckpt, dict) else '?'}); use that script to resume it")
        restore_args(p, args, ckpt)
    if ddp and args.sync_bn and device.type != "cuda":  # else DDP raises from inside PyTorch
        sys.exit("error: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); "
                 "drop --sync-bn to keep BatchNorm per rank")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    # Channels-last (NHWC) convolutions are faster with cuDNN and with the CPU's oneDNN alike
    # (CPU, dcgan at 64x64: about 1.2x); MPS keeps the default layout.
    channels_last = device.type in ("cuda", "cpu")
    args.img_size = args.img_size or (64 if args.data == "celeba" else 32)
    args.out = args.out or os.path.join("runs", f"dcgan-{os.path.basename(os.path.normpath(args.data))}")
    torch.manual_seed(args.seed + rank)

    # Data: decoded once into a uint8 cache, then served as [-1, 1] batches on the device.
    train = args.epochs > (ckpt["epoch"] if ckpt else 0)
    if train:
        try:
            ds = data.load(args.data, root=args.data_root, split="train", img_size=args.img_size,
                           channels=args.channels, crop=args.crop)
        except data.DataError as e:
            sys.exit(f"error: {e}")
        args.channels = ds.images.shape[1]
        loader = data.Loader(ds.images, args.batch_size, device, seed=args.seed, flip=args.flip,
                             rank=rank, world_size=world, channels_last=channels_last)
        if len(loader) == 0:
            sys.exit(f"error: {len(ds.images)} images is less than one batch of {args.batch_size}; lower --batch-size")
    else:
        args.channels = args.channels or 3  # sampling only: the checkpoint normally says
    log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))

    # Models and optimisers: Adam with beta1 = 0.5, as the paper.
    try:
        G, D = build(vars(args))
    except ValueError as e:
        sys.exit(f"error: {e}")
    G.apply(init_weights)
    D.apply(init_weights)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optG = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999), **fused)
    optD = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999), **fused)
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    epoch, step = 0, 0
    if ckpt:
        try:
            G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
            optG.load_state_dict(ckpt["optG"]), optD.load_state_dict(ckpt["optD"])
        except (RuntimeError, ValueError, KeyError) as e:
            sys.exit(f"error: {args.resume} does not fit these settings ({str(e).splitlines()[0]}); "
                     "drop the conflicting flags to use the checkpoint's own")
        epoch, step, fixed_z = ckpt["epoch"], ckpt["step"], ckpt["fixed_z"]
        log(f"resumed from {args.resume}: epoch {epoch}, step {step}")
    memory = torch.channels_last if channels_last else torch.contiguous_format
    G.to(device, memory_format=memory), D.to(device, memory_format=memory)
    fixed_z = fixed_z.to(device)
    log(f"G: {sum(p.numel() for p in G.parameters()):,} parameters   "
        f"D: {sum(p.numel() for p in D.parameters()):,} parameters")

    # Wrapped copies for training: DDP averages gradients over ranks (BatchNorm stays
    # per-rank unless --sync-bn), torch.compile fuses kernels. G_net/D_net stay plain.
    G_net, D_net = G, D
    if ddp:
        if args.sync_bn:
            G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
            G_net, D_net = G, D
        G = nn.parallel.DistributedDataParallel(G, device_ids=[device] if device.type == "cuda" else None)
        D = nn.parallel.DistributedDataParallel(D, device_ids=[device] if device.type == "cuda" else None)
    D_for_G = D_net  # the G step runs D without DDP: D's gradients are not wanted there
    if args.compile:
        G, D, D_for_G = torch.compile(G), torch.compile(D), torch.compile(D_net)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def save_checkpoint(done_epochs):
        save_atomic({"script": "dcgan", "args": vars(args), "epoch": done_epochs, "step": step,
                     "G": G_net.state_dict(), "D": D_net.state_dict(),
                     "optG": optG.state_dict(), "optD": optD.state_dict(),
                     "fixed_z": fixed_z.cpu()}, os.path.join(args.out, "ckpt.pt"))

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "losses.csv")
    columns = ["step", "epoch", "loss_d", "loss_d_real", "loss_d_fake", "loss_g",
               "D(x)", "D(G(z))_before", "D(G(z))_after", "img_per_s"]
    if rank == 0 and (not ckpt or not os.path.exists(csv_path)):
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(columns)

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
                     f"{os.path.join(args.out, 'ckpt.pt')} (try a lower --lr)")
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    while train and epoch < args.epochs and not stop:
        G.train(), D.train()
        t0, seen = time.perf_counter(), 0
        for real in loader.epoch(epoch):  # real: B x C x S x S in [-1, 1], already on the device
            b = real.shape[0]
            if args.lr_decay == "linear":  # lr_t = lr * (1 - t / T), the CIFAR-10 report
                for opt in (optG, optD):
                    opt.param_groups[0]["lr"] = args.lr * (1 - step / total_steps)
            z = torch.randn(b, args.latent_dim, device=device)

            # (1) D step: maximise log D(x) + log(1 - D(G(z))). Both terms are summed
            # before one backward, so DDP reduces D's gradients once.
            with autocast():
                fake = G(z)
                out_real, out_fake = D(real), D(fake.detach())
                loss_d_real, loss_d_fake = bce(out_real, 1.0), bce(out_fake, 0.0)
                loss_d = loss_d_real + loss_d_fake
            optD.zero_grad(set_to_none=True)
            loss_d.backward()
            optD.step()

            # (2) G step: maximise log D(G(z)), reusing the same fake batch.
            # D's parameters are frozen so no gradient is computed for them.
            D_net.requires_grad_(False)
            with autocast():
                out_g = D_for_G(fake)
                loss_g = bce(out_g, 1.0)
            optG.zero_grad(set_to_none=True)
            loss_g.backward()
            optG.step()
            D_net.requires_grad_(True)

            step += 1
            seen += b * world
            # Only a flag on the device: no host synchronisation inside the step.
            bad |= ~torch.isfinite(loss_d.detach() + loss_g.detach())
            stop = bool(args.max_steps and step >= args.max_steps) or interrupted
            if step % args.log_every == 0 or stop:
                check_finite(f"by step {step}")
                rate = seen / (time.perf_counter() - t0)
                eta = (total_steps - step) * b * world / rate
                # D(x) and D(G(z)) are mean probabilities: sigmoid of the logits.
                row = [step, epoch + 1, loss_d.item(), loss_d_real.item(), loss_d_fake.item(), loss_g.item(),
                       torch.sigmoid(out_real.float()).mean().item(),
                       torch.sigmoid(out_fake.float()).mean().item(),
                       torch.sigmoid(out_g.float()).mean().item(), rate]
                log(f"[{epoch + 1}/{args.epochs}][{step}/{total_steps}] Loss_D {row[2]:.4f} Loss_G {row[5]:.4f} "
                    f"D(x) {row[6]:.4f} D(G(z)) {row[7]:.4f} / {row[8]:.4f}  {rate:.0f} img/s  ETA {eta / 60:.1f} min")
                if rank == 0:
                    with open(csv_path, "a", newline="") as f:
                        csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
            if stop:
                break

        # End of epoch (or of the run): grid of the fixed z in eval mode, plot, checkpoint.
        check_finite(f"in epoch {epoch + 1}")
        epoch += 0 if interrupted else 1  # an interrupted epoch is run again from its start
        if rank == 0:
            G_net.eval()
            with torch.no_grad():
                grid = G_net(fixed_z).float()
            G_net.train()
            vutils.save_image(grid, os.path.join(args.out, f"grid_epoch_{epoch:03d}.png"),
                              nrow=8, normalize=True, value_range=(-1, 1))
            metrics.plot_losses(csv_path, os.path.join(args.out, "losses.png"))
            save_checkpoint(epoch)
        if interrupted:
            log(f"interrupted: checkpoint saved to {os.path.join(args.out, 'ckpt.pt')}")
            stop = True

    # Samples for metrics.py: N single PNGs from fresh z, generator in eval mode.
    if args.sample and rank == 0:
        out = os.path.join(args.out, "samples")
        os.makedirs(out, exist_ok=True)
        G_net.eval()
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        with torch.no_grad():
            for i in range(0, args.sample, 500):
                z = torch.randn(min(500, args.sample - i), args.latent_dim, device=device, generator=gen)
                imgs = ((G_net(z).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
                for j, img in enumerate(imgs):  # [-1, 1] -> uint8 C x H x W -> 1- or 3-channel PNG
                    to_pil_image(img).save(os.path.join(out, f"{i + j:06d}.png"))
        log(f"wrote {args.sample} samples to {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
