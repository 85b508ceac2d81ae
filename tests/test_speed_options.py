"""The single-device speed options of every model script, checked on the CPU: no host
synchronisation inside a training step, float32 by default on the CPU, and --amp (bfloat16
autocast) giving a loss close to float32's on the same first batch."""
import csv
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = {  # as tests/test_distributed.py: a few seconds per run
    "dcgan": ["--ngf", "8", "--ndf", "8", "--img-size", "16"],
    "mlp_gan": ["--latent-dim", "16", "--img-size", "16"],
    "vae_conv": ["--width", "32", "--latent-dim", "8", "--img-size", "16"],
    "mlp_vae": ["--latent-dim", "8", "--img-size", "16"],
    "vaegan": ["--width", "8", "--latent-dim", "8", "--img-size", "16"],
}
SCRIPTS = [s for s in TINY if (REPO / f"{s}.py").is_file()]
# Tensor -> host calls: each one waits for the device (on CUDA).
HOST = ["item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"]


def run(script, out, *extra):
    import importlib
    importlib.import_module(script).main(["--data", "fake", "--batch-size", "16", "--device", "cpu",
                                          "--out", str(out), *TINY[script], *extra])


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_host_synchronisation_between_log_steps(tmp_path, monkeypatch, script):
    """Runs of 2 and 7 steps, logging only at the last: the script's own code (and data.py)
    must make the same number of tensor-to-host calls, so none of them happens per step."""
    files = {str(REPO / f"{script}.py"), str(REPO / "data.py")}
    counts = {}

    def counting(name, real):
        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in files:
                counts[name] = counts.get(name, 0) + 1
            return real(self, *a, **k)
        return wrapper
    for name in HOST:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    totals = []
    for steps in (2, 7):
        counts.clear()
        run(script, tmp_path / f"s{steps}", "--max-steps", str(steps), "--log-every", "1000")
        totals.append(dict(counts))
    assert totals[0] == totals[1], f"{script}: host calls grow with the steps: {totals}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_float32_on_the_cpu_by_default_and_amp_close_to_it(tmp_path, script):
    run(script, tmp_path / "fp32", "--max-steps", "1", "--log-every", "1")
    run(script, tmp_path / "bf16", "--max-steps", "1", "--log-every", "1", "--amp")
    ckpt = torch.load(tmp_path / "fp32" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["amp"] is False
    for v in ckpt.values():  # every saved network is float32
        if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values()):
            assert all(t.dtype in (torch.float32, torch.int64) for t in v.values())
    rows = [list(csv.DictReader(open(tmp_path / k / "losses.csv")))[0] for k in ("fp32", "bf16")]
    # Step 1 sees the same batch and noise; bfloat16 keeps 8 bits of mantissa (relative
    # rounding 2^-9 per operation), so the losses agree to a few per cent, not exactly.
    cols = [c for c in rows[0] if c not in ("step", "epoch", "img_per_s") and rows[0][c] != ""]
    for c in cols:
        a, b = float(rows[0][c]), float(rows[1][c])
        assert b == pytest.approx(a, rel=0.05, abs=0.02), (c, a, b)
    assert any(float(rows[0][c]) != float(rows[1][c]) for c in cols)  # autocast did run
