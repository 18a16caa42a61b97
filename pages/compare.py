"""Compare: what the LoRA adapter changed — verdicts, attention, representations and weights."""

from __future__ import annotations

import streamlit as st

from guardian import compare
from guardian.ui import charts, state, widgets

LABEL_CHOICES = {"unsafe": 1, "safe": 0, "not sure": None}

widgets.page_setup("compare")
widgets.page_intro(
    "Compare two versions",
    "Run a fixed set of test prompts through two judges, usually the base judge (*before*) and the judge with "
    "the LoRA adapter (*after*), and see what changed: which verdicts flipped, how much the attention and the "
    "internal representations moved, and where the adapter changed the weights.",
)
slots = state.all_slots()


def pick_versions():
    labels = {s.key: s.label for s in slots}
    keys = list(labels)
    left, right = st.columns(2)
    before = left.selectbox("Before", keys, index=0, format_func=labels.get, key="_compare_before")
    after = right.selectbox("After", keys, index=min(1, len(keys) - 1), format_func=labels.get,
                            key="_compare_after")
    return state.slot_by_key(before), state.slot_by_key(after)


def suite_inputs():
    suite = state.suite_frame()
    with st.expander(f"The test prompts ({len(suite)} of them)", icon=":material/list:"):
        st.dataframe(suite, hide_index=True, width="stretch")
        extra = st.text_area("Add your own prompts, one per line", key="_compare_extra", height=90,
                             max_chars=state.MAX_PROMPT_CHARS)
        meant = st.radio("Your added prompts are", list(LABEL_CHOICES), index=2, horizontal=True,
                         key="_compare_extra_label",
                         help="Used to count how many prompts each judge gets right. With 'not sure', the "
                              "count of right answers is left out.")
    added = [line.strip() for line in extra.splitlines() if line.strip()]
    if len(added) > state.MAX_ADDED_PROMPTS:
        st.warning(f"Only the first {state.MAX_ADDED_PROMPTS} of your {len(added)} added prompts are used.",
                   icon=":material/content_cut:")
        added = added[: state.MAX_ADDED_PROMPTS]
    prompts = tuple(suite["prompt"]) + tuple(added)
    kinds = tuple(suite["kind"]) + ("added",) * len(added)
    label = LABEL_CHOICES[meant]
    labels = None if added and label is None else tuple(int(x) for x in suite["label"]) + (label,) * len(added)
    return prompts, labels, kinds


def overview(result, before, after) -> None:
    frame = result.to_frame()
    flips = int(result.flipped.sum())
    accuracy = result.accuracy()
    columns = st.columns(3)
    columns[0].metric("Verdicts that flipped", f"{flips} of {len(frame)}", border=True)
    if not accuracy:
        columns[1].caption("Right answers are counted when every prompt has a known label (safe or unsafe).")
    else:
        columns[1].metric(f"Right answers, {widgets.plain(before.label)}", f"{accuracy['base']:.0%}", border=True)
        columns[2].metric(f"Right answers, {widgets.plain(after.label)}", f"{accuracy['lora']:.0%}",
                          delta=f"{accuracy['lora'] - accuracy['base']:+.0%}", border=True)
    st.subheader("Prompt by prompt", anchor=False)
    st.caption("Change = p(unsafe) after minus before. Rows in orange are prompts whose verdict flipped.")
    number = st.column_config.NumberColumn
    st.dataframe(widgets.highlight_rows(frame, "flipped", "#fde0c5"), hide_index=True, width="stretch",
                 column_config={
                     "base_p_unsafe": number("p(unsafe) before", format="%.3f"),
                     "lora_p_unsafe": number("p(unsafe) after", format="%.3f"),
                     "change": number("change", format="%+.3f"),
                     "flipped": st.column_config.CheckboxColumn("verdict flipped"),
                     "attention_change": number("attention moved", format="%.3f",
                                                help="How much the attention patterns changed (all heads)."),
                     "representation_shift": number("representation moved", format="%.4f",
                                                    help="1 − cosine similarity of the internal states, averaged "
                                                         "over the layers."),
                     "label": number("true label (1 = unsafe)", format="%d"),
                 })
    widgets.downloads("comparison", frame=frame, result=result)
    left, right = st.columns(2)
    with left:
        st.markdown("**Change in p(unsafe) for each prompt**")
        st.altair_chart(charts.change_chart(frame), width="stretch")
    with right:
        st.markdown("**Did prompts whose attention moved more also change verdict more?**")
        st.altair_chart(charts.change_vs_attention_chart(frame), width="stretch")


def layers(result, after) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Which layers changed", anchor=False)
        st.caption("How far each layer's internal representation moved between the two judges (1 − cosine "
                   "similarity, averaged over the prompts; 0 = unchanged).")
        st.altair_chart(charts.layer_shift_chart(result.layer_frame()), width="stretch")
        widgets.downloads("layer_shift", frame=result.layer_frame())
    with right:
        st.subheader("Where the adapter changed the weights", anchor=False)
        weights = compare.weight_change(after.judge)
        if weights.empty:
            st.info("The 'after' judge carries no record of an adapter, so there is no weight change to show.")
            return
        st.caption("The size of each adapted weight matrix's change (Frobenius norm), per layer.")
        st.altair_chart(charts.weight_change_chart(weights), width="stretch")
        widgets.downloads("weight_change", frame=weights)


def drill_down(result, before, after) -> None:
    st.subheader("One prompt, both judges", anchor=False)
    options = list(dict.fromkeys(([state.prompt()] if state.prompt().strip() else []) + list(result.prompts)))
    chosen = st.selectbox("Prompt", options, key="_compare_drill", format_func=lambda p: widgets.quoted(p, 100),
                          help="The first entry is the prompt from the prompt box (shared with the other pages).")
    method, baseline, steps = state.settings()
    with st.spinner("Scoring the words for both judges…"):
        a = state.analyse("attribute", before, chosen, method, baseline, steps)
        b = state.analyse("attribute", after, chosen, method, baseline, steps)
    scale = widgets.score_scale(a.word_scores, b.word_scores)
    for column, slot, attr in zip(st.columns(2), (before, after), (a, b)):
        with column:
            st.markdown(f"**{widgets.plain(slot.label)}**: p(unsafe) = {attr.p_unsafe:.2f}")
            widgets.show_word_heatmap(attr, scale)
    if a.token_ids == b.token_ids:
        shift = compare.attribution_shift(a.token_scores, b.token_scores)
        st.markdown(f"Attribution shift: **{shift:.2f}** on a scale from 0 (the judges blame the same words in the "
                    "same proportions) to 2 (completely different words).")


if len(slots) < 2:
    st.info("Two judges are needed to compare; see the sidebar.")
else:
    before, after = pick_versions()
    if before.key == after.key:
        st.info("Choose two different judges to compare.")
    else:
        prompts, labels, kinds = suite_inputs()
        with widgets.friendly_errors("comparing the two judges"):
            with st.spinner(f"Running {len(prompts)} prompts through both judges…"):
                result = state.analyse("compare_versions", (before, after), prompts, labels, kinds)
            overview(result, before, after)
            layers(result, after)
            with widgets.friendly_errors("comparing the word scores of one prompt"):
                drill_down(result, before, after)
