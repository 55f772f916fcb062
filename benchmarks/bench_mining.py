"""Mining and backdoor crafting at CC3M scale (3,000,000 captions), ours against a naive baseline.

Generates a synthetic 3M-row OpenCLIP CSV in a temp dir (vectorised with pyarrow; the rows point
at a pool of 64 real PNG files so no 3M images are written), then measures in one run:

(a) mining one label: naive = pandas read + Python regex over every caption (``mine_captions``);
    ours = streaming ``CaptionIndex`` build + answer, and a second label from the same index.
(b) crafting 300 backdoor poisons: naive = re-read the whole dataset and re-write it with the
    poisons inserted (what editing X in place costs); ours = ``craft_backdoor_poisons`` (index,
    decode 300 images, write a new 300-row poison set). The naive rewrite is timed on a subsample
    and extrapolated linearly when the full run would take minutes (printed when it is).

Run: flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_mining.py [--n 3000000]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.data.sources import CsvTrainingData, caption_index
from clip_poison.config import BackdoorConfig
from clip_poison.data.captions import mine_captions
from clip_poison.io import png_bytes

WORDS = ("a photo of the my our new old small big red blue green dog cat car house tree park street beach "
         "man woman child people sunset city road river boat bike table chair cup coffee food garden "
         "window door sky cloud snow rain summer winter view light night morning shop market").split()


def make_corpus(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pool = root / "img"
    pool.mkdir()
    for i in range(64):
        (pool / f"{i:03d}.png").write_bytes(png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    vocab = pa.array(list(WORDS) + [f"w{i}" for i in range(20_000)])
    n_words = 8
    cols = [vocab.take(pa.array(rng.integers(0, len(vocab), n))) for _ in range(n_words)]
    # About 0.2% of captions name "tent" (CC3M-like rarity for one label), at a random word position.
    slot = rng.integers(0, n_words, n)
    has = rng.random(n) < 0.002
    for k in range(n_words):
        cols[k] = pc.if_else(pa.array(has & (slot == k)), pa.scalar("tent"), cols[k])
    captions = pc.binary_join_element_wise(*cols, " ")
    paths = pa.array([f"img/{i:03d}.png" for i in range(64)]).take(pa.array(rng.integers(0, 64, n)))
    csv = root / "train.csv"
    pacsv.write_csv(pa.table({"filepath": paths, "title": captions}), csv)
    return csv


def naive_mine(csv: Path, label: str) -> list[int]:
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    return mine_captions(df["title"].tolist(), label)


def naive_rewrite(csv: Path, out: Path, poison_rows: pd.DataFrame, nrows: int | None) -> float:
    """Read the dataset and write it back with the poisons inserted at random rows."""
    t = time.perf_counter()
    df = pd.read_csv(csv, dtype=str, keep_default_na=False, nrows=nrows)
    pos = np.sort(np.random.default_rng(0).choice(len(df) + 1, size=len(poison_rows)))
    merged = pd.DataFrame(np.insert(df.values, pos, poison_rows.values, axis=0), columns=df.columns)
    merged.to_csv(out, index=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3_000_000)
    ap.add_argument("--naive-subsample", type=int, default=500_000,
                    help="rows for the naive rewrite when extrapolating (0 = always run it in full)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_mining."))
    try:
        t = time.perf_counter()
        (tmp / "data").mkdir()
        csv = make_corpus(tmp / "data", a.n)  # the index and poisons go beside it, never inside
        print(f"synthetic corpus: {a.n:,} captions, {csv.stat().st_size / 1e6:.0f} MB CSV, made in {time.perf_counter() - t:.1f} s")

        # (a) mining
        t = time.perf_counter()
        naive_rows = naive_mine(csv, "tent")
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        train = CsvTrainingData(csv)
        idx = caption_index(train, tmp / "index.parquet")
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        ours_rows = idx.rows("tent")
        t_query = time.perf_counter() - t
        t = time.perf_counter()
        idx.rows("sunset")
        t_query2 = time.perf_counter() - t
        assert ours_rows.tolist() == naive_rows, "index answer differs from the naive regex scan"
        t_ours = t_build + t_query
        print(f"(a) mine 'tent' over {a.n:,} captions ({len(naive_rows):,} matches, identical rows):")
        print(f"    naive pandas + regex scan: {t_naive:6.2f} s")
        print(f"    ours, read + index + answer: {t_ours:6.2f} s (read+index {t_build:.2f} s, answer {t_query:.2f} s)"
              f"  ratio {t_naive / t_ours:.1f}x   target < 10 s: {'met' if t_ours < 10 else 'MISSED'}")
        print(f"    ours, a further label from the same index: {t_query2:.2f} s  ratio {t_naive / t_query2:.0f}x")

        # (b) 300 backdoor poisons
        t = time.perf_counter()
        craft_backdoor_poisons(BackdoorConfig(n_poisons=300, patch_size=4), CsvTrainingData(csv), 32, tmp / "p")
        t_craft = time.perf_counter() - t
        prow = pd.read_csv(tmp / "p" / "poisons.csv", dtype=str)
        sub = a.naive_subsample if 0 < a.naive_subsample < a.n else None
        t_rw = naive_rewrite(csv, tmp / "rewritten.csv", prow, sub)
        note = "full run"
        if sub:
            t_rw = t_rw * a.n / sub
            note = f"measured on {sub:,} rows, extrapolated linearly to {a.n:,}"
        print(f"(b) craft 300 backdoor poisons against {a.n:,} rows (fresh index, from scratch):")
        print(f"    naive full rewrite of X with P inserted: {t_rw:6.2f} s ({note})")
        print(f"    ours, new poison set beside X:           {t_craft:6.2f} s  ratio {t_rw / t_craft:.1f}x"
              f"   target < 30 s: {'met' if t_craft < 30 else 'MISSED'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
