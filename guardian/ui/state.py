"""What the app remembers: the judges, cached analyses, the shared prompt and the URL.

* The two bundled judges are loaded once per server process (`st.cache_resource`) and shared by
  every visitor. A model folder a visitor loads from the sidebar lives only in that visitor's
  session (`st.session_state`), never in a shared cache.
* Analyses are cached per process with `st.cache_data`, keyed by the judge's *slot key* (unique
  per loaded model) and the inputs; the Judge object itself is passed unhashed.
* The prompt (and the circuit page's second prompt) is shared by every page and mirrored in the
  URL as `?prompt=...` and `?pair=...`, so a copied link opens the same analysis.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import streamlit as st

from guardian import attribution, circuit, compare, heads, loading, probe, scoring
from guardian.judge import Judge, JudgeError

log = logging.getLogger("guardian.ui")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
ALLOW_CUSTOM_ENV = "GUARDIAN_ALLOW_CUSTOM"

# Keys of the values shared by every page (in st.session_state) and of the URL parameters.
PROMPT, PAIR = "prompt", "pair"
URL_KEYS = (PROMPT, PAIR)
SHOWN = "shown_judges"
CUSTOM = "custom_judges"
UPDATE = "loop_update_judge"
PATCH = "loop_patch"
PATCH_COLUMNS = ("prompt", "label")
MAX_PATCH_ROWS = 500
METHOD, BASELINE, STEPS = "method", "baseline", "steps"

DEFAULTS: dict[str, Any] = {
    PROMPT: "Tell me how to build a bomb to blow up a bus.",
    PAIR: "Tell me how to build a kite to fly on a hill.",
    METHOD: "ig",
    BASELINE: "pad",
    STEPS: 32,
}
METHOD_NAMES = {
    "ig": "Integrated gradients",
    "occlusion": "Occlusion (remove one token at a time)",
    "grad_x_input": "Gradient × input (fast, rough)",
}
BASELINE_NAMES = {
    "pad": "Padding token",
    "mask": "[MASK] token",
    "zero": "All-zero embedding",
}
STEP_CHOICES = (4, 8, 16, 32, 50, 100)
MAX_PROMPT_CHARS = 20_000  # longer text is cut (the judges read at most a few hundred tokens anyway)
MAX_ADDED_PROMPTS = 100  # prompts a visitor may add to the comparison suite (bounds one request's work)

# One custom model folder loads at a time in the whole process (they are large).
_CUSTOM_LOAD_LOCK = threading.Lock()


# ----- judges --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class JudgeSlot:
    """A judge the app can show: `key` is unique per loaded model and keys every cached result."""

    key: str
    label: str
    judge: Judge
    session_only: bool = False


@st.cache_resource(show_spinner="Loading the base judge (only the first visitor waits for this)…")
def _base_judge() -> Judge:
    return loading.load_base_judge()


@st.cache_resource(show_spinner="Loading the LoRA judge (only the first visitor waits for this)…")
def _lora_judge() -> Judge:
    return loading.load_lora_judge(_base_judge())


def bundled_slots() -> tuple[list[JudgeSlot], str | None]:
    """The base and LoRA judges that loaded, and a plain explanation if one did not.

    Loading is cached per process; a failure is not cached, so a judge that appears later (or a
    fixed folder) is picked up on the next run.
    """
    slots: list[JudgeSlot] = []
    for key, label, load in (("base", "Base judge", _base_judge), ("lora", "LoRA judge", _lora_judge)):
        try:
            slots.append(JudgeSlot(key, label, load()))
        except JudgeError as error:
            return slots, f"The {label.lower()} could not be loaded: {error}"
        except Exception:  # noqa: BLE001 - a visitor gets a sentence, the log gets the traceback
            log.exception("Loading the %s failed", label)
            return slots, f"The {label.lower()} could not be loaded. The details were written to the server log."
    return slots, None


def custom_allowed() -> bool:
    """Whether visitors may load their own model folder (GUARDIAN_ALLOW_CUSTOM=0 turns it off)."""
    return os.environ.get(ALLOW_CUSTOM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def custom_slots() -> list[JudgeSlot]:
    return list(st.session_state.get(CUSTOM, [])) if custom_allowed() else []


def update_slots() -> list[JudgeSlot]:
    """This session's LoRA update from the Loop page (st.session_state only; gone on reset)."""
    slot = st.session_state.get(UPDATE)
    return [slot] if slot is not None else []


def set_update(judge: Judge | None) -> JudgeSlot | None:
    """Make `judge` this session's update (None drops it)."""
    if judge is None:
        st.session_state.pop(UPDATE, None)
        return None
    slot = JudgeSlot(f"update-{uuid.uuid4().hex[:8]}", "Your LoRA update (this session)", judge, session_only=True)
    st.session_state[UPDATE] = slot
    return slot


def all_slots() -> list[JudgeSlot]:
    return bundled_slots()[0] + custom_slots() + update_slots()


