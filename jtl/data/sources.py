"""Reading rows from local files (txt, JSONL, JSON, Parquet, CSV) or Hugging Face datasets.

Every row keeps where it came from (file and 1-based line/row), so errors about
bad data can name them.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """Bad input data; the message names the file (or dataset) and row."""


@dataclass(frozen=True)
class Row:
    data: dict
    where: str  # "path:line" or "dataset[split]#i"


LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".tsv")


def _files(source: str) -> list[Path] | None:
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{source}: folder has no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if any(c in source for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(source))
        if not files:
            raise DataError(f"{source}: glob matched no files")
        return files
    if p.suffix in LOCAL_SUFFIXES or os.sep in source and not _looks_like_hub_name(source):
        raise DataError(f"{source}: file not found")
    return None


def _looks_like_hub_name(source: str) -> bool:
    parts = source.split("/")
    return len(parts) <= 2 and not source.startswith((".", "/")) and not Path(parts[0]).exists()


def _utf8(data: bytes, path: Path, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data[:e.start].count(b"\n") + 1
        where = f"{path}:{at}"
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                        f"{'line' if line is not None else 'file'}); re-encode the file as UTF-8") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; a bad byte is an error naming the line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            yield i, _utf8(raw, path, i)


def _read_file(path: Path, text_field: str) -> Iterator[Row]:
    suffix = path.suffix
    if suffix == ".txt":
        for i, line in _lines(path):
            if line.strip():
                yield Row({text_field: line.rstrip("\r\n")}, f"{path}:{i}")
    elif suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            first = f.read(1)
        if suffix == ".json" and first == b"[":
            try:
                rows = json.loads(_utf8(path.read_bytes(), path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON: {e}") from None
            for i, obj in enumerate(rows, 1):
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: item {i} is not a JSON object")
                yield Row(obj, f"{path}#{i}")
            return
        for i, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON "
                                f"object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield Row(obj, f"{path}:{i}")
    elif suffix in (".parquet", ".csv", ".tsv"):
        import datasets
        kind = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}[suffix]
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # malformed CSV, bad Parquet footer, bad encoding...
            msg = " ".join(str(e).split())[:400]
            raise DataError(f"{path}: could not read it as {suffix[1:].upper()}: {type(e).__name__}: {msg}") from None
        for i, obj in enumerate(ds, 1):
            yield Row(obj, f"{path}#{i}")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def _read_hub(name: str, split: str, hf_config: str | None) -> Iterator[Row]:
    import datasets
    try:
        ds = datasets.load_dataset(name, hf_config, split=split)
    except Exception as e:  # offline, unknown name, unknown split...
        raise DataError(f"could not load Hugging Face dataset {name!r} (config {hf_config!r}, "
                        f"split {split!r}): {type(e).__name__}: {str(e)[:300]}. Offline? A local "
                        f"file or folder (JSONL/Parquet/CSV/txt) works too.") from None
    for i, obj in enumerate(ds):
        yield Row(dict(obj), f"{name}[{split}]#{i}")


def read_rows(source: str, *, split: str = "train", text_field: str = "text",
              hf_config: str | None = None, limit: int | None = None) -> list[Row]:
    """All rows of a local file/folder/glob, or of one split of a HF dataset."""
    files = _files(source)
    it = (r for f in files for r in _read_file(f, text_field)) if files else \
        _read_hub(source, split, hf_config)
    rows = []
    for r in it:
        rows.append(r)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def get_text(row: Row, field: str) -> str:
    if field not in row.data:
        raise DataError(f"{row.where}: missing field {field!r} (row has {sorted(row.data)})")
    value = row.data[field]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = " ".join(value)
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {field!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{row.where}: field {field!r} is empty")
    return value
