"""vaegan.py: the paper's architecture, the loss terms against hand computations, the gradient
routing of Algorithm 1 against autograd on copies, the GAN balancing flags (--separate-dis,
--real-weight, --margin/--equilibrium, --lr-anneal), and the script through its real entry point."""
import copy
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import vaegan
from vae_helpers import KL_HAND, KL_LOGVAR, KL_MU, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "fake", "--width", "8", "--latent-dim", "8", "--batch-size", "16", "--log-every", "1",
         "--device", "cpu"]
COLUMNS = ["step", "epoch", "kl", "feat_mse", "pixel_mse", "loss_dis", "gan_dec", "D(x)", "D(x_tilde)", "D(x_p)",
           "dis_real", "dis_fake", "dec_step", "dis_step", "gnorm_enc", "gnorm_dec", "gnorm_dis",
           "img_per_s", "test_kl", "test_feat_mse", "test_pixel_mse"]


def run(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    vaegan.main(SMALL + ["--out", out, *extra])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run on 16x16 grey fake images, latent 12, shared by the tests that start from a checkpoint."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    vaegan.main(SMALL + ["--out", out, "--max-steps", "2", "--channels", "1", "--img-size", "16", "--latent-dim", "12"])
    return out


def copy_of(trained, tmp_path):
    """A private copy of the shared run (a resumed run writes in its checkpoint's folder)."""
    return shutil.copytree(trained, str(tmp_path / "run"))


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def convs(m):
    return [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in m.modules() if isinstance(c, (nn.Conv2d, nn.ConvTranspose2d))]


def test_architecture_is_the_papers_at_64_and_keeps_its_layers_at_32():
    m = vaegan.VAEGAN(latent_dim=128, width=64, channels=3, img_size=64)
    assert convs(m.encoder) == [(64, 5, 2), (128, 5, 2), (256, 5, 2)]
    assert convs(m.decoder) == [(256, 5, 2), (128, 5, 2), (32, 5, 2), (3, 5, 1)]
    assert convs(m.discriminator) == [(32, 5, 1), (128, 5, 2), (256, 5, 2), (256, 5, 2)]
    # By hand: 5x5 convs without bias where BatchNorm follows, BatchNorm scale + shift, dense layers
    # 256*8*8 -> 2048 (encoder), 128 -> 256*8*8 (decoder), 256*8*8 -> 512 -> 1 (discriminator).
    enc = 25 * (3 * 64 + 64 * 128 + 128 * 256) + 2 * (64 + 128 + 256) + 16384 * 2048 + 2 * 2048 + 2 * (2048 * 128 + 128)
    dec = 128 * 16384 + 2 * 16384 + 25 * (256 * 256 + 256 * 128 + 128 * 32) + 2 * (256 + 128 + 32) + 25 * 32 * 3 + 3
    dis = 25 * 3 * 32 + 32 + 25 * (32 * 128 + 128 * 256 + 256 * 256) + 2 * (128 + 256 + 256) + 16384 * 512 + 2 * 512 + 513
    assert (n_params(m.encoder), n_params(m.decoder), n_params(m.discriminator)) == (enc, dec, dis)
    assert (enc, dec, dis) == (35_112_768, 4_693_155, 10_953_857)
    for size, side in ((32, 4), (64, 8)):
        m = vaegan.VAEGAN(latent_dim=5, width=8, channels=1, img_size=size).eval()
        x = torch.rand(2, 1, size, size) * 2 - 1
        with torch.no_grad():
            mu, logvar = m.encode(x)
            logits, feats = m.discriminator(x)
            assert mu.shape == logvar.shape == (2, 5) and m.decode(mu).shape == x.shape
            assert logits.shape == (2,) and feats.shape == (2, 32 * side * side)  # Dis_l: 4w x S/8 x S/8


def test_bad_image_size_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="multiple of 8"):
        run(tmp_path, "--img-size", "36")


