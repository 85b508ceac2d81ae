"""data.py: datasets -> cached uint8 tensors -> shuffled float batches on the device.

    ds = data.load("celeba", root="data", img_size=64)    # ImageSet; ds.images: uint8 N x C x H x W
    loader = data.Loader(ds.images, 128, "cuda", flip=True)
    for x in loader.epoch(epoch): ...                       # float32 in [-1, 1] on the device

Sources: mnist, fashion-mnist, cifar10 (torchvision's downloaders, into <root>), celeba
(<root>/celeba in torchvision's or Kaggle's layout, see CELEBA_FILES), any folder of images
(recursive; optional attributes.csv of filename,attr1,... with 1/0 or 1/-1), and fake
(synthetic, made in memory).

Every image goes one way: to L or RGB (grayscale and palette expanded, 16-bit scaled to 8 bits,
transparency composited on black), center-cropped to crop x crop if asked (108: the usual CelebA
face crop), the shorter side resized to img_size with antialiased bilinear (torchvision's Resize
on PIL images), center-cropped to img_size x img_size. The first load of a dataset, split and
size decodes all images once, in worker processes, into <root>/cache/<name>-...-<hash>.npy (+ .npz:
labels, attributes, names); later loads memory-map it. The hash covers the settings and every
source file's path, size, mtime and ctime, so a changed folder is decoded again, and so is one
whose unreadable files were made readable (chmod and chown change the ctime); old caches stay until
you delete <root>/cache. Progress and warnings go to stderr; expected failures raise DataError.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

DATASETS = ("mnist", "fashion-mnist", "cifar10", "celeba", "fake")
DEFAULT_IMG_SIZE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "celeba": 64, "fake": 32}
FOLDER_IMG_SIZE = 64
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DOWNLOAD_TIMEOUT_S = 15  # socket timeout of the downloads (as in metrics.py): a silent server fails fast


class DataError(Exception):
    """An expected data problem; str(e) is one plain sentence for the user."""


@dataclasses.dataclass
class ImageSet:
    name: str
    images: torch.Tensor                 # uint8 N x C x H x W on CPU (may be memory-mapped)
    labels: torch.Tensor | None = None   # int64 N
    classes: list | None = None
    attrs: torch.Tensor | None = None    # uint8 N x A of 0/1
    attr_names: list | None = None

    def __len__(self):
        return len(self.images)


def has_test_split(name):
    return str(name) in DATASETS


def to_float(u8):
    """uint8 -> float32 in [-1, 1] (u8.float() / 127.5 - 1)."""
    if u8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, not {u8.dtype}")
    return u8.float().div_(127.5).sub_(1)


def to_uint8(images):
    """[-1, 1] float images -> uint8 pixels round((x + 1) * 127.5), clamped to [0, 255]: what
    write_pngs writes, and what metrics.py scores in memory during training."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- fake: synthetic shapes
FAKE_SIZE = {"train": 2048, "test": 512}
FAKE_ATTRS = ["Bright", "Large", "Striped"]
FAKE_CLASSES = ["disk", "square", "diamond", "ring", "hbar", "vbar", "cross", "triangle", "x", "dots"]


def _shape_mask(c, u, v):
    """Mask of class c's shape in coordinates (u, v) scaled so the shape spans about [-1, 1]."""
    a, b, r = u.abs(), v.abs(), (u * u + v * v).sqrt()
    inside = torch.maximum(a, b) < 1
    return (lambda: r < 1, lambda: torch.maximum(a, b) < 0.8, lambda: a + b < 1, lambda: (r > 0.5) & (r < 1),
            lambda: (b < 0.3) & inside, lambda: (a < 0.3) & inside, lambda: ((a < 0.25) | (b < 0.25)) & inside,
            lambda: (v < 0.7) & (v > 2 * a - 1), lambda: (((u - v).abs() < 0.3) | ((u + v).abs() < 0.3)) & inside,
            lambda: ((u - 0.5) ** 2 + b * b < 0.2) | ((u + 0.5) ** 2 + b * b < 0.2))[c]()


