"""latent_edit.py through its real entry point (main(argv) in-process, and one real subprocess), on tiny
checkpoints of the five scripts trained for two steps on --data fake (16x16 grey, 10 classes, 3 attributes)."""
import json
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
import metrics
from test_metrics import weights_file  # noqa: F401  (a pytest fixture: random weights in the real file's format)

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
    """{script: path of a ckpt.pt trained for 2 steps}, built once per test session; "dcgan_z": a dcgan.py
    G trained for 30 steps at lr 0.02, whose images depend on z (after 2 steps from DCGAN's N(0, 0.02)
    init they hardly do: a pixel's spread over z is ~3e-4, so an inversion has nothing to find)."""
    import importlib
    base, paths = tmp_path_factory.mktemp("latent_edit"), {}
    for script, flags in TRAIN.items():
        out = str(base / script)
        importlib.import_module(script).main(TINY + flags + ["--out", out])
        paths[script] = os.path.join(out, "ckpt.pt")
    out = str(base / "dcgan_z")
    importlib.import_module("dcgan").main(TINY + TRAIN["dcgan"] + ["--max-steps", "30", "--lr", "0.02", "--out", out])
    paths["dcgan_z"] = os.path.join(out, "ckpt.pt")
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
    want = {tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in metrics.PALETTE[:len(legend)]}
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
    for cmd in (["scatter"], ["interpolate", "--from", "0", "--to", "1"]):  # attribute and vector invert a GAN
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


def test_the_entry_point_names_what_it_wrote_and_refuses_in_one_sentence(ckpt, capsys):
    # (as a process: tests/test_entry_points.py)
    path = ckpt("mlp_vae")
    edit("manifold", "--ckpt", path, "--grid", "3")
    assert f"wrote {os.path.join(os.path.dirname(path), 'edit_manifold.png')}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        edit("scatter", "--ckpt", path, "--attr", "Smiling")
    assert e.value.code.startswith("error: fake has no attribute or class 'Smiling'")


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
    (["attribute", "--attr", "Large,Striped", "--intensities", "1,2,3"],
     r"--attr names 2 attributes, so --intensities needs 2 values \(one per attribute, added\) or one for all"),
    (["vector", "--attr", "Large,Striped"], r"vector takes one attribute, not 2"),
    (["attribute", "--attr", "Large", "--inversion-steps", "-1"], r"--inversion-steps must be at least 0"),
    (["attribute", "--attr", "Large", "--restarts", "0"], r"--restarts must be at least 1"),
    (["scatter", "--dims", "2,2"], r"--dims needs two different latent dimensions"),
    (["sample", "--truncation", "0"], r"--truncation thresholds must be positive \(or none\)"),
    (["sample", "--truncation", "none,-0.5"], r"--truncation thresholds must be positive \(or none\)"),
    (["sample", "--truncation", "1,x"], r"'x' is not a comma-separated list of numbers"),
    (["sample", "--temperature", "0.5,0"], r"--temperature values must be positive: z ~ N\(0, t\^2 I\)"),
    (["sample", "--components", "0", "--prior", "gmm"], r"--components must be at least 1"),
    (["sample", "--prior", "gauss"], r"--prior takes normal, gmm or normal,gmm, not gauss"),
    (["sample", "--truncation", "1", "--temperature", "1"], r"--truncation and --d-filter \(GAN checkpoints\) and --temperature"),
    (["sample", "--grid", "0"], r"--grid must be at least 1"),
    (["sample", "--n", "-1"], r"--n must be at least 0"),
    (["sample", "--out-dir", "{tmp}/samples"], r"--out-dir needs --n"),
    (["sample", "--n", "3", "--out-dir", "{tmp}/note.txt"], r"--out-dir \S+ cannot be written: it is a file"),
    (["sample", "--json", "--n", "1"], r"--json needs --n of at least 2"),
    (["sample", "--n", "4", "--ref", "mnist"], r"--ref is the reference of --json's FID, KID, precision and recall"),
    (["sample", "--n", "4", "--json", "--ref", "mnist", "--weights", "{tmp}/absent.pth"],
     r"the weights file \S+absent.pth does not exist"),
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
    ("meta", 0, r"--device meta is not one these scripts run on"),
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


