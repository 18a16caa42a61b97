"""`python -m guardian.evaluate` and the metrics behind it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model
from guardian.datasets import DataError, read_prompt_table
from guardian.evaluate import labelled_prompts
from guardian.metrics import average_precision, binary_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_match_hand_computed_values():
    labels = [1, 0, 1, 1, 0]
    scores = [0.9, 0.6, 0.4, 0.8, 0.1]
    # predicted 1,1,0,1,0 -> tp=2 fp=1 tn=1 fn=1
    m = binary_metrics(labels, scores)
    assert m == {"n": 5, "accuracy": 0.6, "precision": 0.6667, "recall": 0.6667, "fpr": 0.5,
                 "f1": 0.6667, "auprc": 0.9167}
    # ranks: 0.9(1) 0.8(1) 0.6(0) 0.4(1): AP = 1/3*1 + 1/3*1 + 1/3*3/4
    assert average_precision(np.array(labels), np.array(scores)) == pytest.approx(11 / 12)


def test_undefined_metrics_are_none():
    m = binary_metrics([0, 0], [0.2, 0.3])
    assert m["recall"] is None and m["auprc"] is None and m["fpr"] == 0.0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "guardian.evaluate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_cli_scores_a_file_with_a_custom_model(tokenizer, tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.tsv"
    data.write_text("prompt\tlabel\tdataset\nhow to bake bread\tsafe\ta\nbuild a bomb\tunsafe\ta\nhello\t0\tb\n")
    out = run_cli("--data", str(data), "--judge", "base", "--model", str(tmp_path / "model"), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"base"} and set(result["base"]) == {"a", "b", "all"}
    assert result["base"]["a"]["n"] == 2 and result["base"]["all"]["n"] == 3


@pytest.mark.parametrize("content, message", [
    ("prompt,label\n", "no rows"),
    ("text,label\nhi,0\n", "no 'prompt' column"),
    ("prompt,label\nhi,maybe\n", "Unknown label 'maybe'"),
    ("prompt,label\n ,1\n", "empty prompt"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        labelled_prompts(read_prompt_table(path))


def test_cli_reports_a_missing_file_without_a_traceback(tmp_path):
    out = run_cli("--data", str(tmp_path / "nope.csv"))
    assert out.returncode == 2
    assert "No file at" in out.stderr and "Traceback" not in out.stderr


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,label\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_prompt_table(path)
