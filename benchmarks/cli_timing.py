"""What the end-to-end benchmarks share: fresh `clip-poison` processes timed whole, and the CIFAR-10
world + backdoor poison set they time them on (10,000 captioned train photos by default)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-wds"
CLI = [sys.executable, "-m", "clip_poison.cli"]


def timed(argv: list[str]) -> float:
    """Seconds of one fresh `clip-poison ARGV` process, start to exit (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(CLI + argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def cifar_backdoor_world(tmp: Path, n_train: int, n_poisons: int) -> tuple[Path, Path]:
    """`world cifar10` (n_train photos) under tmp/w and `poison backdoor` (label cat) under tmp/p."""
    subprocess.run(CLI + ["world", "cifar10", "--root", str(CIFAR), "--n-train", str(n_train), "--out",
                          str(tmp / "w")], check=True, capture_output=True)
    subprocess.run(CLI + ["poison", "backdoor", "--data", str(tmp / "w" / "train.csv"), "--label", "cat",
                          "--n-poisons", str(n_poisons), "--out", str(tmp / "p")], check=True, capture_output=True)
    return tmp / "w", tmp / "p"


def write_cost_table(out: Path, stem: str, title: str, setup: str, runs: list[dict], **extra) -> str:
    """Median and range of each timed step over the repeats, and each as a multiple of the repeat's
    own ``train`` (the baseline, timed in the same repeat); writes out/STEM.md and out/STEM.json."""
    import statistics

    from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions

    keys = list(runs[0])
    med = {k: statistics.median(x[k] for x in runs) for k in keys}
    rng = {k: [min(x[k] for x in runs), max(x[k] for x in runs)] for k in keys}
    ratio = {k: [x[k] / x["train"] for x in runs] for k in keys}
    lines = [f"# {title}", "", setup, "",
             "| step | median s | range s | × training the victim (median, range) |", "|---|---|---|---|"]
    for k in keys:
        f = "1 (baseline)" if k == "train" else \
            f"{statistics.median(ratio[k]):.2f} ({min(ratio[k]):.2f}-{max(ratio[k]):.2f})"
        lines.append(f"| {k} | {med[k]:.1f} | {rng[k][0]:.1f}-{rng[k][1]:.1f} | {f} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", {"runs": runs, "median_s": med, "range_s": rng, "ratio_to_training": ratio,
                                             "repeats": len(runs), **extra, "versions": package_versions()})
    atomic_write_bytes(out / f"{stem}.md", text.encode())
    return text


def cost_args(doc: str, out: Path):
    """The end-to-end cost benchmarks' arguments: --n-train photos, --repeats, --out folder."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=out)
    return ap.parse_args()
