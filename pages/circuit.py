"""Circuit: where, layer by layer, the judge tells an unsafe prompt from its safe twin."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from guardian.scoring import THRESHOLD
from guardian.ui import charts, state, widgets

widgets.page_setup("circuit")
widgets.page_intro(
    "Safety circuit",
    "Give an unsafe prompt and a *safe twin* that differs in a word or two. The judge reads both; this page "
    "shows at which layer their internal states part ways, what the judge would answer if it stopped early, "
    "and which internal states carry the verdict (activation patching).",
)


def _load_pair() -> None:
    chosen = st.session_state.get("_circuit_preset")
    if chosen is not None:
        row = state.pairs().iloc[int(chosen)]
        state.set_value(state.PROMPT, row["unsafe"])
        state.set_value(state.PAIR, row["safe"])
        st.session_state["_circuit_preset"] = None


presets = state.pairs()
st.selectbox("Prompt pairs", list(range(len(presets))), index=None, key="_circuit_preset",
             format_func=lambda i: presets.name[i], on_change=_load_pair,
             placeholder="Pick a ready-made pair to load both prompts…",
             help="Pairs whose two prompts differ in one or two words, so their tokens line up.")
left, right = st.columns(2)
with left:
    text = widgets.prompt_box("circuit", label="Unsafe prompt", examples=False)
with right:
    twin = widgets.prompt_box("circuit", key=state.PAIR, label="Its safe twin", examples=False,
                              help="The same prompt with the harmful part swapped for something harmless. "
                                   "Twins with the same number of tokens give the cleanest comparison.")
slots = state.shown_slots()


def divergence(slot) -> None:
    st.subheader("Where the two prompts part ways", anchor=False)
    result = state.analyse("layer_divergence", slot, text, twin)
    widgets.truncation_notice(result.truncated, slot.judge.max_tokens)
    st.altair_chart(charts.divergence_chart(result.to_frame(), result.critical_layer), width="stretch")
    if result.critical_layer is None:
        st.markdown("The distance between the prompts never grows from one layer to the next.")
    else:
        st.markdown(f"The distance between the two prompts' internal states (averaged over their tokens) grows "
                    f"most at **layer {result.critical_layer}**: the processing step just before it does the most "
                    "to tell them apart.")
    widgets.downloads(f"divergence_{slot.key}", frame=result.to_frame(), result=result)


def lens(slot) -> None:
    st.subheader("What the judge would say if it stopped early", anchor=False)
    st.caption("The *logit lens* reads the verdict straight from each layer, skipping the layers after it. "
               "Where the red line climbs above 0.5 is where the judge has made up its mind.")
    unsafe = state.analyse("logit_lens", slot, text)
    safe = state.analyse("logit_lens", slot, twin)
    frame = pd.concat([unsafe.to_frame().assign(prompt="unsafe prompt"),
                       safe.to_frame().assign(prompt="safe twin")], ignore_index=True)
    st.altair_chart(charts.logit_lens_chart(frame), width="stretch")
    widgets.downloads(f"logit_lens_{slot.key}", frame=frame)


def patching(slot) -> None:
    st.subheader("Which internal states carry the verdict", anchor=False)
    st.caption("Activation patching: run the safe twin, but copy in the unsafe prompt's internal state at one "
               "layer and one position. A red square means that single state brings back most of the unsafe "
               "verdict (1 = all of it, 0 = none); blue means it pushes the other way.")
    with st.spinner("Patching every layer and position…"):
        result = state.analyse("activation_patching", slot, text, twin)
    if result.note:
        st.info(widgets.plain(result.note), icon=":material/link:")
    if result.p_unsafe_clean < THRESHOLD:
        st.warning(f"The judge does not rate the first prompt unsafe (p(unsafe) = {result.p_unsafe_clean:.2f}), so "
                   "there is little unsafe verdict to bring back; read the grid with care.", icon=":material/info:")
    n_layers, n_positions = result.restored.shape
    frame = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_positions),
                          "position": np.tile(np.arange(n_positions), n_layers),
                          "restored": result.restored.ravel(), "patched_score": result.patched_scores.ravel()})
    st.altair_chart(charts.patching_chart(frame, result.position_labels), width="stretch")
    st.caption(f"p(unsafe): unsafe prompt {result.p_unsafe_clean:.2f}, safe twin {result.p_unsafe_corrupt:.2f}.")
    widgets.downloads(f"patching_{slot.key}", frame=result.to_frame(), result=result)


if not slots:
    st.info("No judge is available yet; see the message in the sidebar.")
elif widgets.need_prompt(text, "an unsafe prompt") and widgets.need_prompt(twin, "a safe twin"):
    slot = widgets.choose_judge("circuit", slots)
    if text.strip() == twin.strip():
        st.info("The two prompts are the same; change one word of the safe twin to compare them.")
    else:
        with widgets.friendly_errors("comparing the two prompts layer by layer"):
            divergence(slot)
        with widgets.friendly_errors("reading the verdict at every layer"):
            lens(slot)
        with widgets.friendly_errors("patching internal states"):
            patching(slot)
