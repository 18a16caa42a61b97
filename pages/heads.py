"""Heads: which attention heads look at the words that matter, and whether those heads matter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from guardian.ui import charts, state, widgets

DEFAULT_WORDS = 2
MAX_PATTERN_TOKENS = 64  # a bigger token × token grid is too large to draw in a browser

widgets.page_setup("heads")
widgets.page_intro(
    "Attention heads",
    "Inside each layer, several *attention heads* decide which words to look at. This page finds the heads "
    "that look most at the words behind the verdict, and then switches each head off in turn to see "
    "whether the verdict actually depends on it.",
)
text = widgets.prompt_box("heads")
slots = state.shown_slots()
method, baseline, steps = state.settings()


def unique_words(words) -> list[str]:
    seen, kept = set(), []
    for word in words:
        if word.strip() and word.lower() not in seen:
            seen.add(word.lower())
            kept.append(word)
    return kept


def page(slot) -> None:
    with st.spinner("Finding the words behind the verdict…"):
        attr = state.analyse("attribute", slot, text, method, baseline, steps)
    options = unique_words(attr.words)
    default = unique_words(w for w, s in attr.top_words(DEFAULT_WORDS) if s > 0) or options[:1]
    tag = widgets.text_tag(slot.key, text)
    chosen = st.multiselect(
        "Safety words to follow", options, default=default, key=f"_heads_words_{tag}",
        help="By default the words that push most toward unsafe (from the word heatmap). Pick any words of the "
             "prompt to see which heads attend to them.")
    widgets.truncation_notice(attr.truncated, slot.judge.max_tokens)
    if not chosen:
        st.info("Pick at least one word to follow.", icon=":material/touch_app:")
        return

    with st.spinner("Reading every head's attention…"):
        patterns, attention = state.analyse("attention", slot, text, tuple(chosen))
    if attention is None:
        st.info("None of the chosen words matches the judge's tokens; try other words.")
        return
    grid = attention.to_frame()

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Attention to the chosen words", anchor=False)
        st.caption("Each square is one head. Darker means that head spends more of its attention on the chosen "
                   "words (averaged over every token of the prompt).")
        st.altair_chart(charts.head_grid_chart(grid), width="stretch")
    with right:
        st.subheader("Top 10 heads", anchor=False)
        st.altair_chart(charts.top_heads_chart(grid), width="stretch")
    widgets.downloads(f"head_attention_{slot.key}", frame=grid)

    st.subheader("What one head looks at", anchor=False)
    heads_list = [(int(r.layer), int(r.head)) for r in grid.itertuples()]  # strongest first
    picked = st.selectbox("Head", heads_list, key=f"_heads_head_{widgets.text_tag(tag, *chosen)}",
                          format_func=lambda lh: f"Layer {lh[0]} · head {lh[1]}",
                          help="Listed from the head that looks most at the chosen words to the least.")
    layer, head = picked
    st.caption("Each row is a token reading the prompt; the colour shows where its attention goes.")
    n = min(len(patterns.tokens), MAX_PATTERN_TOKENS)
    if n < len(patterns.tokens):
        st.caption(f"Showing the first {n} of {len(patterns.tokens)} tokens.")
    st.altair_chart(charts.head_pattern_chart(patterns.tokens[:n], patterns.head_pattern(layer, head)[:n, :n],
                                              f"Layer {layer} · head {head}"), width="content")

    st.subheader("Do the heads that look at the words also matter?", anchor=False)
    with st.spinner("Switching off each head in turn…"):
        ablation = state.analyse("head_ablation", slot, text)
    effects = ablation.to_frame()
    merged = grid.merge(effects, on=["layer", "head"])
    st.caption(f"Switching a head off means zeroing its output. With every head on, p(unsafe) is "
               f"{ablation.p_unsafe:.2f}. The vertical axis is the change in the judge's *unsafe score* (the "
               "log-odds behind p(unsafe), which still moves when p(unsafe) is close to 0 or 1; a change of 1 "
               "is noticeable). Heads far from the zero line matter for this verdict.")
    st.altair_chart(charts.attention_vs_ablation_chart(merged), width="stretch")
    st.markdown(link_sentence(merged))
    st.dataframe(merged, hide_index=True, width="stretch",
                 column_config={"attention": st.column_config.NumberColumn("attention to the words", format="%.3f"),
                                "delta_p_unsafe": st.column_config.NumberColumn("change in p(unsafe)",
                                                                                format="%+.4f"),
                                "p_unsafe_ablated": st.column_config.NumberColumn("p(unsafe) with head off",
                                                                                  format="%.3f"),
                                "delta_log_odds": st.column_config.NumberColumn("change in score (log-odds)",
                                                                                format="%+.3f")})
    widgets.downloads(f"head_ablation_{slot.key}", frame=merged, result=ablation)


def link_sentence(merged: pd.DataFrame) -> str:
    """Whether attention to the words goes with a large effect when the head is switched off."""
    effect = merged["delta_log_odds"].abs().to_numpy()
    looking = merged["attention"].to_numpy()
    if effect.std() < 1e-9 or looking.std() < 1e-9:
        return "No head changes the score noticeably on its own, so attention and importance cannot be compared."
    r = float(np.corrcoef(looking, effect)[0, 1])
    strength = "strongly" if abs(r) >= 0.5 else "weakly" if abs(r) >= 0.2 else "hardly"
    return (f"Attention to the words and the effect of switching a head off are **{strength}** related "
            f"(correlation {r:+.2f}). A head can look at a word without the verdict depending on it.")


if not slots:
    st.info("No judge is available yet; see the message in the sidebar.")
elif widgets.need_prompt(text):
    slot = widgets.choose_judge("heads", slots)
    with widgets.friendly_errors("looking inside the attention heads"):
        page(slot)
