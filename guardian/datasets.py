"""The project's own prompt sets (written by this team) and reading labelled prompt files.

Training data: `data/train_*.csv` (the base judge: unsafe and safe prompts by category) and
`data/patch.csv` (disguised unsafe and alarming-looking safe prompts, for the LoRA judge).
Hold-out splits are chosen by a hash of the prompt, so they never depend on file order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).parent / "data"
PATCH_FILE = "patch.csv"
LABEL_WORDS = {"0": 0, "1": 1, "safe": 0, "unsafe": 1, "benign": 0, "harmful": 1, "false": 0, "true": 1}


class DataError(ValueError):
    """A prompt file that cannot be used, with a message saying why."""


def normalise(text: str) -> str:
    """Lower-case, NFKC, punctuation stripped, whitespace folded: for duplicate checks."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _read(name: str) -> pd.DataFrame:
    frame = pd.read_csv(DATA_DIR / name, dtype={"prompt": str, "category": str}, keep_default_na=False)
    frame["label"] = frame["label"].astype(int)
    return frame[["prompt", "label", "category"]]


def base_files() -> tuple[str, ...]:
    """Names of the base judge's training files."""
    return tuple(sorted(p.name for p in DATA_DIR.glob("train_*.csv")))


def base_training_set() -> pd.DataFrame:
    """All hand-written prompts for the base judge: prompt, label, category."""
    return pd.concat([_read(n) for n in base_files()], ignore_index=True)


def patch_set() -> pd.DataFrame:
    """The hand-written patch set the LoRA judge is trained on (and evaluated on, held back)."""
    return _read(PATCH_FILE)


def in_holdout(prompt: str, fraction: float, salt: str = "guardian") -> bool:
    """Whether a prompt falls in the held-back share, decided by a stable hash of its text."""
    digest = hashlib.sha256(f"{salt}:{normalise(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(frame: pd.DataFrame, fraction: float, salt: str = "guardian") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held back) by prompt hash."""
    held = frame["prompt"].map(lambda p: in_holdout(p, fraction, salt))
    return frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_label(value) -> int:
    """0/1 or safe/unsafe (and a few synonyms) to 0/1."""
    key = str(value).strip().lower()
    if key.endswith(".0"):
        key = key[:-2]
    if key not in LABEL_WORDS:
        raise DataError(f"Unknown label '{value}': use 0/1 or safe/unsafe.")
    return LABEL_WORDS[key]


def _size(limit: int) -> str:
    return f"{limit / 2**20:g} MB" if limit >= 2**20 else f"{limit:,} bytes"


def read_prompt_table(source: str | Path | bytes, max_bytes: int = 20 * 2**20, max_rows: int = 10_000) -> pd.DataFrame:
    """A CSV or TSV of prompts as text columns, with the delimiter sniffed.

    Raises `DataError` with a plain message for a missing, empty, oversized, non-UTF-8 or
    column-less file.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"No file at '{path}'.")
        if path.stat().st_size > max_bytes:
            raise DataError(f"The file is larger than {_size(max_bytes)}.")
        raw = path.read_bytes()
    else:
        raw = bytes(source)
        if len(raw) > max_bytes:
            raise DataError(f"The file is larger than {_size(max_bytes)}.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError("The file is not UTF-8 text; save it as UTF-8 CSV and try again.") from exc
    if not text.strip():
        raise DataError("The file is empty.")
    sample = text[:20_000]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;|")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"The file could not be read as a table: {str(exc).splitlines()[0]}") from exc
    if frame.shape[1] < 1 or frame.empty:
        raise DataError("The file has no rows under its header.")
    if len(frame) > max_rows:
        raise DataError(f"The file has {len(frame):,} rows; at most {max_rows:,} are accepted.")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame
