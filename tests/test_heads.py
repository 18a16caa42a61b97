"""Attention patterns, attention paid to chosen tokens, and head ablation."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from guardian.heads import (
    _ablated_logits,
    ablate_heads,
    attention_patterns,
    head_ablation,
    safety_token_attention,
)
from guardian.attribution import word_positions
from guardian.judge import Judge, JudgeError
from guardian.scoring import verdict

PROMPT = "How do I build a bomb at home, quickly?"
OTHER = "Please summarise this article about gardening for me."


def _is_decoder(judge: Judge) -> bool:
    return not judge.name.endswith("bert")


def _hooks_left(judge: Judge) -> list[str]:
    return judge.leftover_hooks()


# ----- attention patterns ----------------------------------------------------------------------
def test_attention_rows_sum_to_one_over_real_tokens(tiny_judge):
    result = attention_patterns(tiny_judge, PROMPT)
    n = len(result.tokens)
    assert result.tokens == tuple(tiny_judge.encode([PROMPT]).tokens[0])
    assert result.patterns.shape == (tiny_judge.n_layers, tiny_judge.n_heads, n, n)
    np.testing.assert_allclose(result.patterns.sum(-1), 1.0, atol=1e-5)
    assert (result.patterns >= 0).all()
    queries, keys = np.triu_indices(n, 1)  # key after query
    above_diagonal = result.patterns[..., queries, keys]
    if _is_decoder(tiny_judge):
        assert np.abs(above_diagonal).max() == 0.0  # causal: no query sees a later token
    else:
        assert above_diagonal.max() > 0.01  # an encoder attends both ways
    assert not result.truncated


def test_attention_of_long_prompt_is_truncated(tiny_judge):
    result = attention_patterns(tiny_judge, "word " * 500)
    assert result.truncated
    assert result.patterns.shape[-1] == len(result.tokens) == tiny_judge.max_tokens


def test_head_pattern_and_frames(tiny_judge):
    result = attention_patterns(tiny_judge, PROMPT)
    n = len(result.tokens)
    np.testing.assert_array_equal(result.head_pattern(1, 2), result.patterns[1, 2])
    one = result.to_frame(1, 2)
    assert len(one) == n * n
    assert set(one["layer"]) == {1} and set(one["head"]) == {2}
    row = one[one["query"] == 3]
    assert list(row["key_token"]) == list(result.tokens)
    np.testing.assert_allclose(row["attention"].to_numpy(), result.patterns[1, 2, 3])
    every = result.to_frame()
    assert len(every) == tiny_judge.n_layers * tiny_judge.n_heads * n * n
    with pytest.raises(JudgeError):
        result.to_frame(layer=1)
    with pytest.raises(JudgeError):
        result.head_pattern(tiny_judge.n_layers, 0)


def test_attention_needs_eager_attention(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128, num_labels=2, attn_implementation="sdpa")
    model = BertForSequenceClassification(config).requires_grad_(False)
    judge = Judge(name="sdpa-bert", model=model, tokenizer=tokenizer, max_tokens=64)
    with pytest.raises(JudgeError, match="eager"):
        attention_patterns(judge, PROMPT)
    assert _hooks_left(judge) == []


# ----- attention paid to chosen tokens ---------------------------------------------------------
def test_safety_token_attention_grid_and_top(tiny_judge):
    patterns = attention_patterns(tiny_judge, PROMPT)
    chosen = word_positions(tiny_judge, PROMPT, ["bomb"])
    result = safety_token_attention(patterns, chosen)
    assert result.scores.shape == (tiny_judge.n_layers, tiny_judge.n_heads)
    # documented definition: mean over queries of the attention summed over the chosen keys
    expected = patterns.patterns[1, 3][:, list(chosen)].sum(-1).mean()
    assert result.scores[1, 3] == pytest.approx(float(expected), abs=1e-6)
    assert ((result.scores >= 0) & (result.scores <= 1 + 1e-6)).all()

    top = result.top(k=5)
    assert len(top) == 5
    values = [score for _, _, score in top]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(float(result.scores.max()))
    for layer, head, score in top:
        assert score == result.scores[layer, head]
    frame = result.to_frame()
    assert len(frame) == result.scores.size
    assert list(frame.itertuples(index=False, name=None))[:5] == top


def test_attention_to_every_token_is_one(tiny_judge):
    patterns = attention_patterns(tiny_judge, PROMPT)
    result = safety_token_attention(patterns, range(len(patterns.tokens)))
    np.testing.assert_allclose(result.scores, 1.0, atol=1e-5)


def test_safety_token_attention_rejects_bad_positions(tiny_judge):
    patterns = attention_patterns(tiny_judge, PROMPT)
    with pytest.raises(JudgeError):
        safety_token_attention(patterns, [])
    with pytest.raises(JudgeError):
        safety_token_attention(patterns, [len(patterns.tokens)])


# ----- head ablation ---------------------------------------------------------------------------
def test_ablating_nothing_changes_nothing(tiny_judge):
    encoded = tiny_judge.encode([PROMPT])
    torch.testing.assert_close(_ablated_logits(tiny_judge, encoded.inputs, [[]]),
                               tiny_judge.logits(encoded.inputs), rtol=0, atol=0)
    original = verdict(tiny_judge, PROMPT).p_unsafe
    assert ablate_heads(tiny_judge, PROMPT, []) == original
    assert head_ablation(tiny_judge, PROMPT).p_unsafe == original


def test_batched_ablation_equals_one_head_at_a_time(tiny_judge):
    result = head_ablation(tiny_judge, PROMPT)
    shape = (tiny_judge.n_layers, tiny_judge.n_heads)
    assert result.delta_p_unsafe.shape == result.delta_log_odds.shape == shape
    assert np.abs(result.delta_log_odds).max() > 1e-3  # random heads do matter
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        alone = ablate_heads(tiny_judge, PROMPT, [(layer, head)])
        assert result.ablated_p_unsafe[layer, head] == pytest.approx(alone, abs=1e-5)
    np.testing.assert_allclose(result.ablated_p_unsafe,
                               torch.sigmoid(torch.tensor(result.log_odds + result.delta_log_odds)).numpy(),
                               atol=1e-6)
    in_small_passes = head_ablation(tiny_judge, PROMPT, rows_per_pass=3)
    np.testing.assert_allclose(in_small_passes.delta_log_odds, result.delta_log_odds, atol=1e-5)


def _with_head_weights_zeroed(judge: Judge, layer: int, head: int) -> Judge:
    """Reference: a copy of the judge whose output projection ignores one head entirely."""
    model = copy.deepcopy(judge.model)
    clone = Judge(name=judge.name, model=model, tokenizer=judge.tokenizer, max_tokens=judge.max_tokens)
    projection = clone.attention_outputs[layer]
    cols = slice(head * judge.head_dim, (head + 1) * judge.head_dim)
    with torch.no_grad():
        if isinstance(projection, nn.Linear):  # weight [out, in]
            projection.weight[:, cols] = 0
        else:  # GPT-2 Conv1D, weight [in, out]
            projection.weight[cols, :] = 0
    return clone


def test_ablation_zeroes_exactly_that_head(tiny_judge):
    layer, head = 1, 1
    reference = verdict(_with_head_weights_zeroed(tiny_judge, layer, head), PROMPT).p_unsafe
    assert ablate_heads(tiny_judge, PROMPT, [(layer, head)]) == pytest.approx(reference, abs=1e-5)
    assert head_ablation(tiny_judge, PROMPT).ablated_p_unsafe[layer, head] == pytest.approx(reference, abs=1e-5)


def test_ablating_a_whole_layer_changes_the_verdict(tiny_judge):
    original = verdict(tiny_judge, PROMPT).p_unsafe
    layer = [(0, h) for h in range(tiny_judge.n_heads)]
    assert abs(ablate_heads(tiny_judge, PROMPT, layer) - original) > 1e-4


def test_ablate_heads_rejects_unknown_heads(tiny_judge):
    with pytest.raises(JudgeError):
        ablate_heads(tiny_judge, PROMPT, [(tiny_judge.n_layers, 0)])
    with pytest.raises(JudgeError):
        ablate_heads(tiny_judge, PROMPT, [(0, -1)])


# ----- bad input, hooks, threads ---------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_prompt_raises(tiny_judge, text):
    for analysis in (attention_patterns, head_ablation, lambda j, t: ablate_heads(j, t, [(0, 0)])):
        with pytest.raises(JudgeError, match="empty"):
            analysis(tiny_judge, text)


def test_no_hooks_remain_after_analysis(tiny_judge):
    first = attention_patterns(tiny_judge, PROMPT)
    assert _hooks_left(tiny_judge) == []  # not even the capture hooks transformers adds itself
    np.testing.assert_array_equal(attention_patterns(tiny_judge, PROMPT).patterns, first.patterns)
    head_ablation(tiny_judge, PROMPT, rows_per_pass=5)
    ablate_heads(tiny_judge, PROMPT, [(0, 1), (1, 0)])
    assert _hooks_left(tiny_judge) == []


def test_no_hooks_remain_after_a_hook_raised(tiny_judge, monkeypatch):
    # A judge misreporting its head size makes the ablation hook itself raise mid-forward.
    monkeypatch.setattr(Judge, "head_dim", property(lambda self: 3))
    with pytest.raises(JudgeError, match="features"):
        head_ablation(tiny_judge, PROMPT)
    assert _hooks_left(tiny_judge) == []
    monkeypatch.undo()
    released = []
    other = threading.Thread(target=lambda: released.append(tiny_judge.lock.acquire(timeout=5)))
    other.start()
    other.join()
    assert released == [True]  # the lock was let go too


def test_two_threads_match_sequential(tiny_judge):
    prompts = [PROMPT, OTHER]

    def analyse(text):
        return attention_patterns(tiny_judge, text), head_ablation(tiny_judge, text, rows_per_pass=3)

    sequential = [analyse(t) for t in prompts]
    threaded: dict[int, tuple] = {}
    workers = [threading.Thread(target=lambda i=i: threaded.__setitem__(i, analyse(prompts[i]))) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i, (patterns, ablation) in enumerate(sequential):
        np.testing.assert_allclose(threaded[i][0].patterns, patterns.patterns, atol=1e-6)
        np.testing.assert_allclose(threaded[i][1].delta_log_odds, ablation.delta_log_odds, atol=1e-6)
        assert threaded[i][1].p_unsafe == pytest.approx(ablation.p_unsafe, abs=1e-7)
    assert _hooks_left(tiny_judge) == []


# ----- the bundled judges ----------------------------------------------------------------------
def test_bundled_judge_heads(bundled_judges):
    base, lora = bundled_judges
    patterns = attention_patterns(base, PROMPT)
    n = len(patterns.tokens)
    assert patterns.patterns.shape == (base.n_layers, base.n_heads, n, n)
    np.testing.assert_allclose(patterns.patterns.sum(-1), 1.0, atol=1e-4)
    attention = safety_token_attention(patterns, word_positions(base, PROMPT, ["bomb"]))
    assert attention.scores.shape == (base.n_layers, base.n_heads)

    result = head_ablation(lora, PROMPT)
    full_precision = float(lora.p_unsafe(lora.logits(lora.encode([PROMPT]).inputs))[0])
    assert result.p_unsafe == pytest.approx(full_precision, abs=1e-6)
    assert result.p_unsafe == pytest.approx(verdict(lora, PROMPT).p_unsafe, abs=1e-2)  # verdicts may run in bfloat16
    assert ablate_heads(lora, PROMPT, []) == result.p_unsafe
    assert result.delta_log_odds.shape == (lora.n_layers, lora.n_heads)
    last = (lora.n_layers - 1, lora.n_heads - 1)
    assert result.ablated_p_unsafe[last] == pytest.approx(ablate_heads(lora, PROMPT, [last]), abs=1e-5)
    assert _hooks_left(base) == [] and _hooks_left(lora) == []
