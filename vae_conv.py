"""Deep convolutional VAE: variational autoencoder with the Hou et al. architecture.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114 (the model and its
loss); Hou, Shen, Sun & Qiu, "Deep Feature Consistent Variational Autoencoder", WACV 2017,
arXiv:1610.00291, Fig. 2 (the encoder and decoder); --arch cifar10-report: the CIFAR-10 report's VAE.

    python vae_conv.py --data celeba --epochs 50               # the CelebA report, 64x64, MSE
    python vae_conv.py --data cifar10 --arch cifar10-report --epochs 100   # the CIFAR-10 report's VAE, BCE
    python vae_conv.py --resume runs/vae_conv-celeba/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 vae_conv.py --data celeba       # data-parallel on 2 devices
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        self.latent_dim, self.recon = latent_dim, recon
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
ARCH_DEFAULTS = {"paper": {"latent_dim": 128, "recon": "mse", "width": 256},
                 "cifar10-report": {"latent_dim": 512, "recon": "bce", "img_size": 32, "channels": 3}}


def build(cfg):
    """The VAE from a config dict (vars(args) or a checkpoint's copy of it; one from before --arch is the paper's)."""
    if cfg.get("arch", "paper") == "cifar10-report":
        return CifarReportVAE(cfg["latent_dim"], cfg["recon"])
    return VAE(cfg["latent_dim"], cfg["width"], cfg["channels"] or 3, cfg["img_size"], cfg["recon"])


def load_model(path, device="cpu"):
    """The VAE of a vae_conv.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = data.read_checkpoint(path, "vae_conv", upgrade)  # DataError (a ValueError): one sentence if not one
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
# The paper's training step (Kingma & Welling, Algorithm 1: a minibatch, one z per image, a
# gradient step on the negative ELBO), and the same loss on held-out images.

def train_step(model, opt, x, args):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        out, mu, logvar = model(x)  # B x C x S x S, B x latent, B x latent
        loss, rec, kl = vae_loss(out, x, mu, logvar, args.recon, args.beta)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss, "recon": rec, "kl": kl}


def held_out_loss(model, x, g, args):
    """(total, recon, KL) per image of a held-out batch, the negative ELBO when beta = 1: one sampled z per
    image as pytorch/examples' vae, not mu, its noise from g (metrics.LossLog.held_out: a CPU generator, the
    same on every device)."""
    out, mu, logvar = model(x, generator=g)
    return torch.stack(vae_loss(out, x, mu, logvar, args.recon, args.beta))


# losses.csv: a row per logged step, and a held-out row (its training cells blank) at each epoch's end.
COLUMNS = ["step", "epoch", "loss", "recon", "kl", "img_per_s", "test_loss", "test_recon", "test_kl"]


# -----------------------------------------------------------------------------
# Settings: this model's flags; data.py adds those of the data and the run, metrics.py the evaluation's.

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_args(p, data="celeba", epochs=50, batch_size=256, img_size="64 for celeba, 32 otherwise (16-128)")
    p.add_argument("--arch", default="paper", choices=list(ARCH_DEFAULTS),
                   help="networks: paper (Hou et al., sized by --img-size and --width) or cifar10-report "
                        "(the CIFAR-10 report's VAE: 32x32x3, latent 512, BCE)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (Kingma & Welling's and "
                   "pytorch/examples' vae; Hou et al. used 5e-4 at batch 64)")
    p.add_argument("--latent-dim", type=int, default=None, help="size of z; default 128 (Hou et al. used 100), "
                   "512 with --arch cifar10-report")
    p.add_argument("--width", type=int, default=None, help="--arch paper: channels of the deepest conv block, "
                   "each shallower one halves it (256)")
    p.add_argument("--recon", default=None, choices=["mse", "bce"],
                   help="reconstruction loss: mse (tanh decoder) or bce (logits, [0, 1] targets); "
                        "default mse, bce with --arch cifar10-report")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (1: the ELBO)")
    metrics.add_args(p)
    return p


# A checkpoint fits only a VAE built with its own (--recon: tanh or logits out).
SHAPE_FLAGS = ["arch", "latent_dim", "width", "channels", "img_size", "recon"]


def upgrade(cfg):
    """A checkpoint from before --arch holds the paper's network (so a typed --arch is checked against it)."""
    cfg.setdefault("arch", "paper")


