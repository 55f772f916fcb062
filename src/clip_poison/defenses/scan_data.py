"""`clip-poison scan data`: score every pair of a training set with the data-scan detectors.

The scanned set is the training set exactly as ``clip-poison train`` composes it: the clean data
(an OpenCLIP CSV or webdataset shards), then each poison set's rows. The poison sets' manifests are
the truth, so detection is scored per poison set (positives: that set's rows; negatives: the clean
rows). Images and captions are streamed in chunks: each chunk is resized to the checkpoint's input
size (as training does), hashed (exact pixels and a perceptual hash) and embedded, and only the
embeddings and hashes are kept — O(N·d) memory, never the pixels.

Outputs (one folder, written atomically)::

    scores.parquet   row, detector, score           (higher = more suspicious)
    pairs.parquet    row, source, ref, caption      (source: "data" or the poison set's folder name)
    ranked.csv       the ``top`` most suspicious rows per detector, with source and ref
    metrics.json     per detector and poison set: roc_auc, pr_auc, fpr_at_95tpr (+ the GMM split of
                     clip-score); the detectors' inputs and the seconds each took

Which detectors run depends on what is at hand: the density detectors (``k-dist``, ``slof``,
``dao``) on the checkpoint's image embeddings, once against the scanned set itself and, with a
clean ``reference`` image set, once against it (``k-dist+ref``...: repeated poisons outnumbering k
look dense in their own company; see ``detectors.py``); ``clip-score`` under the checkpoint (sign
+1 for the victim, -1 for a clean model); ``near-duplicate`` on pixel hashes and captions;
``loss-dynamics`` when the checkpoint was trained with ``--record-pair-loss``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..config import ScanDataConfig
from ..io import UserError, load_image, atomic_dir, atomic_write_json, read_json, read_manifest, resize_to_input, sha256_file
from .detectors import DETECTORS, gmm_split, phash_code, score_pairs

Progress = Callable[[int, int], None]
CHUNK = 2048
DENSITY = ("k-dist", "slof", "dao")
# the scans that need only the data and the checkpoint (loss-dynamics also needs a recording)
DEFAULT_DETECTORS = tuple(ScanDataConfig().detectors)


@dataclass
class ScannedSet:
    """What the detectors see of a training set: per row its source, reference and caption, the
    image embeddings, caption embeddings and pixel hashes under one checkpoint."""

    sources: list[str]
    refs: list[str]
    captions: list[str]
    is_source: np.ndarray  # int: 0 = clean data, i = the i-th poison set
    image_emb: np.ndarray
    text_emb: np.ndarray
    pixel_sha: list[str]
    phash: np.ndarray  # N x 8 uint8 perceptual hashes (detectors.phash_code)
    poison_sets: list[dict] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)
    reference_emb: np.ndarray | None = None  # clean reference images under the same checkpoint


def _rows(data, poison_dirs: list[Path], size: int) -> tuple[Iterator[tuple[int, str, str, np.ndarray]], dict]:
    """(source index, ref, caption, image at input size) for every row, in ``train``'s order."""
    from ..data.wds import expand_shards, is_wds_spec, iter_samples
    from ..victims.openclip_train import training_rows

    manifests = [read_manifest(d) for d in poison_dirs]
    if is_wds_spec(data):
        shards = expand_shards(data)
        fp = {"kind": "wds", "shards": [[p.name, p.stat().st_size] for p in shards]}

        def gen():
            for s in iter_samples(shards):
                yield 0, f"{Path(s.shard).name}:{s.key}", s.caption, s.image()
            for i, (d, m) in enumerate(zip(poison_dirs, manifests), start=1):
                if m.get("format", "csv") == "csv":
                    from ..data.csvdata import read_csv_dataset
                    p = read_csv_dataset(Path(d) / m["csv"], own_files_only=True)
                    for path, cap in zip(p.paths, p.captions):
                        yield i, Path(path).name, cap, load_image(path)
                else:
                    for s in iter_samples([Path(d) / sh for sh in m["shards"]]):
                        yield i, f"{Path(s.shard).name}:{s.key}", s.caption, s.image()
        return gen(), fp
    paths, caps, n_clean, sources = training_rows(data, poison_dirs, size)
    bounds = np.cumsum([n_clean] + [int(src["n_poisons"]) for src in sources])
    fp = {"kind": "csv", "csv_sha256": sha256_file(data)}

    def gen_csv():
        for r, (p, c) in enumerate(zip(paths, caps)):
            yield int(np.searchsorted(bounds, r, side="right")), p, c, load_image(p)
    return gen_csv(), fp


