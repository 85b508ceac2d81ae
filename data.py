"""data.py: datasets -> cached uint8 tensors -> shuffled float batches on the device; and what every model script
needs around its training loop (Run: its flags, device, checkpoint, place in the run, stop signals, files).

    ds = data.load("celeba", root="data", img_size=64)    # ImageSet; ds.images: uint8 N x C x H x W
    loader = data.Loader(ds.images, 128, "cuda", flip=True)
    for x in loader.epoch(epoch): ...                       # float32 in [-1, 1] on the device

Sources: mnist, fashion-mnist, cifar10 (torchvision's downloaders, into <root>), celeba (<root>/celeba in
torchvision's or Kaggle's layout, see CELEBA_FILES), any folder of images (recursive; optional attributes.csv of
filename,attr1,... with 1/0 or 1/-1), and fake (synthetic, made in memory). Every image goes one way: to L or RGB
(16-bit scaled to 8 bits, transparency composited on black), center-cropped to crop x crop if asked (108: the
usual CelebA face crop), the shorter side resized to img_size (antialiased bilinear, as torchvision's Resize),
center-cropped. The first load of a dataset, split and size decodes it once, in worker processes, into
<root>/cache/<name>-...-<hash>.npy (+ .npz: labels, attributes, names); later loads memory-map it. The hash covers
the settings and every file's path, size, mtime and ctime. Expected failures raise DataError (one sentence).
"""
import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pathlib
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

DATASETS = ("mnist", "fashion-mnist", "cifar10", "celeba", "fake")
DEFAULT_IMG_SIZE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "celeba": 64, "fake": 32}
FOLDER_IMG_SIZE = 64
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DOWNLOAD_TIMEOUT_S = 15  # socket timeout of the downloads: a silent server fails fast


class DataError(ValueError):
    """An expected problem; str(e) is one plain sentence for the user."""


def fail(msg):
    """How every expected failure of a script ends: one sentence, exit status 1."""
    sys.exit(f"error: {msg}")


def interrupted(what):
    """Ctrl-C outside the training loop: one sentence and exit 130 (as a shell expects), no traceback."""
    print(f"error: stopped by Ctrl-C {what}", file=sys.stderr, flush=True)
    sys.exit(130)


def _reason(e, strerror=False):
    """The first line of an exception, short, for the end of a sentence. strerror (metrics.py, whose sentences
    name the path): an OSError's strerror alone, without errno and path, and the bare type name if no text."""
    text = (e.strerror if strerror and isinstance(e, OSError) and e.strerror else str(e)).strip()
    if strerror and not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:120].rstrip(':') if text else ''}"


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
    """uint8 -> float32 in [-1, 1] (u8 / 127.5 - 1)."""
    if u8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, not {u8.dtype}")
    return u8.float().div_(127.5).sub_(1)


def to_uint8(images):
    """[-1, 1] images -> uint8 round((x + 1) * 127.5): what write_pngs writes and metrics.py scores in memory."""
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
    """Deterministic synthetic ImageSet: 10 classes of coloured shapes with 3 binary attributes (bright
    background, large shape, striped shape), made at img_size; nothing on disk."""
    if split not in FAKE_SIZE:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    n = FAKE_SIZE[split]
    g = torch.Generator().manual_seed(1234 if split == "train" else 5678)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    attrs = (torch.rand(n, 3, generator=g) < 0.5).to(torch.uint8)
    colour = 0.35 + 0.65 * torch.rand(n, 3, 1, 1, generator=g)
    centre = 0.3 * (torch.rand(n, 2, 1, 1, generator=g) - 0.5)
    radius = torch.where(attrs[:, 1:2].bool(), 0.75, 0.4).view(n, 1, 1)
    grid = torch.linspace(-1, 1, img_size)
    u, v = (grid.view(1, 1, -1) - centre[:, 0]) / radius, (grid.view(1, -1, 1) - centre[:, 1]) / radius
    mask = torch.zeros(n, img_size, img_size, dtype=torch.bool)
    for c in range(10):
        mask[labels == c] = _shape_mask(c, u[labels == c], v[labels == c])
    stripes = (torch.sin(grid * 3.1416 * img_size / 6).view(1, -1, 1) > 0) | ~attrs[:, 2:3].bool().view(n, 1, 1)
    background = torch.where(attrs[:, 0].bool(), 0.8, 0.1).view(n, 1, 1, 1)
    img = torch.where(mask.unsqueeze(1), colour * torch.where(stripes, 1.0, 0.5).unsqueeze(1), background)
    if channels == 1:
        img = 0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
    images = (img * 255).round().to(torch.uint8)
    return ImageSet("fake", images, labels, list(FAKE_CLASSES), attrs, list(FAKE_ATTRS))


# ---------------------------------------------------------------- reading and writing single images
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
    """An image file as a PIL image in mode L or RGB (see read_image for the conversions)."""
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
    """uint8 C x H x W: grayscale, palette and 16-bit images converted, transparency composited on black."""
    arr = np.asarray(_open(path, channels))
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1).copy())