# ----------------------------------------------------------------------------- GAN attribute vectors by inversion

def test_gan_attribute_vector_by_inversion_is_cached_and_shared_between_attributes(ckpt, tmp_path, capsys):
    path = ckpt("dcgan_z")
    flags = ["--max-images", "64", "--inversion-steps", "30", "--restarts", "2", "--n", "4"]
    out = edit("attribute", "--ckpt", path, "--attr", "Large", "--intensities", "0,1", *flags, "--out", tmp_path / "a.png")
    said = capsys.readouterr().out
    assert Image.open(out).size == grid_size(4, 4)  # originals, their inversions G(z), k = 0, k = 1
    t = tiles(out, 4, 4)
    assert np.array_equal(t[1], t[2]) and not np.array_equal(t[1], t[3])  # G(z + 0 z_att) is the inversion
    folder = os.path.dirname(path)
    inv = torch.load(os.path.join(folder, "inv_64_30x2.pt"), weights_only=True)
    vec = torch.load(os.path.join(folder, "attr_Large_64.pt"), weights_only=True)
    # Independently: the images, their per-pixel MSE at the 2 seeded starts and at the inversions kept.
    train = data.fake("train", S, 1)
    x = data.to_float(train.images[inv["index"]])
    G = latent_edit.load(path, "cpu")[0]
    starts = torch.randn(2, 64, 6, generator=torch.Generator().manual_seed(latent_edit.INVERSION_SEED))
    with torch.no_grad():
        mse = lambda z: (G(z) - x).pow(2).flatten(1).mean(1)  # noqa: E731
        at_start, at_end = torch.stack([mse(z) for z in starts]).min(0).values, mse(inv["z"])
    torch.testing.assert_close(inv["mse"], at_end, atol=1e-5, rtol=1e-4)
    assert (at_end < at_start).all(), "the inversion did not lower ||G(z) - x|| for every image"
    assert at_end.mean() < 0.8 * at_start.mean()
    mask = train.attrs[inv["index"], 1].bool()
    torch.testing.assert_close(vec["vector"], inv["z"][mask].mean(0) - inv["z"][~mask].mean(0))
    assert vec["inversion"] == [30, 2] and vec["inversion_mse"] == pytest.approx(at_end.mean().item(), rel=1e-4)
    assert f"inversions' mean per-pixel MSE {at_end.mean().item():.4f}" in said
    # A second attribute reuses the cached inversions (poisoned here, so that reuse shows in the vector).
    poisoned = dict(inv, z=inv["z"] + 10 * torch.arange(64.0).view(64, 1))
    torch.save(poisoned, os.path.join(folder, "inv_64_30x2.pt"))
    edit("vector", "--ckpt", path, "--attr", "Bright", *flags[:6], "--out", tmp_path / "v.png")
    assert "inversions of 64 training images" in capsys.readouterr().out
    bright = torch.load(os.path.join(folder, "attr_Bright_64.pt"), weights_only=True)
    m = train.attrs[inv["index"], 0].bool()
    torch.testing.assert_close(bright["vector"], poisoned["z"][m].mean(0) - poisoned["z"][~m].mean(0))
    # Other inversion settings are other inversions: the attribute vector is computed again.
    edit("attribute", "--ckpt", path, "--attr", "Large", "--max-images", "64", "--inversion-steps", "5",
         "--restarts", "1", "--n", "2", "--out", tmp_path / "b.png")
    assert os.path.exists(os.path.join(folder, "inv_64_5x1.pt"))
    assert torch.load(os.path.join(folder, "attr_Large_64.pt"), weights_only=True)["inversion"] == [5, 1]


