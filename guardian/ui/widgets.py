"""Page parts every page shares: the sidebar, the prompt box, errors, downloads and the word heatmap.

Any text a visitor typed (prompts, words, mutations, folder paths) is escaped before it is shown:
`html.escape` inside the HTML this module builds, and `plain` before it goes into Markdown.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import logging
import math
import re
import runpy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from guardian.judge import JudgeError
from guardian.scoring import THRESHOLD
from guardian.ui import state

log = logging.getLogger("guardian.ui")

ROUTER_PATH = Path(__file__).resolve().parents[2] / "streamlit_app.py"
UNSAFE_RGB = (178, 24, 43)  # the same red and blue as charts.UNSAFE_COLOR / SAFE_COLOR
SAFE_RGB = (33, 102, 172)
GLOSSARY = {
    "p(unsafe)": "the judge's probability, from 0 to 1, that the prompt is unsafe; 0.5 or more counts as unsafe.",
    "token": "a piece of a word as the judge reads it (long or rare words are split into several tokens).",
    "attribution": "how much each word pushed the judge's score toward unsafe (positive) or toward safe (negative).",
    "layer": "one of the judge's stacked processing steps; the text passes through them in order.",
    "head": "one of several attention units inside a layer; each one decides which words to look at.",
}


# ----- text safety -----------------------------------------------------------------------------
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$=])")


def plain(text: Any) -> str:
    """Text made inert for st.markdown/st.info/st.error: every Markdown character escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\n", "  \n")


def text_tag(*parts: str) -> str:
    """A short stable tag of some text, for widget keys that must reset when the text changes."""
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()[:10]


