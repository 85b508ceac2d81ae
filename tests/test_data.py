"""data.py through its public functions: sources, preprocessing, bad input, the cache, Loader."""
import contextlib
import errno
import os
import re
import socket
import stat
import sys
import threading
import time
import types
import urllib.request
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import data
from conftest import CELEBA_ATTRS, CELEBA_N, CELEBA_PARTITION


def load(source, tmp_path, **kw):
    return data.load(source, root=tmp_path / "data", verbose=False, **kw)


@pytest.fixture
def decodes(monkeypatch):
    """Counts how many times load() decoded images (cache misses)."""
    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ---------------------------------------------------------------- fake
def test_fake_is_deterministic_labelled_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = data.load("fake", verbose=False), data.load("fake", root="data", verbose=False)
    assert list(tmp_path.iterdir()) == []
    assert a.images.shape == (2048, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.labels.bincount().tolist() == [205] * 8 + [204] * 2 and len(a.classes) == 10
    assert a.attr_names == ["Bright", "Large", "Striped"] and a.attrs.shape == (2048, 3)
    assert ((a.attrs.float().mean(0) > 0.3) & (a.attrs.float().mean(0) < 0.7)).all()
    test = data.load("fake", split="test", img_size=64, channels=1)
    assert test.images.shape == (512, 1, 64, 64)
    assert not torch.equal(data.load("fake", split="test").images[:512], a.images[:512])


def test_fake_attributes_describe_the_pictures():
    ds = data.fake("train", 32, 3)
    corner = ds.images[:, :, 0, 0].float().mean(1)           # the background
    bright = ds.attrs[:, 0].bool()
    assert corner[bright].min() > 150 and corner[~bright].max() < 50
    shape_pixels = (ds.images != ds.images[:, :, :1, :1]).any(1).flatten(1).sum(1).float()
    large = ds.attrs[:, 1].bool()
    assert shape_pixels[large].mean() > 2 * shape_pixels[~large].mean()


# ---------------------------------------------------------------- single images
def test_read_image_converts_every_mode(odd_images):
    rgb = np.asarray(Image.open(odd_images["rgba"]).convert("RGB")).astype(float)
    rgba = data.read_image(odd_images["rgba"])
    assert rgba.shape == (3, 6, 8)
    # composited on black: colour * alpha / 255 with alpha 128
    assert np.abs(rgba.permute(1, 2, 0).numpy() - rgb * 128 / 255).max() <= 1
    gray = data.read_image(odd_images["gray"], channels=3)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert data.read_image(odd_images["gray"], channels=1).shape == (1, 6, 8)
    assert data.read_image(odd_images["la"], channels=1).shape == (1, 6, 8)
    palette = Image.open(odd_images["palette"]).convert("RGB")
    assert np.array_equal(data.read_image(odd_images["palette"]).permute(1, 2, 0).numpy(), np.asarray(palette))
    assert Image.open(odd_images["16bit"]).mode.startswith("I")
    # 16-bit 0, 256, 32768, 65535 scale to 8-bit 0, 1, 128, 255 (clipping would give 0, 255, 255, 255)
    assert data.read_image(odd_images["16bit"], channels=1)[0, 0, :4].tolist() == [0, 1, 128, 255]
    assert set(data.read_image(odd_images["1bit"], 1).unique().tolist()) <= {0, 255}
    assert data.read_image(odd_images["cmyk"]).shape == (3, 6, 8)


def test_folder_of_every_mode_loads(odd_images, tmp_path):
    ds = load(odd_images["gray"].parent, tmp_path, img_size=4, channels=1)
    assert ds.images.shape == (len(odd_images), 1, 4, 4)


def test_unreadable_image_is_one_clear_sentence(corrupt_folder):
    for name in ["truncated.jpg", "garbage.png", "empty.jpg"]:
        with pytest.raises(data.DataError, match=f"cannot read image .*{name}"):
            data.read_image(corrupt_folder / name)


def test_list_images_is_sorted_recursive_and_skips_other_files(image_folder, tmp_path):
    files = data.list_images(image_folder)
    assert [f.relative_to(image_folder).as_posix() for f in files] == \
        [f"a/{i:02d}.jpg" for i in range(6)] + [f"b/c/{i:02d}.png" for i in range(6)]
    with pytest.raises(data.DataError, match="does not exist"):
        data.list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no image files"):
        data.list_images(tmp_path / "empty")


# ---------------------------------------------------------------- folders
def test_folder_matches_torchvision_resize_and_center_crop(image_folder, tmp_path):
    ds = load(image_folder, tmp_path)
    assert ds.images.shape == (12, 3, 64, 64) and ds.labels is None and ds.attrs is None
    small = load(image_folder, tmp_path, img_size=16, channels=1, crop=28)
    assert small.images.shape == (12, 1, 16, 16)
    for i, path in [(0, image_folder / "a/00.jpg"), (11, image_folder / "b/c/05.png")]:
        img = Image.open(path)
        want = T.Compose([T.Resize(64), T.CenterCrop(64), T.PILToTensor()])(img.convert("RGB"))
        assert (ds.images[i].int() - want.int()).abs().max() <= 1
        want = T.Compose([T.CenterCrop(28), T.Resize(16), T.CenterCrop(16), T.PILToTensor()])(img.convert("L"))
        assert (small.images[i].int() - want.int()).abs().max() <= 1


def test_folder_attributes_from_csv(attr_folder, tmp_path):
    ds = load(attr_folder, tmp_path)
    assert ds.attr_names == ["Smiling", "Male"]
    assert ds.attrs[:, 0].tolist() == [1, 0, 1, 0, 1, 0] * 2
    assert ds.attrs[:, 1].tolist() == [0] * 6 + [1] * 6
    csv = tmp_path / "elsewhere.csv"                         # attr_csv=PATH, basenames, 1/0 values
    csv.write_text("file,Odd\n" + "".join(f"{p.name},{int(p.stem) % 2}\n" for p in data.list_images(attr_folder)))
    assert load(attr_folder, tmp_path, attr_csv=csv).attrs[:, 0].tolist() == [0, 1, 0, 1, 0, 1] * 2


@pytest.mark.parametrize("text, message", [
    ("filename,Smiling\na/00.jpg,1\n", "11 images have no row"),
    ("filename,Smiling\n" + "".join(f"a/{i:02d}.jpg,2\n" for i in range(6)), "1/0 or 1/-1"),
])
def test_bad_attributes_csv(image_folder, tmp_path, text, message):
    (image_folder / "attributes.csv").write_text(text)
    with pytest.raises(data.DataError, match=message):
        load(image_folder, tmp_path)


def test_corrupt_files_are_skipped_with_a_count(corrupt_folder, tmp_path, capsys):
    ds = load(corrupt_folder, tmp_path, img_size=8)
    assert ds.images.shape == (6, 3, 8, 8)
    err = capsys.readouterr().err
    assert "skipped 3 unreadable images" in err and "empty.jpg" in err
    assert not list((tmp_path / "data" / "cache").glob("*tmp*"))
    for name in ["good_0.jpg", "good_1.jpg", "good_2.jpg", "good_3.jpg", "good_4.jpg", "good_5.jpg"]:
        (corrupt_folder / name).unlink()
    with pytest.raises(data.DataError, match="none of the 3 images"):
        load(corrupt_folder, tmp_path)


@pytest.mark.parametrize("kw, message", [(dict(img_size=-1), "img_size must be at least 1 pixel, not -1"),
                                         (dict(img_size=0), "img_size must be at least 1 pixel, not 0"),
                                         (dict(crop=-5), "crop must be 0 (no crop) or more pixels, not -5")])
def test_bad_img_size_and_crop_are_refused_before_the_cache(image_folder, tmp_path, kw, message):
    for source in (image_folder, "fake"):
        with pytest.raises(data.DataError, match=re.escape(message)):
            load(source, tmp_path, **kw)
    assert not (tmp_path / "data").exists()
    assert torch.equal(load(image_folder, tmp_path, img_size=8, crop=0).images,  # 0: no crop, as None
                       load(image_folder, tmp_path, img_size=8).images)


def test_bad_names_and_folders(tmp_path, image_folder):
    with pytest.raises(data.DataError, match="unknown dataset 'celebA'.*mnist, fashion-mnist, cifar10, celeba, fake"):
        load("celebA", tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        load(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(data.DataError, match="is not a folder"):
        load(str(image_folder / "a/00.jpg"), tmp_path)
    with pytest.raises(data.DataError, match="no test split"):
        load(image_folder, tmp_path, split="test")
    with pytest.raises(data.DataError, match="unknown split"):
        load("fake", tmp_path, split="valid")
    assert data.has_test_split("mnist") and not data.has_test_split(str(image_folder))


# ---------------------------------------------------------------- the cache
def test_cache_is_reused_and_invalidated(image_folder, tmp_path, decodes):
    first = load(image_folder, tmp_path, img_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # e.g. torch's non-writable array warning
        again = load(image_folder, tmp_path, img_size=16)
    assert len(decodes) == 1 and torch.equal(first.images, again.images)
    for kw in [dict(img_size=8), dict(img_size=16, crop=20), dict(img_size=16, channels=1)]:
        load(image_folder, tmp_path, **kw)
    assert len(decodes) == 4
    (image_folder / "a/00.jpg").write_bytes((image_folder / "a/01.jpg").read_bytes())  # new contents
    changed = load(image_folder, tmp_path, img_size=16)
    assert len(decodes) == 5 and torch.equal(changed.images[0], first.images[1])
    (image_folder / "a/03.jpg").unlink()
    assert len(load(image_folder, tmp_path, img_size=16)) == 11 and len(decodes) == 6
    cache = sorted(p.suffix for p in (tmp_path / "data" / "cache").iterdir())
    assert cache == [".npy"] * 6 + [".npz"] * 6


def test_interrupted_cache_build_leaves_nothing_behind(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_decode_chunk", lambda job: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        load(image_folder, tmp_path)
    assert list((tmp_path / "data" / "cache").iterdir()) == []
    monkeypatch.undo()
    assert len(load(image_folder, tmp_path)) == 12


def test_full_disk_is_refused_before_any_cache_file(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, free=10**6))
    with pytest.raises(data.DataError) as e:
        load(image_folder, tmp_path)
    cache = tmp_path / "data" / "cache"            # 12 images of 3 x 64 x 64 bytes, 64 bytes each beside, 64 MiB
    assert str(e.value) == (f"the image cache of images needs 0.07 GB but only 0.00 GB is free in {cache}; "
                            f"free some space or use --data-root on another disk")
    assert list(cache.iterdir()) == []


def test_disk_full_while_writing_the_cache_leaves_nothing_behind(image_folder, tmp_path, monkeypatch):
    def savez_on_a_full_disk(f, **arrays):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    with pytest.raises(data.DataError) as e:
        load(image_folder, tmp_path)
    cache = tmp_path / "data" / "cache"
    assert str(e.value) == (f"cannot write the image cache in {cache} (OSError: [Errno 28] No space left on "
                            f"device); use another --data-root or free some space")
    assert list(cache.iterdir()) == []


def test_a_file_that_became_readable_is_decoded_again(image_folder, tmp_path, monkeypatch):
    """A file skipped as unreadable is decoded once it can be read, though its size and mtime are
    the same: (1) made readable with chmod. The tests run as root, who reads any file, so a
    stand-in for _open refuses files without read permission, as the system does for other users;
    (2) a broken file replaced by a good one of the same size and mtime (cp -p of a same-size file)."""
    real_open = data._open

    def open_as_a_user(path, channels):
        if not os.stat(path).st_mode & stat.S_IRUSR:
            raise data.DataError(f"cannot read image {path}: [Errno 13] Permission denied")
        return real_open(path, channels)
    monkeypatch.setattr(data, "_open", open_as_a_user)
    locked, broken = image_folder / "a/03.jpg", image_folder / "b/c/01.png"
    good, st = broken.read_bytes(), broken.stat()
    broken.write_bytes(bytes(len(good)))
    os.utime(broken, ns=(st.st_atime_ns, st.st_mtime_ns))
    locked.chmod(0)
    assert len(load(image_folder, tmp_path, img_size=8)) == 10
    time.sleep(0.02)                                          # the ctime clock ticks every few ms
    locked.chmod(0o644)
    assert len(load(image_folder, tmp_path, img_size=8)) == 11
    broken.write_bytes(good)
    os.utime(broken, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert broken.stat().st_size == st.st_size and broken.stat().st_mtime_ns == st.st_mtime_ns
    assert torch.equal(load(image_folder, tmp_path, img_size=8).images,
                       load(image_folder, tmp_path / "fresh", img_size=8).images)


def test_parallel_decoding_gives_the_same_array(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DECODE_CHUNK", 2)              # 6 chunks: worker processes
    (image_folder / "b/c/02.png").write_bytes(b"broken")
    two = load(image_folder, tmp_path / "2", workers=2)
    one = load(image_folder, tmp_path / "1", workers=1)
    assert len(two) == 11 and torch.equal(one.images, two.images)


# ---------------------------------------------------------------- CelebA
def test_celeba_both_layouts(celeba_root, celeba_kaggle_root, tmp_path):
    tv = data.load("celeba", root=celeba_root, download=False, verbose=False)
    kg = data.load("celeba", root=celeba_kaggle_root, download=False, verbose=False)
    assert tv.images.shape == (8, 3, 64, 64) and torch.equal(tv.images, kg.images)
    assert tv.attr_names == CELEBA_ATTRS == kg.attr_names and torch.equal(tv.attrs, kg.attrs)
    assert tv.attrs.tolist() == [[int((i + j) % 3 == 0) for j in range(40)] for i in range(8)]
    test = data.load("celeba", root=celeba_kaggle_root / "celeba", split="test", crop=108, verbose=False)
    test_rows = [i for i in range(CELEBA_N) if CELEBA_PARTITION[i] == 2]
    assert test.images.shape == (2, 3, 64, 64)
    assert test.attrs.tolist() == [[int((i + j) % 3 == 0) for j in range(40)] for i in test_rows]
    img = Image.open(celeba_root / "celeba/img_align_celeba/000011.jpg")
    want = T.Compose([T.CenterCrop(108), T.Resize(64), T.PILToTensor()])(img)
    assert (test.images[0].int() - want.int()).abs().max() <= 1


def test_celeba_without_partition_has_no_test_split(celeba_root):
    (celeba_root / "celeba/list_eval_partition.txt").unlink()
    assert len(data.load("celeba", root=celeba_root, img_size=8, verbose=False)) == CELEBA_N
    with pytest.raises(data.DataError, match="list_eval_partition"):
        data.load("celeba", root=celeba_root, split="test", verbose=False)


def test_missing_celeba_says_which_files_to_put_where(tmp_path, no_network, monkeypatch):
    with pytest.raises(data.DataError) as e:
        data.load("celeba", root=tmp_path, download=False)
    assert str(e.value) == f"CelebA is not in {tmp_path / 'celeba'}: put {data.CELEBA_FILES} there"
    monkeypatch.setitem(sys.modules, "gdown", None)         # gdown not installed: "pip install" does not help offline
    with pytest.raises(data.DataError) as e:
        data.load("celeba", root=tmp_path, download=True)
    assert str(e.value) == (f"CelebA is not in {tmp_path / 'celeba'} (torchvision downloads it with the gdown "
                            f"package, which is not installed): put {data.CELEBA_FILES} there")
    # gdown installed, no network: a stand-in that asks Google Drive, as gdown.download does
    gdown = types.ModuleType("gdown")
    gdown.download = lambda id, output, **kw: urllib.request.urlopen(f"https://drive.google.com/uc?id={id}")
    monkeypatch.setitem(sys.modules, "gdown", gdown)
    with pytest.raises(data.DataError) as e:
        data.load("celeba", root=tmp_path, download=True)
    assert str(e.value) == (f"CelebA is not in {tmp_path / 'celeba'} (torchvision's download failed: URLError: "
                            f"<urlopen error network access is disabled in the tests>): put {data.CELEBA_FILES} there")


# ---------------------------------------------------------------- torchvision datasets
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_offline_download_is_one_sentence(tmp_path, no_network, name, folder):
    with pytest.raises(data.DataError) as e:
        data.load(name, root=tmp_path, download=True, verbose=False)
    msg = str(e.value)
    assert f"{name} is not in {tmp_path / folder} and could not be downloaded" in msg
    assert msg.endswith(f"in {tmp_path / folder}") and "\n" not in msg


@pytest.fixture
def silent_server():
    """The URL of a local TCP server that accepts connections and never answers; closed at the end."""
    server, held, stop = socket.create_server(("127.0.0.1", 0)), [], threading.Event()
    server.settimeout(0.1)

    def serve():
        while not stop.is_set():
            with contextlib.suppress(OSError):             # socket.timeout: look at stop again
                held.append(server.accept()[0])
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    thread.join()
    for connection in held + [server]:
        connection.close()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_download_that_never_answers_ends_in_one_sentence(tmp_path, monkeypatch, silent_server, name):
    import torchvision.datasets
    cls, folder, _ = data.TORCHVISION[name]
    dataset = getattr(torchvision.datasets, cls)
    if hasattr(dataset, "mirrors"):                          # MNIST, FashionMNIST
        monkeypatch.setattr(dataset, "mirrors", [silent_server])
    else:                                                    # CIFAR10
        monkeypatch.setattr(dataset, "url", silent_server + dataset.filename)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    elsewhere, real_connect = [], socket.create_connection

    def local_only(address, *args, **kwargs):               # never the real network
        if address[0] != "127.0.0.1":
            elsewhere.append(address)
            raise OSError("only 127.0.0.1 in this test")
        return real_connect(address, *args, **kwargs)
    monkeypatch.setattr(socket, "create_connection", local_only)
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 1)
    errors = []

    def run():
        try:
            data.load(name, root=tmp_path, verbose=False)
        except data.DataError as e:
            errors.append(str(e))
    loading = threading.Thread(target=run, daemon=True)     # without a timeout it would wait forever
    loading.start()
    loading.join(timeout=30)
    assert not loading.is_alive(), "the download still waits for an answer"
    assert errors == [f"{name} is not in {tmp_path / folder} and could not be downloaded (no answer within 1 s); "
                      f"put {data.TORCHVISION[name][2]} in {tmp_path / folder}"]
    assert elsewhere == [] and socket.getdefaulttimeout() is None


def test_real_mnist(mnist_root, DATA_ROOT, decodes):
    ds = data.load("mnist", root=mnist_root, download=False, verbose=False)
    raw = np.fromfile(DATA_ROOT / "MNIST/raw/train-images-idx3-ubyte", np.uint8, offset=16)
    assert ds.images.shape == (60000, 1, 28, 28) and np.array_equal(ds.images.numpy().ravel(), raw)
    assert ds.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4] and ds.classes[0] == "0 - zero"
    assert torch.equal(data.load("mnist", root=mnist_root, verbose=False).labels, ds.labels)
    assert len(decodes) == 1
    test = data.load("mnist", root=mnist_root, split="test", img_size=32, verbose=False)
    assert test.images.shape == (10000, 1, 32, 32) and test.labels.bincount().sum() == 10000


# ---------------------------------------------------------------- Loader
def numbered(n=250):
    """n images whose pixels all hold their index (mod 256 is not needed: n <= 256)."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()


def ids(x):
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_to_float_range():
    assert data.to_float(torch.tensor([0, 255, 51], dtype=torch.uint8)).tolist() == \
        pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])


def test_loader_shapes_range_and_seeded_order():
    loader = data.Loader(numbered(), 32, "cpu", seed=3)
    assert len(loader) == 250 // 32
    batches = list(loader.epoch(0))
    assert len(batches) == 7 and all(b.shape == (32, 1, 2, 2) and b.dtype == torch.float32 for b in batches)
    assert min(b.min() for b in batches) >= -1 and max(b.max() for b in batches) <= 1
    order = sum((ids(b) for b in batches), [])
    assert len(set(order)) == 224
    assert order == sum((ids(b) for b in data.Loader(numbered(), 32, "cpu", seed=3).epoch(0)), [])
    assert order != sum((ids(b) for b in loader.epoch(1)), [])
    gen = torch.Generator().manual_seed(3)                   # the documented seed + epoch rule
    assert order == torch.randperm(250, generator=gen)[:224].tolist()


def test_loader_rank_shards_are_disjoint_and_equal():
    shards = [sum((ids(b) for b in data.Loader(numbered(), 30, "cpu", seed=1, rank=r, world_size=3).epoch(2)), [])
              for r in range(3)]
    assert [len(s) for s in shards] == [80, 80, 80]          # 8 batches of 30 // 3 per rank
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 240


def test_loader_refuses_a_batch_the_ranks_cannot_share():
    with pytest.raises(data.DataError, match="^--batch-size 16 is not divisible by the 3 ranks; use a multiple of 3$"):
        data.Loader(numbered(), 16, "cpu", world_size=3)


def test_loader_epoch_resumes_part_way_with_the_same_order_and_flips():
    images = numbered()
    images[..., 1] = 255                                     # a bright right column shows the flips
    loader = data.Loader(images, 32, "cpu", seed=5, flip=True)
    full = list(loader.epoch(4))
    assert 0 < int((torch.cat(full)[:, 0, 0, 0] == 1).sum()) < 224
    for k in (0, 3, 7):
        assert torch.equal(torch.cat(full[:k] + list(loader.epoch(4, start=k))), torch.cat(full))
    with pytest.raises(data.DataError, match="cannot start epoch 4 at batch 8: it has 7 batches"):
        list(loader.epoch(4, start=8))


def test_loader_flip_and_channels_last():
    images = torch.zeros(64, 3, 4, 4, dtype=torch.uint8)
    images[..., 0] = 255                                     # a bright left column
    x = torch.cat(list(data.Loader(images, 16, "cpu", flip=True, channels_last=True).epoch(0)))
    flipped = x[:, 0, 0, 3] == 1
    assert 10 < flipped.sum() < 54
    assert torch.equal(x[flipped], data.to_float(images.flip(3))[: int(flipped.sum())])
    assert torch.equal(x[~flipped], data.to_float(images)[: int((~flipped).sum())])
    assert x.is_contiguous(memory_format=torch.channels_last)
    again = torch.cat(list(data.Loader(images, 16, "cpu", flip=True).epoch(0)))
    assert torch.equal(again, x)
    assert torch.equal(torch.cat(list(data.Loader(images, 16, "cpu").epoch(0))), data.to_float(images))


def test_loader_takes_an_imageset_and_refuses_too_small_data():
    ds = data.fake("test", 8, 1)
    assert next(iter(data.Loader(ds, 64, "cpu").epoch(0))).shape == (64, 1, 8, 8)
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.Loader(ds, 1024, "cpu")


def test_pinned_loader_on_the_cpu_with_cuda_stood_in(monkeypatch):
    """The path for data too big for the GPU, run on the CPU: the process's current device is
    cuda:0, the loader's cuda:1, a copy to cuda:1 is a CPU copy. Only the two batch buffers are
    pinned; each copy is issued, and its event recorded, on cuda:1's stream."""
    pinned, copies, recorded, active = [], [], [], []
    real_to = torch.Tensor.to

    def to(tensor, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            copies.append((str(args[0]), kwargs.get("non_blocking"), active[-1] if active else None))
            return real_to(tensor, "cpu", copy=True)
        return real_to(tensor, *args, **kwargs)

    @contextlib.contextmanager
    def stream(s):
        active.append(s)
        yield
        active.pop()

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))   # never fits
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tuple(tensor.shape)) or tensor)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device or 'cuda:0'}")
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    images = numbered()
    loader = data.Loader(images, 32, "cuda:1", seed=3, flip=True, channels_last=True)
    assert pinned == [(32, 1, 2, 2)] * 2 and loader.images.data_ptr() == images.data_ptr()
    batches = list(loader.epoch(0))
    assert copies == [("cuda:1", True, "stream of cuda:1")] * 7 and recorded == ["stream of cuda:1"] * 7
    monkeypatch.undo()
    on_device = list(data.Loader(images, 32, "cpu", seed=3, flip=True, channels_last=True).epoch(0))
    assert len(batches) == 7 and all(torch.equal(a, b) for a, b in zip(batches, on_device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fits", [True, False])
def test_loader_on_cuda_in_memory_and_pinned(monkeypatch, fits):
    if not fits:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    loader = data.Loader(numbered(), 32, "cuda", seed=3, channels_last=True)
    assert loader.images.is_cuda == fits and not loader.images.is_pinned()
    assert fits or all(b.is_pinned() for b in loader.buffers)
    batches = list(loader.epoch(0))
    assert all(b.is_cuda for b in batches)
    assert sum((ids(b.cpu()) for b in batches), []) == torch.randperm(250, generator=torch.Generator().manual_seed(3))[:224].tolist()
