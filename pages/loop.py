"""Loop: collect the judge's misses, train a LoRA update on them, see what it fixed and broke, download it."""

from __future__ import annotations

import logging
from dataclasses import replace

import pandas as pd
import streamlit as st

from guardian import loop
from guardian.datasets import DataError
from guardian.judge import JudgeError
from guardian.training import LoraSettings
from guardian.ui import charts, state, widgets

log = logging.getLogger("guardian.ui")

JOB, RESULT, NOTICE, CSV_NOTICE = "_loop_job", "_loop_result", "_loop_notice", "_loop_csv_notice"
LABELS = ["unsafe", "safe"]
RANKS = [1, 2, 4, 8, 16, 32, 64]
RATES = [1e-5, 3e-5, 1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 1e-2]

widgets.page_setup("loop")
widgets.page_intro(
    "Fix the judge: the Guardian loop",
    "Collect prompts the judge gets wrong, with the label you say is right, train a small LoRA update on them "
    "here, and check that it fixes them without breaking the judge elsewhere. The update lives only in your "
    "session; download it as a zip to keep it.",
)


def editor_key() -> str:
    return f"_loop_editor_{st.session_state.get('_loop_editor_version', 0)}"


def apply_edits(key: str) -> None:
    """Apply the table's edits (changed, added, deleted rows) to the stored patch set."""
    changes = st.session_state.get(key) or {}
    frame = state.patch_frame().copy()
    for row, values in changes.get("edited_rows", {}).items():
        for column, value in values.items():
            if column in state.PATCH_COLUMNS:
                frame.loc[int(row), column] = value
    frame = frame.drop(index=[int(i) for i in changes.get("deleted_rows", []) if int(i) in frame.index])
    added = pd.DataFrame([{c: r.get(c, "unsafe" if c == "label" else "") for c in state.PATCH_COLUMNS}
                          for r in changes.get("added_rows", [])], columns=list(state.PATCH_COLUMNS))
    frame = pd.concat([frame, added], ignore_index=True).head(state.MAX_PATCH_ROWS)
    state.set_patch(frame.fillna(""))


def import_csv() -> None:
    upload = st.session_state.get("_loop_csv")
    if upload is None:
        return
    try:
        rows = loop.read_patch_csv(upload.getvalue())
    except DataError as error:
        st.session_state[CSV_NOTICE] = ("error", f"That file could not be used: {error}")
        return
    frame = pd.concat([state.patch_frame(), rows], ignore_index=True)
    kept = frame.head(state.MAX_PATCH_ROWS)
    state.set_patch(kept)
    note = f"Added {len(kept) - len(frame) + len(rows)} prompts from the file."
    if len(kept) < len(frame):
        note += f" The patch set holds at most {state.MAX_PATCH_ROWS} prompts; the rest were left out."
    st.session_state[CSV_NOTICE] = ("success", note)


def patch_editor() -> pd.DataFrame:
    st.subheader("1 · Your patch set", anchor=False)
    st.caption("Prompts the judge gets wrong, with the right label. Add rows at the bottom of the table, edit cells, "
               "or select rows and delete them. On the Probe page, 'Add to patch set' puts the prompt (or a "
               f"rewrite) here. At most {state.MAX_PATCH_ROWS} prompts; both safe and unsafe ones are needed.")
    key = editor_key()
    st.data_editor(
        state.patch_frame(), key=key, num_rows="dynamic", hide_index=True, width="stretch", on_change=apply_edits,
        args=(key,),
        column_config={
            "prompt": st.column_config.TextColumn("prompt", width="large", max_chars=state.MAX_PROMPT_CHARS),
            "label": st.column_config.SelectboxColumn("right label", options=LABELS, default="unsafe", required=True),
        })
    frame = state.patch_frame()
    left, middle, right = st.columns([3, 1, 1], vertical_alignment="bottom")
    left.file_uploader("Import prompts from a CSV (columns prompt, label)", type=["csv", "tsv", "txt"],
                       key="_loop_csv", on_change=import_csv)
    middle.download_button("Export CSV", frame.to_csv(index=False).encode("utf-8"), file_name="patch_set.csv",
                           mime="text/csv", key="_loop_export", on_click="ignore", icon=":material/download:")
    if right.button("Clear the table", key="_loop_clear", icon=":material/delete:", disabled=frame.empty):
        state.set_patch(frame.iloc[0:0])
        st.rerun()
    notice = st.session_state.pop(CSV_NOTICE, None)
    if notice:
        (st.error if notice[0] == "error" else st.success)(widgets.plain(notice[1]))
    counts = frame["label"].value_counts()
    st.caption(f"{len(frame)} prompts: {int(counts.get('unsafe', 0))} unsafe, {int(counts.get('safe', 0))} safe.")
    return frame


