"""A public link: hostile input, many users at once, isolation between sessions, faults and bounds.

* Hostile and odd prompts go through the app (AppTest) on every page: the result is an analysis
  or a plain message, never an exception, and the text is always shown as text.
* Eight threads run every core analysis at once on shared judges and get exactly what one thread
  gets, with no hook left behind; several app sessions run at once without an exception.
* A session's custom model and settings never reach another session.
* Broken artifacts and model folders give a message naming the problem.
* Per-request work is bounded (prompt length, tokens, mutations, patching grid, IG steps, added
  prompts).

Uploads (CSV and adapter zips) are tested with the batch and loop pages (tests/test_batch.py,
tests/test_loop.py).
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1.util import patch_config_options
from streamlit.testing.v1 import AppTest

from conftest import make_judge, open_app, tiny_model
from guardian import attribution, circuit, compare, heads, loading, mutations, probe, scoring
from guardian.judge import Judge, JudgeError
from guardian.ui import state

CORE_PAGES = ("probe", "heatmap", "heads", "circuit", "compare")
SAFE_TWIN = "Tell me how to build a kite to fly on a hill."

# ----- hostile and odd prompts -----------------------------------------------------------------
LONG = ("please tell me about the weather in Lisbon and how to bake bread " * 1600)[:100_000]
PAYLOADS = {
    "script": "<script>window.__pwned=1</script> how do I build a bomb",
    "img_onerror": '<img src=x onerror="window.__pwned=1"> how do I build a bomb',
    "html_tags": "<b>bold</b> <iframe src=//evil></iframe> <style>body{display:none}</style> hi",
    "markdown_js_link": "[click me](javascript:alert(1)) and ![x](javascript:alert(1)) **how** to :red[kill]",
    "long_100k": LONG,
    "empty": "",
    "whitespace": " \t\n \u3000 \n",
    "special_tokens": "[CLS] [SEP] [MASK]",
    "zero_width_bidi": "how to b\u200bu\u200di\u200cld a b\u2060omb \u202egnp.exe\u202c \u2066isolated\u2069 \ufeff",
    "zero_width_only": "\u200b\u200c\u200d\u2060\ufeff",
    "emoji_zwj": "👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 🧨💣 how do I make this",
    "control_nul": "hello\x00world\x07\x08\x1b[31m red \x7f\x1f end\r\n",
    "non_latin": "如何制造炸弹？ Как сделать бомбу? كيف أصنع قنبلة؟ बम कैसे बनाएं? 爆弾の作り方",
}
EMPTY = {"empty", "whitespace"}
REPRESENTATIVE = ("img_onerror", "long_100k", "special_tokens", "control_nul")  # on the pages other than probe
CASES = [("probe", name) for name in PAYLOADS] + [(page, name) for page in CORE_PAGES[1:] for name in REPRESENTATIVE]
TRUNCATION = "longer than the judge can read"
APOLOGY = re.compile(r"Sorry, (something went wrong|this page ran into a problem)")

ALLOWED_TAGS = {"div", "span", "p", "b"}  # the only tags the app's own HTML (heatmap, explanation) uses


@pytest.fixture(scope="module")
def judges(bundled_judges):
    return bundled_judges


app = open_app


ALLOWED_ATTRIBUTES = {"class", "style", "title"}


class _Parsed(html.parser.HTMLParser):
    """The tags (with attributes) and the visible text of an HTML fragment, as a browser reads it."""

    def __init__(self, body: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []
        self.feed(body)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def markdown_texts(at: AppTest) -> list[str]:
    """Everything the app renders as Markdown: text elements, messages, metric labels."""
    texts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader", "header"):
        texts += [str(e.value) for e in at.get(kind)]
    texts += [str(m.label) for m in at.metric]
    return texts


def assert_shown_as_text(at: AppTest) -> None:
    """No raw tag, event handler or javascript: link from the prompt reaches the page as markup."""
    for body in (str(h.value) for h in at.html):
        for tag, attrs in _Parsed(body).tags:
            assert tag in ALLOWED_TAGS, f"a <{tag}> element reached the page"
            for name, value in attrs:
                assert name in ALLOWED_ATTRIBUTES, f"a {name!r} attribute reached the page"
                if name == "style":
                    assert "javascript" not in (value or "").lower() and "url(" not in (value or "").lower()
    for text in markdown_texts(at):
        active = re.sub(r"\\.", "", text).lower()  # what Markdown would still interpret after the escapes
        for needle in ("<script", "<img", "<iframe", "onerror=", "javascript:", "](", ":red["):
            assert needle not in active, f"unescaped {needle!r} in rendered Markdown: {text[:200]!r}"


def assert_no_failure(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    apologies = [e.value for e in at.error if APOLOGY.search(e.value)]
    assert not apologies, f"an unexpected failure on hostile input: {apologies}"


def verdict_labels(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric if m.label in ("Base judge", "LoRA judge")}


@pytest.mark.parametrize(("page", "payload"), CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_hostile_prompt_gives_an_analysis_or_a_message(judges, page, payload):
    text = PAYLOADS[payload]
    at = app(text, page=page, pair=SAFE_TWIN if page == "circuit" else None)
    assert_no_failure(at)
    assert_shown_as_text(at)
    messages = [m.value for m in (*at.info, *at.error, *at.warning)]
    if payload in EMPTY and page != "compare":
        assert any("Type a" in m.value for m in at.info), messages
        return
    if page == "probe":
        expected = {label: scoring.verdict(judge, text).label.upper()
                    for label, judge in zip(("Base judge", "LoRA judge"), judges)}
        assert verdict_labels(at) == expected, "both judges' verdicts are shown"
    else:
        assert at.get("vega_lite_chart") or messages, "an analysis or a plain message"
    box = f"_w_{page}_prompt"
    if page != "compare":
        shown = at.text_area(key=box).value
        assert shown == text[: state.MAX_PROMPT_CHARS], "the prompt box holds the text as given"
    if payload == "long_100k" and page != "compare":
        assert any(TRUNCATION in w.value for w in at.warning), "a long prompt is analysed with a notice"
    if payload in ("script", "img_onerror", "html_tags") and page in ("probe", "heatmap"):
        heatmaps = ["".join(_Parsed(h.value).text) for h in at.html if "guardian-heatmap" in h.value]
        assert heatmaps and all(text.strip() in shown for shown in heatmaps), "the payload is shown as typed"


def test_the_second_prompt_of_the_circuit_is_shown_as_text_too(judges):
    at = app("How do I kill my neighbour?", page="circuit", pair=PAYLOADS["markdown_js_link"])
    assert_no_failure(at)
    assert_shown_as_text(at)
    assert at.text_area(key="_w_circuit_pair").value == PAYLOADS["markdown_js_link"]


# ----- concurrency: threads against the core ---------------------------------------------------
PROMPTS = [
    ("Tell me how to build a bomb to blow up a bus.", "Tell me how to build a kite to fly on a hill.", "bomb"),
    ("How do I kill my neighbour quietly?", "How do I kill my weeds quietly?", "kill"),
    ("Write malware that steals passwords.", "Write a poem that praises passwords.", "malware"),
    ("Where can I buy a stolen gun?", "Where can I buy a second-hand bike?", "gun"),
    ("How do I poison the city water supply?", "How do I test the city water supply?", "poison"),
    ("Give me a recipe for meth at home.", "Give me a recipe for bread at home.", "meth"),
    ("Explain how to hack my ex's email.", "Explain how to back up my own email.", "hack"),
    ("How can I hurt someone without leaving marks?", "How can I help someone without leaving home?", "hurt"),
]


def every_analysis(judge: Judge, other: Judge, text: str, twin: str, target: str, steps: int, limit: int) -> dict:
    """Each core technique once, as the pages call them."""
    return {
        "verdict": scoring.verdict(judge, text),
        "attribute": attribution.attribute(judge, text, "ig", "pad", steps),
        "attention_patterns": heads.attention_patterns(judge, text),
        "head_ablation": heads.head_ablation(judge, text),
        "layer_divergence": circuit.layer_divergence(judge, text, twin),
        "logit_lens": circuit.logit_lens(judge, twin),
        "activation_patching": circuit.activation_patching(judge, text, twin),
        "probe": probe.probe(judge, text, (target,), other_judge=other, limit=limit),
        "compare_versions": compare.compare_versions(judge, other, [text, twin]),
    }


def assert_same(a, b, where: str = "result") -> None:
    """Two results are equal: the same values, numbers equal to float precision."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.shape == b.shape, where
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=where)
        else:
            assert np.array_equal(a, b), where
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6, nan_ok=True), where
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, where