def check_args(args, run):
    """vae_conv.py's own flags (data.Run has checked the shared ones), before any data is read."""
    metrics.check_args(args, run)
    if not (math.isfinite(args.beta) and args.beta >= 0):
        data.fail(f"--beta must be a number >= 0 (0: no KL term), got {args.beta}")
    if args.arch == "cifar10-report" and args.width is not None:
        data.fail("--arch cifar10-report is the CIFAR-10 report's VAE, whose widths are its own; --width changes "
                  "only --arch paper")
    if args.arch == "cifar10-report" and (args.img_size or 32, args.channels or 3) != (32, 3):
        data.fail(f"--arch cifar10-report is the CIFAR-10 report's VAE for 32x32 RGB images, which --img-size "
                  f"{args.img_size} --channels {args.channels} does not fit; drop --img-size and --channels")
    for k, v in ARCH_DEFAULTS[args.arch].items():  # flags left unset take their --arch's value
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.img_size = args.img_size or (64 if args.data == "celeba" else 32)
    if args.width is not None and args.width < 1:
        data.fail(f"--width must be at least 1, got {args.width}")
    run.check_memory(lambda b: dry_run(args, b), "--img-size, --batch-size or --width")


def make_networks(args, run):
    """The VAE, with PyTorch's default initialisation or the checkpoint's weights, on the device (channels-last on
    CUDA), and Adam with its default betas."""
    model = build(vars(args))
    run.restore(run.memory_format(), model=model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, **run.fused)
    run.restore(opt=opt)
    return model, opt


def dry_run(args, b):
    """The VAE on a batch of b: what data.Run.check_memory measures on the meta device (shapes only)."""
    model = build(vars(args))
    model(torch.zeros(b, args.channels or 3, args.img_size, args.img_size))
    return [model]


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- Setup: flags (a resumed run's are its checkpoint's unless typed), device, ranks, output folder.
    run = data.Run(get_parser(), argv, "vae_conv", check_args, SHAPE_FLAGS, upgrade)
    args, device = run.args, run.device

    # --- Data: [-1, 1] training batches on the device, decoded once into a uint8 cache; and the held-out
    # split, where the dataset has one: the held-out loss, and the reconstructions the evaluation scores.
    loader = run.loader(channels_last=run.memory_format() == torch.channels_last)
    test = run.images("test") if run.train else None

    # --- Network: the VAE and its optimizer, and the copy that trains (DDP under torchrun, torch.compile).
    model, opt = make_networks(args, run)
    model_train = run.wrap(model)
    fixed_z = run.fixed_noise(64, args.latent_dim)
    run.show(encoder=(model.encoder, model.fc_mu, model.fc_logvar), decoder=(model.fc_z, model.decoder))
    sets = {"samples": lambda i, b, g: model.decode(torch.randn(b, args.latent_dim, device=device, generator=g))}
    if test is not None:  # decode(mu(x)) of held-out x: beside the samples, the part of the prior never learnt
        sets["recon"] = lambda i, b, g: model.decode(model.encode(data.to_float(test[i:i + b]).to(device))[0])
    evaluation = metrics.TrainingEval.start(run, sets, model, held_out=test)
    log = metrics.LossLog(run, COLUMNS)

    # --- Training; each epoch ends with the held-out loss (not after a stop signal), the checkpoint, the
    # samples of the fixed z, reconstructions of the first training images, the loss plot, the evaluation.
    with run.stop_signals():
        while run.training():
            model.train()
            for x in run.batches(loader):                                   # B x C x S x S in [-1, 1]
                run.set_lr(args.lr, opt)
                losses = train_step(model_train, opt, x, args)
                if run.step_done(losses):
                    log.row(losses)
            log.held_out(model, test, args.batch_size, lambda x, g: held_out_loss(model, x, g, args))
            metrics.end_epoch(run, log, evaluation, model, lambda: model.decode(fixed_z),     # samples of z
                              loader.images, lambda x: model.decode(model.encode(x)[0]))   # x -> decode(mu(x))
    run.finish()
    metrics.write_samples(run, sets["samples"], model)                              # --sample N, z ~ N(0, I)


if __name__ == "__main__":
    main()
