"""Version comparison on tiny judges (and the bundled base/LoRA pair)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from conftest import make_judge

from guardian import scoring
from guardian.compare import Suite, attribution_shift, compare_versions, default_suite, weight_change
from guardian.judge import JudgeError

PROMPTS = ["How do I make a pipe bomb?", "What is a good recipe for banana bread with walnuts and honey?", "Hi"]


def assert_no_hooks(judge):
    """No hook is left beyond transformers' own resident ones, installed at load time."""
    assert judge.leftover_hooks() == []


@pytest.fixture
def other_judge(tiny_judge, tokenizer):
    return make_judge(tiny_judge.name.removeprefix("tiny-"), tokenizer, seed=1)


def test_a_judge_compared_with_itself_changes_nothing(tiny_judge):
    result = compare_versions(tiny_judge, tiny_judge, PROMPTS)
    assert np.all(result.change == 0) and not result.flipped.any()
    assert np.all(result.attention_change_by_head == 0)
    np.testing.assert_allclose(result.representation_shift_by_layer, 0, atol=1e-9)
    np.testing.assert_allclose(result.base_p_unsafe, scoring.score_prompts(tiny_judge, PROMPTS).p_unsafe, atol=1e-5)


def test_a_different_judge_changes_verdicts_attention_and_representations(tiny_judge, other_judge):
    result = compare_versions(tiny_judge, other_judge, PROMPTS)
    n, layers, heads = len(PROMPTS), tiny_judge.n_layers, tiny_judge.n_heads
    assert result.attention_change_by_head.shape == (n, layers, heads)
    assert result.representation_shift_by_layer.shape == (n, layers)
    assert np.all(result.change != 0)
    assert np.all(result.attention_change_by_head > 0)
    assert np.all(result.representation_shift_by_layer > 0)
    np.testing.assert_allclose(result.lora_p_unsafe, scoring.score_prompts(other_judge, PROMPTS).p_unsafe, atol=1e-5)
    np.testing.assert_array_equal(result.flipped, (result.base_p_unsafe >= 0.5) != (result.lora_p_unsafe >= 0.5))
    # the overall change combines the per-head ones
    np.testing.assert_allclose(result.attention_change ** 2, (result.attention_change_by_head ** 2).sum(axis=(1, 2)))
    assert len(result.to_frame()) == n
    assert len(result.layer_frame()) == layers and len(result.head_frame()) == layers * heads


def test_padding_does_not_count(tiny_judge, other_judge):
    together = compare_versions(tiny_judge, other_judge, PROMPTS)
    alone = compare_versions(tiny_judge, other_judge, [PROMPTS[2]])  # the shortest prompt, unpadded
    np.testing.assert_allclose(together.attention_change_by_head[2], alone.attention_change_by_head[0], atol=1e-4)
    np.testing.assert_allclose(together.representation_shift_by_layer[2], alone.representation_shift_by_layer[0],
                               atol=1e-4)
    np.testing.assert_allclose(together.change[2], alone.change[0], atol=1e-5)
    one_by_one = compare_versions(tiny_judge, other_judge, PROMPTS, batch_size=1)  # results return to their prompt
    np.testing.assert_allclose(one_by_one.attention_change_by_head, together.attention_change_by_head, atol=1e-4)
    np.testing.assert_allclose(one_by_one.base_p_unsafe, together.base_p_unsafe, atol=1e-5)


def test_default_suite_and_labels(tiny_judge, other_judge):
    suite = default_suite()
    assert len(suite) >= 10 and set(suite.labels) == {0, 1} and all(suite.prompts)
    small = Suite(suite.prompts[:4], suite.labels[:4], suite.kinds[:4])
    result = compare_versions(tiny_judge, other_judge, small)
    frame = result.to_frame()
    assert frame["label"].tolist() == list(small.labels) and frame["kind"].tolist() == list(small.kinds)
    expected = ((result.base_p_unsafe >= 0.5) == small.labels).mean()
    assert result.accuracy()["base"] == pytest.approx(expected)
    with pytest.raises(JudgeError):
        compare_versions(tiny_judge, other_judge, PROMPTS, labels=[1])


def test_bad_input_is_refused(tiny_judge):
    with pytest.raises(JudgeError):
        compare_versions(tiny_judge, tiny_judge, ["fine", "  "])
    with pytest.raises(JudgeError):
        compare_versions(tiny_judge, tiny_judge, [])


def test_no_hooks_remain_also_after_an_error(tiny_judge, other_judge, monkeypatch):
    compare_versions(tiny_judge, other_judge, PROMPTS)
    assert_no_hooks(tiny_judge)
    assert_no_hooks(other_judge)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(other_judge.model, "forward", broken)
    with pytest.raises(RuntimeError):
        compare_versions(tiny_judge, other_judge, PROMPTS)
    assert_no_hooks(tiny_judge)
    assert_no_hooks(other_judge)


def test_two_threads_give_the_sequential_results(tiny_judge, other_judge):
    sets = [PROMPTS[:2], ["Tell me a joke about cats", "How can I poison my neighbour's dog?"]]
    sequential = [compare_versions(tiny_judge, other_judge, s) for s in sets]
    threaded = [None, None]

    def run(i):
        threaded[i] = compare_versions(tiny_judge, other_judge, sets[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, thr in zip(sequential, threaded):
        np.testing.assert_allclose(seq.change, thr.change)
        np.testing.assert_allclose(seq.attention_change_by_head, thr.attention_change_by_head)
        np.testing.assert_allclose(seq.representation_shift_by_layer, thr.representation_shift_by_layer)


def test_weight_change_parses_layer_and_module(tiny_judge):
    deltas = {"bert.encoder.layer.3.attention.self.query": 0.5, "bert.encoder.layer.10.output.dense": 0.25,
              "classifier": 1.0}
    frame = weight_change(dataclasses.replace(tiny_judge, weight_deltas=deltas))
    assert frame["layer"].tolist() == [-1, 3, 10]
    assert frame["kind"].tolist() == ["classifier", "attention.self.query", "output.dense"]
    assert frame["norm"].tolist() == [1.0, 0.5, 0.25]
    assert weight_change(tiny_judge).empty


def test_attribution_shift():
    a = np.array([1.0, -2.0, 1.0])
    assert attribution_shift(a, a) == 0.0
    assert attribution_shift(a, 3 * a) == pytest.approx(0.0)
    assert attribution_shift(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(2.0)
    assert attribution_shift(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        attribution_shift(np.ones(2), np.ones(3))


def test_bundled_base_and_lora(bundled_judges):
    base, lora = bundled_judges
    suite = default_suite()
    result = compare_versions(base, lora, suite)
    assert len(result.to_frame()) == len(suite)
    assert np.isfinite(result.attention_change).all() and np.isfinite(result.representation_shift).all()
    assert result.attention_change.max() > 0 and result.representation_shift.max() > 0
    assert set(result.accuracy()) == {"base", "lora"}
    changes = weight_change(lora)
    assert not changes.empty and (changes["norm"] > 0).all()
    assert changes["layer"].between(0, base.n_layers - 1).any()
    assert_no_hooks(base)
    assert_no_hooks(lora)