def embed_training_set(data, poison_dirs, checkpoint, progress: Progress | None = None,
                       cache_dir: str | Path | None | bool = None,
                       reference_images: list[np.ndarray] | None = None) -> ScannedSet:
    """Stream the training set once; embed images and captions under ``checkpoint`` (cached under
    ``CKPT/embeddings`` per chunk, keyed on the chunk's pixels and the weights, as evaluation is),
    and ``reference_images`` (clean images for the density detectors) with the same model."""
    import torch
    from ..io import sha256_pixels
    from ..metrics.embed import EmbeddingCache, embed_images
    from ..metrics.evaluate import CACHE_SUBDIR
    from ..victims.export import CONFIG, WEIGHTS, load_victim
    from ..victims.models import input_size

    poison_dirs = [Path(d) for d in poison_dirs]
    model, preprocess, tokenizer = load_victim(checkpoint)
    size = input_size(model)
    weights = sha256_file(Path(checkpoint) / WEIGHTS)
    pre_cfg = read_json(Path(checkpoint) / CONFIG, what="checkpoint config").get("preprocess_cfg")
    cache = EmbeddingCache(None if cache_dir is False else (cache_dir or Path(checkpoint) / CACHE_SUBDIR))
    rows, fp = _rows(data, poison_dirs, size)
    src, refs, caps, shas, phashes, img_chunks, txt_chunks = [], [], [], [], [], [], []
    buf: list[np.ndarray] = []

    @torch.no_grad()
    def texts(chunk: list[str]) -> np.ndarray:
        return model.encode_text(tokenizer(chunk), normalize=True).float().numpy()

    def flush():
        if not buf:
            return
        chunk_sha = shas[-len(buf):]
        ident = {"n": len(buf), "pixels_sha256": hashlib.sha256("".join(chunk_sha).encode()).hexdigest()}
        key = {"kind": "scan-images", "weights_sha256": weights, "preprocess_cfg": pre_cfg, "evalset": ident}
        img_chunks.append(cache.get(key, lambda: embed_images(model, preprocess, buf)))
        tcap = caps[-len(buf):]
        tkey = {"kind": "scan-texts", "weights_sha256": weights,
                "evalset": {"n": len(tcap), "captions_sha256": hashlib.sha256("\n".join(tcap).encode()).hexdigest()}}
        txt_chunks.append(cache.get(tkey, lambda: texts(tcap)))
        buf.clear()
        if progress:
            progress(len(src), 0)

    for s, ref, cap, img in rows:
        img = resize_to_input(img, size)
        src.append(s), refs.append(str(ref)), caps.append(str(cap))
        shas.append(sha256_pixels(img)), phashes.append(phash_code(img))
        buf.append(img)
        if len(buf) >= CHUNK:
            flush()
    flush()
    if not src:
        raise UserError(f"{data} holds no pairs; there is nothing to scan")
    is_source = np.asarray(src, dtype=np.int64)
    names = ["data"] + [d.name for d in poison_dirs]
    sets = [{"dir": str(d), "name": d.name, "attack": m["attack"], "n_poisons": int((is_source == i).sum()),
             "manifest_sha256": sha256_file(d / "manifest.json")}
            for i, (d, m) in enumerate(zip(poison_dirs, [read_manifest(d) for d in poison_dirs]), start=1)]
    ref_emb = None if reference_images is None else \
        embed_images(model, preprocess, [resize_to_input(im, size) for im in reference_images])
    return ScannedSet([names[i] for i in src], refs, caps, is_source, np.concatenate(img_chunks),
                      np.concatenate(txt_chunks), shas, np.stack(phashes), sets,
                      {**fp, "n_rows": len(src), "checkpoint": str(checkpoint), "weights_sha256": weights},
                      ref_emb)


def check_detectors(names) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in DETECTORS]
    if bad:
        raise UserError(f"unknown detector(s) {bad}; available: {sorted(DETECTORS)}")
    if not names:
        raise UserError("no detectors chosen; pass --detectors with at least one of " + ", ".join(sorted(DETECTORS)))
    return names


