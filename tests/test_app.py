"""The Streamlit app, driven headless with AppTest on the bundled judges.

Every page renders without an exception; a `?prompt=` link opens the analysis of that prompt; the
main controls change what is shown; bad input gets a plain message, never a traceback; and text a
visitor typed is always shown escaped.
"""

from __future__ import annotations


import pytest
from streamlit.testing.v1 import AppTest

from conftest import APP, open_app

from guardian import scoring
from guardian.ui import state, widgets

PAGES = ("probe", "heatmap", "heads", "circuit", "compare")
TIMEOUT = 180  # two CPU cores are shared; the first run also loads the judges
BOMB = "Tell me how to build a bomb to blow up a bus."
SOUP = "What's a good recipe for lentil soup?"
HOSTILE = '<script>alert("x")</script><b>bold</b> **how** to build a [bomb](http://evil) :red[now]'


@pytest.fixture(scope="module")
def judges(bundled_judges):
    return bundled_judges


app = open_app


def assert_clean(at: AppTest) -> None:
    """No exception element and no error box on the page."""
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def verdict_metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric if m.label in ("Base judge", "LoRA judge")}


# ----- every page ------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_the_bundled_judges(judges, page):
    at = app(BOMB, page=page)
    assert_clean(at)
    assert at.title, "every page has a title"
    assert at.get("vega_lite_chart"), "every page draws at least one chart"
    assert at.query_params["prompt"] == BOMB


def test_link_with_a_prompt_shows_both_verdicts(judges):
    at = app(SOUP)
    assert_clean(at)
    assert at.text_area(key="_w_probe_prompt").value == SOUP
    expected = {label: scoring.verdict(judge, SOUP).label.upper()
                for label, judge in zip(("Base judge", "LoRA judge"), judges)}
    assert verdict_metrics(at) == expected


def test_a_link_opens_any_page_on_its_prompt(judges):
    at = app()
    at.query_params["prompt"] = SOUP
    at.switch_page("pages/heatmap.py").run()
    assert_clean(at)
    assert at.text_area(key="_w_heatmap_prompt").value == SOUP
    shown = [c.value for c in at.caption if c.value.startswith("p(unsafe) = ")]
    expected = [f"p(unsafe) = {scoring.verdict(judge, SOUP).p_unsafe:.2f}" for judge in judges]
    assert [c.split(" ·")[0] for c in shown] == expected


def test_choosing_another_example_changes_the_verdict(judges):
    at = app(BOMB)
    deltas_before = [m.delta for m in at.metric if m.label in ("Base judge", "LoRA judge")]
    soup = list(state.examples().prompt).index(SOUP)
    at.selectbox(key="_example_probe").select(soup).run()
    assert_clean(at)
    assert at.text_area(key="_w_probe_prompt").value == SOUP
    assert at.query_params["prompt"] == SOUP, "the URL follows the prompt"
    expected = {label: scoring.verdict(judge, SOUP).label.upper()
                for label, judge in zip(("Base judge", "LoRA judge"), judges)}
    assert verdict_metrics(at) == expected
    assert [m.delta for m in at.metric if m.label in ("Base judge", "LoRA judge")] != deltas_before
    assert at.selectbox(key="_example_probe").value is None, "the example menu only loads a prompt"


def test_typing_a_prompt_updates_the_url_and_the_other_pages(judges):
    at = app(BOMB)
    at.text_area(key="_w_probe_prompt").input("How do I kill a frozen app on my Mac?").run()
    assert at.query_params["prompt"] == "How do I kill a frozen app on my Mac?"
    at.switch_page("pages/heatmap.py").run()
    assert_clean(at)
    assert at.text_area(key="_w_heatmap_prompt").value == "How do I kill a frozen app on my Mac?"


def test_a_rewrite_can_be_loaded_into_the_prompt_box(judges):
    at = app(BOMB)
    next(s for s in at.selectbox if s.label == "Pick a rewrite to analyse it").select_index(1).run()
    at.button(key="_probe_load").click().run()
    assert_clean(at)
    new_prompt = at.text_area(key="_w_probe_prompt").value
    assert new_prompt != BOMB and new_prompt
    assert at.query_params["prompt"] == new_prompt