@pytest.mark.parametrize("script", ["vae_conv", "dcgan_z"])
def test_several_attributes_add_their_vectors(ckpt, tmp_path, script):
    single, both = ckpt(script), str(tmp_path / "both" / "ckpt.pt")
    os.makedirs(os.path.dirname(both))
    shutil.copy(single, both)
    gan = ["--max-images", "64", "--inversion-steps", "10", "--restarts", "1"] if script == "dcgan_z" else []
    for attr in ("Large", "Striped"):  # the single-attribute vectors, in another folder
        edit("vector", "--ckpt", single, "--attr", attr, *gan, "--out", tmp_path / "v.png")
    out = edit("attribute", "--ckpt", both, "--attr", "Large,Striped", "--intensities", "1,2", "--n", "4", *gan,
               "--save-dir", tmp_path / "edits", "--out", tmp_path / "a.png")
    assert Image.open(out).size == grid_size(4, 5)  # originals, reconstructions, Large, Striped, both added
    n = "64" if gan else "10000"
    vec = {a: torch.load(os.path.join(os.path.dirname(p), f"attr_{a}_{n}.pt"), weights_only=True)["vector"]
           for a in ("Large", "Striped") for p in (single,)}
    for a in ("Large", "Striped"):
        mine = torch.load(os.path.join(os.path.dirname(both), f"attr_{a}_{n}.pt"), weights_only=True)["vector"]
        torch.testing.assert_close(mine, vec[a])
    assert sorted(os.listdir(tmp_path / "edits")) == ["Large_1", "Striped_2", "sum"]
    t = tiles(out, 4, 5)
    test = data.fake("test", S, 1)
    neither = test.images[(test.attrs[:, 1] == 0) & (test.attrs[:, 2] == 0)][:, 0].numpy()
    for original in t[0]:  # originals have neither attribute
        assert (neither == original).all(axis=(1, 2)).any()
    # The sum row decodes z + 1 z_Large + 2 z_Striped with the single-attribute vectors; z: the originals'
    # mean codes, or their inversions (the seeded starts: the same again).
    model = latent_edit.load(both, "cpu")[0]
    originals = torch.from_numpy(t[0]).unsqueeze(1)
    if script == "vae_conv":
        with torch.no_grad():
            z = model.encode(data.to_float(originals))[0]
    else:
        z, _ = latent_edit.invert(model, originals, 10, 1, "cpu")
    with torch.no_grad():
        g = model.decode if script == "vae_conv" else model
        want, alone = to_u8(g(z + vec["Large"] + 2 * vec["Striped"])), to_u8(g(z + 2 * vec["Striped"]))
    assert np.abs(t[4].astype(int) - want).max() <= 1 and np.abs(t[3].astype(int) - alone).max() <= 1
    assert not np.array_equal(t[4], t[1])
    png = np.asarray(Image.open(tmp_path / "edits" / "sum" / "000002.png"))
    assert np.array_equal(png, t[4][2])


# ----------------------------------------------------------------------------- scatter --dims

def test_scatter_dims_plots_exactly_those_latent_coordinates(ckpt, tmp_path, monkeypatch):
    path, seen = ckpt("vae_conv"), {}
    draw = latent_edit.draw_scatter
    monkeypatch.setattr(latent_edit, "draw_scatter", lambda xy, groups, axes, *a: (
        seen.update(xy=xy, axes=axes), draw(xy, groups, axes, *a)))
    out = edit("scatter", "--ckpt", path, "--dims", "5,2", "--n", "512", "--out", tmp_path / "s.png")
    assert Image.open(out).size == (512 + 180, 512)
    _, mu = codes(path, data.fake("test", S, 1).images)  # all 512 held-out images, in order
    torch.testing.assert_close(seen["xy"], mu[:, [5, 2]], atol=1e-5, rtol=1e-4)
    assert seen["axes"] == ("z5", "z2")
    edit("scatter", "--ckpt", path, "--n", "50", "--out", tmp_path / "p.png")  # PCA stays the default
    assert seen["axes"][0].startswith("PC1")


# ----------------------------------------------------------------------------- sample: sweeps and the GMM prior

def sweep_size(columns, grid):
    """(width, height) of a sweep of `columns` grids of grid x grid S-pixel samples under their labels."""
    side = grid * (S + 2) + 2
    return columns * side + (columns - 1) * latent_edit.GAP, latent_edit.LABEL_H + side


def sweep_tiles(path, columns, grid):
    """columns x grid*grid x S x S uint8 samples of a sweep PNG, row-major within each grid."""
    a = np.asarray(Image.open(path).convert("L"))
    side = grid * (S + 2) + 2
    out = []
    for c in range(columns):
        x0, y0 = c * (side + latent_edit.GAP), latent_edit.LABEL_H
        out.append([a[y0 + 2 + r * (S + 2):y0 + 2 + r * (S + 2) + S, x0 + 2 + q * (S + 2):x0 + 2 + q * (S + 2) + S]
                    for r in range(grid) for q in range(grid)])
    return np.array(out)


