"""A real-photo world: a labelled photo set (CIFAR-10 or any set in CLIP_benchmark's webdataset
layout, or an ImageFolder tree) turned into web-like (photo, caption) training pairs.

The paper's victims learn from uncurated alt-text (CC3M, §4.1), not from prompts. The captions
here therefore read like alt-text: the class word appears in only ``p_class_word`` of them;
others use a synonym or hyponym ("jet", "sedan", "puppy") from a small lexicon shipped in
``data/lexicon/`` (replace it with ``--lexicon FILE``), or no object word at all; context phrases
("at the airport") and distractor words ("… and a fence") are mixed in, and ``p_noisy_pair`` of
the pairs carry a caption of another class or none. The caption templates are disjoint from the
evaluation prompts, so zero-shot accuracy is earned (``eval_prompt_matches`` in ``world.json``).

Only the source's ``train`` split is read for training; the eval set is the source's ``test``
split, read in place (``world.json``: ``eval_root`` = the absolute source root, ``eval_split``).

Outputs (``write_real_world``)::

    train.csv           OpenCLIP CSV (filepath,title); paths relative to the CSV
    train/KEY.jpg       the source's image bytes, copied unchanged (no re-encode)
    train_labels.csv    filepath,label,classname,source_key,caption_kind (for probes and audits)
    world.json          every parameter, the lexicon, the source's hash, counts, eval pointer
    train_wds/N.tar     optional (``wds_shard_size``): the same pairs as webdataset shards

Streaming: the source's shards are read twice (labels, then the chosen images' bytes); nothing
but the chosen subset's captions is held in memory.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import yaml

from ..config import RealWorldConfig
from ..io import (UserError, atomic_dir, atomic_write_bytes, atomic_write_json, package_versions, rng_for,
                  sha256_bytes, sha256_file)
from .world import FILLER, alt_text, context_only_caption
from .captions import check_probabilities, label_pattern
from .csvdata import write_csv_rows
from .evalsets import split_counts
from .wds import IMAGE_EXTS, iter_samples, tar_bytes

# Alt-text-like templates for photos ({o} = object phrase). None contains "photo of", so no caption
# can be one of CLIP's evaluation prompts ("a photo of a {c}.", …); tests check it.
PHOTO_TEMPLATES = (
    "{o}", "my {o}", "check out this {o}", "IMG_{n} {o}", "our {o} #{tag}", "{o} ({year})",
    "the {o} we saw today", "{o} wallpaper hd", "stock image: {o}", "{name}'s {o}",
    "{o} - {name} photography", "spotted this {o} today", "{o}, {year}", "cute {o} #{tag}",
    "{o} near the lake", "{o} for sale, good condition", "just a {o}", "{o} #{tag} #{tag}",
)
CONTEXT_ONLY_PHOTO = ("summer holiday {year}", "IMG_{n}", "view from the {tag}", "{name} at home",
                      "best day ever #{tag}", "untitled {n}", "DSC{n}", "what a day #{tag}")
CAPTION_KINDS = ("class_word", "synonym", "context_only", "noisy_other_class", "noisy_none")
SHIPPED_LEXICONS = ("cifar10",)


@dataclass
class Lexicon:
    synonyms: dict[str, list[str]]
    contexts: dict[str, list[str]]
    distractors: list[str]
    source: str
    sha256: str
    raw: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Lexicon

def shipped_lexicon_path(name: str) -> Path:
    return Path(str(resources.files("clip_poison.data") / "lexicon" / f"{name}.json"))


def _lexicon_shape_error(src: str, what: str) -> UserError:
    return UserError(f"lexicon {src}: {what}; expected {{\"classes\": {{CLASSNAME: {{\"synonyms\": [...], "
                     f"\"contexts\": [...]}}}}, \"distractors\": [...]}} (see {shipped_lexicon_path('cifar10')})")


def load_lexicon(path: str | Path | None, classnames: list[str]) -> Lexicon:
    """Load and validate a lexicon against the source's class names.

    With ``path`` None, the shipped lexicon whose class set equals ``classnames`` is used. Every
    class needs an entry, no entry may name an unknown class, and no synonym, context or
    distractor may contain a class name as a whole word (else the class-word fraction would lie).
    """
    if path is None:
        for name in SHIPPED_LEXICONS:
            p = shipped_lexicon_path(name)
            if set(json.loads(p.read_text())["classes"]) == set(classnames):
                path = p
                break
        else:
            raise UserError(f"no shipped lexicon covers the classes {classnames}; write one (JSON or YAML, "
                            f"shaped like {shipped_lexicon_path('cifar10')}) and pass --lexicon FILE")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"lexicon file not found: {path}; pass --lexicon FILE (JSON or YAML)")
    data_bytes = path.read_bytes()
    try:
        raw = yaml.safe_load(data_bytes) if path.suffix.lower() in (".yaml", ".yml") else json.loads(data_bytes)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"lexicon {path} could not be parsed ({e}); fix its syntax") from None
    src = str(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict):
        raise _lexicon_shape_error(src, "no top-level 'classes' mapping")
    classes = raw["classes"]
    unknown = sorted(set(classes) - set(classnames))
    if unknown:
        raise UserError(f"lexicon {src} names class(es) {unknown} that the source does not have "
                        f"(its classes: {classnames}); rename or remove those entries")
    missing = [c for c in classnames if c not in classes]
    if missing:
        raise UserError(f"lexicon {src} has no entry for class(es) {missing}; add an entry with at least "
                        "one synonym for each")
    synonyms, contexts = {}, {}
    for c in classnames:
        entry = classes[c]
        if not isinstance(entry, dict):
            raise _lexicon_shape_error(src, f"the entry of {c!r} is not a mapping")
        syn, ctx = entry.get("synonyms", []), entry.get("contexts", [])
        if not (isinstance(syn, list) and isinstance(ctx, list) and all(isinstance(w, str) and w.strip() for w in syn + ctx)):
            raise _lexicon_shape_error(src, f"'synonyms'/'contexts' of {c!r} must be lists of non-empty strings")
        if not syn:
            raise UserError(f"lexicon {src}: class {c!r} has no synonyms; add at least one (e.g. a hyponym)")
        synonyms[c], contexts[c] = [w.strip() for w in syn], [w.strip() for w in ctx]
    distractors = raw.get("distractors", [])
    if not isinstance(distractors, list) or not all(isinstance(w, str) and w.strip() for w in distractors):
        raise _lexicon_shape_error(src, "'distractors' must be a list of non-empty strings")
    pats = {c: label_pattern(c) for c in classnames}
    for owner, words in [*((f"{c} synonyms/contexts", synonyms[c] + contexts[c]) for c in classnames),
                         ("distractors", distractors)]:
        for w in words:
            hits = [c for c, p in pats.items() if p.search(w)]
            if hits:
                raise UserError(f"lexicon {src}: {owner} entry {w!r} contains the class name {hits[0]!r}; "
                                "lexicon words must not contain class names (pick another word)")
    return Lexicon(synonyms, contexts, [w.strip() for w in distractors], src, sha256_bytes(data_bytes), raw)


# ---------------------------------------------------------------------------------------------
# Captions

def make_real_captions(labels: np.ndarray, classnames: list[str], lex: Lexicon, cfg: RealWorldConfig,
                       purpose: str = "train") -> tuple[list[str], list[str]]:
    """Web-like captions for photos with these labels (seeded by ``cfg.seed``); returns
    (captions, caption kinds). The draw order per pair is fixed, so same seed → same captions."""
    rng = rng_for(cfg.seed, f"realworld/{purpose}/captions")
    k = len(classnames)
    caps, kinds = [], []
    for lab in labels:
        lab = int(lab)
        kind = None
        if rng.random() < cfg.p_noisy_pair:
            if k < 2 or rng.random() < cfg.noisy_none_share:
                caps.append(context_only_caption(rng, CONTEXT_ONLY_PHOTO))
                kinds.append("noisy_none")
                continue
            lab = (lab + int(rng.integers(1, k))) % k  # a caption written for some other class
            kind = "noisy_other_class"
        name = classnames[lab]
        u = rng.random()
        if u < cfg.p_class_word:
            word, kind = name, kind or "class_word"
        elif u < cfg.p_class_word + cfg.p_synonym:
            syn = lex.synonyms[name]
            word, kind = syn[int(rng.integers(len(syn)))], kind or "synonym"
        else:
            caps.append(context_only_caption(rng, CONTEXT_ONLY_PHOTO))
            kinds.append(kind or "context_only")
            continue
        if lex.contexts[name] and rng.random() < cfg.p_context:
            word = f"{word} {lex.contexts[name][int(rng.integers(len(lex.contexts[name])))]}"
        if lex.distractors and rng.random() < cfg.p_distractor:
            word = f"{word} and {lex.distractors[int(rng.integers(len(lex.distractors)))]}"
        caps.append(alt_text(word, rng, PHOTO_TEMPLATES, FILLER))
        kinds.append(kind)
    return caps, kinds


def eval_prompt_regexes(templates: list[str]) -> list[re.Pattern]:
    """Each evaluation prompt as a whole-caption regex, ``{c}`` matching any class phrase."""
    return [re.compile("^" + re.escape(t).replace(re.escape("{c}"), ".+") + "$", re.IGNORECASE)
            for t in templates]


def count_eval_prompt_matches(captions: list[str], templates: list[str]) -> int:
    """How many captions are an evaluation prompt with some class filled in (must be 0)."""
    pats = eval_prompt_regexes(templates)
    return sum(any(p.match(c.strip()) for p in pats) for c in captions)


# ---------------------------------------------------------------------------------------------
# Sources: CLIP_benchmark webdataset layout, or an ImageFolder tree

@dataclass
class Source:
    kind: str  # "wds" or "imagefolder"
    root: Path
    split: str
    classnames: list[str]
    files: list[Path]  # shards (wds) or image files (imagefolder)
    sha256: str


def _sorted_shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS


def open_source(root: str | Path, split: str = "train") -> Source:
    """Recognise the layout of ``root`` and validate it (teaching errors, nothing written)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"source folder not found: {root}; pass --root DIR holding CLIP_benchmark's webdataset "
                        "layout (classnames.txt, train/*.tar, test/*.tar) or ImageFolder class sub-folders")
    split_dir = root / split
    if split_dir.is_dir() or (root / "classnames.txt").is_file():
        # CLIP_benchmark webdataset layout.
        cn_path = root / "classnames.txt"
        if not cn_path.is_file():
            raise UserError(f"{root} has a {split}/ folder but no classnames.txt; write one class name per line "
                            "(line i = label i) into ROOT/classnames.txt")
        classnames = [ln.strip() for ln in cn_path.read_text().splitlines() if ln.strip()]
        if not classnames:
            raise UserError(f"{cn_path} is empty; write one class name per line (line i = label i)")
        shards = _sorted_shards(split_dir) if split_dir.is_dir() else []
        if not shards:
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise UserError(f"the {split!r} split of {root} is empty (no {split}/*.tar shards); available splits: "
                            f"{available}. Put the training shards under ROOT/{split}/ or pass --split")
        h = [sha256_file(cn_path)] + [f"{p.name}:{sha256_file(p)}" for p in shards]
        return Source("wds", root.resolve(), split, classnames, shards, sha256_bytes("\n".join(h).encode()))
    # ImageFolder: class sub-folders (sorted, as torchvision's ImageFolder) holding images.
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files_by_class = [sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs]
    class_dirs = [d for d, f in zip(class_dirs, files_by_class) if f]
    if not class_dirs:
        raise UserError(f"{root} is neither CLIP_benchmark's webdataset layout (no classnames.txt, no "
                        f"{split}/*.tar) nor an ImageFolder tree (no class sub-folder holds images); pass a "
                        "--root in one of these layouts")
    files = [p for f in files_by_class for p in f]
    classnames = [d.name.replace("_", " ") for d in class_dirs]
    h = ["\n".join(classnames)] + [f"{p.relative_to(root)}:{sha256_file(p)}" for p in files]
    return Source("imagefolder", root.resolve(), "(all)", classnames, files, sha256_bytes("\n".join(h).encode()))


