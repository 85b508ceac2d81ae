"""The benchmarks run through their entry points, as processes, at tiny sizes: their figures are not
checked here (timings belong in the benchmarks themselves), only that each one still runs against
today's scripts and shared modules and reports every measurement it was asked for. (reproduce.py has
its own tests in test_reproduce.py; mnist_classifier.py trains a classifier for a minute and
check_metrics_vs_reference.py needs the reference packages, so neither is run here.)"""
import json
import pathlib
import subprocess
import sys

from test_metrics import weights_file  # noqa: F401  (pytest fixture: random weights in the real format)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def bench(name, *args, cwd=None):
    """python benchmarks/<name>.py ARGS as a process: (exit status, stdout, stderr)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=600, cwd=cwd or ROOT)
    return r.returncode, r.stdout, r.stderr


def test_train_speed_times_a_script_its_conventional_pipeline_and_the_fid_pass(tmp_path, weights_file):  # noqa: F811
    """Each pipeline trains through the script's own main(); the conventional one swaps data.Loader for
    ImageFolder + DataLoader, and must still fit what the scripts ask of a loader. They all ask alike
    (run.loader, run.batches and, in a VAE, loader.images): one GAN and one VAE stand for the five."""
    out = tmp_path / "speed.json"
    models = ["mlp_gan", "mlp_vae"]
    rc, stdout, stderr = bench("train_speed", "--models", ",".join(models), "--jpegs", 20, "--images", 64,
                               "--batch-size", 8, "--warmup", 1, "--steps", 1, "--workers", 0, "--fid-images", 4,
                               "--fid-batch", 2, "--fid-weights", weights_file, "--device", "cpu",
                               "--work", tmp_path / "work", "--json", out)
    results = json.loads(out.read_text())
    rows = {(r["model"], r["kind"]): r for r in results["results"]}
    assert set(rows) == {(m, kind) for m in models for kind in ("ours", "conventional")}
    for key, r in rows.items():
        assert "error" not in r, (key, r.get("error"))
        assert r["img_per_s"] > 0 and r["batch"] == 8 and r["img_size"] == 64
    assert rc == 0, stderr[-3000:]
    fid = results["fid"]
    assert "error" not in fid, fid.get("error")
    assert fid["images"] == 4 and fid["ours_img_per_s"] > 0 and fid["max_feature_diff"] < 1e-3
    assert all(m in stdout for m in models) and "error" not in stdout.split("{")[0]


def test_train_speed_exits_non_zero_when_a_measurement_fails(tmp_path):
    """A pipeline that fails (here: a batch larger than the images) is named in one sentence and the exit status
    is 1, after the table and the JSON are printed: a broken benchmark must not pass for a finished one."""
    rc, stdout, stderr = bench("train_speed", "--models", "mlp_gan", "--jpegs", 20, "--images", 600, "--warmup", 1,
                               "--steps", 2, "--batch-size", 1000, "--fid-images", 0, "--no-conventional",
                               "--device", "cpu", "--work", tmp_path / "work")
    assert rc == 1
    assert json.loads(stdout[stdout.index("{"):])["results"][0]["kind"] == "ours"     # printed first
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 measurements failed (mlp_gan ours)") and "logs" in last, last


def test_data_speed_builds_reloads_and_serves_batches(tmp_path):
    rc, stdout, stderr = bench("data_speed", "--data-root", tmp_path / "no-mnist", "--work", tmp_path / "work",
                               "--jpegs", 200, "--batches", 3, "--batch-size", 16, "--workers", 1, "--device", "cpu")
    assert rc == 0, stderr[-3000:]
    assert "no MNIST" in stdout
    for row in ("200 JPEGs 178x218 -> 64x64", "data.Loader, cpu", "data.Loader flip=True, cpu", "ImageFolder"):
        assert row in stdout, stdout


def test_eval_cost_times_an_evaluation_and_its_parts(tmp_path):
    rc, stdout, stderr = bench("eval_cost", "--n", 4, "--ref-n", 8, "--kid-pr-n", 16, "--img-size", 16,
                               "--batch-size", 4, "--device", "cpu")
    assert rc == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    for key in ("evaluation_s", "fid_s", "kid_s", "pr_s", "rest_s"):
        assert result[key] >= 0, key
    assert result["n"] == 4 and result["ref_n"] == 8


def test_amp_compile_curves_compares_an_option_with_the_seeds(tmp_path, DATA_ROOT):
    root = tmp_path / "root"        # its own MNIST cache (the session's mnist_root counts its own decodes)
    (root / "MNIST").mkdir(parents=True)
    (root / "MNIST" / "raw").symlink_to(DATA_ROOT / "MNIST" / "raw")
    rc, stdout, stderr = bench("amp_compile_curves", "--data-root", root, "--models", "mlp_gan",
                               "--options", "amp", "--steps", 4, "--seeds", 2, "--log-every", 2,
                               "--out", tmp_path / "curves")
    assert rc == 0, stderr[-3000:]
    assert "| mlp_gan | loss_d |" in stdout and "| mlp_gan | loss_g |" in stdout, stdout