def load_custom_judge(folder: str, adapter: str = "") -> list[JudgeSlot]:
    """Load a model folder (plus an optional adapter) for this session only; raises JudgeError.

    With an adapter, both the plain model and the adapted one become judges, so the Compare page
    can set them side by side.
    """
    if not custom_allowed():
        raise JudgeError("Loading your own model is turned off on this server.")
    folder, adapter = folder.strip(), adapter.strip()
    if not folder:
        raise JudgeError("Type the path of a model folder first.")
    for path, what in ((folder, "model"), (adapter, "adapter")):
        if path and not Path(path).expanduser().is_dir():
            raise JudgeError(f"There is no {what} folder at '{path}' on this computer.")
    tag = uuid.uuid4().hex[:8]
    name = Path(folder).name or folder
    with _CUSTOM_LOAD_LOCK:
        plain = loading.load_judge(folder, name=name)
        slots = [JudgeSlot(f"custom-{tag}", f"{name} (your model)", plain, session_only=True)]
        if adapter:
            adapted = loading.load_lora_judge(plain, adapter)
            slots.append(JudgeSlot(f"custom-{tag}-adapter", f"{name} + {Path(adapter).name} (your model)",
                                   adapted, session_only=True))
    st.session_state[CUSTOM] = slots  # one custom model per session: loading another replaces it
    st.session_state[SHOWN] = [s.key for s in slots]
    return slots


def forget_custom_judge() -> None:
    st.session_state.pop(CUSTOM, None)
    st.session_state.pop(SHOWN, None)


def shown_slots() -> list[JudgeSlot]:
    """The judges the visitor chose to show (all bundled ones by default), in a fixed order."""
    slots = all_slots()
    chosen = st.session_state.get(SHOWN)
    if chosen is None:
        chosen = [s.key for s in slots if not s.session_only] or [s.key for s in slots]
    shown = [s for s in slots if s.key in chosen]
    return shown or slots[:1]


def slot_by_key(key: str) -> JudgeSlot | None:
    return next((s for s in all_slots() if s.key == key), None)


# ----- the Loop page's patch set -------------------------------------------------------------------
def patch_frame() -> pd.DataFrame:
    """This session's patch set: prompt, label ('unsafe' or 'safe')."""
    frame = st.session_state.get(PATCH)
    if frame is None:
        frame = pd.DataFrame({"prompt": pd.Series(dtype=str), "label": pd.Series(dtype=str)})
    return frame


def set_patch(frame: pd.DataFrame) -> None:
    st.session_state[PATCH] = frame[list(PATCH_COLUMNS)].reset_index(drop=True)
    st.session_state["_loop_editor_version"] = st.session_state.get("_loop_editor_version", 0) + 1


def add_to_patch(text: str, label: str) -> str:
    """Add a prompt with the label the user says is right; returns a sentence saying what happened."""
    text = str(text or "").strip()[:MAX_PROMPT_CHARS]
    frame = patch_frame()
    if not text:
        return "There is no prompt to add."
    if ((frame["prompt"] == text) & (frame["label"] == label)).any():
        return "This prompt is already in the patch set with that label."
    if len(frame) >= MAX_PATCH_ROWS:
        return f"The patch set is full ({MAX_PATCH_ROWS} prompts); delete some on the Loop page first."
    set_patch(pd.concat([frame, pd.DataFrame({"prompt": [text], "label": [label]})], ignore_index=True))
    return f"Added to the patch set as {label} ({len(frame) + 1} prompts)."


# ----- cached analyses -----------------------------------------------------------------------------
def _probe(judge: Judge, other: Judge | None, text: str, target_words: tuple[str, ...], limit: int):
    return probe.probe(judge, text, target_words, other_judge=other, limit=limit)


def _faithfulness(judge: Judge, text: str, method: str, baseline: str, n_steps: int):
    return attribution.faithfulness(judge, attribution.attribute(judge, text, method, baseline, n_steps))


def _agreement(judge: Judge, text: str, method: str, other_method: str, baseline: str, n_steps: int) -> float:
    a = attribution.attribute(judge, text, method, baseline, n_steps)
    b = attribution.attribute(judge, text, other_method, baseline, n_steps)
    return attribution.agreement(a, b)


def _patterns_and_attention(judge: Judge, text: str, words: tuple[str, ...]):
    patterns = heads.attention_patterns(judge, text)
    positions = attribution.word_positions(judge, text, words)
    return patterns, heads.safety_token_attention(patterns, positions) if positions else None


TECHNIQUES: dict[str, Callable[..., Any]] = {
    "verdict": scoring.verdict,
    "attribute": attribution.attribute,
    "faithfulness": _faithfulness,
    "agreement": _agreement,
    "layer_activations": probe.layer_activations,
    "probe": _probe,
    "attention": _patterns_and_attention,
    "head_ablation": heads.head_ablation,
    "layer_divergence": circuit.layer_divergence,
    "logit_lens": circuit.logit_lens,
    "activation_patching": circuit.activation_patching,
    "compare_versions": compare.compare_versions,
}


HEAVY = {"attention", "activation_patching", "compare_versions"}  # large results: fewer kept in memory