def chosen_settings() -> LoraSettings:
    columns = st.columns(3)
    defaults = loop.DEFAULT_SETTINGS
    rank = columns[0].select_slider("LoRA rank", RANKS, value=defaults.rank, key="_loop_rank",
                                    help="Size of the update. Small ranks train fast and change the judge less.")
    epochs = columns[1].number_input("Epochs", min_value=1, max_value=loop.MAX_EPOCHS, value=defaults.epochs,
                                     step=1, key="_loop_epochs", help="Passes over the patch set and the replayed prompts.")
    rate = columns[2].select_slider("Learning rate", RATES, value=defaults.learning_rate, key="_loop_rate", format_func=lambda r: f"{r:g}",
                                    help="How big each training step is. Too high can break what the judge knew.")
    return replace(defaults, rank=int(rank), alpha=2 * int(rank), epochs=int(epochs), learning_rate=float(rate))


def start_training(start: state.JudgeSlot, frame: pd.DataFrame, settings: LoraSettings) -> None:
    job = st.session_state.get(JOB)
    if job is not None and not job.done:
        st.warning("A training is already running for you; wait for it to finish (or stop it) before starting "
                   "another.", icon=":material/hourglass:")
        return
    try:
        loop.check_settings(settings)
        loop.validate_patch(frame, start.judge)
    except (DataError, ValueError) as error:
        st.error(widgets.plain(error), icon=":material/info:")
        return
    st.session_state[JOB] = loop.TrainingJob(start.judge, frame.copy(), settings).start()
    st.session_state["_loop_start_key"] = start.key


@st.fragment(run_every=1.0)
def training_progress() -> None:
    job = st.session_state.get(JOB)
    if job is None:
        return
    if job.done:
        st.rerun()
    if job.waiting:
        st.progress(0, text="Waiting for another training on this server to finish…")
    else:
        share = job.step / job.total if job.total else 0.0
        loss = f" · loss {job.loss:.3f}" if job.step else ""
        st.progress(min(share, 1.0), text=f"Epoch {job.epoch} of {job.settings.epochs} · step {job.step} of "
                                          f"{job.total or '…'}{loss}")
    if st.button("Stop training", key="_loop_stop", icon=":material/stop:"):
        job.stop()


def finish_training() -> None:
    """Turn a finished job into this session's update (or a message)."""
    job = st.session_state.get(JOB)
    if job is None or not job.done:
        return
    st.session_state.pop(JOB)
    error = job.error
    if error is None and job.update is not None:
        st.session_state[RESULT] = job.update
        slot = state.set_update(job.update.judge)
        pick_for_compare(slot)
        st.session_state[NOTICE] = ("success", f"Trained in {job.update.seconds:.0f} s. Your update is now a judge "
                                               "in this session: see below, or compare it on the Compare page.")
    elif isinstance(error, InterruptedError):
        st.session_state[NOTICE] = ("info", "Training was stopped; nothing changed.")
    elif isinstance(error, (DataError, ValueError, JudgeError)):
        st.session_state[NOTICE] = ("error", str(error))
    else:
        log.error("Training an update failed", exc_info=error)
        st.session_state[NOTICE] = ("error", "Sorry, training failed. The details were written to the server log.")


def pick_for_compare(slot: state.JudgeSlot) -> None:
    st.session_state["_compare_before"] = st.session_state.get("_loop_start_key", "base")
    st.session_state["_compare_after"] = slot.key


def train_section(start: state.JudgeSlot, frame: pd.DataFrame) -> None:
    st.subheader("2 · Train an update", anchor=False)
    st.caption(f"Trains a LoRA adapter on {widgets.plain(start.label.lower())} from your patch set plus twice as many "
               "prompts replayed from the bundled training data (so it does not forget), on a copy: the shared "
               "judges never change.")
    settings = chosen_settings()
    if st.button("Train update", key="_loop_train", type="primary", icon=":material/model_training:"):
        start_training(start, frame, settings)
    if st.session_state.get(JOB) is not None:
        training_progress()
    notice = st.session_state.pop(NOTICE, None)
    if notice:
        kind, text = notice
        {"error": st.error, "info": st.info}.get(kind, st.success)(widgets.plain(text))