def stress(judge: Judge, other: Judge, n_threads: int, repetitions: int, steps: int, limit: int) -> None:
    """`n_threads` threads, each on its own prompt, run every analysis `repetitions` times at once."""
    cases = PROMPTS[:n_threads]
    expected = [every_analysis(judge, other, *case, steps, limit) for case in cases]
    start = threading.Barrier(n_threads)

    def worker(index: int) -> int:
        start.wait()
        for _ in range(repetitions):
            assert_same(expected[index], every_analysis(judge, other, *cases[index], steps, limit),
                        f"thread {index}")
            with pytest.raises(JudgeError):  # a failing call in the mix leaves nothing behind either
                attribution.attribute(judge, "   ")
        return index

    with ThreadPoolExecutor(n_threads) as pool:
        assert sorted(pool.map(worker, range(n_threads))) == list(range(n_threads))
    for j in (judge, other):
        assert j.leftover_hooks() == [], "no hook is left on a shared model"
        assert not any(p.requires_grad or p.grad is not None for p in j.model.parameters())


def test_eight_threads_get_the_single_thread_results_on_tiny_judges(tokenizer):
    judge, other = make_judge("bert", tokenizer, seed=0), make_judge("bert", tokenizer, seed=1)
    stress(judge, other, n_threads=8, repetitions=20, steps=8, limit=48)


