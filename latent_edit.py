"""latent_edit.py: attribute vectors, interpolation, latent maps and prior sweeps of a trained model.

One command per picture of the latent-space reports, from the ckpt.pt of any of the five scripts
(the encoder's mean code mu stands for an image; a GAN's image is inverted into z by gradient descent):

* attribute: z_att = mean code of images with an attribute - mean code of those without; faces
  without it, reconstructed and decoded from z + k * z_att (White 2016, "Sampling Generative
  Networks", arXiv:1609.04468, section 2.4; Larsen et al. 2016, "Autoencoding beyond pixels using a
  learned similarity metric", arXiv:1512.09300, section 5). Several attributes add their vectors.
  For a GAN the codes are inversions z* = argmin ||G(z) - x||^2 + lambda ||z||^2 (Zhu et al. 2016,
  "Generative Visual Manipulation on the Natural Image Manifold", arXiv:1609.03552, eq. 2; Creswell &
  Bharath 2018, "Inverting the Generator of a Generative Adversarial Network", arXiv:1611.05644).
* vector: z_att decoded alone and added to the mean code of the images without the attribute.
* interpolate: linear or spherical (slerp, White 2016 section 2.2) paths between two codes.
* scatter: the codes in 2-D (the latent itself, two chosen dimensions, or a PCA projection), coloured by class
  or attribute.
* manifold: decoded grid over a 2-D latent plane (Kingma & Welling 2014, "Auto-Encoding Variational
  Bayes", arXiv:1312.6114, figure 4), or over two dimensions / principal directions of a larger one.
* sample: sample grids side by side for a sweep of the truncation trick (GANs; Brock et al. 2019,
  "Large Scale GAN Training for High Fidelity Natural Image Synthesis", arXiv:1809.11096, section 3.1),
  of the temperature t of z ~ N(0, t^2 I) (VAEs), and of the prior: N(0, I) or a Gaussian mixture fitted
  to the training images' codes (Ghosh et al. 2020, "From Variational to Deterministic Autoencoders",
  arXiv:1903.12436, section 4, ex-post density estimation); optionally single PNGs and FID/KID/P/R.

    python latent_edit.py attribute --ckpt runs/vae_conv-celeba/ckpt.pt --attr Smiling --intensities 0,1,2,2.5,3
    python latent_edit.py attribute --ckpt runs/dcgan-celeba/ckpt.pt --attr Smiling,Eyeglasses --intensities 2,2
    python latent_edit.py vector --ckpt runs/vaegan-celeba/ckpt.pt --attr Eyeglasses
    python latent_edit.py interpolate --ckpt runs/vae_conv-celeba/ckpt.pt --from 0 --to 1 --slerp
    python latent_edit.py scatter --ckpt runs/vae_conv-celeba/ckpt.pt --dims 0,1 --attr Male
    python latent_edit.py manifold --ckpt runs/mlp_vae-mnist/ckpt.pt --grid 20
    python latent_edit.py sample --ckpt runs/dcgan-celeba/ckpt.pt --truncation 0.5,1,1.5,2,none
    python latent_edit.py sample --ckpt runs/vae_conv-celeba/ckpt.pt --prior normal,gmm --temperature 0.8,1

Images come from data.py with the checkpoint's own settings (dataset, size, channels, crop); edited
originals, interpolation ends and scatter points from the held-out split when the dataset has one.
"""
import argparse
import contextlib
import difflib
import importlib
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils as vutils
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_pil_image

import data
import metrics

BATCH = 256          # images per encode/decode call
VECTOR_SEED = 0      # the subset of training images behind an attribute vector or a GMM (not --seed: cached)
GAN_MAX_IMAGES = 1000  # default --max-images of a GAN: each image costs an inversion (an encoder's: 10000)
INVERSION_SEED = 0   # the starting codes of the inversions (not --seed: cached)
INVERSION_LR = 0.1   # Adam's step size on z
INVERSION_PRIOR = 0.01  # lambda of the prior term lambda ||z||^2 / D (the Gaussian prior's -log p(z), scaled)
GMM_SEED = 0         # k-means++ seeding of the mixture (cached)
GMM_REG = 1e-6       # added to each covariance's diagonal: no component collapses onto one code
GMM_TOL = 1e-6       # EM stops when the mean log-likelihood changes by less than this fraction
GMM_MAX_ITER = 1000
LABEL_H = 16         # pixels above each grid of a sweep for its setting's name
GAP = 8              # pixels between the grids of a sweep
TRUNCATION_ROUNDS = 100  # redraws of the truncation trick before it samples the rest directly
D_FILTER_PATIENCE = 5000  # --d-filter: draws before an acceptance under 1% stops the sampling


class EditError(Exception):
    """An expected failure; str(e) is one plain sentence for the user."""


@contextlib.contextmanager
def plain_errors():
    """Turns an expected failure of data.py or metrics.py (one plain sentence too) into an EditError."""
    try:
        yield
    except (data.DataError, metrics.MetricsError) as e:
        raise EditError(str(e)) from None


# -----------------------------------------------------------------------------
# Model, data, codes.

def load(path, device):
    """(model, checkpoint dict): the model from its own script's load_model, in eval mode, the checkpoint read by
    data.read_checkpoint (weights_only: nothing in it can run); one sentence if it is none of the five scripts'."""
    with plain_errors():
        ckpt = data.read_checkpoint(path)
    script = ckpt["script"]
    try:
        module = importlib.import_module(script)
    except ImportError as e:
        raise EditError(f"cannot import {script}.py, which rebuilds the model of {path} ({e}); keep the "
                        f"model scripts next to latent_edit.py") from None
    try:
        model = module.load_model(path, device)
    except KeyError as e:
        raise EditError(f"{script}.py cannot rebuild the model of {path}: it has no {e} entry") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise EditError(f"{script}.py cannot rebuild the model of {path} ({str(e).splitlines()[0][:200]})") from None
    return model, ckpt


def slug(name):
    """A name as a file name part: runs of non-word characters become one underscore."""
    return re.sub(r"\W+", "_", name).strip("_")


def beside_ckpt(args, name):
    """<ckpt dir>/name: where a checkpoint's caches and default outputs go."""
    return os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)


def write_cache(obj, path):
    """Saves obj at path (data.save_checkpoint: a renamed temporary file, removed on failure); False where it
    cannot be written: used, just not cached."""
    try:
        data.save_checkpoint(path, obj)
        return True
    except data.DataError:
        return False


def need_encoder(model, ckpt, what):
    if not hasattr(model, "encode"):
        raise EditError(f"{what} needs an encoder and a {ckpt['script']}.py checkpoint has only a generator; "
                        f"use a checkpoint of vae_conv.py, mlp_vae.py or vaegan.py")


def need_2d(model, ckpt, args, what):
    if model.latent_dim < 2:
        raise EditError(f"a {what} needs a latent of at least 2 dimensions and this {ckpt['script']}.py model "
                        f"has {model.latent_dim}")
    if args.dims and not all(0 <= i < model.latent_dim for i in args.dims):  # check_args: they differ
        raise EditError(f"--dims needs two different latent dimensions from 0 to {model.latent_dim - 1}")


