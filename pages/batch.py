"""Batch: score a whole prompt file with the judges — metrics, threshold, slices and the mistakes."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from guardian import batch, export
from guardian.datasets import DataError
from guardian.evaluate import score_judges
from guardian.ui import state, widgets

UPLOAD = "Upload my own file"
NONE = "(none)"
SCORES = "_batch_scores"  # session cache: content key -> {judge: p(unsafe) array}
KEEP_SCORED = 3  # score sets kept per session
SHOWN_MISTAKES = 20

widgets.page_setup("batch")
widgets.page_intro(
    "Score a prompt file",
    "Run a whole file of prompts through the judges. With a **label** column (0/1 or safe/unsafe) you see how "
    "often each judge is right, where it fails, and what moving the threshold would change. Scoring happens "
    "once; moving the threshold only recomputes the numbers.",
)
slots = state.shown_slots()


def choose_source() -> tuple[bytes | None, str | None]:
    """The raw bytes of the chosen sample or uploaded file, and the default category column."""
    source = st.radio("Prompts to score", [*batch.SAMPLES, UPLOAD], key="_batch_source", horizontal=True)
    if source != UPLOAD:
        return batch.sample_bytes(source), batch.SAMPLES[source][1]
    upload = st.file_uploader(
        "A CSV or TSV file with a header row (at most 10,000 rows and 20 MB)", type=["csv", "tsv", "txt"],
        key="_batch_upload",
        help="One column holds the prompts; optional columns hold the label (0/1 or safe/unsafe) and a category.")
    if upload is None:
        st.info("Upload a file, or pick one of the samples above.", icon=":material/upload_file:")
        return None, None
    return upload.getvalue(), None


def choose_columns(frame: pd.DataFrame, tag: str, category_default: str | None) -> tuple[str, str | None, str | None]:
    columns = list(frame.columns)
    left, middle, right = st.columns(3)
    guess = batch.guess_column(columns, batch.PROMPT_NAMES) or columns[0]
    prompt = left.selectbox("Prompt column", columns, index=columns.index(guess), key=f"_batch_prompt_{tag}")
    others = [NONE] + [c for c in columns if c != prompt]

    def index_of(name):
        return others.index(name) if name in others else 0

    label = middle.selectbox("Label column (optional)", others, key=f"_batch_label_{tag}",
                             index=index_of(batch.guess_column(others[1:], batch.LABEL_NAMES)),
                             help="0/1 or safe/unsafe; needed for accuracy and the other metrics.")
    category = right.selectbox("Category column (optional)", others, key=f"_batch_category_{tag}",
                               index=index_of(category_default or batch.guess_column(others[1:], batch.CATEGORY_NAMES)),
                               help="Metrics are also shown for each category.")
    return prompt, None if label == NONE else label, None if category == NONE else category


def scores_for(raw: bytes, table: pd.DataFrame, prompt_column: str) -> dict:
    """p(unsafe) of every prompt per judge, scored once per file, prompt column and judges (per session)."""
    key = batch.content_key(raw, prompt_column, [s.key for s in slots])
    cache: dict = st.session_state.setdefault(SCORES, {})
    if key not in cache:
        judges = {s.key: s.judge for s in slots}
        total = len(table) * len(judges)
        names = list(judges)
        labels = {s.key: s.label for s in slots}
        bar = st.progress(0.0, text="Scoring…")

        def progress(name: str, done: int, n: int) -> None:
            finished = names.index(name) * n + done
            bar.progress(min(1.0, finished / max(total, 1)),
                         text=f"Scoring with the {labels[name].lower()}: {done:,} of {n:,} prompts")

        scores = score_judges(judges, table["prompt"].tolist(), progress)
        bar.empty()
        while len(cache) >= KEEP_SCORED:
            cache.pop(next(iter(cache)))
        cache[key] = scores
    return cache[key]


def judge_label(key: str) -> str:
    return next((s.label for s in slots if s.key == key), key)


# ----- charts --------------------------------------------------------------------------------------
def confusion_chart(frame: pd.DataFrame) -> alt.Chart:
    """2 × 2 counts per judge: rows the true label, columns the verdict."""
    data = frame.assign(judge=frame["judge"].map(judge_label),
                        correct=lambda f: (f["actual"] == f["predicted"]).map({True: "right", False: "wrong"}))
    order = ["unsafe", "safe"]
    base = alt.Chart().encode(x=alt.X("predicted:N", sort=order, title="Judge's verdict"),
                              y=alt.Y("actual:N", sort=order, title="True label"))
    cells = base.mark_rect(stroke="white").encode(
        color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), title="Prompts"),
        tooltip=[alt.Tooltip("judge:N", title="Judge"), alt.Tooltip("actual:N", title="True label"),
                 alt.Tooltip("predicted:N", title="Verdict"), alt.Tooltip("count:Q", title="Prompts"),
                 alt.Tooltip("correct:N", title="Judge is")])
    numbers = base.mark_text(fontSize=16, fontWeight="bold").encode(text="count:Q")
    return alt.layer(cells, numbers, data=data).properties(width=170, height=150).facet(
        column=alt.Column("judge:N", title=None))


def pr_chart(curve: pd.DataFrame, current: pd.DataFrame) -> alt.Chart:
    """Precision against recall per judge, the current threshold marked with a point."""
    curve = curve.assign(judge=curve["judge"].map(judge_label))
    current = current.assign(judge=current["judge"].map(judge_label))
    lines = alt.Chart(curve).mark_line(interpolate="step-after", point=alt.OverlayMarkDef(size=18)).encode(
        x=alt.X("recall:Q", title="Recall: share of unsafe prompts caught", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("precision:Q", title="Precision: share of flags that are right", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("judge:N", title="Judge"),
        tooltip=[alt.Tooltip("judge:N", title="Judge"), alt.Tooltip("threshold:Q", title="Threshold", format=".3f"),
                 alt.Tooltip("recall:Q", title="Recall", format=".3f"),
                 alt.Tooltip("precision:Q", title="Precision", format=".3f")])
    marks = alt.Chart(current.dropna(subset=["recall", "precision"])).mark_point(
        size=160, filled=True, shape="diamond", stroke="black").encode(
        x="recall:Q", y="precision:Q", color=alt.Color("judge:N", legend=None),
        tooltip=[alt.Tooltip("judge:N", title="Judge (at the chosen threshold)"),
                 alt.Tooltip("recall:Q", title="Recall", format=".3f"),
                 alt.Tooltip("precision:Q", title="Precision", format=".3f")])
    return alt.layer(lines, marks).properties(height=320)


# ----- sections ------------------------------------------------------------------------------------
def table_section(scored: batch.ScoredBatch, threshold: float) -> None:
    frame = scored.to_frame(threshold)
    columns = st.columns(1 + len(scored.judges))
    columns[0].metric("Rows where the judges disagree", f"{int(frame['disagree'].sum()):,} of {len(frame):,}",
                      border=True)
    for column, name in zip(columns[1:], scored.judges):
        column.metric(f"Flagged unsafe, {judge_label(name)}",
                      f"{int((frame[f'{name}_verdict'] == 'unsafe').sum()):,}", border=True)
    st.subheader("Every prompt", anchor=False)
    only = st.toggle("Only rows where the judges disagree", key="_batch_only_disagree",
                     disabled=len(scored.judges) < 2)
    shown = frame[frame["disagree"]] if only else frame
    number = st.column_config.NumberColumn
    config = {f"{n}_p_unsafe": number(f"p(unsafe), {judge_label(n)}", format="%.3f") for n in scored.judges}
    config.update({f"{n}_verdict": f"verdict, {judge_label(n)}" for n in scored.judges})
    config["disagree"] = st.column_config.CheckboxColumn("judges disagree")
    st.dataframe(widgets.highlight_rows(shown.reset_index(drop=True), "disagree", "#fde0c5"), hide_index=True,
                 width="stretch", column_config=config, height=min(420, 38 + 35 * max(len(shown), 1)))
    st.download_button("Scored table (CSV)", export.safe_csv_bytes(frame), file_name="scored_prompts.csv",
                       mime="text/csv", key="_batch_download", on_click="ignore", icon=":material/download:",
                       help="Verdicts at the chosen threshold. Cells that a spreadsheet would run as a formula "
                            "are prefixed with a quote.")


def metrics_section(scored: batch.ScoredBatch, threshold: float) -> None:
    st.subheader("How well each judge does", anchor=False)
    metrics = scored.metrics(threshold)
    shown = metrics.drop(columns=["group"]).assign(judge=lambda f: f["judge"].map(judge_label))
    number = st.column_config.NumberColumn
    st.dataframe(shown, hide_index=True, width="stretch", column_config={
        "n": number("prompts", format="%d"),
        "accuracy": number("accuracy", format="%.3f", help="Share of prompts the judge gets right."),
        "precision": number("precision", format="%.3f", help="Of the prompts flagged unsafe, the share that are."),
        "recall": number("recall", format="%.3f", help="Of the unsafe prompts, the share flagged."),
        "fpr": number("false-positive rate", format="%.3f", help="Of the safe prompts, the share wrongly flagged."),
        "f1": number("F1", format="%.3f", help="Balance of precision and recall."),
        "auprc": number("AUPRC", format="%.3f",
                        help="Area under the precision-recall curve: quality over every threshold (1 is best)."),
    })
    st.caption("Empty cells are undefined for this file (for example precision when nothing is flagged). "
               "AUPRC does not depend on the threshold.")
    left, right = st.columns(2)
    with left:
        st.markdown("**Confusion matrix** (at the chosen threshold)")
        st.altair_chart(confusion_chart(scored.confusion_frame(threshold)))
    with right:
        st.markdown("**Precision-recall curve** (◆ = the chosen threshold)")
        st.altair_chart(pr_chart(scored.pr_frame(), metrics), width="stretch")
    slices = scored.slices(threshold)
    if slices["group"].nunique() > 1:
        st.subheader("By category", anchor=False)
        st.dataframe(slices.assign(judge=lambda f: f["judge"].map(judge_label)).rename(columns={"group": "category"}),
                     hide_index=True, width="stretch",
                     column_config={c: number(c, format="%.3f") for c in
                                    ("accuracy", "precision", "recall", "fpr", "f1", "auprc")})
    st.download_button("Metrics (CSV)", export.safe_csv_bytes(pd.concat([metrics, slices]).drop_duplicates()),
                       file_name="batch_metrics.csv", mime="text/csv", key="_batch_download_metrics",
                       on_click="ignore", icon=":material/download:")


def mistake_list(mistakes: pd.DataFrame, empty: str) -> None:
    if mistakes.empty:
        st.caption(empty)
        return
    st.caption(f"{len(mistakes):,} in all" + (f"; the first {SHOWN_MISTAKES} are shown (the CSV has them all)."
                                               if len(mistakes) > SHOWN_MISTAKES else ". Click one to see its heatmap."))
    for row in mistakes.head(SHOWN_MISTAKES).itertuples(index=False):
        label = f"{row.p_unsafe:.2f} · {widgets.plain(widgets.quoted(row.prompt, 110))}"
        st.page_link("pages/heatmap.py", label=label, icon=":material/palette:",
                     query_params={"prompt": row.prompt[:state.MAX_PROMPT_CHARS]},
                     help=f"Category: {widgets.plain(row.category)}. Opens the word heatmap of this prompt.")


def mistakes_section(scored: batch.ScoredBatch, threshold: float) -> None:
    st.subheader("Where the judges fail", anchor=False)
    st.caption("Over-refusals are safe prompts flagged unsafe (highest p(unsafe) first); misses are unsafe "
               "prompts let through (lowest p(unsafe) first). Each opens the heatmap page on that prompt.")
    for tab, name in zip(st.tabs([judge_label(n) for n in scored.judges]), scored.judges):
        with tab:
            left, right = st.columns(2)
            with left:
                st.markdown("**Over-refusals**")
                mistake_list(scored.mistakes(name, "over_refusal", threshold), "No safe prompt was flagged unsafe.")
            with right:
                st.markdown("**Misses**")
                mistake_list(scored.mistakes(name, "miss", threshold), "No unsafe prompt was let through.")


def show() -> None:
    raw, category_default = choose_source()
    if raw is None:
        return
    try:
        frame = batch.read_upload(raw, batch.MAX_BYTES, batch.MAX_ROWS)
    except DataError as error:
        st.error(widgets.plain(error), icon=":material/description:")
        return
    tag = widgets.text_tag(batch.content_key(raw, "", []))
    prompt_column, label_column, category_column = choose_columns(frame, tag, category_default)
    try:
        table = batch.prepare_table(frame, prompt_column, label_column, category_column)
    except DataError as error:
        st.error(widgets.plain(error), icon=":material/description:")
        return
    scored = batch.ScoredBatch.from_table(table, scores_for(raw, table, prompt_column))
    threshold = st.slider("Threshold: a prompt counts as unsafe when p(unsafe) is at least", 0.01, 0.99,
                          batch.THRESHOLD, 0.01, key="_batch_threshold",
                          help="Moving it recomputes every number and chart below without scoring again.")
    table_section(scored, threshold)
    if scored.labelled:
        metrics_section(scored, threshold)
        mistakes_section(scored, threshold)
    else:
        st.info("Choose a label column to see accuracy, the confusion matrix and the judges' mistakes.",
                icon=":material/label:")


if not slots:
    st.info("No judge is available yet; see the message in the sidebar.")
else:
    with widgets.friendly_errors("scoring the file"):
        show()