def write_pngs(images, folder, first=0):
    """[-1, 1] images B x C x H x W -> folder/NNNNNN.png from number `first` (uint8, 1 or 3 channels): the single
    images metrics.py reads. A failed write (a full disk) is a DataError and leaves no partial file."""
    os.makedirs(folder, exist_ok=True)
    for j, img in enumerate(to_uint8(images).cpu()):
        path = os.path.join(folder, f"{first + j:06d}.png")
        try:
            Image.fromarray(img.permute(1, 2, 0).squeeze(2).numpy()).save(path)
        except OSError as e:
            if os.path.lexists(path):
                os.remove(path)
            raise DataError(f"could not write {path} ({e.strerror or e}); {first + j} images were written "
                            f"before it") from None


# ---------------------------------------------------------------- sources
@dataclasses.dataclass
class _Source:
    name: str                    # names the cache file
    files: list                  # the files whose sizes and dates key the cache
    items: object                # list of image paths, or a uint8 array N x H x W (x C)
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


@contextlib.contextmanager
def download_timeout():
    """Inside, a socket that answers nothing for DOWNLOAD_TIMEOUT_S fails (urllib's downloads, which
    torchvision's and torch.hub's use, have no timeout of their own): offline, a download fails fast."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _torchvision_source(name, root, split, download):
    import torchvision.datasets
    cls, folder, what = TORCHVISION[name]
    try:
        with download_timeout():
            ds = getattr(torchvision.datasets, cls)(root, train=split == "train", download=download)
    except Exception as e:  # a downloader or a missing file: never a traceback
        why = f"no answer within {DOWNLOAD_TIMEOUT_S} s" if isinstance(e, TimeoutError) else \
            _reason(e) if download else "download=False"
        raise DataError(f"{name} is not in {root / folder} and could not be downloaded ({why}); "
                        f"put {what} in {root / folder}") from None
    items = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
    files = sorted(p for p in (root / folder).iterdir() if p.is_file())
    return _Source(name, files, items, 1 if items.ndim == 3 else 3, np.asarray(ds.targets, dtype=np.int64),
                   list(ds.classes))


def _read_table(path, attributes=False):
    """(header names, first column, the other columns as int64) of a .csv or a CelebA .txt list (whitespace):
    leading lines whose first cell is no image file name are headers (list_attr_celeba.txt: a count, then the
    names). attributes: values 1/0 or 1/-1 under a line of names, returned as uint8 0/1."""
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
    if attributes and (len(names) != values.shape[1] or not (np.abs(values) <= 1).all()):
        raise DataError(f"{path} is not a table of filenames and 1/0 or 1/-1 values under a header line of "
                        f"attribute names")
    return names, files, (values == 1).astype(np.uint8) if attributes else values


def _find_celeba(root):
    """(image folder, attribute file, partition file or None) of CelebA under root, or None."""
    for base in (root / "celeba", root):
        images = base / "img_align_celeba"
        if (images / "img_align_celeba").is_dir():          # Kaggle's nested folder
            images = images / "img_align_celeba"
        found = [next((base / f"{stem}.{ext}" for ext in ("txt", "csv") if (base / f"{stem}.{ext}").is_file()),
                      None) for stem in ("list_attr_celeba", "list_eval_partition")]
        if images.is_dir() and found[0]:
            return images, *found
    return None


def _celeba_source(root, split, download):
    found, failed = _find_celeba(root), ""
    if found is None and download:
        import torchvision.datasets
        try:
            import gdown  # noqa: F401  (torchvision downloads CelebA from Google Drive with it)
            torchvision.datasets.CelebA(root, split="all", download=True)
        except Exception as e:  # Google Drive's quota, no network, no gdown ("pip install" is no help offline)
            failed = " (torchvision downloads it with the gdown package, which is not installed)" if \
                isinstance(e, ImportError) and e.name == "gdown" else f" (torchvision's download failed: {_reason(e)})"
        found = _find_celeba(root)
    if found is None:
        raise DataError(f"CelebA is not in {root / 'celeba'}{failed}: put {CELEBA_FILES} there")
    images, attr_file, partition_file = found
    names, files, attrs = _read_table(attr_file, attributes=True)
    if partition_file is not None:
        _, part_files, part = _read_table(partition_file)
        wanted = dict(zip(part_files, part[:, 0] == (0 if split == "train" else 2)))
        keep = np.array([wanted.get(f, False) for f in files], dtype=bool)
        files, attrs = files[keep], attrs[keep]
    elif split == "test":
        raise DataError(f"CelebA's test split needs list_eval_partition.txt or .csv next to {attr_file}")
    paths = [f"{images}/{f}" for f in files]                  # str: 200,000 Paths are slow
    return _Source("celeba", paths + [attr_file, partition_file or attr_file], paths, attrs=attrs, attr_names=names)


def _folder_source(folder, split, attr_csv):
    if split != "train":
        raise DataError(f"a folder of images has no test split; use split='train' for {folder}")
    paths = list_images(folder)
    attr_csv = pathlib.Path(attr_csv).absolute() if attr_csv else folder / "attributes.csv"
    if not attr_csv.is_file():
        return _Source(folder.resolve().name, paths, paths)
    names, files, attrs = _read_table(attr_csv, attributes=True)
    row = {f: i for i, f in enumerate(files)}
    keys = [k if k in row else pathlib.PurePath(k).name for k in (p.relative_to(folder).as_posix() for p in paths)]
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{len(missing)} images have no row in {attr_csv} (first: {missing[0]})")
    return _Source(folder.resolve().name, paths + [attr_csv], paths, attrs=attrs[[row[k] for k in keys]],
                   attr_names=names)


# ---------------------------------------------------------------- decoding, in worker processes
def _center_crop(img, size):
    w, h = img.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return img if (w, h) == (size, size) else img.crop((left, top, left + size, top + size))


def _fit(img, size, crop=None):
    """Center-crop crop x crop (if given), resize the shorter side to size, center-crop size x size."""
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


def _worker_start(parent):
    """In each worker: Ctrl-C at a terminal reaches the whole process group but only the parent acts on it
    (it stops the pool; the workers finish their chunk and end); and a worker ends once its parent is gone
    (killed with -9) instead of living on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def cpu_count():
    """The CPUs this process may use: its affinity where the system has one (Linux), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


DECODE_CHUNK = 256  # images per job sent to a worker process


def _decode(source, out, size, crop, channels, workers, verbose):
    """Decode source.items into out (in order, unreadable ones skipped, in worker processes); -> kept indices."""
    n, step = len(source.items), DECODE_CHUNK
    jobs = [(source.items[i:i + step], size, crop, channels) for i in range(0, n, step)]
    workers = workers or min(8, cpu_count())
    pool = ProcessPoolExecutor(workers, initializer=_worker_start, initargs=(os.getpid(),)) \
        if workers > 1 and n > 4 * step else None
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
                print(f"\rdecoding {source.name}: {done}/{n} images, {rate:.0f}/s, ETA {(n - done) / rate:.0f}s ",
                      end="\n" if done == n else "", file=sys.stderr, flush=True)
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
TEMP_KINDS = ("tmp", "part", "meta")   # <cache file>.<pid>.<kind>: a build's temporary files


def _cache_key(source, split, size, crop, channels):
    """Hash of the settings and each file's path, size, mtime and ctime (chmod changes the ctime too)."""
    h = hashlib.sha256(repr((CACHE_VERSION, source.name, split, size, crop, channels)).encode())
    for f in source.files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:16]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def _remove_stale(folder):
    """The temporary files of cache builds whose process is gone (killed with -9, a power cut)."""
    for p in folder.glob("*.*.*") if folder.is_dir() and os.name == "posix" else []:  # (os.kill ends it on Windows)
        _, pid, kind = p.name.rsplit(".", 2)
        if kind in TEMP_KINDS and pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _allocate(path, start, end):
    """Give bytes start..end of the file their disk blocks now: a memory map claims a sparse file's blocks only
    as it writes them, and a disk that another writer fills meanwhile would end in a bus error, not an OSError."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), start, end - start)
        except (AttributeError, OSError) as e:  # none on macOS and Windows, or not on this file system: write zeros
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            for at in range(start, end, 1 << 26):
                f.seek(at)
                f.write(bytes(min(1 << 26, end - at)))


def _build(source, path, size, crop, channels, workers, verbose):
    """Decode source into path (.npy images) and path.npz (labels, attrs, names as json), each written to a
    temporary file and renamed into place; no temporary file outlives a failure."""
    n, t0 = len(source.items), time.time()
    tmp, part, meta = (path.with_name(f"{path.name}.{os.getpid()}.{kind}") for kind in TEMP_KINDS)
    need = n * (channels * size * size + 64) + 2 ** 26      # images, labels and attributes, 64 MiB to spare
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < need:
            raise DataError(f"the image cache of {source.name} needs {need / 1e9:.2f} GB but only "
                            f"{free / 1e9:.2f} GB is free in {path.parent}; free some space or use "
                            f"--data-root on another disk")
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, channels, size, size))
        _allocate(tmp, out.offset, out.offset + out.nbytes)
        kept = _decode(source, out, size, crop, channels, workers, verbose)
        out.flush()
        if len(kept) < n:                                  # drop the rows of unreadable files
            with open(part, "wb") as f:
                np.save(f, out[:len(kept)])
            os.replace(part, tmp)
        del out
        arrays = {k: getattr(source, k)[kept] for k in ("labels", "attrs") if getattr(source, k) is not None}
        with open(meta, "wb") as f:
            np.savez(f, names=np.array(json.dumps({"classes": source.classes, "attr_names": source.attr_names})),
                     **arrays)
        os.replace(meta, path.with_suffix(".npz"))
        os.replace(tmp, path)
    except OSError as e:  # a read-only folder, a full disk, a quota, a disk error
        raise DataError(f"cannot write the image cache in {path.parent} ({_reason(e)}); "
                        f"use another --data-root or free some space") from None
    finally:
        for leftover in (tmp, part, meta):
            leftover.unlink(missing_ok=True)
    if verbose:
        print(f"cached {len(kept)} images of {source.name} in {time.time() - t0:.1f}s: {path}", file=sys.stderr)


def load(name_or_folder, root="data", split="train", img_size=None, channels=None, crop=None,
         download=True, verbose=True, attr_csv=None, cache_dir=None, workers=None):
    """An ImageSet of a named dataset or a folder of images (see the module docstring). attr_csv: a folder's
    attributes (default <folder>/attributes.csv); cache_dir: default <root>/cache; workers: decoding processes
    (default: the CPUs, at most 8)."""
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
    _remove_stale(path.parent)
    if not (path.is_file() and path.with_suffix(".npz").is_file()):
        _build(source, path, size, crop, channels, workers, verbose)
    elif verbose:
        print(f"loading {source.name} {split} from {path}", file=sys.stderr)
    images = torch.from_numpy(np.load(path, mmap_mode="c"))
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as meta:
        names = json.loads(str(meta["names"]))
        t = {k: torch.from_numpy(meta[k]) for k in ("labels", "attrs") if k in meta}
    return ImageSet(name, images, t.get("labels"), names["classes"], t.get("attrs"), names["attr_names"])


# ---------------------------------------------------------------- batches
class Loader:
    """Shuffled float batches in [-1, 1] on the device; seeded, optionally sharded by rank. The uint8 images
    live on the device when they fit (CUDA: under half the free memory); else they stay where they are (host
    memory, the cache's memory map) and each batch is gathered into one of two pinned buffers and copied
    without blocking."""

    def __init__(self, images, batch_size, device, seed=0, flip=False, rank=0, world_size=1, channels_last=False):
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
        self.on_device = self.device.type != "cuda" or images.nbytes < torch.cuda.mem_get_info(self.device)[0] / 2
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
        """The batches of one epoch: the permutation of seed + epoch, this rank's shard of it. With flip, each
        image is mirrored with probability 1/2, the mirrored ones first in their batch (one slice flip does
        them all). start: resume part-way, at batch start of the same epoch."""
        if not 0 <= start <= len(self):
            raise DataError(f"cannot start epoch {epoch} at batch {start}: it has {len(self)} batches")
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.images), generator=g)
        batches = perm[self.rank * self.per_rank:][:len(self) * self.batch].view(len(self), self.batch)
        flips = torch.rand(batches.shape, generator=g) < 0.5 if self.flip else torch.zeros(batches.shape, dtype=bool)
        order = flips.int().sort(dim=1, descending=True, stable=True).indices
        batches, n_flip = batches.gather(1, order).to(self.images.device), flips.sum(1).tolist()
        for i in range(start, len(self)):
            x = self._gather(i, batches[i])
            if n_flip[i]:
                x[:n_flip[i]] = x[:n_flip[i]].flip(3)
            yield to_float(x.contiguous(memory_format=self.memory_format))


# ---------------------------------------------------------------- the device, and the checkpoint's file
SCRIPTS = ("dcgan", "mlp_gan", "vae_conv", "mlp_vae", "vaegan")  # the model scripts, whose checkpoints these are


def resolve_device(name="auto"):
    """--device as a torch.device this machine has: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise DataError(f"--device {name} is not one these scripts run on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not mps or device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name} was asked for but {device.type.upper()} is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name} was asked for but there are only {torch.cuda.device_count()} CUDA "
                        f"devices; use --device cuda:0")
    return device


def read_checkpoint(path, script=None, upgrade=None):
    """The dict a model script saved (script: only that one's), read with weights_only=True so that nothing in
    the file can run; any other file is a DataError that says what it is (never PyTorch's own message, which
    advises loading the file unsafely). upgrade(args) fills in what an older version's checkpoint lacks."""
    use = "pass the ckpt.pt that a model script wrote to its --out folder"
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a checkpoint; pass the ckpt.pt inside it")
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist; {use}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)  # what kind of file it is, for the messages below
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    if not head:
        raise DataError(f"{path} is empty (0 bytes) and not a checkpoint; it was cut off while being written or "
                        f"copied")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch warns about some pickle protocols
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a zip or pickle of more than tensors: refused, nothing in it run
        raise DataError(f"{path} is not a checkpoint written by this project's scripts and may be unsafe to load; "
                        f"nothing in it was run" if head.startswith((b"PK", b"\x80")) else
                        f"{path} is not a PyTorch checkpoint; {use}") from None
    except Exception:  # noqa: BLE001  (PyTorch raises many kinds for a file it cannot parse)
        raise DataError(f"{path} is a damaged or truncated checkpoint (or another zip archive); {use}"
                        if head.startswith(b"PK") else f"{path} is not a PyTorch checkpoint; {use}") from None
    scripts = f"{script}.py" if script else f"one of {', '.join(s + '.py' for s in SCRIPTS)}"
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise DataError(f"{path} holds a {type(ckpt).__name__} without a 'script' entry, so it was not written by "
                        f"{scripts} and there is no model to rebuild from it")
    if ckpt["script"] not in ((script,) if script else SCRIPTS):
        raise DataError(f"{path} was not written by {scripts} (its script is {ckpt['script']!r}); use the script "
                        f"that wrote it")
    if not isinstance(ckpt.get("args"), dict):
        raise DataError(f"{path} has no settings ('args') to rebuild the {ckpt['script']}.py model from: it is damaged "
                        f"(its 'args' entry is {type(ckpt.get('args')).__name__}, not a dict of flags)")
    for key in ("epoch", "step"):
        if not isinstance(ckpt.get(key), int):
            raise DataError(f"{path} is damaged: its {key!r} entry is {type(ckpt.get(key)).__name__}, not an int")
    if upgrade:
        upgrade(ckpt["args"])
    return ckpt


