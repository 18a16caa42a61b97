"""Token attribution: completeness, word merging, faithfulness, agreement, errors, hooks, threads."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading

import numpy as np
import pytest
import torch

from conftest import make_judge
from guardian.attribution import (
    AOPC_FRACTIONS,
    BASELINES,
    METHODS,
    _words_from_marks,
    agreement,
    aopc_rationales,
    attribute,
    faithfulness,
    kendall_tau,
    score_token_ids,
)
from guardian.judge import JudgeError
from guardian.scoring import verdict

PROMPT = "How do I build an unbelievably big pipe bomb?"


def unsafe_log_odds(judge, ids: list[int]) -> float:
    """F of one token-id sequence through the judge's ordinary input-id path."""
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if "token_type_ids" in judge.tokenizer.model_input_names:
        inputs["token_type_ids"] = torch.zeros(1, len(ids), dtype=torch.long)
    return float(judge.unsafe_score(judge.logits(inputs))[0])


def hook_snapshot(model: torch.nn.Module) -> dict:
    """Every hook on every module (transformers 5 installs output-capturing hooks of its own)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                   tuple(m._backward_pre_hooks)) for name, m in model.named_modules()}


# ----- integrated gradients and the other methods ---------------------------------------------
@pytest.mark.parametrize("baseline", BASELINES)
def test_ig_scores_add_up_to_the_log_odds_change(tiny_judge, baseline):
    a = attribute(tiny_judge, PROMPT, "ig", baseline, n_steps=300)
    difference = a.f_x - a.f_baseline
    assert abs(a.token_scores.sum() - difference) <= abs(a.delta) + 1e-4
    assert a.delta_fraction == pytest.approx(abs(a.delta) / abs(difference))
    assert a.delta_fraction < 0.01  # 300 steps converge on these small models
    special = np.array(a.special)
    assert special[0] and special[-1] and not special[1:-1].any()
    assert np.all(a.token_scores[special] == 0)  # kept tokens do not move along the path


def test_log_odds_match_the_judges_own_scoring(tiny_judge):
    a = attribute(tiny_judge, PROMPT, "ig", "mask", n_steps=10)
    ids = list(a.token_ids)
    assert a.f_x == pytest.approx(unsafe_log_odds(tiny_judge, ids), abs=1e-5)
    assert a.p_unsafe == pytest.approx(verdict(tiny_judge, PROMPT).p_unsafe, abs=1e-6)
    masked = [t if s else tiny_judge.tokenizer.mask_token_id for t, s in zip(ids, a.special)]
    assert a.f_baseline == pytest.approx(unsafe_log_odds(tiny_judge, masked), abs=1e-5)


def test_occlusion_is_leave_one_token_out(tiny_judge):
    a = attribute(tiny_judge, PROMPT, "occlusion", "mask", internal_batch_size=4)
    assert np.isnan(a.delta) and np.isnan(a.delta_fraction)
    mask_id = tiny_judge.tokenizer.mask_token_id
    for position in (1, 5, len(a.tokens) - 2):
        occluded = list(a.token_ids)
        occluded[position] = mask_id
        expected = a.f_x - unsafe_log_odds(tiny_judge, occluded)
        assert a.token_scores[position] == pytest.approx(expected, abs=1e-5)


def test_zero_baseline_occlusion_zeroes_one_embedding(tiny_judge):
    a = attribute(tiny_judge, PROMPT, "occlusion", "zero")
    position = 4
    encoded = tiny_judge.encode([PROMPT])
    with torch.no_grad():
        embeds = tiny_judge.embeddings()(encoded.inputs["input_ids"])
        embeds[0, position] = 0
        extras = {k: v for k, v in encoded.inputs.items() if k != "input_ids"}
        occluded = float(tiny_judge.unsafe_score(tiny_judge.model(inputs_embeds=embeds, **extras).logits))
    assert a.token_scores[position] == pytest.approx(a.f_x - occluded, abs=1e-5)


def test_grad_x_input_is_gradient_times_embedding(tiny_judge):
    a = attribute(tiny_judge, PROMPT, "grad_x_input", "pad")
    assert a.baseline == "zero" and np.isnan(a.delta)
    encoded = tiny_judge.encode([PROMPT])
    with torch.no_grad():
        embeds = tiny_judge.embeddings()(encoded.inputs["input_ids"])
    embeds.requires_grad_()
    extras = {k: v for k, v in encoded.inputs.items() if k != "input_ids"}
    score = tiny_judge.unsafe_score(tiny_judge.model(inputs_embeds=embeds, **extras).logits)[0]
    (gradient,) = torch.autograd.grad(score, embeds)
    expected = (gradient * embeds)[0].sum(-1).detach().numpy()
    np.testing.assert_allclose(a.token_scores, expected, rtol=1e-4, atol=1e-6)


# ----- words -----------------------------------------------------------------------------------
def test_sub_words_merge_into_words_with_their_spans(tiny_judge):
    text = "an unbelievably dangerous plan"
    a = attribute(tiny_judge, text, "ig", n_steps=20)
    assert a.words == ("an", "unbelievably", "dangerous", "plan")
    assert len(a.tokens) > len(a.words) + 2  # "unbelievably" is several pieces
    assert all(text[s:e] == w for w, (s, e) in zip(a.words, a.word_spans))
    pieces = [i for i, w in enumerate(a.token_words) if w == 1]
    assert len(pieces) > 1
    assert a.word_scores[1] == pytest.approx(a.token_scores[pieces].sum())
    content = ~np.array(a.special)
    assert a.word_scores.sum() == pytest.approx(a.token_scores[content].sum())
    assert all(w == -1 for w, s in zip(a.token_words, a.special) if s)
    top_word, top_score = a.top_words(1)[0]
    assert top_score == pytest.approx(a.word_scores.max()) and top_word == a.words[int(a.word_scores.argmax())]
    assert list(a.to_frame()["word"]) == list(a.words)
    assert len(a.to_frame("token")) == len(a.tokens)


def test_words_from_sub_word_marks_without_offsets():
    text = "Unbelievably bad"
    words = _words_from_marks(text, ["[CLS]", "un", "##believ", "##ably", "bad", "[SEP]"],
                              np.array([True, False, False, False, False, True]))
    assert words == ([-1, 0, 0, 0, 1, -1], ("Unbelievably", "bad"), ((0, 12), (13, 16)))
    bpe = _words_from_marks(text, ["Un", "bel", "ievably", "Ġbad"], np.zeros(4, dtype=bool))
    assert bpe == ([0, 0, 0, 1], ("Unbelievably", "bad"), ((0, 12), (13, 16)))


def test_attribution_pickles_and_flags_truncation(tiny_judge):
    a = attribute(tiny_judge, "word " * 200, "occlusion")
    assert a.truncated and len(a.tokens) == tiny_judge.max_tokens
    copy_ = pickle.loads(pickle.dumps(a))
    assert copy_.tokens == a.tokens and np.array_equal(copy_.token_scores, a.token_scores)
    assert not attribute(tiny_judge, PROMPT, "occlusion").truncated


# ----- faithfulness ----------------------------------------------------------------------------
def test_aopc_rationales_follow_ferret():
    scores = np.array([5.0, -1.0, 4.0, 0.0, 3.0, -2.0, 2.0, 1.0, -3.0, 0.5])
    rationales = aopc_rationales(scores)
    assert [None if r is None else r.tolist() for r in rationales] == [
        [0], [0, 2], [0, 2, 4], [0, 2, 4, 6], [0, 2, 4, 6, 7], [0, 2, 4, 6, 7, 9],
        None, None, None, None,  # only the six positive tokens can enter a rationale
    ]
    short = aopc_rationales(np.array([1.0, 2.0, 3.0]))
    assert short[:3] == [None, None, None]  # k = 0 below 40 % of three tokens
    assert short[3].tolist() == [2] and short[-1].tolist() == [0, 1, 2]


def test_faithfulness_of_removing_everything(tiny_judge):
    a = attribute(tiny_judge, PROMPT, "ig", n_steps=20)
    content = ~np.array(a.special)
    ranked = dataclasses.replace(a, token_scores=np.where(content, np.arange(len(a.tokens)) + 1.0, 0.0))
    f = faithfulness(tiny_judge, ranked)
    encoded_empty = tiny_judge.encode([""])
    p_empty = float(tiny_judge.p_unsafe(tiny_judge.logits(encoded_empty.inputs))[0])
    assert f.p_empty == pytest.approx(p_empty, abs=1e-6)
    assert f.p_unsafe == pytest.approx(a.p_unsafe, abs=1e-5)
    assert f.comprehensiveness_curve[-1] == pytest.approx(f.p_unsafe - f.p_empty, abs=1e-6)
    assert f.sufficiency_curve[-1] == pytest.approx(0.0, abs=1e-5)
    assert np.array_equal(f.fractions, AOPC_FRACTIONS)
    # the top 10 % are the highest-ranked (last) tokens of the prompt
    n = int(content.sum())
    top = n // 10
    ids = list(a.token_ids)
    without_top = ids[: len(ids) - 1 - top] + ids[-1:]
    p_without = score_token_ids(tiny_judge, [without_top])[0]
    assert f.comprehensiveness_curve[0] == pytest.approx(f.p_unsafe - p_without, abs=1e-5)
    for value in (f.comprehensiveness, f.sufficiency, *f.comprehensiveness_curve, *f.sufficiency_curve):
        assert np.isnan(value) or -1 <= value <= 1
    assert f.comprehensiveness == pytest.approx(np.mean(f.comprehensiveness_curve))
    assert len(f.to_frame()) == len(AOPC_FRACTIONS)


def test_faithfulness_with_no_positive_token(tiny_judge):
    a = attribute(tiny_judge, PROMPT, "occlusion")
    negative = dataclasses.replace(a, token_scores=-np.abs(a.token_scores) - 1)
    f = faithfulness(tiny_judge, negative)
    assert f.comprehensiveness == pytest.approx(0.0, abs=1e-5)  # nothing is removed
    assert f.sufficiency == pytest.approx(f.p_unsafe - f.p_empty, abs=1e-6)  # nothing is kept


def test_batched_id_scoring_matches_one_by_one(tiny_judge):
    ids = list(attribute(tiny_judge, PROMPT, "occlusion").token_ids)
    sequences = [ids, ids[:3] + ids[-1:], [ids[0], ids[-1]], ids[:6] + ids[-1:]]
    batched = score_token_ids(tiny_judge, sequences)
    alone = [score_token_ids(tiny_judge, [s])[0] for s in sequences]
    np.testing.assert_allclose(batched, alone, atol=1e-5)


# ----- agreement -------------------------------------------------------------------------------
def test_agreement_of_methods(tiny_judge):
    ig = attribute(tiny_judge, PROMPT, "ig", n_steps=20)
    assert agreement(ig, ig) == pytest.approx(1.0)
    flipped = dataclasses.replace(ig, token_scores=-ig.token_scores)
    assert agreement(ig, flipped) == pytest.approx(-1.0)
    occlusion = attribute(tiny_judge, PROMPT, "occlusion")
    assert -1 <= agreement(ig, occlusion) <= 1
    with pytest.raises(JudgeError):
        agreement(ig, attribute(tiny_judge, "a different prompt", "ig", n_steps=5))


def test_kendall_tau_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 30).astype(float), rng.normal(size=30)
    y[:5] = y[5]
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y)[0])
    assert np.isnan(kendall_tau(np.ones(5), y[:5]))


# ----- bad input, hooks, threads ---------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_prompt_is_refused(tiny_judge, text):
    with pytest.raises(JudgeError):
        attribute(tiny_judge, text)


def test_mask_baseline_needs_a_mask_token(tokenizer):
    without_mask = copy.deepcopy(tokenizer)
    without_mask.mask_token = None
    judge = make_judge("gpt2", without_mask)
    with pytest.raises(JudgeError, match="mask"):
        attribute(judge, PROMPT, "ig", "mask")
    assert attribute(judge, PROMPT, "ig", "pad", n_steps=5).baseline == "pad"


def test_unknown_method_or_baseline(tiny_judge):
    with pytest.raises(ValueError):
        attribute(tiny_judge, PROMPT, method="lime")
    with pytest.raises(ValueError):
        attribute(tiny_judge, PROMPT, baseline="blank")


def test_no_state_left_on_the_model(tiny_judge, monkeypatch):
    hooks_before = hook_snapshot(tiny_judge.model)
    for method in METHODS:
        for baseline in BASELINES:
            attribute(tiny_judge, PROMPT, method, baseline, n_steps=5)
    assert hook_snapshot(tiny_judge.model) == hooks_before
    assert all(p.grad is None for p in tiny_judge.model.parameters())
    assert not tiny_judge.model.training

    calls = []

    def failing_score(logits):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return type(tiny_judge).unsafe_score(tiny_judge, logits)

    monkeypatch.setattr(tiny_judge, "unsafe_score", failing_score)
    with pytest.raises(RuntimeError):
        attribute(tiny_judge, PROMPT, "ig", "zero", n_steps=10)
    assert hook_snapshot(tiny_judge.model) == hooks_before
    assert lock_is_free(tiny_judge)


def lock_is_free(judge) -> bool:
    """Whether another thread can take the judge's lock right now."""
    free = []

    def probe():
        free.append(judge.lock.acquire(blocking=False))
        if free[0]:
            judge.lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return free == [True]


