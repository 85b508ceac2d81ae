"""Every model script's training, --resume and --sample, and latent_edit.py's attribute, vector and
interpolate, run as the user runs them: `python SCRIPT.py ...` in a process of its own, on the CPU, on
--data fake at tiny sizes. Each model script runs from a folder that holds only it, data.py and
metrics.py, as a reader who copies one script into a project runs it. The processes run two at a time
(the CPU has two cores)."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {  # a few seconds per run on one core
    "dcgan": ["--ngf", "8", "--ndf", "8"],
    "mlp_gan": ["--latent-dim", "16"],
    "vae_conv": ["--width", "32", "--latent-dim", "8"],
    "mlp_vae": ["--latent-dim", "8"],
    "vaegan": ["--width", "8", "--latent-dim", "8"],
}
COMMON = ["--data", "fake", "--img-size", "16", "--batch-size", "64", "--log-every", "1", "--device", "cpu"]


def run_all(commands, cwd=None):
    """Run {name: argv} as processes, two at a time, in the repository (as the README's commands are) or in
    cwd[name]; -> {name: CompletedProcess-like (returncode, stdout, stderr)}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, done = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < 2:
            name, argv = pending.pop(0)
            running[name] = subprocess.Popen([sys.executable, *argv], cwd=(cwd or {}).get(name, REPO), env=env,
                                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        name = next(iter(running))
        proc = running.pop(name)
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def ok(result):
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each script trained for 2 steps, then resumed to step 3 and sampled from, as processes."""
    root = tmp_path_factory.mktemp("entry")
    out, alone = {s: str(root / s) for s in TINY}, {s: root / f"{s}-alone" for s in TINY}
    for s, folder in alone.items():  # the script, data.py and metrics.py: nothing else
        folder.mkdir()
        for f in (f"{s}.py", "data.py", "metrics.py"):
            shutil.copy(REPO / f, folder / f)
    first = run_all({s: [f"{s}.py", *COMMON, *TINY[s], "--max-steps", "2", "--out", out[s]] for s in TINY}, alone)
    for s in TINY:
        ok(first[s])
    before = {s: torch.load(os.path.join(out[s], "ckpt.pt"), weights_only=True) for s in TINY}
    resumed = run_all({s: [f"{s}.py", "--resume", os.path.join(out[s], "ckpt.pt"), "--max-steps", "3",
                           "--sample", "5", "--device", "cpu"] for s in TINY}, alone)
    return out, before, resumed


@pytest.mark.parametrize("script", TINY)
def test_resume_as_a_process_continues_at_the_next_step(runs, script):
    out, before, resumed = runs
    ok(resumed[script])
    ckpt = torch.load(os.path.join(out[script], "ckpt.pt"), weights_only=True)
    assert (before[script]["step"], ckpt["step"]) == (2, 3)
    assert ckpt["script"] == script and ckpt["args"]["latent_dim"] == before[script]["args"]["latent_dim"]
    assert "resumed from" in resumed[script].stdout
    with open(os.path.join(out[script], "losses.csv")) as f:
        steps = [int(line.split(",")[0]) for line in f.read().splitlines()[1:] if line.split(",")[2]]
    assert steps == [1, 2, 3]                   # every step logged once: none skipped, none repeated


@pytest.mark.parametrize("script", TINY)
def test_sample_from_a_checkpoint_as_a_process(runs, script):
    out, _, resumed = runs
    ok(resumed[script])
    files = sorted(os.listdir(os.path.join(out[script], "samples")))
    assert files == [f"{i:06d}.png" for i in range(5)]
    img = Image.open(os.path.join(out[script], "samples", files[0]))
    assert img.size == (16, 16) and img.mode == "RGB"
    assert f"wrote 5 samples to {os.path.join(out[script], 'samples')}" in resumed[script].stdout


def test_latent_edit_attribute_vector_and_interpolate_as_processes(runs, tmp_path):
    out = runs[0]
    vae, gan = os.path.join(out["vae_conv"], "ckpt.pt"), os.path.join(out["dcgan"], "ckpt.pt")
    pictures = {name: str(tmp_path / f"{name}.png") for name in ("attribute", "vector", "interpolate",
                                                                  "interpolate_gan")}
    done = run_all({
        "attribute": ["latent_edit.py", "attribute", "--ckpt", vae, "--attr", "Large", "--intensities", "0,2",
                      "--n", "3", "--out", pictures["attribute"], "--device", "cpu"],
        "vector": ["latent_edit.py", "vector", "--ckpt", vae, "--attr", "Striped", "--out", pictures["vector"],
                   "--device", "cpu"],
        "interpolate": ["latent_edit.py", "interpolate", "--ckpt", vae, "--from", "0", "--to", "1", "--steps", "5",
                        "--slerp", "--out", pictures["interpolate"], "--device", "cpu"],
        "interpolate_gan": ["latent_edit.py", "interpolate", "--ckpt", gan, "--n", "2", "--steps", "4",
                            "--out", pictures["interpolate_gan"], "--device", "cpu"]})
    tile = 16 + 2  # a 16-pixel image and make_grid's 2-pixel padding
    sizes = {"attribute": (3 * tile + 2, 4 * tile + 2),      # 3 originals; rows: originals, recons, k = 0, 2
             "vector": (5 * tile + 2, 2 * tile + 2),         # k = 0, 1, 2, 2.5, 3; decode(k z) and mean + k z
             "interpolate": (7 * tile + 2, tile + 2),        # the two images, 5 decodes between
             "interpolate_gan": (4 * tile + 2, 2 * tile + 2)}  # two random paths of 4
    for name, result in done.items():
        ok(result)
        assert Image.open(pictures[name]).size == sizes[name], name
