"""Every model script under `torchrun --nproc_per_node=2` on the CPU (gloo), for a few steps.

One torchrun launch runs all the scripts in turn, each through its real main(): this file is
also the per-rank harness (see `python tests/test_distributed.py` at the bottom). The harness
records, per rank and per script, every file the rank wrote (audit hook), the images of every
batch it was given, the parameters its optimizers updated, the BatchNorm statistics of the
networks it trained, and how many networks it wrapped in DistributedDataParallel.
The tests then check what the issue asks of multi-GPU training:

* both ranks end with identical parameters (the gradients were averaged), while the BatchNorm
  running statistics differ (BatchNorm is per rank, as in the papers, without --sync-bn);
* each rank gets a disjoint shard of every epoch, batch-size/2 images per step;
* rank 0 writes each file once and rank 1 writes nothing;
* a checkpoint of 1 rank resumes on 2 and a checkpoint of 2 ranks resumes on 1, counting the
  global step on (--batch-size is the global batch);
* SIGTERM (what torchrun sends its workers on Ctrl-C) stops every rank at the same step with a
  checkpoint that a later run resumes from, repeating no step;
* --sync-bn either works or, on the CPU where PyTorch's SyncBatchNorm cannot run, stops with
  one plain sentence.
"""
import hashlib
import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Tiny settings per script: a few seconds per run on one core. Scripts not written yet are skipped.
TINY = {
    "dcgan": ["--ngf", "8", "--ndf", "8", "--img-size", "16"],
    "mlp_gan": ["--latent-dim", "16", "--img-size", "16"],
    "vae_conv": ["--width", "32", "--latent-dim", "8", "--img-size", "16"],
    "mlp_vae": ["--latent-dim", "8", "--img-size", "16"],
    "vaegan": ["--width", "8", "--latent-dim", "8", "--img-size", "16"],
}
SCRIPTS = [s for s in TINY if (REPO / f"{s}.py").is_file()]
COMMON = ["--data", "fake", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]
PER_RANK = 8  # --batch-size 16 over 2 ranks
SYNC_BN = [s for s in SCRIPTS if s != "mlp_vae"]  # mlp_vae has no BatchNorm, and so no --sync-bn


def _args(script, out, *extra):
    return COMMON + TINY[script] + ["--out", str(out), *extra]


# ---------------------------------------------------------------- the per-rank harness