def fake(split="train", img_size=32, channels=3):
    """Deterministic synthetic ImageSet: 10 classes of coloured shapes with 3 binary attributes
    (bright background, large shape, striped shape). Generated at img_size; nothing on disk."""
    if split not in FAKE_SIZE:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    n = FAKE_SIZE[split]
    g = torch.Generator().manual_seed(1234 if split == "train" else 5678)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    attrs = (torch.rand(n, 3, generator=g) < 0.5).to(torch.uint8)
    colour = 0.35 + 0.65 * torch.rand(n, 3, 1, 1, generator=g)
    centre = 0.3 * (torch.rand(n, 2, 1, 1, generator=g) - 0.5)
    radius = torch.where(attrs[:, 1:2].bool(), 0.75, 0.4).view(n, 1, 1)
    grid = torch.linspace(-1, 1, img_size)
    u = (grid.view(1, 1, -1) - centre[:, 0]) / radius
    v = (grid.view(1, -1, 1) - centre[:, 1]) / radius
    mask = torch.zeros(n, img_size, img_size, dtype=torch.bool)
    for c in range(10):
        i = labels == c
        mask[i] = _shape_mask(c, u[i], v[i])
    stripes = (torch.sin(grid * 3.1416 * img_size / 6).view(1, -1, 1) > 0) | ~attrs[:, 2:3].bool().view(n, 1, 1)
    background = torch.where(attrs[:, 0].bool(), 0.8, 0.1).view(n, 1, 1, 1)
    shade = torch.where(stripes, 1.0, 0.5).unsqueeze(1)
    img = torch.where(mask.unsqueeze(1), colour * shade, background)
    if channels == 1:
        img = 0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
    images = (img * 255).round().to(torch.uint8)
    return ImageSet("fake", images, labels, list(FAKE_CLASSES), attrs, list(FAKE_ATTRS))


# ---------------------------------------------------------------- reading one image
def list_images(folder):
    """Sorted image files under folder (recursive); DataError if the folder is missing or has none."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) found under {folder}")
    return files


def _open(path, channels):
    """Open an image file as a PIL image in mode L or RGB (see read_image for the conversions)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16") or img.mode == "I":       # 16-bit: scale, don't clip
                arr = np.asarray(img, dtype=np.float64) / 257.0
                img = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), "L")
            elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")                            # composite on black
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            return img.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def read_image(path, channels=3):
    """uint8 C x H x W tensor. Grayscale, palette and 16-bit images are converted (16-bit is
    scaled to 8 bits), transparent images are composited on black; DataError if unreadable."""
    arr = np.asarray(_open(path, channels))
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1).copy())


def write_pngs(images, folder, first=0):
    """[-1, 1] images B x C x H x W -> folder/NNNNNN.png (uint8, 1 or 3 channels), numbered from
    `first`: the single images metrics.py reads. A failed write (a full disk) raises DataError
    and leaves no partial file behind."""
    os.makedirs(folder, exist_ok=True)
    u8 = to_uint8(images).cpu()
    for j, img in enumerate(u8):
        path = os.path.join(folder, f"{first + j:06d}.png")
        try:
            Image.fromarray(img.permute(1, 2, 0).squeeze(2).numpy()).save(path)
        except OSError as e:
            if os.path.lexists(path):
                os.remove(path)
            raise DataError(f"could not write {path} ({e.strerror or e}); "
                            f"{first + j} images were written before it") from None


# ---------------------------------------------------------------- sources
@dataclasses.dataclass
class _Source:
    name: str                    # names the cache file
    files: list                  # absolute paths of the files whose sizes and mtimes key the cache
    items: object                # list of absolute image paths, or a uint8 array N x H x W (x C)
    channels: int = 3            # native channels
    labels: np.ndarray | None = None
    classes: list | None = None
    attrs: np.ndarray | None = None
    attr_names: list | None = None


TORCHVISION = {  # name: (torchvision class, folder under root, what to put there)
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
              "and t10k-labels-idx1-ubyte (from https://ossci-datasets.s3.amazonaws.com/mnist/, gunzipped)"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", "the same four idx files of Fashion-MNIST (from "
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/, gunzipped)"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "the files of https://www.cs.toronto.edu/~kriz/"
                "cifar-10-python.tar.gz (data_batch_1..5, test_batch, batches.meta)"),
}
CELEBA_FILES = ("img_align_celeba/ (the 202,599 aligned JPEGs) with list_attr_celeba.txt and "
                "list_eval_partition.txt (torchvision layout) or with list_attr_celeba.csv and "
                "list_eval_partition.csv (Kaggle layout)")


