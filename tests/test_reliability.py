"""What every model script promises when things go wrong, checked through each script's real
entry point: one sentence and a non-zero exit for every bad flag (before any data is read),
for every file that is not its checkpoint, for an unwritable --out and a full disk; a checkpoint
that says exactly where the run stopped, so that --max-steps, Ctrl-C, a kill and --resume never
skip, repeat or overshoot a step; and optimizer state that lands on its parameters' device,
dtype and memory layout when a run resumes.

A new script joins by adding its tiny settings to TINY: every case here then covers it."""
import csv
import importlib
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {  # a few seconds per run on one core, as tests/test_distributed.py
    "dcgan": ["--ngf", "8", "--ndf", "8", "--img-size", "16"],
    "mlp_gan": ["--latent-dim", "16", "--img-size", "16"],
    "vae_conv": ["--width", "32", "--latent-dim", "8", "--img-size", "16"],
    "mlp_vae": ["--latent-dim", "8", "--img-size", "16"],
    "vaegan": ["--width", "8", "--latent-dim", "8", "--img-size", "16"],
}
SCRIPTS = list(TINY)
# --data fake has 2048 training images: a global batch of 256 makes 8 steps an epoch.
STEPS_PER_EPOCH = 8


def args(script, out, *extra):
    return ["--data", "fake", "--batch-size", "256", "--log-every", "1", "--device", "cpu",
            "--out", str(out), *TINY[script], *extra]


def run(script, out, *extra):
    importlib.import_module(script).main(args(script, out, *extra))


