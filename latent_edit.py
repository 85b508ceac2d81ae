"""latent_edit.py: attribute vectors, interpolation and latent maps of a trained model.

One command per picture of the latent-space reports, from the ckpt.pt of any of the five scripts
(the encoder's mean code mu stands for an image):

* attribute: z_att = mean code of images with an attribute - mean code of those without; faces
  without it, reconstructed and decoded from z + k * z_att (White 2016, "Sampling Generative
  Networks", arXiv:1609.04468, section 2.4; Larsen et al. 2016, "Autoencoding beyond pixels using a
  learned similarity metric", arXiv:1512.09300, section 5).
* vector: z_att decoded alone and added to the mean code of the images without the attribute.
* interpolate: linear or spherical (slerp, White 2016 section 2.2) paths between two codes.
* scatter: the codes in 2-D (the latent itself, or a PCA projection), coloured by class or attribute.
* manifold: decoded grid over a 2-D latent plane (Kingma & Welling 2014, "Auto-Encoding Variational
  Bayes", arXiv:1312.6114, figure 4), or over two dimensions / principal directions of a larger one.

    python latent_edit.py attribute --ckpt runs/vae_conv-celeba/ckpt.pt --attr Smiling --intensities 0,1,2,2.5,3
    python latent_edit.py vector --ckpt runs/vaegan-celeba/ckpt.pt --attr Eyeglasses
    python latent_edit.py interpolate --ckpt runs/vae_conv-celeba/ckpt.pt --from 0 --to 1 --slerp
    python latent_edit.py scatter --ckpt runs/mlp_vae-mnist/ckpt.pt
    python latent_edit.py manifold --ckpt runs/mlp_vae-mnist/ckpt.pt --grid 20

Images come from data.py with the checkpoint's own settings (dataset, size, channels, crop); edited
originals, interpolation ends and scatter points from the held-out split when the dataset has one.
"""
import argparse
import difflib
import importlib
import math
import os
import pickle
import re
import sys
import warnings

import torch
import torch.nn.functional as F
import torchvision.utils as vutils
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_pil_image

import data
import metrics

SCRIPTS = ("dcgan", "mlp_gan", "vae_conv", "mlp_vae", "vaegan")  # the last three have an encoder
BATCH = 256          # images per encode/decode call
VECTOR_SEED = 0      # the subset of training images behind an attribute vector (not --seed: cached)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # matplotlib's tab10


class EditError(Exception):
    """An expected failure; str(e) is one plain sentence for the user."""


# -----------------------------------------------------------------------------
# Model, data, codes.

