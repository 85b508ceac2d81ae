"""--eval-every / --eval-n / --eval-ref / --weights in every model script, through main(): eval.csv
rows at the right steps, best.pt = the checkpoint of the lowest FID, resume continuing both, the
evaluation leaving training's random stream untouched, and every failure found before the first
step. CPU only, no network: the Inception weights are random (tests/test_metrics.py's fixtures,
with its small_network patch so that a pass takes seconds)."""
import csv
import importlib
import os

import pytest
import torch

import metrics
from test_metrics import small_network, weights_file  # noqa: F401  (pytest fixtures)
from test_reliability import SCRIPTS, STEPS_PER_EPOCH, args, fails

VAES = {"vae_conv", "mlp_vae", "vaegan"}  # their rows also score reconstructions (recon_ columns)
# What metrics.TrainingEval does, one code path for every script, on a GAN and on a VAE; the first test below
# checks each script's wiring.
SHARED = ["dcgan", "vaegan"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One DATA_ROOT for the module: the fake:test reference is computed once and cached there."""
    return tmp_path_factory.mktemp("data")


def evaluated(script, out, weights, data_root, *extra):
    importlib.import_module(script).main(args(script, out, "--eval-every", "1", "--eval-n", "12",
                                              "--weights", str(weights), "--data-root", str(data_root), *extra))


def rows(out):
    with open(os.path.join(out, "eval.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_epochs_write_eval_rows_and_the_best_checkpoint(script, tmp_path, weights_file, data_root,
                                                            small_network):
    evaluated(script, tmp_path, weights_file, data_root, "--epochs", "2")
    got = rows(tmp_path)
    assert [(int(r["step"]), int(r["epoch"]), int(r["n"])) for r in got] == \
        [(STEPS_PER_EPOCH, 1, 12), (2 * STEPS_PER_EPOCH, 2, 12)]
    for r in got:
        for col in ["fid", "kid", "kid_std", "is", "is_std", "precision", "recall", "lapvar"]:
            assert r[col] != "" and float(r[col]) == float(r[col])
            assert (r.get("recon_" + col, "") != "") == (script in VAES)
        assert 0 <= float(r["precision"]) <= 1 and float(r["is"]) >= 1
    best_row = min(got, key=lambda r: float(r["fid"]))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == int(best_row["step"]) and best["script"] == script
    last = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    if best["step"] == last["step"]:  # the same state, saved twice
        name = next(k for k, v in last.items() if isinstance(v, dict) and all(map(torch.is_tensor, v.values())))
        assert all(torch.equal(last[name][k], best[name][k]) for k in last[name])
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script", SHARED)
def test_resume_continues_eval_csv_and_the_best_so_far(script, tmp_path, weights_file, data_root, small_network):
    evaluated(script, tmp_path, weights_file, data_root, "--epochs", "1")
    first = rows(tmp_path)
    with open(tmp_path / "eval.csv", "a") as f:  # a row a killed run wrote after its last checkpoint
        f.write(f"{3 * STEPS_PER_EPOCH},3,12,-1\n")
    importlib.import_module(script).main(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "2", "--device", "cpu",
                                          "--weights", str(weights_file)])
    got = rows(tmp_path)
    assert got[0] == first[0] and [int(r["step"]) for r in got] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == int(min(got, key=lambda r: float(r["fid"]))["step"])


@pytest.mark.parametrize("script", SHARED)
def test_the_evaluation_does_not_change_training(script, tmp_path, weights_file, data_root, small_network):
    """Same seed with and without --eval-every: the same weights (the evaluation draws its z and
    picks its images with its own generator, and puts the networks back in train mode)."""
    evaluated(script, tmp_path / "eval", weights_file, data_root, "--epochs", "2")
    importlib.import_module(script).main(args(script, tmp_path / "plain", "--epochs", "2"))
    a = torch.load(tmp_path / "eval" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    nets = [k for k, v in a.items() if isinstance(v, dict) and v and all(map(torch.is_tensor, v.values()))]
    assert nets and all(torch.equal(a[n][k], b[n][k]) for n in nets for k in a[n])


@pytest.mark.parametrize("script", SCRIPTS)
def test_offline_without_weights_stops_before_the_first_step(script, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "run"
    msg = fails(script, args(script, out, "--epochs", "1", "--eval-every", "1", "--eval-n", "12",
                                    "--data-root", str(tmp_path)))
    assert "could not be downloaded" in msg and "--weights" in msg
    assert not (out / "ckpt.pt").exists() and not (out / "losses.csv").exists()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("extra, expected", [
    (["--eval-every", "-1"], "--eval-every cannot be negative"),
    (["--eval-every", "1", "--eval-n", "1"], "--eval-n must be at least 2"),
    (["--eval-every", "1", "--eval-ref", "missing.npz"], "--eval-ref: statistics file missing.npz does not exist"),
])
def test_bad_eval_flags_are_one_sentence(script, tmp_path, extra, expected):
    assert expected in fails(script, args(script, tmp_path, "--epochs", "1", *extra))


@pytest.mark.parametrize("script", sorted(VAES))
def test_more_reconstructions_than_held_out_images_is_one_sentence(script, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # found before the weights are looked for
    msg = fails(script, args(script, tmp_path, "--epochs", "1", "--eval-every", "1", "--eval-n", "513"))
    assert "--eval-n 513 asks for more reconstructions than the 512 held-out images of fake" in msg


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_without_eval_ref_is_one_sentence(script, tmp_path, make_images):
    make_images(tmp_path / "imgs", [f"{i}.png" for i in range(4)])
    argv = args(script, tmp_path / "out", "--epochs", "1", "--eval-every", "1")
    argv[argv.index("fake")] = str(tmp_path / "imgs")
    assert "has no test split; give --eval-every its reference with --eval-ref" in fails(script, argv)


def test_eval_ref_defaults_to_the_test_split(tmp_path, weights_file, data_root, small_network):
    evaluated("dcgan", tmp_path, weights_file, data_root, "--epochs", "1")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["args"]["eval_ref"] == "fake:test"
    assert any(p.name.startswith("fid_stats_fake-test") for p in (data_root / "cache").iterdir())
    assert metrics.FID_WEIGHTS_FILE in str(weights_file)


@pytest.mark.parametrize("script", SHARED)
def test_a_failed_evaluation_is_a_warning_and_training_goes_on(script, tmp_path, weights_file, data_root,
                                                               small_network, monkeypatch, capsys):
    def degenerate(*a, **k):
        raise metrics.MetricsError("the product of the covariances has no real square root")
    monkeypatch.setattr(metrics, "frechet_distance", degenerate)
    evaluated(script, tmp_path, weights_file, data_root, "--epochs", "2")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 2 and rows(tmp_path) == []
    assert capsys.readouterr().err.count("failed (the product of the covariances has no real square root); "
                                         "training goes on") == 2
    assert not (tmp_path / "best.pt").exists()


def test_eval_every_0_turns_a_resumed_runs_evaluation_off(tmp_path, weights_file, data_root, small_network,
                                                          monkeypatch, no_network):
    evaluated("dcgan", tmp_path, weights_file, data_root, "--epochs", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights here: an evaluation would fail
    importlib.import_module("dcgan").main(["--resume", str(tmp_path / "ckpt.pt"), "--epochs", "2", "--device", "cpu",
                                           "--eval-every", "0"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 2 and len(rows(tmp_path)) == 1
