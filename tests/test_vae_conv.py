"""vae_conv.py: the loss against hand computations and a Monte-Carlo KL, the Hou et al.
architecture, and the script through its real entry point (main(argv) in-process; as a process:
tests/test_entry_points.py)."""
import math
import os

import pytest
import torch
import torch.nn as nn

import data
import vae_conv
from vae_helpers import (BCE_HAND, BCE_LOGITS, BCE_X, KL_HAND, KL_LOGVAR, KL_MU, check_run_folder, heldout_kl,
                         monte_carlo_kl, prior_samples, read_pngs, rows)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "fake", "--width", "16", "--latent-dim", "8", "--batch-size", "16", "--log-every", "1",
         "--device", "cpu"]
REPORT = ["--data", "fake", "--arch", "cifar10-report", "--batch-size", "4", "--log-every", "1", "--device", "cpu"]


def run(tmp_path, *extra):
    out = str(tmp_path / "run")
    vae_conv.main(SMALL + ["--out", out, *extra])
    return out


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def convs(seq):
    return [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in seq if isinstance(m, nn.Conv2d)]


def test_architecture_is_hou_et_al_at_64_and_keeps_a_4x4_latent_map_at_every_size():
    m = vae_conv.VAE(latent_dim=100, width=256, channels=3, img_size=64)
    assert convs(m.encoder) == [(32, 4, 2), (64, 4, 2), (128, 4, 2), (256, 4, 2)]
    assert convs(m.decoder) == [(128, 3, 1), (64, 3, 1), (32, 3, 1), (3, 3, 1)]
    assert sum(isinstance(x, nn.Upsample) for x in m.decoder) == 4 and isinstance(m.decoder[-1], nn.Tanh)
    # Parameters by hand: 4x4 and 3x3 convs without bias (BatchNorm follows) except the last,
    # BatchNorm scale + shift, the two heads and the decoder's linear layer, latent 100.
    enc = 16 * (3 * 32 + 32 * 64 + 64 * 128 + 128 * 256) + 2 * (32 + 64 + 128 + 256) + 2 * (4096 * 100 + 100)
    dec = 100 * 4096 + 4096 + 9 * (256 * 128 + 128 * 64 + 64 * 32 + 32 * 3) + 3 + 2 * (128 + 64 + 32)
    assert sum(p.numel() for p in m.parameters()) == enc + dec == 2_312_107
    # 32x32 drops the first encoder block and the last hidden decoder block.
    m = vae_conv.VAE(img_size=32, channels=1)
    assert [c for c, _, _ in convs(m.encoder)] == [64, 128, 256]
    assert [c for c, _, _ in convs(m.decoder)] == [128, 64, 1]
    for size in (16, 32, 64, 128):
        m = vae_conv.VAE(latent_dim=5, width=32, channels=3, img_size=size).eval()
        x = torch.rand(2, 3, size, size) * 2 - 1
        with torch.no_grad():
            assert m.encoder[:-1](x).shape == (2, 32, 4, 4)
            mu, logvar = m.encode(x)
            assert mu.shape == logvar.shape == (2, 5)
            assert m.decode(mu).shape == x.shape


def test_bce_decoder_ends_in_logits_and_decode_still_returns_minus1_to_1():
    m = vae_conv.VAE(latent_dim=4, width=16, channels=3, img_size=16, recon="bce").eval()
    assert isinstance(m.decoder[-1], nn.Conv2d)  # no tanh in front of a loss that wants [0, 1]
    z = torch.randn(3, 4) * 5
    with torch.no_grad():
        assert torch.allclose(m.decode(z), torch.sigmoid(m.decoder_output(z)) * 2 - 1)


def test_bad_image_size_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="power of two"):
        run(tmp_path, "--img-size", "48")


def test_kl_term_matches_a_hand_computation_and_a_monte_carlo_estimate():
    out = torch.zeros(2, 3, 4, 4)
    _, _, kl = vae_conv.vae_loss(out, out, KL_MU, KL_LOGVAR, "mse")
    assert kl.item() == pytest.approx(KL_HAND, rel=1e-6)
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[-1.0, 0.5, math.log(0.1)]])
    _, _, kl = vae_conv.vae_loss(torch.zeros(1, 1), torch.zeros(1, 1), mu, logvar)
    assert kl.item() == pytest.approx(monte_carlo_kl(vae_conv.reparameterise, mu, logvar), rel=0.01)


