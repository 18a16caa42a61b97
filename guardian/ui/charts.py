"""Altair charts of the app, as pure functions: plain data in, `alt.Chart` out (no Streamlit here).

Colours follow one rule everywhere: red means toward *unsafe*, blue toward *safe*; signed scores use
a diverging scale centred on zero so white means "no effect".
"""

from __future__ import annotations

from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd

from guardian.scoring import THRESHOLD

UNSAFE_COLOR = "#b2182b"
SAFE_COLOR = "#2166ac"
NEUTRAL_COLOR = "#f7f7f7"
ACCENT_COLOR = "#1f6f78"
FLIP_COLOR = "#e66101"


def _diverging(values: Sequence[float] | np.ndarray) -> alt.Scale:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    bound = bound or 1.0
    return alt.Scale(domain=[-bound, 0, bound], range=[SAFE_COLOR, NEUTRAL_COLOR, UNSAFE_COLOR])


def _verdict_color() -> alt.Scale:
    return alt.Scale(domain=["unsafe", "safe"], range=[UNSAFE_COLOR, SAFE_COLOR])


def _threshold_rule(axis: str = "x") -> alt.Chart:
    encoding = {axis: alt.datum(THRESHOLD)}
    return alt.Chart().mark_rule(strokeDash=[4, 3], color="#555").encode(**encoding)


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Unique axis labels for tokens, which may repeat: 'position · token'."""
    return [f"{i} · {t}" for i, t in enumerate(tokens)]


# ----- probe -----------------------------------------------------------------------------------
def verdict_chart(frame: pd.DataFrame) -> alt.Chart:
    """Horizontal bars of p(unsafe) per judge (columns judge, p_unsafe) with the 0.5 line."""
    data = frame.assign(verdict=np.where(frame["p_unsafe"] >= THRESHOLD, "unsafe", "safe"))
    bars = alt.Chart(data).mark_bar(cornerRadiusEnd=3, height=26).encode(
        x=alt.X("p_unsafe:Q", title="p(unsafe): the judge's probability that the prompt is unsafe",
                scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("judge:N", title=None, sort=None),
        color=alt.Color("verdict:N", scale=_verdict_color(), title="Verdict"),
        tooltip=[alt.Tooltip("judge:N", title="Judge"), alt.Tooltip("p_unsafe:Q", title="p(unsafe)", format=".3f"),
                 alt.Tooltip("verdict:N", title="Verdict")],
    )
    labels = alt.Chart(data).mark_text(align="left", dx=4).encode(
        x="p_unsafe:Q", y=alt.Y("judge:N", sort=None), text=alt.Text("p_unsafe:Q", format=".2f"))
    return alt.layer(bars, labels, _threshold_rule("x"), data=data).properties(height=40 + 38 * len(data))


def token_chart(tokens: Sequence[str], scores: Sequence[float], title: str = "") -> alt.Chart:
    """One bar per token: its attribution score, red toward unsafe and blue toward safe."""
    data = pd.DataFrame({"position": np.arange(len(tokens)), "token": list(tokens), "label": token_labels(tokens),
                         "score": np.asarray(scores, dtype=float)})
    return alt.Chart(data, title=title).mark_bar().encode(
        x=alt.X("label:N", sort=None, title="Token (position · token)", axis=alt.Axis(labelAngle=-50)),
        y=alt.Y("score:Q", title="Push toward unsafe (+) or safe (−)"),
        color=alt.Color("score:Q", scale=_diverging(data["score"]), legend=None),
        tooltip=[alt.Tooltip("position:Q", title="Position"), alt.Tooltip("token:N", title="Token"),
                 alt.Tooltip("score:Q", title="Score", format="+.3f")],
    ).properties(height=260)


def layer_activation_chart(frame: pd.DataFrame) -> alt.Chart:
    """Mean activation size per layer, one line per judge (columns judge, layer, mean_activation_norm)."""
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("layer:O", title="Layer (0 = first)"),
        y=alt.Y("mean_activation_norm:Q", title="Average activation size"),
        color=alt.Color("judge:N", title="Judge"),
        tooltip=[alt.Tooltip("judge:N", title="Judge"), alt.Tooltip("layer:O", title="Layer"),
                 alt.Tooltip("mean_activation_norm:Q", title="Size", format=".2f")],
    ).properties(height=240)


def mutation_chart(frame: pd.DataFrame) -> alt.Chart:
    """p(unsafe) of each rewrite (columns description, kind, p_unsafe, flipped), flips in orange."""
    data = frame.reset_index(drop=True).assign(rank=lambda f: np.arange(len(f)),
                                               outcome=lambda f: np.where(f["flipped"], "flips the verdict",
                                                                          "keeps the verdict"))
    points = alt.Chart(data).mark_circle(size=70).encode(
        x=alt.X("rank:O", title="Rewrites, biggest drop in p(unsafe) first", axis=alt.Axis(labels=False, ticks=False)),
        y=alt.Y("p_unsafe:Q", title="p(unsafe) after the rewrite", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("outcome:N", scale=alt.Scale(domain=["flips the verdict", "keeps the verdict"],
                                                     range=[FLIP_COLOR, "#8c8c8c"]), title=None),
        tooltip=[alt.Tooltip("description:N", title="Rewrite"), alt.Tooltip("kind:N", title="Kind"),
                 alt.Tooltip("p_unsafe:Q", title="p(unsafe)", format=".3f")],
    )
    return alt.layer(points, _threshold_rule("y"), data=data).properties(height=220)


# ----- heads -----------------------------------------------------------------------------------
def head_grid_chart(frame: pd.DataFrame, value: str = "attention", title: str = "",
                    value_title: str = "Attention to the chosen words") -> alt.Chart:
    """A layer × head heatmap (columns layer, head, `value`)."""
    return alt.Chart(frame, title=title).mark_rect().encode(
        x=alt.X("head:O", title="Head"),
        y=alt.Y("layer:O", title="Layer", sort="ascending"),
        color=alt.Color(f"{value}:Q", title=value_title, scale=alt.Scale(scheme="oranges")),
        tooltip=[alt.Tooltip("layer:O", title="Layer"), alt.Tooltip("head:O", title="Head"),
                 alt.Tooltip(f"{value}:Q", title=value_title, format=".3f")],
    ).properties(height=max(160, 26 * frame["layer"].nunique()))


def top_heads_chart(frame: pd.DataFrame, value: str = "attention", k: int = 10,
                    value_title: str = "Attention to the chosen words") -> alt.Chart:
    """The k heads with the largest `value`, as horizontal bars labelled 'L layer · H head'."""
    data = frame.nlargest(k, value).assign(name=lambda f: [f"L{l} · H{h}" for l, h in zip(f["layer"], f["head"])])
    return alt.Chart(data).mark_bar(color=ACCENT_COLOR).encode(
        x=alt.X(f"{value}:Q", title=value_title),
        y=alt.Y("name:N", sort="-x", title="Layer · head"),
        tooltip=[alt.Tooltip("layer:O", title="Layer"), alt.Tooltip("head:O", title="Head"),
                 alt.Tooltip(f"{value}:Q", title=value_title, format=".3f")],
    ).properties(height=30 + 22 * len(data))


def head_pattern_chart(tokens: Sequence[str], pattern: np.ndarray, title: str = "") -> alt.Chart:
    """One head's attention: rows are the reading token, columns the token it looks at."""
    labels = token_labels(tokens)
    n = len(labels)
    query, key = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    data = pd.DataFrame({"from": np.array(labels)[query.ravel()], "to": np.array(labels)[key.ravel()],
                         "attention": np.asarray(pattern, dtype=float).ravel()})
    return alt.Chart(data, title=title).mark_rect().encode(
        x=alt.X("to:N", sort=labels, title="Looks at this token", axis=alt.Axis(labelAngle=-50)),
        y=alt.Y("from:N", sort=labels, title="Token doing the looking"),
        color=alt.Color("attention:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="Attention"),
        tooltip=[alt.Tooltip("from:N", title="From"), alt.Tooltip("to:N", title="To"),
                 alt.Tooltip("attention:Q", title="Attention", format=".3f")],
    ).properties(height=max(220, 18 * n), width=max(220, 18 * n))


def attention_vs_ablation_chart(frame: pd.DataFrame) -> alt.Chart:
    """Each head: attention to the chosen words (x) against the change in the unsafe score when it is
    switched off (y). Columns layer, head, attention, delta_log_odds (and optionally delta_p_unsafe).

    The score is the log-odds of unsafe, which still moves when p(unsafe) is stuck near 0 or 1.
    """
    data = frame.assign(name=[f"L{l} · H{h}" for l, h in zip(frame["layer"], frame["head"])],
                        effect=np.where(frame["delta_log_odds"] < 0, "switching it off lowers the score",
                                        "switching it off raises the score"))
    tooltip = [alt.Tooltip("name:N", title="Head"), alt.Tooltip("attention:Q", title="Attention", format=".3f"),
               alt.Tooltip("delta_log_odds:Q", title="Change in score (log-odds)", format="+.3f")]
    if "delta_p_unsafe" in data:
        tooltip.append(alt.Tooltip("delta_p_unsafe:Q", title="Change in p(unsafe)", format="+.4f"))
    points = alt.Chart(data).mark_circle(size=70, opacity=0.8).encode(
        x=alt.X("attention:Q", title="Attention paid to the chosen words"),
        y=alt.Y("delta_log_odds:Q", title="Change in the unsafe score when switched off"),
        color=alt.Color("effect:N", title=None,
                        scale=alt.Scale(domain=["switching it off lowers the score",
                                                "switching it off raises the score"],
                                        range=[SAFE_COLOR, UNSAFE_COLOR])),
        tooltip=tooltip,
    )
    zero = alt.Chart().mark_rule(color="#888").encode(y=alt.datum(0))
    return alt.layer(points, zero, data=data).properties(height=300)


# ----- circuit ---------------------------------------------------------------------------------
def divergence_chart(frame: pd.DataFrame, critical_layer: int | None) -> alt.Chart:
    """Distance between the two prompts' internal states per layer, the critical layer marked."""
    line = alt.Chart(frame).mark_line(point=True, color=ACCENT_COLOR).encode(
        x=alt.X("layer:Q", title="Layer (0 = word embeddings)", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("l2:Q", title="Distance between the two prompts"),
        tooltip=[alt.Tooltip("layer:Q", title="Layer"), alt.Tooltip("l2:Q", title="Distance", format=".3f"),
                 alt.Tooltip("cosine:Q", title="Cosine similarity", format=".3f")],
    )
    layers = [line]
    if critical_layer is not None:
        mark = pd.DataFrame({"layer": [critical_layer], "label": [f"critical layer {critical_layer}"]})
        layers.append(alt.Chart(mark).mark_rule(color=UNSAFE_COLOR, strokeDash=[5, 3], size=2).encode(x="layer:Q"))
        layers.append(alt.Chart(mark).mark_text(align="left", dx=5, dy=-6, color=UNSAFE_COLOR).encode(
            x="layer:Q", y=alt.value(8), text="label:N"))
    return alt.layer(*layers).properties(height=260)


def logit_lens_chart(frame: pd.DataFrame) -> alt.Chart:
    """p(unsafe) read after each layer, one line per prompt (columns prompt, layer, p_unsafe)."""
    lines = alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="Read after layer (0 = word embeddings)", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("p_unsafe:Q", title="p(unsafe) read at this layer", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("prompt:N", title="Prompt",
                        scale=alt.Scale(domain=["unsafe prompt", "safe twin"], range=[UNSAFE_COLOR, SAFE_COLOR])),
        tooltip=[alt.Tooltip("prompt:N", title="Prompt"), alt.Tooltip("layer:Q", title="Layer"),
                 alt.Tooltip("p_unsafe:Q", title="p(unsafe)", format=".3f")],
    )
    return alt.layer(lines, _threshold_rule("y"), data=frame).properties(height=260)


def patching_chart(frame: pd.DataFrame, labels: Sequence[str]) -> alt.Chart:
    """Layer × position grid of the share of the verdict each patched state restores.

    `frame` has columns layer, position (index into `labels`), restored, patched_score.
    """
    data = frame.assign(label=[labels[i] for i in frame["position"]])
    return alt.Chart(data).mark_rect().encode(
        x=alt.X("label:N", sort=list(labels), title="Position · token (unsafe / safe where they differ)",
                axis=alt.Axis(labelAngle=-50)),
        y=alt.Y("layer:O", title="Layer", sort="descending"),
        color=alt.Color("restored:Q", title="Share restored", scale=_diverging(data["restored"])),
        tooltip=[alt.Tooltip("label:N", title="Position"), alt.Tooltip("layer:O", title="Layer"),
                 alt.Tooltip("restored:Q", title="Share of the unsafe verdict restored", format=".2f"),
                 alt.Tooltip("patched_score:Q", title="Score after patching", format=".2f")],
    ).properties(height=max(180, 24 * data["layer"].nunique()))


# ----- compare ---------------------------------------------------------------------------------
def change_chart(frame: pd.DataFrame) -> alt.Chart:
    """Change in p(unsafe) (after minus before) per prompt, flipped verdicts in another colour."""
    data = frame.reset_index(drop=True).assign(
        number=lambda f: np.arange(1, len(f) + 1),
        outcome=lambda f: np.where(f["flipped"], "verdict flipped", "same verdict"))
    return alt.Chart(data).mark_bar().encode(
        x=alt.X("number:O", title="Prompt number (hover for the text)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("change:Q", title="Change in p(unsafe)"),
        color=alt.Color("outcome:N", title=None,
                        scale=alt.Scale(domain=["verdict flipped", "same verdict"], range=[FLIP_COLOR, "#9aa5b1"])),
        tooltip=[alt.Tooltip("prompt:N", title="Prompt"), alt.Tooltip("change:Q", title="Change", format="+.3f"),
                 alt.Tooltip("base_p_unsafe:Q", title="Before", format=".3f"),
                 alt.Tooltip("lora_p_unsafe:Q", title="After", format=".3f")],
    ).properties(height=260)


def change_vs_attention_chart(frame: pd.DataFrame) -> alt.Chart:
    """Per prompt: how much attention moved (x) against how much p(unsafe) moved (y)."""
    data = frame.assign(outcome=np.where(frame["flipped"], "verdict flipped", "same verdict"))
    return alt.Chart(data).mark_circle(size=70, opacity=0.85).encode(
        x=alt.X("attention_change:Q", title="How much the attention patterns changed"),
        y=alt.Y("change:Q", title="Change in p(unsafe)"),
        color=alt.Color("outcome:N", title=None,
                        scale=alt.Scale(domain=["verdict flipped", "same verdict"], range=[FLIP_COLOR, "#9aa5b1"])),
        tooltip=[alt.Tooltip("prompt:N", title="Prompt"), alt.Tooltip("change:Q", title="Change", format="+.3f"),
                 alt.Tooltip("attention_change:Q", title="Attention change", format=".3f")],
    ).properties(height=280)


def layer_shift_chart(frame: pd.DataFrame) -> alt.Chart:
    """Per layer: how far the representation moved (1 − cosine), averaged over the prompts."""
    return alt.Chart(frame).mark_line(point=True, color=ACCENT_COLOR).encode(
        x=alt.X("layer:O", title="Layer"),
        y=alt.Y("representation_shift:Q", title="Representation shift (1 − cosine)"),
        tooltip=[alt.Tooltip("layer:O", title="Layer"),
                 alt.Tooltip("representation_shift:Q", title="Shift", format=".4f"),
                 alt.Tooltip("attention_change:Q", title="Attention change", format=".3f")],
    ).properties(height=240)


def weight_change_chart(frame: pd.DataFrame) -> alt.Chart:
    """Size of the adapter's weight change per layer, stacked by module kind (columns layer, kind, norm)."""
    data = frame.assign(where=np.where(frame["layer"] >= 0, "layer " + frame["layer"].astype(str), "outside blocks"))
    return alt.Chart(data).mark_bar().encode(
        x=alt.X("where:N", title="Where", sort=None),
        y=alt.Y("norm:Q", title="Size of the weight change (Frobenius norm)"),
        color=alt.Color("kind:N", title="Module"),
        tooltip=[alt.Tooltip("module:N", title="Module"), alt.Tooltip("norm:Q", title="Change", format=".3f")],
    ).properties(height=240)


# ----- loop ------------------------------------------------------------------------------------
def before_after_chart(frame: pd.DataFrame) -> alt.Chart:
    """p(unsafe) before (x) and after (y) an update, one point per prompt coloured by its right label."""
    data = frame.assign(label=frame["label"].astype(str), change=frame["change"].replace("", "unchanged"))
    points = alt.Chart(data).mark_circle(size=70, opacity=0.8).encode(
        x=alt.X("p_unsafe_before:Q", title="p(unsafe) before the update", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("p_unsafe_after:Q", title="p(unsafe) after the update", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("label:N", scale=_verdict_color(), title="Right label"),
        shape=alt.Shape("change:N", title="Verdict"),
        tooltip=[alt.Tooltip("prompt:N", title="Prompt"), alt.Tooltip("label:N", title="Right label"),
                 alt.Tooltip("p_unsafe_before:Q", title="Before", format=".3f"),
                 alt.Tooltip("p_unsafe_after:Q", title="After", format=".3f"), alt.Tooltip("change:N", title="Change")],
    )
    return alt.layer(points, _threshold_rule("x"), _threshold_rule("y"), data=data).properties(height=320)


def loss_chart(losses: Sequence[float]) -> alt.Chart:
    """The training loss (mean so far in its epoch) after each step."""
    data = pd.DataFrame({"step": np.arange(1, len(losses) + 1), "loss": np.asarray(losses, dtype=float)})
    return alt.Chart(data, title="Training loss").mark_line(color=ACCENT_COLOR).encode(
        x=alt.X("step:Q", title="Training step"), y=alt.Y("loss:Q", title="Loss (mean over the epoch so far)"),
        tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("loss:Q", format=".4f")],
    ).properties(height=220)
