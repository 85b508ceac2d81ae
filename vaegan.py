"""VAE-GAN: a VAE whose reconstruction error is measured in a GAN discriminator's features.

Larsen, Sønderby, Larochelle & Winther, "Autoencoding beyond pixels using a learned similarity metric",
ICML 2016, arXiv:1512.09300: the architecture of its 64x64 experiments, the three losses, and the updates
of its Algorithm 1, with RMSprop at 3e-4 and batch 64. Kept in balance as GANs need: the discriminator
normalises real images, reconstructions and prior samples each in its own BatchNorm batch (--separate-dis,
ours), weighs real against generated images (--real-weight) and skips the update of whichever of decoder
and discriminator is too far ahead (--margin), the last two the authors' training tricks. Without them, on
MNIST the discriminator rejects every prior sample from the first steps (D(x_p) ~ 0) and samples from the
prior are not digits.

    python vaegan.py --data celeba                             # the CelebA report: 64x64, gamma 15
    python vaegan.py --data mnist --epochs 5 --gamma 1.5       # MNIST resized to 32x32
    python vaegan.py --resume runs/vaegan-celeba/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 vaegan.py --data celeba        # data-parallel on 2 devices
"""
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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
    return VAEGAN(cfg["latent_dim"], cfg["width"], cfg["channels"] or 3, cfg["img_size"] or 64)


def load_model(path, device="cpu"):
    """The VAE-GAN of a vaegan.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = data.read_checkpoint(path, "vaegan", upgrade)  # DataError (a ValueError): one sentence if not one
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


def held_out_losses(model, x, g, dis_layer):
    """Held-out KL, feature MSE and pixel MSE per image of a batch, z ~ q(z|x) with its noise from g
    (metrics.LossLog.held_out: a CPU generator, so that epochs and devices compare)."""
    mu, logvar = model.encode(x)
    x_tilde = model.decode(reparameterise(mu, logvar, torch.randn(mu.shape, generator=g).to(x.device)))
    feats = model.discriminator(torch.cat([x, x_tilde]), dis_layer)[1]         # 2B x N_l: [x, x~]
    return torch.stack([kl_divergence(mu, logvar), feature_mse(feats[len(x):], feats[:len(x)]), pixel_mse(x_tilde, x)])


# losses.csv: one row per logged step, and one held-out row (its training cells blank) per epoch end.
LOGGED = ("kl", "feat_mse", "pixel_mse", "loss_dis", "gan_dec", "D(x)", "D(x_tilde)", "D(x_p)",
          "dis_real", "dis_fake", "dec_step", "dis_step", "gnorm_enc", "gnorm_dec", "gnorm_dis")
COLUMNS = ["step", "epoch", *LOGGED, "img_per_s", "test_kl", "test_feat_mse", "test_pixel_mse"]


# -----------------------------------------------------------------------------
# Settings: this model's flags; data.py adds those of the data and the run, metrics.py the evaluation's.

def number_or_none(v):
    return None if v.lower() == "none" else float(v)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_args(p, data="celeba", batch_size=64, img_size="64 for celeba, 32 otherwise; a multiple of 8",
                  epochs=15)  # 15: the authors' 150 x 250 batches of 64, about 15 passes over CelebA's training set
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of all three optimizers")
    p.add_argument("--lr-anneal", type=float, default=1.0, help="multiply the learning rates by this after every "
                   "epoch, as the authors anneal theirs; 1: constant")
    p.add_argument("--optim", default="rmsprop", choices=["rmsprop", "adam"],
                   help="rmsprop: the paper; adam: betas (0.5, 0.999)")
    p.add_argument("--latent-dim", type=int, default=128, help="size of z")
    p.add_argument("--width", type=int, default=64, help="channels of the first encoder conv; every layer scales "
                   "with it")
    p.add_argument("--gamma", type=float, default=15.0, help="decoder update: weight of feat_mse (the mean squared "
                   "Dis_l error) against the GAN loss; 15 is the report's best, it also tried 1.5")
    p.add_argument("--dis-layer", type=int, default=4, choices=[1, 2, 3, 4],
                   help="Dis_l: the discriminator conv (counted from the input) whose output, before its BatchNorm, "
                   "measures reconstructions; 4 as the authors' code (the last, 3rd strided conv)")
    # Keeping the GAN in balance: what makes prior samples digits after one MNIST epoch (docs/training.md).
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
    metrics.add_args(p)
    return p


def upgrade(cfg):
    """An older checkpoint's flags. Before --lr-anneal, its per-epoch multiplier was called --lr-decay (now
    none|linear, as in every script); before issue #17's flags a run trained the original way: one joint
    discriminator batch, the paper's plain sum, no balancing, no annealing. It resumes that way."""
    if isinstance(cfg.get("lr_decay"), float):
        cfg["lr_anneal"], cfg["lr_decay"] = cfg["lr_decay"], "none"
    for k, v in {"separate_dis": False, "real_weight": None, "margin": None, "equilibrium": 0.68,
                 "lr_anneal": 1.0}.items():
        cfg.setdefault(k, v)


