"""Write a backdoor base pool of CIFAR-10 photos no victim trains on and no scan uses as clean
reference: test photos 7,000-9,999 (the detect presets evaluate on the first 5,000 and give the
scans photos from 5,000 on). For `craft.base_pool` in cifar10-detect-basepool; the photos are only
read, the pool is a new OpenCLIP CSV + PNGs. Captions are placeholders: a backdoor takes only the
images of its base pool, its captions are mined from the training data.

    python scripts/cifar10_base_pool.py [--root ../shared/data/cifar10-wds] [--out runs/cifar10-base-pool]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clip_poison.data.csvdata import write_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import atomic_dir

FIRST, LAST = 7000, 10000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/cifar10-wds")
    ap.add_argument("--out", default="runs/cifar10-base-pool")
    a = ap.parse_args()
    ev = load_wds_evalset(a.root, "test", LAST)
    with atomic_dir(a.out) as tmp:
        write_csv_dataset(tmp / "pool.csv", ev.images[FIRST:], ["a photo"] * (LAST - FIRST), "images")
    print(f"wrote {Path(a.out) / 'pool.csv'} ({LAST - FIRST} test photos {FIRST}-{LAST - 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
