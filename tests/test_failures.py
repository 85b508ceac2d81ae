"""The failure sweep of the reliability issue, case by case, through the real entry points (main(argv),
or the command line as a process where a signal, a kill or a full disk is the case): a typed flag is
honoured or refused, no run is rewound or overwritten, no reference is mixed, nothing hangs or leaks,
and every refusal is one sentence. Also the drift between the scripts' copies that the restructuring
removed (mlp_vae's held-out loss, --lr-decay, a dead --sync-bn). CPU only, no network."""
import contextlib
import csv
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import latent_edit
import metrics
from test_metrics import small_network, weights_file  # noqa: F401  (pytest fixtures)
from test_reliability import SCRIPTS, STEPS_PER_EPOCH, args, ckpt, fails, logged_steps, run

REPO = pathlib.Path(__file__).resolve().parents[1]
LR = {"dcgan": 2e-4, "mlp_gan": 2e-4, "vae_conv": 1e-3, "mlp_vae": 1e-3, "vaegan": 3e-4}  # each script's default


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One DATA_ROOT for the module: the fake:test reference features are computed once, cached there."""
    return tmp_path_factory.mktemp("data")


def eval_flags(weights, data_root):
    return ["--eval-every", "1", "--eval-n", "12", "--weights", str(weights), "--data-root", str(data_root)]


def eval_rows(out):
    with open(os.path.join(out, "eval.csv"), newline="") as f:
        return list(csv.DictReader(f))


def many_images(folder, n, size=8):
    """n tiny PNGs (uint8 noise), written fast: a folder whose cache build uses the worker processes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


# ---------------------------------------------------------------- 1, 2: a typed flag is honoured or refused

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_typed_on_resume_wins_even_when_it_is_the_scripts_default(tmp_path, script):
    out = tmp_path / "run"
    run(script, out, "--max-steps", "2", "--lr", str(LR[script] * 5))
    run(script, out, "--resume", str(out / "ckpt.pt"), "--max-steps", "3", "--lr", str(LR[script]))
    c = ckpt(out)
    assert c["args"]["lr"] == LR[script]
    assert all(opt["param_groups"][0]["lr"] == LR[script] for k, opt in c.items() if k.startswith("opt"))


def test_widths_a_report_network_cannot_honour_are_refused(tmp_path):
    out = str(tmp_path / "run")
    common = ["--data", "fake", "--out", out, "--device", "cpu", "--max-steps", "1"]
    assert "--ngf and --ndf change only --arch paper" in fails("dcgan", common + ["--arch", "cifar10-report",
                                                                                "--ngf", "64"])
    assert "--width changes only --arch paper" in fails("vae_conv", common + ["--arch", "cifar10-report",
                                                                             "--width", "128"])
    assert "--width changes only --arch paper" in fails("vae_conv", common + ["--arch", "cifar10-report",
                                                                             "--width", "256"])
    importlib.import_module("dcgan").main(["--data", "fake", "--arch", "mnist-report", "--batch-size", "16",
                                           "--max-steps", "1", "--out", str(tmp_path / "report"), "--device", "cpu"])
    msg = fails("dcgan", ["--resume", str(tmp_path / "report" / "ckpt.pt"), "--arch", "paper", "--device", "cpu"])
    assert "trained with --arch mnist-report, which --arch paper does not fit" in msg


# ---------------------------------------------------------------- 3, 10: no run is rewound or overwritten

@pytest.mark.parametrize("script", ["dcgan", "mlp_vae"])
def test_resuming_an_earlier_checkpoint_never_rewinds_the_run_it_came_from(tmp_path, capsys, script):
    out = tmp_path / "run"
    run(script, out, "--max-steps", "2", "--epochs", "2")
    shutil.copy(out / "ckpt.pt", out / "best.pt")              # a checkpoint of step 2 beside the run
    run(script, out, "--resume", str(out / "ckpt.pt"), "--max-steps", "4")
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "losses.csv")}
    msg = fails(script, ["--resume", str(out / "best.pt"), "--out", str(out), "--device", "cpu"])
    assert "holds a run already" in msg and "would rewind it" in msg and "--out" in msg
    capsys.readouterr()
    importlib.import_module(script).main(["--resume", str(out / "best.pt"), "--max-steps", "3", "--device", "cpu"])
    branch = tmp_path / "run-2"
    assert f"this run writes to {branch}" in capsys.readouterr().out
    assert {f: (out / f).read_bytes() for f in before} == before  # the run it came from is as it was
    assert ckpt(branch)["step"] == 3 and logged_steps(branch) == [1, 2, 3]