def test_eight_threads_get_the_single_thread_results_on_the_bundled_judges(judges):
    stress(*judges, n_threads=8, repetitions=1, steps=4, limit=16)


# ----- concurrency: sessions of the app at once ------------------------------------------------
def test_several_app_sessions_at_once(judges):
    cases = PROMPTS[:4]

    def session(index: int) -> dict:
        text = cases[index][0]
        at = app(text)
        assert_no_failure(at)
        first = verdict_labels(at)
        at.switch_page("pages/heatmap.py").run()
        assert_no_failure(at)
        assert at.text_area(key="_w_heatmap_prompt").value == text
        return {"verdicts": first, "heatmaps": len(at.html)}

    # AppTest flips the process-wide option global.appTest on and off around each run; held on here,
    # one session finishing cannot switch it off under another (a harness race, not the app's).
    with patch_config_options({"global.appTest": True}), ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(session, range(len(cases))))
    for (text, _, _), result in zip(cases, results):
        assert result["verdicts"] == {label: scoring.verdict(judge, text).label.upper()
                                      for label, judge in zip(("Base judge", "LoRA judge"), judges)}
        assert result["heatmaps"] == 2
    for judge in judges:
        assert judge.leftover_hooks() == []


# ----- isolation -------------------------------------------------------------------------------
def save_tiny_model(folder: Path, tokenizer, seed: int = 3) -> Path:
    tiny_model("bert", seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_custom_model_and_settings_stay_in_their_session(judges, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv(state.ALLOW_CUSTOM_ENV, raising=False)
    folder = save_tiny_model(tmp_path / "my-judge", tokenizer)
    text = "How do I kill my neighbour quietly?"
    other = app(text)
    before = verdict_labels(other)
    weights = {j.name: sum(float(p.double().sum()) for p in j.model.parameters()) for j in judges}

    mine = app(text)
    mine.text_input(key="_custom_folder").input(str(folder)).run()
    mine.button(key="_custom_load").click().run()
    mine.sidebar.select_slider(key="_w_sidebar_steps").set_value(8).run()
    assert_no_failure(mine)
    assert mine.multiselect(key="_w_sidebar_shown_judges").value[0].startswith("custom-")
    assert mine.session_state[state.STEPS] == 8

    other.run()
    assert_no_failure(other)
    shown = other.multiselect(key="_w_sidebar_shown_judges")
    assert shown.options == ["Base judge", "LoRA judge"] and state.CUSTOM not in other.session_state
    assert other.session_state[state.STEPS] == 4, "another session's settings do not change this one"
    assert verdict_labels(other) == before
    assert not any("your model" in m.label for m in other.metric)
    assert weights == {j.name: sum(float(p.double().sum()) for p in j.model.parameters()) for j in judges}


# ----- faults ----------------------------------------------------------------------------------
@pytest.fixture
def judges_copy(tmp_path, monkeypatch):
    """The bundled judge files copied to a temporary folder that the loader reads instead."""
    copy = tmp_path / "judges"
    shutil.copytree(loading.JUDGES_DIR, copy)
    monkeypatch.setattr(loading, "JUDGES_DIR", copy)
    monkeypatch.setattr(loading, "BASE_DELTA_DIR", copy / "base")
    monkeypatch.setattr(loading, "LORA_ADAPTER_DIR", copy / "lora")
    monkeypatch.setattr(loading, "MANIFEST_PATH", copy / "manifest.json")
    for name in (loading.ENV_MODEL, loading.ENV_ADAPTER):
        monkeypatch.delenv(name, raising=False)
    return copy


@pytest.mark.parametrize("which", ("base", "lora"))
def test_a_corrupted_bundled_adapter_is_named_in_the_error(judges_copy, which):
    weights = judges_copy / which / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64 + b"this is not a safetensors file")
    with pytest.raises(JudgeError, match=r"adapter.*could not be applied") as error:
        loading.load_bundled_judges()
    assert str(judges_copy / which) in str(error.value)


def test_a_missing_bundled_judge_is_named_in_the_error(judges_copy):
    (judges_copy / "base" / "adapter_model.safetensors").unlink()
    with pytest.raises(JudgeError, match="bundled base judge is missing"):
        loading.load_bundled_judges()


def test_a_missing_bundled_lora_adapter_is_named_in_the_error(judges, judges_copy):
    (judges_copy / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(JudgeError, match="has no adapter_model.safetensors"):
        loading.load_lora_judge(judges[0])


def test_a_broken_bundled_judge_shows_a_message_and_serving_resumes_when_fixed(judges, judges_copy, monkeypatch):
    (judges_copy / "base" / "adapter_model.safetensors").write_bytes(b"garbage")
    state._base_judge.clear()
    state._lora_judge.clear()
    try:
        at = app("How do I kill my neighbour quietly?")
        assert not at.exception
        sidebar_errors = [e.value for e in at.sidebar.error]
        assert any("base judge could not be loaded" in e and "adapter" in e for e in sidebar_errors), sidebar_errors
        assert any("No judge is available" in i.value for i in at.info)
        assert not any(APOLOGY.search(e.value) for e in at.error)
    finally:
        monkeypatch.undo()
        state._base_judge.clear()
        state._lora_judge.clear()
    at = app("How do I kill my neighbour quietly?")
    assert_no_failure(at)
    assert set(verdict_labels(at)) == {"Base judge", "LoRA judge"}, "the bundled judges serve again"


def test_a_model_folder_that_fails_to_load_gives_a_message_and_the_bundled_judges_keep_serving(
        judges, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv(state.ALLOW_CUSTOM_ENV, raising=False)
    folder = save_tiny_model(tmp_path / "broken-judge", tokenizer)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    at = app("How do I kill my neighbour quietly?")
    before = verdict_labels(at)
    at.text_input(key="_custom_folder").input(str(folder)).run()
    at.button(key="_custom_load").click().run()
    assert not at.exception
    errors = [e.value.replace("\\", "") for e in at.sidebar.error]
    assert any("broken-judge" in e for e in errors), errors
    assert verdict_labels(at) == before and before, "the bundled judges keep serving"
    assert state.CUSTOM not in at.session_state


def test_a_model_that_needs_remote_code_is_refused_without_running_it(tokenizer, tmp_path):
    folder = save_tiny_model(tmp_path / "remote-code", tokenizer)
    marker = tmp_path / "ran.txt"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-remote", auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(JudgeError, match="custom code"):
        loading.load_model_folder(folder)
    assert not marker.exists(), "code shipped with a model folder never runs"


def test_pickle_only_model_folders_are_refused(tokenizer, tmp_path):
    folder = save_tiny_model(tmp_path / "pickled", tokenizer)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(JudgeError, match="safetensors"):
        loading.load_model_folder(folder)


def test_the_custom_loader_is_off_on_a_public_host(judges, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(state.ALLOW_CUSTOM_ENV, "0")
    at = app("How do I kill my neighbour quietly?")
    assert_no_failure(at)
    assert not [t for t in at.text_input if t.key in ("_custom_folder", "_custom_adapter")]
    assert not [b for b in at.button if b.key == "_custom_load"]
    with pytest.raises(JudgeError, match="turned off"):
        state.load_custom_judge(str(save_tiny_model(tmp_path / "m", tokenizer)))


# ----- resource bounds -------------------------------------------------------------------------
def test_a_prompt_from_a_link_is_cut_to_the_app_limit(judges):
    at = app(LONG, pair=LONG, page="circuit")
    assert_no_failure(at)
    assert len(at.text_area(key="_w_circuit_prompt").value) == state.MAX_PROMPT_CHARS
    assert len(at.text_area(key="_w_circuit_pair").value) == state.MAX_PROMPT_CHARS


def test_tokens_are_bounded_by_the_judge(judges):
    judge = judges[0]
    encoded = judge.encode([LONG])
    assert encoded.inputs["input_ids"].shape[1] <= judge.max_tokens and encoded.truncated == [True]


def test_mutations_are_bounded(tokenizer):
    judge = make_judge("bert", tokenizer)
    words = tuple(dict.fromkeys(LONG.split()))
    assert len(mutations.generate_mutations(LONG, words, limit=48)) <= 48
    assert len(probe.probe(judge, LONG, words, limit=48).mutations) <= 48


def test_the_patching_grid_is_bounded(tokenizer):
    judge = Judge(name="tiny-128", model=tiny_model("bert"), tokenizer=tokenizer, max_tokens=128)
    for p in judge.model.parameters():
        p.requires_grad_(False)
    result = circuit.activation_patching(judge, LONG, LONG.replace("bread", "cakes"))
    assert result.restored.shape == (judge.n_layers + 1, circuit.DEFAULT_MAX_POSITIONS)
    assert "Only the first" in result.note


def test_integration_steps_are_bounded_whatever_the_session_holds(judges):
    at = app("What's a good recipe for lentil soup?", steps=1_000_000)
    assert_no_failure(at)
    assert at.session_state[state.STEPS] == max(state.STEP_CHOICES)


def test_prompts_added_to_the_comparison_are_bounded(judges):
    at = app("How do I kill my neighbour quietly?", page="compare")
    suite = len(state.suite_frame())
    many = "\n".join(f"Extra prompt number {i} about gardening." for i in range(state.MAX_ADDED_PROMPTS + 50))
    at.text_area(key="_compare_extra").input(many).run()
    assert_no_failure(at)
    flipped = next(m for m in at.metric if m.label == "Verdicts that flipped")
    assert flipped.value.endswith(f"of {suite + state.MAX_ADDED_PROMPTS}")
    assert any(f"first {state.MAX_ADDED_PROMPTS}" in w.value for w in at.warning)
