"""latent_edit.py through its real entry point (main(argv) in-process, and one real subprocess), on tiny
checkpoints of the five scripts trained for two steps on --data fake (16x16 grey, 10 classes, 3 attributes)."""
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import latent_edit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16  # image side of every tiny checkpoint
TINY = ["--data", "fake", "--img-size", str(S), "--channels", "1", "--batch-size", "16", "--max-steps", "2",
        "--log-every", "1", "--epochs", "1", "--device", "cpu"]
TRAIN = {  # script: its tiny-width flags
    "mlp_vae": ["--latent-dim", "2"],
    "vae_conv": ["--width", "16", "--latent-dim", "8"],
    "vaegan": ["--width", "8", "--latent-dim", "8"],
    "dcgan": ["--ngf", "8", "--ndf", "8", "--latent-dim", "6"],
    "mlp_gan": ["--latent-dim", "6"],
}
ENCODERS = ["mlp_vae", "vae_conv", "vaegan"]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """{script: path of a ckpt.pt trained for 2 steps}, built once per test session."""
    import importlib
    base, paths = tmp_path_factory.mktemp("latent_edit"), {}
    for script, flags in TRAIN.items():
        out = str(base / script)
        importlib.import_module(script).main(TINY + flags + ["--out", out])
        paths[script] = os.path.join(out, "ckpt.pt")
    return paths


@pytest.fixture
def ckpt(ckpts, tmp_path):
    """copy(script) -> a private copy of that checkpoint, so default outputs and caches don't collide."""
    def copy(script):
        (tmp_path / script).mkdir(exist_ok=True)
        return shutil.copy(ckpts[script], tmp_path / script / "ckpt.pt")
    return copy


def edit(*argv):
    """latent_edit.main(argv) on the CPU unless argv names a device (the tests' numbers are float32's)."""
    argv = [str(a) for a in argv]
    return latent_edit.main(argv if "--device" in argv or argv[:1] in (["-h"], []) else argv + ["--device", "cpu"])


def refused(capsys, pattern, *argv):
    """latent_edit.main(argv) must stop with a non-zero exit and one plain sentence matching pattern (from
    sys.exit or argparse), never a traceback; returns everything it printed."""
    with pytest.raises(SystemExit) as stop:
        edit(*argv)
    out = capsys.readouterr()
    said = f"{stop.value.code if isinstance(stop.value.code, str) else ''}\n{out.out}{out.err}"
    assert stop.value.code not in (0, None) and "Traceback" not in said
    assert re.search(pattern, said), said
    return said


def grid_size(cols, rows, pad=2):
    return cols * S + (cols + 1) * pad, rows * S + (rows + 1) * pad


def tiles(path, cols, rows, pad=2):
    """rows x cols x S x S uint8 array of the tiles of a grey grid written by save_image."""
    a = np.asarray(Image.open(path).convert("L"))
    at = lambda i: slice(pad + i * (S + pad), pad + i * (S + pad) + S)  # noqa: E731
    return np.stack([np.stack([a[at(r), at(c)] for c in range(cols)]) for r in range(rows)])


def to_u8(x):  # [-1, 1] -> what save_image writes
    return (((x.clamp(-1, 1) + 1) / 2) * 255 + 0.5).clamp(0, 255).to(torch.uint8).squeeze(1).numpy()


def codes(script_ckpt, images):
    model, _ = latent_edit.load(script_ckpt, "cpu")
    with torch.no_grad():
        return model, model.encode(data.to_float(images))[0]


# ----------------------------------------------------------------------------- attribute vectors

@pytest.mark.parametrize("script", ENCODERS)
@pytest.mark.parametrize("attr, column, cls", [("Large", 1, None), ("DISK", None, 0)])
def test_attribute_vector_is_the_difference_of_the_group_means(ckpt, script, attr, column, cls):
    path = ckpt(script)
    out = edit("attribute", "--ckpt", path, "--attr", attr)
    assert out == os.path.join(os.path.dirname(path), f"edit_attribute_{attr.lower()}.png")
    assert Image.open(out).size == grid_size(8, 3)  # originals, reconstructions, one intensity
    # Independently: every training image of fake (2048 < --max-images), its mu, the two means.
    train = data.fake("train", S, 1)
    mask = (train.attrs[:, column] if column is not None else train.labels == cls).bool()
    _, mu = codes(path, train.images)
    name = "Large" if column is not None else "disk"
    vec = torch.load(os.path.join(os.path.dirname(path), f"attr_{name}_10000.pt"), weights_only=True)
    assert vec["attr"] == name and vec["ckpt_step"] == 2
    assert (vec["n_with"], vec["n_without"]) == (int(mask.sum()), int((~mask).sum()))
    torch.testing.assert_close(vec["mean_with"], mu[mask].mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vec["vector"], mu[mask].mean(0) - mu[~mask].mean(0), atol=1e-5, rtol=1e-4)