def test_reconstruction_terms_match_hand_computations():
    # mse on [0, 1]-scaled pixels: x = (-1, 1, 0, 0.5) -> (0, 1, 0.5, 0.75); out = (1, 1, 0, 0)
    # -> (1, 1, 0.5, 0.5): squared errors 1 + 0 + 0 + 1/16. A second, perfect image adds 0.
    x = torch.tensor([[-1.0, 1.0, 0.0, 0.5], [0.3, -0.2, 0.9, -1.0]]).view(2, 1, 2, 2)
    out = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.3, -0.2, 0.9, -1.0]]).view(2, 1, 2, 2)
    zeros = torch.zeros(2, 3)
    total, rec, kl = vae_conv.vae_loss(out, x, zeros, zeros, "mse", beta=0.5)
    assert rec.item() == pytest.approx(1.0625 / 2) and kl.item() == 0 and total.item() == rec.item()
    total, rec, kl = vae_conv.vae_loss(BCE_LOGITS, BCE_X, KL_MU[1:], KL_LOGVAR[1:], "bce", beta=0.5)
    assert rec.item() == pytest.approx(BCE_HAND, rel=1e-6)
    assert total.item() == pytest.approx(BCE_HAND + 0.5 * (2 - math.log(2)), rel=1e-6)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_trains_a_few_steps_and_writes_every_file(tmp_path, size):
    out = run(tmp_path, "--img-size", str(size), "--max-steps", "2", "--batch-size", "8")
    check_run_folder(out, size)
    c = ckpt(out)
    assert c["script"] == "vae_conv" and c["step"] == 2 and (c["epoch"], c["batch"]) == (0, 2)  # 2 of 128 batches
    assert c["fixed_z"].shape == (64, 8)


def test_heldout_loss_is_the_test_split_loss_of_the_saved_model(tmp_path):
    out = run(tmp_path, "--max-steps", "3", "--recon", "bce", "--beta", "0.5")
    last = rows(out)[-1]
    t, r, k = float(last["test_loss"]), float(last["test_recon"]), float(last["test_kl"])
    assert t == pytest.approx(r + 0.5 * k, rel=1e-5)
    # The KL is deterministic given the encoder, so the checkpoint alone reproduces it.
    test = data.load("fake", split="test").images
    assert k == pytest.approx(heldout_kl(vae_conv.load_model(os.path.join(out, "ckpt.pt")), test), rel=1e-4)
    # Before any real training a Bernoulli decoder costs about ln 2 nats per pixel.
    assert 0.5 * 3 * 32 * 32 * math.log(2) < r < 2 * 3 * 32 * 32 * math.log(2)


def test_heldout_row_is_the_float32_loss_whatever_the_training_precision(tmp_path):
    """A reported likelihood must not move with the device: with --amp (bfloat16 autocast, which
    the CPU has too) the held-out row is still the float32 loss of the saved model, recomputed here
    from the checkpoint alone: one z per image, eps from a CPU generator seeded with --seed, in
    batches of --batch-size."""
    out = run(tmp_path, "--max-steps", "2", "--amp", "--recon", "bce", "--beta", "0.5", "--seed", "3")
    model = vae_conv.load_model(os.path.join(out, "ckpt.pt"))  # float32, eval mode, on the CPU
    test = data.load("fake", split="test").images
    gen, sums = torch.Generator().manual_seed(3), torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(test), 16):
            x = data.to_float(test[i:i + 16])
            out_x, mu, logvar = model(x, generator=gen)
            sums += torch.stack(vae_conv.vae_loss(out_x, x, mu, logvar, "bce", 0.5)).double() * len(x)
    last = rows(out)[-1]
    logged = [float(last[k]) for k in ("test_loss", "test_recon", "test_kl")]
    assert logged == pytest.approx((sums / len(test)).tolist(), rel=1e-5)


def test_resume_continues_step_count_optimizer_state_and_log(tmp_path):
    out = run(tmp_path, "--max-steps", "2")
    first = ckpt(out)
    vae_conv.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "5", "--epochs", "3", "--device", "cpu"])
    second = ckpt(out)
    assert second["step"] == 5 and (second["epoch"], second["batch"]) == (0, 5)
    assert second["opt"]["state"][0]["step"].item() == 5  # Adam's counter continued
    assert torch.equal(first["fixed_z"], second["fixed_z"])
    assert not torch.equal(first["model"]["fc_mu.weight"], second["model"]["fc_mu.weight"])
    r = rows(out)
    assert [int(x["step"]) for x in r if x["loss"]] == [1, 2, 3, 4, 5]
    assert [int(x["epoch"]) for x in r if x["test_loss"]] == [1, 1]  # both stops were in epoch 1
    assert second["args"]["width"] == 16  # flags not given again came from the checkpoint


def test_sample_from_checkpoint_writes_readable_pngs(tmp_path):
    from PIL import Image
    out = run(tmp_path, "--max-steps", "1", "--channels", "1", "--recon", "bce")
    vae_conv.main(["--resume", os.path.join(out, "ckpt.pt"), "--epochs", "0", "--sample", "5", "--device", "cpu"])
    files = sorted(os.listdir(os.path.join(out, "samples")))
    assert files == [f"{i:06d}.png" for i in range(5)]
    img = Image.open(os.path.join(out, "samples", files[0]))
    assert img.size == (32, 32) and img.mode == "L"


