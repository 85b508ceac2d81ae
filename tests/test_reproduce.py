"""Tests of benchmarks/reproduce.py through its main(): --dry-run prints each report's
commands at the report's own settings (checked against ../shared/REPORTS.md's facts); a --quick
run on a generated folder of images (no held-out split, so no held-out evaluation: the quickest
data) trains, samples, scores with metrics.py (random Inception weights in the real file's
format) and writes REPORT.md with the published numbers beside ours; a second run skips the
finished runs, resumes the one whose samples are missing and reuses the other scores."""
import os
import pathlib
import re
import shlex
import sys

import pytest
import torch

import data
import metrics
from test_metrics import weights_file  # noqa: F401  (pytest fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reproduce  # noqa: E402


@pytest.fixture
def run(monkeypatch, capsys):
    """reproduce.main(args) from the repository root: (exit message or None, what it printed)."""
    monkeypatch.chdir(ROOT)

    def run(*args):
        try:
            reproduce.main(list(args))
            code = None
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().out
    return run


def commands(stdout):
    """[(script, {flag: value or True})] of the printed command lines, in order."""
    found = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        if words[:1] != ["python"]:
            continue
        flags = {}
        for i, w in enumerate(words):
            if w.startswith("--"):
                nxt = words[i + 1] if i + 1 < len(words) else None
                flags[w] = nxt if nxt is not None and not nxt.startswith("--") else True
        found.append((words[1], flags))
    return found


# The reports' settings (../shared/REPORTS.md), per script in the order reproduce.py prints them.
SETTINGS = {
    "cifar10": [("vae_conv.py", {"--arch": "cifar10-report", "--recon": "bce", "--epochs": "100",
                                 "--sample": "10000", "--data": "cifar10"}),
                ("dcgan.py", {"--arch": "cifar10-report", "--flip": True, "--lr-decay": "linear", "--epochs": "128",
                              "--sample": "10000"}),
                ("latent_edit.py", {"--ckpt": "runs/reproduce-cifar10/vae_conv/ckpt.pt", "--recon": True,
                                    "--n": "10000", "--out-dir": "runs/reproduce-cifar10/vae_conv"}),
                ("metrics.py", {"--ref": "cifar10:test", "--n": "10000", "--json": True})],
    "celeba-vae-gan-vaegan": [("dcgan.py", {"--epochs": "500", "--data": "celeba"}),
                              ("vaegan.py", {"--epochs": "200", "--gamma": "15"}),
                              ("vaegan.py", {"--epochs": "200", "--gamma": "1.5"}),
                              ("vae_conv.py", {"--epochs": "20", "--latent-dim": "128", "--recon": "mse"}),
                              ("latent_edit.py", {"--ckpt": "runs/reproduce-celeba-vae-gan-vaegan/vae_conv/ckpt.pt"}),
                              ("metrics.py", {"--n": "10000"})],
    "celeba-dcgan-vae": [("dcgan.py", {"--epochs": "60", "--batch-size": "128", "--latent-dim": "100"}),
                         ("vae_conv.py", {"--epochs": "50", "--batch-size": "256", "--recon": "mse"}),
                         ("latent_edit.py", {"--attr": "Smiling", "--intensity": "2.5"}),
                         ("latent_edit.py", {"--attr": "Eyeglasses", "--intensity": "2.5"}),
                         ("latent_edit.py", {"--attr": "Smiling"}),
                         ("metrics.py", {"--ref": "celeba:test"})],
    "celeba-gans": [("dcgan.py", {"--arch": "celeba-gans-report", "--epochs": "50", "--batch-size": "256",
                                  "--lr": "0.0002"}),
                    ("mlp_gan.py", {"--epochs": "50", "--batch-size": "256", "--lr": "0.0002"}),
                    ("latent_edit.py", {"--ckpt": "runs/reproduce-celeba-gans/dcgan/ckpt.pt", "--d-filter": "0.5",
                                        "--grid": "4"}),
                    ("metrics.py", {"--ref": "celeba:test"})],
    "mnist": [("dcgan.py", {"--arch": "mnist-report", "--epochs": "10", "--data": "mnist"}),
              ("vaegan.py", {}), ("vae_conv.py", {}), ("mlp_gan.py", {}),
              ("mlp_vae.py", {"--epochs": "5"}),
              ("metrics.py", {"--ref": "mnist:test"})],
}


@pytest.mark.parametrize("report", list(SETTINGS))
def test_dry_run_prints_the_reports_settings(report, run):
    code, stdout = run(report, "--dry-run")
    assert code is None
    found = commands(stdout)
    assert [script for script, _ in found] == [script for script, _ in SETTINGS[report]]
    for (script, flags), (_, want) in zip(found, SETTINGS[report]):
        for flag, value in want.items():
            assert flags.get(flag) == value, f"{report}: {script} {flag} is {flags.get(flag)}, not {value}"
    if report == "celeba-vae-gan-vaegan":  # the report's table has no FID: no reference set
        assert "--ref" not in found[-1][1]


