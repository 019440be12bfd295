"""Loading text-classification data: the paper's poisoned-data format, plain CSV/TSV/JSONL, Hugging Face datasets.

Every loader returns a list of `Sample(text, label, poisoned)`. Bad data fails with a `DataError` that names the file
and the row (1-based line number in the file, the header being line 1), so that a user can open the file and fix it.

The paper's format (its `poison_data/<dataset>/<label>/<attack>/` folders): CSV written by pandas with an unnamed
index column and columns `0,1,2` = text, label, poison flag; a folder holds `train-poison.csv`, `dev-clean.csv`,
`dev-poison.csv`, `test-clean.csv`, `test-poison.csv`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Sample",
    "DataError",
    "load_paper_csv",
    "load_paper_dir",
    "load_table",
    "load_file",
    "load_hf_dataset",
    "check_labels",
    "infer_num_labels",
    "MAX_INFERRED_LABELS",
    "PAPER_FILES",
]

# split name -> file name in the paper's folders
PAPER_FILES = {
    "train": "train-poison.csv",
    "dev": "dev-clean.csv",
    "dev_poison": "dev-poison.csv",
    "test_clean": "test-clean.csv",
    "test_poison": "test-poison.csv",
}


@dataclass(frozen=True)
class Sample:
    text: str
    label: int
    poisoned: bool = False


class DataError(ValueError):
    """A data file that cannot be used as given; the message names the file and the row."""


def _parse_label(value, where: str, label_map: Mapping | None) -> int:
    if label_map is not None:
        key = value if value in label_map else str(value).strip()
        if key not in label_map:
            raise DataError(f"{where}: unknown label {value!r} (expected one of {sorted(map(str, label_map))})")
        return int(label_map[key])
    if isinstance(value, bool):
        raise DataError(f"{where}: unknown label {value!r} (expected an integer class id)")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        label = value
    else:
        text = str(value).strip()
        # int() and float() also read "1_0" as 10 and other scripts' digits ("\u0661" as 1): a class id is written
        # in ASCII digits only
        if not text.isascii() or "_" in text:
            raise DataError(f"{where}: unknown label {value!r} (expected an integer class id in ASCII digits)")
        try:
            label = int(text)
        except ValueError:
            try:  # pandas writes integer columns with missing values as floats: "1.0"
                number = float(text)
            except ValueError:
                number = None
            if number is None or not number.is_integer():
                raise DataError(
                    f"{where}: unknown label {value!r} (expected an integer class id, "
                    f"or pass label_map to name the classes)"
                ) from None
            label = int(number)
    if label < 0:
        raise DataError(f"{where}: unknown label {value!r} (class ids start at 0)")
    return label


def _parse_flag(value, where: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return True
    if text in ("0", "0.0", "false", "no", ""):
        return False
    raise DataError(f"{where}: poison flag {value!r} is not 0/1")


def _make(text, label, flag, where, label_map) -> Sample:
    if text is not None and not isinstance(text, str):  # a JSON list or number is not a text (str() would make one)
        raise DataError(f"{where}: the text is a {type(text).__name__}, expected a string")
    if text is None or not str(text).strip():
        raise DataError(f"{where}: empty text")
    poisoned = _parse_flag(flag, where) if flag is not None else False
    return Sample(str(text), _parse_label(label, where, label_map), poisoned)


def _read_rows(path: str, delimiter: str):
    """(header, [(line number, row dict)]) of a CSV/TSV file; line numbers count physical lines (quoted newlines)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    with _utf8_errors(path), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            raise DataError(f"{path}: the file is empty (expected a header row and data rows)")
        dup = sorted({c for c in header if header.count(c) > 1})
        if dup:  # DictReader would silently keep the last one
            raise DataError(f"{path}, row 1: the header names the column(s) {dup} more than once")
        rows, end = [], 1
        try:
            for row in reader:
                start, end = end + 1, reader.line_num
                _check_fields(path, header, row, start, end)
                rows.append((end, row))
        except csv.Error as e:
            raise DataError(
                f"{path}, row {reader.line_num}: malformed {('TSV' if delimiter == chr(9) else 'CSV')} ({e})"
            ) from None
    if not rows:
        raise DataError(f"{path}: the file has a header but no data rows")
    return header, rows