def _reason(e):
    """The first line of an exception, short, for the end of a DataError sentence."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:120].rstrip(':') if text else ''}"


def _torchvision_source(name, root, split, download):
    import torchvision.datasets
    cls, folder, what = TORCHVISION[name]
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)   # torchvision's urllib downloads have no timeout of their own
    try:
        ds = getattr(torchvision.datasets, cls)(root, train=split == "train", download=download)
    except Exception as e:  # a downloader or a missing file: never a traceback
        why = _reason(e) if download else "download=False"
        if isinstance(e, TimeoutError):
            why = f"no answer within {DOWNLOAD_TIMEOUT_S} s"
        raise DataError(f"{name} is not in {root / folder} and could not be downloaded ({why}); "
                        f"put {what} in {root / folder}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    items = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
    files = sorted(p for p in (root / folder).iterdir() if p.is_file())
    return _Source(name, files, items, 1 if items.ndim == 3 else 3,
                   np.asarray(ds.targets, dtype=np.int64), list(ds.classes))


def _read_table(path):
    """(header names, first column, the other columns as int64) of a .csv (comma-separated) or a
    CelebA .txt list (whitespace). Leading lines whose first cell is not an image file name are
    headers: list_attr_celeba.txt has a count and the names, list_eval_partition.txt none."""
    sep = "," if str(path).lower().endswith(".csv") else None
    with open(path) as f:
        head = [f.readline().split(sep) for _ in range(3)]
    skip = next((i for i, cells in enumerate(head)
                 if cells and pathlib.PurePath(cells[0].strip()).suffix.lower() in IMAGE_EXTS), None)
    if skip is None or len(head[skip]) < 2:
        raise DataError(f"{path} has no rows of an image file name followed by values")
    kw = dict(delimiter=sep, skiprows=skip, comments=None)
    try:
        files = np.loadtxt(path, dtype=str, usecols=0, ndmin=1, **kw)
        values = np.loadtxt(path, dtype=np.int64, usecols=range(1, len(head[skip])), ndmin=2, **kw)
    except ValueError:
        raise DataError(f"{path} is not a table of image file names and whole numbers") from None
    names = [c.strip() for c in head[skip - 1][-values.shape[1]:]] if skip else []
    return names, files, values


def _read_attrs(path):
    """(names, file names, uint8 0/1 array N x A) of an attribute table (see _read_table) with a
    header of names and values 1/0 or 1/-1."""
    names, files, values = _read_table(path)
    if len(names) != values.shape[1] or not (np.abs(values) <= 1).all():
        raise DataError(f"{path} is not a table of filenames and 1/0 or 1/-1 values under a header "
                        f"line of attribute names")
    return names, files, (values == 1).astype(np.uint8)


def _find_celeba(root):
    """(image folder, attribute file, partition file or None) of CelebA under root, or None."""
    for base in (root / "celeba", root):
        images = base / "img_align_celeba"
        if (images / "img_align_celeba").is_dir():          # Kaggle's nested folder
            images = images / "img_align_celeba"
        found = [next((base / f"{stem}.{ext}" for ext in ("txt", "csv") if (base / f"{stem}.{ext}").is_file()),
                      None) for stem in ("list_attr_celeba", "list_eval_partition")]
        if images.is_dir() and found[0]:
            return images, found[0], found[1]
    return None


def _celeba_source(root, split, download):
    found = _find_celeba(root)
    failed = ""
    if found is None and download:
        import torchvision.datasets
        try:
            import gdown  # noqa: F401  (torchvision downloads CelebA from Google Drive with it)
            torchvision.datasets.CelebA(root, split="all", download=True)
        except Exception as e:  # Google Drive quota, no network, no gdown, ...
            failed = f" (torchvision's download failed: {_reason(e)})"
            if isinstance(e, ImportError) and e.name == "gdown":  # (torchvision's "pip install" is no help offline)
                failed = " (torchvision downloads it with the gdown package, which is not installed)"
        found = _find_celeba(root)
    if found is None:
        raise DataError(f"CelebA is not in {root / 'celeba'}{failed}: put {CELEBA_FILES} there")
    images, attr_file, partition_file = found
    names, files, attrs = _read_attrs(attr_file)
    if partition_file is not None:
        _, part_files, part = _read_table(partition_file)
        wanted = dict(zip(part_files, part[:, 0] == (0 if split == "train" else 2)))
        keep = np.array([wanted.get(f, False) for f in files], dtype=bool)
        files, attrs = files[keep], attrs[keep]
    elif split == "test":
        raise DataError(f"CelebA's test split needs list_eval_partition.txt or .csv next to {attr_file}")
    paths = [f"{images}/{f}" for f in files]                  # str: 200,000 Paths are slow
    return _Source("celeba", paths + [attr_file, partition_file or attr_file], paths,
                   attrs=attrs, attr_names=names)


def _folder_source(folder, split, attr_csv):
    if split != "train":
        raise DataError(f"a folder of images has no test split; use split='train' for {folder}")
    paths = list_images(folder)
    attr_csv = pathlib.Path(attr_csv).absolute() if attr_csv else folder / "attributes.csv"
    if not attr_csv.is_file():
        return _Source(folder.resolve().name, paths, paths)
    names, files, attrs = _read_attrs(attr_csv)
    row = {f: i for i, f in enumerate(files)}
    keys = [p.relative_to(folder).as_posix() for p in paths]
    keys = [k if k in row else pathlib.PurePath(k).name for k in keys]
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{len(missing)} images have no row in {attr_csv} (first: {missing[0]})")
    return _Source(folder.resolve().name, paths + [attr_csv], paths,
                   attrs=attrs[[row[k] for k in keys]], attr_names=names)


# ---------------------------------------------------------------- preprocessing and decoding
def _center_crop(img, size):
    w, h = img.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return img if (w, h) == (size, size) else img.crop((left, top, left + size, top + size))


def _fit(img, size, crop=None):
    """Center-crop crop x crop first (if given), resize the shorter side to size with antialiased
    bilinear (what torchvision's Resize does on PIL images) and center-crop size x size."""
    if crop:
        img = _center_crop(img, min(crop, *img.size))
    w, h = img.size
    if min(w, h) != size:
        img = img.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BILINEAR)
    return _center_crop(img, size)


