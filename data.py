"""data.py: datasets -> cached uint8 tensors -> shuffled float batches on the device.

    ds = data.load("celeba", root="data", img_size=64)        # ImageSet: .images uint8 N x C x H x W
    loader = data.Loader(ds.images, 128, "cuda", flip=True)
    for x in loader.epoch(0): ...                               # float32 in [-1, 1] on the device

Sources: mnist, fashion-mnist, cifar10 (torchvision downloaders), celeba (torchvision
or Kaggle layout), any folder of images (recursive), and fake (synthetic, no disk).
"""
import dataclasses
import pathlib

import numpy as np
import torch
from PIL import Image

DATASETS = ("mnist", "fashion-mnist", "cifar10", "celeba", "fake")
DEFAULT_IMG_SIZE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "celeba": 64, "fake": 32}
FOLDER_IMG_SIZE = 64
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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
    """uint8 -> float32 in [-1, 1]."""
    return u8.float().div_(127.5).sub_(1)


# ---------------------------------------------------------------- fake: synthetic shapes
FAKE_SIZE = {"train": 2048, "test": 512}
FAKE_ATTRS = ["Bright", "Large", "Striped"]
FAKE_CLASSES = ["disk", "square", "diamond", "ring", "hbar", "vbar", "cross", "triangle", "x", "dots"]


def _shape_mask(c, u, v):
    """Mask of class c's shape in coordinates (u, v) scaled so the shape spans about [-1, 1]."""
    a, b, r = u.abs(), v.abs(), (u * u + v * v).sqrt()
    inside = torch.maximum(a, b) < 1
    return [r < 1, torch.maximum(a, b) < 0.8, a + b < 1, (r > 0.5) & (r < 1), (b < 0.3) & inside,
            (a < 0.3) & inside, ((a < 0.25) | (b < 0.25)) & inside, (v < 0.7) & (v > 2 * a - 1),
            (((u - v).abs() < 0.3) | ((u + v).abs() < 0.3)) & inside,
            ((u - 0.5) ** 2 + b * b < 0.2) | ((u + 0.5) ** 2 + b * b < 0.2)][c]


def fake(split="train", img_size=32, channels=3):
    """Deterministic synthetic ImageSet: 10 classes of coloured shapes with 3 binary attributes."""
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
        raise DataError(f"image folder {folder} does not exist")
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


# ---------------------------------------------------------------- load
def load(name_or_folder, root="data", split="train", img_size=None, channels=None, crop=None,
         download=True, verbose=True):
    name = str(name_or_folder)
    if name == "fake":
        return fake(split, img_size or DEFAULT_IMG_SIZE["fake"], channels or 3)
    raise DataError(f"dataset {name!r} is not available yet; use one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------- batches
class Loader:
    """Shuffled float batches in [-1, 1] on the device; seeded, optionally sharded by rank."""

    def __init__(self, images, batch_size, device, seed=0, flip=False, rank=0, world_size=1,
                 channels_last=False):
        images = getattr(images, "images", images)
        self.device = torch.device(device)
        self.batch = batch_size // world_size
        self.per_rank = len(images) // world_size
        if self.batch < 1 or self.per_rank < self.batch:
            raise DataError(f"{len(images)} images over {world_size} rank(s) is less than one batch "
                            f"of {batch_size}; lower --batch-size")
        self.seed, self.flip, self.rank = seed, flip, rank
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.on_device = self.device.type == "cpu" or (
            self.device.type == "cuda" and images.nbytes < torch.cuda.mem_get_info(self.device)[0] / 2)
        if self.device.type not in ("cpu", "cuda"):
            self.on_device = True
        self.images = images.to(self.device) if self.on_device else images.pin_memory()

    def __len__(self):
        return self.per_rank // self.batch

    def epoch(self, epoch=0):
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.images), generator=g)
        shard = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        if self.on_device:
            shard = shard.to(self.device)
        flips = torch.rand(len(shard), generator=g) < 0.5
        for i in range(len(self)):
            idx = shard[i * self.batch:(i + 1) * self.batch]
            x = self.images.index_select(0, idx)
            x = to_float(x.to(self.device, non_blocking=True, memory_format=self.memory_format))
            if self.flip:
                f = flips[i * self.batch:(i + 1) * self.batch].to(self.device).view(-1, 1, 1, 1)
                x = torch.where(f, x.flip(3), x)
            yield x