def quoted(text: str, limit: int = 80) -> str:
    """A short quotation of user text for messages (not yet escaped)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----- errors ----------------------------------------------------------------------------------
@contextmanager
def friendly_errors(doing: str) -> Iterator[None]:
    """Show a short sentence instead of a traceback if the block fails.

    A `JudgeError` is already worded for the visitor and is shown as it is; anything else is
    logged with its traceback on the server and replaced by a plain apology.
    """
    try:
        yield
    except JudgeError as error:
        st.error(plain(error), icon=":material/info:")
    except Exception:  # noqa: BLE001 - the visitor must never see a traceback
        log.exception("The app failed while %s", doing)
        st.error(
            f"Sorry, something went wrong while {doing}. The details were written to the server log. "
            "Try a shorter prompt or other settings, or reload the page.",
            icon=":material/error:",
        )


def need_prompt(text: str, what: str = "a prompt") -> bool:
    """True when there is text to analyse; otherwise shows a friendly hint."""
    if text.strip():
        return True
    st.info(f"Type {what} in the box above, or pick an example, to see the analysis.",
            icon=":material/edit:")
    return False


def truncation_notice(truncated: bool, max_tokens: int) -> None:
    if truncated:
        st.warning(
            f"This prompt is longer than the judge can read at once, so only its first {max_tokens} tokens "
            "were analysed. The rest was ignored by the judge.",
            icon=":material/content_cut:",
        )


# ----- shared widgets --------------------------------------------------------------------------
def _commit(key: str, widget_key: str) -> None:
    state.set_value(key, st.session_state[widget_key])


def mirrored(widget: Callable[..., Any], key: str, label: str, *, where: str, **kwargs) -> Any:
    """A widget editing the shared value `key`; several pages (or places) may each show one."""
    widget_key = f"_w_{where}_{key}"
    value = state.get(key)
    if st.session_state.get(widget_key) != value:
        st.session_state[widget_key] = value
    return widget(label, key=widget_key, on_change=_commit, args=(key, widget_key), **kwargs)


def prompt_box(where: str, *, key: str = state.PROMPT, label: str = "Prompt to judge",
               examples: bool = True, help: str | None = None) -> str:
    """The shared prompt (or, with key=state.PAIR, the circuit's second prompt) and example picker."""
    if examples:
        frame = state.examples()
        options = list(range(len(frame)))
        st.selectbox(
            "Example prompts", options, index=None, key=f"_example_{where}",
            format_func=lambda i: f"{quoted(frame.prompt[i], 70)}  ({frame.note[i]})",
            placeholder="Pick an example prompt to load it…", on_change=_load_example, args=(where,),
            help="Hand-picked prompts: clear cases, tricky safe ones and disguised unsafe ones.",
        )
    mirrored(st.text_area, key, label, where=where, height=96, max_chars=state.MAX_PROMPT_CHARS,
             placeholder="Type a prompt…",
             help=help or "Press Ctrl+Enter (or click outside the box) to analyse. The link in your "
                           "address bar always holds this prompt, so you can share what you see.")
    return str(state.get(key) or "")


def _load_example(where: str) -> None:
    chosen = st.session_state.get(f"_example_{where}")
    if chosen is not None:
        state.set_value(state.PROMPT, state.examples().prompt[int(chosen)])
        st.session_state[f"_example_{where}"] = None  # the menu only loads; it does not stay selected


def settings_widgets(where: str, *, steps_only: bool = False, columns: Sequence[Any] | None = None) -> None:
    """Attribution method, baseline and number of steps (shared by every page), optionally in columns."""
    places = iter(columns) if columns is not None else None

    def place():
        return next(places) if places is not None else st.container()

    if not steps_only:
        with place():
            mirrored(st.selectbox, state.METHOD, "Attribution method", where=where,
                     options=list(state.METHOD_NAMES), format_func=state.METHOD_NAMES.get,
                     help="How word importance is measured. Integrated gradients is the most careful; occlusion "
                          "removes one token at a time and watches the score; gradient × input is quickest.")
        with place():
            mirrored(st.selectbox, state.BASELINE, "Baseline", where=where,
                     options=list(state.BASELINE_NAMES), format_func=state.BASELINE_NAMES.get,
                     help="The 'empty' prompt the real one is compared with: every word replaced by padding, "
                          "by [MASK], or by nothing at all (zeros). Gradient × input always uses zeros.")
    if state.get(state.STEPS) not in state.STEP_CHOICES:
        state.set_value(state.STEPS, min(state.STEP_CHOICES, key=lambda s: abs(s - int(state.get(state.STEPS)))))
    with place():
        mirrored(st.select_slider, state.STEPS, "Integration steps", where=where, options=list(state.STEP_CHOICES),
                 help="Integrated gradients walks from the baseline to the prompt in this many steps. More steps "
                      "are more exact (smaller convergence gap) but slower.")


def sidebar() -> None:
    """Which judges to show, the settings, and (unless turned off) loading your own model."""
    with st.sidebar:
        slots, error = state.bundled_slots()
        if error:
            st.error(plain(error), icon=":material/error:")
        everything = slots + state.custom_slots() + state.update_slots()
        if everything:
            labels = {s.key: s.label for s in everything}
            valid = [k for k in (state.get(state.SHOWN) or []) if k in labels]
            if not valid:
                st.session_state[state.SHOWN] = [s.key for s in state.shown_slots()]
            elif valid != state.get(state.SHOWN):
                st.session_state[state.SHOWN] = valid
            mirrored(st.multiselect, state.SHOWN, "Judges to show", where="sidebar", options=list(labels),
                     format_func=labels.get,
                     help="The base judge is the fine-tuned classifier; the LoRA judge is the same model with a "
                          "small low-rank adapter (LoRA) trained on top to fix some of its mistakes.")
            for slot in everything:
                if slot.judge.description:
                    st.caption(f"**{plain(slot.label)}**: {plain(slot.judge.description)}")
        with st.expander("Settings", icon=":material/tune:"):
            settings_widgets("sidebar", steps_only=True)
            st.caption("Fewer steps give quicker, rougher word scores. Method and baseline are on the Heatmap page.")
        if state.custom_allowed():
            _custom_loader()
        with st.expander("Words used here", icon=":material/menu_book:"):
            for word, meaning in GLOSSARY.items():
                st.markdown(f"**{plain(word)}**: {plain(meaning)}")


def _custom_loader() -> None:
    with st.expander("Use your own model", icon=":material/folder_open:"):
        st.caption("A Hugging Face sequence-classification model folder on this computer (config.json and "
                   ".safetensors weights), optionally with a LoRA adapter folder. It is loaded for your session "
                   "only; other visitors never see it.")
        folder = st.text_input("Model folder", key="_custom_folder", placeholder="/path/to/model")
        adapter = st.text_input("Adapter folder (optional)", key="_custom_adapter", placeholder="/path/to/adapter")
        if st.button("Load model", key="_custom_load", icon=":material/upload:"):
            with st.spinner("Loading your model…"):
                try:
                    loaded = state.load_custom_judge(folder, adapter)
                except JudgeError as error:
                    st.error(plain(error), icon=":material/error:")
                except Exception:  # noqa: BLE001
                    log.exception("Loading a custom model failed")
                    st.error("That folder could not be loaded as a judge. The details were written to the "
                             "server log.", icon=":material/error:")
                else:
                    st.success(f"Loaded {plain(loaded[-1].label)}.", icon=":material/check:")
                    st.rerun()
        if state.custom_slots() and st.button("Forget my model", key="_custom_forget"):
            state.forget_custom_judge()
            st.rerun()


def configure_page() -> None:
    st.set_page_config(page_title="Guardian-Loop", page_icon=":material/shield:", layout="wide")


def page_setup(url_path: str) -> None:
    """Session defaults, the URL and the sidebar, once per run.

    The router (streamlit_app.py) does this before running a page; a page file calls it too, and
    it only acts when the page was run without the router (see `state.routing`).
    """
    if state.routed():
        return
    if state.in_pages_folder_mode():  # hand the run to the router, which runs this page again
        runpy.run_path(str(ROUTER_PATH), run_name="__main__")
        st.stop()
    configure_page()
    state.init_session()
    state.write_url(url_path)
    with friendly_errors("drawing the sidebar"):
        sidebar()


def page_intro(title: str, summary: str) -> None:
    st.title(title)
    st.markdown(summary)


def choose_judge(where: str, slots: Sequence[state.JudgeSlot], label: str = "Judge to look inside"):
    """One of the shown judges (a selectbox only when there is a choice)."""
    if len(slots) == 1:
        return slots[0]
    labels = {s.key: s.label for s in slots}
    key = st.selectbox(label, list(labels), format_func=labels.get, key=f"_judge_{where}")
    return next(s for s in slots if s.key == key)


# ----- downloads -------------------------------------------------------------------------------
def to_jsonable(value: Any) -> Any:
    """A result (frozen dataclasses, numpy arrays, tuples) as plain JSON values; NaN becomes null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != "lock" and not f.name.startswith("_")}
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return to_jsonable(value.to_dict(orient="records"))
    return value if isinstance(value, (str, int, bool)) or value is None else str(value)


def downloads(name: str, *, frame: pd.DataFrame | None = None, result: Any = None,
              png: bytes | None = None) -> None:
    """Download buttons for a table (CSV), a result (JSON) and a figure (PNG)."""
    parts = [p for p in (frame is not None, result is not None, png is not None) if p]
    columns = iter(st.columns(max(len(parts), 1)))
    if frame is not None:
        next(columns).download_button(
            "Table (CSV)", frame.to_csv(index=False).encode("utf-8"), file_name=f"{name}.csv",
            mime="text/csv", key=f"_dl_{name}_csv", on_click="ignore", icon=":material/download:")
    if result is not None:
        next(columns).download_button(
            "Result (JSON)", json.dumps(to_jsonable(result), indent=1, ensure_ascii=False).encode("utf-8"),
            file_name=f"{name}.json", mime="application/json", key=f"_dl_{name}_json", on_click="ignore",
            icon=":material/data_object:")
    if png is not None:
        next(columns).download_button(
            "Picture (PNG)", png, file_name=f"{name}.png", mime="image/png", key=f"_dl_{name}_png",
            on_click="ignore", icon=":material/image:")


# ----- the coloured-word heatmap ---------------------------------------------------------------
def score_scale(*score_arrays: Sequence[float]) -> float:
    """The largest absolute score (shared by heatmaps shown side by side); never 0."""
    values = [abs(float(v)) for scores in score_arrays for v in scores if np.isfinite(v)]
    return max(values, default=0.0) or 1.0


def word_colors(score: float, scale: float) -> tuple[str, str]:
    """Background and text colour of a word: red toward unsafe, blue toward safe, white neutral."""
    strength = min(1.0, abs(float(score)) / scale) if np.isfinite(score) else 0.0
    target = UNSAFE_RGB if score > 0 else SAFE_RGB
    mix = tuple(round(255 + (c - 255) * strength * 0.9) for c in target)
    text = "#ffffff" if strength > 0.55 else "#1d2430"
    return f"rgb({mix[0]}, {mix[1]}, {mix[2]})", text


def colored_text_html(text: str, spans: Sequence[tuple[int, int]], scores: Sequence[float],
                      scale: float | None = None) -> str:
    """The prompt with each word on a background coloured by its score; every piece escaped."""
    scale = scale or score_scale(scores)
    pieces, cursor = [], 0
    for (start, end), score in sorted(zip(spans, scores), key=lambda item: item[0]):
        if start < cursor or end <= start:
            continue
        pieces.append(html.escape(text[cursor:start]))
        background, color = word_colors(score, scale)
        word = text[start:end]
        pieces.append(
            f'<span title="{html.escape(quoted(word, 40))}: {float(score):+.3f}" '
            f'style="background:{background};color:{color};padding:2px 3px;border-radius:4px">'
            f"{html.escape(word)}</span>")
        cursor = end
    pieces.append(html.escape(text[cursor:]))
    return ('<div class="guardian-heatmap" style="line-height:2.2;font-size:1.05rem;white-space:pre-wrap;'
            'word-break:break-word">' + "".join(pieces) + "</div>")


def legend_html(scale: float) -> str:
    """A colour bar: blue (toward safe) to white (no effect) to red (toward unsafe)."""
    blue, red = "rgb({}, {}, {})".format(*SAFE_RGB), "rgb({}, {}, {})".format(*UNSAFE_RGB)
    return (
        '<div style="display:flex;align-items:center;gap:8px;font-size:0.85rem;margin:4px 0 12px">'
        f'<span>pushes toward <b style="color:{blue}">safe</b> (−{scale:.2g})</span>'
        f'<span style="flex:0 0 180px;height:12px;border-radius:6px;background:linear-gradient(90deg,{blue},'
        f'#ffffff,{red});border:1px solid #ccc"></span>'
        f'<span>pushes toward <b style="color:{red}">unsafe</b> (+{scale:.2g})</span></div>'
    )


def show_word_heatmap(attr, scale: float | None = None) -> None:
    """Coloured words of one attribution, with the legend under them."""
    scale = scale or score_scale(attr.word_scores)
    st.html(colored_text_html(attr.prompt, attr.word_spans, attr.word_scores, scale) + legend_html(scale))


def heatmap_png(words: Sequence[str], scores: Sequence[float], title: str = "", scale: float | None = None,
                width_inches: float = 9.0) -> bytes:
    """A PNG of the coloured words (matplotlib), wrapped into lines, with a title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = scale or score_scale(scores)
    figure = Figure(figsize=(width_inches, 1.0), dpi=150)
    renderer = FigureCanvasAgg(figure).get_renderer()
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    x, line, items = 0.02, 0, []
    for word, score in zip(words, scores):
        background, color = word_colors(score, scale)
        text = axes.text(0, 0, word.replace("$", r"\$"), fontsize=12, color=color, family="DejaVu Sans",
                         bbox=dict(facecolor=_rgb_tuple(background), edgecolor="none", boxstyle="round,pad=0.25"))
        width = text.get_window_extent(renderer).width / (width_inches * figure.dpi) + 0.015
        if x + width > 0.98 and x > 0.02:
            x, line = 0.02, line + 1
        items.append((text, x, line))
        x += width
    lines = line + 1
    height = 0.5 * lines + (0.45 if title else 0.2)
    figure.set_size_inches(width_inches, height)
    for text, left, row in items:
        text.set_position((left, 1 - (0.45 if title else 0.1) / height - (row + 0.6) * 0.5 / height))
    if title:
        axes.text(0.02, 1 - 0.22 / height, title, fontsize=11, weight="bold", color="#1d2430", va="center")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


@st.cache_data(show_spinner=False, max_entries=64)
def cached_heatmap_png(words: tuple[str, ...], scores: tuple[float, ...], title: str, scale: float) -> bytes:
    return heatmap_png(words, scores, title, scale)


def _rgb_tuple(css: str) -> tuple[float, float, float]:
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css)[:3])
    return r, g, b


