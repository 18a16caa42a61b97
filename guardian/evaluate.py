"""Score a labelled prompt file with the judges: `python -m guardian.evaluate --data FILE`.

The file is a CSV or TSV with a `prompt` column and a `label` column (0/1 or safe/unsafe),
grouped by a `dataset` column where present. For each judge and group it reports n, accuracy,
precision, recall, false-positive rate, F1 and AUPRC at threshold 0.5. The batch page of the app
uses the same functions, so both give identical numbers for the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import numpy as np
import pandas as pd

from guardian.datasets import DataError, parse_label, read_prompt_table
from guardian.judge import Judge, JudgeError
from guardian.metrics import THRESHOLD, binary_metrics
from guardian.scoring import Progress, score_prompts

ALL = "all"
METRIC_COLUMNS = ("n", "accuracy", "precision", "recall", "fpr", "f1", "auprc")


def labelled_prompts(frame: pd.DataFrame, prompt_column: str = "prompt", label_column: str = "label",
                     group_column: str | None = "dataset") -> pd.DataFrame:
    """Columns prompt, label (0/1) and group, with clear errors for missing columns, unknown labels, empty rows."""
    missing = [c for c in (prompt_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"The file has no {' or '.join(repr(c) for c in missing)} column "
                        f"(columns found: {', '.join(map(str, frame.columns))}).")
    prompts = frame[prompt_column].astype(str)
    empty = prompts.str.strip() == ""
    if empty.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(empty.to_numpy())[:5])
        raise DataError(f"{int(empty.sum())} row(s) have an empty prompt (file lines {rows}…).")
    labels = []
    for i, value in enumerate(frame[label_column]):
        try:
            labels.append(parse_label(value))
        except DataError as exc:
            raise DataError(f"Line {i + 2}: {exc}") from None
    groups = frame[group_column].astype(str) if group_column and group_column in frame.columns else ALL
    return pd.DataFrame({"prompt": prompts.to_numpy(), "label": labels, "group": groups})


def score_judges(judges: dict[str, Judge], prompts: list[str],
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, np.ndarray]:
    """p(unsafe) per judge for the prompts, in order."""
    out = {}
    for name, judge in judges.items():
        step: Progress | None = (lambda done, total, n=name: progress(n, done, total)) if progress else None
        out[name] = score_prompts(judge, prompts, progress=step).p_unsafe
    return out


def group_metrics(labels: np.ndarray, p_unsafe: np.ndarray, groups: np.ndarray,
                  threshold: float = THRESHOLD) -> dict[str, dict]:
    """Metrics per group (and over all rows when there is more than one group)."""
    result = {}
    names = list(dict.fromkeys(groups.tolist()))
    for group in names:
        mask = groups == group
        result[group] = binary_metrics(labels[mask], p_unsafe[mask], threshold)
    if len(names) > 1:
        result[ALL] = binary_metrics(labels, p_unsafe, threshold)
    return result


def evaluate(judges: dict[str, Judge], table: pd.DataFrame, threshold: float = THRESHOLD,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, dict]]:
    """`{judge: {group: metrics}}` for a table from `labelled_prompts`."""
    scores = score_judges(judges, table["prompt"].tolist(), progress)
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    return {name: group_metrics(labels, p, groups, threshold) for name, p in scores.items()}


def results_frame(results: dict[str, dict[str, dict]]) -> pd.DataFrame:
    rows = [{"judge": judge, "group": group, **metrics} for judge, groups in results.items() for group, metrics in groups.items()]
    return pd.DataFrame(rows, columns=["judge", "group", *METRIC_COLUMNS])


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table; numbers to three decimals, missing values as '–'."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _load(args) -> dict[str, Judge]:
    from guardian.loading import load_base_judge, load_lora_judge

    base = load_base_judge(args.model)
    judges = {"base": base} if args.judge in ("base", "both") else {}
    if args.judge in ("lora", "both"):
        judges["lora"] = load_lora_judge(base, args.adapter)
    return judges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardian.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CSV or TSV with prompt and label columns")
    parser.add_argument("--judge", choices=["base", "lora", "both"], default="both")
    parser.add_argument("--model", help="model folder or hub id replacing the bundled base judge")
    parser.add_argument("--adapter", help="peft adapter folder for the LoRA judge")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table (for the docs)")
    args = parser.parse_args(argv)
    try:
        table = labelled_prompts(read_prompt_table(args.data, max_rows=1_000_000, max_bytes=2**31))
        judges = _load(args)
    except (DataError, JudgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(judges, table)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.markdown:
        print(markdown_table(results_frame(results)))
    else:
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(results_frame(results).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