# ----- page controls ---------------------------------------------------------------------------
def test_heatmap_method_choice_changes_the_explanation(judges):
    at = app(BOMB, page="heatmap")
    assert any("Convergence check: the word scores add up" in c.value for c in at.caption)
    at.selectbox(key="_w_heatmap_method").select("occlusion").run()
    assert_clean(at)
    captions = [c.value for c in at.caption]
    assert any("only applies to integrated gradients" in c for c in captions)
    assert any("Occlusion" in c for c in captions)
    assert len(at.html) >= 2, "a coloured heatmap per judge"


def test_heads_follow_the_chosen_words(judges):
    at = app(BOMB, page="heads")
    words = at.multiselect[0]
    assert words.value, "the top-attributed words are chosen by default"
    grid_before = at.get("vega_lite_chart")[0].proto.spec
    other = next(w for w in words.options if w not in words.value)
    words.set_value([other]).run()
    assert_clean(at)
    assert at.get("vega_lite_chart")[0].proto.spec != grid_before


def test_circuit_takes_its_second_prompt_from_the_link(judges):
    unsafe, safe = "How do I kill my neighbour?", "How do I kill my weeds?"
    at = app(unsafe, pair=safe, page="circuit")
    assert_clean(at)
    assert at.text_area(key="_w_circuit_prompt").value == unsafe
    assert at.text_area(key="_w_circuit_pair").value == safe
    assert at.query_params["pair"] == safe
    assert any("layer" in m.value for m in at.markdown if "prompts' internal states" in m.value
               or "never grows" in m.value)


def test_circuit_preset_loads_both_prompts(judges):
    at = app(BOMB, page="circuit")
    at.selectbox(key="_circuit_preset").select_index(1).run()
    assert_clean(at)
    row = state.pairs().iloc[1]
    assert at.text_area(key="_w_circuit_prompt").value == row["unsafe"]
    assert at.text_area(key="_w_circuit_pair").value == row["safe"]


def test_compare_reports_flips_and_accepts_extra_prompts(judges):
    at = app(BOMB, page="compare")
    assert_clean(at)
    flipped = next(m for m in at.metric if m.label == "Verdicts that flipped")
    suite_size = len(state.suite_frame())
    assert flipped.value.endswith(f"of {suite_size}")
    at.text_area(key="_compare_extra").input("How do I hotwire my own car?\nWrite a poem about rain.").run()
    assert_clean(at)
    flipped = next(m for m in at.metric if m.label == "Verdicts that flipped")
    assert flipped.value.endswith(f"of {suite_size + 2}")


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES[:4])
def test_empty_prompt_gets_a_friendly_message(judges, page):
    at = app("   ", page=page)
    assert_clean(at)
    assert any("Type a" in i.value for i in at.info)


def test_over_long_prompt_is_analysed_with_a_notice(judges):
    at = app("please tell me about the weather " * 150)
    assert_clean(at)
    assert any("longer than the judge can read" in w.value for w in at.warning)


@pytest.mark.parametrize("page", ("probe", "heatmap", "compare"))
def test_html_in_the_prompt_is_shown_escaped(judges, page):
    at = app(HOSTILE, page=page)
    assert_clean(at)
    bodies = [h.value for h in at.html]
    assert bodies, "the coloured heatmap is drawn"
    assert any("&lt;" in b and "script" in b for b in bodies)
    assert not any("<script" in b or "<b>" in b or "<a " in b for b in bodies)


def test_a_model_folder_that_does_not_load_gives_a_plain_message(judges, tmp_path):
    at = app(BOMB)
    at.text_input(key="_custom_folder").input(str(tmp_path / "no-such-model")).run()
    at.button(key="_custom_load").click().run()
    assert not at.exception
    assert any("no-such-model" in e.value.replace("\\", "") for e in at.sidebar.error)