def read_checkpoint(path):
    """The dict a model script saved in path, read with weights_only=True so that nothing in the file can
    run. Any other file is an EditError saying what it is; PyTorch's own message is never passed on, as
    it advises loading the file unsafely."""
    use = "pass the ckpt.pt that a model script wrote to its --out folder"
    if os.path.isdir(path):
        raise EditError(f"{path} is a folder, not a checkpoint; pass the ckpt.pt inside it")
    if not os.path.exists(path):
        raise EditError(f"{path} does not exist; {use}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)  # what kind of file it is, for the messages below
    except OSError as e:
        raise EditError(f"cannot read {path} ({e.strerror})") from None
    if not head:
        raise EditError(f"{path} is empty (0 bytes) and not a checkpoint; a model script writes ckpt.pt "
                        f"at the end of each epoch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch warns about some pickle protocols
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if head.startswith((b"PK", b"\x80")):  # a torch.save zip or a pickle, holding more than tensors
            raise EditError(f"{path} is not a checkpoint written by this project's scripts and may be unsafe "
                            f"to load; nothing in it was run") from None
        raise EditError(f"{path} is not a PyTorch checkpoint; {use}") from None
    except Exception:  # PyTorch raises many kinds for a file it cannot parse
        if head.startswith(b"PK"):
            raise EditError(f"{path} is a damaged or truncated checkpoint (or another zip archive); {use}") from None
        raise EditError(f"{path} is not a PyTorch checkpoint; {use}") from None
    scripts = ", ".join(s + ".py" for s in SCRIPTS)
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise EditError(f"{path} holds a {type(ckpt).__name__} without a 'script' entry, so it was not written "
                        f"by one of {scripts} and there is no model to rebuild from it")
    if ckpt["script"] not in SCRIPTS:
        raise EditError(f"{path} was not written by one of {scripts} (its script is {ckpt['script']!r}), "
                        f"so there is no model to rebuild from it")
    if not isinstance(ckpt.get("args"), dict):
        raise EditError(f"{path} has no settings ('args') to rebuild the {ckpt['script']}.py model from")
    return ckpt


def load(path, device):
    """(model, checkpoint dict): the model from its own script's load_model, in eval mode."""
    ckpt = read_checkpoint(path)
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


def need_encoder(model, ckpt, what):
    if not hasattr(model, "encode"):
        raise EditError(f"{what} needs an encoder and a {ckpt['script']}.py checkpoint has only a generator; "
                        f"use a checkpoint of vae_conv.py, mlp_vae.py or vaegan.py")


def need_2d(model, ckpt, what):
    if model.latent_dim < 2:
        raise EditError(f"a {what} needs a latent of at least 2 dimensions and this {ckpt['script']}.py model "
                        f"has {model.latent_dim}")


def dataset(ckpt, split, root=None):
    """The checkpoint's dataset with its training settings; 'test' falls back to 'train' where there is none."""
    cfg = ckpt["args"]
    if not cfg.get("data"):
        raise EditError("the checkpoint does not say which dataset it was trained on (no 'data' in its args)")
    split = split if data.has_test_split(cfg["data"]) else "train"
    try:
        return data.load(cfg["data"], root=root or cfg.get("data_root", "data"), split=split,
                         img_size=cfg.get("img_size"), channels=cfg.get("channels"), crop=cfg.get("crop"))
    except data.DataError as e:
        raise EditError(str(e)) from None


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


def save_grid(images, path, nrow, padding=2):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vutils.save_image(images, path, nrow=nrow, padding=padding, normalize=True, value_range=(-1, 1))


def save_pngs(images, folder):
    """One PNG per image (000000.png, ...), 1-channel images stay grayscale: input for metrics.py."""
    os.makedirs(folder, exist_ok=True)
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    for i, img in enumerate(u8):
        to_pil_image(img).save(os.path.join(folder, f"{i:06d}.png"))


# -----------------------------------------------------------------------------
# Attributes and attribute vectors.

def attribute(ds, name):
    """(canonical name, bool mask over ds) of an attribute column (CelebA's 40, a folder's CSV, fake's)
    or a class; case-insensitive, and MNIST's class '7 - seven' answers to '7' and 'seven' too."""
    if ds.attrs is None and ds.labels is None:
        raise EditError(f"the {ds.name} images have neither attributes nor class labels (a folder needs an "
                        f"attributes.csv), so there is nothing to build an attribute vector from")
    choices = {}
    for j, a in enumerate(ds.attr_names or []):
        choices[a.lower()] = (a, lambda j=j: ds.attrs[:, j].bool())
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


def attribute_vector(model, ckpt, args, device):
    """{"vector", "mean_with", "mean_without", "n_with", "n_without", "attr", "ckpt_step"} over the mean
    codes of up to --max-images training images, cached in <ckpt dir>/attr_<name>_<max-images>.pt
    (recomputed when the checkpoint's step changes)."""
    ds = dataset(ckpt, "train", args.data_root)
    name, mask = attribute(ds, args.attr)
    slug = re.sub(r"\W+", "_", name).strip("_")
    path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"attr_{slug}_{args.max_images}.pt")
    try:
        cached = torch.load(path, weights_only=True)
        if cached["ckpt_step"] == ckpt.get("step") and cached["attr"] == name \
                and cached["vector"].shape == (model.latent_dim,):
            print(f"attribute vector of {name}: {path} (cached)")
            return cached
    except Exception:  # none yet, or unreadable: compute it (again)
        pass
    idx = subset(len(ds), args.max_images, VECTOR_SEED)
    mask = mask[idx]
    if not mask.any() or mask.all():
        raise EditError(f"{'none' if not mask.any() else 'every one'} of the {len(idx)} training images used "
                        f"has {name}, so there is no difference of means to take")
    mu = encode(model, ds.images[idx], device)
    mean_with, mean_without = mu[mask].mean(0), mu[~mask].mean(0)
    vec = {"vector": mean_with - mean_without, "mean_with": mean_with, "mean_without": mean_without,
           "n_with": int(mask.sum()), "n_without": int((~mask).sum()), "attr": name, "ckpt_step": ckpt.get("step")}
    try:
        torch.save(vec, path + ".tmp")
        os.replace(path + ".tmp", path)
        where = path
    except (OSError, RuntimeError):  # a read-only folder, say: the vector is used, just not cached
        where = f"not cached, as {path} cannot be written"
    print(f"attribute vector of {name} from {vec['n_with']} images with and {vec['n_without']} without "
          f"(|z_att| = {vec['vector'].norm():.3f}): {where}")
    return vec


def cmd_attribute(model, ckpt, args, device):
    """Rows: originals without the attribute, their reconstructions, decode(mu + k z_att) per intensity k."""
    need_encoder(model, ckpt, "attribute")
    vec = attribute_vector(model, ckpt, args, device)
    ds = dataset(ckpt, "test", args.data_root)
    _, mask = attribute(ds, vec["attr"])
    pool = (~mask).nonzero().flatten()
    if len(pool) == 0:
        raise EditError(f"every {ds.name} image there is to edit has {vec['attr']}, so there is no original without it")
    pick = pool[subset(len(pool), args.n, args.seed)]
    mu = encode(model, ds.images[pick], device)
    edits = [decode(model, mu + k * vec["vector"], device) for k in args.intensities]
    save_grid(torch.cat([data.to_float(ds.images[pick]), decode(model, mu, device), *edits]), args.out, len(pick))
    if args.save_dir:
        for k, imgs in zip(args.intensities, edits):
            save_pngs(imgs, os.path.join(args.save_dir, f"intensity_{k:g}"))
        print(f"wrote {len(pick)} edited images per intensity to {args.save_dir}/intensity_*/")


def cmd_vector(model, ckpt, args, device):
    """Row 1: decode(k z_att); row 2: decode(mean code without the attribute + k z_att), per intensity k."""
    need_encoder(model, ckpt, "vector")
    vec = attribute_vector(model, ckpt, args, device)
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
            draw.ellipse((x - r, y - r, x + r, y + r), fill=PALETTE[colour[i] % len(PALETTE)])
    draw.rectangle(box, outline="black")
    draw.text((size // 2, 4), title, fill="black", font=font, anchor="mt")
    draw.text(((box[0] + box[2]) // 2, size - 4), axes[0], fill="black", font=font, anchor="mb")
    draw.text((box[0], box[1] - 4), axes[1], fill="black", font=font, anchor="lb")  # y axis: above it
    for t in range(5):  # tick labels at a quarter of the range apart
        vx, vy = lo + (hi - lo) * t / 4
        x = box[0] + (box[2] - box[0]) * t / 4
        y = box[3] - (box[3] - box[1]) * t / 4
        draw.line((x, box[3], x, box[3] + 4), fill="black")
        draw.text((x, box[3] + 6), f"{vx:.3g}", fill="black", font=font, anchor="mt")
        draw.line((box[0] - 4, y, box[0], y), fill="black")
        draw.text((box[0] - 6, y), f"{vy:.3g}", fill="black", font=font, anchor="rm")
    for g, (label, mask) in enumerate(groups):
        y = 28 + 18 * g
        draw.rectangle((size + 8, y, size + 20, y + 12), fill=PALETTE[g % len(PALETTE)])
        draw.text((size + 26, y + 6), f"{label} ({int(mask.sum())})", fill="black", font=font, anchor="lm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def cmd_scatter(model, ckpt, args, device):
    """Mean codes of up to --n images in 2-D, coloured by --attr, else by class, else one colour."""
    need_encoder(model, ckpt, "scatter")
    need_2d(model, ckpt, "scatter")
    ds = dataset(ckpt, "test", args.data_root)
    idx = subset(len(ds), args.n, args.seed)
    mu = encode(model, ds.images[idx], device)
    if mu.shape[1] == 2:
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
    need_2d(model, ckpt, "manifold")
    d = model.latent_dim
    centre, scale = torch.zeros(d), torch.ones(2)
    if d == 2 and not args.dims:
        dirs, what = torch.eye(2), "the latent plane"
    elif args.dims or not hasattr(model, "encode"):
        i, j = args.dims or (0, 1)  # get_args checked that they differ
        if not (0 <= i < d and 0 <= j < d):
            raise EditError(f"--dims needs two different latent dimensions from 0 to {d - 1}")
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


HELP = {"attribute": "originals without an attribute, their reconstructions, and decode(mu + k z_att)",
        "vector": "decode(k z_att) and decode(mean code without the attribute + k z_att)",
        "interpolate": "decodes along paths between two held-out images' codes or two random codes",
        "scatter": "the codes of held-out images in 2-D (the latent or its PCA), coloured by class or attribute",
        "manifold": "decodes of a grid over the latent plane, two dimensions, or two principal directions"}
COMMANDS = {"attribute": cmd_attribute, "vector": cmd_vector, "interpolate": cmd_interpolate,
            "scatter": cmd_scatter, "manifold": cmd_manifold}


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


def resolve_device(name):
    """--device as a torch.device that this machine has (metrics.resolve_device, plus MPS and CUDA indices)."""
    try:
        device = metrics.resolve_device(name)
    except metrics.MetricsError as e:
        raise EditError(str(e)) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise EditError(f"--device {name} is not one latent_edit.py runs on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EditError(f"--device {name} was asked for but MPS is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EditError(f"--device {name} was asked for but there are only {torch.cuda.device_count()} CUDA "
                        f"devices; use --device cuda:0")
    return device


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
    for flag, least in (("n", 1), ("steps", 2), ("grid", 1), ("max_images", 1), ("size", 100)):
        if getattr(args, flag, least) < least:
            raise EditError(f"--{flag.replace('_', '-')} must be at least {least}")
    if args.command == "interpolate":
        if (args.from_ is None) != (args.to is None):
            raise EditError("interpolating between dataset images needs both --from and --to")
        if args.from_ is not None and len(args.from_) != len(args.to):
            raise EditError("--from and --to need the same number of comma-separated indices")
    if getattr(args, "dims", None) and args.dims[0] == args.dims[1]:
        raise EditError("--dims needs two different latent dimensions")
    args.device = resolve_device(args.device)
    for flag, folder in (("out", False), ("save_dir", True)):
        path = getattr(args, flag, None)
        why = path and unwritable(path, folder)
        if why:
            raise EditError(f"--{flag.replace('_', '-')} {path} cannot be written: {why}")


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

    for name, default in (("attribute", [2.5]), ("vector", [0, 1, 2, 2.5, 3])):
        s = command(name)
        s.add_argument("--attr", required=True,
                       help="CelebA attribute, class name or number, or a column of the folder's attributes.csv")
        s.add_argument("--max-images", type=int, default=10000, help="training images averaged for z_att")
        k = s.add_mutually_exclusive_group()
        k.add_argument("--intensity", type=numbers(float, 1), dest="intensities", metavar="K",
                       help="one multiple k of z_att")
        k.add_argument("--intensities", type=numbers(float), metavar="K,K,...",
                       help="multiples k of z_att (a negative first one needs '=': --intensities=-1,0,1)")
        s.set_defaults(intensities=default)
        if name == "attribute":
            s.add_argument("--n", type=int, default=8, help="originals without the attribute (columns)")
            s.add_argument("--save-dir", default=None, help="also write each edit to DIR/intensity_<k>/NNNNNN.png")
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
    s.add_argument("--size", type=int, default=512,
                   help="plot height in pixels, at least 100 (the legend adds 180 to the width)")
    s = command("manifold")
    s.add_argument("--grid", type=int, default=20, help="decodes per side")
    s.add_argument("--dims", type=numbers(int, 2), default=None, metavar="I,J",
                   help="two latent dimensions I,J to vary (default: the plane, or the first two principal directions)")
    s.add_argument("--max-images", type=int, default=10000, help="training images for the principal directions")
    args = p.parse_args(argv)
    if args.out is None:
        attr = re.sub(r"\W+", "_", getattr(args, "attr", None) or "").strip("_").lower()
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                f"edit_{args.command}{'_' + attr if attr else ''}.png")
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
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