def _decode_chunk(job):
    """Worker: (uint8 array k x C x H x W of the readable items, [(index, error)] of the others)."""
    items, size, crop, channels = job
    out, bad = np.zeros((len(items), channels, size, size), np.uint8), []
    for i, item in enumerate(items):
        try:
            img = Image.fromarray(item).convert("L" if channels == 1 else "RGB") \
                if isinstance(item, np.ndarray) else _open(item, channels)
        except DataError as e:
            bad.append((i, str(e)))
            continue
        out[i] = np.asarray(_fit(img, size, crop)).reshape(size, size, -1).transpose(2, 0, 1)
    return np.delete(out, [i for i, _ in bad], axis=0), bad


DECODE_CHUNK = 256  # images per job sent to a worker process


def _decode(source, out, size, crop, channels, workers, verbose):
    """Decode all of source.items into out (rows in order, unreadable ones skipped, in parallel
    worker processes); returns the indices of the decoded items."""
    n, step = len(source.items), DECODE_CHUNK
    jobs = [(source.items[i:i + step], size, crop, channels) for i in range(0, n, step)]
    workers = workers or min(8, len(os.sched_getaffinity(0)))
    pool = ProcessPoolExecutor(workers) if workers > 1 and n > 4 * step else None
    kept, bad, t0, shown = [], [], time.time(), 0.0
    try:
        for j, (chunk, errors) in enumerate((pool.map if pool else map)(_decode_chunk, jobs)):
            failed = {i for i, _ in errors}
            out[len(kept):len(kept) + len(chunk)] = chunk
            kept += [j * step + i for i in range(len(jobs[j][0])) if i not in failed]
            bad += errors
            done, now = min(n, (j + 1) * step), time.time()
            if verbose and (now - shown > 0.5 or done == n):
                shown, rate = now, done / max(now - t0, 1e-9)
                print(f"\rdecoding {source.name}: {done}/{n} images, {rate:.0f}/s, "
                      f"ETA {(n - done) / rate:.0f}s ", end="\n" if done == n else "", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if not kept:
        raise DataError(f"none of the {n} images of {source.name} could be read ({bad[0][1]})")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable images of {source.name} "
              f"({'; '.join(e for _, e in bad[:3])})", file=sys.stderr)
    return np.array(kept)


