"""The whole flow of the README through the real entry points, on --data fake with tiny settings:
each of the five scripts trains a few steps and writes samples, metrics.py compares the sample
folders (Inception weights: random, in the real file's format), latent_edit.py edits with one
attribute. For speed on 2 CPU cores the Inception network sees 75x75 inputs and FID uses 64 of
the 2048 features (test_metrics.py's small_network fixture); the numerics at full size are
tested in test_metrics.py."""
import importlib
import json

from PIL import Image

import latent_edit
import metrics
from test_metrics import small_network, weights_file  # noqa: F401  (pytest fixtures)

TINY = {  # script: flags that make it a few seconds on a CPU
    "dcgan": ["--ngf", "8", "--ndf", "8"],
    "mlp_gan": ["--latent-dim", "16"],
    "vae_conv": ["--width", "32", "--latent-dim", "8"],
    "mlp_vae": ["--latent-dim", "8"],
    "vaegan": ["--width", "8", "--latent-dim", "8"],
}


def test_train_sample_measure_and_edit(tmp_path, capsys, small_network, weights_file):  # noqa: F811
    folders = []
    for script, flags in TINY.items():
        out = tmp_path / script
        importlib.import_module(script).main(["--data", "fake", "--img-size", "16", "--batch-size", "16",
                                              "--max-steps", "2", "--sample", "6", "--out", str(out), "--device", "cpu",
                                              *flags])
        samples = sorted((out / "samples").iterdir())
        assert len(samples) == 6 and Image.open(samples[0]).size == (16, 16), script
        assert (out / "ckpt.pt").is_file() and (out / "grid_epoch_001.png").is_file()
        folders.append(str(out / "samples"))
    capsys.readouterr()

    metrics.main([*folders, "--ref", "fake", "--n", "6", "--weights", str(weights_file), "--device", "cpu",
                  "--data-root", str(tmp_path / "data"), "--json"])
    table = json.loads(capsys.readouterr().out)
    for f in folders:
        r = table[f]
        assert r["n"] == 6 and r["fid"] > 0 and r["is_mean"] >= 1 - 1e-9 and r["lapvar"] >= 0, f
    assert table["fake"]["reference"]

    edit = tmp_path / "smile.png"
    latent_edit.main(["attribute", "--ckpt", str(tmp_path / "vae_conv" / "ckpt.pt"), "--attr", "Large",
                      "--intensities", "0,2.5", "--n", "4", "--out", str(edit), "--device", "cpu"])
    # rows: originals, reconstructions, one per intensity; 4 images of 16 px with 2-px padding
    assert Image.open(edit).size == (4 * 18 + 2, 4 * 18 + 2)