def _harness(record_dir, jobs):
    """Run jobs ([{"name", "script", "argv"}]) in turn on this rank, recording what each did."""
    import torch.distributed as dist
    import torch.nn as nn
    import data

    rank = int(os.environ["RANK"])
    current = {}

    # One process group for all the jobs: each script's main() initialises and destroys its own.
    real_init, real_destroy = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else real_init(*a, **k)
    dist.destroy_process_group = lambda *a, **k: None

    class RecordingDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module, *a, **k):
            super().__init__(module, *a, **k)
            current["ddp"] += 1
    nn.parallel.DistributedDataParallel = RecordingDDP

    real_opt_init, real_train = torch.optim.Optimizer.__init__, nn.Module.train

    def recording_opt_init(self, *a, **k):  # the parameters each optimizer updates
        real_opt_init(self, *a, **k)
        if current:
            current["optimizers"].append(self)
    torch.optim.Optimizer.__init__ = recording_opt_init

    def recording_train(self, mode=True):  # the networks the script trains
        if current and mode and all(self is not m for m in current["trained"]):
            current["trained"].append(self)
        return real_train(self, mode)
    nn.Module.train = recording_train

    real_epoch = data.Loader.epoch

    def recording_epoch(self, epoch=0, start=0):
        for x in real_epoch(self, epoch, start=start):
            current["batches"].append((epoch, [hashlib.sha1(row.numpy().tobytes()).hexdigest()
                                               for row in x.detach().cpu().contiguous().flatten(1)]))
            yield x
    data.Loader.epoch = recording_epoch

    def under_out(path):
        out = current.get("out")
        return out is not None and isinstance(path, (str, bytes, os.PathLike)) and \
            os.path.abspath(os.fsdecode(path)).startswith(out + os.sep)

    def audit(event, args):  # every file this process creates, opens for writing or renames
        if not current:
            return
        if event == "open" and under_out(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                current["writes"].append(("open", os.path.relpath(os.fsdecode(args[0]), current["out"])))
        elif event in ("os.rename", "os.mkdir", "os.remove") and under_out(args[0]):
            target = args[1] if event == "os.rename" else args[0]
            current["writes"].append((event, os.path.relpath(os.fsdecode(target), current["out"])))
    sys.addaudithook(audit)

    results = []
    for job in jobs:
        argv = job["argv"]
        current.clear()
        current.update(out=os.path.abspath(argv[argv.index("--out") + 1]), writes=[], batches=[], ddp=0,
                       optimizers=[], trained=[])
        error = None
        try:
            importlib.import_module(job["script"]).main(argv)
        except SystemExit as e:
            error = f"SystemExit: {e.code}"
        except Exception as e:  # noqa: BLE001  (recorded; the test shows it)
            error = f"{type(e).__name__}: {e}"
        dist.barrier()
        stats, seen = [], set()
        for m in current["trained"]:
            for k, b in m.named_buffers():
                if k.endswith(("running_mean", "running_var")) and b.data_ptr() not in seen:
                    seen.add(b.data_ptr())
                    stats.append(b.detach().cpu().clone())
        results.append({"name": job["name"], "error": error, "writes": list(current["writes"]),
                        "batches": list(current["batches"]), "ddp": current["ddp"],
                        "params": [[p.detach().cpu().clone() for g in opt.param_groups for p in g["params"]]
                                   for opt in current["optimizers"]],
                        "bn_stats": stats})
        current.clear()
    torch.save(results, os.path.join(record_dir, f"rank{rank}.pt"))
    real_destroy()


# ---------------------------------------------------------------- the launch, once per module

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{script: {"one": 1-rank out, "two": 2-rank out, "ranks": [rank 0 record, rank 1 record],
    "syncbn": [records], "log": torchrun output}}: 1 rank for 2 steps, then 2 ranks resuming it
    to step 4 (still in epoch 1, of 128 steps), all scripts in one torchrun launch."""
    if not SCRIPTS:
        pytest.skip("no model scripts found")
    base = tmp_path_factory.mktemp("ddp")
    jobs, result = [], {}
    for s in SCRIPTS:
        one, two = base / f"{s}-one", base / f"{s}-two"
        importlib.import_module(s).main(_args(s, one, "--max-steps", "2"))
        jobs.append({"name": s, "script": s, "argv": _args(s, two, "--resume", str(one / "ckpt.pt"),
                                                            "--max-steps", "4", "--epochs", "2")})
        if s in SYNC_BN:
            jobs.append({"name": f"{s}-syncbn", "script": s,
                         "argv": _args(s, base / f"{s}-syncbn", "--max-steps", "1", "--sync-bn")})
        result[s] = {"one": one, "two": two}
    record = base / "record"
    record.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, str(record), json.dumps(jobs)],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    ranks = [torch.load(record / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for s in SCRIPTS:
        result[s]["ranks"] = [next(j for j in rk if j["name"] == s) for rk in ranks]
        result[s]["syncbn"] = [next((j for j in rk if j["name"] == f"{s}-syncbn"), None) for rk in ranks]
        result[s]["log"] = log
    return result


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_train_and_end_with_identical_weights(runs, script):
    r0, r1 = runs[script]["ranks"]
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert len(r0["params"]) == len(r1["params"]) >= 1
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert len(a) == len(b)
        for j, (p, q) in enumerate(zip(a, b)):  # bit for bit: one all-reduce, the same Adam step
            assert torch.equal(p, q), f"{script}: parameter {j} of optimizer {i} differs between the ranks"
    # The checkpoint holds rank 0's networks: every trained parameter is in it, unchanged.
    c = ckpt(runs[script]["two"])
    saved = [t for v in c.values() if isinstance(v, dict) for t in v.values() if torch.is_tensor(t)]
    for p in (p for ps in r0["params"] for p in ps):
        assert any(t.shape == p.shape and torch.equal(t, p) for t in saved)


@pytest.mark.parametrize("script", SCRIPTS)
def test_batchnorm_statistics_stay_per_rank(runs, script):
    r0, r1 = runs[script]["ranks"]
    if not r0["bn_stats"]:
        pytest.skip(f"{script} has no BatchNorm")
    # Each rank normalised its own half-batch, so its running statistics are its own.
    assert len(r0["bn_stats"]) == len(r1["bn_stats"])
    assert any(not torch.equal(a, b) for a, b in zip(r0["bn_stats"], r1["bn_stats"]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_rank_gets_its_own_shard_of_every_epoch(runs, script):
    r0, r1 = runs[script]["ranks"]
    assert len(r0["batches"]) == len(r1["batches"]) >= 2
    seen = [{}, {}]
    for rank, rec in enumerate((r0, r1)):
        for epoch, hashes in rec["batches"]:
            assert len(hashes) == PER_RANK  # --batch-size is the global batch
            seen[rank].setdefault(epoch, set()).update(hashes)
    for epoch in seen[0]:
        assert not seen[0][epoch] & seen[1][epoch], f"{script}: ranks shared images in epoch {epoch}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_only_rank_0_writes_and_each_file_once(runs, script):
    r0, r1 = runs[script]["ranks"]
    assert r1["writes"] == [], f"{script}: rank 1 wrote {r1['writes']}"
    renamed = [path for event, path in r0["writes"] if event == "os.rename"]
    assert renamed.count("ckpt.pt") == 1  # one epoch end, one checkpoint
    opened = [path for event, path in r0["writes"] if event == "open"]
    grids = [p for p in renamed if p.startswith("grid_epoch_")]
    assert grids == ["grid_epoch_001.png"]  # the part of epoch 1 that ran (written to a .tmp, renamed)
    assert opened.count("losses.png") <= 1
    rows = open(os.path.join(runs[script]["two"], "losses.csv")).read().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    # Steps 3 and 4 logged once each, after the rows of the 1-rank run it continued in another folder (a VAE
    # adds its held-out row at the epoch end, step 4).
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps.count(3) == 1 and rows[0].startswith("step,")
    out = os.listdir(runs[script]["two"])
    assert "ckpt.pt" in out and not [f for f in out if f.endswith(".tmp")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoints_move_between_rank_counts(runs, script):
    # 1 rank -> 2 ranks: the 2-rank run continued the 1-rank checkpoint at step 2, batch 2 of epoch 1.
    c2 = ckpt(runs[script]["two"])
    assert (c2["step"], c2["epoch"], c2["batch"]) == (4, 0, 4)
    # 2 ranks -> 1 rank: resume the 2-rank checkpoint here, in this process.
    out = str(runs[script]["two"]) + "-resumed"
    importlib.import_module(script).main(["--resume", os.path.join(runs[script]["two"], "ckpt.pt"),
                                          "--out", out, "--max-steps", "5", "--epochs", "3", "--device", "cpu"])
    c1 = ckpt(out)
    assert (c1["step"], c1["epoch"], c1["batch"]) == (5, 0, 5)
    assert c1["args"]["batch_size"] == 16
    opt = next(v for k, v in c1.items() if k.startswith("opt"))
    assert opt["state"][0]["step"].item() == 5  # Adam's state moved with the checkpoint


@pytest.mark.parametrize("script", SYNC_BN)
def test_sync_bn_works_or_says_why_not(runs, script):
    r0, r1 = runs[script]["syncbn"]
    for rec in (r0, r1):
        if rec["error"] is not None:
            assert rec["error"].startswith("SystemExit: error:") and "sync-bn" in rec["error"], rec["error"]
            assert "\n" not in rec["error"]
        else:
            assert len(rec["params"]) >= 1


# The stop is data.Run's, one code path for every script: a DDP script and vaegan.py (its own all-reduce).
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s in ("dcgan", "vaegan")])
def test_sigterm_under_torchrun_saves_where_all_ranks_stopped_and_resumes(tmp_path, script):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             f"{script}.py", *_args(script, out, "--epochs", "50")], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, csv_path = time.time() + 300, out / "losses.csv"
        while time.time() < deadline and proc.poll() is None:  # training under way: 3 steps logged
            if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes SIGTERM on to both workers
        log = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    c = ckpt(out)
    rows = [r.split(",") for r in csv_path.read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows if r[2] != ""]
    assert c["step"] >= 3 and c["step"] == max(steps), log[-4000:]  # saved where the log stopped
    assert "stopped by signal 15" in log
    # One rank resumes the 2-rank checkpoint where it stopped: no step is run or logged twice.
    importlib.import_module(script).main(["--resume", str(out / "ckpt.pt"), "--max-steps", str(c["step"] + 2),
                                          "--device", "cpu"])
    steps = [int(r.split(",")[0]) for r in csv_path.read_text().splitlines()[1:] if r.split(",")[2] != ""]
    assert steps == list(range(1, c["step"] + 3))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--sync-bn needs 2 CUDA devices")
@pytest.mark.parametrize("script", SYNC_BN)
def test_sync_bn_on_two_gpus_keeps_the_statistics_equal(tmp_path, script):
    record = tmp_path / "record"
    record.mkdir()
    jobs = [{"name": script, "script": script,
             "argv": _args(script, tmp_path / "run", "--max-steps", "3", "--sync-bn", "--device", "cuda")}]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, str(record), json.dumps(jobs)], cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r0, r1 = (torch.load(record / f"rank{i}.pt", weights_only=True)[0] for i in range(2))
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    if not r0["bn_stats"]:
        pytest.skip(f"{script} has no BatchNorm: --sync-bn has nothing to synchronise")
    assert len(r0["bn_stats"]) == len(r1["bn_stats"])
    for a, b in zip(r0["bn_stats"], r1["bn_stats"]):  # statistics of the global batch on both ranks
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":  # the per-rank harness, under torchrun (see the fixture `runs`)
    _harness(sys.argv[1], json.loads(sys.argv[2]))