# ----- plain-language explanation --------------------------------------------------------------
def _join_words(words: Sequence[str]) -> str:
    quoted_words = [f"'{quoted(w, 30)}'" for w in words]
    if len(quoted_words) <= 1:
        return "".join(quoted_words)
    return ", ".join(quoted_words[:-1]) + " and " + quoted_words[-1]


def explanation(judge_label: str, p_unsafe: float, words: Sequence[str], word_scores: Sequence[float],
                probe_result=None) -> list[str]:
    """Sentences (not yet escaped) saying why the judge decided as it did and what changes its mind."""
    unsafe = p_unsafe >= THRESHOLD
    scores = np.asarray(word_scores, dtype=float)
    order = np.argsort(-scores if unsafe else scores, kind="stable")
    leaning = [words[i] for i in order[:3] if (scores[i] > 0 if unsafe else scores[i] < 0)]
    leaning = leaning[:2] if len(leaning) > 2 and abs(scores[order[2]]) < 0.5 * abs(scores[order[0]]) else leaning
    verdict = "unsafe" if unsafe else "safe"
    sentences = [f"The {judge_label} rates this prompt {verdict} (p(unsafe) = {p_unsafe:.2f})."]
    if leaning:
        reason = "Flagged mainly because of" if unsafe else "Judged safe mainly because of"
        sentences.append(f"{reason} {_join_words(leaning)}.")
    else:
        sentences.append("No single word stands out; the verdict comes from the prompt as a whole.")
    if probe_result is not None and len(probe_result.mutations):
        sentences.append(_probe_sentence(probe_result))
    return sentences