def test_running_a_command_again_never_destroys_the_run_it_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "fake", "--ngf", "8", "--ndf", "8", "--img-size", "16", "--batch-size", "256",
            "--log-every", "1", "--device", "cpu", "--max-steps", "2"]
    dcgan = importlib.import_module("dcgan")
    dcgan.main(argv)
    first = (tmp_path / "runs/dcgan-fake/ckpt.pt").read_bytes(), (tmp_path / "runs/dcgan-fake/losses.csv").read_text()
    capsys.readouterr()
    dcgan.main(argv + ["--max-steps", "1"])                   # the same command again: the next free folder
    assert "this run writes to runs/dcgan-fake-2" in capsys.readouterr().out
    assert ((tmp_path / "runs/dcgan-fake/ckpt.pt").read_bytes(), (tmp_path / "runs/dcgan-fake/losses.csv").read_text()) \
        == first
    assert ckpt(tmp_path / "runs/dcgan-fake-2")["step"] == 1
    msg = fails("dcgan", argv + ["--out", "runs/dcgan-fake"])  # typed: refused, naming --resume and --out
    assert "--out runs/dcgan-fake holds a run already" in msg and "--resume runs/dcgan-fake/ckpt.pt" in msg
    assert (tmp_path / "runs/dcgan-fake/ckpt.pt").read_bytes() == first[0]


# ---------------------------------------------------------------- 4, 5, 9, 14, 15: the evaluation series

def test_resuming_with_another_reference_or_size_is_refused(tmp_path, weights_file, data_root, small_network):
    out = tmp_path / "run"
    run("dcgan", out, "--epochs", "1", *eval_flags(weights_file, data_root))
    resume = ["--resume", str(out / "ckpt.pt"), "--epochs", "2", "--device", "cpu", "--weights", str(weights_file)]
    assert "--eval-n 10 is not the 12 that" in fails("dcgan", resume + ["--eval-n", "10"])
    msg = fails("dcgan", resume + ["--eval-ref", "fake"])
    assert "--eval-ref fake is not the fake:test that" in msg and "fresh --out" in msg
    assert [r["step"] for r in eval_rows(out)] == [str(STEPS_PER_EPOCH)]


class Killed(BaseException):
    """kill -9, in-process: nothing after it runs, not even an except Exception."""


def test_an_evaluation_a_kill_lost_is_redone_on_resume(tmp_path, weights_file, data_root, small_network,
                                                       monkeypatch):
    out = tmp_path / "run"
    features, calls = metrics.TrainingEval.features, []

    def dies_in_the_second_evaluation(self, name, make):
        calls.append(name)
        if len(calls) == 2:
            raise Killed
        return features(self, name, make)
    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(metrics.TrainingEval, "features", dies_in_the_second_evaluation)
        run("dcgan", out, "--epochs", "3", *eval_flags(weights_file, data_root))
    assert ckpt(out)["step"] == 2 * STEPS_PER_EPOCH and [r["step"] for r in eval_rows(out)] == ["8"]
    importlib.import_module("dcgan").main(["--resume", str(out / "ckpt.pt"), "--device", "cpu",
                                           "--weights", str(weights_file)])
    rows = eval_rows(out)
    assert [int(r["step"]) for r in rows] == [8, 16, 24]       # the lost one redone before training went on
    best = min(rows, key=lambda r: float(r["fid"]))
    assert torch.load(out / "best.pt", weights_only=True)["step"] == int(best["step"])


def test_a_kill_while_best_pt_is_written_leaves_no_row_without_it(tmp_path, weights_file, data_root,
                                                                  small_network, monkeypatch):
    out = tmp_path / "run"
    save = data.save_checkpoint

    def dies_writing_best(path, state):
        if path.endswith("best.pt"):
            raise Killed
        save(path, state)
    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(data, "save_checkpoint", dies_writing_best)
        run("dcgan", out, "--epochs", "2", *eval_flags(weights_file, data_root))
    assert not (out / "best.pt").exists() and eval_rows(out) == []  # no row claims a best.pt that is not there
    importlib.import_module("dcgan").main(["--resume", str(out / "ckpt.pt"), "--device", "cpu",
                                           "--weights", str(weights_file)])
    rows = eval_rows(out)
    best = min(rows, key=lambda r: float(r["fid"]))
    assert [int(r["step"]) for r in rows] == [8, 16]
    assert torch.load(out / "best.pt", weights_only=True)["step"] == int(best["step"])


