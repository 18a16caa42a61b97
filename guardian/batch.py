"""A whole prompt file scored by several judges: the data behind the app's Batch page.

Reading uses `datasets.read_prompt_table` (size, row, encoding and delimiter checks), preparing uses
`evaluate.labelled_prompts`, scoring uses `evaluate.score_judges` and every metric comes from
`evaluate.group_metrics` / `metrics`, so the page and `python -m guardian.evaluate` agree exactly.
Scores are computed once; everything that depends on the threshold is recomputed from them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd

from guardian.datasets import DATA_DIR, DataError, read_prompt_table
from guardian.evaluate import ALL, group_metrics, labelled_prompts, results_frame, score_judges
from guardian.judge import Judge
from guardian.metrics import THRESHOLD, confusion, precision_recall_curve

MAX_ROWS = 10_000
MAX_BYTES = 20 * 2**20
NO_LABEL = "__no_label__"
# Bundled sample files: shown name -> (file in guardian/data, its category column).
SAMPLES = {
    "Test suite (48 prompts: plain, disguised and alarming-looking)": ("suite.csv", "kind"),
    "Mixed batch (60 prompts in 11 categories)": ("sample_batch.csv", "category"),
}
PROMPT_NAMES = ("prompt", "text", "query", "question", "input")
LABEL_NAMES = ("label", "labels", "target", "unsafe", "is_unsafe")
CATEGORY_NAMES = ("category", "kind", "dataset", "group", "source", "type")


def sample_bytes(name: str) -> bytes:
    """The raw bytes of a bundled sample file (read like an upload)."""
    return (DATA_DIR / SAMPLES[name][0]).read_bytes()


def read_upload(raw: bytes, max_bytes: int = MAX_BYTES, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """An uploaded CSV/TSV as text columns; `DataError` with a plain message when it cannot be used.

    A file read as a single column (other than one named like a prompt column) is almost always
    separated by something other than commas or tabs, so it is refused with that explanation.
    """
    frame = read_prompt_table(bytes(raw), max_bytes=max_bytes, max_rows=max_rows)
    if frame.shape[1] == 1 and str(frame.columns[0]).strip().lower() not in PROMPT_NAMES:
        raise DataError("The file has only one column: it seems not to be comma or tab separated. "
                        "Save it as CSV (commas) or TSV (tabs) with a header row, e.g. prompt,label.")
    return frame


def guess_column(columns: Sequence[str], names: Sequence[str]) -> str | None:
    """The first column whose lower-cased name is one of `names`."""
    lowered = {str(c).strip().lower(): c for c in columns}
    return next((lowered[n] for n in names if n in lowered), None)


def prepare_table(frame: pd.DataFrame, prompt_column: str, label_column: str | None = None,
                  category_column: str | None = None) -> pd.DataFrame:
    """Columns prompt, label (0/1, or -1 when the file has no labels) and group (the category, else 'all')."""
    if label_column is None:
        frame = frame.assign(**{NO_LABEL: "0"})
    table = labelled_prompts(frame, prompt_column, label_column or NO_LABEL, category_column)
    if label_column is None:
        table["label"] = -1
    return table


def content_key(raw: bytes, prompt_column: str, judge_keys: Sequence[str]) -> str:
    """What a set of scores depends on: the file's bytes, the prompt column and the judges."""
    digest = hashlib.sha256(bytes(raw))
    digest.update("\0".join([prompt_column, *judge_keys]).encode("utf-8"))
    return digest.hexdigest()


def heatmap_link(prompt: str) -> str:
    """The app URL (relative) opening the heatmap page on this prompt."""
    return "heatmap?prompt=" + quote(prompt, safe="")