def test_loss_terms_match_hand_computations():
    # One image: logits real 0, reconstruction ln 3, prior sample -ln 3 (D = 1/2, 3/4, 1/4).
    #   Dis costs: on the real image -ln(1/2) = ln 2, on the fakes (-ln(1 - 3/4) - ln(1 - 1/4)) / 2
    #   Dis, w = 1/2: ln 2 + (ln 4 + ln(4/3)) / 2
    #   Dis, w = None: ln 2 + ln 4 + ln(4/3) = -L_GAN, the paper's sum; w = 1/3: 2/3 of it
    #   Dec:  -ln(3/4) - ln(1/4)                    (non-saturating: both fakes labelled real)
    # Four features, error (1, 2, 0, 0): feat_mse 5/4; L_llike = 1/2 * 5 = N_l / 2 * feat_mse.
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5]).view(1, 1, 2, 2)
    x_tilde = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    logits = torch.tensor([0.0, math.log(3), -math.log(3)])
    feats = torch.tensor([[0.0, 0, 0, 0], [1, 2, 0, 0], [9, 9, 9, 9]])
    t = vaegan.vaegan_loss(x, KL_MU[1:], KL_LOGVAR[1:], x_tilde, logits, feats, gamma=15)
    kl = 1 / 2 + 3 / 2 - math.log(2)  # vae_helpers' second image
    assert t["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert t["feat_mse"].item() == pytest.approx(5 / 4)
    assert t["loss_enc"].item() == pytest.approx(kl + 2.5, rel=1e-6)
    assert t["dis_real"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert t["dis_fake"].item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)
    assert t["loss_dis"].item() == pytest.approx(math.log(2) + (math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)
    paper = vaegan.vaegan_loss(x, KL_MU[1:], KL_LOGVAR[1:], x_tilde, logits, feats, gamma=15, real_weight=None)
    assert paper["loss_dis"].item() == pytest.approx(math.log(2) + math.log(4) + math.log(4 / 3), rel=1e-6)
    third = vaegan.vaegan_loss(x, KL_MU[1:], KL_LOGVAR[1:], x_tilde, logits, feats, gamma=15, real_weight=1 / 3)
    assert third["loss_dis"].item() == pytest.approx(2 / 3 * (math.log(2) + math.log(4) + math.log(4 / 3)), rel=1e-6)
    w = vaegan.vaegan_loss(x, KL_MU[1:], KL_LOGVAR[1:], x_tilde, logits, feats, gamma=15, real_weight=0.66)
    assert w["loss_dis"].item() == pytest.approx(2 * (0.66 * math.log(2) + 0.34 * (math.log(4) + math.log(4 / 3)) / 2))
    assert t["gan_dec"].item() == pytest.approx(math.log(4 / 3) + math.log(4), rel=1e-6)
    assert t["loss_dec"].item() == pytest.approx(15 * 5 / 4 + t["gan_dec"].item(), rel=1e-6)
    # pixel_mse on [0, 1]-scaled pixels: errors 1, 0, 0, 1/4 in [-1, 1] units -> 1 + 1/16.
    assert t["pixel_mse"].item() == pytest.approx(1.0625)
    assert t["D(x)"].item() == pytest.approx(0.5) and t["D(x_p)"].item() == pytest.approx(0.25)
    assert vaegan.kl_divergence(KL_MU, KL_LOGVAR).item() == pytest.approx(KL_HAND, rel=1e-6)


@pytest.mark.parametrize("layer, separate, w", [(4, True, 0.5), (1, True, 0.5), (4, False, None)])
def test_one_step_moves_each_network_by_the_gradient_of_its_own_loss_only(layer, separate, w):
    torch.manual_seed(0)
    model = vaegan.VAEGAN(latent_dim=6, width=4, channels=3, img_size=16)
    hand = copy.deepcopy(model)
    x, eps, z_p, gamma, lr = torch.rand(5, 3, 16, 16) * 2 - 1, torch.randn(5, 6), torch.randn(5, 6), 15.0, 0.1
    nets = [model.encoder, model.decoder, model.discriminator]
    before = [[p.detach().clone() for p in n.parameters()] for n in nets]
    opts = [torch.optim.SGD(n.parameters(), lr=lr) for n in nets]
    vaegan.train_step(nets, opts, x, gamma, layer, eps=eps, z_p=z_p,  # no in-place autograd error either
                      separate_dis=separate, real_weight=w, margin=None)

    # The same forward on copies; Dis_l read with a hook on the discriminator's conv number `layer`.
    # separate: the discriminator called on x, x~ and x_p one at a time (each BatchNorm on its own
    # batch); else on the joint batch of 15.
    feats = []
    conv = [m for m in hand.discriminator.modules() if isinstance(m, nn.Conv2d)][layer - 1]
    conv.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    mu, logvar = hand.encoder(x)
    fakes = hand.decoder(torch.cat([mu + torch.exp(0.5 * logvar) * eps, z_p]))
    if separate:
        logits = torch.cat([hand.discriminator(v, layer)[0] for v in (x, fakes[:5], fakes[5:])])
    else:
        logits = hand.discriminator(torch.cat([x, fakes]), layer)[0]
    real, tilde, prior = logits.split(5)
    f_x, f_tilde = torch.cat(feats)[:5], torch.cat(feats)[5:10]
    err = (f_tilde - f_x).pow(2)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum() / 5
    gan_dec = -F.logsigmoid(tilde).mean() - F.logsigmoid(prior).mean()
    if w is None:  # -L_GAN, the paper's sum
        loss_dis = -(F.logsigmoid(real).mean() + F.logsigmoid(-tilde).mean() + F.logsigmoid(-prior).mean())
    else:          # real images weighted w, each kind of fake (1 - w) / 2, times 2
        loss_dis = -2 * (w * F.logsigmoid(real).mean()
                         + (1 - w) / 2 * (F.logsigmoid(-tilde).mean() + F.logsigmoid(-prior).mean()))
    losses = {"encoder": kl + 0.5 * err.sum() / 5,                       # L_prior + L_llike
              "decoder": gamma * err.mean() + gan_dec,                    # gamma L_llike - L_GAN
              "discriminator": loss_dis}
    for (name, loss), net, old in zip(losses.items(), nets, before):
        grads = torch.autograd.grad(loss, list(getattr(hand, name).parameters()), retain_graph=True)
        for p, p0, g in zip(net.parameters(), old, grads):
            assert torch.allclose(p.detach(), p0 - lr * g, atol=1e-6), name
    # The test has teeth: the GAN loss does reach the encoder's weights if nothing stops it.
    leak = torch.autograd.grad(gan_dec, list(hand.encoder.parameters()), retain_graph=True)
    assert max(g.abs().max().item() for g in leak) > 1e-4


def test_stepping_between_backward_passes_is_what_breaks_on_modern_pytorch():
    torch.manual_seed(0)
    m = vaegan.VAEGAN(latent_dim=4, width=4, channels=1, img_size=16)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    mu, logvar = m.encode(x)
    fakes = m.decode(torch.cat([vaegan.reparameterise(mu, logvar), torch.randn(4, 4)]))
    logits, feats = m.discriminator(torch.cat([x, fakes]))
    t = vaegan.vaegan_loss(x, mu, logvar, fakes[:4], logits, feats, 15.0)
    opt = torch.optim.RMSprop(m.discriminator.parameters())
    t["loss_dis"].backward(retain_graph=True)
    opt.step()  # the ports' order: the discriminator steps before the decoder's backward
    with pytest.raises(RuntimeError, match="inplace operation"):
        t["loss_dec"].backward()


@pytest.mark.parametrize("size", [32, 64])
def test_trains_a_few_steps_and_writes_every_file(tmp_path, size):
    extra = ["--optim", "adam", "--margin", "none"] if size == 64 else []
    out = run(tmp_path, "--img-size", str(size), "--max-steps", "2", "--batch-size", "8", *extra)
    for f in ["grid_epoch_001.png", "recon_epoch_001.png", "losses.csv", "losses.png", "ckpt.pt"]:
        assert os.path.exists(os.path.join(out, f)), f
    side = 8 * size + 9 * 2  # 8 x 8 images with 2-pixel padding; recon: 4 input rows above 4 output rows
    for f in ["grid_epoch_001.png", "recon_epoch_001.png"]:
        assert Image.open(os.path.join(out, f)).size == (side, side)
    r = rows(out)
    assert list(r[0]) == COLUMNS
    assert [x["step"] for x in r] == ["1", "2", "2"] and r[-1]["kl"] == "" and r[0]["test_kl"] == ""
    assert all(0 < float(x[k]) < 1 for x in r[:2] for k in ("D(x)", "D(x_tilde)", "D(x_p)"))
    c = ckpt(out)
    assert c["script"] == "vaegan" and c["step"] == 2 and (c["epoch"], c["batch"]) == (0, 2)  # 2 of 256 batches
    assert c["fixed_z"].shape == (64, 8)
    assert type(c["opt_encoder"]["state"][0]["exp_avg" if extra else "square_avg"]) is torch.Tensor
    # The held-out KL is the closed form over the test split, from the saved encoder alone.
    m = vaegan.load_model(os.path.join(out, "ckpt.pt"))
    with torch.no_grad():
        mu, logvar = m.encode(data.to_float(data.load("fake", split="test", img_size=size).images))
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum() / len(mu)
    assert float(r[-1]["test_kl"]) == pytest.approx(kl.item(), rel=1e-4)


def test_held_out_losses_are_float32_whatever_the_training_precision(tmp_path):
    """After a bfloat16 (--amp) step the held-out row is still a float32 evaluation of the saved
    networks: here recomputed by hand from ckpt.pt, eval mode, the script's z draws (seed 0,
    batches of 256), Dis_l read with a hook on the 4th conv."""
    out = run(tmp_path, "--img-size", "16", "--max-steps", "1", "--amp")
    assert ckpt(out)["args"]["amp"] is True
    logged = [float(rows(out)[-1][k]) for k in ("test_kl", "test_feat_mse", "test_pixel_mse")]
    m, feats = vaegan.load_model(os.path.join(out, "ckpt.pt")), {}
    conv = [c for c in m.discriminator.modules() if isinstance(c, nn.Conv2d)][3]
    conv.register_forward_hook(lambda mod, i, o: feats.update(out=o.flatten(1)))
    images = data.load("fake", split="test", img_size=16).images
    gen, sums = torch.Generator().manual_seed(0), torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = images[i:i + 256].float() / 127.5 - 1
            mu, logvar = m.encode(x)
            x_tilde = m.decode(mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen))
            m.discriminator(torch.cat([x, x_tilde]))
            f_x, f_tilde = feats["out"].split(len(x))
            sums += torch.stack([0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(),   # KL, summed over images
                                 (f_tilde - f_x).pow(2).mean(1).sum(),                 # feature MSE per image
                                 ((x_tilde - x) / 2).pow(2).sum()]).double()            # [0, 1] pixel SSE
    for name, got, want in zip(("KL", "feat_mse", "pixel_mse"), logged, (sums / len(images)).tolist()):
        assert got == pytest.approx(want, rel=1e-5), name  # under bfloat16 autocast: KL, feat_mse off by ~1e-3


@pytest.mark.parametrize("flags, says", [
    (["--gamma", "nan"], "--gamma"), (["--gamma", "-1"], "--gamma"),
    (["--width", "0"], "--width"), (["--width", "5"], "--width must be an even"),
    (["--real-weight", "0"], "--real-weight"), (["--real-weight", "1"], "--real-weight"),
    (["--real-weight", "nan"], "--real-weight"), (["--margin", "-0.1"], "--margin"), (["--margin", "nan"], "--margin"),
    (["--equilibrium", "0"], "--equilibrium"), (["--equilibrium", "inf"], "--equilibrium"),
    (["--lr-anneal", "0"], "--lr-anneal"), (["--lr-anneal", "1.5"], "--lr-anneal"),
    (["--optim", "adam"], "with --optim adam add --margin none")])
def test_its_own_bad_flags_are_one_sentence_before_any_data_is_read(tmp_path, monkeypatch, flags, says):
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data was read before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *flags)
    assert e.value.code.startswith("error: ") and says in e.value.code and "\n" not in e.value.code


