"""Probe: the judges' verdict on a prompt, why they reached it, and the rewrites that change it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from guardian.ui import charts, state, widgets

MUTATION_LIMIT = 48
TARGET_WORDS = 3

widgets.page_setup("probe")
widgets.page_intro(
    "Probe a prompt",
    "See how each judge rates a prompt, which words drove the decision, and whether simple rewrites "
    "(misspellings, softer words, role-play framings) slip it past the judge.",
)
text = widgets.prompt_box("probe")
slots = state.shown_slots()
method, baseline, steps = state.settings()


def verdicts() -> None:
    results = {s.label: state.analyse("verdict", s, text) for s in slots}
    frame = pd.DataFrame({"judge": list(results), "p_unsafe": [v.p_unsafe for v in results.values()]})
    columns = st.columns(len(results))
    for column, (label, result) in zip(columns, results.items()):
        column.metric(widgets.plain(label), result.label.upper(), f"p(unsafe) = {result.p_unsafe:.2f}",
                      delta_color="red" if result.unsafe else "blue", delta_arrow="off", border=True,
                      help="p(unsafe) is the judge's probability that the prompt is unsafe; 0.5 or more counts as "
                           "unsafe.")
    st.altair_chart(charts.verdict_chart(frame), width="stretch")
    widgets.truncation_notice(any(v.truncated for v in results.values()), slots[0].judge.max_tokens)
    first = next(iter(results.values()))
    widgets.add_to_patch_controls(text, f"probe_{widgets.text_tag(text)}", "safe" if first.unsafe else "unsafe")
    widgets.downloads("verdicts", frame=frame)


def explanation_and_rewrites() -> None:
    main = slots[0]
    other = slots[1] if len(slots) > 1 else None
    with st.spinner("Finding the words that matter and trying rewrites…"):
        attr = state.analyse("attribute", main, text, method, baseline, steps)
        targets = tuple(w for w, s in attr.top_words(TARGET_WORDS) if s > 0) or tuple(
            w for w, _ in attr.top_words(1))
        result = state.analyse("probe", (main, other), text, targets, MUTATION_LIMIT)

    st.subheader("Why this verdict", anchor=False)
    widgets.explanation_card(widgets.explanation(main.label.lower(), attr.p_unsafe, attr.words,
                                                 attr.word_scores, result))
    st.caption("Word scores come from the first judge shown, measured with "
               f"{state.METHOD_NAMES[attr.method].lower()}. Red words push toward unsafe, blue toward safe.")
    heatmap_columns = st.columns(len(slots))
    attributions = [attr] + [state.analyse("attribute", s, text, method, baseline, steps) for s in slots[1:]]
    scale = widgets.score_scale(*(a.word_scores for a in attributions))
    for column, slot, a in zip(heatmap_columns, slots, attributions):
        with column:
            st.markdown(f"**{widgets.plain(slot.label)}**")
            widgets.show_word_heatmap(a, scale)

    st.subheader("Rewrites that try to dodge the judge", anchor=False)
    st.markdown(
        f"We rewrote the prompt {len(result.mutations)} ways around the words the {widgets.plain(main.label.lower())} "
        f"leans on most ({widgets.plain(', '.join(targets))}) and scored every rewrite. Rows in orange **flip the "
        "verdict**: the judge changes its mind.")
    if not result.mutations:
        st.info("No rewrites could be made for this prompt.")
        return
    flips, total = int(result.flipped.sum()), len(result.mutations)
    st.metric("Robustness", f"{result.robustness:.0%}", help="Share of rewrites that keep the original verdict.",
              delta=f"{flips} of {total} rewrites flip the verdict", delta_color="orange" if flips else "gray",
              delta_arrow="off")
    frame = result.to_frame()
    shown = frame.rename(columns={"mutation": "rewrite", "description": "what was done", "p_unsafe": "p(unsafe)",
                                  "drop": "drop in p(unsafe)", "flipped": "flips verdict"})
    if other is not None:
        shown = shown.rename(columns={"other_p_unsafe": f"p(unsafe), {other.label}",
                                      "other_flipped": f"flips {other.label}"}).drop(columns=["other_drop"])
    shown = shown.drop(columns=["truncated", "target"])
    st.dataframe(widgets.highlight_rows(shown, "flips verdict", "#fde0c5"), hide_index=True, width="stretch",
                 column_config={"p(unsafe)": st.column_config.NumberColumn(format="%.3f"),
                                "drop in p(unsafe)": st.column_config.NumberColumn(format="%+.3f")})
    st.altair_chart(charts.mutation_chart(frame), width="stretch")
    widgets.downloads("rewrites", frame=frame, result=result)

    options = list(range(len(result.mutations)))
    choice = st.selectbox("Pick a rewrite to analyse it", options, key=f"_probe_rewrite_{widgets.text_tag(text)}",
                          format_func=lambda i: f"{result.mutations[i].description}  →  p(unsafe) "
                                                f"{result.p_unsafe[i]:.2f}")
    st.button("Load this rewrite into the prompt box", icon=":material/input:", key="_probe_load",
              on_click=state.set_value, args=(state.PROMPT, result.mutations[choice].text))
    widgets.add_to_patch_controls(result.mutations[choice].text, f"rewrite_{widgets.text_tag(text)}_{choice}",
                                  "unsafe" if result.verdict.unsafe else "safe", what="this rewrite")


def layer_activations() -> None:
    st.subheader("How strongly each layer responds", anchor=False)
    st.caption("Each layer is one processing step of the judge. The line shows the average size of its "
               "internal signals for this prompt; a jump marks where the prompt stirs the model most.")
    frames = [state.analyse("layer_activations", s, text).to_frame().assign(judge=s.label) for s in slots]
    frame = pd.concat(frames, ignore_index=True)
    st.altair_chart(charts.layer_activation_chart(frame), width="stretch")
    widgets.downloads("layer_activations", frame=frame)


if not slots:
    st.info("No judge is available yet; see the message in the sidebar.")
elif widgets.need_prompt(text):
    with widgets.friendly_errors("reading the judges' verdicts"):
        verdicts()
    with widgets.friendly_errors("explaining the verdict and trying rewrites"):
        explanation_and_rewrites()
    with widgets.friendly_errors("measuring the layers"):
        layer_activations()