# ---------------------------------------------------------------- the cache
CACHE_VERSION = 1


def _cache_key(source, split, size, crop, channels):
    """Hash of everything the cached array depends on: settings and each file's path, size, mtime
    and ctime. The ctime changes with chmod and chown too: a file skipped as unreadable when the
    cache was built, and made readable since, gives another key."""
    h = hashlib.sha256(repr((CACHE_VERSION, source.name, split, size, crop, channels)).encode())
    for f in source.files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:16]


def _build(source, path, size, crop, channels, workers, verbose):
    """Decode source into path (.npy images) and path.npz (labels, attrs, names as json), each
    written to a temporary file and renamed into place; no temporary file outlives a failure."""
    n, t0 = len(source.items), time.time()
    tmp, part, meta = (path.with_name(f"{path.name}.{os.getpid()}.{ext}") for ext in ("tmp", "part", "meta"))
    need = n * (channels * size * size + 64) + 2 ** 26      # images, labels and attributes, 64 MiB to spare
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < need:  # the memory map is a sparse file: a full disk would end in a bus error
            raise DataError(f"the image cache of {source.name} needs {need / 1e9:.2f} GB but only "
                            f"{free / 1e9:.2f} GB is free in {path.parent}; free some space or use "
                            f"--data-root on another disk")
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, channels, size, size))
        kept = _decode(source, out, size, crop, channels, workers, verbose)
        out.flush()
        if len(kept) < n:                                  # drop the rows of unreadable files
            with open(part, "wb") as f:
                np.save(f, out[:len(kept)])
            os.replace(part, tmp)
        del out
        arrays = {k: getattr(source, k)[kept] for k in ("labels", "attrs") if getattr(source, k) is not None}
        names = json.dumps({"classes": source.classes, "attr_names": source.attr_names})
        with open(meta, "wb") as f:
            np.savez(f, names=np.array(names), **arrays)
        os.replace(meta, path.with_suffix(".npz"))
        os.replace(tmp, path)
    except OSError as e:  # a read-only folder, no space left after all, a quota, a disk error
        raise DataError(f"cannot write the image cache in {path.parent} ({_reason(e)}); "
                        f"use another --data-root or free some space") from None
    finally:
        for leftover in (tmp, part, meta):
            leftover.unlink(missing_ok=True)
    if verbose:
        print(f"cached {len(kept)} images of {source.name} in {time.time() - t0:.1f}s: {path}", file=sys.stderr)


def _read_cache(name, path):
    images = torch.from_numpy(np.load(path, mmap_mode="c"))
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as meta:
        names = json.loads(str(meta["names"]))
        tensors = {k: torch.from_numpy(meta[k]) for k in ("labels", "attrs") if k in meta}
    return ImageSet(name, images, tensors.get("labels"), names["classes"], tensors.get("attrs"), names["attr_names"])


# ---------------------------------------------------------------- load
def load(name_or_folder, root="data", split="train", img_size=None, channels=None, crop=None,
         download=True, verbose=True, attr_csv=None, cache_dir=None, workers=None):
    """An ImageSet of a named dataset or a folder of images (see the module docstring).
    attr_csv: attributes of a folder (default <folder>/attributes.csv if present); cache_dir:
    default <root>/cache; workers: decoding processes (default: the CPUs, at most 8)."""
    name, root = str(name_or_folder), pathlib.Path(root).absolute()
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels}")
    if img_size is not None and img_size < 1:
        raise DataError(f"img_size must be at least 1 pixel, not {img_size}")
    if crop is not None and crop < 0:
        raise DataError(f"crop must be 0 (no crop) or more pixels, not {crop}")
    if name == "fake":
        return fake(split, img_size or DEFAULT_IMG_SIZE["fake"], channels or 3)
    if name in TORCHVISION:
        source = _torchvision_source(name, root, split, download)
    elif name == "celeba":
        source = _celeba_source(root, split, download)
    elif os.sep in name or "/" in name or pathlib.Path(name).exists():
        source = _folder_source(pathlib.Path(name).absolute(), split, attr_csv)
    else:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a folder of images")
    size, channels = img_size or DEFAULT_IMG_SIZE.get(name, FOLDER_IMG_SIZE), channels or source.channels
    key = _cache_key(source, split, size, crop, channels)
    path = pathlib.Path(cache_dir or root / "cache") / \
        f"{source.name}-{split}-{size}px-{channels}ch{f'-crop{crop}' if crop else ''}-{key}.npy"
    if not (path.is_file() and path.with_suffix(".npz").is_file()):
        _build(source, path, size, crop, channels, workers, verbose)
    elif verbose:
        print(f"loading {source.name} {split} from {path}", file=sys.stderr)
    return _read_cache(name, path)