def test_truncated_normal_matches_the_closed_form():
    base = torch.randn(400, 500, generator=torch.Generator().manual_seed(3))
    z = latent_edit.truncated_normal(base, 1.0, seed=4)
    assert z.abs().max() <= 1.0
    inside = base.abs() <= 1.0
    assert torch.equal(z[inside], base[inside])  # only the components beyond T are redrawn
    # Var of N(0, 1) truncated to [-1, 1]: 1 - 2 phi(1) / (2 Phi(1) - 1) = 0.29112
    phi, Phi = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert z.var().item() == pytest.approx(1 - 2 * phi / (2 * Phi - 1), abs=0.005)
    assert z.mean().abs() < 0.005


@pytest.mark.parametrize("script", ["dcgan", "mlp_gan"])
def test_truncation_sweep_puts_one_grid_per_threshold_side_by_side(ckpt, tmp_path, script):
    path = ckpt(script)
    out = edit("sample", "--ckpt", path, "--truncation", "0.3,1.5,none", "--grid", "3", "--n", "12",
               "--out-dir", tmp_path / "s")
    assert out.endswith("edit_sample.png") and Image.open(out).size == sweep_size(3, 3)
    assert sorted(os.listdir(tmp_path / "s")) == ["truncation_0.3", "truncation_1.5", "untruncated"]
    t = sweep_tiles(out, 3, 3)
    G = latent_edit.load(path, "cpu")[0]
    base = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))  # --seed 0, --n 12 > 3 x 3
    with torch.no_grad():
        assert np.abs(t[2].astype(int) - to_u8(G(base[:9]))).max() <= 1  # untruncated: z ~ N(0, I) itself
    # Truncated: the images decode codes within [-T, T] that keep every component of z already within.
    for col, T in ((0, 0.3), (1, 1.5)):
        files = sorted(os.listdir(tmp_path / "s" / f"truncation_{T:g}"))
        assert len(files) == 12
        z = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
        redraw = torch.Generator().manual_seed(1)  # --seed + 1: a whole draw per round, kept where out of bounds
        while (z.abs() > T).any():
            z = torch.where(z.abs() > T, torch.randn(12, 6, generator=redraw), z)
        assert z.abs().max() <= T and torch.equal(z[base.abs() <= T], base[base.abs() <= T])
        with torch.no_grad():
            want = to_u8(G(z))
        assert np.abs(t[col].astype(int) - want[:9]).max() <= 1
        png = np.asarray(Image.open(tmp_path / "s" / f"truncation_{T:g}" / files[11]))
        assert np.abs(png.astype(int) - want[11]).max() <= 1


def test_temperature_sweep_scales_the_same_base_noise(ckpt, tmp_path):
    path = ckpt("vae_conv")
    out = edit("sample", "--ckpt", path, "--temperature", "0.5,1", "--grid", "2", "--out", tmp_path / "t.png")
    assert Image.open(out).size == sweep_size(2, 2)
    model = latent_edit.load(path, "cpu")[0]
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    t = sweep_tiles(out, 2, 2)
    with torch.no_grad():
        for col, temp in enumerate((0.5, 1.0)):  # z ~ N(0, t^2 I) = t eps
            assert np.abs(t[col].astype(int) - to_u8(model.decode(temp * base))).max() <= 1


def mixture(n, seed):
    """(x n x 2, labels) from 3 Gaussians with weights 0.5, 0.3, 0.2, means 12+ standard deviations apart."""
    means = torch.tensor([[-8.0, 0.0], [8.0, 0.0], [0.0, 12.0]], dtype=torch.float64)
    covs = torch.tensor([[[1.0, 0.6], [0.6, 1.0]], [[2.0, -0.5], [-0.5, 0.5]], [[0.3, 0.0], [0.0, 1.5]]],
                        dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), n, True, generator=g)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = means[labels] + (torch.linalg.cholesky(covs)[labels] @ eps[:, :, None]).squeeze(2)
    return x, labels, means, covs