def _check_fields(path, header, row, start: int, end: int) -> None:
    """A row with fields beyond the header's is refused (DictReader would drop them); a row that runs over several
    lines and still lacks fields is an unclosed quote, reported where the quote opened, not where the file ends."""
    short = any(v is None for v in row.values())
    if end > start and (short or None in row) and any("\n" in v for v in row.values() if isinstance(v, str)):
        raise DataError(
            f"{path}, row {start}: a quoted field opened here is not closed (it runs to row {end}); "
            "check the quotes of this row"
        )
    if None in row:
        raise DataError(
            f"{path}, row {end}: {len(header) + len(row[None])} fields, the header has {len(header)} "
            "(quote fields that contain the delimiter)"
        )


@contextlib.contextmanager
def _utf8_errors(path: str):
    """Turn a UnicodeDecodeError while reading `path` into a DataError naming the file and the row.

    The decoder works on buffered chunks, so the error's offset says nothing about the line; the file is scanned
    again, line by line in binary, to find the first line that is not UTF-8 (only on this error path)."""
    try:
        yield
    except UnicodeDecodeError as e:
        line, column, byte = _first_non_utf8(path)
        where = f"{path}, row {line}" if line else path
        detail = f"byte 0x{byte:02x} at column {column}" if line else e.reason
        raise DataError(f"{where}: not UTF-8 text ({detail}); save the file as UTF-8") from None


def _first_non_utf8(path: str):
    """(1-based line, 1-based byte column, the byte) of the first invalid UTF-8 sequence, or (None, None, None)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return line_no, e.start + 1, raw[e.start]
    return None, None, None


def _need_columns(path: str, header: Sequence[str], columns: Sequence[str]):
    missing = [c for c in columns if c not in header]
    if missing:
        if len(header) < 2:  # not a table at all (e.g. /etc/passwd): say so without quoting the file's content
            raise DataError(
                f"{path}, row 1: missing column(s) {missing} (the first line is not a header of "
                f"named columns; is this a data file?)"
            )
        raise DataError(f"{path}, row 1: missing column(s) {missing} (the header has {list(header)})")


def load_paper_csv(path: str, *, label_map: Mapping | None = None) -> list[Sample]:
    """One file of the paper's format: an unnamed index column, then `0` text, `1` label, `2` poison flag."""
    header, rows = _read_rows(path, ",")
    _need_columns(path, header, ["0", "1"])
    has_flag = "2" in header
    out = []
    for line, row in rows:
        where = f"{path}, row {line}"
        if row.get("1") is None:
            raise DataError(f"{where}: too few fields (expected index, text, label, poison flag)")
        out.append(_make(row["0"], row["1"], row["2"] if has_flag else None, where, label_map))
    return out


