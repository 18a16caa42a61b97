"""Heatmap: which words push each judge toward unsafe (red) or safe (blue), and how far to trust it."""

from __future__ import annotations

import streamlit as st

from guardian.ui import charts, state, widgets

OTHER_METHOD = {"ig": "occlusion", "occlusion": "ig", "grad_x_input": "ig"}

widgets.page_setup("heatmap")
widgets.page_intro(
    "Word heatmap",
    "Each word is coloured by how much it pushed the judge's score: **red** toward unsafe, **blue** toward "
    "safe, white for no effect. The base and LoRA judges are shown side by side on the same colour scale.",
)
text = widgets.prompt_box("heatmap")
widgets.settings_widgets("heatmap", columns=st.columns(3))
slots = state.shown_slots()
method, baseline, steps = state.settings()


def judge_column(slot, attr, scale: float) -> None:
    st.subheader(slot.label, anchor=False)
    st.caption(f"p(unsafe) = {attr.p_unsafe:.2f} · {state.METHOD_NAMES[attr.method]}, baseline: "
               f"{state.BASELINE_NAMES[attr.baseline].lower()}")
    widgets.show_word_heatmap(attr, scale)
    widgets.truncation_notice(attr.truncated, slot.judge.max_tokens)
    st.altair_chart(charts.token_chart(attr.tokens, attr.token_scores, "Score of every token"), width="stretch")
    st.caption(widgets.convergence_sentence(attr.method, attr.delta, attr.delta_fraction))
    with widgets.friendly_errors("checking how faithful the word scores are"):
        with st.spinner("Checking the explanation…"):
            faith = state.analyse("faithfulness", slot, text, method, baseline, steps)
            agree = state.analyse("agreement", slot, text, method, OTHER_METHOD[method], baseline, steps)
        grade, color, sentences = widgets.faithfulness_summary(attr.p_unsafe, faith.comprehensiveness,
                                                               faith.sufficiency, agree)
        st.badge(f"Explanation: {grade}", color=color, icon=":material/verified:")
        for sentence in sentences:
            st.caption(sentence)
    words = attr.to_frame("word")
    widgets.downloads(f"heatmap_{slot.key}", frame=words, result=attr,
                      png=widgets.cached_heatmap_png(tuple(attr.words), tuple(map(float, attr.word_scores)),
                                                     f"{slot.label}: p(unsafe) {attr.p_unsafe:.2f}", scale))


if not slots:
    st.info("No judge is available yet; see the message in the sidebar.")
elif widgets.need_prompt(text):
    with widgets.friendly_errors("computing the word scores"):
        with st.spinner(f"Scoring every word ({state.METHOD_NAMES[method].lower()})…"):
            attributions = [state.analyse("attribute", s, text, method, baseline, steps) for s in slots]
        scale = widgets.score_scale(*(a.word_scores for a in attributions))
        for column, slot, attr in zip(st.columns(len(slots)), slots, attributions):
            with column:
                with widgets.friendly_errors(f"drawing the {slot.label}"):
                    judge_column(slot, attr, scale)