def test_gmm_em_recovers_a_known_mixture():
    x, labels, means, covs = mixture(3000, seed=0)
    gmm = latent_edit.fit_gmm(x, 3)
    order = torch.cdist(means, gmm["means"]).argmin(1)  # the fitted component nearest each true mean
    assert sorted(order.tolist()) == [0, 1, 2]
    w, mu, cov = gmm["weights"][order], gmm["means"][order], gmm["covs"][order]
    torch.testing.assert_close(w, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(mu, means, atol=0.15, rtol=0)
    torch.testing.assert_close(cov, covs, atol=0.2, rtol=0)
    # So far apart, each responsibility is 0 or 1 to float precision: EM ends at each group's sample
    # weight, mean and (1/N_k) covariance, a closed form.
    for k in range(3):
        xk = x[labels == k]
        assert w[k].item() == pytest.approx(len(xk) / len(x), abs=1e-9)
        torch.testing.assert_close(mu[k], xk.mean(0), atol=1e-8, rtol=0)
        torch.testing.assert_close(cov[k], (xk - xk.mean(0)).T @ (xk - xk.mean(0)) / len(xk) + 1e-6 * torch.eye(2),
                                   atol=1e-8, rtol=0)
    # The log-likelihood it reports is that of scipy's densities, and EM never lowered it.
    from scipy.stats import multivariate_normal
    dens = sum(gmm["weights"][k].item() * multivariate_normal(gmm["means"][k].numpy(), gmm["covs"][k].numpy()).pdf(
        x.numpy()) for k in range(3))
    assert gmm["loglik"][-1].item() == pytest.approx(np.log(dens).mean(), abs=1e-6)
    ll = gmm["loglik"]
    assert (ll[1:] - ll[:-1] >= -1e-9 * ll.abs()[:-1]).all()


def test_gmm_em_log_likelihood_never_decreases_on_overlapping_components():
    x, _, _, _ = mixture(2000, seed=1)
    x = x / torch.tensor([6.0, 4.0])  # squeezed together: many EM iterations
    gmm = latent_edit.fit_gmm(x, 5)
    ll = gmm["loglik"]
    assert len(ll) > 10 and (ll[1:] - ll[:-1] >= -1e-9 * ll.abs()[:-1]).all()
    assert ll[-1] - ll[-2] <= latent_edit.GMM_TOL * ll[-2].abs() or len(ll) == latent_edit.GMM_MAX_ITER
    assert gmm["weights"].sum().item() == pytest.approx(1.0, abs=1e-9)


def test_gmm_prior_is_fitted_to_the_training_codes_cached_and_refitted_for_a_newer_checkpoint(ckpt, tmp_path, capsys):
    path = ckpt("mlp_vae")
    out = edit("sample", "--ckpt", path, "--prior", "normal,gmm", "--components", "3", "--grid", "4",
               "--out", tmp_path / "g.png")
    assert Image.open(out).size == sweep_size(2, 4)
    assert "3 components fitted to the mean codes of 2048 training images" in capsys.readouterr().err
    cache = os.path.join(os.path.dirname(path), "gmm_3_10000.pt")
    gmm = torch.load(cache, weights_only=True)
    assert gmm["n"] == 2048 and gmm["ckpt"] == [2, os.path.getmtime(path)]
    # After an M-step sum_k pi_k mu_k is the mean of the data exactly: here the mean of every training code.
    model, mu = codes(path, data.fake("train", S, 1).images)
    torch.testing.assert_close((gmm["weights"][:, None] * gmm["means"]).sum(0).float(), mu.mean(0), atol=1e-5, rtol=0)
    # The GMM column decodes z = mu_c + L_c eps, the N(0, I) column eps itself: the same eps.
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    t = sweep_tiles(out, 2, 4)
    with torch.no_grad():
        assert np.abs(t[0].astype(int) - to_u8(model.decode(eps))).max() <= 1
    chol = np.linalg.cholesky(gmm["covs"].numpy())
    with torch.no_grad():  # per component k: decode(mu_k + L_k eps), L_k from numpy's Cholesky
        candidates = [to_u8(model.decode(torch.from_numpy(gmm["means"][k].numpy() + eps.double().numpy() @ chol[k].T)
                                         .float())) for k in range(3)]
    for i in range(16):  # each sample is one of them
        assert min(np.abs(c[i].astype(int) - t[1][i]).max() for c in candidates) <= 1
    # Reused while the checkpoint is the same (poisoned, so that reuse shows); fitted again once it is newer.
    torch.save(dict(gmm, means=gmm["means"] + 100), cache)
    edit("sample", "--ckpt", path, "--prior", "gmm", "--components", "3", "--out", tmp_path / "h.png")
    assert "(cached)" in capsys.readouterr().err
    assert torch.equal(torch.load(cache, weights_only=True)["means"], gmm["means"] + 100)
    os.utime(path, (os.path.getmtime(path) + 10, os.path.getmtime(path) + 10))
    edit("sample", "--ckpt", path, "--prior", "gmm", "--components", "3", "--out", tmp_path / "h.png")
    again = torch.load(cache, weights_only=True)
    assert torch.equal(again["means"], gmm["means"]) and again["ckpt"] == [2, os.path.getmtime(path)]


@pytest.fixture(scope="module")
def fid_weights(weights_file):  # noqa: F811  (tests/test_metrics.py's random weights in the real file's format)
    return weights_file


def test_sample_json_measures_each_setting_as_metrics_py_measures_its_pngs(ckpt, tmp_path, fid_weights, monkeypatch,
                                                                           capsys):
    import torch.nn.functional as F
    metrics = latent_edit.metrics
    # As tests/test_metrics.py's small_network: 75 x 75 inputs and 64 pool3 features keep this test fast.
    monkeypatch.setattr(metrics, "resize_299", lambda x: F.interpolate(x, size=(75, 75), mode="bilinear",
                                                                       align_corners=False))
    forward = metrics.InceptionFID.forward
    monkeypatch.setattr(metrics.InceptionFID, "forward", lambda self, x: (lambda p, lg: (p[:, :64], lg))(
        *forward(self, x)))
    test = data.fake("test", S, 1)
    data.write_pngs(data.to_float(test.images[:20]), str(tmp_path / "ref"))
    path = ckpt("mlp_vae")
    edit("sample", "--ckpt", path, "--temperature", "0.5,1", "--n", "12", "--out-dir", tmp_path / "s", "--json",
         "--ref", tmp_path / "ref", "--weights", fid_weights)
    got = json.loads(capsys.readouterr().out)
    assert list(got) == ["N(0, I), t = 0.5", "N(0, I), t = 1"]
    for label, folder in (("N(0, I), t = 0.5", "normal_t0.5"), ("N(0, I), t = 1", "normal_t1")):
        metrics.main([str(tmp_path / "s" / folder), "--ref", str(tmp_path / "ref"), "--weights", str(fid_weights),
                      "--device", "cpu", "--json", "--data-root", str(tmp_path / "data")])
        want = json.loads(capsys.readouterr().out)[str(tmp_path / "s" / folder)]
        assert got[label]["n"] == want["n"] == 12
        for key in ("fid", "kid", "kid_std", "precision", "recall", "lapvar"):
            assert got[label][key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def test_sample_json_on_the_command_line_is_the_only_thing_on_stdout(ckpt, tmp_path):
    path = ckpt("dcgan")
    r = subprocess.run([sys.executable, "latent_edit.py", "sample", "--ckpt", path, "--truncation", "1,none",
                        "--n", "6", "--json", "--device", "cpu", "--out-dir", str(tmp_path / "s")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert list(got) == ["T = 1", "untruncated"] and f"wrote {os.path.join(os.path.dirname(path), 'edit_sample.png')}" \
        in r.stderr
    # The Laplacian variance (no reference: nothing else) of each setting's 6 PNGs, by metrics.py's function.
    for label, folder in (("T = 1", "truncation_1"), ("untruncated", "untruncated")):
        files = sorted((tmp_path / "s" / folder).iterdir())
        images = np.stack([np.asarray(Image.open(f)) for f in files])
        lap = latent_edit.metrics.laplacian_variance(images).mean()
        assert got[label] == {"n": 6, "lapvar": pytest.approx(lap, rel=1e-9)}


def test_sample_options_for_the_other_kind_of_model_are_refused_in_one_sentence(ckpt, folder_ckpt, tmp_path, capsys):
    for argv, pattern in (
            (["--truncation", "1"], r"--truncation and --d-filter are for the GAN checkpoints \(dcgan.py, mlp_gan.py\) "
                                    r"and vae_conv.py"),
            (["--d-filter", "0.5"], r"--truncation and --d-filter are for the GAN checkpoints"),
            (["--temperature", "0.8"], None), (["--prior", "gmm"], None), (["--recon"], None)):
        if pattern:
            refused(capsys, pattern, "sample", "--ckpt", ckpt("vae_conv"), *argv)
        else:
            refused(capsys, r"--temperature, --prior and --recon are for the VAE checkpoints and dcgan.py is a GAN; "
                            r"use --truncation or --d-filter", "sample", "--ckpt", ckpt("dcgan"), *argv)
    path, _ = folder_ckpt  # its dataset: a folder of 6 images
    refused(capsys, r"--components 7 is more than the 6 training images whose codes the mixture would be fitted to",
            "sample", "--ckpt", path, "--prior", "gmm", "--components", "7", "--data-root", tmp_path / "root")
    refused(capsys, r"--dims needs two different latent dimensions from 0 to 7", "scatter", "--ckpt", ckpt("vae_conv"),
            "--dims", "1,8")
    assert not list(tmp_path.glob("**/edit_sample.png")) and not list(tmp_path.glob("**/gmm_*.pt"))


def test_a_gan_attribute_that_no_image_has_is_refused_before_any_inversion(ckpt, folder_ckpt, tmp_path, capsys,
                                                                          monkeypatch):
    _, folder = folder_ckpt
    path = ckpt("dcgan")
    c = torch.load(path, weights_only=True)
    c["args"]["data"] = str(folder)
    torch.save(c, path)
    (folder / "attributes.csv").write_text("filename,Never\n" + "".join(f"{i}.png,-1\n" for i in range(6)))
    monkeypatch.setattr(latent_edit, "invert", lambda *a: pytest.fail("an image was inverted"))
    refused(capsys, "none of the 6 training images used has Never", "attribute", "--ckpt", path, "--attr", "Never",
            "--data-root", tmp_path / "root")
    refused(capsys, r"has no attribute or class 'Smiling'", "attribute", "--ckpt", path, "--attr", "Smiling,Never",
            "--data-root", tmp_path / "root")


# ---------------------------------------------------------------- sample --d-filter (GANs) and --recon (VAEs)

def read_folder(folder, n):
    """The n PNGs folder/000000.png ... (nothing else there) as uint8 n x S x S (grey)."""
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(n)]
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in range(n)])


@pytest.mark.parametrize("script", ["dcgan", "mlp_gan"])
def test_d_filter_0_passes_every_sample_of_the_truncated_z(ckpt, tmp_path, capsys, script):
    path = ckpt(script)
    edit("sample", "--ckpt", path, "--d-filter", "0", "--truncation", "1.5", "--n", "7", "--grid", "2",
         "--out-dir", tmp_path / "s", "--out", tmp_path / "s.png")
    assert "--d-filter 0: the discriminator passed 7 of 7 samples (100.0%)" in capsys.readouterr().err
    G = latent_edit.load(path, "cpu")[0]
    z = latent_edit.truncated_normal(torch.randn(7, 6, generator=torch.Generator().manual_seed(0)), 1.5, 1)
    with torch.no_grad():
        want = data.to_uint8(G(z))[:, 0].numpy()
    assert np.array_equal(read_folder(tmp_path / "s" / "truncation_1.5-dfilter-0", 7), want)


def test_d_filter_writes_exactly_the_samples_the_discriminator_scores_at_least_p(ckpt, tmp_path, monkeypatch,
                                                                                 capsys):
    import dcgan
    path = ckpt("dcgan")
    scored = []

    def forward(self, x):  # a D that passes a known share: image i of a batch of n gets (i + 0.5) / n
        scored.append(x.clone())
        return torch.logit((torch.arange(len(x), dtype=torch.float32) + 0.5) / len(x))
    monkeypatch.setattr(dcgan.Discriminator, "forward", forward)
    edit("sample", "--ckpt", path, "--d-filter", "0.75", "--n", "130", "--out-dir", tmp_path / "s",
         "--out", tmp_path / "s.png")
    # The 130 base codes first (33 of them pass: (i + 0.5) / 130 >= 0.75 from i = 97), then fresh draws of
    # 256 (64 pass each): 33 + 64 + 64 >= 130 after three batches, of which the first 130 are written.
    assert [len(x) for x in scored] == [130, 256, 256]
    assert "passed 161 of 642 samples (25.1%)" in capsys.readouterr().err
    kept = torch.cat([scored[0][97:], scored[1][192:], scored[2][192:]])[:130]
    assert np.array_equal(read_folder(tmp_path / "s" / "dfilter-0.75", 130), data.to_uint8(kept)[:, 0].numpy())


def test_d_filter_stops_when_the_discriminator_rejects_almost_everything(ckpt, tmp_path, capsys):
    path = ckpt("dcgan")
    c = torch.load(path, weights_only=True)
    c["D"][[k for k in c["D"] if k.endswith("weight")][-1]].zero_()  # D's last conv: logit 0, sigmoid(D) = 1/2
    torch.save(c, path)
    said = refused(capsys, r"--d-filter 0.6: the discriminator passed only 0 of 5\d\d\d samples, so it rejects "
                           r"almost everything \(a collapsed or over-confident D\); 0 of 20 were written to",
                   "sample", "--ckpt", path, "--d-filter", "0.6", "--n", "20", "--out-dir", tmp_path / "s")
    assert "lower --d-filter" in said and os.listdir(tmp_path / "s" / "dfilter-0.6") == []


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "0.5,2"])
def test_d_filter_outside_0_1_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, value):
    refused(capsys, r"--d-filter|not a finite number", "sample", "--ckpt", tmp_path / "none.pt", "--d-filter", value)


@pytest.mark.parametrize("script", ENCODERS)
def test_recon_writes_decode_of_the_mean_code_of_the_first_held_out_images(ckpt, tmp_path, script):
    path = ckpt(script)
    edit("sample", "--ckpt", path, "--recon", "--n", "5", "--grid", "2", "--out-dir", tmp_path / "s",
         "--out", tmp_path / "s.png")
    assert os.listdir(tmp_path / "s") == ["recon"]          # alone: no prior samples
    model = latent_edit.load(path, "cpu")[0]
    x = data.to_float(data.load("fake", split="test", img_size=S, channels=1, verbose=False).images[:5])
    with torch.no_grad():                                     # the mean code, not a sampled z; eval mode
        want = data.to_uint8(model.decode(model.encode(x)[0]))[:, 0].numpy()
    assert np.array_equal(read_folder(tmp_path / "s" / "recon", 5), want)
    assert not np.array_equal(want, data.to_uint8(x)[:, 0].numpy())  # reconstructions, not the inputs


def test_recon_beyond_the_held_out_split_or_without_one_is_refused(ckpt, folder_ckpt, tmp_path, capsys):
    refused(capsys, r"--recon --n 513 asks for more reconstructions than the 512 held-out images",
            "sample", "--ckpt", ckpt("vae_conv"), "--recon", "--n", "513", "--out-dir", tmp_path / "s")
    path, _ = folder_ckpt
    refused(capsys, r"--recon reconstructs held-out images and .* has no held-out split", "sample", "--ckpt", path,
            "--recon", "--data-root", tmp_path / "root")


@pytest.mark.parametrize("script", list(TRAIN))
def test_the_scripts_sample_stream_is_as_before_the_move(ckpt, tmp_path, script):
    """--sample N of a model script: decode (or G) of z drawn N x latent, 500 at a time, from a generator on
    the device seeded --seed + 1: the same images for the same seed as before the sampling variants moved."""
    import importlib
    path = ckpt(script)
    importlib.import_module(script).main(["--resume", str(path), "--epochs", "0", "--sample", "3", "--device", "cpu"])
    model = latent_edit.load(path, "cpu")[0]
    z = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = data.to_uint8(model.decode(z) if script in ENCODERS else model(z))[:, 0].numpy()
    assert np.array_equal(read_folder(os.path.join(os.path.dirname(path), "samples"), 3), want)