def test_intensity_zero_reproduces_the_reconstructions_of_held_out_originals(ckpt, tmp_path):
    path = ckpt("vae_conv")
    out = edit("attribute", "--ckpt", path, "--attr", "striped", "--intensities", "0,1", "--n", "5",
               "--save-dir", tmp_path / "edits", "--out", tmp_path / "a.png")
    t = tiles(out, 5, 4)
    assert np.array_equal(t[1], t[2])       # k = 0 row == reconstruction row
    assert not np.array_equal(t[1], t[3])   # k = 1 changed something
    # Each original is a held-out image without the attribute, pixel for pixel.
    test = data.fake("test", S, 1)
    without = test.images[test.attrs[:, 2] == 0][:, 0].numpy()
    for original in t[0]:
        assert (without == original).all(axis=(1, 2)).any()
    # --save-dir: one PNG per edited image, identical to the grid's tiles.
    for k, row in (("0", 2), ("1", 3)):
        files = sorted(os.listdir(tmp_path / "edits" / f"intensity_{k}"))
        assert files == [f"{i:06d}.png" for i in range(5)]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "edits" / f"intensity_{k}" / files[4])), t[row][4])


def test_attribute_vector_cache_is_reused_and_invalidated_by_a_new_step(ckpt):
    path = ckpt("mlp_vae")
    edit("attribute", "--ckpt", path, "--attr", "Bright", "--max-images", "300")
    cache = os.path.join(os.path.dirname(path), "attr_Bright_300.pt")
    vec = torch.load(cache, weights_only=True)
    assert vec["n_with"] + vec["n_without"] == 300
    poisoned = dict(vec, vector=torch.full_like(vec["vector"], 7.0))
    torch.save(poisoned, cache)
    edit("attribute", "--ckpt", path, "--attr", "bright", "--max-images", "300")  # same step: reused
    assert torch.equal(torch.load(cache, weights_only=True)["vector"], poisoned["vector"])
    torch.save(dict(poisoned, ckpt_step=1), cache)  # written for another step: recomputed
    edit("attribute", "--ckpt", path, "--attr", "bright", "--max-images", "300")
    assert torch.equal(torch.load(cache, weights_only=True)["vector"], vec["vector"])


def test_vector_decodes_the_attribute_vector_alone_and_added_to_the_mean(ckpt, tmp_path):
    path = ckpt("mlp_vae")
    out = edit("vector", "--ckpt", path, "--attr", "large", "--intensities", "0,1,3")
    assert out.endswith("edit_vector_large.png") and Image.open(out).size == grid_size(3, 2)
    vec = torch.load(os.path.join(os.path.dirname(path), "attr_Large_10000.pt"), weights_only=True)
    model, _ = latent_edit.load(path, "cpu")
    with torch.no_grad():
        want = to_u8(model.decode(torch.stack([3 * vec["vector"], vec["mean_without"] + vec["vector"]])))
    t = tiles(out, 3, 2)
    assert np.abs(t[0][2].astype(int) - want[0]).max() <= 1  # decode(3 z_att)
    assert np.abs(t[1][1].astype(int) - want[1]).max() <= 1  # decode(mean without + z_att)


def test_class_names_match_like_mnist_labels():
    classes = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]
    ds = data.ImageSet("mnist", torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20) % 10, classes)
    for name in ("7", "seven", "7 - SEVEN"):
        canonical, mask = latent_edit.attribute(ds, name)
        assert canonical == "7 - seven" and mask.tolist() == [i % 10 == 7 for i in range(20)]
    with pytest.raises(latent_edit.EditError, match="closest: 7 - seven"):
        latent_edit.attribute(ds, "sevn")


# ----------------------------------------------------------------------------- interpolation