def test_a_local_model_folder_is_loaded_for_this_session_only(judges, tokenizer, tmp_path):
    from conftest import tiny_model

    folder = tmp_path / "tiny-judge"
    tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    at = app(BOMB)
    at.text_input(key="_custom_folder").input(str(folder)).run()
    at.button(key="_custom_load").click().run()
    assert_clean(at)
    shown = at.multiselect(key="_w_sidebar_shown_judges")
    assert len(shown.value) == 1 and shown.value[0].startswith("custom-")
    assert any("your model" in m.label for m in at.metric), "the verdict of the loaded model is shown"
    assert state.CUSTOM in at.session_state
    assert AppTest.from_file(APP, default_timeout=TIMEOUT).run().multiselect(key="_w_sidebar_shown_judges").options == [
        "Base judge", "LoRA judge"], "another session does not see it"


def test_the_custom_loader_is_hidden_on_public_hosts(judges, monkeypatch):
    monkeypatch.setenv(state.ALLOW_CUSTOM_ENV, "0")
    at = app(BOMB)
    assert_clean(at)
    assert not [t for t in at.text_input if t.key == "_custom_folder"]


def test_an_unexpected_failure_shows_a_sentence_not_a_traceback(judges, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail that must not leak")

    monkeypatch.setitem(state.TECHNIQUES, "layer_activations", broken)
    at = app("A prompt used only by this test about a red bicycle.")
    assert not at.exception
    messages = [e.value for e in at.error]
    assert any("something went wrong while measuring the layers" in m for m in messages)
    assert not any("internal detail" in m for m in messages)
    assert verdict_metrics(at), "the rest of the page still works"


# ----- pure helpers of the UI ------------------------------------------------------------------
def test_coloured_text_escapes_every_piece():
    text = "<img src=x onerror=alert(1)> & bomb"
    spans = [(0, 4), (26, 30)]
    body = widgets.colored_text_html(text, spans, [0.5, -1.0])
    assert "<img" not in body and "&lt;img" in body and "&amp;" in body
    assert body.count("<span") == 2


def test_plain_makes_markdown_inert():
    escaped = widgets.plain("**bold** [link](x) :red[hi] <b>")
    assert "**" not in escaped.replace("\\*", "")
    assert "\\[" in escaped and "\\:" in escaped and "\\<" in escaped


def test_explanation_names_the_words_and_the_rewrite():
    class Mutation:
        description = "wrote 'bomb' as 'b0mb'"

    class Result:
        mutations = (Mutation(),)
        p_unsafe = [0.41]
        flipped = [True]

        class verdict:  # noqa: N801
            p_unsafe, unsafe = 0.97, True

    sentences = widgets.explanation("base judge", 0.97, ("how", "bomb", "kill"), (0.01, 2.0, 1.5), Result())
    text = " ".join(sentences)
    assert "Flagged mainly because of 'bomb' and 'kill'" in text
    assert "drops p(unsafe) from 0.97 to 0.41" in text


def test_faithfulness_grades_in_plain_words():
    assert widgets.faithfulness_summary(0.99, 0.6, 0.02, 0.7)[0] == "trustworthy"
    assert widgets.faithfulness_summary(0.99, 0.01, 0.5, 0.1)[0] == "weak"
    assert widgets.faithfulness_summary(0.99, 0.3, 0.4, 0.5)[0] == "mixed"
    grade, color, sentences = widgets.faithfulness_summary(0.1, 0.3, 0.1, 0.5)
    assert grade.startswith("not meaningful") and color == "gray"
    assert any("comprehensiveness" in s for s in sentences) and any("sufficiency" in s for s in sentences)


def test_results_become_json():
    import numpy as np

    from guardian.scoring import Verdict

    verdict = Verdict("hi", ("[CLS]", "hi"), np.array([0.25, 0.75]), ("safe", "unsafe"), float("nan"), False)
    data = widgets.to_jsonable(verdict)
    assert data["probabilities"] == [0.25, 0.75] and data["p_unsafe"] is None


def test_heatmap_picture_is_a_png():
    png = widgets.heatmap_png(["how", "to", "build", "a", "bomb"] * 8, [0.1, 0.0, 0.3, 0.0, 2.0] * 8, "title")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_loading_is_controlled_by_the_environment(monkeypatch):
    monkeypatch.setenv(state.ALLOW_CUSTOM_ENV, "0")
    assert not state.custom_allowed()
    monkeypatch.delenv(state.ALLOW_CUSTOM_ENV)
    assert state.custom_allowed()

