"""Fully connected VAE: the variational autoencoder of Kingma & Welling on flattened images.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114. Hidden sizes 512-256 and
a 2-d latent, as the MNIST report used them (a 2-d latent space can be drawn as a plane: latent_edit.py).

    python mlp_vae.py --data mnist                                # the MNIST report, 28x28, 10 epochs
    python mlp_vae.py --data mnist --latent-dim 20                # as pytorch/examples' vae
    python mlp_vae.py --resume runs/mlp_vae-mnist/ckpt.pt --epochs 0 --sample 10000
    torchrun --nproc_per_node=2 mlp_vae.py --data mnist           # data-parallel on 2 devices
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    return VAE(cfg["latent_dim"], cfg["channels"] or 1, cfg["img_size"])


def load_model(path, device="cpu"):
    """The VAE of an mlp_vae.py checkpoint in eval mode: .encode(x) -> (mu, logvar), .decode(z)."""
    ckpt = data.read_checkpoint(path, "mlp_vae")  # DataError (a ValueError): one sentence if it is not one
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
    # eps ~ N(0, I) drawn where `generator` draws (a CPU one gives the same eps on every device)
    eps = torch.randn(mu.shape, dtype=mu.dtype, generator=generator,
                      device=generator.device if generator is not None else mu.device).to(mu.device)
    return mu + torch.exp(logvar / 2) * eps  # the standard deviation, not the log-variance


def vae_loss(logits, x, mu, logvar):
    """(total, recon, KL), each summed over an image and averaged over the batch."""
    logits, mu, logvar, b = logits.float(), mu.float(), logvar.float(), x.shape[0]
    rec = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="sum") / b  # [-1, 1] -> [0, 1]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / b
    return rec + kl, rec, kl


# -----------------------------------------------------------------------------
# The training step (Algorithm 1 of Kingma & Welling with L = 1, one z per image): a gradient step
# on the minibatch's negative ELBO; and the same loss on held-out images.

def train_step(model, opt, x, args):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        logits, mu, logvar = model(x)              # B x C x H x W logits; B x latent, twice
        loss, rec, kl = vae_loss(logits, x, mu, logvar)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss, "recon": rec, "kl": kl}


def held_out_loss(model, x, g):
    """(-ELBO, recon, KL) in nats per image of a held-out batch: one sampled z per image (as pytorch/examples'
    vae, not mu), its noise from g (metrics.LossLog.held_out: a CPU generator, the same on every device)."""
    logits, mu, logvar = model(x, generator=g)
    return torch.stack(vae_loss(logits, x, mu, logvar))


COLUMNS = ["step", "epoch", "loss", "recon", "kl", "img_per_s", "test_loss", "test_recon", "test_kl"]  # losses.csv


# -----------------------------------------------------------------------------
# Settings: this model's flags; data.py adds those of the data and the run, metrics.py the evaluation's.

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_args(p, data="mnist", epochs=10, batch_size=128, sync_bn=False,  # no BatchNorm to synchronise
                  img_size="the dataset's own (28 for MNIST, 32 for CIFAR-10, 64 for CelebA)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (as pytorch/examples' vae)")
    p.add_argument("--latent-dim", type=int, default=2, help="size of z (2: the latent plane can be drawn)")
    metrics.add_args(p)
    return p


def check_args(args, run):
    """mlp_vae.py's own flags (data.Run has checked the shared ones), before any data is read."""
    metrics.check_args(args, run)
    args.img_size = args.img_size or data.DEFAULT_IMG_SIZE.get(args.data, data.FOLDER_IMG_SIZE)
    run.check_memory(lambda b: [build(vars(args))], "--img-size or --batch-size")  # parameters: no forward needed


def make_networks(args, run):
    """The VAE, with PyTorch's default initialisation or the checkpoint's weights, on the device, and Adam."""
    model = build(vars(args))
    run.restore(model=model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, **run.fused)
    run.restore(opt=opt)
    return model, opt


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- Setup: flags (a resumed run's are its checkpoint's unless typed), device, ranks, output folder.
    run = data.Run(get_parser(), argv, "mlp_vae", check_args, ["latent_dim", "channels", "img_size"])
    args, device = run.args, run.device
    loader = run.loader()                                  # [-1, 1] training batches on the device
    test = run.images("test") if run.train else None       # the held-out split, where the dataset has one

    # --- Network: the VAE and its optimizer, and the copy that trains (DDP under torchrun, torch.compile).
    model, opt = make_networks(args, run)
    model_train = run.wrap(model)
    fixed_z = run.fixed_noise(64, args.latent_dim)
    run.show(encoder=(model.encoder, model.fc_mu, model.fc_logvar), decoder=model.decoder)
    sets = {"samples": lambda i, b, g: model.decode(torch.randn(b, args.latent_dim, device=device, generator=g))}
    if test is not None:
        sets["recon"] = lambda i, b, g: model.decode(model.encode(data.to_float(test[i:i + b]).to(device))[0])
    evaluation = metrics.TrainingEval.start(run, sets, model, held_out=test)
    log = metrics.LossLog(run, COLUMNS)

    # --- Training; each epoch ends with the held-out -ELBO (float32 whatever --amp says), the checkpoint,
    # samples of the fixed z, reconstructions, the loss plot and the evaluation.
    with run.stop_signals():
        while run.training():
            model.train()
            for x in run.batches(loader):
                run.set_lr(args.lr, opt)
                losses = train_step(model_train, opt, x, args)
                if run.step_done(losses):
                    log.row(losses)
            log.held_out(model, test, args.batch_size, lambda x, g: held_out_loss(model, x, g))
            metrics.end_epoch(run, log, evaluation, model, lambda: model.decode(fixed_z),     # samples of z
                              loader.images, lambda x: model.decode(model.encode(x)[0]))   # x -> decode(mu(x))
    run.finish()
    metrics.write_samples(run, sets["samples"], model)


if __name__ == "__main__":
    main()