def fails(script, argv, capsys=None):
    """main(argv) must stop with exit status != 0 and one line starting with 'error:'."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def logged_steps(out):
    """The step of every training row of losses.csv (a VAE's held-out rows leave the losses empty)."""
    with open(os.path.join(out, "losses.csv"), newline="") as f:
        return [int(r[0]) for r in list(csv.reader(f))[1:] if r and r[2] != ""]


def no_data(monkeypatch):
    """Fail the test if a script reads any data: flags must be refused before that."""
    def refuse(*a, **k):
        raise AssertionError("data was read before the flags were checked")
    monkeypatch.setattr(data, "load", refuse)


# ---------------------------------------------------------------- bad flags: one sentence, nothing read

BAD_FLAGS = {
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "negative batch size": (["--batch-size", "-4"], "--batch-size"),
    "image size 0": (["--img-size", "0"], "--img-size"),
    "negative image size": (["--img-size", "-1"], "--img-size"),
    "image size 4096": (["--img-size", "4096"], "GiB|4096px"),  # too big, or too deep for the width
    "negative epochs": (["--epochs", "-1"], "--epochs"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "lr inf": (["--lr", "inf"], "--lr"),
    "lr 0": (["--lr", "0"], "--lr"),
    "latent 0": (["--latent-dim", "0"], "--latent-dim"),
    "log every 0": (["--log-every", "0"], "--log-every"),
    "negative crop": (["--crop", "-8"], "--crop"),
    "negative sample": (["--sample", "-3"], "--sample"),
    "negative max steps": (["--max-steps", "-1"], "--max-steps"),
    "device nonsense": (["--device", "nonsense"], "nonsense"),
    "nothing to train": (["--epochs", "0"], "nothing to train"),
}
if not torch.cuda.is_available():
    BAD_FLAGS["cuda without a GPU"] = (["--device", "cuda"], "--device cpu")


@pytest.mark.parametrize("case", BAD_FLAGS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_one_sentence_before_any_data_is_read(tmp_path, monkeypatch, script, case):
    flags, says = BAD_FLAGS[case]
    no_data(monkeypatch)
    msg = fails(script, args(script, tmp_path / "run") + flags)
    assert re.search(says, msg), msg
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_batch_larger_than_the_dataset_is_one_sentence(tmp_path, script):
    assert "--batch-size" in fails(script, args(script, tmp_path / "run") + ["--batch-size", "5000"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unwritable_out_is_found_before_the_data(tmp_path, monkeypatch, script):
    (tmp_path / "a-file").write_text("not a folder")
    no_data(monkeypatch)
    msg = fails(script, args(script, tmp_path / "a-file" / "run"))
    assert "output folder" in msg and "--out" in msg


# ---------------------------------------------------------------- files that are not its checkpoint

class Evil:
    def __reduce__(self):  # would run a shell command if unpickled without weights_only
        return (os.system, ("echo unsafe > /dev/null",))


def not_a_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("step,epoch\n1,1\n")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "crafted pickle":
        torch.save({"script": "dcgan", "payload": Evil()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    elif kind == "folder":
        path.mkdir()
    elif kind == "other script":
        torch.save({"script": "not_ours", "args": {}}, path)
    return path  # "missing": never created


CKPT_CASES = {"empty": "empty", "text": "not a PyTorch checkpoint",
              "random bytes": "may be unsafe|not a PyTorch checkpoint",  # which one depends on the bytes
              "crafted pickle": "may be unsafe", "folder": "is a folder", "missing": "does not exist",
              "other script": "not written by"}


@pytest.mark.parametrize("kind", CKPT_CASES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_file_that_is_not_its_checkpoint_is_one_sentence(tmp_path, monkeypatch, script, kind):
    path = not_a_checkpoint(tmp_path, kind)
    no_data(monkeypatch)
    msg = fails(script, args(script, tmp_path / "run", "--resume", str(path)))
    assert re.search(CKPT_CASES[kind], msg) and "weights_only" not in msg
    with pytest.raises(ValueError, match=CKPT_CASES[kind]):  # load_model, as latent_edit.py uses it
        importlib.import_module(script).load_model(str(path))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """two_steps(script) -> folder of that script's 2-step run (epoch 1 of 8 steps unfinished),
    trained the first time a test asks for it."""
    base = tmp_path_factory.mktemp("two_steps")

    def get(script):
        if not (base / script / "ckpt.pt").exists():
            run(script, base / script, "--max-steps", "2", "--epochs", "2")
        return base / script
    return get


def copy_run(two_steps, script, tmp_path):
    import shutil
    return pathlib.Path(shutil.copytree(two_steps(script), tmp_path / "run"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_resuming_with_another_network_shape_names_both_sizes(two_steps, tmp_path, script):
    out = copy_run(two_steps, script, tmp_path)
    saved = ckpt(out)["args"]["latent_dim"]
    msg = fails(script, ["--device", "cpu", "--resume", str(out / "ckpt.pt"), "--latent-dim", str(saved + 3)])
    assert f"--latent-dim {saved}" in msg and f"--latent-dim {saved + 3}" in msg


@pytest.mark.parametrize("script", SCRIPTS)
def test_resuming_a_finished_run_says_there_is_nothing_to_train(two_steps, tmp_path, script):
    out = copy_run(two_steps, script, tmp_path)
    assert "already at step 2" in fails(script, ["--device", "cpu", "--resume", str(out / "ckpt.pt"),
                                                 "--max-steps", "2"])
    run(script, out, "--resume", str(out / "ckpt.pt"), "--epochs", "1")  # finishes epoch 1
    assert "nothing to train" in fails(script, ["--device", "cpu", "--resume", str(out / "ckpt.pt"), "--epochs", "1"])


# ---------------------------------------------------------------- where a run stopped, exactly

@pytest.mark.parametrize("script", SCRIPTS)
def test_max_steps_records_the_partial_epoch_and_resume_finishes_it(two_steps, tmp_path, script):
    out = copy_run(two_steps, script, tmp_path)
    c = ckpt(out)
    assert (c["epoch"], c["batch"], c["step"]) == (0, 2, 2)  # 2 of the 8 batches of epoch 1
    run(script, out, "--resume", str(out / "ckpt.pt"), "--epochs", "1")
    c = ckpt(out)
    assert (c["epoch"], c["batch"], c["step"]) == (1, 0, STEPS_PER_EPOCH)  # the other 6, not a 2nd epoch
    train_steps = [s for s in logged_steps(out)]
    assert sorted(set(train_steps)) == list(range(1, STEPS_PER_EPOCH + 1))


def interrupt_after(monkeypatch, batches, sig=signal.SIGINT):
    """Send `sig` to this process while the script trains on its batch number `batches` (global)."""
    real_epoch, count = data.Loader.epoch, {"n": 0}

    def epoch(self, *a, **k):
        for x in real_epoch(self, *a, **k):
            count["n"] += 1
            if count["n"] == batches:
                os.kill(os.getpid(), sig)
            yield x
    monkeypatch.setattr(data.Loader, "epoch", epoch)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_saves_where_it_stopped_exits_130_and_resume_repeats_no_step(tmp_path, monkeypatch, script):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 3)
    try:
        with pytest.raises(SystemExit) as e:
            run(script, out, "--epochs", "2")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert e.value.code == 130
    c = ckpt(out)
    assert (c["epoch"], c["batch"], c["step"]) == (0, 3, 3)
    with open(out / "losses.csv", newline="") as f:  # a VAE skips its held-out pass after a signal
        assert all(r[2] != "" for r in list(csv.reader(f))[1:] if r)
    monkeypatch.undo()
    run(script, out, "--resume", str(out / "ckpt.pt"))
    c = ckpt(out)
    assert (c["epoch"], c["batch"], c["step"]) == (2, 0, 2 * STEPS_PER_EPOCH)
    steps = logged_steps(out)
    assert sorted(set(steps)) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(steps.count(s) == 1 for s in range(1, 2 * STEPS_PER_EPOCH + 1))  # no step logged twice


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s in ("dcgan", "mlp_gan")])
def test_linear_lr_decay_after_ctrl_c_ends_at_its_total_and_never_goes_negative(tmp_path, monkeypatch, script):
    out, lr, total = tmp_path / "run", 1e-3, 3 * STEPS_PER_EPOCH
    interrupt_after(monkeypatch, STEPS_PER_EPOCH + 5)  # in the middle of epoch 2
    try:
        with pytest.raises(SystemExit):
            run(script, out, "--epochs", "3", "--lr-decay", "linear", "--lr", str(lr))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.undo()
    run(script, out, "--resume", str(out / "ckpt.pt"))
    c = ckpt(out)
    assert c["step"] == total and c["epoch"] == 3
    for opt in (v for k, v in c.items() if k.startswith("opt")):  # the last step used lr (1 - (T-1)/T)
        assert opt["param_groups"][0]["lr"] == pytest.approx(lr / total)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_killed_run_resumes_without_duplicate_log_rows(two_steps, tmp_path, script):
    out = copy_run(two_steps, script, tmp_path)
    with open(out / "losses.csv", "a") as f:  # rows a run logged after its last checkpoint, then was killed
        f.write("3,1,0.5\n4,1,0.5\n")
    run(script, out, "--resume", str(out / "ckpt.pt"), "--max-steps", "4")
    assert logged_steps(out).count(3) == 1 and logged_steps(out).count(4) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_from_the_first_step_names_no_checkpoint_that_does_not_exist(tmp_path, monkeypatch, script):
    mod = importlib.import_module(script)
    monkeypatch.setattr(torch, "isfinite", lambda t: torch.zeros_like(t, dtype=torch.bool))  # every loss "NaN"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        mod.main(args(script, tmp_path / "run", "--max-steps", "1"))
    assert "NaN" in e.value.code and "no checkpoint was saved" in e.value.code
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    # The caller's Ctrl-C and SIGTERM handlers are back, although the run ended in an error.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ---------------------------------------------------------------- a full disk keeps what was there

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_while_saving_keeps_the_old_checkpoint(two_steps, tmp_path, script):
    out = copy_run(two_steps, script, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    os.symlink("/dev/full", out / "ckpt.pt.tmp")  # every write there fails with ENOSPC
    msg = fails(script, ["--device", "cpu", "--resume", str(out / "ckpt.pt"), "--max-steps", "3"])
    assert "ckpt.pt" in msg and "kept" in msg
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.lexists(out / "ckpt.pt.tmp")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_while_sampling_leaves_no_empty_png(two_steps, tmp_path, script):
    out = copy_run(two_steps, script, tmp_path)
    (out / "samples").mkdir()
    os.symlink("/dev/full", out / "samples" / "000002.png")
    msg = fails(script, ["--device", "cpu", "--resume", str(out / "ckpt.pt"), "--epochs", "0", "--sample", "4"])
    assert "000002.png" in msg
    assert sorted(os.listdir(out / "samples")) == ["000000.png", "000001.png"]


# ---------------------------------------------------------------- resume puts optimizer state where its parameters are

@pytest.mark.parametrize("script", SCRIPTS)
def test_resumed_optimizer_state_has_its_parameters_device_dtype_and_layout(two_steps, script):
    """Resume onto the meta device in channels-last: every Adam/RMSprop state tensor must follow
    its parameter there (on a GPU a CPU state tensor or NCHW strides crash the fused step)."""
    mod = importlib.import_module(script)
    c = ckpt(two_steps(script))
    for k, v in c.items():  # a checkpoint written in NCHW (CPU/MPS), whatever this machine does
        if k.startswith("opt"):
            for st in v["state"].values():
                for name, t in st.items():
                    if t.dim() == 4:
                        st[name] = t.contiguous()
    run = data.Run.__new__(data.Run)  # where a resumed run stands, on the meta device, in channels-last
    run.ckpt, run.device, run.parts, run.args = c, torch.device("meta"), {}, SimpleNamespace(**c["args"])
    run.memory_format = lambda cpu=False: torch.channels_last
    made = mod.make_networks(run.args, run)
    optimizers = [o for o in made if isinstance(o, torch.optim.Optimizer)]
    checked = 0
    for opt in optimizers:
        for p in (p for g in opt.param_groups for p in g["params"]):
            assert p.device.type == "meta"
            for name, t in opt.state[p].items():
                if torch.is_tensor(t) and t.shape == p.shape:
                    assert (t.device, t.dtype, t.stride()) == (p.device, p.dtype, p.stride()), name
                    checked += 1
    assert optimizers and checked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test: needs a GPU")
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cpu_checkpoint_resumes_on_cuda_in_bf16_and_back_on_the_cpu(two_steps, tmp_path, script):
    """The crash this guards against: Adam/RMSprop state left on the CPU, or in NCHW strides,
    under CUDA's fused optimizer steps (bf16 autocast, channels-last: the CUDA defaults)."""
    out = copy_run(two_steps, script, tmp_path)
    run(script, out, "--resume", str(out / "ckpt.pt"), "--max-steps", "4", "--device", "cuda")
    c = ckpt(out)
    assert (c["epoch"], c["batch"], c["step"]) == (0, 4, 4)
    run(script, out, "--resume", str(out / "ckpt.pt"), "--max-steps", "5")  # and back on the CPU
    assert ckpt(out)["step"] == 5
    with open(out / "losses.csv", newline="") as f:
        rows = [r for r in list(csv.reader(f))[1:] if r and r[2] != ""]
    assert all(np.isfinite(float(v)) for r in rows for v in r[2:] if v != "")


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_on_the_command_line_exits_128_plus_signal_with_a_resumable_checkpoint(tmp_path, sig, code):
    out = tmp_path / "cli"
    proc = subprocess.Popen([sys.executable, "dcgan.py", *args("dcgan", out, "--epochs", "1000")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "step 3 " in line:
                break
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    c = ckpt(out)
    assert c["step"] >= 3 and c["step"] == max(logged_steps(out))
