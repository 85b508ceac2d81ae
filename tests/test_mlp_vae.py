"""mlp_vae.py: the loss against hand computations and a Monte-Carlo KL, the architecture, and the
script through its real entry point (main(argv) in-process; as a process: tests/test_entry_points.py), and
one real-MNIST run."""
import math
import os

import pytest
import torch
import torch.nn as nn

import data
import mlp_vae
from vae_helpers import BCE_HAND, BCE_LOGITS, BCE_X, KL_HAND, KL_LOGVAR, KL_MU, check_run_folder, monte_carlo_kl, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "fake", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


def run(tmp_path, *extra):
    out = str(tmp_path / "run")
    mlp_vae.main(SMALL + ["--out", out, *extra])
    return out


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_architecture_is_the_mnist_report_mlp():
    m = mlp_vae.VAE()  # MNIST: 1 x 28 x 28, latent 2
    linears = lambda seq: [(x.in_features, x.out_features) for x in seq if isinstance(x, nn.Linear)]
    assert linears(m.encoder) == [(784, 512), (512, 256)]
    assert (m.fc_mu.in_features, m.fc_mu.out_features) == (m.fc_logvar.in_features, m.fc_logvar.out_features) == (256, 2)
    assert linears(m.decoder) == [(2, 256), (256, 512), (512, 784)]
    n = (784 * 512 + 512) + (512 * 256 + 256) + 2 * (256 * 2 + 2) + (2 * 256 + 256) + (256 * 512 + 512) + (512 * 784 + 784)
    assert sum(p.numel() for p in m.parameters()) == n == 1_068_820
    z = torch.randn(5, 2) * 10
    with torch.no_grad():  # the loss sees logits; decode returns the sigmoid rescaled to [-1, 1]
        img = m.decode(z)
        assert img.shape == (5, 1, 28, 28) and torch.allclose(img, torch.sigmoid(m.decoder_output(z)) * 2 - 1)


def test_kl_term_matches_a_hand_computation_and_a_monte_carlo_estimate():
    out = torch.zeros(2, 1, 2, 2)
    _, _, kl = mlp_vae.vae_loss(out, out, KL_MU, KL_LOGVAR)
    assert kl.item() == pytest.approx(KL_HAND, rel=1e-6)
    mu, logvar = torch.tensor([[1.5, 0.0]]), torch.tensor([[0.7, -2.0]])
    _, _, kl = mlp_vae.vae_loss(torch.zeros(1, 1), torch.zeros(1, 1), mu, logvar)
    assert kl.item() == pytest.approx(monte_carlo_kl(mlp_vae.reparameterise, mu, logvar), rel=0.01)


def test_bce_term_matches_a_hand_computation_and_the_probability_form():
    total, rec, kl = mlp_vae.vae_loss(BCE_LOGITS, BCE_X, KL_MU[1:], KL_LOGVAR[1:])
    assert rec.item() == pytest.approx(BCE_HAND, rel=1e-6)
    assert total.item() == pytest.approx(BCE_HAND + 2 - math.log(2), rel=1e-6)
    # Same number as pytorch/examples' form: F.binary_cross_entropy(sigmoid(logits), x in [0, 1]).
    logits, x = torch.randn(4, 1, 28, 28) * 3, torch.rand(4, 1, 28, 28) * 2 - 1
    _, rec, _ = mlp_vae.vae_loss(logits, x, torch.zeros(4, 2), torch.zeros(4, 2))
    ref = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), (x + 1) / 2, reduction="sum") / 4
    assert rec.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_trains_a_few_steps_and_writes_every_file(tmp_path, size, channels):
    out = run(tmp_path, "--img-size", str(size), "--channels", str(channels), "--max-steps", "2")
    check_run_folder(out, size)
    c = ckpt(out)
    assert c["script"] == "mlp_vae" and c["step"] == 2 and (c["epoch"], c["batch"]) == (0, 2)  # 2 of 128 batches
    assert c["fixed_z"].shape == (64, 2) and c["args"]["img_size"] == size


def test_heldout_row_is_the_float32_loss_of_the_saved_model_even_when_training_under_amp(tmp_path):
    # --amp trains under bf16 autocast (it runs on the CPU too); the held-out negative ELBO must
    # still be the float32 one of the saved model, as computed here from the checkpoint alone: under
    # bf16 it moved by 0.1-0.4%, so a reported likelihood depended on the device.
    out = run(tmp_path, "--max-steps", "3", "--img-size", "28", "--channels", "1", "--latent-dim", "4", "--amp")
    held = [r for r in rows(out) if r["test_loss"]]
    assert [(int(r["step"]), int(r["epoch"])) for r in held] == [(3, 1)]  # --max-steps ends with one
    logged = [float(held[0][k]) for k in ("test_loss", "test_recon", "test_kl")]
    model = mlp_vae.load_model(os.path.join(out, "ckpt.pt"))
    test = data.load("fake", split="test", img_size=28, channels=1).images
    gen, sums = torch.Generator().manual_seed(0), torch.zeros(3, dtype=torch.float64)  # the run's --seed
    with torch.no_grad():
        for i in range(0, len(test), 16):  # the run's batch size, so that eps comes in the same order
            x = test[i:i + 16].float() / 127.5 - 1
            mu, logvar = model.encode(x)
            z = mu + torch.exp(logvar / 2) * torch.randn(mu.shape, generator=gen)
            sums += torch.stack(mlp_vae.vae_loss(model.decoder_output(z), x, mu, logvar)).double() * len(x)
    expected = (sums / len(test)).tolist()
    assert logged == pytest.approx(expected, rel=1e-5)
    assert logged[0] == pytest.approx(logged[1] + logged[2], rel=1e-5)