def save_checkpoint(path, state):
    """torch.save(state) into a temporary file renamed onto path: a crash or a full disk never tears the file
    there. A DataError, the temporary file removed, when it cannot be written."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # RuntimeError: PyTorch's zip writer on a full disk
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise DataError(f"could not write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- a training run
# What every model script's main() takes from here as parts (its training loop stays in main()): the shared
# flags, checked; the device and the ranks (torchrun); the output folder; the checkpoint; where the run stands
# (epoch: whole epochs done, batch: batches done in the next, step: optimizer steps) and stopping on Ctrl-C and
# SIGTERM with every rank agreeing.

RUNTIME_FLAGS = {"resume", "out", "device", "amp", "compile", "sync_bn", "max_steps", "sample", "weights"}


def add_args(p, data="mnist", epochs=10, batch_size=128, img_size="the dataset's own", sync_bn=True):
    """The flags of the data and of the run, the same in every model script."""
    a = p.add_argument
    a("--data", default=data, help=f"one of {', '.join(DATASETS)}, or a folder of images")
    a("--data-root", default="data", help="where datasets and the decoded cache live")
    a("--img-size", type=int, default=None, help=f"pixels; default: {img_size}")
    a("--channels", type=int, default=None, choices=[1, 3], help="image channels; default: the dataset's own")
    a("--crop", type=int, default=None, help="center-crop this many pixels before resizing (108: CelebA's faces)")
    a("--flip", action="store_true", help="random horizontal flips")
    a("--epochs", type=int, default=epochs, help="total epochs (a resumed run continues to this count)")
    a("--batch-size", type=int, default=batch_size, help="global batch, split over the ranks")
    a("--lr-decay", default="none", choices=["none", "linear"], help="linear: lr (1 - t/T), 0 at the run's end")
    a("--seed", type=int, default=0, help="seeds the weights, the order of the batches and the noise")
    a("--out", default=None, help="output folder; default runs/<script>-<data> (or the next free one, -2, -3, "
      "...), or the --resume checkpoint's")
    a("--resume", default=None, help="a ckpt.pt to continue from: its flags are the defaults, typed ones win")
    a("--sample", type=int, default=0, help="after training, write this many single PNGs to OUT/samples/")
    a("--max-steps", type=int, default=0, help="stop after this many optimizer steps in all (0: no limit)")
    a("--log-every", type=int, default=50, help="optimizer steps between log lines")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    a("--amp", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast; default: on for CUDA")
    a("--compile", action="store_true", help="torch.compile the networks")
    if sync_bn:
        a("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all ranks (CUDA)")


def _holds_run(folder):
    return any(os.path.exists(os.path.join(folder, f)) for f in ("ckpt.pt", "best.pt"))


class Run:
    """A model script's run. Run(parser, argv, script, check, shape_flags, upgrade) parses the flags (on --resume
    the checkpoint's are the parser's defaults and the command line is parsed again, so whatever is typed wins),
    reads the checkpoint (upgrade(args): an older version's flags), picks the device, the ranks and the output
    folder, and checks every flag before any data is read: the shared ones, a typed one of shape_flags that does
    not fit the checkpoint's networks, then check(args, run), the script's own."""

    def __init__(self, parser, argv, script, check, shape_flags=(), upgrade=None):
        args = parser.parse_args(argv)
        try:
            self.ckpt = ckpt = read_checkpoint(args.resume, script, upgrade) if args.resume else None
            if ckpt:
                parser.set_defaults(**{k: v for k, v in ckpt["args"].items() if k in vars(args) and k not in
                                       RUNTIME_FLAGS})
                args = parser.parse_args(argv)
            self.device = resolve_device(args.device)
        except DataError as e:
            fail(e)
        self.args, self.script, self.parts, self.caught, self.signum = args, script, {}, 0, 0
        self.ddp = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain python: rank 0 of 1
        self.rank, self.world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if self.ddp else (0, 1)
        if self.ddp and self.device.type == "cuda":  # one GPU per process
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        self.epoch, self.batch, self.step = (ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]) if ckpt else (0, 0, 0)
        self.train = self.epoch < args.epochs
        self._check(shape_flags)
        check(args, self)
        self._ready()
        if self.ddp:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        if self.notice:
            self.log(self.notice)
        args.amp = self.device.type == "cuda" if args.amp is None else args.amp
        torch.manual_seed(args.seed + self.rank)
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)  # a non-finite value since the last check
        self.stopping, self.n, self.seen, self.t0 = False, 1, 0, time.perf_counter()

    def _check(self, shape_flags):
        a, ckpt = self.args, self.ckpt
        for flag in ("batch_size", "latent_dim", "log_every"):  # (None: the script's default, resolved later)
            if getattr(a, flag) is not None and getattr(a, flag) < 1:
                fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
        for flag in ("epochs", "sample", "max_steps", "crop"):
            if (getattr(a, flag) or 0) < 0:
                fail(f"--{flag.replace('_', '-')} cannot be negative, got {getattr(a, flag)}")
        if not (math.isfinite(a.lr) and a.lr > 0):
            fail(f"--lr must be a positive number, got {a.lr}")
        if a.img_size is not None and a.img_size < 1:
            fail(f"--img-size must be a positive number of pixels, got {a.img_size}")
        if a.batch_size % self.world:  # (as data.Loader says to its callers, but before any data is read)
            fail(f"--batch-size {a.batch_size} is not divisible by the {self.world} ranks; use a multiple of "
                 f"{self.world}")
        self._check_layout()
        if self.ddp and getattr(a, "sync_bn", False) and self.device.type != "cuda":  # else DDP raises inside
            fail("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU); drop --sync-bn to "
                 "keep BatchNorm per rank")
        a.out = self.out = self._choose_out()
        for k in shape_flags if ckpt else ():
            if ckpt["args"].get(k) is not None and getattr(a, k) != ckpt["args"][k]:
                flag = "--" + k.replace("_", "-")
                fail(f"{a.resume} was trained with {flag} {ckpt['args'][k]}, which {flag} {getattr(a, k)} does not "
                     f"fit; drop {flag} to use the checkpoint's")

    def _check_layout(self, images=None):
        """A checkpoint saved part-way through an epoch stands at a batch of its own layout (its images in batches
        of its global --batch-size; any number of ranks shares them): in another, that batch is another place in
        the epoch or past its end."""
        a, ckpt = self.args, self.ckpt
        self.layout = {"batch_size": a.batch_size, "images": images}
        if not (ckpt and self.batch):
            return
        saved = ckpt.get("layout", {"batch_size": ckpt["args"]["batch_size"]})   # (older: the batch size alone)
        if any(saved.get(k, v) != v for k, v in self.layout.items() if v is not None):
            fail(f"{a.resume} stopped part-way through epoch {self.epoch + 1}, at batch {self.batch} of "
                 + (f"{saved['images']} images " if "images" in saved else "")
                 + f"in batches of --batch-size {saved['batch_size']}; resume it with those, or resume a checkpoint "
                 f"saved at an epoch's end")

    def _ready(self):
        a, ckpt = self.args, self.ckpt
        if not self.train and not a.sample:
            fail(f"nothing to train: {f'{a.resume} has finished {self.epoch} epochs' if ckpt else '--epochs is 0'} "
                 f"and no --sample was asked for; raise --epochs to train on")
        if ckpt and self.train and 0 < a.max_steps <= self.step:
            fail(f"nothing to train: {a.resume} is already at step {self.step} and --max-steps is {a.max_steps}; "
                 f"raise --max-steps or drop it")
        if self.rank == 0:  # an output folder that cannot be written is found now, not after the first epoch
            try:
                os.makedirs(self.out, exist_ok=True)
                tempfile.TemporaryFile(dir=self.out).close()
            except OSError as e:
                fail(f"cannot write to the output folder {self.out} ({e.strerror or e}); choose another --out")

    def _choose_out(self):
        """--out, else runs/<script>-<data> or the --resume checkpoint's folder. A new run never destroys an
        earlier one, and resuming a checkpoint (best.pt) never rewinds the run it came from: where the folder
        holds another run, a typed --out is refused and a default one becomes the next free folder (-2, ...)."""
        a, self.notice = self.args, None
        default = os.path.dirname(os.path.abspath(a.resume)) if a.resume else \
            os.path.join("runs", f"{self.script}-{os.path.basename(os.path.normpath(a.data))}")
        out, here = a.out or default, os.path.join(a.out or default, "ckpt.pt")
        own = a.resume and os.path.exists(here) and os.path.samefile(here, a.resume)  # the folder's own ckpt.pt
        if not self.train or not _holds_run(out) or own:
            return out
        what = f"resuming {a.resume} (step {self.step}) there would rewind it" if a.resume else \
            "a new run there would overwrite it"
        if a.out:
            fail(f"--out {out} holds a run already and {what}; continue that run with --resume {here}, or choose a "
                 f"fresh --out")
        n = next(n for n in range(2, 10 ** 6) if not _holds_run(f"{default}-{n}"))
        self.notice = f"{default} holds a run already and {what}: this run writes to {default}-{n}"
        return f"{default}-{n}"

    def check_memory(self, dry_run, widths="the network widths"):
        """Refuse what cannot fit before allocating any of it: dry_run(b) builds the networks on the meta device
        (shapes only, no memory) and runs one step's forward passes on b images, this rank's share of the batch
        (BatchNorm's batch statistics need two where a layer gives one value per channel). The estimate: 4 float32
        copies of every parameter (weights, gradients, two optimizer moments) and every layer's output (kept for
        the backward)."""
        outputs = []

        def count(m, _inputs, out):
            if not list(m.children()) and torch.is_tensor(out):
                outputs.append(out.numel())
        b = self.args.batch_size // self.world
        try:
            with torch.device("meta"), nn.modules.module.register_module_forward_hook(count):
                nets = dry_run(b)
        except ValueError as e:  # a size the architecture cannot take, or too few images for BatchNorm
            fail(f"--batch-size {self.args.batch_size} leaves {b} image per rank, too few for BatchNorm's batch "
                 f"statistics; use at least {2 * self.world}" if "value per channel" in str(e) else e)
        need = 4 * (4 * sum(p.numel() for net in nets for p in net.parameters()) + sum(outputs))
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (no sysconf: Windows)
            have = torch.cuda.mem_get_info(self.device)[1] if self.device.type == "cuda" else \
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if need > have:
                fail(f"training at --img-size {self.args.img_size} with --batch-size {self.args.batch_size} needs "
                     f"about {need / 2**30:.0f} GiB but the {self.device.type} device has {have / 2**30:.0f} GiB; "
                     f"lower --img-size, --batch-size or {widths}")

    # --- the parts of the setup
    def images(self, split="train"):
        """uint8 images of the run's dataset (args.channels becomes theirs); None for a split it does not have."""
        a = self.args
        if split == "test" and not has_test_split(a.data):
            return None
        try:
            images = load(a.data, root=a.data_root, split=split, img_size=a.img_size, channels=a.channels,
                          crop=a.crop).images
        except DataError as e:
            fail(e)
        except KeyboardInterrupt:
            interrupted(f"while reading {a.data}; nothing was trained or written")
        a.channels = images.shape[1]
        return images

    def loader(self, channels_last=False):
        """This rank's share of the training images as [-1, 1] batches on the device (None when the run only
        samples); then every setting is printed."""
        a, loader = self.args, None
        if self.train:
            images = self.images()
            try:
                loader = Loader(images, a.batch_size, self.device, seed=a.seed, flip=a.flip, rank=self.rank,
                                world_size=self.world, channels_last=channels_last)
            except DataError as e:
                fail(e)
            self.n = len(loader)
            self._check_layout(len(images))
        self.log("settings: " + " ".join(f"{k}={v}" for k, v in vars(a).items()))
        return loader

    def memory_format(self, cpu=False):
        """Channels-last (NHWC) for convolutions on CUDA (cuDNN), and on the CPU where cpu says it is faster."""
        return torch.channels_last if self.device.type == "cuda" or cpu and self.device.type == "cpu" \
            else torch.contiguous_format

    @property
    def fused(self):
        """The optimizers' fastest form: one fused kernel per step on CUDA, foreach elsewhere."""
        return {"fused": True} if self.device.type == "cuda" else {"foreach": True}

    def restore(self, memory_format=torch.contiguous_format, **parts):
        """Each network and optimizer under its name in the checkpoint: its state when resuming (a network's
        first, moved to the device: an optimizer's state must then match its parameters' device, dtype and
        strides, which fused CUDA kernels check). save() writes them."""
        for name, part in parts.items():
            try:
                if isinstance(part, nn.Module):
                    part.load_state_dict(self.ckpt[name]) if self.ckpt else None
                    part.to(self.device, memory_format=memory_format)
                elif self.ckpt:
                    part.load_state_dict(self.ckpt[name])  # on the parameters' device and dtype, the saved strides
                    for p, state in part.state.items():
                        for k, v in state.items():
                            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                                state[k] = torch.empty_like(p).copy_(v)
            except KeyError:
                fail(f"{self.args.resume} has no {name!r} entry: it is damaged or not {self.script}.py's")
            self.parts[name] = part

    def fixed_noise(self, n, dim):
        """The latent batch of every epoch's grid: the checkpoint's, or n x dim drawn from the seed."""
        z = self.ckpt["fixed_z"] if self.ckpt else torch.randn(n, dim, generator=torch.Generator().manual_seed(
            self.args.seed))
        self.parts["fixed_z"] = z = z.to(self.device)
        return z

    def show(self, **nets):
        """Each network's parameter count ('G: 3,576,704 parameters   D: ...'; a tuple adds its modules)."""
        count = lambda m: sum(p.numel() for x in (m if isinstance(m, tuple) else (m,)) for p in x.parameters())
        self.log("   ".join(f"{name}: {count(m):,} parameters" for name, m in nets.items()))
        if self.ckpt:
            self.log(f"resumed from {self.args.resume}: epoch {self.epoch + 1}, batch {self.batch}, step {self.step}")

    def wrap(self, net, ddp=True):
        """The copy of net that trains: DDP under torchrun (gradients averaged over the ranks; BatchNorm per rank
        unless --sync-bn) and torch.compile with --compile. net itself stays plain: it is saved and sampled."""
        if self.ddp and ddp:
            if getattr(self.args, "sync_bn", False):
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # in place: net's children are replaced
            net = DDP(net, device_ids=[self.device] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.args.compile else net

    # --- the parts of the training loop
    @contextlib.contextmanager
    def stop_signals(self):
        """While training, Ctrl-C and SIGTERM (what torchrun sends its workers) only raise a flag: the step in
        flight finishes, the ranks agree at the next log step, the checkpoint is saved and finish() exits with
        128 + the signal. A second one ends the process at once. The old handlers come back however it ends."""
        def handler(signum, _frame):
            self.caught = signum
            signal.signal(signum, signal.SIG_DFL)
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def training(self):
        """Whether there is more to train: epochs left, --max-steps not reached, no stop signal."""
        a = self.args
        at_max = a.max_steps and self.step >= a.max_steps
        return self.train and self.epoch < a.epochs and not self.signum and not at_max

    def batches(self, loader):
        """The rest of the epoch's batches from where the run stands; step_done() counts each step. Ends early at
        --max-steps or a stop signal; after the last batch the run stands at the next epoch."""
        self.t0, self.seen = time.perf_counter(), 0
        for x in loader.epoch(self.epoch, start=self.batch):
            yield x
            if self.stopping:
                break
        self._agree(f"in epoch {self.epoch + 1}")
        if self.batch == self.n:
            self.epoch, self.batch = self.epoch + 1, 0

    def step_done(self, values):
        """After each optimizer step: count it and flag a non-finite value (on the device: no host sync). True
        at a log step, where the ranks have agreed on NaN and stop signals (the one host sync)."""
        a = self.args
        self.step, self.batch, self.seen = self.step + 1, self.batch + 1, self.seen + a.batch_size
        self.bad |= ~torch.isfinite(torch.stack([v.detach().float() for v in values.values()]).sum())
        at_max = bool(a.max_steps and self.step >= a.max_steps)
        due = self.step % a.log_every == 0 or at_max or bool(self.caught and not self.ddp)
        if due:
            self._agree(f"by step {self.step}")
        self.stopping = at_max or bool(self.signum)
        return due

    def _agree(self, where):
        flags = torch.stack([self.bad.float(), torch.tensor(float(self.caught), device=self.device)])
        if self.ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, signum = flags.tolist()
        if nonfinite:
            ckpt = os.path.join(self.out, "ckpt.pt")
            fail(f"the losses became NaN/inf {where}; stopping: " + (f"the last good checkpoint is {ckpt}" if
                 os.path.exists(ckpt) else "no checkpoint was saved") + " (try a lower --lr)")
        self.signum = int(signum)

    def set_lr(self, lr, *optimizers):
        """This step's learning rate: lr, or with --lr-decay linear lr (1 - t / T) at step t of the run's T (the
        CIFAR-10 report's schedule; from the position, so a resumed run agrees)."""
        if self.args.lr_decay == "linear":
            lr *= 1 - (self.epoch * self.n + self.batch) / (self.args.epochs * self.n)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr

    @property
    def label(self):
        """The epoch the last steps were in, for file names: a partial epoch is named after itself."""
        return self.epoch if self.batch == 0 else self.epoch + 1

    def save(self, name="ckpt.pt"):
        """OUT/name (ckpt.pt, best.pt): the script's name, its flags, where the run stands, and restore()'s parts."""
        path = os.path.join(self.out, name)
        try:
            save_checkpoint(path, {"script": self.script, "args": vars(self.args), "epoch": self.epoch,
                                   "batch": self.batch, "step": self.step, "layout": self.layout,
                                   **{k: v.cpu() if torch.is_tensor(v) else v.state_dict()
                                      for k, v in self.parts.items()}})
        except DataError as e:
            kept = f"the previous {name} is kept" if os.path.exists(path) else f"no {name} was saved"
            fail(f"{e}; {kept}{'' if name == 'ckpt.pt' else f' and ckpt.pt holds step {self.step}'}. Free some disk "
                 f"space, then resume")

    def finish(self):
        """After the training loop: a stop signal ends the process (exit 128 + signal: 130 for Ctrl-C)."""
        ckpt = os.path.join(self.out, "ckpt.pt")
        if self.signum:
            self.log(f"stopped by signal {self.signum}: checkpoint saved to {ckpt}; continue with --resume {ckpt}")
        if self.ddp:
            dist.destroy_process_group()
        if self.signum:
            sys.exit(128 + self.signum)
