"""Where sweep runs execute: here (local: one at a time in this process, or N at once in N worker
processes), or as Ray tasks (a cluster).

Both executors take the same run list, skip runs whose ``results/<id>.json`` is already ok (so a
killed sweep resumes), and end with every run's result JSON in ``SWEEP/results``. Rich progress
lives here (and in cli.py) only; the runner itself never prints.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ..io import UserError, atomic_write_json, read_json
from .runner import execute_run, finished, result_path
from .spec import SweepSpec, expand

Event = Callable[[str, dict], None]
# Best victims at once per model, measured by benchmarks/bench_parallel.py (``--parallel auto``).
PARALLEL_TABLE = Path(__file__).resolve().parents[3] / "docs" / "results" / "speed" / "parallel.json"


def plan(spec: SweepSpec, sweep_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(all runs, runs still to do); writes ``sweep.json`` with the resolved spec."""
    sweep_dir = Path(sweep_dir)
    runs = expand(spec)
    meta = {"name": spec.name, "size": spec.size, "figure": spec.figure, "attack": spec.attack,
            "report": spec.report}
    for r in runs:
        r["sweep"] = meta
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep.json", {"spec": spec.to_dict(), "run_ids": [r["id"] for r in runs]})
    todo = [r for r in runs if not finished(sweep_dir, r["id"])]
    return runs, todo


def _record(res: dict, results: list[dict], prog, task, on_result: Event | None) -> None:
    """One finished run: say if it failed, keep it, tell the caller, advance the sweep's bar."""
    if res["status"] != "ok":
        prog.console.print(f"[red]run {res['id']} failed:[/red] {res['error']}")
    results.append(res)
    if on_result:
        on_result("result", res)
    prog.advance(task)


