"""Embedding throughput: clip-poison's ``embed_images`` (uint8 images in, PIL-free vectorised
preprocessing, trigger stamping) against a bare ``model.encode_image`` loop over pre-built,
already-normalised tensors, side by side in one run on the same images and the same batches.

    python benchmarks/bench_embed.py [--model rn-tiny-32] [--n 2048] [--batch-size 256] [--repeats 3]

Target: ours ≥ 0.9× the bare loop's images/s (ours also does uint8 → tensor → Normalize; the bare
loop gets its tensors for free). Also timed for reference: the per-image PIL path (open_clip's own
transform), and a triggered pass (checkerboard stamped at random positions). Images: the first N
of the shared CIFAR-10 test split if present, else seeded random 32×32 images. Each timing is the
median of --repeats; the first, warm-up pass is not timed. The z-score timing (§5.1) is printed at
the end by benchmarks/bench_zscore.py's own code.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from clip_poison.attacks.triggers import make_trigger, trigger_position
from clip_poison.io import rng_for
from clip_poison.metrics.embed import embed_images
from clip_poison.victims.models import register_victims

TARGET_RATIO = 0.9
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-wds"


def images_for(n: int, size: int) -> tuple[list[np.ndarray], str]:
    if size == 32 and (CIFAR10 / "test").is_dir():
        from clip_poison.data.evalsets import load_evalset

        return load_evalset(CIFAR10, "test", n).images, f"CIFAR-10 test, first {n}"
    rng = np.random.default_rng(0)
    return list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)), f"{n} random {size}px images"


def median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocator, oneDNN kernels)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rn-tiny-32")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-zscore", action="store_true")
    args = ap.parse_args(argv)

    register_victims()
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms(args.model)
    model.eval()
    size = model.visual.image_size
    size = int(size if isinstance(size, int) else size[0])
    images, what = images_for(args.n, size)
    bs = args.batch_size
    # The baseline's tensors are built (by open_clip's own transform) outside the timed region.
    from PIL import Image
    batches = [torch.stack([pre(Image.fromarray(im)) for im in images[s:s + bs]]) for s in range(0, len(images), bs)]

    @torch.no_grad()
    def bare():
        return np.concatenate([model.encode_image(b, normalize=True).numpy() for b in batches])

    patch = make_trigger("checkerboard", max(1, size // 8))
    rng = rng_for(0, "bench/positions")
    pos = [trigger_position((size, size), patch.shape[0], "random", rng) for _ in images]

    t_bare, e_bare = median_time(bare, args.repeats)
    t_ours, e_ours = median_time(lambda: embed_images(model, pre, images, batch_size=bs), args.repeats)
    t_pil, e_pil = median_time(lambda: embed_images(model, pre, images, batch_size=bs, vectorised=False),
                               args.repeats)
    t_trig, _ = median_time(lambda: embed_images(model, pre, images, patch, pos, batch_size=bs), args.repeats)
    same = bool(np.array_equal(e_ours, e_bare) and np.array_equal(e_pil, e_bare))

    n = len(images)
    print(f"embedding throughput, {args.model}, {what}, batch {bs}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"  bare model.encode_image on pre-built tensors: {n / t_bare:8.0f} img/s ({t_bare:.3f} s)")
    print(f"  ours, embed_images (uint8 in, vectorised):   {n / t_ours:8.0f} img/s ({t_ours:.3f} s)")
    print(f"  ours, per-image PIL path (open_clip transform): {n / t_pil:6.0f} img/s ({t_pil:.3f} s)")
    print(f"  ours, with a trigger at random positions:    {n / t_trig:8.0f} img/s ({t_trig:.3f} s)")
    print(f"  embeddings identical to the bare loop's (both paths): {same}")
    ratio = t_bare / t_ours
    ok = ratio >= TARGET_RATIO and same
    print(f"{'PASS' if ok else 'FAIL'}: ours / bare throughput = {ratio:.3f} (target ≥ {TARGET_RATIO}); "
          f"PIL path / bare = {t_bare / t_pil:.3f}")
    if not args.skip_zscore:
        print()
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_zscore

        ok = (bench_zscore.main(["--repeats", "1"]) == 0) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