def test_load_model_rebuilds_the_vae_from_the_checkpoint_alone(tmp_path):
    out = run(tmp_path, "--max-steps", "1", "--latent-dim", "12", "--img-size", "16")
    m = vae_conv.load_model(os.path.join(out, "ckpt.pt"))
    assert m.latent_dim == 12 and not m.training
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mu, logvar = m.encode(x)
        img = m.decode(mu)
    assert mu.shape == logvar.shape == (3, 12)
    assert img.shape == (3, 3, 16, 16) and img.min() >= -1 and img.max() <= 1


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = run(tmp_path, "--max-steps", "2")
    good = ckpt(out)
    real_loss = vae_conv.vae_loss
    monkeypatch.setattr(vae_conv, "vae_loss", lambda *a: tuple(v * float("nan") for v in real_loss(*a)))
    with pytest.raises(SystemExit, match="NaN"):
        vae_conv.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "4", "--epochs", "3",
                       "--device", "cpu"])
    after = ckpt(out)
    assert after["step"] == good["step"] == 2
    assert torch.equal(after["model"]["fc_mu.weight"], good["model"]["fc_mu.weight"])


def test_bad_resume_paths_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        vae_conv.main(["--resume", str(tmp_path / "missing.pt"), "--device", "cpu"])
    other = tmp_path / "other.pt"
    torch.save({"script": "mlp_vae", "args": {}}, other)
    with pytest.raises(SystemExit, match="not written by vae_conv.py"):
        vae_conv.main(["--resume", str(other), "--device", "cpu"])
    with pytest.raises(ValueError, match="not written by vae_conv.py"):
        vae_conv.load_model(str(other))
    out = run(tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="--width 16, which --width 32 does not fit"):
        vae_conv.main(["--resume", os.path.join(out, "ckpt.pt"), "--width", "32", "--epochs", "0", "--sample", "1",
                       "--device", "cpu"])


def test_the_entry_point_prints_the_counts_and_refuses_an_unknown_dataset(tmp_path, capsys):
    # (as a process: tests/test_entry_points.py)
    out = str(tmp_path / "cli")
    vae_conv.main([*SMALL, "--max-steps", "2", "--out", out, "--sample", "3"])
    r = capsys.readouterr()
    # width 16 at 32px, latent 8: convs 3-4-8-16 (4x4), heads 256 -> 8; linear 8 -> 256, convs 8-4-3 (3x3).
    enc = 16 * (3 * 4 + 4 * 8 + 8 * 16) + 2 * (4 + 8 + 16) + 2 * (256 * 8 + 8)
    dec = 8 * 256 + 256 + 9 * (16 * 8 + 8 * 4 + 4 * 3) + 3 + 2 * (8 + 4)
    assert f"encoder: {enc:,} parameters   decoder: {dec:,} parameters" in r.out
    assert "held out: test_loss" in r.out
    assert len(os.listdir(os.path.join(out, "samples"))) == 3
    with pytest.raises(SystemExit) as e:
        vae_conv.main(["--data", "no-such-set", "--out", out + "-2", "--device", "cpu"])
    assert e.value.code.startswith("error: ") and "no-such-set" in e.value.code


# ---------------------------------------------------------------- --arch cifar10-report

def params(*modules):
    return [sum(p.numel() for p in m.parameters()) for m in modules]


def test_cifar10_report_arch_has_the_reports_parameter_table_exactly():
    m = vae_conv.build({"arch": "cifar10-report", "latent_dim": 512, "recon": "bce"})
    layers = lambda seq: [m for m in seq if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    # The report's table; each entry is weights + biases of a 3x3 conv or a linear layer, by hand.
    enc = [3 * 128 * 9 + 128, 128 * 256 * 9 + 256, 256 * 512 * 9 + 512, 512 * 1024 * 9 + 1024,
           4096 * 3072 + 3072]
    assert enc == [3_584, 295_168, 1_180_160, 4_719_616, 12_585_984]
    assert params(*layers(m.encoder)) == enc
    assert params(m.fc_mu, m.fc_logvar) == [3072 * 512 + 512] * 2 == [1_573_376] * 2
    dec = [512 * 4096 + 4096, 1024 * 256 * 9 + 256, 256 * 128 * 9 + 128, 128 * 64 * 9 + 64, 64 * 3 * 9 + 3,
           3 * 3 * 9 + 3]
    assert dec == [2_101_248, 2_359_552, 295_040, 73_792, 1_731, 84]
    assert params(m.fc_z, *layers(m.decoder)) == dec
    assert sum(params(m.encoder, m.fc_mu, m.fc_logvar)) == 21_931_264 and sum(params(m.fc_z, m.decoder)) == 4_831_447
    # The report's maps: 32 -> 16 -> 8 -> 4 -> 2 down (no BatchNorm), 2 -> 4 -> 8 -> 16 -> 32 up.
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    x, sizes = torch.rand(2, 3, 32, 32) * 2 - 1, []
    for layer in layers(m.encoder)[:4] + layers(m.decoder):
        layer.register_forward_hook(lambda mod, i, out: sizes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        mu, logvar = m.encode(x)
        img = m.decode(mu)
    assert sizes == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2),
                     (256, 4, 4), (128, 8, 8), (64, 16, 16), (3, 32, 32), (3, 32, 32)]
    assert mu.shape == logvar.shape == (2, 512) and img.shape == x.shape
    # bce (the report's loss): the decoder ends in logits and decode is their sigmoid on [-1, 1].
    assert isinstance(m.decoder[-1], nn.ConvTranspose2d)
    with torch.no_grad():
        assert torch.allclose(img, torch.sigmoid(m.decoder_output(mu)) * 2 - 1)
    m = vae_conv.build({"arch": "cifar10-report", "latent_dim": 20, "recon": "mse"})
    assert isinstance(m.decoder[-1], nn.Tanh) and params(m.fc_mu, m.fc_z) == [3072 * 20 + 20, 20 * 4096 + 4096]