# ---------------------------------------------------------------- batches
class Loader:
    """Shuffled float batches in [-1, 1] on the device; seeded, optionally sharded by rank.

    The uint8 images live on the device when they fit (CUDA: under half the free memory), else they
    stay where they are (host memory, the cache's memory map) and each batch is gathered into one of
    two pinned buffers, copied to the device without blocking."""

    def __init__(self, images, batch_size, device, seed=0, flip=False, rank=0, world_size=1,
                 channels_last=False):
        images = getattr(images, "images", images)                # an ImageSet works too
        self.device = torch.device(device)
        if batch_size % world_size:
            raise DataError(f"--batch-size {batch_size} is not divisible by the {world_size} ranks; "
                            f"use a multiple of {world_size}")
        self.batch, self.per_rank = batch_size // world_size, len(images) // world_size
        if self.batch < 1 or self.per_rank < self.batch:
            raise DataError(f"{len(images)} images over {world_size} rank(s) are fewer than one batch "
                            f"of {batch_size}; lower --batch-size")
        self.seed, self.flip, self.rank = seed, flip, rank
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.on_device = self.device.type != "cuda" or \
            images.nbytes < torch.cuda.mem_get_info(self.device)[0] / 2
        if self.on_device:
            self.images = images.to(self.device, copy=True)       # on CPU: out of the memory map
        else:                                                     # pin two batches, not the dataset
            self.images = images
            self.buffers = [torch.empty((self.batch, *images.shape[1:]), dtype=torch.uint8).pin_memory()
                            for _ in range(2)]
            self.copied = [torch.cuda.Event() for _ in range(2)]

    def __len__(self):
        return self.per_rank // self.batch

    def _gather(self, i, idx):
        """uint8 batch images[idx] on the device."""
        if self.on_device:
            return self.images.index_select(0, idx)
        buf, copied = self.buffers[i % 2], self.copied[i % 2]
        copied.synchronize()                                      # its last copy has finished
        torch.index_select(self.images, 0, idx, out=buf)
        stream = torch.cuda.current_stream(self.device)          # self.device's, whichever device is current
        with torch.cuda.stream(stream):
            x = buf.to(self.device, non_blocking=True)
        copied.record(stream)
        return x

    def epoch(self, epoch=0, start=0):
        """The batches of one epoch: the permutation of seed + epoch, this rank's shard of it.
        With flip, each image is mirrored with probability 1/2; the mirrored ones are put first in
        their batch, so that one in-place slice flip on the device does them all. start: resume
        part-way, yielding batches start, start + 1, ... of the same epoch."""
        if not 0 <= start <= len(self):
            raise DataError(f"cannot start epoch {epoch} at batch {start}: it has {len(self)} batches")
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.images), generator=g)
        batches = perm[self.rank * self.per_rank:][:len(self) * self.batch].view(len(self), self.batch)
        flips = torch.rand(batches.shape, generator=g) < 0.5 if self.flip else torch.zeros_like(batches, dtype=torch.bool)
        order = flips.int().sort(dim=1, descending=True, stable=True).indices
        batches, n_flip = batches.gather(1, order).to(self.images.device), flips.sum(1).tolist()
        for i in range(start, len(self)):
            x = self._gather(i, batches[i])
            if n_flip[i]:
                x[:n_flip[i]] = x[:n_flip[i]].flip(3)
            yield to_float(x.contiguous(memory_format=self.memory_format))