def check_args(args, run):
    """vaegan.py's own flags (data.Run has checked the shared ones), before any data is read."""
    metrics.check_args(args, run)
    if args.width < 1:
        data.fail(f"--width must be at least 1, got {args.width}")
    if not (math.isfinite(args.gamma) and args.gamma >= 0):
        data.fail(f"--gamma must be a number >= 0, got {args.gamma}")
    if args.real_weight is not None and not 0 < args.real_weight < 1:
        data.fail(f"--real-weight must be between 0 and 1 (both excluded) or 'none', got {args.real_weight}")
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin >= 0):
        data.fail(f"--margin must be a number >= 0 or 'none', got {args.margin}")
    if not (math.isfinite(args.equilibrium) and args.equilibrium > 0):
        data.fail(f"--equilibrium must be a positive number of nats, got {args.equilibrium}")
    if not 0 < args.lr_anneal <= 1:
        data.fail(f"--lr-anneal must be in (0, 1] (1: constant learning rate), got {args.lr_anneal}")
    if run.ckpt and args.optim != run.ckpt["args"].get("optim", "rmsprop"):  # not a shape, but its state is
        data.fail(f"{args.resume} was trained with --optim {run.ckpt['args'].get('optim', 'rmsprop')}, which --optim "
                  f"{args.optim} does not fit (its optimizer state is another's); drop --optim to use the checkpoint's")
    if args.optim == "adam" and args.margin is not None:  # see train_step: a zero gradient is no skip for Adam
        data.fail("--margin skips an update by zeroing its gradient, which stops RMSprop but not Adam (its momentum "
                  "moves the weights on); with --optim adam add --margin none")
    args.img_size = args.img_size or (64 if args.data == "celeba" else 32)
    run.check_memory(lambda b: dry_run(args, b), "--img-size, --batch-size or --width")


def make_networks(args, run):
    """The three networks (PyTorch's default initialisation, or the checkpoint's weights) on the device, then one
    optimizer each: RMSprop as the paper (it has no fused kernel: foreach everywhere), or Adam."""
    model = build(vars(args))
    run.restore(run.memory_format(), **{n: getattr(model, n) for n in NETS})
    opts = [torch.optim.Adam(getattr(model, n).parameters(), lr=args.lr, betas=(0.5, 0.999), **run.fused)
            if args.optim == "adam" else torch.optim.RMSprop(getattr(model, n).parameters(), lr=args.lr, foreach=True)
            for n in NETS]
    run.restore(**{"opt_" + n: opt for n, opt in zip(NETS, opts)})
    return (model, *opts)


def dry_run(args, b):
    """One step's forward passes on b images: what data.Run.check_memory measures on the meta device (shapes only)."""
    model = build(vars(args))
    x = torch.zeros(b, args.channels or 3, args.img_size, args.img_size)
    mu, _ = model.encode(x)                                                  # as train_step: Enc on B,
    model.discriminator(torch.cat([x, model.decode(torch.cat([mu, mu]))]))  # Dec on 2B, Dis on 3B
    return [model]


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- Setup: flags (a resumed run's are its checkpoint's unless typed), device, ranks, output folder.
    run = data.Run(get_parser(), argv, "vaegan", check_args, ["latent_dim", "width", "channels", "img_size"],
                   upgrade)
    args, device = run.args, run.device
    loader = run.loader(channels_last=run.memory_format() == torch.channels_last)  # [-1, 1] batches
    test = run.images("test") if run.train else None      # held-out losses and reconstructions

    # --- Networks: the three (plain: saved, sampled, evaluated), an optimizer each, and the copies that train
    # (torch.compile). Data-parallel without DDP: DDP reduces
    # gradients from hooks that expect one forward and one full backward per step, but here one forward feeds
    # three backward passes restricted with inputs=. So under torchrun every rank starts from rank 0's weights
    # and train_step averages the three gradient sets itself, in one all-reduce, before any step.
    model, *opts = make_networks(args, run)                # opts: the encoder's, the decoder's, the discriminator's
    if run.ddp:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    nets = [run.wrap(getattr(model, n), ddp=False) for n in NETS]
    fixed_z = run.fixed_noise(64, args.latent_dim)
    run.show(**{n: getattr(model, n) for n in NETS})
    sets = {"samples": lambda i, b, g: model.decode(torch.randn(b, args.latent_dim, device=device, generator=g))}
    if test is not None:
        sets["recon"] = lambda i, b, g: model.decode(model.encode(data.to_float(test[i:i + b]).to(device))[0])
    evaluation = metrics.TrainingEval.start(run, sets, model, held_out=test)
    log = metrics.LossLog(run, COLUMNS)

    # --- Training: epochs of Algorithm 1; each ends with the held-out losses (not after a stop signal), the
    # checkpoint, a grid of the fixed z, reconstructions of the first training images, the plot, the evaluation.
    with run.stop_signals():
        while run.training():
            model.train()
            for x in run.batches(loader):                                  # B x C x S x S in [-1, 1]
                run.set_lr(args.lr * args.lr_anneal ** run.epoch, *opts)  # --lr-anneal per epoch, --lr-decay
                t = train_step(nets, opts, x, args.gamma, args.dis_layer, args.amp, run.world,
                               separate_dis=args.separate_dis, real_weight=args.real_weight, margin=args.margin,
                               equilibrium=args.equilibrium)
                logged = {k: t[k] for k in LOGGED}
                if run.step_done(logged):
                    log.row(logged)
            log.held_out(model, test, 256, lambda x, g: held_out_losses(model, x, g, args.dis_layer))
            metrics.end_epoch(run, log, evaluation, model, lambda: model.decode(fixed_z),     # samples of z
                              loader.images, lambda x: model.decode(model.encode(x)[0]))   # x -> decode(mu(x))
    run.finish()
    metrics.write_samples(run, sets["samples"], model)


if __name__ == "__main__":
    main()