@pytest.mark.parametrize("kind", ["16-d statistics", "16 x 100 features", "damaged npz", "NaN statistics"])
def test_a_reference_of_the_wrong_size_is_refused_before_any_step_or_feature_pass(tmp_path, weights_file, kind,
                                                                                  monkeypatch, capsys):
    path = tmp_path / ("ref.npy" if "features" in kind else "ref.npz")
    if kind == "16-d statistics":
        np.savez(path, mu=np.zeros(16), sigma=np.eye(16))
    elif kind == "16 x 100 features":
        np.save(path, np.zeros((16, 100), np.float32))
    elif kind == "NaN statistics":
        np.savez(path, mu=np.full(2048, np.nan), sigma=np.eye(2048))
    else:
        np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
        path.write_bytes(path.read_bytes()[:5000])
    monkeypatch.setattr(metrics, "compute_features", lambda *a, **k: pytest.fail("a feature pass ran"))
    out = tmp_path / "run"
    msg = fails("dcgan", args("dcgan", out, "--epochs", "1", "--eval-every", "1", "--eval-ref", str(path),
                              "--weights", str(weights_file)))
    assert str(path) in msg and not (out / "ckpt.pt").exists() and not (out / "losses.csv").exists()
    samples = tmp_path / "samples"
    many_images(samples, 3)
    with pytest.raises(SystemExit) as e:
        metrics.main([str(samples), "--ref", str(path), "--weights", str(weights_file), "--device", "cpu"])
    assert str(path) in e.value.code
    run("dcgan", tmp_path / "gan", "--max-steps", "1")
    with pytest.raises(SystemExit) as e:
        latent_edit.main(["sample", "--ckpt", str(tmp_path / "gan" / "ckpt.pt"), "--n", "4", "--json", "--ref",
                          str(path), "--weights", str(weights_file), "--device", "cpu"])
    assert str(path) in e.value.code


def test_a_full_disk_while_writing_best_pt_says_that_ckpt_pt_was_saved(tmp_path, weights_file, data_root,
                                                                       small_network):
    out = tmp_path / "run"
    out.mkdir()
    os.symlink("/dev/full", out / "best.pt.tmp")
    msg = fails("dcgan", args("dcgan", out, "--epochs", "1", *eval_flags(weights_file, data_root)))
    assert "could not write" in msg and "best.pt" in msg and "no checkpoint was saved" not in msg
    assert f"ckpt.pt holds step {STEPS_PER_EPOCH}" in msg and ckpt(out)["step"] == STEPS_PER_EPOCH


def test_an_empty_eval_ref_is_named_as_such(tmp_path):
    msg = fails("dcgan", args("dcgan", tmp_path / "run", "--epochs", "1", "--eval-every", "1", "--eval-ref", ""))
    assert msg.startswith("error: --eval-ref: ") and "is not an image folder" in msg and "test split" not in msg


# ---------------------------------------------------------------- 6, 7, 8: undefined numbers, times, temperature

def test_metrics_json_prints_null_for_an_undefined_inception_score(tmp_path, weights_file, monkeypatch, capsys):
    many_images(tmp_path / "a", 2)
    forward = metrics.InceptionFID.forward

    def peaked(self, x):  # one class takes all: the other probabilities underflow to 0, and IS is 0 * log 0
        pool3, logits = forward(self, x)
        return pool3, torch.where(torch.arange(logits.shape[1]) == 0, 1e4, -1e4).expand_as(logits).float()
    monkeypatch.setattr(metrics.InceptionFID, "forward", peaked)
    monkeypatch.setattr(metrics, "resize_299", lambda x: torch.nn.functional.interpolate(x, size=(75, 75)))
    metrics.main([str(tmp_path / "a"), "--json", "--weights", str(weights_file), "--device", "cpu"])
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert out[str(tmp_path / "a")]["is_mean"] is None and out[str(tmp_path / "a")]["n"] == 2