def results_section() -> None:
    update = st.session_state.get(RESULT)
    slot = (state.update_slots() or [None])[0]
    if slot is None:
        return
    st.subheader("3 · What the update changed", anchor=False)
    if update is None:
        st.info("Your uploaded adapter is loaded as this session's update; pick it on the Compare page to see what "
                "it changes.", icon=":material/info:")
    else:
        columns = st.columns(4)
        for column, result in zip(columns[:2], (update.patch, update.regression)):
            column.metric(f"Right answers, {result.name}", f"{result.accuracy_after:.0%}",
                          delta=f"{result.accuracy_after - result.accuracy_before:+.0%} (was "
                                f"{result.accuracy_before:.0%})", border=True)
        columns[2].metric("Prompts fixed", int(update.patch.fixed.sum() + update.regression.fixed.sum()), border=True)
        columns[3].metric("Prompts broken", int(update.patch.broken.sum() + update.regression.broken.sum()),
                          border=True, help="Right before the update, wrong after it (mostly on the regression sample).")
        where = f" in the last {update.settings.top_layers} blocks" if update.settings.top_layers else ""
        st.caption(f"Trained on {update.n_patch} patch prompts + {update.n_replay} replayed prompts, rank "
                   f"{update.settings.rank}{where}, {update.settings.epochs} epochs, learning rate "
                   f"{update.settings.learning_rate:g}, in {update.seconds:.0f} s. The regression sample is "
                   "held back from the bundled training data.")
        summary = update.summary_frame()
        st.dataframe(summary, hide_index=True, width="stretch", column_config={
            "accuracy_before": st.column_config.NumberColumn("right before", format="percent"),
            "accuracy_after": st.column_config.NumberColumn("right after", format="percent")})
        for result in (update.patch, update.regression):
            frame = result.to_frame()
            with st.expander(f"Before and after, {result.name} ({int(result.fixed.sum())} fixed, "
                             f"{int(result.broken.sum())} broken)", expanded=result is update.patch,
                             icon=":material/table:"):
                st.altair_chart(charts.before_after_chart(frame), width="stretch")
                st.dataframe(widgets.highlight_rows(frame, "change", "#fde0c5"), hide_index=True, width="stretch",
                             column_config={"p_unsafe_before": st.column_config.NumberColumn("p(unsafe) before",
                                                                                             format="%.3f"),
                                            "p_unsafe_after": st.column_config.NumberColumn("p(unsafe) after",
                                                                                            format="%.3f")})
                widgets.downloads(f"update_{result.name.replace(' ', '_')}", frame=frame)
        if len(update.losses) > 1:
            st.altair_chart(charts.loss_chart(update.losses), width="stretch")
    left, middle, right = st.columns(3)
    if update is not None:
        left.download_button("Download the adapter (zip)", loop.export_adapter_zip(update), file_name="guardian_update.zip",
                             mime="application/zip", key="_loop_zip", on_click="ignore", icon=":material/download:")
    if middle.button("Compare it on the Compare page", key="_loop_compare", icon=":material/compare_arrows:"):
        pick_for_compare(slot)
        st.switch_page("pages/compare.py")
    if right.button("Drop my update", key="_loop_drop", icon=":material/delete:"):
        state.set_update(None)
        st.session_state.pop(RESULT, None)
        st.rerun()


def upload_section(start: state.JudgeSlot) -> None:
    with st.expander("Continue from an adapter zip you downloaded earlier", icon=":material/upload:"):
        upload = st.file_uploader("Adapter zip", type=["zip"], key="_loop_zip_upload")
        if upload is not None and st.button("Use this adapter", key="_loop_use_zip"):
            try:
                with st.spinner("Loading the adapter…"):
                    judge = loop.load_adapter_zip(start.judge, upload.getvalue())
            except (DataError, JudgeError) as error:
                st.error(widgets.plain(error), icon=":material/info:")
            else:
                st.session_state.pop(RESULT, None)
                st.session_state["_loop_start_key"] = start.key
                pick_for_compare(state.set_update(judge))
                st.rerun()


finish_training()
starts = [s for s in state.all_slots() if not s.key.startswith("update-")]
if not starts:
    st.info("No judge is available yet; see the message in the sidebar.")
else:
    labels = {s.key: s.label for s in starts}
    start_key = st.selectbox("Start from", list(labels), format_func=labels.get, key="_loop_start",
                             help="The judge the update is trained on (and an uploaded adapter is applied to).")
    start = next(s for s in starts if s.key == start_key)
    with widgets.friendly_errors("showing the patch set"):
        patch = patch_editor()
    with widgets.friendly_errors("training the update"):
        train_section(start, patch)
    with widgets.friendly_errors("showing the update"):
        results_section()
    with widgets.friendly_errors("loading an adapter"):
        upload_section(start)
