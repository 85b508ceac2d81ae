"""Fully connected VAE: the variational autoencoder of Kingma & Welling on flattened images.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114. Hidden
sizes 512-256 and a 2-d latent, as the MNIST report used them (a 2-d latent space can
be drawn as a plane: see latent_edit.py).

    python mlp_vae.py --data mnist                                # the MNIST report, 28x28, 10 epochs
    python mlp_vae.py --data mnist --latent-dim 20                # as pytorch/examples' vae
    python mlp_vae.py --resume runs/mlp_vae-mnist/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 mlp_vae.py --data mnist           # data-parallel on 2 devices
"""
import argparse
import csv
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
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("script") != "mlp_vae":
        raise ValueError(f"{path} was written by {ckpt.get('script')!r}, not mlp_vae.py")
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
    p.add_argument("--out", default=None, help="output folder; default runs/mlp_vae-<data>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on for CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks (this model has none)")
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

    # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python mlp_vae.py` is rank 0 of 1.
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
        if not isinstance(ckpt, dict) or ckpt.get("script") != "mlp_vae":
            sys.exit(f"error: {args.resume} was not written by mlp_vae.py "
                     f"(script: {ckpt.get('script') if isinstance(ckpt, dict) else '?'}); use that script to resume it")
        restore_args(p, args, ckpt)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    args.out = args.out or os.path.join("runs", f"mlp_vae-{os.path.basename(os.path.normpath(args.data))}")
    torch.manual_seed(args.seed + rank)

    # Data: decoded once into a uint8 cache, then served as [-1, 1] batches on the device.
    # The held-out split (where the dataset has one) gives the test loss at each epoch end.
    train = args.epochs > (ckpt["epoch"] if ckpt else 0)
    test_images = None
    if train:
        try:
            ds = data.load(args.data, root=args.data_root, split="train", img_size=args.img_size,
                           channels=args.channels, crop=args.crop)
            if data.has_test_split(args.data):
                test_images = data.load(args.data, root=args.data_root, split="test", img_size=args.img_size,
                                        channels=args.channels, crop=args.crop).images
        except data.DataError as e:
            sys.exit(f"error: {e}")
        args.img_size, args.channels = ds.images.shape[-1], ds.images.shape[1]
        loader = data.Loader(ds.images, args.batch_size, device, seed=args.seed, flip=args.flip,
                             rank=rank, world_size=world)
        if len(loader) == 0:
            sys.exit(f"error: {len(ds.images)} images is less than one batch of {args.batch_size}; lower --batch-size")
        # The fixed inputs of recon_epoch_NNN.png: the first 32 training images, in rows of 8.
        n_recon, row_len = min(32, len(ds.images)), min(8, len(ds.images))
        recon_x = data.to_float(ds.images[:n_recon - n_recon % row_len]).to(device)
    else:
        args.img_size = args.img_size or data.DEFAULT_IMG_SIZE.get(args.data, 64)  # sampling only:
        args.channels = args.channels or 1                                      # the checkpoint says
    log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))

    # Model and optimiser: PyTorch's default initialisation, Adam with its default betas.
    model = build(vars(args))
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, **fused)
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    epoch, step = 0, 0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            sys.exit(f"error: {args.resume} does not fit these settings ({str(e).splitlines()[0]}); "
                     "drop the conflicting flags to use the checkpoint's own")
        epoch, step, fixed_z = ckpt["epoch"], ckpt["step"], ckpt["fixed_z"]
        log(f"resumed from {args.resume}: epoch {epoch}, step {step}")
    model.to(device)
    fixed_z = fixed_z.to(device)
    count = lambda *ms: sum(t.numel() for m in ms for t in m.parameters())
    log(f"encoder: {count(model.encoder, model.fc_mu, model.fc_logvar):,} parameters   "
        f"decoder: {count(model.decoder):,} parameters")

    # A wrapped copy for training: DDP averages gradients over ranks (BatchNorm stays
    # per-rank unless --sync-bn), torch.compile fuses kernels. model_net stays plain.
    model_net = model
    if ddp:
        if args.sync_bn:
            model = model_net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def save_checkpoint(done_epochs):
        save_atomic({"script": "mlp_vae", "args": vars(args), "epoch": done_epochs, "step": step,
                     "model": model_net.state_dict(), "opt": opt.state_dict(),
                     "fixed_z": fixed_z.cpu()}, os.path.join(args.out, "ckpt.pt"))

    def evaluate(images):
        """Held-out (total, recon, KL) per image, eval mode. As pytorch/examples' vae, one sampled
        z per image (from a fixed seed, so epochs compare), not mu: the negative ELBO in nats."""
        gen, sums = torch.Generator(device).manual_seed(args.seed), torch.zeros(3, device=device)
        model_net.eval()
        with torch.no_grad(), autocast():
            for i in range(0, len(images), args.batch_size):
                x = data.to_float(images[i:i + args.batch_size].to(device))
                out, mu, logvar = model_net(x, generator=gen)
                sums += torch.stack(vae_loss(out, x, mu, logvar)) * len(x)
        model_net.train()
        return (sums / len(images)).tolist()

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "losses.csv")
    columns = ["step", "epoch", "loss", "recon", "kl", "img_per_s", "test_loss", "test_recon", "test_kl"]
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
                     f"{os.path.join(args.out, 'ckpt.pt')} (try a lower --lr)")
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    while train and epoch < args.epochs and not stop:
        model.train()
        t0, seen, loss_sum, n_steps = time.perf_counter(), 0, torch.zeros((), device=device), 0
        for x in loader.epoch(epoch):  # x: B x C x S x S in [-1, 1], already on the device
            b = x.shape[0]
            with autocast():
                out, mu, logvar = model(x)
                loss, rec, kl = vae_loss(out, x, mu, logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

            step += 1
            seen += b * world
            n_steps += 1
            loss_sum += loss.detach()
            # Only a flag on the device: no host synchronisation inside the step.
            bad |= ~torch.isfinite(loss.detach())
            stop = bool(args.max_steps and step >= args.max_steps) or interrupted
            if step % args.log_every == 0 or stop:
                check_finite(f"by step {step}")
                rate = seen / (time.perf_counter() - t0)
                eta = (total_steps - step) * b * world / rate
                row = [step, epoch + 1, loss.item(), rec.item(), kl.item(), rate]
                log(f"[{epoch + 1}/{args.epochs}][{step}/{total_steps}] loss {row[2]:.2f} = recon {row[3]:.2f} "
                    f"+ KL {row[4]:.2f}  {rate:.0f} img/s  ETA {eta / 60:.1f} min")
                write_row(row + [""] * 3)
            if stop:
                break

        # End of epoch (or of the run): held-out loss, fixed-z samples and reconstructions
        # in eval mode, plot, checkpoint.
        check_finite(f"in epoch {epoch + 1}")
        epoch += 0 if interrupted else 1  # an interrupted epoch is run again from its start
        if rank == 0 and not interrupted:
            t1 = time.perf_counter()
            msg = f"====> epoch {epoch}: train loss {loss_sum.item() / max(n_steps, 1):.4f} per image ({t1 - t0:.1f} s)"
            if test_images is not None:
                test = evaluate(test_images)
                write_row([step, epoch] + [""] * 4 + test)
                msg += (f", test loss {test[0]:.4f} = recon {test[1]:.4f} + KL {test[2]:.4f} "
                        f"({time.perf_counter() - t1:.1f} s)")
            log(msg)
        if rank == 0:
            model_net.eval()
            with torch.no_grad():
                grid = model_net.decode(fixed_z).float()
                pairs = torch.stack([recon_x, model_net.decode(model_net.encode(recon_x)[0]).float()], 1)
            model_net.train()
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
        model_net.eval()
        gen = torch.Generator(device).manual_seed(args.seed + 1)
        with torch.no_grad():
            for i in range(0, args.sample, 500):
                z = torch.randn(min(500, args.sample - i), args.latent_dim, device=device, generator=gen)
                imgs = ((model_net.decode(z).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
                for j, img in enumerate(imgs):  # [-1, 1] -> uint8 C x H x W -> 1- or 3-channel PNG
                    to_pil_image(img).save(os.path.join(out, f"{i + j:06d}.png"))
        log(f"wrote {args.sample} samples to {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
