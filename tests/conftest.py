"""Shared fixtures: tiny generated image folders (plain, CelebA in torchvision and Kaggle layouts,
with attribute files, corrupt files, unusual image modes), a no-network switch, and the real-data
root (DATA_ROOT or ../shared/datasets, skipped with a reason when absent)."""
import os
import pathlib
import socket
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # import data, dcgan, ... from the repository root

CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
    "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
    "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
CELEBA_N, CELEBA_PARTITION = 12, [0] * 8 + [1] * 2 + [2] * 2  # 8 train, 2 valid, 2 test


def random_image(size=(40, 30), seed=0, mode="RGB"):
    """A smooth random PIL image (a colour gradient plus noise), deterministic in seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + \
        np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 255, 3)
    arr = np.clip(ramp / 2 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def write_images(folder, names, size=(40, 30), seed=0):
    """Write one random image per relative name (the suffix picks the format); returns the paths."""
    paths = []
    for i, name in enumerate(names):
        path = pathlib.Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(size, seed + i).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def make_images():
    """The write_images(folder, names, size=(40, 30), seed=0) helper, for other test files."""
    return write_images


@pytest.fixture
def image_folder(tmp_path):
    """12 images (JPEG and PNG, two sizes) in nested subfolders, plus a non-image file."""
    folder = tmp_path / "images"
    write_images(folder, [f"a/{i:02d}.jpg" for i in range(6)], size=(48, 40))
    write_images(folder, [f"b/c/{i:02d}.png" for i in range(6)], size=(30, 50), seed=100)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def attr_folder(image_folder):
    """image_folder with attributes.csv (filename,Smiling,Male; values 1/-1): Smiling is 1 for
    even numbers, Male for the PNGs. Paths are relative to the folder."""
    rows = ["filename,Smiling,Male"] + [
        f"{p.relative_to(image_folder).as_posix()},{1 if int(p.stem) % 2 == 0 else -1},"
        f"{1 if p.suffix == '.png' else -1}" for p in sorted(image_folder.rglob("*.*g"))]
    (image_folder / "attributes.csv").write_text("\n".join(rows) + "\n")
    return image_folder


@pytest.fixture
def corrupt_folder(tmp_path):
    """6 readable JPEGs (good_0..5.jpg) and 3 broken files: truncated.jpg, garbage.png, empty.jpg."""
    folder = tmp_path / "corrupt"
    good = write_images(folder, [f"good_{i}.jpg" for i in range(6)])
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (folder / "garbage.png").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture
def odd_images(tmp_path):
    """{description: path} of images in unusual modes, 8x6 pixels each."""
    rgb = random_image((8, 6), 7)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    gray16 = Image.fromarray(np.array([[0, 256, 32768, 65535] * 2] * 6, dtype=np.uint16))
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    images = {"gray": rgb.convert("L"), "rgba": rgba, "la": rgba.convert("LA"), "palette": palette,
              "16bit": gray16, "1bit": rgb.convert("1"), "cmyk": rgb.convert("CMYK")}
    suffix = {"cmyk": ".jpg"}
    paths = {}
    for key, img in images.items():
        paths[key] = tmp_path / f"{key}{suffix.get(key, '.png')}"
        img.save(paths[key])
    return paths


def make_celeba(root, kaggle=False):
    """CELEBA_N 178x218 JPEGs and the attribute and partition files under root/celeba, in
    torchvision's layout (img_align_celeba/, .txt lists) or Kaggle's (nested img_align_celeba/,
    .csv lists). Attribute j of image i is 1 when (i + j) % 3 == 0, else -1."""
    base = root / "celeba"
    images = base / "img_align_celeba" / ("img_align_celeba" if kaggle else "")
    names = [f"{i + 1:06d}.jpg" for i in range(CELEBA_N)]
    write_images(images, names, size=(178, 218), seed=500)
    values = [[1 if (i + j) % 3 == 0 else -1 for j in range(40)] for i in range(CELEBA_N)]
    if kaggle:
        attr = ["image_id," + ",".join(CELEBA_ATTRS)] + [
            ",".join([n] + [str(v) for v in row]) for n, row in zip(names, values)]
        part = ["image_id,partition"] + [f"{n},{p}" for n, p in zip(names, CELEBA_PARTITION)]
    else:
        attr = [str(CELEBA_N), " ".join(CELEBA_ATTRS)] + [
            " ".join([n] + [f"{v:2d}" for v in row]) for n, row in zip(names, values)]
        part = [f"{n} {p}" for n, p in zip(names, CELEBA_PARTITION)]
    ext = "csv" if kaggle else "txt"
    (base / f"list_attr_celeba.{ext}").write_text("\n".join(attr) + "\n")
    (base / f"list_eval_partition.{ext}").write_text("\n".join(part) + "\n")
    return root


@pytest.fixture
def celeba_root(tmp_path):
    """A data root holding a tiny CelebA in torchvision's layout (see make_celeba)."""
    return make_celeba(tmp_path / "tv")


@pytest.fixture
def celeba_kaggle_root(tmp_path):
    """A data root holding the same tiny CelebA in Kaggle's layout (see make_celeba)."""
    return make_celeba(tmp_path / "kaggle", kaggle=True)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, as on a machine without network access."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the tests")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _real_data_root():
    root = pathlib.Path(os.environ.get("DATA_ROOT") or REPO.parent / "shared" / "datasets")
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found in {root}/MNIST/raw: set DATA_ROOT to a folder holding "
                    f"MNIST/raw in torchvision's layout")
    return root


@pytest.fixture(scope="session")
def DATA_ROOT():
    """The real-data root (env DATA_ROOT, else ../shared/datasets), with MNIST/raw; skips when absent.
    Treat it as read-only: pass cache_dir (or use mnist_root) so no cache is written there."""
    return _real_data_root()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A writable data root whose MNIST/raw links to the real files, so the cache lands in a temp
    folder built once per test session; skips when the real MNIST is absent."""
    root = tmp_path_factory.mktemp("mnist_root")
    (root / "MNIST").mkdir()
    (root / "MNIST" / "raw").symlink_to(_real_data_root() / "MNIST" / "raw")
    return root