def test_resume_continues_step_count_optimizer_state_and_log(tmp_path):
    out = run(tmp_path, "--max-steps", "2", "--latent-dim", "3")
    first = ckpt(out)
    mlp_vae.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "5", "--epochs", "3", "--device", "cpu"])
    second = ckpt(out)
    assert second["step"] == 5 and (second["epoch"], second["batch"]) == (0, 5)
    assert second["opt"]["state"][0]["step"].item() == 5  # Adam's counter continued
    assert torch.equal(first["fixed_z"], second["fixed_z"])
    assert not torch.equal(first["model"]["fc_mu.weight"], second["model"]["fc_mu.weight"])
    r = rows(out)
    assert [int(x["step"]) for x in r if x["loss"]] == [1, 2, 3, 4, 5]
    # A held-out row at each --max-steps stop, both in the unfinished epoch 1.
    assert [(int(x["step"]), int(x["epoch"])) for x in r if x["test_loss"]] == [(2, 1), (5, 1)]
    assert second["args"]["latent_dim"] == 3  # flags not given again came from the checkpoint


def test_sample_from_checkpoint_writes_readable_pngs(tmp_path):
    from PIL import Image
    out = run(tmp_path, "--max-steps", "1", "--channels", "1", "--img-size", "28")
    mlp_vae.main(["--resume", os.path.join(out, "ckpt.pt"), "--epochs", "0", "--sample", "5", "--device", "cpu"])
    files = sorted(os.listdir(os.path.join(out, "samples")))
    assert files == [f"{i:06d}.png" for i in range(5)]
    img = Image.open(os.path.join(out, "samples", files[0]))
    assert img.size == (28, 28) and img.mode == "L"


def test_load_model_rebuilds_the_vae_from_the_checkpoint_alone(tmp_path):
    out = run(tmp_path, "--max-steps", "1", "--latent-dim", "12")
    m = mlp_vae.load_model(os.path.join(out, "ckpt.pt"))
    assert m.latent_dim == 12 and not m.training
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mu, logvar = m.encode(x)
        img = m.decode(mu)
    assert mu.shape == logvar.shape == (3, 12)
    assert img.shape == (3, 3, 32, 32) and img.min() >= -1 and img.max() <= 1


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = run(tmp_path, "--max-steps", "2")
    good = ckpt(out)
    real_loss = mlp_vae.vae_loss
    monkeypatch.setattr(mlp_vae, "vae_loss", lambda *a: tuple(v * float("nan") for v in real_loss(*a)))
    with pytest.raises(SystemExit, match="NaN"):
        mlp_vae.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "4", "--epochs", "3", "--device", "cpu"])
    after = ckpt(out)
    assert after["step"] == good["step"] == 2
    assert torch.equal(after["model"]["fc_mu.weight"], good["model"]["fc_mu.weight"])


def test_bad_resume_paths_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        mlp_vae.main(["--resume", str(tmp_path / "missing.pt"), "--device", "cpu"])
    other = tmp_path / "other.pt"
    torch.save({"script": "vae_conv", "args": {}}, other)
    with pytest.raises(SystemExit, match="not written by mlp_vae.py"):
        mlp_vae.main(["--resume", str(other), "--device", "cpu"])
    with pytest.raises(ValueError, match="not written by mlp_vae.py"):
        mlp_vae.load_model(str(other))
    out = run(tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="--latent-dim 2, which --latent-dim 5 does not fit"):
        mlp_vae.main(["--resume", os.path.join(out, "ckpt.pt"), "--latent-dim", "5", "--epochs", "0", "--sample", "1",
                      "--device", "cpu"])


def test_the_entry_point_prints_the_counts_and_refuses_an_unknown_dataset(tmp_path, capsys):
    # (as a process: tests/test_entry_points.py)
    out = str(tmp_path / "cli")
    mlp_vae.main([*SMALL, "--img-size", "28", "--channels", "1", "--max-steps", "2", "--out", out, "--sample", "3"])
    r = capsys.readouterr()
    assert "encoder: 534,276 parameters   decoder: 534,544 parameters" in r.out  # the 1,068,820 above
    assert len(os.listdir(os.path.join(out, "samples"))) == 3
    with pytest.raises(SystemExit) as e:
        mlp_vae.main(["--data", "no-such-set", "--out", out + "-2", "--device", "cpu"])
    assert e.value.code.startswith("error: ") and "no-such-set" in e.value.code


def test_real_mnist_learns_within_a_few_hundred_steps(tmp_path, mnist_root):
    # pytorch/examples' vae (latent 20) reaches a held-out 128.5 nats after its first epoch (469
    # steps); 300 steps of ours must at least be far below the ~540 nats of an untrained decoder.
    out = str(tmp_path / "mnist")
    mlp_vae.main(["--data", "mnist", "--data-root", str(mnist_root), "--latent-dim", "20",
                  "--max-steps", "300", "--log-every", "100", "--out", out, "--device", "cpu"])
    assert float(rows(out)[-1]["test_loss"]) < 160