def _iter_wds(shards: list[Path], want_bytes: Callable[[int], bool] | None) -> Iterator[tuple[int, str, str, bytes | None, int]]:
    """Yield (index, key, image ext, image bytes or None, label) in shard order, one shard at a time
    (image bytes are read only when ``want_bytes`` is given)."""
    i = 0
    for s in iter_samples(shards, want=None if want_bytes is not None else {"cls"}):
        img_ext = s.image_ext
        if img_ext is None or "cls" not in s.members:
            continue
        label = int(s.members["cls"].decode().strip())
        yield i, s.key, img_ext, s.members[img_ext] if want_bytes is not None and want_bytes(i) else None, label
        i += 1


def scan_labels(src: Source) -> tuple[np.ndarray, list[str]]:
    """Labels and keys of every pair in the source split (first pass; image bytes are not kept)."""
    if src.kind == "wds":
        rows = [(key, lab) for _, key, _, _, lab in _iter_wds(src.files, None)]
        expected = split_counts(src.root / src.split)[1]
        if expected is not None and len(rows) != expected:
            raise UserError(f"the {src.split!r} split of {src.root} holds {len(rows)} labelled photos but its metadata "
                            f"says {expected}; a shard is short or damaged: re-create or re-download the split")
    else:
        dirs = {d: i for i, d in enumerate(sorted({p.relative_to(src.root).parts[0] for p in src.files}))}
        rows = [(str(p.relative_to(src.root)), dirs[p.relative_to(src.root).parts[0]]) for p in src.files]
    if not rows:
        raise UserError(f"the {src.split!r} split of {src.root} holds no (image, label) pairs; check its contents")
    labels = np.asarray([r[1] for r in rows], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= len(src.classnames):
        raise UserError(f"labels in {src.root}/{src.split} run outside 0..{len(src.classnames) - 1}; "
                        "classnames.txt has too few lines for this split")
    return labels, [r[0] for r in rows]


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def safe_names(keys: list[str]) -> list[str]:
    """File stems for source keys, one each: cleaned keys (``_safe_name``), and where two keys clean
    to one stem (``a/b`` and ``a_b``; case-blind, for macOS), or a key repeats, each of them gets its
    source index appended, so no photo overwrites another; a name still taken after that is refused."""
    clean = [_safe_name(k) for k in keys]
    counts = Counter(c.lower() for c in clean)
    names = [c if counts[c.lower()] == 1 else f"{c}-{i}" for i, c in enumerate(clean)]
    if len({n.lower() for n in names}) != len(names):
        raise UserError("the source's keys do not map to distinct file names even with their index appended; "
                        "rename the colliding samples in the source")
    return names


# ---------------------------------------------------------------------------------------------
# The world

def _write_train_shards(tmp: Path, rel: list[str], caps: list[str], labels: np.ndarray, shard_size: int) -> dict:
    """The same pairs as webdataset shards (same image bytes), for open_clip_train at scale."""
    n_shards = -(-len(rel) // shard_size)
    for s in range(n_shards):
        rows = range(s * shard_size, min(len(rel), (s + 1) * shard_size))
        atomic_write_bytes(tmp / "train_wds" / f"{s}.tar", tar_bytes(
            (f"{Path(rel[i]).stem}.{ext}", data) for i in rows
            for ext, data in ((Path(rel[i]).suffix.lstrip("."), (tmp / rel[i]).read_bytes()),
                              ("txt", caps[i].encode()), ("cls", str(int(labels[i])).encode()))))
    return {"pattern": f"train_wds/{{0..{n_shards - 1}}}.tar", "n_shards": n_shards, "n_samples": len(rel)}


def validate(cfg: RealWorldConfig) -> None:
    check_probabilities(cfg, ("noisy_none_share", "p_context", "p_distractor"))
    if cfg.n_train is not None and cfg.n_train < 1:
        raise UserError(f"--n-train must be >= 1, got {cfg.n_train}")
    if cfg.wds_shard_size is not None and cfg.wds_shard_size < 1:
        raise UserError(f"--wds-shard-size must be >= 1, got {cfg.wds_shard_size}")
    if cfg.split == cfg.eval_split:
        # The world points evaluation at the source's eval split: captioning that split would train
        # the victims on the very photos their accuracy is measured on.
        raise UserError(f"--split {cfg.split!r} is the split evaluation reads ({cfg.eval_split!r}); caption a "
                        "disjoint split (--split train) so the victims never train on their eval photos")


def write_real_world(cfg: RealWorldConfig, out: str | Path, overwrite: bool = False,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Build the real-photo world under ``out`` atomically; returns the ``world.json`` dict.

    Everything is validated before anything is written, so bad input leaves no output at all.
    """
    validate(cfg)
    say = progress or (lambda m: None)
    src = open_source(cfg.root, cfg.split)
    lex = load_lexicon(cfg.lexicon, src.classnames)
    say(f"scanning {src.root} ({src.kind}, split {src.split!r})")
    labels_all, keys_all = scan_labels(src)
    n_avail = len(labels_all)
    if cfg.n_train is not None and cfg.n_train > n_avail:
        raise UserError(f"--n-train {cfg.n_train} exceeds the {n_avail} photos of the {src.split!r} split; lower it")
    if cfg.n_train is None:
        chosen = np.arange(n_avail)
    else:  # seeded subset, kept in source order (training shuffles anyway)
        chosen = np.sort(rng_for(cfg.seed, "realworld/subset").choice(n_avail, size=cfg.n_train, replace=False))
    labels = labels_all[chosen]
    caps, kinds = make_real_captions(labels, src.classnames, lex, cfg)

    eval_root, eval_templates = None, []
    if src.kind == "wds" and _sorted_shards(src.root / cfg.eval_split):
        eval_root = str(src.root)
        tp = src.root / "zeroshot_classification_templates.txt"
        eval_templates = [ln.strip() for ln in tp.read_text().splitlines() if ln.strip()] if tp.is_file() else []
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        say(f"copying {len(chosen)} photos (source bytes unchanged)")
        rel: list[str] = [""] * len(chosen)
        pos = {int(j): i for i, j in enumerate(chosen)}
        if src.kind == "wds":
            names = safe_names(keys_all)  # over the whole split: a key's file name never depends on the subset
            for j, key, ext, data, _ in _iter_wds(src.files, lambda j: j in pos):
                if data is not None:
                    rel[pos[j]] = f"train/{names[j]}.{ext}"
                    atomic_write_bytes(tmp / rel[pos[j]], data)
        else:
            for j in chosen:
                p = src.files[int(j)]
                rel[pos[int(j)]] = f"train/{int(j):07d}{p.suffix.lower()}"
                atomic_write_bytes(tmp / rel[pos[int(j)]], p.read_bytes())
        write_csv_rows(tmp / "train.csv", rel, caps)
        shards = _write_train_shards(tmp, rel, caps, labels, cfg.wds_shard_size) if cfg.wds_shard_size else None
        meta = pd.DataFrame({"filepath": rel, "label": labels, "classname": [src.classnames[y] for y in labels],
                             "source_key": [keys_all[int(j)] for j in chosen], "caption_kind": kinds})
        atomic_write_bytes(tmp / "train_labels.csv", meta.to_csv(index=False, lineterminator="\n").encode())
        own = np.mean([bool(label_pattern(src.classnames[y]).search(c)) for c, y in zip(caps, labels)])
        info = {
            "kind": "real",
            "config": asdict(cfg),
            "source": {"kind": src.kind, "root": str(src.root), "split": src.split, "sha256": src.sha256,
                       "n_available": int(n_avail),
                       "hash_covers": "classnames + every shard of the split" if src.kind == "wds"
                       else "class folder names + every image file"},
            "classnames": src.classnames,
            "lexicon": {"path": lex.source, "sha256": lex.sha256, "synonyms": lex.synonyms,
                        "contexts": lex.contexts, "distractors": lex.distractors},
            "caption_templates": list(PHOTO_TEMPLATES),
            "context_only_templates": list(CONTEXT_ONLY_PHOTO),
            "caption_kinds": {k: int(sum(1 for x in kinds if x == k)) for k in CAPTION_KINDS},
            "own_class_word_fraction": float(own),
            "eval_templates": eval_templates,
            "eval_prompt_matches": count_eval_prompt_matches(caps, eval_templates),
            "images": "source bytes copied unchanged (no decode, no re-encode); hashes match the source's",
            "train_csv": "train.csv",
            "train_labels_csv": "train_labels.csv",
            "train_wds": shards,
            "eval_root": eval_root,
            "eval_split": cfg.eval_split if eval_root else None,
            "n_train": int(len(chosen)),
            "label_counts": np.bincount(labels, minlength=len(src.classnames)).tolist(),
            "train_csv_sha256": sha256_file(tmp / "train.csv"),
            "versions": package_versions(),
        }
        atomic_write_json(tmp / "world.json", info)
    return info


__all__ = ["load_lexicon", "make_real_captions", "open_source", "write_real_world", "count_eval_prompt_matches"]