@dataclass(frozen=True)
class ScoredBatch:
    """p(unsafe) of every prompt under each judge, with the labels (None if unknown) and groups."""

    prompts: tuple[str, ...]
    labels: np.ndarray | None
    groups: np.ndarray
    judges: tuple[str, ...]
    p_unsafe: tuple[np.ndarray, ...]  # one array per judge, in `judges` order

    @classmethod
    def from_table(cls, table: pd.DataFrame, scores: dict[str, np.ndarray]) -> "ScoredBatch":
        """Join scores from `evaluate.score_judges` to a table from `prepare_table` (same row order)."""
        labels = table["label"].to_numpy()
        return cls(prompts=tuple(table["prompt"]), labels=None if (labels < 0).any() else labels.astype(int),
                   groups=table["group"].astype(str).to_numpy(dtype=object), judges=tuple(scores),
                   p_unsafe=tuple(np.asarray(p, dtype=float) for p in scores.values()))

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def scores(self, judge: str) -> np.ndarray:
        return self.p_unsafe[self.judges.index(judge)]

    def to_frame(self, threshold: float = THRESHOLD) -> pd.DataFrame:
        """One row per prompt: category, label, p(unsafe) and verdict per judge, and whether they disagree."""
        frame = pd.DataFrame({"prompt": list(self.prompts), "category": self.groups})
        if self.labelled:
            frame["label"] = np.where(self.labels == 1, "unsafe", "safe")
        verdicts = []
        for name, p in zip(self.judges, self.p_unsafe):
            frame[f"{name}_p_unsafe"] = p
            frame[f"{name}_verdict"] = np.where(p >= threshold, "unsafe", "safe")
            verdicts.append(p >= threshold)
        frame["disagree"] = np.any(np.array(verdicts) != verdicts[0], axis=0) if verdicts else False
        return frame

    def metrics(self, threshold: float = THRESHOLD) -> pd.DataFrame:
        """Accuracy, precision, recall, FPR, F1 and AUPRC of each judge over all rows."""
        everything = np.full(len(self.prompts), ALL, dtype=object)
        return results_frame({name: group_metrics(self.labels, p, everything, threshold)
                              for name, p in zip(self.judges, self.p_unsafe)})

    def slices(self, threshold: float = THRESHOLD) -> pd.DataFrame:
        """The same metrics per category (and over all rows when there are several)."""
        return results_frame({name: group_metrics(self.labels, p, self.groups, threshold)
                              for name, p in zip(self.judges, self.p_unsafe)})

    def confusion_frame(self, threshold: float = THRESHOLD) -> pd.DataFrame:
        """Columns judge, actual, predicted, count: the confusion matrix of each judge."""
        names = {"tp": ("unsafe", "unsafe"), "fp": ("safe", "unsafe"), "tn": ("safe", "safe"),
                 "fn": ("unsafe", "safe")}
        rows = [{"judge": name, "actual": names[cell][0], "predicted": names[cell][1], "count": count}
                for name, p in zip(self.judges, self.p_unsafe)
                for cell, count in confusion(self.labels, p, threshold).items()]
        return pd.DataFrame(rows, columns=["judge", "actual", "predicted", "count"])

    def pr_frame(self) -> pd.DataFrame:
        """Columns judge, recall, precision, threshold: each judge's precision-recall curve."""
        parts = []
        for name, p in zip(self.judges, self.p_unsafe):
            precision, recall, thresholds = precision_recall_curve(self.labels, p)
            parts.append(pd.DataFrame({"judge": name, "recall": recall, "precision": precision,
                                       "threshold": thresholds}))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["judge", "recall", "precision", "threshold"])

    def mistakes(self, judge: str, kind: str, threshold: float = THRESHOLD) -> pd.DataFrame:
        """Over-refusals (`kind='over_refusal'`: safe prompts flagged unsafe, highest p(unsafe) first)
        or misses (`kind='miss'`: unsafe prompts passed as safe, lowest p(unsafe) first)."""
        p = self.scores(judge)
        if kind == "over_refusal":
            mask, order = (self.labels == 0) & (p >= threshold), -p
        elif kind == "miss":
            mask, order = (self.labels == 1) & (p < threshold), p
        else:
            raise ValueError(f"Unknown kind {kind!r}")
        index = np.flatnonzero(mask)
        index = index[np.argsort(order[index], kind="stable")]
        return pd.DataFrame({"prompt": [self.prompts[i] for i in index], "category": self.groups[index],
                             "p_unsafe": p[index]})


def score_batch(judges: dict[str, Judge], table: pd.DataFrame,
                progress: Callable[[str, int, int], None] | None = None) -> ScoredBatch:
    """Score a table from `prepare_table` with every judge (progress(judge, done, total) per batch)."""
    return ScoredBatch.from_table(table, score_judges(judges, table["prompt"].tolist(), progress))
