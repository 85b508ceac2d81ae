"""mlp_gan.py through its real entry point, main(argv) in-process (as a process: tests/test_entry_points.py)."""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mlp_gan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "fake", "--batch-size", "16", "--log-every", "1", "--latent-dim", "16", "--device", "cpu"]


def run(tmp_path, *extra):
    out = str(tmp_path / "run")
    mlp_gan.main(SMALL + ["--out", out, *extra])
    return out


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_by_hand():
    G, D = mlp_gan.build(dict(latent_dim=100, channels=1, img_size=28))
    # Linear(a, b) has a*b + b parameters, BatchNorm1d(b) has 2b.
    sizes = [100, 128, 256, 512, 1024]
    hidden = sum(a * b + b + 2 * b for a, b in zip(sizes, sizes[1:]))
    assert n_params(G) == hidden + 1024 * 784 + 784
    assert n_params(D) == (784 * 512 + 512) + (512 * 256 + 256) + (256 + 1)


@pytest.mark.parametrize("size,channels", [(28, 1), (64, 3)])
def test_trains_a_few_steps_and_writes_every_file(tmp_path, size, channels):
    out = run(tmp_path, "--img-size", str(size), "--channels", str(channels), "--max-steps", "2")
    for f in ["grid_epoch_001.png", "losses.csv", "losses.png", "ckpt.pt"]:
        assert os.path.exists(os.path.join(out, f)), f
    assert Image.open(os.path.join(out, "grid_epoch_001.png")).size == (8 * size + 18,) * 2
    c = ckpt(out)
    assert c["script"] == "mlp_gan" and c["step"] == 2 and (c["args"]["img_size"], c["args"]["channels"]) == (size, channels)
    assert (c["epoch"], c["batch"]) == (0, 2)  # 2 of the 128 batches of epoch 1: a partial epoch


def test_resume_continues_and_sample_writes_pngs(tmp_path):
    out = run(tmp_path, "--max-steps", "2", "--img-size", "28", "--channels", "1")
    mlp_gan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "4", "--epochs", "3", "--sample", "4",
                  "--device", "cpu"])
    c = ckpt(out)
    assert c["step"] == 4 and (c["epoch"], c["batch"]) == (0, 4) and c["optD"]["state"][0]["step"].item() == 4
    rows = open(os.path.join(out, "losses.csv")).read().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    img = Image.open(os.path.join(out, "samples", "000003.png"))
    assert img.size == (28, 28) and img.mode == "L"
    G = mlp_gan.load_model(os.path.join(out, "ckpt.pt"))
    assert G.latent_dim == 16 and not G.training and G(torch.randn(2, 16)).shape == (2, 1, 28, 28)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = run(tmp_path, "--max-steps", "1")
    monkeypatch.setattr(mlp_gan, "bce", lambda logits, t: F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, t)) * float("inf"))
    with pytest.raises(SystemExit, match="NaN/inf"):
        mlp_gan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "3", "--epochs", "3", "--device", "cpu"])
    assert ckpt(out)["step"] == 1


def test_checkpoint_of_another_script_is_refused(tmp_path):
    import dcgan
    out = str(tmp_path / "dc")
    dcgan.main(["--data", "fake", "--ngf", "4", "--ndf", "4", "--img-size", "16", "--batch-size", "8",
                "--max-steps", "1", "--out", out, "--device", "cpu"])
    with pytest.raises(SystemExit, match="not written by mlp_gan.py"):
        mlp_gan.main(["--resume", os.path.join(out, "ckpt.pt"), "--device", "cpu"])
    with pytest.raises(ValueError, match="not written by mlp_gan.py"):
        mlp_gan.load_model(os.path.join(out, "ckpt.pt"))


def test_the_entry_point_prints_the_counts_and_refuses_an_unknown_dataset(tmp_path, capsys):
    # (as a process: tests/test_entry_points.py)
    out = str(tmp_path / "cli")
    mlp_gan.main([*SMALL, "--max-steps", "2", "--out", out])
    r = capsys.readouterr()
    assert "img/s" in r.out and os.path.exists(os.path.join(out, "ckpt.pt"))
    # The counts printed at start, by hand for latent 16 and fake data's 32x32x3 (3,072 numbers):
    # Linear(a, b) has a*b + b parameters, BatchNorm1d(b) has 2b.
    sizes = [16, 128, 256, 512, 1024]
    g = sum(a * b + 3 * b for a, b in zip(sizes, sizes[1:])) + 1024 * 3072 + 3072
    d = (3072 * 512 + 512) + (512 * 256 + 256) + (256 + 1)
    assert f"G: {g:,} parameters   D: {d:,} parameters" in r.out


@pytest.mark.parametrize("flag,value", [("--beta1", "1"), ("--beta1", "nan"), ("--batch-size", "1")])
def test_flags_of_this_script_are_checked_before_any_work(tmp_path, flag, value):
    # Adam needs 0 <= beta1 < 1; the generator's BatchNorm1d needs 2 images per batch to train.
    with pytest.raises(SystemExit, match=flag):
        run(tmp_path, flag, value)
    assert not (tmp_path / "run").exists()
