"""dcgan.py through its real entry point, main(argv) in-process (as a process: tests/test_entry_points.py), and
under torchrun."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import dcgan
import latent_edit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "fake", "--ngf", "8", "--ndf", "8", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


def run(tmp_path, *extra):
    out = str(tmp_path / "run")
    dcgan.main(SMALL + ["--out", out, *extra])
    return out


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_paper_architecture():
    # pytorch/examples' dcgan at 64x64x3 with nz=100, ngf=ndf=64.
    G, D = dcgan.build(dict(latent_dim=100, ngf=64, ndf=64, channels=3, img_size=64))
    assert (n_params(G), n_params(D)) == (3_576_704, 2_765_568)
    # The MNIST generator one report printed: 100 -> 256 -> 128 -> 64 -> 1 channels.
    G, _ = dcgan.build(dict(latent_dim=100, ngf=64, ndf=64, channels=1, img_size=32))
    assert n_params(G) == 1_066_880
    assert [m.out_channels for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [256, 128, 64, 1]


def test_bad_image_size_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="power of two"):
        run(tmp_path, "--img-size", "48")


@pytest.mark.parametrize("size", [32, 64, 128])
def test_trains_a_few_steps_and_writes_every_file(tmp_path, size):
    out = run(tmp_path, "--img-size", str(size), "--max-steps", "2", "--batch-size", "8")
    for f in ["grid_epoch_001.png", "losses.csv", "losses.png", "ckpt.pt"]:
        assert os.path.exists(os.path.join(out, f)), f
    grid = Image.open(os.path.join(out, "grid_epoch_001.png"))
    assert grid.size == (8 * size + 9 * 2,) * 2  # 8 rows of samples with 2-pixel padding
    rows = open(os.path.join(out, "losses.csv")).read().splitlines()
    assert rows[0].split(",")[:6] == ["step", "epoch", "loss_d", "loss_d_real", "loss_d_fake", "loss_g"]
    assert len(rows) == 3
    c = ckpt(out)
    assert c["script"] == "dcgan" and c["step"] == 2 and (c["epoch"], c["batch"]) == (0, 2)  # 2 of 128 batches
    assert c["fixed_z"].shape == (64, 100)


def test_resume_continues_step_count_optimizer_state_and_log(tmp_path):
    out = run(tmp_path, "--max-steps", "2")
    first = ckpt(out)
    dcgan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "5", "--epochs", "3", "--device", "cpu"])
    second = ckpt(out)
    assert second["step"] == 5 and (second["epoch"], second["batch"]) == (0, 5)
    # Adam's per-parameter step counter continued instead of restarting at 0.
    assert second["optG"]["state"][0]["step"].item() == 5
    assert torch.equal(first["fixed_z"], second["fixed_z"])
    assert not torch.equal(first["G"]["net.0.weight"], second["G"]["net.0.weight"])
    rows = open(os.path.join(out, "losses.csv")).read().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5]
    assert second["args"]["ngf"] == 8  # flags not given again came from the checkpoint


def test_sample_from_checkpoint_writes_readable_pngs(tmp_path):
    out = run(tmp_path, "--max-steps", "1", "--channels", "1")
    dcgan.main(["--resume", os.path.join(out, "ckpt.pt"), "--epochs", "0", "--sample", "5", "--device", "cpu"])
    files = sorted(os.listdir(os.path.join(out, "samples")))
    assert files == [f"{i:06d}.png" for i in range(5)]
    img = Image.open(os.path.join(out, "samples", files[0]))
    assert img.size == (32, 32) and img.mode == "L"


def test_load_model_rebuilds_the_generator_from_the_checkpoint_alone(tmp_path):
    out = run(tmp_path, "--max-steps", "1", "--latent-dim", "12")
    G = dcgan.load_model(os.path.join(out, "ckpt.pt"))
    assert G.latent_dim == 12 and not G.training
    with torch.no_grad():
        x = G(torch.randn(3, 12))
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_linear_lr_decay_reaches_zero_at_the_end(tmp_path):
    # fake has 2048 training images: batch 512 gives 4 steps; the last step uses lr * (1 - 3/4).
    out = run(tmp_path, "--epochs", "1", "--batch-size", "512", "--lr-decay", "linear", "--lr", "0.001")
    assert ckpt(out)["optG"]["param_groups"][0]["lr"] == pytest.approx(0.001 / 4)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = run(tmp_path, "--max-steps", "2")
    good = ckpt(out)
    monkeypatch.setattr(dcgan, "bce", lambda logits, t: F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, t)) * float("nan"))
    with pytest.raises(SystemExit, match="NaN"):
        dcgan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "4", "--epochs", "3", "--device", "cpu"])
    after = ckpt(out)
    assert after["step"] == good["step"] == 2
    assert torch.equal(after["G"]["net.0.weight"], good["G"]["net.0.weight"])


def test_bad_resume_paths_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        dcgan.main(["--resume", str(tmp_path / "missing.pt")])
    other = tmp_path / "other.pt"
    torch.save({"script": "vae_conv", "args": {}}, other)
    with pytest.raises(SystemExit, match="not written by dcgan.py"):
        dcgan.main(["--resume", str(other)])
    with pytest.raises(ValueError, match="not written by dcgan.py"):
        dcgan.load_model(str(other))
    out = run(tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="--ngf 8, which --ngf 16 does not fit"):
        dcgan.main(["--resume", os.path.join(out, "ckpt.pt"), "--ngf", "16", "--epochs", "0", "--sample", "1"])


def test_the_entry_point_prints_the_counts_and_refuses_an_unknown_dataset(tmp_path, capsys):
    # (as a process: tests/test_entry_points.py)
    out = str(tmp_path / "cli")
    dcgan.main([*SMALL, "--max-steps", "2", "--out", out, "--sample", "3"])
    r = capsys.readouterr()
    assert "G: 61,936 parameters   D: 11,232 parameters" in r.out
    assert len(os.listdir(os.path.join(out, "samples"))) == 3
    with pytest.raises(SystemExit) as e:
        dcgan.main(["--data", "no-such-set", "--out", out + "-2"])
    assert e.value.code.startswith("error: ") and "no-such-set" in e.value.code


@pytest.mark.parametrize("beta1", ["1", "-0.1", "nan"])
def test_adam_beta1_outside_0_1_is_refused_before_training(tmp_path, beta1):
    with pytest.raises(SystemExit, match=r"--beta1 must be in \[0, 1\)"):
        run(tmp_path, "--beta1", beta1)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the reports' networks: --arch

# The CelebA vanilla-GAN-vs-DCGAN report prints no counts; by hand at 64x64x3, latent 100.
# G: the paper's with ngf 128, 4x4 transposed convs without bias (in * out * 16), BatchNorm (2 per channel).
CELEBA_G = sum(a * b * 16 for a, b in zip([100, 1024, 512, 256, 128], [1024, 512, 256, 128, 3])) + \
    2 * (1024 + 512 + 256 + 128)
# D: four biased 4x4 convs (in * out * 16 + out), then Linear(256 * 4 * 4, 1).
CELEBA_D = sum(a * b * 16 + b for a, b in zip([3, 32, 64, 128], [32, 64, 128, 256])) + 256 * 4 * 4 + 1


def report_nets(arch, channels, size):
    return dcgan.build(dict(arch=arch, latent_dim=100, ngf=64, ndf=64, channels=channels, img_size=size))


def test_report_networks_have_the_reports_parameter_counts():
    # The CIFAR-10 report's two tables, as printed: G 11,429,632 and D 4,309,441.
    G, D = report_nets("cifar10-report", 3, 32)
    assert (n_params(G), n_params(D)) == (11_429_632, 4_309_441)
    assert G.net[0].kernel_size == (2, 2)  # the 2x2 start
    assert [m.kernel_size for m in D.modules() if isinstance(m, nn.Conv2d)] == [(5, 5)] * 4
    assert [type(m).__name__ for m in D.net] == ["Conv2d", "LeakyReLU"] + \
        ["Conv2d", "LeakyReLU", "BatchNorm2d"] * 3 + ["Flatten", "Linear"]  # LeakyReLU before BatchNorm
    # The MNIST report's printed networks: G 1,066,880 and D 166,789 with its Linear(4, 1) head.
    G, D = report_nets("mnist-report", 1, 32)
    assert (n_params(G), n_params(D)) == (1_066_880, 166_789)
    assert D.net[-1].in_features == 4
    # The CelebA GAN report's DCGAN at 64x64x3: 12,658,432 and 694,241.
    G, D = report_nets("celeba-gans-report", 3, 64)
    assert (n_params(G), n_params(D)) == (CELEBA_G, CELEBA_D) == (12_658_432, 694_241)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())


@pytest.mark.parametrize("arch,flags,counts,shape", [
    ("cifar10-report", [], (11_429_632, 4_309_441), ((32, 32), "RGB")),
    ("mnist-report", [], (1_066_880, 166_789), ((32, 32), "L")),
    ("celeba-gans-report", ["--img-size", "64"], (CELEBA_G, CELEBA_D), ((64, 64), "RGB"))])
def test_the_entry_point_prints_each_report_networks_parameter_counts(tmp_path, capsys, arch, flags, counts, shape):
    out = str(tmp_path / "run")  # --epochs 0 --sample 1: the networks are built and printed, nothing trains
    dcgan.main(["--data", "fake", "--arch", arch, *flags, "--epochs", "0", "--sample", "1", "--out", out,
                "--device", "cpu"])
    assert f"G: {counts[0]:,} parameters   D: {counts[1]:,} parameters" in capsys.readouterr().out
    img = Image.open(os.path.join(out, "samples", "000000.png"))
    assert (img.size, img.mode) == shape


@pytest.mark.parametrize("arch", ["cifar10-report", "mnist-report", "celeba-gans-report"])
def test_each_report_arch_trains_resumes_samples_and_loads_from_its_checkpoint(tmp_path, arch):
    out, S, C = str(tmp_path / arch), 32, 1 if arch == "mnist-report" else 3
    dcgan.main(["--data", "fake", "--arch", arch, "--batch-size", "4", "--log-every", "1", "--max-steps", "1",
                "--out", out, "--device", "cpu"])
    path = os.path.join(out, "ckpt.pt")
    dcgan.main(["--resume", path, "--max-steps", "2", "--sample", "3", "--device", "cpu"])
    c = ckpt(out)
    assert c["args"]["arch"] == arch and (c["args"]["img_size"], c["args"]["channels"]) == (S, C)
    assert c["step"] == 2 and c["optD"]["state"][0]["step"].item() == 2  # Adam's state resumed, not restarted
    img = Image.open(os.path.join(out, "samples", "000002.png"))
    assert img.size == (S, S) and img.mode == ("L" if C == 1 else "RGB")
    G = dcgan.load_model(path)  # from the checkpoint alone
    assert type(G) is type(report_nets(arch, C, S)[0]) and not G.training
    assert all(torch.equal(v, c["G"][k]) for k, v in G.state_dict().items())
    with torch.no_grad():
        assert G(torch.randn(2, 100)).shape == (2, C, S, S)
    grid = latent_edit.main(["interpolate", "--ckpt", path, "--steps", "3", "--n", "2",
                             "--out", str(tmp_path / "interp.png"), "--device", "cpu"])
    assert Image.open(grid).size == (3 * S + 4 * 2, 2 * S + 3 * 2)  # 3 columns, 2 rows, 2-pixel padding


def test_report_arch_conflicts_are_refused_before_any_work(tmp_path):
    argv = ["--data", "fake", "--out", str(tmp_path / "run"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="cifar10-report is the report's 32x32 network, which --img-size 64"):
        dcgan.main(argv + ["--arch", "cifar10-report", "--img-size", "64"])
    with pytest.raises(SystemExit, match="mnist-report is the report's 1-channel network, which --channels 3"):
        dcgan.main(argv + ["--arch", "mnist-report", "--channels", "3"])
    with pytest.raises(SystemExit, match="report's own widths; --ngf and --ndf change only --arch paper"):
        dcgan.main(argv + ["--arch", "celeba-gans-report", "--ngf", "8"])
    assert not (tmp_path / "run").exists()
    out = run(tmp_path, "--max-steps", "1")  # a paper checkpoint resumed with a report's networks
    with pytest.raises(SystemExit, match="trained with --arch paper, which --arch mnist-report does not fit"):
        dcgan.main(["--resume", os.path.join(out, "ckpt.pt"), "--arch", "mnist-report", "--device", "cpu"])


def test_a_torchrun_launch_trains_a_report_arch(tmp_path):
    out = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "dcgan.py",
                        "--data", "fake", "--arch", "mnist-report", "--batch-size", "8", "--max-steps", "2",
                        "--log-every", "1", "--out", out, "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    c = ckpt(out)
    assert c["args"]["arch"] == "mnist-report" and c["step"] == 2