def load_paper_dir(
    directory: str, *, label_map: Mapping | None = None, require: Sequence[str] = ("train", "test_clean", "test_poison")
) -> dict[str, list[Sample]]:
    """The paper's folder: a dict with the splits found among PAPER_FILES (the `require`d ones must exist)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such data directory")
    out = {}
    for split, name in PAPER_FILES.items():
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            out[split] = load_paper_csv(path, label_map=label_map)
        elif split in require:
            raise FileNotFoundError(
                f"{directory}: missing {name} (a paper-format folder holds {', '.join(PAPER_FILES.values())})"
            )
    return out


def load_table(
    path: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    poison_column: str | None = None,
    label_map: Mapping | None = None,
    format: str | None = None,
) -> list[Sample]:
    """CSV, TSV or JSONL (one JSON object per line) with named columns; the format follows the file extension
    (.csv, .tsv/.tab, .jsonl/.ndjson) unless `format` ("csv", "tsv", "jsonl") is given."""
    fmt = (format or _format_of(path)).lower()
    if fmt == "jsonl":
        return _load_jsonl(path, text_column, label_column, poison_column, label_map)
    if fmt not in ("csv", "tsv"):
        raise ValueError(f"format: expected 'csv', 'tsv' or 'jsonl', got {format!r}")
    header, rows = _read_rows(path, "\t" if fmt == "tsv" else ",")
    _need_columns(path, header, [text_column, label_column] + ([poison_column] if poison_column else []))
    out = []
    for line, row in rows:
        where = f"{path}, row {line}"
        if row.get(label_column) is None:
            raise DataError(f"{where}: too few fields (expected the columns {list(header)})")
        flag = row[poison_column] if poison_column else None
        out.append(_make(row[text_column], row[label_column], flag, where, label_map))
    return out


def _format_of(path: str) -> str:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a data file (a paper-format folder is given with --data)")
    ext = os.path.splitext(path)[1].lower()
    formats = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
    if ext not in formats:
        raise DataError(
            f"{path}: cannot tell the format from the extension {ext!r}; use .csv, .tsv or .jsonl, or pass format="
        )
    return formats[ext]


def _load_jsonl(path, text_column, label_column, poison_column, label_map) -> list[Sample]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    out = []
    with _utf8_errors(path), open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, row {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
                raise DataError(f"{where}: a number of more than {sys.get_int_max_str_digits()} digits") from None
            except RecursionError:
                raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for col in [text_column, label_column] + ([poison_column] if poison_column else []):
                if col not in obj:
                    raise DataError(f"{where}: missing column {col!r} (the object has {sorted(obj)})")
            flag = obj[poison_column] if poison_column else None
            out.append(_make(obj[text_column], obj[label_column], flag, where, label_map))
    if not out:
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")
    return out


def load_file(path: str, **kwargs) -> list[Sample]:
    """Any supported file: the paper's CSV when its header is the paper's (`,0,1,2`), else `load_table`."""
    if _format_of(path) == "csv" and not kwargs.get("format") and "text_column" not in kwargs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file")
        with _utf8_errors(path), open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        if "0" in header and "1" in header and "text" not in header:
            return load_paper_csv(path, label_map=kwargs.get("label_map"))
    return load_table(path, **kwargs)


def load_hf_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    text_column: str = "text",
    label_column: str = "label",
    poison_column: str | None = None,
    label_map: Mapping | None = None,
    **load_kwargs,
) -> list[Sample]:
    """A Hugging Face `datasets` split: a hub name (e.g. "sst2"), a folder saved with `save_to_disk`, or a local
    data folder `load_dataset` understands. Needs the optional `datasets` package."""
    try:
        import datasets
    except ImportError:
        raise ImportError("load_hf_dataset needs the Hugging Face `datasets` package: pip install datasets") from None
    if os.path.isdir(name_or_path) and (
        os.path.isfile(os.path.join(name_or_path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(name_or_path, "state.json"))
    ):
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name_or_path}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    where0 = f"{name_or_path}[{split}]"
    for col in [text_column, label_column] + ([poison_column] if poison_column else []):
        if col not in ds.column_names:
            raise DataError(f"{where0}, row 1: missing column {col!r} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataError(f"{where0}: the split is empty")
    out = []
    for i, row in enumerate(ds):
        flag = row[poison_column] if poison_column else None
        out.append(_make(row[text_column], row[label_column], flag, f"{where0}, row {i + 1}", label_map))
    return out


def check_labels(samples: Sequence[Sample], num_labels: int, name: str) -> None:
    """Every label must be a class id of the model: 0 <= label < num_labels."""
    if not samples:
        raise DataError(f"{name}: no samples")
    bad = sorted({s.label for s in samples if not 0 <= s.label < num_labels})
    if bad:
        raise DataError(
            f"{name}: unknown label(s) {bad} for a model with {num_labels} labels (expected 0..{num_labels - 1})"
        )


# More classes than this are almost surely a broken label column (e.g. ids or prices), and the classifier head the
# inferred count asks for (hidden x labels) could exhaust memory: above it, num_labels must be given explicitly.
MAX_INFERRED_LABELS = 1000


def infer_num_labels(splits: Mapping[str, Sequence[Sample]], *, limit: int = MAX_INFERRED_LABELS) -> int:
    """The number of classes the data implies (largest label + 1, at least 2), refusing more than `limit`."""
    largest, where = -1, None
    for name, samples in splits.items():
        for s in samples:
            if s.label > largest:
                largest, where = s.label, name
    n = max(2, largest + 1)
    if n > limit:
        raise DataError(
            f"{where}: the largest label is {largest}, which would make a {n}-class classifier (more "
            f"than {limit}); class ids must be 0..N-1 -- fix the label column, or pass num_labels "
            f"explicitly (--num-labels N)"
        )
    return n
