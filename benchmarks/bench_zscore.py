"""Time the exact O(N·d²) backdoor z-score (§5.1, Definition 1) against the naive O(N²·d) definition.

In one run: the fast z-score on 50,000 random embeddings (d=512); the naive one cannot hold the
50,000² similarity matrix (20 GB), so both are timed on a subsample (N=4,000 by default), checked
to agree there within 1e-6, and the naive time is extrapolated to 50,000 as O(N²). Target: the
fast z-score on 50,000 embeddings (d=512) in under 2 s. Each timing is the median of --repeats.

    python benchmarks/bench_zscore.py [--n 50000] [--d 512] [--n-naive 4000] [--repeats 3]
                                      [--blas-threads K]

The fast form is one d×d Gram matrix, so its time is BLAS's. On a small machine shared with other
processes, OpenBLAS's worker threads can wait on each other for cores that are busy elsewhere; the
run therefore also times the fast 50,000 case with BLAS held to one thread, to tell that apart.
The PASS/FAIL line judges the run as configured (library defaults unless --blas-threads).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from clip_poison.metrics.zscore import backdoor_z_score

TARGET_S = 2.0
TOLERANCE = 1e-6
KEYS = ("z", "clean_mean", "clean_std", "triggered_mean")


def embeddings(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 like a model's output; a shared direction gives clean pairs a mean similarity near
    0.1 as in Figure 3 (right), and the trigger adds a second shared direction."""
    rng = np.random.default_rng(seed)
    common, trigger = rng.normal(size=(2, d)).astype(np.float32)
    clean = rng.normal(size=(n, d)).astype(np.float32) + 0.33 * common
    triggered = clean + 1.5 * trigger
    return clean, triggered


def blas_threads() -> str:
    pools = threadpool_info()
    return ", ".join(f"{p['prefix']}={p['num_threads']}" for p in pools if p["user_api"] == "blas")


def median_time(fn, repeats: int) -> tuple[float, dict]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n-naive", type=int, default=4_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit BLAS threads for every timing (default: the library's own setting)")
    args = ap.parse_args(argv)
    with threadpool_limits(args.blas_threads, user_api="blas"):
        return run(args)


def run(args) -> int:
    blas = blas_threads()
    clean, trig = embeddings(args.n, args.d, args.seed)
    sub_c, sub_t = clean[:args.n_naive], trig[:args.n_naive]

    t_fast_full, r_full = median_time(lambda: backdoor_z_score(clean, trig), args.repeats)
    t_fast_sub, r_fast = median_time(lambda: backdoor_z_score(sub_c, sub_t), args.repeats)
    t_naive_sub, r_naive = median_time(lambda: backdoor_z_score(sub_c, sub_t, naive=True), args.repeats)

    diffs = {k: abs(r_fast[k] - r_naive[k]) for k in KEYS}
    agree = all(d <= TOLERANCE for d in diffs.values())
    t_naive_full = t_naive_sub * (args.n / args.n_naive) ** 2

    t_fast_1thread = None
    if args.blas_threads is None:
        with threadpool_limits(1, user_api="blas"):
            t_fast_1thread, _ = median_time(lambda: backdoor_z_score(clean, trig), args.repeats)

    print(f"backdoor z-score, d={args.d}, median of {args.repeats} runs (time.perf_counter), "
          f"BLAS threads: {blas}")
    print(f"  fast  O(N·d²)  N={args.n:>6}: {t_fast_full:8.3f} s   z={r_full['z']:.4f} "
          f"clean mean={r_full['clean_mean']:.4f} std={r_full['clean_std']:.4f} "
          f"triggered mean={r_full['triggered_mean']:.4f}")
    if t_fast_1thread is not None:
        print(f"  fast  O(N·d²)  N={args.n:>6}, BLAS held to 1 thread: {t_fast_1thread:8.3f} s (diagnostic)")
    print(f"  fast  O(N·d²)  N={args.n_naive:>6}: {t_fast_sub:8.3f} s   z={r_fast['z']:.6f}")
    print(f"  naive O(N²·d)  N={args.n_naive:>6}: {t_naive_sub:8.3f} s   z={r_naive['z']:.6f}")
    print(f"  agreement at N={args.n_naive}: max |fast − naive| = {max(diffs.values()):.2e} "
          f"over {', '.join(KEYS)} ({'OK' if agree else 'MISMATCH'}, tolerance {TOLERANCE:g})")
    print(f"  speed-up at N={args.n_naive} (naive/fast, same N): {t_naive_sub / t_fast_sub:8.1f}x")
    print(f"  naive extrapolated to N={args.n} (× (N/{args.n_naive})²): {t_naive_full:8.1f} s "
          f"→ speed-up {t_naive_full / t_fast_full:.0f}x")
    ok = agree and t_fast_full < TARGET_S
    print(f"{'PASS' if ok else 'FAIL'}: fast z-score on {args.n:,} embeddings (d={args.d}) took "
          f"{t_fast_full:.3f} s (target < {TARGET_S:g} s); fast == naive within {TOLERANCE:g}: {agree}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
