"""How close the fast backend's training step comes to the CPU's matmul peak (issue goal: ≥ 50 % of
the fp32 peak, for later work; this script only measures).

peak: GFLOP/s of a 2048³ GEMM loop in fp32 and in bf16 at the default thread count, through each
  library that can run it here: torch's BLAS (``a @ b``: MKL's sgemm in the x86 wheels), oneDNN (the
  same product as a 1×1 convolution: the library that runs the victims' convolutions) and numpy's
  OpenBLAS (fp32); best of --runs (≥ 5) timings after a warm-up each (bench_backends.matmul_runs).
  Libraries choose their kernels from the CPU they find (an AMD CPU may get MKL's AVX2 path while
  oneDNN uses AVX-512), so the peak is the best library's, and every library's is listed.
step: the fast backend's own training loop (`train_victim`, FastOptions defaults, rn-tiny-32,
  batch 128, the laptop recipe) on a synthetic world just large enough for --warmup-steps +
  --steps steps in one epoch; samples/s over the --steps steps after the warm-up, from the
  per-step progress callback (the loop's real steps: forward, loss, backward, fused AdamW, the
  logit-scale clamp), in fp32 and in bf16 autocast; with --compile also in fp32 under torch.compile
  (FastOptions(compile=True): inductor compiles in the first steps, which --compile-warmup-steps
  leaves out of the timed window; what compiling costs is printed and recorded, not hidden).
stacked seeds (--stack K, K ≥ 2): the issue's other idea. K seeds' models in one step: their weights
  stacked (torch.func.stack_module_state) and the CLIP step vmapped over them (functional_call; the
  ResNet's convolutions become grouped ones, attention falls back to a loop), one fused AdamW over the
  stacked weights; each model gets its own batch of --batch-size, so samples/s counts K batches per
  step. Beside it, the same hand-written step on one model (no vmap, same harness, same random
  pixels and tokens): the ratio says what stacking gains, apart from the training loop's data work.
  A measurement of the idea, not a training mode.
FLOPs per sample: FlopCounterMode over one forward + backward with the CLIP loss
  (bench_backends.flops_per_sample; matmuls and convolutions only, elementwise work is not counted).
% of peak = samples/s × FLOPs per sample / peak.

Writes docs/results/speed/roofline.{json,md}. The peak is only a peak when nothing else runs: run
it alone, without OMP_NUM_THREADS (the load average before the run is recorded):

    flock /tmp/cpu.lock python benchmarks/bench_roofline.py [--compile] [--stack 4]
    python benchmarks/bench_roofline.py --quick      # smoke test of the script, not a measurement
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import open_clip
import torch
from torch.func import functional_call, stack_module_state

from bench_backends import check_models, flops_per_sample, matmul_runs
from clip_poison.config import TrainConfig, WorldConfig
from clip_poison.data.world import write_world
from clip_poison.experiments.executors import cpu_count
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.victims.fast import FastOptions, build_optimizer
from clip_poison.victims.models import register_victims
from clip_poison.victims.train import train_victim

GOAL = 0.5  # of the fp32 peak (issue 17)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNELS = {"fp32": ["torch", "onednn", "numpy"], "bf16": ["torch", "onednn"]}
# torch's a @ b: MKL's sgemm in fp32, oneDNN's matmul in bf16 (ONEDNN_VERBOSE=1 shows brg_matmul)
KERNEL_NAMES = {"torch": "torch a @ b (fp32: MKL; bf16: oneDNN matmul)", "onednn": "oneDNN (1×1 conv)",
                "numpy": "numpy (OpenBLAS)"}


def library_threads(kernel: str) -> int | None:
    """Threads the GEMM library runs on: torch's for MKL and oneDNN, OpenBLAS's own for numpy."""
    if kernel != "numpy":
        return torch.get_num_threads()
    from threadpoolctl import threadpool_info  # scikit-learn's dependency
    return next((i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"), None)


def cpu_info() -> dict:
    """Which CPU this is and the vector/matrix units its kernels can use: peaks differ by host (an
    Intel CPU with AMX runs bf16 GEMMs on tiles; this project's hosts have been Intel and AMD)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda k: next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(k)), "")
    flags = set(field("flags").split())
    return {"model": field("model name"), "vendor": field("vendor_id"), "family": field("cpu family"),
            "units": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})}