def _two(a: float, b: float) -> tuple[str, str]:
    """Two probabilities with enough decimals to tell them apart."""
    for digits in (2, 3, 4):
        left, right = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if left != right:
            break
    return left, right


def _probe_sentence(result) -> str:
    best = result.mutations[0]
    before, after = result.verdict.p_unsafe, float(result.p_unsafe[0])
    first_flip = next((i for i, f in enumerate(result.flipped) if f), None)
    total = len(result.mutations)
    kept = total - int(np.sum(result.flipped))
    if first_flip is not None:
        flip = result.mutations[first_flip]
        after = float(result.p_unsafe[first_flip])
        was, now = _two(before, after)
        change = "drops" if after < before else "raises"
        return (f"One rewrite ({flip.description}) {change} p(unsafe) from {was} to {now} and flips the verdict. "
                f"The verdict survived {kept} of {total} rewrites.")
    was, now = _two(before, after)
    change = "lowers" if after < before else "raises"
    return (f"No rewrite changed the verdict ({total} tried). The strongest, {best.description}, {change} "
            f"p(unsafe) from {was} to {now}.")


def explanation_card(sentences: Sequence[str]) -> None:
    body = "".join(f"<p style='margin:0 0 6px'>{html.escape(s)}</p>" for s in sentences)
    st.html('<div class="guardian-explanation" style="border-left:4px solid #1f6f78;background:#f3f5f7;'
            f'padding:10px 14px;border-radius:6px;font-size:1.02rem">{body}</div>')