def check_pair_loss(checkpoint: Path, data, poison_dirs) -> None:
    """Before any work: the victim's recorded pair losses must be of this very training set."""
    p, meta_p = checkpoint / "pair_loss.npy", checkpoint / "pair_loss.json"
    if not p.is_file() or not meta_p.is_file():
        raise UserError(f"{checkpoint} has no pair_loss.npy; loss-dynamics needs a victim trained with "
                        "`clip-poison train --record-pair-loss` (or leave loss-dynamics out of --detectors)")
    meta = read_json(meta_p, what="pair_loss.json")
    want = [sha256_file(Path(d) / "manifest.json") for d in poison_dirs]
    have = [ps.get("manifest_sha256") for ps in meta.get("poison_sets", [])]
    csv = meta.get("clean", {}).get("csv_sha256")
    if have != want or (Path(data).is_file() and csv != sha256_file(data)):
        raise UserError(f"{checkpoint}'s pair losses were recorded on another training set (its clean data or "
                        "poison sets differ from --data/--poisons); scan the data the victim was trained on")


def _pair_loss(checkpoint: Path, s: ScannedSet) -> np.ndarray:
    loss = np.load(checkpoint / "pair_loss.npy", allow_pickle=False)
    if loss.ndim != 2 or len(loss) != len(s.refs):
        raise UserError(f"{checkpoint}/pair_loss.npy has shape {loss.shape}, not one row per scanned pair "
                        f"({len(s.refs)}); retrain the victim with --record-pair-loss")
    return loss