def step_throughput(world: Path, cfg: TrainConfig, warmup: int, steps: int, out: Path, compile: bool = False) -> dict:
    """samples/s of the fast backend's loop over ``steps`` steps after ``warmup`` steps."""
    marks: list[float] = []
    t0 = time.perf_counter()
    info = train_victim(world / "train.csv", [], cfg, out, progress=lambda d, t: marks.append(time.perf_counter()),
                        fast_options=FastOptions(compile=compile))
    assert len(marks) >= warmup + steps, f"{len(marks)} steps ran, {warmup + steps} wanted"
    return {"samples_per_s": cfg.batch_size * steps / (marks[warmup + steps - 1] - marks[warmup - 1]),
            "precision_used": info["precision"]["used"], "threads": info["threads"], "compile": compile,
            "warmup_steps": warmup, "warmup_seconds": marks[warmup - 1] - t0}


def stacked_step_throughput(model_name: str, batch: int, k: int, warmup: int, steps: int) -> dict:
    """samples/s of a hand-written CLIP step over k models at once (vmapped, k ≥ 2) or one model
    (k = 1, no vmap): forward, ClipLoss, backward, fused AdamW, the logit-scale clamp."""
    register_victims()
    torch.manual_seed(0)
    models = [open_clip.create_model(model_name, output_dict=True).train() for _ in range(k)]
    size = models[0].visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn(k, batch, 3, *size)
    t = torch.randint(0, 49408, (k, batch, models[0].context_length))
    loss_fn = open_clip.ClipLoss()
    if k == 1:
        model, opt = models[0], build_optimizer(models[0], TrainConfig(model=model_name), "fused")

        def loss() -> torch.Tensor:
            out = model(x[0], t[0])
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        scales = [model.logit_scale]
    else:
        params, buffers = stack_module_state(models)  # leaves with a leading k axis; BN stats stacked too
        skeleton = copy.deepcopy(models[0]).to("meta")

        def one(p, b, xi, ti):
            out = functional_call(skeleton, (p, b), (xi, ti))
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        vloss = torch.vmap(one)
        # build_optimizer over the stacked weights (it groups by a module's names); the stacked axis
        # makes 1-D weights 2-D, so those not named bn/ln/bias join the decayed group: the same
        # arithmetic per step, which is all this measures
        holder = torch.nn.Module()
        for n, v in params.items():
            holder.register_parameter(n.replace(".", "_"), torch.nn.Parameter(v))
        assert len(list(holder.parameters())) == len(params), "two weights' names collided"
        params = {n: getattr(holder, n.replace(".", "_")) for n in params}
        opt = build_optimizer(holder, TrainConfig(model=model_name), "fused")

        def loss() -> torch.Tensor:
            return vloss(params, buffers, x, t).sum()  # the models share nothing: each gets its own gradient
        scales = [params["logit_scale"]]
    marks = []
    for _ in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        with torch.no_grad():
            for sc in scales:
                sc.clamp_(0, math.log(100))
        marks.append(time.perf_counter())
    return {"samples_per_s": k * batch * steps / (marks[-1] - marks[warmup - 1]), "models_per_step": k,
            "threads": torch.get_num_threads(), "warmup_steps": warmup, "precision_used": "fp32", "compile": False,
            "warmup_seconds": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rn-tiny-32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5, help="matmul timings; the best is the peak")
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="also the fp32 step under torch.compile")
    ap.add_argument("--compile-warmup-steps", type=int, default=30, help="untimed steps of the compiled arm "
                    "(inductor compiles the forward and the backward in the first ones)")
    ap.add_argument("--stack", type=int, default=0, metavar="K", help="also K seeds stacked in one vmapped step, "
                    "beside the same hand-written step on one model (K >= 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs; not a result")
    ap.add_argument("--out", default=None, help="default docs/results/speed (--quick: runs/bench-quick/speed)")
    a = ap.parse_args()
    if a.quick:
        a.batch_size, a.matmul_n, a.warmup_steps, a.steps, a.compile_warmup_steps = 32, 256, 1, 3, 2
    elif a.runs < 5:
        ap.error("--runs must be >= 5 (the peak is the best of several timings)")
    for flag in ("warmup_steps", "compile_warmup_steps", "steps"):
        if getattr(a, flag) < 1:  # the timed window starts after the last untimed step
            ap.error(f"--{flag.replace('_', '-')} {getattr(a, flag)}: use 1 or more")
    check_models(ap, [a.model])
    if a.stack and a.stack < 2:
        ap.error(f"--stack {a.stack}: use 2 or more models per step (or leave it out)")
    if a.matmul_n < 64 or a.matmul_n % 64:
        ap.error(f"--matmul-n {a.matmul_n}: use a multiple of 64 (the oneDNN GEMM runs n/64 images of 8×8 pixels)")
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()
    threads = torch.get_num_threads()

    peak = {}
    for name, dtype in DTYPES.items():  # before any training, with nothing else in this process
        kernels = {}
        for k in KERNELS[name]:
            runs = matmul_runs(a.matmul_n, reps=2 if a.quick else 20, runs=a.runs, dtype=dtype, kernel=k)
            kt = library_threads(k)
            kernels[k] = {"best_gflops": max(runs), "runs_gflops": [round(x, 1) for x in runs], "threads": kt}
            print(f"{a.matmul_n}³ {name} GEMM, {KERNEL_NAMES[k]}, {kt} threads: best {max(runs):.0f} GFLOP/s "
                  f"(runs {', '.join(f'{x:.0f}' for x in runs)})", flush=True)
        best = max(kernels, key=lambda k: kernels[k]["best_gflops"])
        peak[name] = {"best_gflops": kernels[best]["best_gflops"], "kernel": best, "kernels": kernels}
    fps = flops_per_sample(a.model, a.batch_size)
    print(f"{a.model}: {fps / 1e6:.1f} MFLOP per training sample (forward + backward, FlopCounterMode)", flush=True)

    step = {}

    def record(arm: str, precision: str, r: dict) -> dict:
        """An arm's samples/s as GFLOP/s and fractions of the peaks, printed and kept in ``step``."""
        gflops = r["samples_per_s"] * fps / 1e9
        step[arm] = {**r, "precision": precision, "gflops": gflops,
                     "fraction_of_fp32_peak": gflops / peak["fp32"]["best_gflops"],
                     "fraction_of_own_peak": gflops / peak[precision]["best_gflops"]}
        warm = f" ({r['warmup_steps']} untimed steps took {r['warmup_seconds']:.0f} s)" if r["warmup_seconds"] is not None else ""
        print(f"training step, {arm}: {r['samples_per_s']:.0f} samples/s = {gflops:.0f} GFLOP/s, "
              f"{100 * step[arm]['fraction_of_fp32_peak']:.0f} % of the fp32 peak{warm}", flush=True)
        return step[arm]

    # arm -> (precision, compiled); the compiled arm gets more untimed steps (compilation)
    arms = {name: (name, False) for name in DTYPES} | ({"fp32 + torch.compile": ("fp32", True)} if a.compile else {})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = a.batch_size * (max(a.warmup_steps, a.compile_warmup_steps if a.compile else 0) + a.steps)
        write_world(WorldConfig(seed=0, n_train=n, n_eval=10), tmp / "world")
        for i, (arm, (name, compiled)) in enumerate(arms.items()):
            cfg = TrainConfig(model=a.model, epochs=1, batch_size=a.batch_size, precision=name)
            warmup = a.compile_warmup_steps if compiled else a.warmup_steps
            record(arm, name, step_throughput(tmp / "world", cfg, warmup, a.steps, tmp / f"victim-{i}", compile=compiled))

    stacked = None
    if a.stack:
        single = record("fp32, hand-written step, 1 model", "fp32",
                        stacked_step_throughput(a.model, a.batch_size, 1, a.warmup_steps, a.steps))
        many = record(f"fp32, {a.stack} seeds stacked (vmap)", "fp32",
                      stacked_step_throughput(a.model, a.batch_size, a.stack, a.warmup_steps, a.steps))
        stacked = many["samples_per_s"] / single["samples_per_s"]
        print(f"{a.stack} seeds stacked / 1 model, same harness: {stacked:.2f}×", flush=True)

    cpu = cpu_info()
    doc = {"cpu": cpu, "model": a.model, "batch_size": a.batch_size, "threads": threads, "matmul_n": a.matmul_n, "peak": peak,
           "flops_per_sample": fps, "warmup_steps": a.warmup_steps, "steps": a.steps, "step": step,
           "stacked_vs_one_model": stacked,
           "goal_fraction_of_fp32_peak": GOAL, "quick": a.quick, "cpus": cpu_count(),
           "load_average_before": [round(x, 2) for x in load_before], "host": os.uname().nodename,
           "versions": package_versions()}
    lines = [f"# Roofline: the fast backend's training step against the matmul peak ({a.model}, batch {a.batch_size}, "
             f"{threads} threads{', QUICK SMOKE TEST, not a measurement' if a.quick else ''})", "",
             f"Peak: a {a.matmul_n}³ GEMM loop through each library below, best of {a.runs} timings each; the peak is "
             f"the best library's. Step: samples/s over {a.steps} steps of the "
             f"fast backend's loop after {a.warmup_steps} warm-up steps. FLOPs: {fps / 1e6:.1f} MFLOP per training sample "
             "(forward + backward, FlopCounterMode: matmuls and convolutions). Load average before the run: "
             f"{', '.join(f'{x:.2f}' for x in load_before)} (the peak is only a peak on an otherwise idle machine). "
             "Produced by `benchmarks/bench_roofline.py`.", "",
             f"CPU: {cpu['model'] or 'unknown'} ({cpu['vendor']}, family {cpu['family']}), {cpu_count()} cores; "
             f"units: {', '.join(cpu['units']) or 'none found'}.", "",
             "| precision | GEMM library | threads | GFLOP/s (best; all runs) |", "| --- | --- | --- | --- |"]
    for name in DTYPES:
        for k, v in peak[name]["kernels"].items():
            mark = " **(peak)**" if k == peak[name]["kernel"] else ""
            lines.append(f"| {name} | {KERNEL_NAMES[k]}{mark} | {v['threads']} | {v['best_gflops']:.0f} "
                         f"({', '.join(f'{x:.0f}' for x in v['runs_gflops'])}) |")
    lines += ["", "| step | samples/s | GFLOP/s | % of fp32 peak | % of this precision's peak | untimed warm-up |",
              "| --- | --- | --- | --- | --- | --- |"]
    for arm, s in step.items():
        lines.append(f"| {arm} | {s['samples_per_s']:.0f} | {s['gflops']:.0f} | "
                     f"{100 * s['fraction_of_fp32_peak']:.0f} % | {100 * s['fraction_of_own_peak']:.0f} % | "
                     f"{s['warmup_steps']} steps" + (f", {s['warmup_seconds']:.0f} s |" if s["warmup_seconds"] is not None else " |"))
    if stacked is not None:
        lines += ["", f"Stacked seeds: {a.stack} models in one vmapped step run at **{stacked:.2f}×** the samples/s of the "
                  "same hand-written step on one model (both arms above, same harness, this run)."]
    f32 = max(step[arm]["fraction_of_fp32_peak"] for arm in step if step[arm]["precision"] == "fp32")
    lines += ["", f"Goal (issue 17): ≥ {100 * GOAL:.0f} % of the fp32 peak for the fp32 training step: "
              f"{'met' if f32 >= GOAL else 'not met'}, {100 * f32:.0f} % (best fp32 step above) of the best library's fp32 peak "
              f"({peak['fp32']['best_gflops']:.0f} GFLOP/s, {KERNEL_NAMES[peak['fp32']['kernel']]}). A peak measured "
              "low (other work running: see the load average above) inflates the fraction."]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(a.out or ("runs/bench-quick/speed" if a.quick else "docs/results/speed"))
    atomic_write_json(out / "roofline.json", doc)
    atomic_write_bytes(out / "roofline.md", (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
