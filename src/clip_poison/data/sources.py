"""The training data an attack reads: an OpenCLIP CSV or img2dataset webdataset shards.

Both give the same small interface (row count, streamed captions, images of chosen rows), so the
attacks never load the dataset whole: captions go into a ``CaptionIndex`` once and only the few
rows an attack needs are decoded. Rows are numbered in file order (CSV rows; shards in pattern
order, samples in tar order); the manifest's ``base_index`` and ``replaces`` use these numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .captions import CaptionIndex, template_captions
from .csvdata import CAPTION_KEY, IMG_KEY, CsvDataset, check_paths_inside, separator_hint
from .wds import expand_shards, is_wds_spec, iter_samples
from ..io import UserError, load_image, sha256_file

BATCH = 1 << 18


class CsvTrainingData:
    """An OpenCLIP CSV read column-wise with pyarrow (3M rows in about a second)."""

    kind = "csv"

    def __init__(self, csv_path: str | Path, img_key: str = IMG_KEY, caption_key: str = CAPTION_KEY, sep: str = ","):
        import pyarrow.csv as pacsv

        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise UserError(f"dataset CSV not found: {self.csv_path}; pass the CSV written by "
                            "`clip-poison world` or your own OpenCLIP CSV (columns filepath,title)")
        try:
            cols = list(pd.read_csv(self.csv_path, sep=sep, nrows=0).columns)
        except Exception as e:
            raise UserError(f"could not parse {self.csv_path} as CSV ({e}); check --csv-separator") from None
        missing = [k for k in (img_key, caption_key) if k not in cols]
        if missing:
            raise UserError(f"{self.csv_path} has no column(s) {missing} (columns are {cols}); "
                            f"pass --csv-img-key/--csv-caption-key to name yours{separator_hint(cols)}")
        try:
            t = pacsv.read_csv(self.csv_path, parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(
                                   include_columns=[img_key, caption_key],
                                   column_types={img_key: pa.string(), caption_key: pa.string()},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False))
        except pa.ArrowInvalid as e:
            raise UserError(f"could not parse {self.csv_path} as CSV ({e}); check --csv-separator and quoting") from None
        if t.num_rows == 0:
            raise UserError(f"{self.csv_path} has no rows; a dataset needs at least one image–caption pair")
        self.paths, self.captions = t.column(img_key), t.column(caption_key)
        # Only paths containing '..' can leave the folder: a vectorised pre-filter, then the exact check.
        check_paths_inside(self.paths.filter(pc.match_substring(self.paths, "..")).to_pylist(), self.csv_path)
        self.base = self.csv_path.parent.resolve()
        self._index: CaptionIndex | None = None

    @classmethod
    def from_dataset(cls, ds: CsvDataset) -> "CsvTrainingData":
        self = cls.__new__(cls)
        self.csv_path, self.base, self._index = ds.csv_path, Path(ds.csv_path).parent.resolve(), None
        self.paths = pa.chunked_array([pa.array(ds.paths, type=pa.string())])
        self.captions = pa.chunked_array([pa.array(ds.captions, type=pa.string())])
        return self

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, row: int) -> Path:
        p = Path(self.paths[int(row)].as_py())
        return p if p.is_absolute() else self.base / p

    def ref(self, row: int) -> str:
        return Path(self.paths[int(row)].as_py()).name

    def caption_batches(self) -> Iterator[pa.Array]:
        yield from self.captions.chunks

    def load_rows(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        return {int(r): load_image(self.path(r)) for r in rows}

    def fingerprint(self) -> dict:
        return {"kind": "csv", "csv": str(self.csv_path), "csv_sha256": sha256_file(self.csv_path), "n_rows": len(self)}

    def describe(self) -> dict:
        return self.fingerprint()


class WdsTrainingData:
    """img2dataset webdataset shards, streamed; one pass over the ``.txt`` members counts rows and
    collects captions, later passes open only the shards holding requested rows."""

    kind = "wds"

    def __init__(self, pattern: str | Path):
        self.pattern = str(pattern)
        self.shards = expand_shards(pattern)
        self._counts: list[int] | None = None
        self._keys: list[str] = []
        self._batches: list[pa.Array] | None = None
        self._index: CaptionIndex | None = None

    def _scan(self) -> list[pa.Array]:
        if self._batches is not None:
            return self._batches
        batches, counts, buf = [], [], []
        self._keys = []
        for shard in self.shards:
            n = 0
            for s in iter_samples([shard], want={"txt"}):
                buf.append(s.caption)
                self._keys.append(s.key)
                n += 1
                if len(buf) >= BATCH:
                    batches.append(pa.array(buf, type=pa.string()))
                    buf = []
            counts.append(n)
        if buf:
            batches.append(pa.array(buf, type=pa.string()))
        if sum(counts) == 0:
            raise UserError(f"the shards {self.pattern!r} hold no samples; point --data at img2dataset output")
        self._counts, self._batches = counts, batches  # the index keeps these same arrays, no copy
        return batches

    def caption_batches(self) -> Iterator[pa.Array]:
        yield from self._scan()

    def __len__(self) -> int:
        if self._counts is None:
            self._scan()
        return sum(self._counts)

    def _locate(self, row: int) -> tuple[int, int]:
        len(self)
        starts = np.cumsum([0] + self._counts)
        s = int(np.searchsorted(starts, row, side="right") - 1)
        return s, row - int(starts[s])

    def ref(self, row: int) -> str:
        s, _ = self._locate(row)
        return f"{self.shards[s].name}:{self._keys[int(row)]}"

    def load_rows(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        want = sorted(int(r) for r in rows)
        by_shard: dict[int, set[int]] = {}
        for r in want:
            s, off = self._locate(r)
            by_shard.setdefault(s, set()).add(off)
        out = {}
        starts = np.cumsum([0] + self._counts)
        for s, offs in sorted(by_shard.items()):
            for i, sample in enumerate(iter_samples([self.shards[s]])):
                if i in offs:
                    out[int(starts[s]) + i] = sample.image()
        return out

    def fingerprint(self) -> dict:
        # Size + name per shard: hashing terabytes of shards on every run would cost more than the attack.
        return {"kind": "wds", "pattern": self.pattern,
                "shards": [[p.name, p.stat().st_size] for p in self.shards]}

    def describe(self) -> dict:
        return {**self.fingerprint(), "n_rows": len(self)}


TrainingData = CsvTrainingData | WdsTrainingData


def open_training_data(data, img_key: str = IMG_KEY, caption_key: str = CAPTION_KEY, sep: str = ",") -> TrainingData:
    """A CSV path, a webdataset spec ('dir/{0..9}.tar' or a folder of shards), a ``CsvDataset``
    (the in-memory reader), or an already-open training data object."""
    if isinstance(data, (CsvTrainingData, WdsTrainingData)):
        return data
    if isinstance(data, CsvDataset):
        return CsvTrainingData.from_dataset(data)
    if is_wds_spec(data):
        return WdsTrainingData(data)
    return CsvTrainingData(data, img_key, caption_key, sep)


def caption_index(train: TrainingData, path: str | Path | None = None) -> CaptionIndex:
    """The training captions as a ``CaptionIndex``, built once (streaming) and reused: from
    ``path`` when it was built from the same source, else built and, with ``path``, saved there."""
    if train._index is not None:
        return train._index
    fp = train.fingerprint()
    if path is not None:
        roots = [train.csv_path.parent] if isinstance(train, CsvTrainingData) else [s.parent for s in train.shards]
        target = Path(path).resolve()
        if any(target.is_relative_to(r.resolve()) for r in roots):
            raise UserError(f"--caption-index {path} is inside the dataset folder; the dataset is never written to, "
                            "so put the index elsewhere (e.g. next to --out)")
    if path is not None and Path(path).is_file():
        idx = CaptionIndex.load(path)
        if idx.fingerprint == fp:
            train._index = idx
            if isinstance(train, WdsTrainingData) and train._counts is None:
                train._scan()  # row → shard map; captions already indexed
            return idx
    idx = CaptionIndex.build(train.caption_batches(), fp)
    if path is not None:
        idx.save(path)
    train._index = idx
    return idx


# Caption mining, shared by the three attacks (§3.1 caption sets).

def mined_rows(train, label: str, synonyms=(), index_path=None) -> np.ndarray:
    """Training rows whose caption contains the label (or a synonym) as a whole word."""
    return caption_index(open_training_data(train), index_path).rows(label, tuple(synonyms))


def caption_set(source: str, label: str, train, synonyms=(), index_path=None, has_templates: bool = True) -> list[str]:
    """The caption set for y' (§3.1): "mined" = every training caption containing the label or a
    synonym as a whole word; "templates" = CLIP's 80 ImageNet prompts filled with the label.
    ``has_templates``: whether the command has --caption-source (the backdoor has not)."""
    if source == "mined":
        train = open_training_data(train)
        rows = mined_rows(train, label, synonyms, index_path)
        if len(rows) == 0:
            raise UserError(f"no training caption contains the label {label!r}"
                            f"{' or a synonym ' + repr(list(synonyms)) if synonyms else ''} as a whole word, so the "
                            "mined caption set is empty; pick a label that occurs in the captions or add --synonyms"
                            + (", or use --caption-source templates" if has_templates else ""))
        return caption_index(train).take(rows)
    if source == "templates":
        return template_captions(label)
    raise UserError(f"unknown caption source {source!r}; use 'mined' or 'templates'")