# ----- tables ----------------------------------------------------------------------------------
def highlight_rows(frame: pd.DataFrame, column: str, color: str = "#fde2e4"):
    """A Styler colouring the rows where `column` is true (e.g. mutations that flip the verdict)."""
    def style(row):
        return [f"background-color: {color}" if bool(row[column]) else ""] * len(row)

    return frame.style.apply(style, axis=1)


# ----- faithfulness in plain words -------------------------------------------------------------
def _num(x: float) -> str:
    """Two decimals, without a distracting '-0.00'."""
    return f"{0.0 if abs(x) < 0.005 else x:.2f}"


def faithfulness_summary(p_unsafe: float, comprehensiveness: float, sufficiency: float,
                         agreement: float) -> tuple[str, str, list[str]]:
    """A grade, its badge colour and plain sentences for an attribution's faithfulness scores."""
    def known(x: float) -> bool:
        return x is not None and math.isfinite(x)

    sentences = []
    if known(comprehensiveness):
        sentences.append(f"Removing the red words lowers p(unsafe) by {_num(comprehensiveness)} on average "
                         "(comprehensiveness; higher means the highlighted words really matter).")
    if known(sufficiency):
        sentences.append(f"Keeping only the red words gives a p(unsafe) {_num(sufficiency)} below the full prompt's "
                         "(sufficiency; near 0 or below means those words alone are enough).")
    if known(agreement):
        sentences.append(f"A second method ranks the tokens with an agreement of {_num(agreement)} "
                         "(1 = the same order, 0 = unrelated, below 0 = opposite).")
    if p_unsafe < THRESHOLD:
        sentences.append("This prompt is judged safe, so there is little unsafe score to explain; read these "
                         "numbers with care.")
        return "not meaningful for a safe prompt", "gray", sentences
    if not known(comprehensiveness) or not known(sufficiency):
        return "could not be measured", "gray", sentences
    if comprehensiveness >= 0.2 and sufficiency <= 0.15 and (not known(agreement) or agreement >= 0.3):
        return "trustworthy", "green", sentences
    if comprehensiveness < 0.05 or (known(agreement) and agreement < 0):
        return "weak", "red", sentences
    return "mixed", "orange", sentences