def test_resume_continues_step_count_optimizer_state_and_log(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    first = ckpt(out)
    vaegan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "5", "--epochs", "3", "--device", "cpu"])
    second = ckpt(out)
    assert second["step"] == 5 and (second["epoch"], second["batch"]) == (0, 5)  # still in epoch 1 of 128 batches
    for name in vaegan.NETS:  # each RMSprop's step counter continued instead of restarting at 0
        assert second["opt_" + name]["state"][0]["step"].item() == 5
    assert torch.equal(first["fixed_z"], second["fixed_z"])
    assert not torch.equal(first["encoder"]["fc_mu.weight"], second["encoder"]["fc_mu.weight"])
    r = rows(out)
    assert [int(x["step"]) for x in r if x["kl"]] == [1, 2, 3, 4, 5]
    assert [int(x["epoch"]) for x in r if x["test_kl"]] == [1, 1]  # each run ended in (part of) epoch 1
    # Flags not given again came from the checkpoint.
    assert (second["args"]["width"], second["args"]["img_size"], second["args"]["gamma"]) == (8, 16, 15)


def test_sample_and_load_model_from_the_checkpoint_alone(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    vaegan.main(["--resume", os.path.join(out, "ckpt.pt"), "--epochs", "0", "--sample", "5", "--device", "cpu"])
    files = sorted(os.listdir(os.path.join(out, "samples")))
    assert files == [f"{i:06d}.png" for i in range(5)]
    img = Image.open(os.path.join(out, "samples", files[0]))
    assert img.size == (16, 16) and img.mode == "L"
    m = vaegan.load_model(os.path.join(out, "ckpt.pt"))
    assert m.latent_dim == 12 and not m.training
    with torch.no_grad():
        mu, logvar = m.encode(torch.rand(3, 1, 16, 16) * 2 - 1)
        x = m.decode(mu)
    assert mu.shape == logvar.shape == (3, 12) and x.shape == (3, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    good = ckpt(out)
    monkeypatch.setattr(vaegan, "bce", lambda logits, t: F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, t)) * float("nan"))
    with pytest.raises(SystemExit, match="NaN"):
        vaegan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "4", "--epochs", "3", "--device", "cpu"])
    after = ckpt(out)
    assert after["step"] == good["step"] == 2
    assert torch.equal(after["decoder"]["net.0.weight"], good["decoder"]["net.0.weight"])