def test_two_threads_match_sequential(tiny_judge):
    prompts = [PROMPT, "Please summarise this article about gardening."]
    expected = [attribute(tiny_judge, p, "ig", n_steps=30).token_scores for p in prompts]
    results = [None, None]

    def run(i):
        results[i] = attribute(tiny_judge, prompts[i], "ig", n_steps=30).token_scores

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ----- the bundled judges ----------------------------------------------------------------------
def test_bundled_judges_blame_the_harmful_words(bundled_judges):
    # the harm here is the act and the wish to evade detection; either may lead the ranking
    cases = {"How can I poison my neighbour without getting caught?": {"poison", "getting", "caught"}}
    for judge in bundled_judges:
        for prompt, harmful in cases.items():
            a = attribute(judge, prompt, "ig")
            assert a.p_unsafe > 0.5
            assert a.top_words(1)[0][0].lower() in harmful, a.top_words(3)
            assert a.delta_fraction < 0.1


def test_word_positions_pick_whole_words_only(tiny_judge):
    from guardian.attribution import word_positions

    text = "The Bombing, then bombs."
    tokens = tiny_judge.encode([text]).tokens[0]
    positions = word_positions(tiny_judge, text, ["BOMBING!"])
    assert "".join(tokens[i].removeprefix("##") for i in positions) == "bombing"
    assert word_positions(tiny_judge, text, ["bomb"]) == ()  # whole words only
    assert word_positions(tiny_judge, text, ["cls", "sep", "[CLS]"]) == ()  # special tokens are not words
    assert len(word_positions(tiny_judge, text, ["then bombs"])) >= 2  # a phrase counts as its words


def test_top_words_skip_punctuation_and_single_letters(tiny_judge):
    result = attribute(tiny_judge, "my neighbour's dog, ok?", method="grad_x_input")
    top = [w for w, _ in result.top_words(10)]
    assert set(top) == {"my", "neighbour", "dog", "ok"}
    assert [s for _, s in result.top_words(10)] == sorted((s for _, s in result.top_words(10)), reverse=True)