def test_an_interrupted_reproduction_keeps_the_wall_time_of_its_stage(tmp_path):
    folder = many_images(tmp_path / "imgs", 64, size=16)
    out = tmp_path / "rep"
    proc = subprocess.Popen([sys.executable, "benchmarks/reproduce.py", "mnist", "--data", str(folder), "--quick",
                             "--lapvar-only", "--out", str(out), "--data-root", str(tmp_path / "root"),
                             "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:                                # the first training has started
            lines.append(line)
            if line.startswith("$ "):
                break
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)                     # Ctrl-C at a terminal: the whole group
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    state = json.loads((out / "REPORT.json").read_text())
    assert state["wall_s"].get("dcgan", 0) > 2, (lines, state)


def test_a_temperature_with_only_reconstructions_is_honoured(tmp_path):
    run("vae_conv", tmp_path / "vae", "--max-steps", "1")
    latent_edit.main(["sample", "--ckpt", str(tmp_path / "vae" / "ckpt.pt"), "--recon", "--temperature", "0.8",
                      "--n", "3", "--out-dir", str(tmp_path / "s"), "--out", str(tmp_path / "s.png"),
                      "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "s")) == ["normal_t0.8", "recon"]
    assert all(len(os.listdir(tmp_path / "s" / f)) == 3 for f in ("normal_t0.8", "recon"))


# ---------------------------------------------------------------- 11, 12, 13, 18, 19: hangs, leftovers, portability

def test_a_tiny_truncation_threshold_ends(tmp_path):
    run("dcgan", tmp_path / "gan", "--max-steps", "1")
    r = subprocess.run([sys.executable, "latent_edit.py", "sample", "--ckpt", str(tmp_path / "gan" / "ckpt.pt"),
                        "--truncation", "1e-9,1", "--n", "64", "--out", str(tmp_path / "t.png"), "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    base = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    z = latent_edit.truncated_normal(base, 1e-9, 1)
    assert z.abs().max() <= 1e-9 and torch.isfinite(z).all()
    # Where the redraws end by themselves (T = 1), the documented stream is unchanged.
    g, want = torch.Generator().manual_seed(1), base.clone()
    while (outside := want.abs() > 1).any():
        want = torch.where(outside, torch.randn(want.shape, generator=g), want)
    assert torch.equal(latent_edit.truncated_normal(base, 1.0, 1), want)


SLOW_DECODE = """
import runpy, sys, time
sys.path.insert(0, {repo!r})
import data
real = data._decode_chunk
def _decode_chunk(job):  # slow enough to be caught while the workers decode
    time.sleep({sleep})
    return real(job)
_decode_chunk.__module__, _decode_chunk.__qualname__ = "data", "_decode_chunk"
data._decode_chunk = _decode_chunk
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def start_cache_build(tmp_path, sleep=1.0):
    """`python mlp_gan.py --data FOLDER` in its own session, its decoding slowed; -> (process, cache folder),
    once its two decoding workers run."""
    folder = many_images(tmp_path / "imgs", 1100)
    root = tmp_path / "root"
    argv = ["mlp_gan.py", "--data", str(folder), "--data-root", str(root), "--img-size", "8", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--max-steps", "1"]
    code = SLOW_DECODE.format(repo=str(REPO), sleep=sleep, argv=argv, script=str(REPO / "mlp_gan.py"))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(children(proc.pid)) < 2:
        time.sleep(0.1)
    assert len(children(proc.pid)) >= 2, proc.communicate()
    time.sleep(0.5)
    return proc, root / "cache"


def children(pid):
    try:
        return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_kill_9_during_the_cache_build_ends_the_workers_and_a_later_run_removes_its_temporary_files(tmp_path):
    proc, cache = start_cache_build(tmp_path)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=20)  # workers that live on hold its pipes open: this would never return
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session
    assert not any(alive(w) for w in workers), "decoding workers outlived their parent"
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]  # what the kill left
    importlib.import_module("mlp_gan").main(["--data", str(tmp_path / "imgs"), "--data-root", str(tmp_path / "root"),
                                             "--img-size", "8", "--device", "cpu", "--max-steps", "1",
                                             "--out", str(tmp_path / "again")])
    assert sorted(p.suffix for p in cache.iterdir()) == [".npy", ".npz"]


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_ctrl_c_at_a_terminal_during_the_cache_build_is_one_sentence_and_ends(tmp_path):
    proc, cache = start_cache_build(tmp_path)
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)                         # as a terminal sends it: parent and workers
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: stopped by Ctrl-C while reading") and "Traceback" not in err
    assert not any(alive(w) for w in workers) and list(cache.iterdir()) == []


def test_ctrl_c_during_the_reference_pass_is_one_sentence(tmp_path, weights_file, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(metrics, "compute_features", interrupted)
    try:
        with pytest.raises(SystemExit) as e:
            run("dcgan", tmp_path / "run", "--epochs", "1", "--eval-every", "1", "--eval-n", "12", "--weights",
                str(weights_file), "--data-root", str(tmp_path))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the reference's feature pass ended in a KeyboardInterrupt traceback")
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: stopped by Ctrl-C while computing the features of the reference fake:test")


UNSHARE = shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not UNSHARE, reason="needs `unshare -rm` to mount a small tmpfs in a private namespace")
def test_a_disk_that_fills_during_the_cache_build_is_one_sentence_and_leaves_nothing(tmp_path):
    folder = many_images(tmp_path / "imgs", 300, size=16)   # a cache of 300 x 3 x 64 x 64 bytes: 3.7 MB
    root = tmp_path / "root"
    root.mkdir()
    code = ("import runpy, sys, types; sys.path.insert(0, %r); import data; "
            "data.shutil.disk_usage = lambda p: types.SimpleNamespace(total=10**12, free=10**12); "  # another writer
            "sys.argv = %r; runpy.run_path(%r, run_name='__main__')") % (
        str(REPO), ["mlp_gan.py", "--data", str(folder), "--data-root", str(root), "--img-size", "64", "--device",
                    "cpu", "--max-steps", "1", "--out", str(tmp_path / "run")], str(REPO / "mlp_gan.py"))
    shell = (f"mount -t tmpfs -o size=3m tmpfs {root} && {sys.executable} -c \"$CODE\"; rc=$?; "
             f"echo left: $(ls -A {root}/cache); exit $rc")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", shell], env={**os.environ, "CODE": code}, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write the image cache in")
    assert "No space left on device" in r.stderr and r.stdout.strip().endswith("left:")


def test_the_cache_builds_where_the_system_has_no_sched_getaffinity(tmp_path, monkeypatch, image_folder):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)   # macOS, Windows
    monkeypatch.setattr(data, "DECODE_CHUNK", 2)                   # 12 images: 6 chunks, worker processes
    importlib.import_module("mlp_gan").main(["--data", str(image_folder), "--data-root", str(tmp_path),
                                             "--img-size", "8", "--batch-size", "4", "--device", "cpu",
                                             "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert ckpt(tmp_path / "run")["step"] == 1


# ---------------------------------------------------------------- 16, 17: full disk at a grid, a damaged checkpoint

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_while_writing_a_grid_is_one_sentence_and_leaves_no_empty_png(tmp_path, script):
    out = tmp_path / "run"
    out.mkdir()
    os.symlink("/dev/full", out / "grid_epoch_001.png.tmp")
    msg = fails(script, args(script, out, "--max-steps", "2"))
    assert "grid_epoch_001.png" in msg and "ckpt.pt holds step 2" in msg
    assert not (out / "grid_epoch_001.png").exists() and not os.path.lexists(out / "grid_epoch_001.png.tmp")
    assert ckpt(out)["step"] == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_whose_flags_are_damaged_is_one_sentence(tmp_path, script):
    out = tmp_path / "run"
    run(script, out, "--max-steps", "1")
    c = ckpt(out)
    c["args"] = "not the flags"
    torch.save(c, out / "damaged.pt")
    msg = fails(script, ["--resume", str(out / "damaged.pt"), "--device", "cpu"])
    assert "damaged" in msg and "'args'" in msg


# ---------------------------------------------------------------- the drift between the scripts' copies

def test_mlp_vae_held_out_loss_is_float32_with_noise_from_a_cpu_generator(tmp_path, monkeypatch):
    mlp_vae = importlib.import_module("mlp_vae")
    seen, reparameterise = [], mlp_vae.reparameterise

    def spy(mu, logvar, generator=None):
        if generator is not None:  # the held-out pass
            seen.append((generator.device.type, torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cpu")))
        return reparameterise(mu, logvar, generator)
    monkeypatch.setattr(mlp_vae, "reparameterise", spy)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a CUDA user may set them
    try:
        run("mlp_vae", tmp_path / "run", "--max-steps", "2", "--amp")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # given back after
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen and set(seen) == {("cpu", False, False, False)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_lr_decay_linear_means_the_same_in_every_script(tmp_path, script):
    # --batch-size 512 makes 4 steps an epoch on fake's 2048 images; the last step uses lr (1 - 3/4).
    run(script, tmp_path / "run", "--epochs", "1", "--batch-size", "512", "--lr-decay", "linear", "--lr", "0.001")
    c = ckpt(tmp_path / "run")
    assert all(opt["param_groups"][0]["lr"] == pytest.approx(0.001 / 4) for k, opt in c.items() if k.startswith("opt"))


def test_mlp_vae_has_no_sync_bn_to_ignore(tmp_path):
    with pytest.raises(SystemExit) as e:
        run("mlp_vae", tmp_path / "run", "--sync-bn")
    assert e.value.code == 2  # argparse: no such flag (it has no BatchNorm to synchronise)


def test_resuming_the_best_checkpoint_of_an_evaluated_run_branches_and_evaluates_it_there(
        tmp_path, weights_file, data_root, small_network, capsys):
    out = tmp_path / "run"
    run("dcgan", out, "--epochs", "2", *eval_flags(weights_file, data_root))
    best = torch.load(out / "best.pt", weights_only=True)["step"]
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "best.pt", "eval.csv", "losses.csv")}
    capsys.readouterr()
    importlib.import_module("dcgan").main(["--resume", str(out / "best.pt"), "--epochs", "3", "--device", "cpu",
                                           "--weights", str(weights_file)])
    assert f"this run writes to {tmp_path / 'run-2'}" in capsys.readouterr().out
    assert {f: (out / f).read_bytes() for f in before} == before
    rows = eval_rows(tmp_path / "run-2")            # a series of its own: the point it started from, then on
    assert [int(r["step"]) for r in rows] == list(range(best, 3 * STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH))


# ---------------------------------------------------------------- found in review: bad input that ended in a traceback

@pytest.mark.parametrize("batch_size", ["1024", "128"])
def test_resuming_part_way_through_an_epoch_with_another_batch_size_is_one_sentence(tmp_path, batch_size):
    """A checkpoint's position (epoch, batch) counts batches of its own size: with another --batch-size the
    batch is past the epoch's end (a traceback from inside the loop) or, worse, silently another place."""
    out = tmp_path / "run"
    run("mlp_gan", out, "--max-steps", "3")                     # batch 3 of 8 in epoch 1
    msg = fails("mlp_gan", ["--resume", str(out / "ckpt.pt"), "--batch-size", batch_size, "--max-steps", "6"])
    assert "--batch-size 256" in msg and "part-way through epoch 1" in msg
    assert ckpt(out)["step"] == 3
    run("mlp_gan", out, "--resume", str(out / "ckpt.pt"), "--max-steps", "6")   # the same layout resumes
    assert ckpt(out)["step"] == 6


@pytest.mark.parametrize("script", ["vaegan", "mlp_gan"])
def test_a_batch_of_one_image_per_rank_is_refused_before_batchnorm_fails(tmp_path, monkeypatch, script):
    """BatchNorm1d needs two images per rank: under torchrun the memory check's dry run must use this rank's
    share of the batch, and the refusal names the smallest --batch-size that trains (checked before
    init_process_group, so RANK and WORLD_SIZE alone make it torchrun's)."""
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    msg = fails(script, args(script, tmp_path / "run") + ["--batch-size", "2"])
    assert "1 image per rank" in msg and "at least 4" in msg


def test_a_batch_size_the_ranks_cannot_share_is_refused_before_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data was read before the flags were checked"))
    assert "not divisible by the 2 ranks" in fails("vaegan", args("vaegan", tmp_path / "run") + ["--batch-size", "5"])


@pytest.mark.parametrize("name", ["losses.csv", "eval.csv"])
def test_a_damaged_log_does_not_stop_a_resume(tmp_path, weights_file, data_root, small_network, name):  # noqa: F811
    """A power cut can leave NUL bytes or a torn line in a log: resuming keeps every readable row up to the
    checkpoint's step, warns, and trains on."""
    out = tmp_path / "run"
    run("mlp_gan", out, "--epochs", "2", "--max-steps", "8", *eval_flags(weights_file, data_root))
    kept = (out / name).read_text().splitlines()[1:]
    with open(out / name, "ab") as f:
        f.write(b"\x00\x00\x00garbage,\x00\n12\x00,3,x\n\x00")
    run("mlp_gan", out, "--resume", str(out / "ckpt.pt"), "--max-steps", "10", *eval_flags(weights_file, data_root))
    lines = (out / name).read_text().splitlines()
    assert "\x00" not in "".join(lines) and lines[1:1 + len(kept)] == kept and len(lines) > 1 + len(kept)
    assert ckpt(out)["step"] == 10
