"""``gfdm compare``: several dynamics, one budget (same steps, batch, network and seeds), one table."""
from __future__ import annotations

import json
import time

from . import distributed
from .checkpoint import check_output_path, load_for_sampling
from .config import TrainConfig
from .data import load_dataset
from .evaluate import evaluate_samples
from .generate import class_labels, derive_seed, generate, save_grid
from .runfiles import run_lock, sweep_temporaries, write_text
from .spec import RunSpec
from .train import train

__all__ = ["compare", "format_table", "DEFAULT_SPECS", "NOTES"]

#: VP, FVP(0.9, 3) with the paper's recipe, and FVP(0.9, 3) noise-aware (docs/images.md, the equal-budget study)
DEFAULT_SPECS = ("vp", "fvp:H=0.9,K=3", "fvp:H=0.9,K=3@precondition=edm;time_sampling=like:vp")


#: what the table's columns mean (printed under it and written into compare.md)
NOTES = ("± : bootstrap standard deviation of the FID over resamplings of the samples, a rough gauge of its sampling "
         "noise (training noise is not included).\n"
         "final loss: each row's own training objective (its time law and loss weight differ with the dynamics and "
         "the recipe), so it is NOT comparable across rows; compare the FID and VS_p.")


def format_table(rows: list[dict], fid_header: str) -> str:
    head = ["dynamics", "steps", "final loss", fid_header, "VS_p", "train s", "train img/s", "sample s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("reference"):
            lines.append(f"| {r['label']} | | | | {r['vs_p']:.2f} | | | |")
            continue
        lines.append(f"| {r['label']} | {r['step']} | {r['loss']:.4f} | {r['fid']:.2f} ± {r['fid_bootstrap_std']:.2f} "
                     f"| {r['vs_p']:.2f} | "
                     f"{r['train_time_s']:.1f} | {r['img_per_s']:.0f} | {r['sample_time_s']:.1f} |")
    return "\n".join(lines)


def compare(specs: list[RunSpec], base: TrainConfig, out, *, num_samples: int = 500,
            sample_steps: int = 200, method: str = "sde", sample_batch: int = 500, inception=None, grid=None,
            cache_dir=None, fid_convention: str | None = None, reuse: bool = False, overwrite: bool = False,
            log=print) -> dict:
    """Train each run (a dynamics and its recipe) with ``base``'s budget, sample with EMA weights and shared seeds,
    evaluate. Runs already in ``out`` are continued and reused (``reuse``), retrained (``overwrite``), or, with
    neither, refused before any work."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (the FID needs a sample covariance); got {num_samples!r}")
    for name, v in (("--sample-steps", sample_steps), ("--sample-batch", sample_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be >= 1; got {v!r}")
    if reuse and overwrite:
        raise ValueError("--reuse and --overwrite exclude each other")
    specs = [spec if isinstance(spec, RunSpec) else RunSpec(spec) for spec in specs]
    out = check_output_path(out, "--out")
    finished = [str(out / spec.slug / "checkpoint.pt") for spec in specs
                if (out / spec.slug / "checkpoint.pt").exists()]
    if finished and not (reuse or overwrite):
        raise FileExistsError(f"{out} already holds runs ({', '.join(finished)}); pass --reuse to continue and "
                              f"reuse them or --overwrite to retrain them")
    ctx = distributed.init(base.device)
    with run_lock(out, "compare", log=log):
        sweep_temporaries(out, ("compare.md", "compare.json", "grid-*.png"))
        return _compare(specs, base, out, ctx, num_samples=num_samples, sample_steps=sample_steps, method=method,
                        sample_batch=sample_batch, inception=inception, grid=grid, cache_dir=cache_dir,
                        fid_convention=fid_convention, reuse=reuse, overwrite=overwrite, log=log)


def _compare(specs, base, out, ctx, *, num_samples, sample_steps, method, sample_batch, inception, grid, cache_dir,
             fid_convention, reuse, overwrite, log) -> dict:
    """The runs of :func:`compare`, in its locked output folder."""
    train_data = load_dataset(base.dataset, base.data_root, "train", base.download)
    test_data = load_dataset(base.dataset, base.data_root, "test", base.download)
    rows = []
    for spec in specs:
        exists = (out / spec.slug / "checkpoint.pt").exists()
        # --reuse: a finished run is reused, an unfinished one continued, one without a checkpoint (stopped before
        # its first) started over — it is this command's own
        cfg = base.with_dynamics(spec.dynamics, out=str(out / spec.slug), resume="auto" if reuse and exists else None,
                                 overwrite=overwrite or (reuse and not exists), **spec.recipe)
        result = train(cfg, log=log)
        if result["stopped"]:      # SIGTERM / Ctrl-C / time limit: stop the whole comparison, resumable
            log(f"compare stopped during {spec.label} ({result['stopped']}); rerun with --reuse to continue")
            return {"stopped": result["stopped"]}
        model, dyn, state = load_for_sampling(result["checkpoint"], device=ctx.device, weights="ema")
        labels = class_labels(num_samples, state["unet_config"]["num_classes"])
        t0 = time.perf_counter()
        samples = generate(model, dyn, num_samples, train_data.shape, batch_size=sample_batch, steps=sample_steps,
                           method=method, seed=derive_seed(base.seed, 0xC0FE), labels=labels, ctx=ctx, grid=grid)
        sample_time = time.perf_counter() - t0
        if ctx.is_main:
            assert samples is not None                                    # the main rank holds the samples
            save_grid(samples[:100], out / f"grid-{spec.slug}.png", title=spec.label,
                      scale=max(1, 64 // max(train_data.shape[1:])))
            metrics = evaluate_samples(samples, train_data, test_data, inception=inception, cache_dir=cache_dir,
                                       device=ctx.device, log=log, fid_convention=fid_convention,
                                       progress=base.progress)
            summary = {k: v for k, v in result.items() if k not in ("model", "ema")}
            row = {**summary, **metrics, "label": spec.label, "run_spec": spec.text, "sample_time_s": sample_time,
                   "sample_steps": sample_steps, "method": method, "grid": grid}
            rows.append(row)
            log(f"{spec.label}: {metrics['fid_kind']} FID {metrics['fid']:.3f} ± {metrics['fid_bootstrap_std']:.3f}, "
                f"VS_p {metrics['vs_p']:.2f} "
                f"(data {metrics['vs_p_data']:.2f}), train {result['train_time_s']:.1f} s, "
                f"sampling {sample_time:.1f} s")
        ctx.barrier()
    if not ctx.is_main:
        return {}
    rows.append({"label": f"data ({base.dataset}, {num_samples} training images)", "reference": True,
                 "vs_p": rows[0]["vs_p_data"]})
    fid_header = "FID" if rows[0]["comparable_to_published"] else "offline FID"
    table = format_table(rows, fid_header)
    note = rows[0]["fid_label"]
    text = (f"# gfdm compare on {base.dataset}\n\nSame budget for every row: {base.steps} steps × batch "
            f"{base.batch_size}, U-Net preset {base.preset}, seed {base.seed}; {num_samples} samples, "
            f"{sample_steps} {method.upper()} steps, EMA weights.\n\n"
            f"{table}\n\n{NOTES}\n\n{note}.\n")   # the label names the kind of FID itself
    write_text(out / "compare.md", text)
    write_text(out / "compare.json", json.dumps({"rows": rows, "fid_label": note}, indent=2, default=str))
    return {"rows": rows, "table": table, "notes": NOTES, "text": text, "path": str(out / "compare.md")}

