"""Where sweep runs execute: one at a time in this process (local), or as Ray tasks (a cluster).

Both executors take the same run list, skip runs whose ``results/<id>.json`` is already ok (so a
killed sweep resumes), and end with every run's result JSON in ``SWEEP/results``. Rich progress
lives here (and in cli.py) only; the runner itself never prints.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..io import UserError, atomic_write_json, dumps_json
from .runner import execute_run, finished, result_path
from .spec import SweepSpec, expand

Event = Callable[[str, dict], None]


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


class LocalExecutor:
    """Runs one at a time in this process (a 2-core laptop must never train two victims at once)."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def run(self, runs: list[dict], sweep_dir: str | Path, keep_checkpoints: bool = False,
            on_result: Event | None = None) -> list[dict]:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        results = []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), disable=not self.progress) as prog:
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


class RayExecutor:
    """Each run is one Ray task with the spec's resource request (e.g. ``num_gpus: 1`` per run on a
    GPU cluster). Workers write ``results/<id>.json`` themselves when the sweep folder is on a
    shared filesystem; the driver also writes each returned result, so a cluster without one
    still ends with every result on the driver."""

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
            res = {"num_cpus": self.resources.get("num_cpus", 1), "num_gpus": self.resources.get("num_gpus", 0)}
            task = ray.remote(**res)(_ray_run)
            pending = {task.remote(r, str(sweep_dir), keep_checkpoints): r for r in runs}
            results = []
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), disable=not self.progress) as prog:
                bar = prog.add_task(f"sweep on Ray ({len(runs)} runs)", total=len(runs))
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    r = pending.pop(done[0])
                    try:
                        out = ray.get(done[0])
                    except Exception as e:  # the worker itself died (OOM, node lost): record it
                        out = {"id": r["id"], "clean": r["clean"], "point": r["point"], "config": r["config"],
                               "seed": r["config"]["seed"], "sweep": r.get("sweep", {}), "status": "failed",
                               "error": f"ray task failed: {type(e).__name__}: {e}"}
                    p = result_path(sweep_dir, out["id"])
                    if not p.is_file() or p.read_text() != dumps_json(out):
                        atomic_write_json(p, out)
                    _record(out, results, prog, bar, on_result)
        finally:
            if started_here:
                ray.shutdown()
        return results


def _ray_run(run: dict, sweep_dir: str, keep_checkpoints: bool) -> dict:
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:  # a worker that can write the shared sweep folder writes its own result
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        write = True
    except OSError:
        write = False
    return execute_run(run, sweep_dir, keep_checkpoints=keep_checkpoints, write=write)


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
