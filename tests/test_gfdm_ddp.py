"""Two CPU processes (torchrun, gloo) train a few steps: identical weights on both ranks, and equal (to float
summation order) to one process that accumulates the same two shards of the same global batch. Sampling
sharded over the two ranks gives the images one process gives.

Run as a script, this file is the torchrun worker.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIG = dict(dataset="digits", preset="digits-tiny", dynamics="fvp", hurst=0.7, num_processes=2, batch_size=32,
              steps=6, lr=1e-3, lr_warmup=0, dropout=0.1, class_cond=True, grad_clip=0.5, log_every=3,
              ckpt_every=100, sample_every=100, progress=False, device="cpu", overwrite=True,
              ema_halflife_kimg=0.1)
NUM_SAMPLES, SAMPLE_BATCH, SAMPLE_STEPS = 10, 4, 5


def _worker(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from models.gfdm import distributed
    from models.gfdm.checkpoint import load_for_sampling
    from models.gfdm.config import TrainConfig
    from models.gfdm.generate import class_labels, generate
    from models.gfdm.train import train

    result = train(TrainConfig(**CONFIG, out=str(out / "run")), log=lambda *a: None)
    ctx = distributed.init("cpu")
    assert ctx.world_size == 2, ctx
    # every rank saves the weights it holds (only rank 0 writes the checkpoint)
    torch.save({"model": result["model"].state_dict(), "ema": result["ema"].state_dict()},
               out / f"weights{ctx.rank}.pt")
    model, dyn, _ = load_for_sampling(result["checkpoint"])
    imgs = generate(model, dyn, NUM_SAMPLES, (1, 8, 8), batch_size=SAMPLE_BATCH, steps=SAMPLE_STEPS, seed=7,
                    labels=class_labels(NUM_SAMPLES, 10), ctx=ctx)
    torch.save({"rank": ctx.rank, "images": imgs}, out / f"samples{ctx.rank}.pt")
    distributed.shutdown()


def test_two_gloo_processes_match_one_process(tmp_path):
    import torch

    from models.gfdm.checkpoint import load_for_sampling
    from models.gfdm.config import TrainConfig
    from models.gfdm.generate import class_labels, generate
    from models.gfdm.train import train

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GFDM_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).resolve()), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ddp["world_size"] == 2 and ddp["shards"] == 2 and ddp["step"] == 6
    r0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, v in r0[key].items():
            assert torch.equal(v, r1[key][name]), f"ranks differ in {key}.{name}"      # bit-identical ranks
            assert torch.equal(v, ddp[key][name])
    # training moved the weights: the zero-initialised output layer is no longer zero
    assert float(ddp["model"]["conv_out.weight"].abs().max()) > 0

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainConfig(**{**CONFIG, "grad_accum": 2}, out=str(tmp_path / "single")), log=lambda *a: None)
        model, dyn, _ = load_for_sampling(single["checkpoint"])
        ref_imgs = generate(model, dyn, NUM_SAMPLES, (1, 8, 8), batch_size=SAMPLE_BATCH, steps=SAMPLE_STEPS, seed=7,
                            labels=class_labels(NUM_SAMPLES, 10))
    finally:
        torch.set_num_threads(n)
    one = torch.load(single["checkpoint"], weights_only=True)
    assert one["shards"] == 2 and one["world_size"] == 1
    for key in ("model", "ema"):
        for name, v in ddp[key].items():
            # same global batch, same shards, same noise and dropout: equal up to float summation order
            # (gloo's all-reduce sums the two shard gradients in another order than accumulation does)
            torch.testing.assert_close(v, one[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    # sampling sharded over the two ranks gives one process's images (batches are seeded by index)
    s0 = torch.load(tmp_path / "samples0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "samples1.pt", weights_only=True)
    assert s1["images"] is None and s0["images"].shape == (NUM_SAMPLES, 1, 8, 8)
    torch.testing.assert_close(s0["images"], ref_imgs, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