def dataset(ckpt, split, root=None):
    """The checkpoint's dataset with its training settings; 'test' falls back to 'train' where there is none."""
    cfg = ckpt["args"]
    if not cfg.get("data"):
        raise EditError("the checkpoint does not say which dataset it was trained on (no 'data' in its args)")
    split = split if data.has_test_split(cfg["data"]) else "train"
    with plain_errors():
        return data.load(cfg["data"], root=root or cfg.get("data_root", "data"), split=split,
                         img_size=cfg.get("img_size"), channels=cfg.get("channels"), crop=cfg.get("crop"))


def subset(n, k, seed):
    """Sorted indices of k of n items (all of them when k >= n), a fixed random choice for a seed."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@torch.no_grad()
def encode(model, images, device):
    """uint8 N x C x H x W -> the encoder's mean codes mu, float32 N x latent_dim on the CPU."""
    return torch.cat([model.encode(data.to_float(images[i:i + BATCH].to(device)))[0].float().cpu()
                      for i in range(0, len(images), BATCH)])


@torch.no_grad()
def decode(model, z, device):
    """N x latent_dim -> images in [-1, 1] on the CPU (a GAN checkpoint's module is the generator)."""
    g = model.decode if hasattr(model, "decode") else model
    return torch.cat([g(z[i:i + BATCH].to(device)).float().cpu() for i in range(0, len(z), BATCH)]).clamp(-1, 1)