def test_dry_run_quick_and_epoch_overrides(run):
    code, stdout = run("mnist", "--dry-run", "--quick", "--data", "fake", "--epochs", "dcgan=3,mlp_vae=20")
    assert code is None
    found = dict(commands(stdout)[:5])  # the five trainings, one per script
    assert found["dcgan.py"]["--epochs"] == "3" and found["mlp_vae.py"]["--epochs"] == "20"
    assert found["mlp_gan.py"]["--epochs"] == "20"  # not overridden: mnist's own
    for flags in found.values():
        assert flags["--data"] == "fake" and flags["--max-steps"] == "2" and flags["--batch-size"] == "16"
        assert flags["--sample"] == "5"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "gan=3"], "--epochs gan=3: give name=N"),
    (["--epochs", "dcgan=0"], "--epochs dcgan=0: give name=N"),
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--data", "no-such-folder"], "neither a dataset"),
    (["--weights", "w.pth", "--lapvar-only"], "drop --weights or --lapvar-only"),
    (["--weights", "no-such-file.pth"], "does not exist"),
])
def test_bad_flags_end_in_one_sentence(flags, message, tmp_path, run):
    code, _ = run("mnist", "--out", str(tmp_path / "out"), *flags)
    assert code.startswith("error: ") and message in code and "\n" not in code, code
    assert not (tmp_path / "out").exists()


def published_and_ours(report_md):
    """{(model, measure): (published, ours)} of REPORT.md's first table."""
    section = report_md.split("## Published and ours")[1].split("## Runs")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    assert rows[0] == ["model", "measure", "published", "ours"]
    return {(m, k): (p, o) for m, k, p, o in rows[2:]}


def test_quick_run_scores_tables_and_resumes(tmp_path, weights_file, run, make_images):  # noqa: F811
    folder, out = tmp_path / "images", tmp_path / "repro"
    make_images(folder, [f"{i:02d}.png" for i in range(64)], size=(32, 32))  # 4 batches of 16 per epoch
    args = ["celeba-vae-gan-vaegan", "--quick", "--data", str(folder), "--weights", str(weights_file),
            "--out", str(out), "--data-root", str(tmp_path / "data"), "--device", "cpu", "--parallel", "2"]
    code, stdout = run(*args)
    assert code is None, stdout[-3000:]
    runs = ["vae_conv", "dcgan", "vaegan", "vaegan-gamma1.5"]
    table = published_and_ours((out / "REPORT.md").read_text())
    # The published column holds the report's numbers exactly as printed (../shared/REPORTS.md).
    for (model, measure), value in {("VAE", "Inception Score"): "1.704", ("GAN", "Laplacian variance"): "2506.18",
                                    ("VAE-GAN (gamma 15)", "Inception Score"): "1.231",
                                    ("Real", "Inception Score"): "4.239", ("Real", "Laplacian variance"): "1073.71",
                                    ("GAN", "epochs to the best result"): "300"}.items():
        assert table[(model, measure)][0] == value
    assert table[("VAE-GAN (gamma 1.5)", "Inception Score")][0] == "not published"
    for name, model in zip(runs, ["VAE", "GAN", "VAE-GAN (gamma 15)", "VAE-GAN (gamma 1.5)"]):
        assert table[(model, "epochs")][1] == "0 + 2 batches"  # --quick: 2 optimizer steps
        # 5 samples, 5 splits of one image: p(y) = p(y|x) in each, so every KL is 0 and IS = exp(0) = 1.
        assert table[(model, "Inception Score")][1] == "1.00 ± 0.00"
        # Ours is the Laplacian variance of the images the run wrote.
        images = [data.read_image(p) for p in data.list_images(out / name / "samples")]
        lap = metrics.laplacian_variance(images)
        assert len(images) == 5 and table[(model, "Laplacian variance")][1] == f"{lap.mean():.1f} ± {lap.std():.1f}"
        assert re.fullmatch(r"\d+\.\d min", table[(model, "training time")][1])
    real = [data.read_image(p) for p in data.list_images(folder)[:5]]  # 'Real': the folder itself
    lap = metrics.laplacian_variance(real)
    assert table[("Real", "Laplacian variance")][1] == f"{lap.mean():.1f} ± {lap.std():.1f}"
    assert table[("Real", "Inception Score")][1] == "1.00 ± 0.00"
    report = (out / "REPORT.md").read_text()
    for name in re.findall(r"!\[\]\((figures/[^)]+)\)", report):
        assert (out / name).is_file(), name
    assert "figures/vae_conv_scatter.png" in report and "figures/dcgan_losses.png" in report

    # Again, with the VAE's samples gone: three runs are skipped, the VAE only samples again from its
    # checkpoint, and only its samples are scored again.
    mtimes = {name: os.path.getmtime(out / name / "ckpt.pt") for name in runs}
    for p in (out / "vae_conv" / "samples").iterdir():
        p.unlink()
    code, stdout = run(*args)
    assert code is None, stdout[-3000:]
    assert stdout.count("finished, skipped") == 3 and "vae_conv: finished" not in stdout
    assert {name: os.path.getmtime(out / name / "ckpt.pt") for name in runs} == mtimes
    ran = commands("\n".join(line[2:] for line in stdout.splitlines() if line.startswith("$ ")))
    assert [script for script, _ in ran] == ["vae_conv.py", "metrics.py"]  # no scatter: the VAE did not train
    resumed = [flags for script, flags in ran if script == "vae_conv.py"]
    assert resumed[0]["--resume"].endswith("vae_conv/ckpt.pt") and resumed[0]["--epochs"] == "0"
    scored = [flags for script, flags in ran if script == "metrics.py"]
    assert len(scored) == 1 and "dcgan/samples" not in stdout and len(os.listdir(out / "vae_conv" / "samples")) == 5
    again = published_and_ours((out / "REPORT.md").read_text())
    assert {k: v for k, v in again.items() if k != ("VAE", "training time")} == \
        {k: v for k, v in table.items() if k != ("VAE", "training time")}  # its sampling time adds to it
    assert torch.load(out / "vae_conv" / "ckpt.pt", weights_only=True)["step"] == 2
