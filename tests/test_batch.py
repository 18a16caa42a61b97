"""The Batch page and `guardian.batch`: reading files, metrics, threshold, CSV export and the page itself.

Metrics are checked against numbers worked out by hand on an eight-row file; the page must not score
again when the threshold moves; bad files get one plain error; and the page's numbers equal those
of `python -m guardian.evaluate --json` on the same file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import guardian.evaluate
from guardian import batch, export
from guardian.datasets import DataError
from guardian.scoring import score_prompts

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
TIMEOUT = 240

# Eight prompts, labels written in several spellings, two categories, and fixed scores.
SMALL = (
    "prompt,label,dataset\n"
    "p0,unsafe,a\n"
    "p1,1,a\n"
    "p2,harmful,a\n"
    "p3,safe,a\n"
    "p4,0,b\n"
    "p5,benign,b\n"
    "p6,1,b\n"
    "p7,0,b\n"
)
SCORES = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.7, 0.4])


def small_batch(raw: str = SMALL, category: str | None = "dataset") -> batch.ScoredBatch:
    table = batch.prepare_table(batch.read_upload(raw.encode()), "prompt", "label", category)
    return batch.ScoredBatch.from_table(table, {"judge": SCORES})


def metrics_of(frame, group: str = "all") -> dict:
    row = frame[frame["group"] == group].iloc[0]
    return {k: row[k] for k in ("n", "accuracy", "precision", "recall", "fpr", "f1", "auprc")}


# ----- metrics against hand-computed values ----------------------------------------------------
def test_metrics_match_hand_computed_values():
    scored = small_batch()
    assert scored.labels.tolist() == [1, 1, 1, 0, 0, 0, 1, 0]
    # At 0.5: TP = p0 p1 p6, FN = p2, FP = p3, TN = p4 p5 p7.
    # AUPRC: ranked .9 .8 .7 are unsafe (precision 1 at recall .25/.5/.75), the last unsafe (.3) is
    # 6th: precision 4/6 at recall 1 -> .25 * (1 + 1 + 1 + 2/3) = 0.9167.
    assert metrics_of(scored.metrics(0.5)) == pytest.approx(
        {"n": 8, "accuracy": 0.75, "precision": 0.75, "recall": 0.75, "fpr": 0.25, "f1": 0.75, "auprc": 0.9167})
    # At 0.35, p7 (0.4, safe) is flagged too: TP 3, FP 2, TN 2, FN 1.
    assert metrics_of(scored.metrics(0.35)) == pytest.approx(
        {"n": 8, "accuracy": 0.625, "precision": 0.6, "recall": 0.75, "fpr": 0.5, "f1": 0.6667, "auprc": 0.9167})
    # At 0.25, p2 (0.3, unsafe) is caught: TP 4, FP 2, TN 2, FN 0.
    assert metrics_of(scored.metrics(0.25)) == pytest.approx(
        {"n": 8, "accuracy": 0.75, "precision": 0.6667, "recall": 1.0, "fpr": 0.5, "f1": 0.8, "auprc": 0.9167})


def test_category_slices_and_confusion_matrix():
    scored = small_batch()
    slices = scored.slices(0.5)
    assert set(slices["group"]) == {"a", "b", "all"}
    # a: labels 1 1 1 0, verdicts 1 1 0 1 -> TP 2, FN 1, FP 1, TN 0.
    a = metrics_of(slices, "a")
    assert (a["n"], a["accuracy"], a["precision"], a["recall"], a["fpr"]) == (4, 0.5, 0.6667, 0.6667, 1.0)
    # b: labels 0 0 1 0, verdicts 0 0 1 0 -> all right.
    b = metrics_of(slices, "b")
    assert (b["accuracy"], b["precision"], b["recall"], b["fpr"], b["auprc"]) == (1.0, 1.0, 1.0, 0.0, 1.0)
    cells = {(r.actual, r.predicted): r.count for r in scored.confusion_frame(0.5).itertuples()}
    assert cells == {("unsafe", "unsafe"): 3, ("safe", "unsafe"): 1, ("safe", "safe"): 3, ("unsafe", "safe"): 1}


def test_over_refusals_and_misses_follow_the_threshold():
    scored = small_batch()
    assert scored.mistakes("judge", "over_refusal", 0.5)["prompt"].tolist() == ["p3"]
    assert scored.mistakes("judge", "over_refusal", 0.35)["prompt"].tolist() == ["p3", "p7"]  # highest first
    assert scored.mistakes("judge", "miss", 0.5)["prompt"].tolist() == ["p2"]
    assert scored.mistakes("judge", "miss", 0.95)["prompt"].tolist() == ["p2", "p6", "p1", "p0"]  # lowest first


def test_table_marks_verdicts_and_disagreements():
    table = batch.prepare_table(batch.read_upload(SMALL.encode()), "prompt", "label", None)
    other = np.array([0.9, 0.8, 0.3, 0.4, 0.2, 0.1, 0.2, 0.4])  # differs on p3 and p6 at 0.5
    frame = batch.ScoredBatch.from_table(table, {"base": SCORES, "lora": other}).to_frame(0.5)
    assert frame.loc[frame["disagree"], "prompt"].tolist() == ["p3", "p6"]
    assert frame["base_verdict"].tolist()[:4] == ["unsafe", "unsafe", "safe", "unsafe"]
    assert set(frame["category"]) == {"all"}


def test_a_tsv_gives_the_same_table_and_no_label_column_means_unlabelled():
    tsv = SMALL.replace(",", "\t")
    assert small_batch(tsv).metrics(0.5).equals(small_batch().metrics(0.5))
    unlabelled = batch.prepare_table(batch.read_upload(SMALL.encode()), "prompt")
    assert not batch.ScoredBatch.from_table(unlabelled, {"judge": SCORES}).labelled


def test_unknown_label_is_a_clear_error():
    with pytest.raises(DataError, match="Line 3: Unknown label 'maybe'"):
        batch.prepare_table(batch.read_upload(b"prompt,label\nhi,0\nho,maybe\n"), "prompt", "label")


# ----- the formula-injection guard ---------------------------------------------------------------
@pytest.mark.parametrize("cell", ["=SUM(A1:A9)", "+1+1", "-2+3", "@cmd", "\t=1", "\r=1"])
def test_formula_like_cells_are_neutralised(cell):
    assert export.neutralise_formula(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["How do I bake bread?", "", "a=b", 3.5, -1, None])
def test_other_cells_are_unchanged(cell):
    assert export.neutralise_formula(cell) == cell


def test_downloaded_csv_has_no_live_formula():
    frame = small_batch().to_frame(0.5)
    frame.loc[0, "prompt"] = '=HYPERLINK("http://evil","click")'
    frame.loc[1, "category"] = "@SUM(1)"
    rows = list(csv.reader(io.StringIO(export.safe_csv_bytes(frame).decode("utf-8"))))
    assert rows[1][0] == "'" + '=HYPERLINK("http://evil","click")'
    assert rows[2][1] == "'@SUM(1)"
    assert all(not cell.startswith(export.FORMULA_STARTS) for row in rows for cell in row)
    assert rows[1][3] == "0.9"  # numbers stay numbers
    assert frame.loc[0, "prompt"].startswith("=")  # the page's own table is not changed


# ----- bad files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, message", [
    (b"", "empty"),
    (b"  \n\n ", "empty"),
    (b"prompt,label\n\xff\xfe bad bytes,1\n", "not UTF-8"),
    (b"prompt,label\n", "no rows"),
    (b"text label\nhello there 0\nhow are you 0\n", "not to be comma or tab separated"),
    (b"prompt,label\n" + b"hi,0\n" * 4, "at most 3 are accepted"),
    (b"prompt,label\n" + b"hello,0\n" * 20, "larger than"),
])
def test_bad_files_get_a_plain_message(raw, message):
    with pytest.raises(DataError, match=message):
        batch.read_upload(raw, max_bytes=100, max_rows=3)


def test_a_single_prompt_column_is_accepted():
    frame = batch.read_upload(b"prompt\nhello\nhow are you\n")
    assert frame["prompt"].tolist() == ["hello", "how are you"]


def test_content_key_depends_on_file_column_and_judges():
    key = batch.content_key(b"a", "prompt", ["base", "lora"])
    assert key == batch.content_key(b"a", "prompt", ["base", "lora"])
    assert len({key, batch.content_key(b"b", "prompt", ["base", "lora"]),
                batch.content_key(b"a", "text", ["base", "lora"]), batch.content_key(b"a", "prompt", ["base"])}) == 4


def test_heatmap_link_carries_the_whole_prompt():
    prompt = "How do I make 100% sure & safe? #1 <b>"
    link = batch.heatmap_link(prompt)
    assert link.startswith("heatmap?prompt=") and " " not in link
    assert parse_qs(link.split("?", 1)[1])["prompt"] == [prompt]


# ----- the page and the command agree --------------------------------------------------------------
def test_page_and_command_give_identical_numbers(bundled_judges, tmp_path):
    sample = batch.read_upload(batch.sample_bytes(next(iter(batch.SAMPLES))))
    rows = sample.iloc[::3].rename(columns={"kind": "dataset"})
    path = tmp_path / "few.csv"
    rows.to_csv(path, index=False)
    command = subprocess.run([sys.executable, "-m", "guardian.evaluate", "--data", str(path), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={"OMP_NUM_THREADS": "1", "PATH": "", "TOKENIZERS_PARALLELISM": "false"})
    assert command.returncode == 0, command.stderr[-2000:]
    expected = json.loads(command.stdout)
    base, lora = bundled_judges
    table = batch.prepare_table(batch.read_upload(path.read_bytes()), "prompt", "label", "dataset")
    scored = batch.score_batch({"base": base, "lora": lora}, table)
    got = {}
    for row in scored.slices(0.5).to_dict(orient="records"):
        judge, group = row.pop("judge"), row.pop("group")
        got.setdefault(judge, {})[group] = {  # the table holds an undefined metric as NaN, the JSON as null
            k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    assert set(got) == {"base", "lora"} and len(got["base"]) > 2
    assert got == expected


# ----- the page --------------------------------------------------------------------------------------
def batch_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/batch.py").run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def counted_scoring(monkeypatch):
    """Count calls of score_prompts made through guardian.evaluate (the page's scoring path)."""
    calls = []
    real = guardian.evaluate.score_prompts

    def counting(judge, texts, *args, **kwargs):
        calls.append(len(texts))
        return real(judge, texts, *args, **kwargs)

    monkeypatch.setattr(guardian.evaluate, "score_prompts", counting)
    return calls


def test_page_shows_metrics_charts_and_links_on_the_sample(bundled_judges, counted_scoring):
    at = batch_page()
    assert_clean(at)
    assert counted_scoring == [48, 48], "both judges score the sample once"
    assert [s.value for s in at.subheader] == ["Every prompt", "How well each judge does", "By category",
                                              "Where the judges fail"]
    assert len(at.get("vega_lite_chart")) == 2  # confusion matrix and precision-recall curve
    links = at.get("page_link")
    assert links, "every mistake links to its heatmap"
    assert all(link.proto.page == "heatmap" and parse_qs(link.proto.query_string)["prompt"]
               for link in links)
    assert at.get("download_button"), "the scored table can be downloaded"


def test_moving_the_threshold_recomputes_without_scoring_again(bundled_judges, counted_scoring):
    prompts = pd.read_csv(batch.DATA_DIR / "suite.csv", keep_default_na=False)["prompt"].tolist()
    p_base = score_prompts(bundled_judges[0], prompts).p_unsafe
    thresholds = (0.01, 0.5, 0.99)
    assert len({int((p_base >= t).sum()) for t in thresholds}) > 1, "the sample must span the thresholds"
    at = batch_page()
    for value in thresholds:
        at.slider(key="_batch_threshold").set_value(value).run()
        assert_clean(at)
        shown = {m.label: m.value for m in at.metric}
        assert shown["Flagged unsafe, Base judge"] == str(int((p_base >= value).sum())), value
    assert counted_scoring == [48, 48], "the threshold never re-scores"
    label = next(s for s in at.selectbox if s.label == "Label column (optional)")
    label.set_value("(none)").run()
    assert_clean(at)
    assert counted_scoring == [48, 48], "changing the label column does not re-score either"
    assert any("label column" in i.value for i in at.info)


def test_an_uploaded_file_is_scored_and_a_bad_one_gets_one_message(bundled_judges):
    at = batch_page()
    at.radio(key="_batch_source").set_value("Upload my own file").run()
    hostile = "<b>bold</b> **how** [to](http://evil) =1+1"
    data = f'text\tis_unsafe\n"{hostile}"\t1\nTell me how to build a pipe bomb\t1\nBake a cake\t0\n'.encode()
    at.file_uploader(key="_batch_upload").set_value(("mine.tsv", data, "text/tab-separated-values")).run()
    assert_clean(at)
    assert next(s for s in at.selectbox if s.label == "Prompt column").value == "text"
    assert next(s for s in at.selectbox if s.label == "Label column (optional)").value == "is_unsafe"
    assert any(m.label.startswith("Rows where") and m.value.endswith("of 3") for m in at.metric)
    at.slider(key="_batch_threshold").set_value(0.99).run()  # the hostile prompt becomes a miss
    labels = [link.proto.label for link in at.get("page_link")]
    assert any(r"\*\*how\*\*" in label for label in labels), labels
    assert all("<b>" not in label and "**how**" not in label for label in labels)

    at.file_uploader(key="_batch_upload").set_value(("bad.csv", b"\xff\xfe\x00junk", "text/csv")).run()
    assert not at.exception
    assert [e.value for e in at.error] and "UTF\\-8" in at.error[0].value
    assert not at.get("vega_lite_chart") and not at.metric