def run_detectors(s: ScannedSet, detectors, k: int = 10, reference_emb: np.ndarray | None = None,
                  clean_model: bool = False, pair_loss: np.ndarray | None = None) -> tuple[dict, dict]:
    """{column name: scores} and {column name: seconds}. Density detectors run against the scanned
    set itself and, given ``reference_emb``, against it as ``<name>+ref``."""
    scores, seconds = {}, {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        scores[name] = np.asarray(fn(), dtype=np.float64)
        seconds[name] = round(time.perf_counter() - t0, 3)

    for d in detectors:
        if d in DENSITY:
            timed(d, lambda: score_pairs(d, image_emb=s.image_emb, k=k))
            if reference_emb is not None:
                timed(f"{d}+ref", lambda: score_pairs(d, image_emb=s.image_emb, k=k, reference=reference_emb))
        elif d == "clip-score":
            timed(d, lambda: score_pairs(d, image_emb=s.image_emb, text_emb=s.text_emb, sign=-1 if clean_model else 1))
        elif d == "near-duplicate":
            timed(d, lambda: score_pairs(d, captions=s.captions, pixel_sha=s.pixel_sha, phash=s.phash))
        elif d == "loss-dynamics":
            if pair_loss is None:
                raise UserError("loss-dynamics needs the victim's recorded pair losses (train with --record-pair-loss)")
            timed(d, lambda: score_pairs(d, pair_loss=pair_loss))
        else:
            timed(d, lambda: score_pairs(d, image_emb=s.image_emb, text_emb=s.text_emb, captions=s.captions))
    return scores, seconds


def detection_table(s: ScannedSet, scores: dict, seed: int = 0) -> dict:
    """Per detector and poison set: ROC-AUC, PR-AUC, FPR@95%TPR against the clean rows (other poison
    sets left out), and for clip-score the 2-component GMM split's flagged rows."""
    from ..metrics.detection import detection_metrics
    out: dict = {}
    clean = s.is_source == 0
    for name, sc in scores.items():
        per = {}
        for i, ps in enumerate(s.poison_sets, start=1):
            keep = clean | (s.is_source == i)
            if (s.is_source == i).any() and clean.any():
                per[ps["name"]] = detection_metrics(sc[keep], (s.is_source == i)[keep])
        if name == "clip-score" and len(np.unique(sc)) > 1:
            flagged = gmm_split(sc, seed) > 0.5
            poison = s.is_source > 0
            per["gmm_split"] = {"n_flagged": int(flagged.sum()),
                                "precision": float((flagged & poison).sum() / max(flagged.sum(), 1)),
                                "recall": float((flagged & poison).sum() / max(poison.sum(), 1))}
        out[name] = per
    return out


def scan_run(train_csv, poison_dirs, checkpoint, reference_images, cfg, seed: int = 0,
             record_pair_loss: bool = False, keep_scores: bool = False) -> dict:
    """The run loop's data scan of one poisoned victim: per detector the detection metrics on its
    one poison set, the GMM split of clip-score and seconds (no files; the CLI writes those).
    ``keep_scores`` adds ``scores``: every column's per-pair scores in training order (arrays, for
    filter-and-retrain; the caller drops them before writing JSON)."""
    t0 = time.time()
    detectors = check_detectors([d for d in cfg["detectors"] if d != "loss-dynamics" or record_pair_loss])
    if "loss-dynamics" in detectors:
        check_pair_loss(Path(checkpoint), train_csv, poison_dirs)
    use_ref = reference_images is not None and any(d in DENSITY for d in detectors)
    s = embed_training_set(train_csv, poison_dirs, checkpoint, reference_images=reference_images if use_ref else None)
    ref = s.reference_emb
    loss = _pair_loss(Path(checkpoint), s) if "loss-dynamics" in detectors else None
    scores, seconds = run_detectors(s, detectors, int(cfg["k"]), ref, False, loss)
    table = detection_table(s, scores, seed)
    name = s.poison_sets[0]["name"]
    return {"detectors": {d: {**per[name], "seconds": seconds[d]} for d, per in table.items()},
            "gmm_split": table.get("clip-score", {}).get("gmm_split"), "n_rows": len(s.refs),
            "n_poisons": s.poison_sets[0]["n_poisons"], "reference_n": None if ref is None else int(len(ref)),
            "seconds": round(time.time() - t0, 2), **({"scores": scores} if keep_scores else {})}


def scan_data(data, checkpoint, out, poison_dirs=(), detectors=DEFAULT_DETECTORS, k: int = ScanDataConfig.k,
              reference=None, reference_split: str = "test", reference_n: int | None = ScanDataConfig.reference_n,
              clean_model: bool = False, top: int = 1000, overwrite: bool = False, seed: int = 0,
              progress: Progress | None = None) -> dict:
    """The CLI's stage: scan, write the folder (module docstring), return metrics.json's content."""
    import pandas as pd
    from ..data.wds import is_wds_spec
    from ..io import check_out

    t0 = time.time()
    checkpoint = Path(checkpoint)
    poison_dirs = [Path(d) for d in poison_dirs]
    detectors = check_detectors(detectors)
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    check_out(out, [data, checkpoint, *poison_dirs] + ([reference] if reference else []), overwrite)
    if "loss-dynamics" in detectors:
        check_pair_loss(checkpoint, data, poison_dirs)
    ref_images = None
    if reference is not None:
        from ..data.evalsets import load_evalset
        ref_images = load_evalset(reference, reference_split, reference_n).images
    s = embed_training_set(data, poison_dirs, checkpoint, progress, reference_images=ref_images)
    ref_emb = s.reference_emb
    loss = _pair_loss(checkpoint, s) if "loss-dynamics" in detectors else None
    scores, seconds = run_detectors(s, detectors, k, ref_emb, clean_model, loss)
    metrics = {"detection": detection_table(s, scores, seed) if s.poison_sets else {},
               "seconds_per_detector": seconds, "n_rows": len(s.refs), "poison_sets": s.poison_sets,
               "data": {**s.fingerprint, "path": str(data) if is_wds_spec(data) else str(Path(data).resolve())},
               "detectors": list(scores), "k": k, "clean_model": clean_model,
               "reference": None if reference is None else {"root": str(reference), "split": reference_split,
                                                            "n": int(len(ref_emb))}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        n = len(s.refs)
        long = pd.DataFrame({"row": np.tile(np.arange(n), len(scores)),
                             "detector": np.repeat(list(scores), n),
                             "score": np.concatenate(list(scores.values()))})
        long.to_parquet(tmp / "scores.parquet", index=False)
        pairs = pd.DataFrame({"row": np.arange(n), "source": s.sources, "ref": s.refs, "caption": s.captions})
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
        ranked = []
        for name, sc in scores.items():
            order = np.argsort(-sc, kind="stable")[:top]
            ranked.append(pd.DataFrame({"detector": name, "rank": np.arange(1, len(order) + 1), "row": order,
                                        "score": sc[order], "source": np.asarray(s.sources)[order],
                                        "ref": np.asarray(s.refs)[order]}))
        pd.concat(ranked).to_csv(tmp / "ranked.csv", index=False)
        metrics["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


def top_fraction(scores, fraction: float) -> np.ndarray:
    """The rows a filter drops: the round(fraction·N) highest scores, ties in row order (stable)."""
    sc = np.asarray(scores, dtype=np.float64)
    if not 0 < fraction < 1:
        raise UserError(f"the fraction to filter must be between 0 and 1, got {fraction}")
    return np.sort(np.argsort(-sc, kind="stable")[:int(round(fraction * len(sc)))])


def filter_scan(scan_dir, detector: str, fraction: float, out, overwrite: bool = False) -> dict:
    """``clip-poison scan filter``: the scanned pairs less ``detector``'s top ``fraction``, written as an
    OpenCLIP CSV (absolute image paths) to train on. The scan's files are checked first: every kept
    row must name an existing image file (a CSV scan's refs are paths; a webdataset scan's are
    ``shard:key`` and cannot be written back as a CSV). Returns what was removed, per source."""
    import pandas as pd
    from ..data.csvdata import write_csv_rows
    from ..io import check_out

    scan_dir = Path(scan_dir)
    for f in ("scores.parquet", "pairs.parquet", "metrics.json"):
        if not (scan_dir / f).is_file():
            raise UserError(f"{scan_dir} has no {f}; pass a folder written by `clip-poison scan data`")
    try:
        scores, pairs = pd.read_parquet(scan_dir / "scores.parquet"), pd.read_parquet(scan_dir / "pairs.parquet")
        sc = scores[scores["detector"] == detector].sort_values("row")
        have = sorted(scores["detector"].unique())
        rows, refs, caps = pairs["row"].to_numpy(), pairs["ref"].astype(str).tolist(), pairs["caption"].astype(str).tolist()
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{scan_dir}'s parquet files are damaged ({type(e).__name__}); run `clip-poison scan data` "
                        "again") from None
    if sc.empty:
        raise UserError(f"{scan_dir} holds no scores of {detector!r}; it has {have}")
    if not (np.array_equal(rows, np.arange(len(pairs))) and np.array_equal(sc["row"].to_numpy(), rows)):
        raise UserError(f"{scan_dir}: scores.parquet and pairs.parquet do not cover the same rows; run "
                        "`clip-poison scan data` again")
    meta = read_json(scan_dir / "metrics.json", what="scan metrics")
    if meta.get("data", {}).get("kind") != "csv":
        raise UserError(f"{scan_dir} is a scan of webdataset shards, whose rows are shard:key, not image paths; "
                        "filter-and-retrain needs a scan of CSV data")
    # the scanned data, its poison sets and its images' folders are inputs too: --overwrite never replaces them
    check_out(out, [scan_dir, meta["data"].get("path"), *(p.get("dir") for p in meta.get("poison_sets", [])),
                    *sorted({str(Path(r).parent) for r in refs})], overwrite, file=True)
    drop = top_fraction(sc["score"].to_numpy(), fraction)
    keep = np.setdiff1d(np.arange(len(pairs)), drop)
    missing = [refs[i] for i in keep if not Path(refs[i]).is_absolute() or not Path(refs[i]).is_file()]
    if missing:
        raise UserError(f"{scan_dir} names {len(missing)} image(s) that are not existing absolute paths (first: "
                        f"{missing[0]!r}); the scan's images moved or its pairs.parquet was edited; scan again")
    write_csv_rows(out, [refs[i] for i in keep], [caps[i] for i in keep])
    removed = pairs.iloc[drop]["source"].value_counts().to_dict()
    return {"detector": detector, "fraction": fraction, "n_rows": len(pairs), "n_removed": len(drop),
            "n_kept": len(keep), "removed_by_source": {str(k): int(v) for k, v in removed.items()}}


__all__ = ["ScannedSet", "scan_run", "top_fraction", "filter_scan", "embed_training_set", "check_detectors", "run_detectors", "detection_table",
           "scan_data", "DEFAULT_DETECTORS"]