def test_bad_resume_paths_are_refused(trained, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        vaegan.main(["--resume", str(tmp_path / "missing.pt"), "--device", "cpu"])
    other = tmp_path / "other.pt"
    torch.save({"script": "vae_conv", "args": {}}, other)
    with pytest.raises(SystemExit, match="not written by vaegan.py"):
        vaegan.main(["--resume", str(other), "--device", "cpu"])
    with pytest.raises(ValueError, match="not written by vaegan.py"):
        vaegan.load_model(str(other))
    resume = ["--resume", os.path.join(trained, "ckpt.pt"), "--epochs", "0", "--sample", "1", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--width 8, which --width 16 does not fit"):
        vaegan.main(resume + ["--width", "16"])
    with pytest.raises(SystemExit, match="--optim rmsprop, which --optim adam does not fit"):
        vaegan.main(resume + ["--optim", "adam"])  # RMSprop's state is no Adam state


def test_the_entry_point_prints_the_counts_and_refuses_an_unknown_dataset(tmp_path, capsys):
    # (as a process: tests/test_entry_points.py)
    out = str(tmp_path / "cli")
    vaegan.main([*SMALL, "--max-steps", "2", "--out", out, "--sample", "3"])
    r = capsys.readouterr()
    # width 8 at 32px, latent 8: convs 8-16-32 to 32 x 4 x 4, dense 512 -> 256, heads 256 -> 8;
    # dense 8 -> 512, transposed convs 32-16-4, conv 3; convs 4-16-32-32, dense 512 -> 64 -> 1.
    enc = 25 * (3 * 8 + 8 * 16 + 16 * 32) + 2 * (8 + 16 + 32) + 512 * 256 + 2 * 256 + 2 * (256 * 8 + 8)
    dec = 8 * 512 + 2 * 512 + 25 * (32 * 32 + 32 * 16 + 16 * 4) + 2 * (32 + 16 + 4) + 25 * 4 * 3 + 3
    dis = 25 * 3 * 4 + 4 + 25 * (4 * 16 + 16 * 32 + 32 * 32) + 2 * (16 + 32 + 32) + 512 * 64 + 2 * 64 + 65
    assert (f"encoder: {enc:,} parameters   decoder: {dec:,} parameters   "
            f"discriminator: {dis:,} parameters") in r.out
    assert "held out: test_kl" in r.out
    assert len(os.listdir(os.path.join(out, "samples"))) == 3
    with pytest.raises(SystemExit) as e:
        vaegan.main(["--data", "no-such-set", "--out", out + "-2", "--device", "cpu"])
    assert e.value.code.startswith("error: ") and "no-such-set" in e.value.code


# ----------------------------------------------------------------------------- keeping the GAN in balance

def as_built(out, name):
    """The parameters one network had before the first step: main() seeds, then builds from args."""
    args = ckpt(out)["args"]
    torch.manual_seed(args["seed"])
    return dict(getattr(vaegan.build(args), name).named_parameters())


def unchanged(out, name):
    saved = ckpt(out)[name]
    return all(torch.equal(p, saved[k]) for k, p in as_built(out, name).items())


@pytest.mark.parametrize("real, fake, dec, dis", [
    (0.69, 0.69, 1, 1),   # both costs in [0.33, 1.03]: both update
    (0.10, 0.69, 1, 0),   # the discriminator is far ahead on real images (cost < 0.68 - 0.35): it waits
    (0.69, 0.20, 1, 0),   # ... or on the fakes
    (1.20, 0.69, 0, 1),   # its cost on real images is above 0.68 + 0.35: the decoder waits
    (0.69, 1.50, 0, 1),   # ... or on the fakes
    (0.10, 1.50, 1, 1),   # both rules at once: the authors then update both
])
def test_balance_is_the_authors_rule_on_hand_set_costs(real, fake, dec, dis):
    got = vaegan.balance(torch.tensor(real), torch.tensor(fake), margin=0.35, equilibrium=0.68)
    assert [g.item() for g in got] == [dec, dis] and all(g.dtype == torch.float32 for g in got)


@pytest.mark.parametrize("flags, frozen, moved", [
    # equilibrium 10: every cost (about ln 2) is below 10 - 0.35, so only the discriminator waits
    (["--equilibrium", "10"], "discriminator", "decoder"),
    # equilibrium 0.01, margin 0: every cost is above 0.01 and none below it, so only the decoder waits
    (["--equilibrium", "0.01", "--margin", "0"], "decoder", "discriminator"),
])
def test_a_skipped_update_leaves_the_weights_bit_identical(tmp_path, flags, frozen, moved):
    out = run(tmp_path, "--img-size", "16", "--max-steps", "3", *flags)
    assert unchanged(out, frozen)
    assert not unchanged(out, moved) and not unchanged(out, "encoder")  # the test has teeth
    r = [x for x in rows(out) if x["kl"]]
    flag = {"decoder": "dec_step", "discriminator": "dis_step"}
    assert [float(x[flag[frozen]]) for x in r] == [0, 0, 0] and [float(x[flag[moved]]) for x in r] == [1, 1, 1]


def test_logged_update_flags_follow_the_logged_costs_and_none_updates_always(tmp_path):
    out = run(tmp_path, "--img-size", "16", "--max-steps", "4", "--equilibrium", "0.9", "--margin", "0.15")
    r = [x for x in rows(out) if x["kl"]]
    for x in r:  # the rule written again here: skip Dis below 0.75, Dec above 1.05, both if both
        real, fake = float(x["dis_real"]), float(x["dis_fake"])
        dis, dec = min(real, fake) >= 0.75, max(real, fake) <= 1.05
        want = (1, 1) if not (dis or dec) else (int(dec), int(dis))
        assert (float(x["dec_step"]), float(x["dis_step"])) == want
    assert any(float(x["dis_step"]) == 0 for x in r)  # costs near ln 2 < 0.75: the discriminator waited
    out = run(tmp_path, "--img-size", "16", "--max-steps", "2", "--margin", "none", "--equilibrium", "10",
              "--real-weight", "none", name="none")
    for x in [x for x in rows(out) if x["kl"]]:  # every network updated; loss_dis the paper's sum
        assert float(x["dec_step"]) == float(x["dis_step"]) == 1
        assert float(x["loss_dis"]) == pytest.approx(float(x["dis_real"]) + 2 * float(x["dis_fake"]), rel=1e-4)
    assert not unchanged(out, "decoder") and not unchanged(out, "discriminator")


def test_log_columns_hold_the_costs_and_finite_gradient_norms(trained):
    for x in [x for x in rows(trained) if x["kl"]]:
        assert all(0 < float(x[k]) < math.inf for k in ("gnorm_enc", "gnorm_dec", "gnorm_dis"))
        # dis_real is the batch mean of -log D(x) >= -log of the mean D(x) (Jensen); the same for the fakes,
        # whose cost is the mean of -log(1 - D) over x~ and x_p.
        assert float(x["dis_real"]) >= -math.log(float(x["D(x)"])) - 1e-4
        fake = -(math.log(1 - float(x["D(x_tilde)"])) + math.log(1 - float(x["D(x_p)"]))) / 2
        assert float(x["dis_fake"]) >= fake - 1e-4
        # loss_dis = 2 (w dis_real + (1 - w) dis_fake), w = 1/2 by default
        assert float(x["loss_dis"]) == pytest.approx(float(x["dis_real"]) + float(x["dis_fake"]), rel=1e-4)


@pytest.mark.parametrize("separate, calls", [(True, [16, 16, 16]), (False, [48])])
def test_separate_dis_shows_the_discriminator_three_batches_instead_of_one(tmp_path, monkeypatch, separate, calls):
    sizes, forward = [], vaegan.Discriminator.forward

    def counting(self, x, layer=4):
        if x.device.type != "meta":  # not check_size's dry run
            sizes.append(x.shape[0])
        return forward(self, x, layer)
    monkeypatch.setattr(vaegan.Discriminator, "forward", counting)
    run(tmp_path, "--img-size", "16", "--max-steps", "1", "--separate-dis" if separate else "--no-separate-dis")
    # One step on a batch of 16: x, x~, x_p one at a time, or as one batch of 48; then the held-out
    # pass (eval mode, [x, x~] in batches of 2 x 256 of the 512 held-out images).
    assert sizes == calls + [512, 512]


def test_lr_anneal_after_a_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, image_folder):
    # A folder of 12 images in batches of 4: 3 steps per epoch, lr 1e-3 * 0.5^(epochs done).
    lrs, step = [], vaegan.train_step

    def spy(nets, opts, *a, **k):
        lrs.append([g["lr"] for opt in opts for g in opt.param_groups])
        return step(nets, opts, *a, **k)
    monkeypatch.setattr(vaegan, "train_step", spy)
    common = ["--data", str(image_folder), "--data-root", str(tmp_path), "--img-size", "16", "--batch-size", "4",
              "--lr", "1e-3", "--lr-anneal", "0.5", "--epochs", "3"]
    run(tmp_path, *common)
    whole, lrs[:] = list(lrs), []
    out = run(tmp_path, *common, "--max-steps", "4", name="halves")
    vaegan.main(["--resume", os.path.join(out, "ckpt.pt"), "--device", "cpu"])  # continues mid-epoch 2
    assert ckpt(out)["step"] == 9 and lrs == whole
    assert whole == [[1e-3 * 0.5 ** (i // 3)] * 3 for i in range(9)]


def test_checkpoint_records_the_balancing_flags_and_resume_keeps_them(tmp_path, monkeypatch):
    flags = ["--no-separate-dis", "--real-weight", "0.6", "--margin", "0.2", "--equilibrium", "0.5",
             "--lr-anneal", "0.9"]
    out = run(tmp_path, "--img-size", "16", "--max-steps", "1", *flags)
    want = {"separate_dis": False, "real_weight": 0.6, "margin": 0.2, "equilibrium": 0.5, "lr_anneal": 0.9}
    assert {k: ckpt(out)["args"][k] for k in want} == want
    seen, step = [], vaegan.train_step
    monkeypatch.setattr(vaegan, "train_step", lambda *a, **k: seen.append(k) or step(*a, **k))
    vaegan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "2", "--device", "cpu"])
    assert seen == [{"separate_dis": False, "real_weight": 0.6, "margin": 0.2, "equilibrium": 0.5}]
    assert {k: ckpt(out)["args"][k] for k in want} == want and ckpt(out)["step"] == 2


def test_a_checkpoint_from_before_the_balancing_flags_resumes_the_original_way(trained, tmp_path, capsys):
    """A run saved before --separate-dis/--real-weight/--margin/--lr-decay existed trained with one joint
    discriminator batch, the plain sum and no balancing: it must resume that way, and its old losses.csv
    rows (without the new columns) must keep each value under its own column."""
    out = copy_of(trained, tmp_path)
    state = ckpt(out)
    for k in ("separate_dis", "real_weight", "margin", "equilibrium", "lr_decay"):
        del state["args"][k]
    torch.save(state, os.path.join(out, "ckpt.pt"))
    new = {"dis_real", "dis_fake", "dec_step", "dis_step", "gnorm_enc", "gnorm_dec", "gnorm_dis"}
    before = [{k: v for k, v in r.items() if k not in new} for r in rows(out)]
    with open(os.path.join(out, "losses.csv"), "w") as f:  # the log as the old script wrote it
        f.write(",".join(c for c in COLUMNS if c not in new) + "\n")
        f.writelines(",".join(r[c] for c in COLUMNS if c not in new) + "\n" for r in before)
    capsys.readouterr()
    vaegan.main(["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "3", "--device", "cpu"])
    assert "separate_dis=False real_weight=None margin=None" in capsys.readouterr().out
    assert {k: ckpt(out)["args"][k] for k in ("separate_dis", "real_weight", "margin", "lr_anneal", "lr_decay")} == \
        {"separate_dis": False, "real_weight": None, "margin": None, "lr_anneal": 1.0, "lr_decay": "none"}
    after = rows(out)
    assert [{k: r[k] for k in before[0]} for r in after[:len(before)]] == before
    assert all(r[c] == "" for r in after[:len(before)] for c in new)
    assert [r["step"] for r in after[len(before):] if r["dis_real"] != ""] == ["3"]  # the resumed step has them