def _failed(run: dict, error: str) -> dict:
    """The result of a run whose process died before it could say how the run went."""
    return {"id": run["id"], "clean": run["clean"], "point": run["point"], "config": run["config"],
            "seed": run["config"]["seed"], "sweep": run.get("sweep", {}), "status": "failed", "error": error}


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_threads(parallel: int) -> int:
    """Torch threads of each of ``parallel`` victims at once: the cores split between them."""
    return max(1, cpu_count() // parallel)


def auto_parallel(models: list[str], table: Path = PARALLEL_TABLE) -> tuple[int, str]:
    """(victims at once, why) for a sweep training ``models``: the smallest best N that
    ``benchmarks/bench_parallel.py`` measured for them on a machine with this many cores, else 1."""
    if not table.is_file():
        return 1, (f"--parallel auto: no measurement ({table} is missing; run benchmarks/bench_parallel.py); "
                   "one at a time")
    t = read_json(table)
    if t.get("quick"):
        return 1, f"--parallel auto: {table} holds a --quick smoke test, not a measurement; one at a time"
    if t["cpus"] != cpu_count():
        return 1, (f"--parallel auto: {table.name} was measured on {t['cpus']} cores, this machine has {cpu_count()}; "
                   "one at a time (measure here with benchmarks/bench_parallel.py)")
    missing = sorted(set(models) - set(t["best"]))
    if missing:
        return 1, f"--parallel auto: no measurement for {', '.join(missing)} in {table.name}; one at a time"
    n = min(t["best"][m] for m in models)
    return n, (f"--parallel auto: {n} at a time, {worker_threads(n)} threads each (best measured for "
               f"{', '.join(sorted(set(models)))} on {t['cpus']} cores, {table.name})")


def _init_worker(threads: int) -> None:
    """A fresh (spawned) worker: the thread split is set before torch is imported here."""
    import logging
    import warnings

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


def _worker_run(run: dict, sweep_dir: str, keep_checkpoints: bool) -> dict:
    return execute_run(run, sweep_dir, keep_checkpoints=keep_checkpoints, write=False)


class LocalExecutor:
    """Runs on this machine: one at a time in this process (``parallel=1``, torch's default threads),
    or ``parallel`` at once, each in its own worker process with ``worker_threads(parallel)`` torch
    threads (workers are spawned, never forked: torch's thread pools do not survive a fork). CPU
    results depend on the thread count (``train.threads`` in each result records it), so a run
    gives the same bytes whenever it is repeated with the same ``parallel`` on the same machine.
    The workers share the sweep folder (worlds are rendered once, under a lock); the parent writes
    every ``results/<id>.json``."""

    def __init__(self, progress: bool = True, parallel: int = 1):
        if parallel < 1:
            raise UserError(f"--parallel {parallel}: run at least one victim at a time (1 = one at a time)")
        self.progress, self.parallel = progress, parallel

    def run(self, runs: list[dict], sweep_dir: str | Path, keep_checkpoints: bool = False,
            on_result: Event | None = None) -> list[dict]:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        results = []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), disable=not self.progress) as prog:
            if self.parallel > 1:
                self._run_parallel(runs, Path(sweep_dir), keep_checkpoints, on_result, results, prog)
                return results
            # ETA of the sweep in training samples, so one long run does not stall the estimate.
            total = prog.add_task(f"sweep ({len(runs)} runs)", total=len(runs))
            cur = prog.add_task("", total=None, visible=False)
            for r in runs:
                label = "clean" if r["clean"] else ", ".join(f"{k}={v}" for k, v in r["point"].items())
                prog.reset(cur, total=None, visible=True,
                           description=f"  {r['id']} seed {r['config']['seed']} {label}")
                res = execute_run(r, sweep_dir, keep_checkpoints=keep_checkpoints,
                                  progress=lambda d, t: prog.update(cur, completed=d, total=t))
                _record(res, results, prog, total, on_result)
        return results

    def _run_parallel(self, runs: list[dict], sweep_dir: Path, keep_checkpoints: bool, on_result: Event | None,
                      results: list[dict], prog) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = worker_threads(self.parallel)  # from --parallel, not from the runs left: a resumed run computes alike
        total = prog.add_task(f"sweep ({len(runs)} runs, {self.parallel} at a time, "
                              f"{threads} thread{'s' * (threads > 1)} each)", total=len(runs))
        pool = ProcessPoolExecutor(min(self.parallel, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))
        try:
            futures = {pool.submit(_worker_run, r, str(sweep_dir), keep_checkpoints): r for r in runs}
            for f in as_completed(futures):
                try:
                    res = f.result()
                except Exception as e:  # a worker died (killed, out of memory): the pool cannot run the rest
                    res = _failed(futures[f], f"worker process died ({type(e).__name__}: {e}); rerun the sweep to "
                                              "retry it (finished results are kept)")
                atomic_write_json(result_path(sweep_dir, res["id"]), res)
                _record(res, results, prog, total, on_result)
        finally:  # interrupted: runs not started are dropped (a rerun resumes them), running ones end
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Each run is one Ray task asking for the spec's resources per run (``.options(num_cpus=,
    num_gpus=)``, e.g. ``num_gpus: 1`` on a GPU cluster). Nodes need not share the sweep folder: a
    task is given only its run, renders the run's world (deterministic from the config) and trains
    in a folder on its own node (``clip-poison-ray`` in the node's temp dir, ``TMPDIR``), and
    returns its result; the driver writes ``results/<id>.json``. A task whose worker dies (killed,
    out of memory, node lost) is retried by Ray up to ``MAX_RETRIES`` times, and its result is
    written once. A request no node of the cluster could ever grant is refused before anything is
    submitted, rather than left pending forever."""

    MAX_RETRIES = 3

    def __init__(self, address: str | None = None, resources: dict | None = None, init_kwargs: dict | None = None,
                 progress: bool = True):
        self.address, self.resources, self.progress = address, resources or {}, progress
        self.init_kwargs = init_kwargs or {}

    def run(self, runs: list[dict], sweep_dir: str | Path, keep_checkpoints: bool = False,
            on_result: Event | None = None) -> list[dict]:
        import ray
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        sweep_dir = Path(sweep_dir).resolve()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, **self.init_kwargs)
            except ConnectionError as e:
                raise UserError(f"could not reach a Ray cluster at {self.address!r} ({e}); start one with "
                                "`ray start --head` or pass --address host:port") from None
        try:
            req = {"num_cpus": self.resources.get("num_cpus", 1), "num_gpus": self.resources.get("num_gpus", 0)}
            _check_schedulable(req, [n["Resources"] for n in ray.nodes() if n["Alive"]])
            task = ray.remote(max_retries=self.MAX_RETRIES)(_ray_run).options(**req)
            pending = {task.remote(r, keep_checkpoints): r for r in runs}
            results = []
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), disable=not self.progress) as prog:
                bar = prog.add_task(f"sweep on Ray ({len(runs)} runs)", total=len(runs))
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    r = pending.pop(done[0])
                    try:
                        out = ray.get(done[0])
                    except Exception as e:  # the worker died on every attempt (OOM, node lost): record it
                        out = _failed(r, f"ray task failed (a dead worker is retried {self.MAX_RETRIES} times): "
                                         f"{type(e).__name__}: {e}")
                    atomic_write_json(result_path(sweep_dir, out["id"]), out)
                    _record(out, results, prog, bar, on_result)
        finally:
            if started_here:
                ray.shutdown()
        return results


def _check_schedulable(req: dict, nodes: list[dict]) -> None:
    """Raise if no node has the CPUs and GPUs one run asks for (Ray would keep such a task pending
    forever; a task runs on one node, so the cluster's totals are not enough)."""
    need = {"CPU": req["num_cpus"], "GPU": req["num_gpus"]}
    if any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
        return
    have = [{k: n.get(k, 0) for k in need} for n in nodes]
    total = {k: sum(h[k] for h in have) for k in need}
    raise UserError(f"each run asks for {req} but no node of the Ray cluster has that much (nodes: {have}, "
                    f"cluster total: {total}); lower `resources` in the spec or add a node that has them")


def _ray_run(run: dict, keep_checkpoints: bool) -> dict:
    """One run in a Ray worker, in a folder on this node (never the driver's sweep folder, which
    the node may not see); the result goes back to the driver, which writes it."""
    import logging
    import tempfile
    import warnings

    import ray

    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    out = execute_run(run, Path(tempfile.gettempdir()) / "clip-poison-ray", keep_checkpoints=keep_checkpoints,
                      write=False)
    ctx = ray.get_runtime_context()
    out["node"] = ctx.get_node_id()  # hosts of a cluster may share a name
    out["resources"] = ctx.get_assigned_resources()  # what Ray granted this run, e.g. {"CPU": 2.0}
    return out


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, executor: LocalExecutor | RayExecutor | None = None,
              keep_checkpoints: bool | None = None, on_result: Event | None = None) -> dict:
    """Plan, skip finished runs, execute the rest; returns counts and timings."""
    t0 = time.time()
    runs, todo = plan(spec, sweep_dir)
    keep = spec.keep_checkpoints if keep_checkpoints is None else keep_checkpoints
    executor = executor or LocalExecutor()
    results = executor.run(todo, sweep_dir, keep_checkpoints=keep, on_result=on_result) if todo else []
    return {"n_runs": len(runs), "skipped": len(runs) - len(todo), "ran": len(results),
            "failed": sum(r["status"] != "ok" for r in results), "seconds": round(time.time() - t0, 1)}
