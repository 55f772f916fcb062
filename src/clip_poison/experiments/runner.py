"""A sweep run's bookkeeping around the one run loop (``run.run``): cached worlds, the work folder,
failure isolation, ``results/<id>.json``.

Layout of a sweep folder::

    sweep.json             the resolved spec (name, figure, axes, seeds, report plots)
    worlds/<world id>/     embedded worlds, cached by their config (shared by runs and seeds)
    work/<run id>/         poison sets and the checkpoint of a run in progress (deleted afterwards
                           unless keep_checkpoints)
    results/<run id>.json  status ok|failed, resolved config, seed, versions, metrics

``execute_run`` is a plain function with no printing, so the local executor calls it in-process (or
in its worker processes) and the Ray executor ships it to a worker unchanged.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable

from ..io import UserError, atomic_write_json, package_versions, read_json
from ..run import run as run_config
from ..run import world_id, write_world_for

Progress = Callable[[int, int], None]
RESULTS = "results"


def result_path(sweep_dir: str | Path, rid: str) -> Path:
    return Path(sweep_dir) / RESULTS / f"{rid}.json"


def finished(sweep_dir: str | Path, rid: str) -> bool:
    """A run is finished when its result exists with status ok (failed runs are retried)."""
    p = result_path(sweep_dir, rid)
    if not p.is_file():
        return False
    try:
        return read_json(p).get("status") == "ok"
    except UserError:
        return False  # a damaged result is recomputed


@contextlib.contextmanager
def _file_lock(path: Path):
    # Runs on one host (Ray tasks of one node share its folder) may need the same world at once;
    # the lock makes exactly one of them render it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_world(sweep_dir: str | Path, cfg: dict) -> Path:
    """The world of the run config ``cfg`` under ``worlds/<id>``, rendered once and reused: the
    synthetic world, or captioned real photos (``data/realworld.py``, source read in place)."""
    root = Path(sweep_dir) / "worlds"
    wid = world_id(cfg)
    out = root / wid
    with _file_lock(root / f".{wid}.lock"):
        if not (out / "world.json").is_file():
            write_world_for(cfg, out, overwrite=True)
    return out


def execute_run(run: dict, sweep_dir: str | Path, keep_checkpoints: bool = False,
                progress: Progress | None = None, write: bool = True) -> dict:
    """Run one sweep point (``run.run``) and write ``results/<id>.json`` atomically; never raises
    for a run that fails (the error is the result, status "failed"), so a sweep goes on past it."""
    sweep_dir = Path(sweep_dir)
    cfg, rid = run["config"], run["id"]
    work = sweep_dir / "work" / rid
    t0 = time.time()
    result = {"id": rid, "clean": run["clean"], "point": run["point"], "config": cfg, "seed": cfg["seed"],
              "sweep": run.get("sweep", {}), "host": os.uname().nodename}
    try:
        if work.exists():
            shutil.rmtree(work)  # leftovers of a killed attempt
        r = run_config(cfg, ensure_world(sweep_dir, cfg), work / "victim", work / "poisons", progress)
        result.update({k: v for k, v in r.items() if k not in ("evaluation", "manifests")})
        if keep_checkpoints:
            result["checkpoint"] = str(work / "victim")
    except Exception as e:  # a failed run is recorded and the sweep goes on
        result.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)})
    finally:
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - t0, 2)
    result["versions"] = package_versions()
    if write:
        atomic_write_json(result_path(sweep_dir, rid), result)
    return result