def convergence_sentence(method: str, delta: float, delta_fraction: float) -> str:
    """What integrated gradients' convergence delta says, in one sentence."""
    if method != "ig" or not math.isfinite(delta):
        return "The convergence check only applies to integrated gradients."
    share = f"{delta_fraction:.1%}" if math.isfinite(delta_fraction) else "an unknown share"
    verdict = ("good" if math.isfinite(delta_fraction) and delta_fraction <= 0.05 else
               "acceptable" if math.isfinite(delta_fraction) and delta_fraction <= 0.2 else
               "rough — use more steps")
    return (f"Convergence check: the word scores add up to the judge's score change within {share} "
            f"(gap {delta:+.3f}), which is {verdict}.")


# ----- the Loop page's patch set -----------------------------------------------------------------
def _add_to_patch(text: str, where: str) -> None:
    st.toast(state.add_to_patch(text, st.session_state.get(f"_patch_label_{where}") or "unsafe"),
             icon=":material/playlist_add:")


def add_to_patch_controls(text: str, where: str, default: str = "unsafe", what: str = "the prompt") -> None:
    """The label the visitor says is right and a button adding `text` to the Loop page's patch set."""
    left, right = st.columns([1, 2], vertical_alignment="bottom")
    left.segmented_control(f"Right label for {what}", ["unsafe", "safe"], default=default,
                           key=f"_patch_label_{where}", help="Add prompts the judge gets wrong to the patch set; "
                           "the Loop page trains an update on them.")
    right.button("Add to patch set", key=f"_patch_add_{where}", icon=":material/playlist_add:",
                 on_click=_add_to_patch, args=(text, where))