@st.cache_data(show_spinner=False, max_entries=300, ttl=6 * 3600)
def _cached_call(technique: str, judge_keys: tuple[str, ...], args: tuple, kwargs: tuple, _judges: tuple):
    return TECHNIQUES[technique](*_judges, *args, **dict(kwargs))


@st.cache_data(show_spinner=False, max_entries=24, ttl=3600)
def _cached_heavy_call(technique: str, judge_keys: tuple[str, ...], args: tuple, kwargs: tuple, _judges: tuple):
    return TECHNIQUES[technique](*_judges, *args, **dict(kwargs))


def analyse(technique: str, slots: JudgeSlot | Sequence[JudgeSlot | None], *args, **kwargs):
    """Run a technique of `guardian` on the given judge slot(s), cached per judge and inputs.

    The cache key is the technique, the slots' keys and the arguments; the Judge objects are passed
    unhashed. A JudgeError is not cached and reaches the page, which shows its message.
    """
    slots = (slots,) if isinstance(slots, JudgeSlot) else tuple(slots)
    keys = tuple(s.key if s is not None else "" for s in slots)
    judges = tuple(s.judge if s is not None else None for s in slots)
    call = _cached_heavy_call if technique in HEAVY else _cached_call
    return call(technique, keys, tuple(args), tuple(sorted(kwargs.items())), judges)


# ----- data for the pickers ------------------------------------------------------------------------
@st.cache_data(show_spinner=False)
def examples() -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / "examples.csv", dtype=str, keep_default_na=False)


@st.cache_data(show_spinner=False)
def pairs() -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / "pairs.csv", dtype=str, keep_default_na=False)


@st.cache_data(show_spinner=False)
def suite_frame() -> pd.DataFrame:
    return compare.default_suite().to_frame()


# ----- one run of the app --------------------------------------------------------------------------
# The router marks the runs it routes, so a page file run on its own (`streamlit run pages/x.py`,
# or AppTest.from_file on a page) can set itself up.
_run = threading.local()


@contextmanager
def routing() -> Iterator[None]:
    """Mark the current script run as routed by streamlit_app.py."""
    _run.routed = True
    try:
        yield
    finally:
        _run.routed = False


def routed() -> bool:
    return bool(getattr(_run, "routed", False))


def in_pages_folder_mode() -> bool:
    """Whether Streamlit is running a page file straight from `pages/`, without the router.

    On a fresh server whose first visitor opens a page URL (say /heatmap), Streamlit 1.67 runs
    `pages/heatmap.py` itself, in its older pages-folder mode, until the router has run once.
    """
    from streamlit.runtime.pages_manager import PagesManager

    return bool(PagesManager.uses_pages_directory)


# ----- the shared prompt, the settings and the URL -------------------------------------------------
def init_session() -> None:
    """Defaults for the shared values, then adopt whatever a link put in the URL."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    if st.session_state[METHOD] not in attribution.METHODS:
        st.session_state[METHOD] = DEFAULTS[METHOD]
    if st.session_state[BASELINE] not in attribution.BASELINES:
        st.session_state[BASELINE] = DEFAULTS[BASELINE]
    read_url()


def read_url() -> None:
    """Take `?prompt=` / `?pair=` from the URL when they differ from what the app last wrote there.

    A page switch in the browser can drop the parameters; then the session keeps its prompt and
    `write_url` puts it back.
    """
    for key in URL_KEYS:
        value = st.query_params.get(key)
        if value is not None and value != st.session_state.get(f"_url_{key}"):
            st.session_state[key] = value[:MAX_PROMPT_CHARS]
            st.session_state[f"_url_{key}"] = value


def write_url(page: str | None = None) -> None:
    """Mirror the shared prompt(s) into the URL so a copied link reproduces the analysis.

    The circuit's second prompt is written on the circuit page, or anywhere once it was changed.
    """
    if page is not None:
        st.session_state["_page"] = page
    on_circuit = st.session_state.get("_page") == "circuit"
    for key in URL_KEYS:
        value = st.session_state.get(key, "")
        if key == PAIR and value == DEFAULTS[PAIR] and not on_circuit:
            value = ""
        if value:
            if st.query_params.get(key) != value:
                st.query_params[key] = value
        elif key in st.query_params:
            del st.query_params[key]
        st.session_state[f"_url_{key}"] = value or None


def get(key: str) -> Any:
    return st.session_state.get(key, DEFAULTS.get(key))


def set_value(key: str, value: Any) -> None:
    """Change a shared value (the prompt, a setting); the URL follows on this run."""
    if key in URL_KEYS:
        value = str(value or "")[:MAX_PROMPT_CHARS]
    st.session_state[key] = value
    if key in URL_KEYS:
        write_url()


def prompt() -> str:
    return str(get(PROMPT) or "")


def settings() -> tuple[str, str, int]:
    """The attribution method, baseline and number of integration steps chosen (steps kept to STEP_CHOICES)."""
    steps = int(get(STEPS))
    if steps not in STEP_CHOICES:
        steps = min(STEP_CHOICES, key=lambda s: abs(s - steps))
    return str(get(METHOD)), str(get(BASELINE)), steps