def test_slerp_matches_hand_values():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(latent_edit.slerp(a, b, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    torch.testing.assert_close(latent_edit.slerp(a, b, 1 / 3), torch.tensor([[math.cos(math.pi / 6), 0.5]]))
    torch.testing.assert_close(latent_edit.slerp(a, b, 0.0), a)
    torch.testing.assert_close(latent_edit.slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear


@pytest.mark.parametrize("script", ENCODERS)
def test_interpolate_between_held_out_images(ckpt, script):
    path = ckpt(script)
    out = edit("interpolate", "--ckpt", path, "--from", "0,2", "--to", "1,3", "--steps", "5", "--slerp")
    assert Image.open(out).size == grid_size(7, 2)  # start image, 5 decodes, end image; 2 rows
    t, test = tiles(out, 7, 2), data.fake("test", S, 1).images[:, 0].numpy()
    assert np.array_equal(t[0][0], test[0]) and np.array_equal(t[0][6], test[1])
    assert np.array_equal(t[1][0], test[2]) and np.array_equal(t[1][6], test[3])


@pytest.mark.parametrize("script", ["dcgan", "mlp_gan", "mlp_vae"])
def test_interpolate_between_random_codes(ckpt, script, tmp_path):
    path = ckpt(script)
    out = edit("interpolate", "--ckpt", path, "--steps", "6", "--n", "3", "--out", tmp_path / "i.png")
    assert Image.open(out).size == grid_size(6, 3)
    # Ends are decodes of the seeded prior draws, the middle differs from both.
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, latent_edit.load(path, "cpu")[0].latent_dim, generator=g) for _ in range(2))
    model = latent_edit.load(path, "cpu")[0]
    with torch.no_grad():
        ends = to_u8(latent_edit.decode(model, torch.cat([a, b]), "cpu"))
    t = tiles(out, 6, 3)
    assert np.abs(t[:, 0].astype(int) - ends[:3]).max() <= 1 and np.abs(t[:, 5].astype(int) - ends[3:]).max() <= 1


# ----------------------------------------------------------------------------- latent maps

def test_pca_matches_a_hand_checked_projection():
    # Four points around (1, 1): spread 2 along x, 1 along y -> PC1 = x, PC2 = y, variances 8/3 and 2/3.
    x = torch.tensor([[3.0, 1.0], [-1.0, 1.0], [1.0, 2.0], [1.0, 0.0]])
    proj, dirs, var = latent_edit.pca(x)
    torch.testing.assert_close(dirs, torch.eye(2))
    torch.testing.assert_close(proj, torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    torch.testing.assert_close(var, torch.tensor([8 / 3, 2 / 3]))
    # The same points on the plane spanned by u = (1, 1, 0)/sqrt2 and w = (0, 0, -1) in 3-D, offset by c:
    # the projections are the coefficients; the signs make each direction's largest entry positive,
    # so w comes back as (0, 0, 1) and the second coordinate flips.
    u, w = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), torch.tensor([0.0, 0.0, -1.0])
    c = torch.tensor([5.0, -2.0, 1.0])
    coeffs = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    proj, dirs, _ = latent_edit.pca(c + coeffs[:, :1] * u + coeffs[:, 1:] * w)
    torch.testing.assert_close(dirs, torch.stack([u, -w]))
    torch.testing.assert_close(proj, coeffs * torch.tensor([1.0, -1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("script, extra", [("mlp_vae", []), ("vae_conv", ["--attr", "Large"]), ("vaegan", [])])
def test_scatter_draws_the_codes_with_a_legend(ckpt, script, extra, tmp_path):
    out = edit("scatter", "--ckpt", ckpt(script), "--n", "300", "--size", "300", "--out", tmp_path / "s.png", *extra)
    img = Image.open(out).convert("RGB")
    assert img.size == (300 + 180, 300)
    legend = {img.getpixel((300 + 14, 28 + 18 * g + 6)) for g in range(2 if extra else 10)}
    want = {tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in latent_edit.PALETTE[:len(legend)]}
    assert legend == want  # one legend colour per class (or with/without the attribute)
    plot = np.asarray(img)[40:260, 60:280].reshape(-1, 3)
    assert {tuple(p) for p in plot} & want  # and the points use them


def test_manifold_of_a_2d_latent_is_decoded_at_gaussian_quantiles(ckpt):
    path = ckpt("mlp_vae")
    out = edit("manifold", "--ckpt", path, "--grid", "5")
    assert out.endswith("edit_manifold.png") and Image.open(out).size == (5 * S, 5 * S)
    t = tiles(out, 5, 5, pad=0)
    q = 1.2815515655446004  # the 0.9 quantile of N(0, 1): the corner points of a 5 x 5 grid
    model = latent_edit.load(path, "cpu")[0]
    with torch.no_grad():
        want = to_u8(model.decode(torch.tensor([[0.0, 0.0], [q, q], [-q, -q]])))
    for (r, c), w in zip([(2, 2), (0, 4), (4, 0)], want):  # centre, top right, bottom left
        assert np.abs(t[r][c].astype(int) - w).max() <= 1


@pytest.mark.parametrize("script, extra", [("vae_conv", []), ("vaegan", ["--dims", "3,5"]), ("dcgan", []),
                                           ("mlp_gan", ["--dims", "4,1"])])
def test_manifold_of_a_larger_latent(ckpt, script, extra, tmp_path):
    out = edit("manifold", "--ckpt", ckpt(script), "--grid", "4", "--out", tmp_path / "m.png", *extra)
    assert Image.open(out).size == (4 * S, 4 * S)


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def folder_ckpt(ckpt, tmp_path):
    """(checkpoint of mlp_vae whose dataset is a folder of 6 images, that folder): the model fits it."""
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((S, S), 40 * i, np.uint8)).save(folder / f"{i}.png")
    path = ckpt("mlp_vae")
    c = torch.load(path, weights_only=True)
    c["args"]["data"] = str(folder)
    torch.save(c, path)
    return path, folder


def test_errors_are_one_sentence(ckpt, folder_ckpt, tmp_path, capsys):
    def fails(pattern, *argv):
        refused(capsys, pattern, *argv)
    for cmd in (["attribute", "--attr", "Large"], ["vector", "--attr", "Large"], ["scatter"],
                ["interpolate", "--from", "0", "--to", "1"]):
        fails(r"needs an encoder and a dcgan.py checkpoint has only a generator", *cmd, "--ckpt", ckpt("dcgan"))
    fails(r"fake has no attribute or class 'Smilng'.*; use one of Bright, Large, Striped, disk, square",
          "attribute", "--ckpt", ckpt("vae_conv"), "--attr", "Smilng")
    path, folder = folder_ckpt
    root = ["--data-root", tmp_path / "root"]
    fails("neither attributes nor class labels", "attribute", "--ckpt", path, "--attr", "Smiling", *root)
    (folder / "attributes.csv").write_text("filename,Never,Always,Half\n" + "".join(
        f"{i}.png,-1,1,{1 if i % 2 else -1}\n" for i in range(6)))
    fails("none of the 6 training images used has Never", "vector", "--ckpt", path, "--attr", "never", *root)
    fails("every one of the 6 training images used has Always", "attribute", "--ckpt", path, "--attr", "Always", *root)
    out = edit("attribute", "--ckpt", path, "--attr", "half", "--n", "3", *root)  # a folder: originals from train
    assert Image.open(out).size == grid_size(3, 3)
    other = tmp_path / "other.pt"
    torch.save({"script": "resnet", "args": {}}, other)
    fails(r"was not written by one of dcgan.py, .* \(its script is 'resnet'\)", "manifold", "--ckpt", other)
    fails("needs both --from and --to", "interpolate", "--ckpt", ckpt("mlp_vae"), "--from", "3")
    fails("each from 0 to 511", "interpolate", "--ckpt", ckpt("mlp_vae"), "--from", "0", "--to", "512")
    fails("same number of comma-separated indices", "interpolate", "--ckpt", ckpt("mlp_vae"), "--from", "0,1",
          "--to", "2")
    fails("two different latent dimensions from 0 to 7", "manifold", "--ckpt", ckpt("vae_conv"), "--dims", "2,8")
    fails("two different latent dimensions", "manifold", "--ckpt", ckpt("vae_conv"), "--dims", "3,3")


def test_every_command_runs_with_only_its_required_flags(ckpt):
    path = ckpt("vaegan")
    for cmd in (["attribute", "--attr", "Bright"], ["vector", "--attr", "Bright"], ["interpolate"], ["scatter"],
                ["manifold"]):
        out = edit(*cmd, "--ckpt", path)
        assert os.path.dirname(out) == os.path.dirname(path) and Image.open(out).size[0] > S


def test_command_line_entry_point(ckpt):
    path = ckpt("mlp_vae")
    r = subprocess.run([sys.executable, "latent_edit.py", "manifold", "--ckpt", path, "--grid", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {os.path.join(os.path.dirname(path), 'edit_manifold.png')}" in r.stdout
    r = subprocess.run([sys.executable, "latent_edit.py", "scatter", "--ckpt", path, "--attr", "Smiling"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: fake has no attribute or class 'Smiling'")


# Every flag is checked before the checkpoint is read: torch.load fails the test if it is reached.
FLAG_ERRORS = [
    (["attribute", "--attr", "Large", "--intensities", "nan,inf"], r"'nan,inf' holds a value that is not a finite"),
    (["attribute", "--attr", "Large", "--intensity=-inf"], r"'-inf' holds a value that is not a finite number"),
    (["vector", "--attr", "Large", "--intensities", "0,1e999"], r"'0,1e999' holds a value that is not a finite"),
    (["vector", "--attr", "Large", "--intensities", "1,,2"], r"'1,,2' is not a comma-separated list of numbers"),
    (["attribute", "--attr", "Large", "--intensity", "1,2"], r"'1,2' is not 1 comma-separated numbers"),
    (["interpolate", "--from", "3"], r"needs both --from and --to"),
    (["interpolate", "--from", "0,1", "--to", "x"], r"'x' is not a comma-separated list of integers"),
    (["interpolate", "--from", "0,1", "--to", "2"], r"--from and --to need the same number of comma-separated"),
    (["manifold", "--dims", "x"], r"'x' is not a comma-separated list of integers"),
    (["manifold", "--dims", "1,2,3"], r"'1,2,3' is not 2 comma-separated integers"),
    (["manifold", "--dims", "3,3"], r"--dims needs two different latent dimensions"),
    (["scatter", "--size", "50"], r"--size must be at least 100"),
    (["manifold", "--out", "{tmp}"], r"--out \S+ cannot be written: it is a folder"),
    (["manifold", "--out", "{tmp}/grid.txt"], r"cannot be written: its extension is not an image format"),
    (["manifold", "--out", "{tmp}/note.txt/grid.png"], r"cannot be written: \S+note.txt is a file, not a folder"),
    (["attribute", "--attr", "Large", "--save-dir", "{tmp}/note.txt"], r"--save-dir \S+ cannot be written: it is a"),
]


@pytest.mark.parametrize("argv, pattern", FLAG_ERRORS, ids=[" ".join(a) for a, _ in FLAG_ERRORS])
def test_bad_flags_are_refused_before_the_checkpoint_is_read(ckpt, tmp_path, capsys, argv, pattern):
    path = ckpt("mlp_vae")
    (tmp_path / "note.txt").write_text("a file")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("the checkpoint was read before the flags were checked"))
        refused(capsys, pattern, *argv, "--ckpt", path)
    assert not os.path.exists(os.path.join(os.path.dirname(path), f"edit_{argv[0]}.png"))


@pytest.mark.parametrize("device, n_cuda, pattern", [
    ("cuda", 0, r"--device cuda was asked for but CUDA is not available; use --device cpu"),
    ("cuda:1", 0, r"--device cuda:1 was asked for but CUDA is not available; use --device cpu"),
    ("cuda:2", 2, r"--device cuda:2 was asked for but there are only 2 CUDA devices; use --device cuda:0"),
    ("mps", 0, r"--device mps was asked for but MPS is not available; use --device cpu"),
    ("nonsense", 0, r"'nonsense' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("meta", 0, r"--device meta is not one latent_edit.py runs on"),
])
def test_devices_this_machine_lacks_are_refused_before_the_checkpoint_is_read(ckpt, monkeypatch, capsys,
                                                                              device, n_cuda, pattern):
    # CPU test: the machine's CUDA devices and MPS are replaced by n_cuda pretend ones and none.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    path = ckpt("mlp_vae")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("the checkpoint was read before --device was checked"))
        said = refused(capsys, pattern, "manifold", "--ckpt", path, "--device", device)
    assert "map_location" not in said


def cut_latent(path, d):
    """The latent-2 mlp_vae checkpoint at path rewritten as if trained with --latent-dim d: its args say
    d, and every weight dimension of size 2 (only the latent's, at these widths) keeps its first d."""
    c = torch.load(path, weights_only=True)
    assert c["script"] == "mlp_vae" and c["args"]["latent_dim"] == 2
    c["args"]["latent_dim"] = d
    c["model"] = {k: v[tuple(slice(0, d) if n == 2 else slice(None) for n in v.shape)].clone()
                  for k, v in c["model"].items()}
    torch.save(c, path)
    assert latent_edit.load(path, "cpu")[0].latent_dim == d
    return path


@pytest.mark.parametrize("d", [0, 1])
def test_manifold_of_a_latent_under_2_dimensions_is_refused(ckpt, capsys, d):
    path = cut_latent(ckpt("mlp_vae"), d)
    refused(capsys, rf"a manifold needs a latent of at least 2 dimensions and this mlp_vae.py model has {d}",
            "manifold", "--ckpt", path, "--grid", "3")


class Opaque:  # pickled by reference to this module: not a type torch.load(weights_only=True) allows
    pass


class Payload:  # unpickling it would call os.makedirs(marker)
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def bad_file(kind, folder):
    """The path of a file of some kind that is no checkpoint of this project's scripts."""
    path = folder / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("epoch,step,loss\n1,10,0.5\n")
    elif kind == "random bytes":
        path.write_bytes(b"\x07" + np.random.default_rng(0).bytes(500))
    elif kind == "truncated":
        torch.save({"x": torch.zeros(10000)}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "class instance":
        torch.save({"script": "mlp_vae", "args": {}, "x": Opaque()}, path)
    elif kind == "code":  # a plain pickle (protocol 4) that runs os.makedirs when unpickled unsafely
        path.write_bytes(pickle.dumps(Payload(str(folder / "was_run")), protocol=4))
    elif kind == "torch.save code":
        torch.save({"script": "mlp_vae", "x": Payload(str(folder / "was_run"))}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no script":
        torch.save({"args": {"data": "fake"}, "model": {}}, path)
    elif kind == "no args":
        torch.save({"script": "mlp_vae", "model": {}}, path)
    elif kind == "folder":
        path.mkdir()
    return path


UNSAFE = r"is not a checkpoint written by this project's scripts and may be unsafe to load; nothing in it was run"


@pytest.mark.parametrize("kind, pattern", [
    ("empty", r"empty.pt is empty \(0 bytes\) and not a checkpoint"),
    ("text", r"text.pt is not a PyTorch checkpoint; pass the ckpt.pt"),
    ("random bytes", r"random bytes.pt is not a PyTorch checkpoint; pass the ckpt.pt"),
    ("truncated", r"truncated.pt is a damaged or truncated checkpoint"),
    ("class instance", "class instance.pt " + UNSAFE),
    ("code", "code.pt " + UNSAFE),
    ("torch.save code", "torch.save code.pt " + UNSAFE),
    ("tensor", r"tensor.pt holds a Tensor without a 'script' entry, so it was not written by one of dcgan.py"),
    ("no script", r"no script.pt holds a dict without a 'script' entry, so it was not written by one of"),
    ("no args", r"no args.pt has no settings \('args'\) to rebuild the mlp_vae.py model from"),
    ("missing", r"missing.pt does not exist; pass the ckpt.pt that a model script wrote"),
    ("folder", r"folder.pt is a folder, not a checkpoint; pass the ckpt.pt inside it"),
])
def test_files_that_are_no_checkpoint_of_this_project_are_refused_in_one_sentence(tmp_path, capsys, recwarn,
                                                                                  kind, pattern):
    path = bad_file(kind, tmp_path)
    said = refused(capsys, pattern, "manifold", "--ckpt", path, "--out", tmp_path / "m.png")
    assert "weights_only" not in said and not any("weights_only" in str(w.message) for w in recwarn)
    assert not (tmp_path / "was_run").exists() and not (tmp_path / "m.png").exists()


def test_a_checkpoint_whose_script_cannot_be_imported_is_refused(ckpt, monkeypatch, capsys):
    path = ckpt("mlp_vae")
    monkeypatch.setitem(sys.modules, "mlp_vae", None)  # as if mlp_vae.py were not beside latent_edit.py
    refused(capsys, r"cannot import mlp_vae.py, which rebuilds the model of .*; keep the model scripts next to",
            "manifold", "--ckpt", path)


def test_a_checkpoint_without_its_dataset_is_refused(ckpt, capsys):
    path = ckpt("mlp_vae")
    c = torch.load(path, weights_only=True)
    del c["args"]["data"]
    torch.save(c, path)
    refused(capsys, r"the checkpoint does not say which dataset it was trained on", "scatter", "--ckpt", path)


def test_an_attribute_vector_that_cannot_be_cached_is_still_used(ckpt, tmp_path, capsys):
    path = ckpt("mlp_vae")
    os.mkdir(os.path.join(os.path.dirname(path), "attr_Large_300.pt.tmp"))  # torch.save cannot write there
    out = edit("vector", "--ckpt", path, "--attr", "Large", "--max-images", "300", "--out", tmp_path / "v.png")
    assert Image.open(out).size == grid_size(5, 2)
    assert "not cached, as" in capsys.readouterr().out