def test_cifar10_report_arch_trains_resumes_samples_and_rebuilds_from_its_checkpoint(tmp_path, capsys):
    import latent_edit
    out = str(tmp_path / "report")
    vae_conv.main(REPORT + ["--out", out, "--max-steps", "1"])
    printed = capsys.readouterr().out
    assert "encoder: 21,931,264 parameters   decoder: 4,831,447 parameters" in printed
    assert "latent_dim=512" in printed and "recon=bce" in printed  # the arch's defaults
    path = os.path.join(out, "ckpt.pt")
    vae_conv.main(["--resume", path, "--max-steps", "2", "--device", "cpu"])
    c = ckpt(out)
    assert c["step"] == 2 and c["opt"]["state"][0]["step"].item() == 2
    assert {k: c["args"][k] for k in ("arch", "latent_dim", "recon", "img_size", "channels")} == \
        {"arch": "cifar10-report", "latent_dim": 512, "recon": "bce", "img_size": 32, "channels": 3}
    vae_conv.main(["--resume", path, "--epochs", "0", "--sample", "3", "--device", "cpu"])
    assert torch.equal(read_pngs(os.path.join(out, "samples"), 3, 32, "RGB"), prior_samples(vae_conv, out, 3, 1.0))
    m = vae_conv.load_model(path)
    assert isinstance(m, vae_conv.CifarReportVAE) and m.latent_dim == 512 and not m.training
    latent_edit.main(["interpolate", "--ckpt", path, "--from", "0", "--to", "1", "--steps", "3",
                      "--out", str(tmp_path / "path.png"), "--device", "cpu"])
    assert os.path.getsize(tmp_path / "path.png") > 0
    # Resuming with the other networks is refused, both named.
    paper = run(tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="--arch paper, which --arch cifar10-report does not fit"):
        vae_conv.main(["--resume", os.path.join(paper, "ckpt.pt"), "--arch", "cifar10-report", "--epochs", "0",
                       "--sample", "1", "--device", "cpu"])


def test_defaults_follow_the_arch_and_the_report_arch_refuses_other_image_shapes(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("data was read before the flags were checked")
    monkeypatch.setattr(data, "load", refuse)
    # --epochs 0 --sample 1 with no checkpoint: the resolved settings are printed, no data is read.
    vae_conv.main(["--data", "fake", "--width", "16", "--epochs", "0", "--sample", "1", "--device", "cpu",
                   "--out", str(tmp_path / "paper")])
    printed = capsys.readouterr().out
    assert "arch=paper" in printed and "latent_dim=128" in printed and "recon=mse" in printed
    vae_conv.main(REPORT + ["--latent-dim", "16", "--recon", "mse", "--epochs", "0", "--sample", "1",
                            "--out", str(tmp_path / "report")])
    enc = 21_931_264 - 2 * (3072 * 512 + 512) + 2 * (3072 * 16 + 16)
    dec = 4_831_447 - (512 * 4096) + 16 * 4096
    assert f"encoder: {enc:,} parameters   decoder: {dec:,} parameters" in capsys.readouterr().out
    for flags in (["--img-size", "64"], ["--channels", "1"]):
        with pytest.raises(SystemExit, match="cifar10-report is the CIFAR-10 report's VAE for 32x32 RGB images"):
            vae_conv.main(REPORT + flags + ["--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="GiB"):  # check_size counts the report's networks too
        vae_conv.main(REPORT + ["--batch-size", "10000000", "--out", str(tmp_path / "bad")])