def invert(G, images, steps, restarts, device, seed=INVERSION_SEED):
    """A GAN's codes of real images, by gradient descent on z with G fixed (Zhu et al. 2016, eq. 2;
    Creswell & Bharath 2018, batched): per image, with P pixels and D latent dimensions,

        z* = argmin_z  ||G(z) - x||^2 / P  +  lambda ||z||^2 / D      (lambda = INVERSION_PRIOR)

    the second term being the Gaussian prior's -log p(z) up to a constant, which keeps z where G was
    trained. Adam for `steps` steps from `restarts` starts z0 ~ N(0, I) (drawn at once, restarts x N x D,
    from a generator seeded with `seed`), keeping each image's start with the lowest final objective.
    images: uint8 N x C x H x W. Returns (z N x D, per-pixel MSE ||G(z) - x||^2 / P N), on the CPU."""
    n, d = len(images), G.latent_dim
    starts = torch.randn(restarts, n, d, generator=torch.Generator().manual_seed(seed))  # R x N x D
    G.requires_grad_(False)  # eval mode already (load_model): gradients flow to z only
    best_z, best_mse = [], []
    per_call = max(1, BATCH // restarts)  # images per batch: all restarts of one image in one forward pass
    for i in range(0, n, per_call):
        x = data.to_float(images[i:i + per_call].to(device))                       # B x C x H x W
        b = len(x)
        x = x.repeat(restarts, 1, 1, 1)                                            # R*B x C x H x W
        z = starts[:, i:i + b].flatten(0, 1).to(device).requires_grad_()           # R*B x D, restart-major
        opt = torch.optim.Adam([z], lr=INVERSION_LR)

        def objective():
            mse = (G(z).float() - x).pow(2).flatten(1).mean(1)                     # ||G(z) - x||^2 / P
            return mse + INVERSION_PRIOR * z.pow(2).mean(1), mse                   # + lambda ||z||^2 / D
        for _ in range(steps):
            loss, _ = objective()
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # a sum: each image's gradient is its own objective's
            opt.step()
        with torch.no_grad():
            loss, mse = objective()
        pick = loss.view(restarts, b).argmin(0)                                    # B: the best start
        best_z.append(z.detach().view(restarts, b, d)[pick, torch.arange(b)].cpu())
        best_mse.append(mse.view(restarts, b)[pick, torch.arange(b)].cpu())
        if n > per_call:
            print(f"\rinverted {i + b}/{n} images", end="\n" if i + b == n else "", file=sys.stderr, flush=True)
    return torch.cat(best_z), torch.cat(best_mse)


def inversions(model, ckpt, args, images, index, device):
    """invert() of the training images `index`, cached in <ckpt dir>/inv_<max-images>_<steps>x<restarts>.pt
    (recomputed when the checkpoint's step or the images change): {"z", "mse", "index", "ckpt_step"}."""
    path = beside_ckpt(args, f"inv_{args.max_images}_{args.inversion_steps}x{args.restarts}.pt")
    try:
        cached = torch.load(path, weights_only=True)
        if cached["ckpt_step"] == ckpt.get("step") and torch.equal(cached["index"], index) \
                and cached["z"].shape == (len(index), model.latent_dim):
            print(f"inversions of {len(index)} training images: {path} (cached)")
            return cached
    except Exception:  # none yet, or unreadable: compute them (again)
        pass
    print(f"inverting {len(index)} training images ({args.inversion_steps} Adam steps, {args.restarts} starts each)")
    z, mse = invert(model, images, args.inversion_steps, args.restarts, device)
    inv = {"z": z, "mse": mse, "index": index, "ckpt_step": ckpt.get("step")}
    print(f"inversions: {path}" if write_cache(inv, path) else f"inversions not cached, as {path} cannot be written")
    return inv


def save_grid(images, path, nrow, padding=2):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vutils.save_image(images, path, nrow=nrow, padding=padding, normalize=True, value_range=(-1, 1))


# -----------------------------------------------------------------------------
# Attributes and attribute vectors.

def attribute(ds, name):
    """(canonical name, bool mask over ds) of an attribute column (CelebA's 40, a folder's CSV, fake's)
    or a class; case-insensitive, and MNIST's class '7 - seven' answers to '7' and 'seven' too."""
    if ds.attrs is None and ds.labels is None:
        raise EditError(f"the {ds.name} images have neither attributes nor class labels (a folder needs an "
                        f"attributes.csv), so there is nothing to build an attribute vector from")
    choices = {a.lower(): (a, lambda j=j: ds.attrs[:, j].bool()) for j, a in enumerate(ds.attr_names or [])}
    for c, cls in enumerate(ds.classes or []):
        for alias in (cls, *cls.split(" - ")):
            choices.setdefault(alias.strip().lower(), (cls, lambda c=c: ds.labels == c))
    if name.lower() not in choices:
        names = list(ds.attr_names or []) + list(ds.classes or [])
        close = difflib.get_close_matches(name, names, 1)
        raise EditError(f"{ds.name} has no attribute or class {name!r}{f' (closest: {close[0]})' if close else ''}; "
                        f"use one of {', '.join(names)}")
    canonical, mask = choices[name.lower()]
    return canonical, mask()


def attribute_vector(model, ckpt, args, device, attr):
    """z_att, the means it is the difference of and their counts, over the codes of up to --max-images training
    images (an encoder's mean codes mu; a GAN's inversions, with their mean per-pixel MSE), cached in <ckpt
    dir>/attr_<name>_<max-images>.pt (recomputed when the checkpoint's step or the inversion settings change)."""
    gan = not hasattr(model, "encode")
    if args.max_images is None:  # each of a GAN's images costs an inversion
        args.max_images = GAN_MAX_IMAGES if gan else 10000
    inversion = [args.inversion_steps, args.restarts] if gan else None
    ds = dataset(ckpt, "train", args.data_root)
    name, mask = attribute(ds, attr)
    path = beside_ckpt(args, f"attr_{slug(name)}_{args.max_images}.pt")
    try:
        cached = torch.load(path, weights_only=True)
        if cached["ckpt_step"] == ckpt.get("step") and cached["attr"] == name \
                and cached["vector"].shape == (model.latent_dim,) and cached.get("inversion") == inversion:
            mse = f", inversions' mean per-pixel MSE {cached['inversion_mse']:.4f}" if inversion else ""
            print(f"attribute vector of {name}: {path} (cached{mse})")
            return cached
    except Exception:  # none yet, or unreadable: compute it (again)
        pass
    idx = subset(len(ds), args.max_images, VECTOR_SEED)
    mask = mask[idx]
    if not mask.any() or mask.all():
        raise EditError(f"{'none' if not mask.any() else 'every one'} of the {len(idx)} training images used "
                        f"has {name}, so there is no difference of means to take")
    if gan:
        inv = inversions(model, ckpt, args, ds.images[idx], idx, device)
        z, mse = inv["z"], inv["mse"].mean().item()
    else:
        z, mse = encode(model, ds.images[idx], device), None
    mean_with, mean_without = z[mask].mean(0), z[~mask].mean(0)
    vec = {"vector": mean_with - mean_without, "mean_with": mean_with, "mean_without": mean_without,
           "n_with": int(mask.sum()), "n_without": int((~mask).sum()), "attr": name, "ckpt_step": ckpt.get("step"),
           "inversion": inversion, "inversion_mse": mse}
    where = path if write_cache(vec, path) else f"not cached, as {path} cannot be written"
    inverted = f", inversions' mean per-pixel MSE {mse:.4f} in [-1, 1] units" if gan else ""
    print(f"attribute vector of {name} from {vec['n_with']} images with and {vec['n_without']} without "
          f"(|z_att| = {vec['vector'].norm():.3f}{inverted}): {where}")
    return vec


def cmd_attribute(model, ckpt, args, device):
    """Rows: originals without the attribute(s), their reconstructions (a GAN: inversions G(z)), then
    decode(z + k z_att) per intensity k; with several attributes, each alone at its intensity, then their sum."""
    names = args.attr.split(",")
    vecs = [attribute_vector(model, ckpt, args, device, a) for a in names]
    ds = dataset(ckpt, "test", args.data_root)
    has_any = torch.stack([attribute(ds, vec["attr"])[1] for vec in vecs]).any(0)
    pool = (~has_any).nonzero().flatten()
    if len(pool) == 0:
        raise EditError(f"every {ds.name} image there is to edit has {' or '.join(v['attr'] for v in vecs)}, "
                        f"so there is no original without it")
    pick = pool[subset(len(pool), args.n, args.seed)]
    if hasattr(model, "encode"):  # the originals' codes: mu, or a GAN's inversions z
        z = encode(model, ds.images[pick], device)
    else:
        z, mse = invert(model, ds.images[pick], args.inversion_steps, args.restarts, device)
        print(f"inverted the {len(pick)} originals: mean per-pixel MSE {mse.mean():.4f} in [-1, 1] units")
    recon = decode(model, z, device)
    if len(vecs) == 1:  # one row per intensity
        shifts = [(f"intensity_{k:g}", k * vecs[0]["vector"]) for k in args.intensities]
    else:  # one intensity per attribute (check_args: as many, or one for all); each alone, then the sum
        ks = args.intensities * len(vecs) if len(args.intensities) == 1 else args.intensities
        shifts = [(f"{slug(v['attr'])}_{k:g}", k * v["vector"]) for k, v in zip(ks, vecs)]
        shifts.append(("sum", sum(shift for _, shift in shifts)))  # z + sum_a k_a z_att,a
    edits = [decode(model, z + shift, device) for _, shift in shifts]
    save_grid(torch.cat([data.to_float(ds.images[pick]), recon, *edits]), args.out, len(pick))
    if args.save_dir:
        for (folder, _), imgs in zip(shifts, edits):
            with plain_errors():  # one PNG per image, 1-channel images stay grayscale: input for metrics.py
                data.write_pngs(imgs, os.path.join(args.save_dir, folder))
        print(f"wrote {len(pick)} edited images to each of {', '.join(f for f, _ in shifts)} in {args.save_dir}")


def cmd_vector(model, ckpt, args, device):
    """Row 1: decode(k z_att); row 2: decode(mean code without the attribute + k z_att), per intensity k."""
    vec = attribute_vector(model, ckpt, args, device, args.attr)
    ks = torch.tensor(args.intensities).view(-1, 1)
    z = torch.cat([ks * vec["vector"], vec["mean_without"] + ks * vec["vector"]])
    save_grid(decode(model, z, device), args.out, len(ks))


# -----------------------------------------------------------------------------
# Interpolation.

def slerp(a, b, t):
    """Spherical interpolation (White 2016, section 2.2): sin((1-t)W)/sin(W) a + sin(tW)/sin(W) b, where
    W is the angle between a and b; linear where they are (anti)parallel. a, b: N x D, t in [0, 1]."""
    omega = torch.acos((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1, keepdim=True).clamp(-1, 1))
    s = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / s
    return torch.where(s.abs() < 1e-6, (1 - t) * a + t * b, out)


def cmd_interpolate(model, ckpt, args, device):
    """One row per pair: [from image,] --steps decodes along the path, [to image]."""
    if args.from_ is not None:  # get_args checked that --to has as many indices
        need_encoder(model, ckpt, "interpolate --from/--to")
        ds = dataset(ckpt, "test", args.data_root)
        ia, ib = args.from_, args.to
        if not all(0 <= i < len(ds) for i in ia + ib):
            raise EditError(f"--from and --to take indices of the {ds.name} images, each from 0 to {len(ds) - 1}")
        a, b = encode(model, ds.images[ia], device), encode(model, ds.images[ib], device)
        ends = data.to_float(ds.images[ia]), data.to_float(ds.images[ib])
    else:  # two random codes from the prior N(0, I) per row
        g = torch.Generator().manual_seed(args.seed)
        a, b = (torch.randn(args.n, model.latent_dim, generator=g) for _ in range(2))
        ends = None
    path = [slerp(a, b, t) if args.slerp else (1 - t) * a + t * b for t in torch.linspace(0, 1, args.steps).tolist()]
    imgs = decode(model, torch.stack(path, 1).flatten(0, 1), device).unflatten(0, (len(a), args.steps))
    if ends:
        imgs = torch.cat([ends[0][:, None], imgs, ends[1][:, None]], 1)
    save_grid(imgs.flatten(0, 1), args.out, imgs.shape[1])


# -----------------------------------------------------------------------------
# Latent maps.

def pca(x, k=2):
    """(projections N x k, directions k x D, variances k) of the rows of x: eigenvectors of the
    covariance by an exact SVD in float64, each signed so that its largest-magnitude entry is positive."""
    x = x.double()
    centred = x - x.mean(0)
    cov = centred.T @ centred / max(len(x) - 1, 1)
    u, s, _ = torch.linalg.svd(cov)
    dirs = u[:, :k].T
    dirs = dirs * dirs.gather(1, dirs.abs().argmax(1, keepdim=True)).sign()
    return (centred @ dirs.T).float(), dirs.float(), s[:k].float()


def draw_scatter(xy, groups, axes, title, path, size=512, seed=0):
    """Pillow scatter plot: xy N x 2, groups [(label, bool mask)], with axis ranges and a legend."""
    font, legend_w = ImageFont.load_default(), 180
    img = Image.new("RGB", (size + legend_w, size), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = xy.min(0).values, xy.max(0).values
    pad = (hi - lo).clamp(min=1e-6) * 0.04
    lo, hi = lo - pad, hi + pad
    box = (52, 34, size - 12, size - 36)  # plot area: left, top, right, bottom
    px = box[0] + (xy[:, 0] - lo[0]) / (hi[0] - lo[0]) * (box[2] - box[0])
    py = box[3] - (xy[:, 1] - lo[1]) / (hi[1] - lo[1]) * (box[3] - box[1])
    colour = torch.full((len(xy),), -1)
    for g, (_, mask) in enumerate(groups):
        colour[mask] = g
    r = 2 if len(xy) > 1000 else 3
    for i in torch.randperm(len(xy), generator=torch.Generator().manual_seed(seed)).tolist():  # no class on top
        if colour[i] >= 0:
            x, y = px[i].item(), py[i].item()
            draw.ellipse((x - r, y - r, x + r, y + r), fill=metrics.PALETTE[colour[i] % len(metrics.PALETTE)])
    draw.rectangle(box, outline="black")
    draw.text((size // 2, 4), title, fill="black", font=font, anchor="mt")
    draw.text(((box[0] + box[2]) // 2, size - 4), axes[0], fill="black", font=font, anchor="mb")
    draw.text((box[0], box[1] - 4), axes[1], fill="black", font=font, anchor="lb")  # y axis: above it
    for t in range(5):  # tick labels at a quarter of the range apart
        vx, vy = lo + (hi - lo) * t / 4
        x, y = box[0] + (box[2] - box[0]) * t / 4, box[3] - (box[3] - box[1]) * t / 4
        draw.line((x, box[3], x, box[3] + 4), fill="black")
        draw.text((x, box[3] + 6), f"{vx:.3g}", fill="black", font=font, anchor="mt")
        draw.line((box[0] - 4, y, box[0], y), fill="black")
        draw.text((box[0] - 6, y), f"{vy:.3g}", fill="black", font=font, anchor="rm")
    for g, (label, mask) in enumerate(groups):
        y = 28 + 18 * g
        draw.rectangle((size + 8, y, size + 20, y + 12), fill=metrics.PALETTE[g % len(metrics.PALETTE)])
        draw.text((size + 26, y + 6), f"{label} ({int(mask.sum())})", fill="black", font=font, anchor="lm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def cmd_scatter(model, ckpt, args, device):
    """Mean codes of up to --n images in 2-D (two --dims, the plane, or the first two principal directions)."""
    need_encoder(model, ckpt, "scatter")
    need_2d(model, ckpt, args, "scatter")
    ds = dataset(ckpt, "test", args.data_root)
    idx = subset(len(ds), args.n, args.seed)
    mu = encode(model, ds.images[idx], device)
    if args.dims:  # two coordinates of the latent itself
        i, j = args.dims
        xy, axes = mu[:, [i, j]], (f"z{i}", f"z{j}")
    elif mu.shape[1] == 2:
        xy, axes = mu, ("z1", "z2")
    else:
        xy, _, var = pca(mu)
        share = var / mu.var(0).sum()
        axes = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})")
    if args.attr:
        name, mask = attribute(ds, args.attr)
        groups = [(f"not {name}", ~mask[idx]), (name, mask[idx])]
    elif ds.labels is not None:
        labels = ds.labels[idx]
        groups = [(cls, labels == c) for c, cls in enumerate(ds.classes or range(int(labels.max()) + 1))]
    else:
        groups = [(ds.name, torch.ones(len(idx), dtype=torch.bool))]
    title = f"{ckpt['script']} on {ds.name}: {len(idx)} codes of {mu.shape[1]} dims"
    draw_scatter(xy, groups, axes, title, args.out, args.size, args.seed)


def cmd_manifold(model, ckpt, args, device):
    """--grid x --grid decodes of centre + q_c s0 d0 + q_r s1 d1 at Gaussian quantiles q (K&W figure 4):
    the plane itself for a 2-D latent; two chosen axes (--dims) around 0; else the first two principal
    directions of the codes around their mean, scaled by their standard deviations."""
    need_2d(model, ckpt, args, "manifold")
    d = model.latent_dim
    centre, scale = torch.zeros(d), torch.ones(2)
    if d == 2 and not args.dims:
        dirs, what = torch.eye(2), "the latent plane"
    elif args.dims or not hasattr(model, "encode"):
        i, j = args.dims or (0, 1)  # check_args and need_2d checked them
        dirs, what = torch.eye(d)[[i, j]], f"latent dimensions {i} and {j} (the others 0)"
    else:
        ds = dataset(ckpt, "train", args.data_root)
        mu = encode(model, ds.images[subset(len(ds), args.max_images, VECTOR_SEED)], device)
        _, dirs, var = pca(mu)
        centre, scale, what = mu.mean(0), var.sqrt(), f"the first two principal directions of {len(mu)} codes"
    q = torch.special.ndtri((torch.arange(args.grid) + 0.5) / args.grid)  # Gaussian quantiles
    rows, cols = torch.meshgrid(q.flip(0), q, indexing="ij")  # second direction grows upwards
    z = centre + (cols.reshape(-1, 1) * scale[0]) * dirs[0] + (rows.reshape(-1, 1) * scale[1]) * dirs[1]
    save_grid(decode(model, z, device), args.out, args.grid, padding=0)
    print(f"manifold over {what}, {args.grid} x {args.grid} points from {q[0]:.2f} to {q[-1]:.2f} standard deviations")


# -----------------------------------------------------------------------------
# Sampling: the truncation trick, temperature, an ex-post Gaussian mixture prior.

def truncated_normal(base, threshold, seed):
    """The truncation trick (Brock et al. 2019, section 3.1): z ~ N(0, I) with every component whose magnitude
    exceeds the threshold T redrawn until none does, i.e. a normal truncated to [-T, T]. base: the first draw,
    N x D. Each redraw is a whole N x D draw from a generator seeded with `seed`, taken only where a component is
    still out of bounds: every threshold sees the same candidates in the same order, so the columns of a sweep
    compare. After TRUNCATION_ROUNDS redraws (a component is still out with probability P(|z| > T)^100, under
    1e-20 from T = 0.5 on) the rest come from the truncated normal directly, by its inverse CDF (a tiny T ends)."""
    g = torch.Generator().manual_seed(seed)
    z = base.clone()
    for _ in range(TRUNCATION_ROUNDS):
        if not (out := z.abs() > threshold).any():
            return z
        z = torch.where(out, torch.randn(z.shape, generator=g), z)
    out = z.abs() > threshold                          # u ~ U(Phi(-T), Phi(T)), z = Phi^-1(u)
    lo = torch.special.ndtr(torch.tensor(-float(threshold), dtype=torch.float64))
    u = lo + (1 - 2 * lo) * torch.rand(int(out.sum()), generator=g, dtype=torch.float64)
    z[out] = torch.special.ndtri(u).clamp(-threshold, threshold).float()
    return z


def gmm_log_prob(x, gmm):
    """N x K: log pi_k + log N(x_n | mu_k, Sigma_k), through the Cholesky factor Sigma_k = L_k L_k^T:
    log N(x | mu, Sigma) = -1/2 ||L^-1 (x - mu)||^2 - sum_i log L_ii - D/2 log(2 pi)."""
    x = x.double()                                                                  # N x D
    chol = torch.linalg.cholesky(gmm["covs"])                                       # K x D x D
    diff = (x[None] - gmm["means"][:, None]).transpose(1, 2)                        # K x D x N
    maha = torch.linalg.solve_triangular(chol, diff, upper=False).pow(2).sum(1).T   # N x K
    half_logdet = chol.diagonal(dim1=1, dim2=2).log().sum(1)                        # K: log |Sigma_k|^(1/2)
    return gmm["weights"].log() - 0.5 * maha - half_logdet - 0.5 * x.shape[1] * math.log(2 * math.pi)


def fit_gmm(x, k, seed=GMM_SEED, tol=GMM_TOL, max_iter=GMM_MAX_ITER, reg=GMM_REG):
    """A K-component Gaussian mixture with full covariances fitted to the rows of x (N x D) by EM (Dempster
    et al. 1977; Bishop 2006, "Pattern Recognition and Machine Learning" (PRML), section 9.2.2), in float64:
    {"weights" K, "means" K x D, "covs" K x D x D, "loglik": the mean log p(x_n) at each E-step}. The means
    start at k-means++ seeds (Arthur & Vassilvitskii 2007), the covariances at the data's, the weights at
    1/K; EM stops when the mean log-likelihood changes by less than tol of itself."""
    x = x.double()
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=x.dtype)
    # k-means++: the first seed uniformly, each next one with probability proportional to D(x)^2, the
    # squared distance from x to its nearest seed so far.
    means = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, means).pow(2).min(1).values
        p = d2 if d2.sum() > 0 else torch.ones(n, dtype=x.dtype)  # fewer distinct points than seeds
        means = torch.cat([means, x[torch.multinomial(p, 1, generator=g)]])
    centred = x - x.mean(0)
    gmm = {"weights": torch.full((k,), 1 / k, dtype=x.dtype), "means": means,
           "covs": (centred.T @ centred / n + reg * eye).expand(k, d, d).clone()}
    loglik = []
    for _ in range(max_iter):
        # E-step: the responsibilities r_nk = pi_k N(x_n | mu_k, Sigma_k) / sum_j pi_j N(x_n | mu_j, Sigma_j)
        # (PRML eq. 9.23), in logs with log-sum-exp: log r_nk = log pi_k N_k(x_n) - log p(x_n).
        log_p = gmm_log_prob(x, gmm)                                      # N x K
        log_px = torch.logsumexp(log_p, 1)                                # N: log p(x_n) (PRML eq. 9.28)
        loglik.append(log_px.mean().item())
        if len(loglik) > 1 and abs(loglik[-1] - loglik[-2]) <= tol * abs(loglik[-2]):
            break
        r = (log_p - log_px[:, None]).exp()                               # N x K
        # M-step (PRML eqs. 9.24-9.27) with N_k = sum_n r_nk (plus a trifle: an empty component stays finite)
        nk = r.sum(0) + 10 * torch.finfo(x.dtype).eps                     # K
        means = r.T @ x / nk[:, None]                                     # mu_k = sum_n r_nk x_n / N_k
        diff = x[None] - means[:, None]                                   # K x N x D
        covs = (r.T[:, :, None] * diff).transpose(1, 2) @ diff / nk[:, None, None]  # sum_n r_nk dd^T / N_k
        gmm = {"weights": nk / n, "means": means, "covs": covs + reg * eye}         # pi_k = N_k / N
    gmm["loglik"] = torch.tensor(loglik, dtype=torch.float64)
    return gmm


def gmm_sample(gmm, eps, comp, t=1.0):
    """z = mu_c + t L_c eps per row, the component c ~ Cat(pi) given (comp, N) and eps ~ N(0, I) (N x D):
    z ~ sum_k pi_k N(mu_k, t^2 Sigma_k); t = 1 samples the fitted mixture itself."""
    chol = torch.linalg.cholesky(gmm["covs"])                                       # K x D x D
    z = torch.empty(eps.shape, dtype=torch.float64)                                 # N x D
    for k in range(len(chol)):
        rows = comp == k
        z[rows] = gmm["means"][k] + t * eps[rows].double() @ chol[k].T              # mu_k + t L_k eps
    return z.float()


def gmm_prior(model, ckpt, args, device):
    """fit_gmm of --components components to the mean codes of up to --max-images training images (Ghosh et
    al. 2020, section 4: ex-post density estimation), cached in <ckpt dir>/gmm_<K>_<max-images>.pt with the
    checkpoint's step and modification time, so that a newer checkpoint is fitted again."""
    path = beside_ckpt(args, f"gmm_{args.components}_{args.max_images}.pt")
    stamp = [ckpt.get("step"), os.path.getmtime(args.ckpt)]
    try:
        cached = torch.load(path, weights_only=True)
        if cached["ckpt"] == stamp and cached["means"].shape == (args.components, model.latent_dim):
            print(f"GMM prior: {path} (cached)", file=sys.stderr)
            return cached
    except Exception:  # none yet, or unreadable: fit it (again)
        pass
    ds = dataset(ckpt, "train", args.data_root)
    idx = subset(len(ds), args.max_images, VECTOR_SEED)
    if args.components > len(idx):
        raise EditError(f"--components {args.components} is more than the {len(idx)} training images whose codes "
                        f"the mixture would be fitted to; use at most {len(idx)}")
    mu = encode(model, ds.images[idx], device)
    try:
        gmm = fit_gmm(mu, args.components)
    except torch.linalg.LinAlgError:
        raise EditError(f"a mixture of {args.components} Gaussians cannot be fitted to these {len(idx)} codes "
                        f"(a covariance became singular); use fewer --components") from None
    gmm.update(ckpt=stamp, n=len(idx))
    where = path if write_cache(gmm, path) else f"not cached, as {path} cannot be written"
    normal = (-0.5 * mu.double().pow(2).sum(1) - 0.5 * mu.shape[1] * math.log(2 * math.pi)).mean()
    print(f"GMM prior: {args.components} components fitted to the mean codes of {len(idx)} training images in "
          f"{len(gmm['loglik'])} EM iterations; mean log-likelihood of those codes {gmm['loglik'][-1]:.3f} "
          f"(under N(0, I): {normal:.3f}): {where}", file=sys.stderr)
    return gmm


def reference(args, ckpt):
    """(the --ref set's statistics and features, the namespace and lazily loaded network that metrics.py's
    functions take), read as `metrics.py --ref REF` reads it (a dataset's are cached in DATA_ROOT/cache)."""
    margs = argparse.Namespace(ref=args.ref, n=None, lapvar_only=False, batch_size=50, splits=metrics.IS_SPLITS,
                               data_root=args.data_root or ckpt["args"].get("data_root", "data"))
    net = metrics.LazyInception(args.weights, args.device)
    with plain_errors():
        return metrics.evaluate_set(args.ref, metrics.open_set(args.ref, margs), margs, net), margs, net


class Measure:
    """{n, lapvar, and with ref = reference(): fid, kid, kid_std, precision, recall} of [-1, 1] images added batch
    by batch, by metrics.py on the uint8 pixels data.write_pngs writes; only their features are kept."""

    def __init__(self, label, ref):
        self.label, self.ref, self.pool3, self.lapvar = label, ref, [], []

    def add(self, images):
        net = self.ref[2] if self.ref else None
        with plain_errors():
            out = metrics.compute_features(data.to_uint8(images), net() if net else None, lapvar=True,
                                           device=net.device if net else "cpu", name=self.label, progress=False)
        self.lapvar.append(out["lapvar"])
        if net:
            self.pool3.append(out["pool3"].astype("float32"))

    def result(self):
        lapvar = np.concatenate(self.lapvar)
        result = {"n": len(lapvar), "lapvar": float(lapvar.mean())}
        if self.ref:
            ref_stats, margs, net = self.ref
            features = np.concatenate(self.pool3)
            with plain_errors():
                mu, sigma = metrics.stats_from_features(features)
                stats = {"mu": mu, "sigma": sigma, "features": features}
                result.update(metrics.compare_to_reference(self.label, stats, ref_stats, margs, net.device))
        return result


def save_columns(grids, labels, path, grey):
    """Grids (3 x H x W in [0, 1], from make_grid) side by side, GAP pixels apart, each under its label;
    grey: of 1-channel images, written as a grey PNG."""
    h, w = grids[0].shape[1:]
    canvas = Image.new("L" if grey else "RGB", (len(grids) * w + (len(grids) - 1) * GAP, LABEL_H + h), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (grid, label) in enumerate(zip(grids, labels)):
        x = i * (w + GAP)
        pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)  # as save_image rounds
        canvas.paste(to_pil_image(pixels[:1] if grey else pixels), (x, LABEL_H))
        draw.text((x + w // 2, LABEL_H // 2), label, fill="black", font=font, anchor="mm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def discriminator(ckpt, device):
    """A GAN checkpoint's discriminator, in eval mode (--d-filter)."""
    _, D = importlib.import_module(ckpt["script"]).build(ckpt["args"])
    D.load_state_dict(ckpt["D"])
    return D.to(device).eval()


def sweep(model, ckpt, args, device):
    """[(label, folder, z m x D or None for the reconstructions, truncation T or None, D-filter P or None)]: the
    settings of a sample sweep, every one from the same base noise (m = max(--grid^2, --n) draws from --seed)."""
    m = max(args.grid ** 2, args.n)
    g = torch.Generator().manual_seed(args.seed)
    base = torch.randn(m, model.latent_dim, generator=g)  # m x D, the same noise for every setting
    settings = []
    if not hasattr(model, "encode"):  # a GAN: truncation thresholds, each with every D-filter
        for T in args.truncation or [None]:
            z = base if T is None else truncated_normal(base, T, args.seed + 1)
            name = "untruncated" if T is None else f"truncation_{T:g}"
            for P in args.d_filter or [None]:
                label = ("untruncated" if T is None else f"T = {T:g}") + ("" if P is None else f", D >= {P:g}")
                folder = (name if T is not None or P is None else "") + ("" if P is None else f"-dfilter-{P:g}")
                settings.append((label, folder.strip("-"), z, T, P))
        return settings
    priors = args.prior or ([] if args.recon and not args.temperature else ["normal"])
    gmm = gmm_prior(model, ckpt, args, device) if "gmm" in priors else None
    comp = torch.multinomial(gmm["weights"], m, replacement=True, generator=g) if gmm else None  # c ~ Cat(pi)
    for prior in priors:
        for t in args.temperature or [1.0]:
            name, folder = (("N(0, I)", "normal") if prior == "normal"
                            else (f"GMM-{args.components}", f"gmm{args.components}"))
            label, folder = (f"{name}, t = {t:g}", f"{folder}_t{t:g}") if args.temperature else (name, folder)
            # z ~ N(0, t^2 I) = t eps; or the mixture with its covariances scaled by t^2
            settings.append((label, folder, t * base if prior == "normal" else gmm_sample(gmm, base, comp, t),
                             None, None))
    if args.recon:  # decode(mu) of the first held-out images: how the CIFAR-10 report scored its VAE
        settings.append(("reconstructions", "recon", None, None, None))
    return settings


def images_of(model, z, T, p, D, args, device, held_out):
    """Yields (images in [-1, 1] on the CPU, how many z were drawn so far), BATCH at a time: decode(z); with a
    D-filter p only those sigmoid(D(G(z))) >= p (as the CelebA GAN report showed its DCGAN's), drawing fresh z
    (truncated as z) after z; decode(mu(x)) of the held-out images when z is None."""
    if z is None:
        for i in range(0, len(held_out), BATCH):
            yield decode(model, encode(model, held_out[i:i + BATCH], device), device), i + BATCH
        return
    drawn = 0
    while drawn < len(z) or p is not None:
        chunk = z[drawn:drawn + BATCH]
        if len(chunk) == 0:  # z is used up: fresh draws, truncated as z was
            chunk = torch.randn(BATCH, z.shape[1], generator=torch.Generator().manual_seed(args.seed + 2 + drawn))
            chunk = chunk if T is None else truncated_normal(chunk, T, args.seed + 3 + drawn)
        x, drawn = decode(model, chunk, device), drawn + len(chunk)
        if p is not None:
            with torch.no_grad():
                x = x[torch.sigmoid(D(x.to(device)).float()).cpu() >= p]   # D's logit -> probability of "real"
        yield x, drawn


def held_out_images(ckpt, args):
    """--recon: the first max(--grid^2, --n) held-out images, whose reconstructions are a setting of the sweep."""
    if not data.has_test_split(ckpt["args"].get("data")):
        raise EditError(f"--recon reconstructs held-out images and {ckpt['args'].get('data')} has no held-out "
                        f"split; use a checkpoint trained on one of {', '.join(data.DATASETS)}")
    images = dataset(ckpt, "test", args.data_root).images
    if args.n > len(images):
        raise EditError(f"--recon --n {args.n} asks for more reconstructions than the {len(images)} held-out "
                        f"images; ask for at most {len(images)}")
    return images[:max(args.grid ** 2, args.n)]


def cmd_sample(model, ckpt, args, device):
    """One --grid x --grid grid per setting of sweep(), side by side; --out-dir: --n single PNGs per setting in
    DIR/<setting>/, written as they are made; --json: each setting's Measure."""
    gan = not hasattr(model, "encode")
    if gan and (args.temperature or args.prior or args.recon):
        raise EditError(f"--temperature, --prior and --recon are for the VAE checkpoints and {ckpt['script']}.py is a "
                        f"GAN; use --truncation or --d-filter")
    if not gan and (args.truncation or args.d_filter):
        raise EditError(f"--truncation and --d-filter are for the GAN checkpoints (dcgan.py, mlp_gan.py) and "
                        f"{ckpt['script']}.py has a VAE's prior; use --temperature, --prior or --recon")
    held_out = held_out_images(ckpt, args) if args.recon else None
    ref = reference(args, ckpt) if args.ref else None  # a bad reference fails before the sampling
    D = discriminator(ckpt, device) if args.d_filter else None
    grids, labels, folders, results, m = [], [], [], {}, max(args.grid ** 2, args.n)
    for label, folder, z, T, p in sweep(model, ckpt, args, device):
        shown, done, passed, measure = [], 0, 0, Measure(label, ref) if args.json else None
        path = os.path.join(args.out_dir or "", folder)
        labels.append(label), folders.append(folder)
        for x, drawn in images_of(model, z, T, p, D, args, device, held_out):
            passed, x = passed + len(x), x[:m - done]
            shown.append(x[:max(0, args.grid ** 2 - done)])
            if args.out_dir and done < args.n:
                with plain_errors():
                    data.write_pngs(x[:args.n - done], path, first=done)
            if measure and done < args.n:
                measure.add(x[:args.n - done])
            done += len(x)
            if done >= m:
                break
            if p is not None and drawn >= D_FILTER_PATIENCE and passed < 0.01 * drawn:
                raise EditError(f"--d-filter {p:g}: the discriminator passed only {passed} of {drawn} samples, so it "
                                f"rejects almost everything (a collapsed or over-confident D); {min(done, args.n)} of "
                                f"{args.n} were written to {path}; lower --d-filter or use another checkpoint")
        if p is not None:
            print(f"--d-filter {p:g}: the discriminator passed {passed} of {drawn} samples "
                  f"({100 * passed / drawn:.1f}%)", file=sys.stderr)
        images = torch.cat(shown)
        grids.append(vutils.make_grid(images, nrow=args.grid, normalize=True, value_range=(-1, 1)))
        if measure:
            results[label] = measure.result()
    save_columns(grids, labels, args.out, grey=images.shape[1] == 1)
    if args.out_dir:
        print(f"wrote {args.n} images to each of {', '.join(folders)} in {args.out_dir}", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics.json_safe(results), indent=2, allow_nan=False))


HELP = {"attribute": "originals without an attribute (or several), their reconstructions or a GAN's inversions, "
                     "and decode(z + k z_att)",
        "vector": "decode(k z_att) and decode(mean code without the attribute + k z_att)",
        "interpolate": "decodes along paths between two held-out images' codes or two random codes",
        "scatter": "the codes of held-out images in 2-D (the latent, two dimensions or its PCA), coloured by class "
                   "or attribute",
        "manifold": "decodes of a grid over the latent plane, two dimensions, or two principal directions",
        "sample": "sample grids side by side for a sweep of truncations and D-filters (GANs) or of priors, "
                  "temperatures and held-out reconstructions (VAEs); single PNGs and their FID, KID, P/R"}
COMMANDS = {"attribute": cmd_attribute, "vector": cmd_vector, "interpolate": cmd_interpolate,
            "scatter": cmd_scatter, "manifold": cmd_manifold, "sample": cmd_sample}


# -----------------------------------------------------------------------------

def numbers(kind, count=None):
    """argparse type: comma-separated finite numbers of a kind (float or int), count of them if given."""
    what = "integers" if kind is int else "numbers"

    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
        if not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} holds a value that is not a finite number")
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{text!r} is not {count} comma-separated {what}")
        return values
    return parse


def thresholds(text):
    """argparse type of --truncation: comma-separated finite numbers, 'none' (no truncation) among them."""
    return [None if v.strip().lower() == "none" else numbers(float)(v)[0] for v in text.split(",")]


def unwritable(path, folder=False):
    """Why an output file (folder=True: a folder to fill) cannot be written at path, or None."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return "it is a file, not a folder"
    if not folder and os.path.isdir(path):
        return f"it is a folder; name a file in it, such as {os.path.join(path, 'edit.png')}"
    if not folder and Image.registered_extensions().get(os.path.splitext(path)[1].lower()) not in Image.SAVE:
        return "its extension is not an image format Pillow writes; end it in .png"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest folder that exists: the rest is created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def check_args(args):
    """Every flag at once, before the checkpoint or any data is read; resolves args.device."""
    for flag, least in (("n", 0 if args.command == "sample" else 1), ("steps", 2), ("grid", 1), ("max_images", 1),
                        ("size", 100), ("inversion_steps", 0), ("restarts", 1), ("components", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < least:
            raise EditError(f"--{flag.replace('_', '-')} must be at least {least}")
    names = getattr(args, "attr", None) and args.attr.split(",")
    if names and args.command in ("scatter", "vector") and len(names) > 1:
        raise EditError(f"{args.command} takes one attribute, not {len(names)}")
    if names and len(names) > 1 and len(args.intensities) not in (1, len(names)):
        raise EditError(f"--attr names {len(names)} attributes, so --intensities needs {len(names)} values (one "
                        f"per attribute, added) or one for all")
    if args.command == "sample":
        if any(t is not None and t <= 0 for t in args.truncation or []):
            raise EditError("--truncation thresholds must be positive (or none): |z_i| > T is redrawn")
        if any(t <= 0 for t in args.temperature or []):
            raise EditError("--temperature values must be positive: z ~ N(0, t^2 I)")
        if args.prior and not set(args.prior) <= {"normal", "gmm"}:
            raise EditError(f"--prior takes normal, gmm or normal,gmm, not {','.join(args.prior)}")
        if any(not 0 <= p < 1 for p in args.d_filter or []):
            raise EditError("--d-filter values are probabilities in [0, 1): D(G(z)) >= P is written")
        if (args.truncation or args.d_filter) and (args.temperature or args.prior or args.recon):
            raise EditError("--truncation and --d-filter (GAN checkpoints) and --temperature, --prior or --recon "
                            "(VAE checkpoints) do not go together")
        if args.out_dir and args.n < 1:
            raise EditError("--out-dir needs --n, the number of samples to write per setting")
        if args.json and args.n < 2:
            raise EditError("--json needs --n of at least 2 samples per setting to measure")
        if args.ref and not args.json:
            raise EditError("--ref is the reference of --json's FID, KID, precision and recall; add --json")
        if args.weights and not args.ref:
            raise EditError("--weights is the FID network of --ref; add --ref")
        if args.weights and not os.path.isfile(args.weights):
            raise EditError(f"the weights file {args.weights} does not exist; pass the path of "
                            f"{metrics.FID_WEIGHTS_FILE} with --weights")
    if args.command == "interpolate":
        if (args.from_ is None) != (args.to is None):
            raise EditError("interpolating between dataset images needs both --from and --to")
        if args.from_ is not None and len(args.from_) != len(args.to):
            raise EditError("--from and --to need the same number of comma-separated indices")
    if getattr(args, "dims", None) and args.dims[0] == args.dims[1]:
        raise EditError("--dims needs two different latent dimensions")
    with plain_errors():
        args.device = data.resolve_device(args.device)
    for flag, folder in (("out", False), ("save_dir", True), ("out_dir", True)):
        path = getattr(args, flag, None)
        why = path and unwritable(path, folder)
        if why:
            raise EditError(f"--{flag.replace('_', '-')} {path} cannot be written: {why}")


def attribute_flags(s, name):
    """The flags of attribute and vector."""
    s.add_argument("--attr", required=True,
                   help="CelebA attribute, class name or number, or a column of the folder's attributes.csv"
                        + ("; several, comma-separated, add their vectors" if name == "attribute" else ""))
    s.add_argument("--max-images", type=int, default=None,
                   help=f"training images averaged for z_att (default 10000; a GAN's {GAN_MAX_IMAGES}: "
                        f"each is inverted)")
    k = s.add_mutually_exclusive_group()
    k.add_argument("--intensity", type=numbers(float, 1), dest="intensities", metavar="K",
                   help="one multiple k of z_att")
    k.add_argument("--intensities", type=numbers(float), metavar="K,K,...",
                   help="multiples k of z_att, one row each; with several --attr, one per attribute "
                        "(a negative first one needs '=': --intensities=-1,0,1)")
    s.set_defaults(intensities=[2.5] if name == "attribute" else [0, 1, 2, 2.5, 3])
    s.add_argument("--inversion-steps", type=int, default=200,
                   help="GAN checkpoints: Adam steps of each image's inversion into z")
    s.add_argument("--restarts", type=int, default=2,
                   help="GAN checkpoints: starting codes per inverted image, the best one kept")
    if name == "attribute":
        s.add_argument("--n", type=int, default=8, help="originals without the attribute(s) (columns)")
        s.add_argument("--save-dir", default=None,
                       help="also write each edit row to DIR/intensity_<k>/ (several --attr: DIR/<attr>_<k>/, "
                            "DIR/sum/) as NNNNNN.png")


def sample_flags(s):
    s.add_argument("--truncation", type=thresholds, default=None, metavar="T,T,...",
                   help="GAN checkpoints: a grid per threshold T > 0, z ~ N(0, I) with |z_i| > T redrawn "
                        "(none: untruncated)")
    s.add_argument("--temperature", type=numbers(float), default=None, metavar="t,t,...",
                   help="VAE checkpoints: a grid per temperature t > 0, z ~ N(0, t^2 I) (a GMM: covariances times t^2)")
    s.add_argument("--d-filter", type=numbers(float), default=None, metavar="P,P,...",
                   help="GAN checkpoints: a grid per probability P in [0, 1), of the samples the discriminator passes "
                        "as real, sigmoid(D(G(z))) >= P (with --truncation: of the truncated z)")
    s.add_argument("--prior", type=lambda text: text.lower().split(","), default=None, metavar="normal,gmm",
                   help="VAE checkpoints: N(0, I) (the default), a Gaussian mixture fitted to the training images' "
                        "mean codes, or both")
    s.add_argument("--recon", action="store_true",
                   help="VAE checkpoints: the reconstructions decode(mu(x)) of the first held-out images as a "
                        "setting of its own (how the CIFAR-10 report scored its VAE); alone, without prior samples")
    s.add_argument("--components", type=int, default=10, help="Gaussians of --prior gmm (full covariances)")
    s.add_argument("--max-images", type=int, default=10000,
                   help="training images whose mean codes --prior gmm is fitted to")
    s.add_argument("--grid", type=int, default=8, help="samples per side of each setting's grid")
    s.add_argument("--n", type=int, default=0, help="samples per setting for --out-dir and --json")
    s.add_argument("--out-dir", default=None, help="write each setting's --n samples to DIR/<setting>/NNNNNN.png "
                   "(untruncated, truncation_T, dfilter-P, normal, normal_tT, gmmK, recon, ...)")
    s.add_argument("--json", action="store_true",
                   help="print each setting's Laplacian variance, and with --ref its FID, KID, precision and recall")
    s.add_argument("--ref", default=None,
                   help="reference set of --json, as metrics.py --ref: folder, dataset name, .npy features, .npz")
    s.add_argument("--weights", default=None, help=f"{metrics.FID_WEIGHTS_FILE} for --ref (default: torch.hub's cache)")


def get_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="ckpt.pt of dcgan, mlp_gan, vae_conv, mlp_vae or vaegan")
    common.add_argument("--out", default=None, help="output PNG; default <ckpt dir>/edit_<command>[_<attr>].png")
    common.add_argument("--seed", type=int, default=0, help="picks the images and random codes shown")
    common.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    common.add_argument("--data-root", default=None, help="where the dataset lives; default: the checkpoint's")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def command(name):
        return sub.add_parser(name, parents=[common], formatter_class=fmt, help=HELP[name], description=HELP[name])

    attribute_flags(command("attribute"), "attribute")
    attribute_flags(command("vector"), "vector")
    s = command("interpolate")
    s.add_argument("--from", dest="from_", type=numbers(int), default=None, metavar="I[,I,...]",
                   help="index (or comma-separated indices) of the start image(s); held-out split where there is one")
    s.add_argument("--to", type=numbers(int), default=None, metavar="I[,I,...]",
                   help="index (or indices) of the end image(s)")
    s.add_argument("--n", type=int, default=4, help="rows of random code pairs, without --from/--to")
    s.add_argument("--steps", type=int, default=8, help="decodes along each path, ends included")
    s.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    s = command("scatter")
    s.add_argument("--n", type=int, default=2000, help="images encoded (held-out split where there is one)")
    s.add_argument("--attr", default=None, help="colour by this attribute or class instead of by class")
    s.add_argument("--dims", type=numbers(int, 2), default=None, metavar="I,J",
                   help="plot latent dimensions I and J (default: the plane, or the first two principal directions)")
    s.add_argument("--size", type=int, default=512,
                   help="plot height in pixels, at least 100 (the legend adds 180 to the width)")
    s = command("manifold")
    s.add_argument("--grid", type=int, default=20, help="decodes per side")
    s.add_argument("--dims", type=numbers(int, 2), default=None, metavar="I,J",
                   help="two latent dimensions I,J to vary (default: the plane, or the first two principal directions)")
    s.add_argument("--max-images", type=int, default=10000, help="training images for the principal directions")
    sample_flags(command("sample"))
    args = p.parse_args(argv)
    if args.out is None:
        attr = slug(getattr(args, "attr", None) or "").lower()
        args.out = beside_ckpt(args, f"edit_{args.command}{'_' + attr if attr else ''}.png")
    try:
        check_args(args)
    except EditError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    try:
        model, ckpt = load(args.ckpt, args.device)
        COMMANDS[args.command](model, ckpt, args, args.device)
    except EditError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        data.interrupted(f"before {args.out} was written")
    print(f"wrote {args.out}", file=sys.stderr if getattr(args, "json", False) else sys.stdout)  # stdout: the JSON
    return args.out


if __name__ == "__main__":
    main()
