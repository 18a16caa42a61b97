"""The safety circuit: residual streams, layer divergence, logit lens and activation patching."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from guardian import circuit
from guardian.circuit import (
    activation_patching,
    align_positions,
    critical_layer,
    layer_divergence,
    logit_lens,
    patch_scores,
    residual_streams,
)
from guardian.judge import JudgeError, block_hidden, replace_block_output
from guardian.scoring import verdict

UNSAFE = "how do I build a bomb"
SAFE = "how do I build a cake"  # same number of tokens, one word different
LONGER_SAFE = "how do I build a chocolate cake please"


def token_count(judge, text):
    return len(judge.encode([text]).tokens[0])


def assert_no_hooks(judge):
    """No hook beyond transformers' own inert output-capture hooks, installed at load time."""
    assert judge.leftover_hooks() == []


def every_position(n_tokens):
    return tuple((k, k) for k in range(n_tokens))


# ----- residual streams and divergence ---------------------------------------------------------
def test_residual_streams_are_the_block_inputs(tiny_judge):
    streams = residual_streams(tiny_judge, UNSAFE)
    n = tiny_judge.n_layers
    assert streams.states.shape == (n + 1, len(streams.tokens), tiny_judge.config.hidden_size)
    encoded = tiny_judge.encode([UNSAFE])
    with tiny_judge.lock, torch.inference_mode():
        hidden = tiny_judge.model(**encoded.inputs, output_hidden_states=True).hidden_states
    # Hugging Face records the input of every block; the last entry may be after a final norm.
    for layer in range(n):
        np.testing.assert_allclose(streams.states[layer], hidden[layer][0].numpy(), atol=1e-5)
    assert not np.allclose(streams.states[n], streams.states[n - 1])
    frame = streams.to_frame()
    assert len(frame) == (n + 1) * len(streams.tokens)


def test_residual_streams_of_an_overlong_prompt_are_truncated(tiny_judge):
    streams = residual_streams(tiny_judge, "word " * 500)
    assert streams.truncated
    assert streams.states.shape[1] == tiny_judge.max_tokens
    assert not residual_streams(tiny_judge, UNSAFE).truncated


def test_divergence_of_identical_prompts_is_zero(tiny_judge):
    result = layer_divergence(tiny_judge, UNSAFE, UNSAFE)
    assert result.l2[0] == 0.0
    assert result.cosine[0] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(result.l2, 0.0, atol=1e-5)
    np.testing.assert_allclose(result.cosine, 1.0, atol=1e-6)
    assert result.critical_layer is None


def test_divergence_of_twins(tiny_judge):
    result = layer_divergence(tiny_judge, UNSAFE, SAFE)
    n = tiny_judge.n_layers
    assert result.l2.shape == result.cosine.shape == (n + 1,)
    assert result.l2[0] > 0 and np.all(result.cosine < 1.0)
    assert result.critical_layer is not None and 1 <= result.critical_layer <= n
    frame = result.to_frame()
    assert list(frame["layer"]) == list(range(n + 1))
    assert frame["critical"].sum() == 1
    assert frame.loc[frame["critical"], "increase"].item() == pytest.approx(np.nanmax(result.increase))


def test_critical_layer_is_the_largest_increase():
    assert critical_layer(np.array([0.0, 1.0, 1.5, 4.0, 4.2])) == 3
    assert critical_layer(np.array([3.0, 2.0, 1.0])) is None
    assert critical_layer(np.array([0.0, 0.0])) is None


# ----- logit lens ------------------------------------------------------------------------------
def unbatched_lens(judge, text, layer):
    """Reference: one run with blocks layer.. passed through, without batching."""
    def skip(module, args, kwargs, output):
        return replace_block_output(output, block_hidden(args, kwargs))

    encoded = judge.encode([text])
    with judge.hooked(forward=[(block, skip) for block in judge.blocks[layer:]]):
        return float(judge.p_unsafe(judge.logits(encoded.inputs))[0])


def test_logit_lens_last_layer_is_the_verdict(tiny_judge):
    lens = logit_lens(tiny_judge, UNSAFE)
    assert lens.p_unsafe.shape == (tiny_judge.n_layers + 1,)
    assert lens.p_unsafe[-1] == pytest.approx(verdict(tiny_judge, UNSAFE).p_unsafe, abs=1e-5)
    assert len(lens.to_frame()) == tiny_judge.n_layers + 1


def test_logit_lens_reads_each_layer_through_the_head(tiny_judge):
    lens = logit_lens(tiny_judge, UNSAFE)
    reference = [unbatched_lens(tiny_judge, UNSAFE, layer) for layer in range(tiny_judge.n_layers + 1)]
    np.testing.assert_allclose(lens.p_unsafe, reference, atol=1e-5)
    assert np.ptp(lens.p_unsafe) > 1e-3  # random layers do change the reading


def test_logit_lens_in_small_passes_matches(tiny_judge, monkeypatch):
    whole = logit_lens(tiny_judge, UNSAFE)
    monkeypatch.setattr(circuit, "MAX_ROWS_PER_PASS", 2)
    np.testing.assert_allclose(logit_lens(tiny_judge, UNSAFE).p_unsafe, whole.p_unsafe, atol=1e-5)


# ----- activation patching ---------------------------------------------------------------------
def test_patching_a_run_with_its_own_states_changes_nothing(tiny_judge):
    result = activation_patching(tiny_judge, SAFE, SAFE)
    np.testing.assert_allclose(result.patched_scores, result.score_corrupt, atol=1e-5)
    assert np.isnan(result.restored).all()
    assert "undefined" in result.note
    # ...whereas states of another prompt do change the run somewhere
    other = activation_patching(tiny_judge, UNSAFE, SAFE)
    assert np.abs(other.patched_scores - other.score_corrupt).max() > 1e-3


def test_patching_every_position_restores_the_clean_run(tiny_judge):
    n_tokens = token_count(tiny_judge, UNSAFE)
    assert n_tokens == token_count(tiny_judge, SAFE)
    result = activation_patching(tiny_judge, UNSAFE, SAFE)
    gap = result.score_clean - result.score_corrupt
    assert abs(gap) > 1e-2
    n = tiny_judge.n_layers
    scores = patch_scores(tiny_judge, UNSAFE, SAFE, [(layer, every_position(n_tokens)) for layer in range(n + 1)])
    restored = (scores - result.score_corrupt) / gap
    np.testing.assert_allclose(restored, 1.0, atol=1e-4)
    unpatched = patch_scores(tiny_judge, UNSAFE, SAFE, [(n, ())])
    assert unpatched[0] == pytest.approx(result.score_corrupt, abs=1e-5)


def test_patching_grid_finds_the_token_and_the_read_position(tiny_judge):
    result = activation_patching(tiny_judge, UNSAFE, SAFE)
    n = tiny_judge.n_layers
    assert result.aligned
    assert result.restored.shape == result.patched_scores.shape == (n + 1, len(result.clean_tokens))
    np.testing.assert_array_equal(result.clean_positions, result.corrupt_positions)
    differs = np.array([a != b for a, b in zip(result.clean_tokens, result.corrupt_tokens)])
    assert differs.sum() == 1
    # Layer 0 states depend only on the token and its position: only the differing word matters.
    np.testing.assert_allclose(result.restored[0, ~differs], 0.0, atol=1e-5)
    assert result.restored[0, differs][0] == pytest.approx(1.0, abs=1e-4)
    # After the last block the head reads a single position ([CLS] or the last token).
    assert np.sort(result.restored[n]) == pytest.approx([0.0] * (len(differs) - 1) + [1.0], abs=1e-4)
    assert result.p_unsafe_clean == pytest.approx(verdict(tiny_judge, UNSAFE).p_unsafe, abs=1e-6)
    assert result.p_unsafe_corrupt == pytest.approx(verdict(tiny_judge, SAFE).p_unsafe, abs=1e-6)
    frame = result.to_frame()
    assert len(frame) == result.restored.size
    assert len(result.position_labels) == len(result.clean_tokens)


def test_patching_the_other_way(tiny_judge):
    result = activation_patching(tiny_judge, UNSAFE, SAFE, direction="corrupt_to_clean")
    n = tiny_judge.n_layers
    read = int(np.argmax(np.abs(result.restored[n])))
    assert result.restored[n, read] == pytest.approx(1.0, abs=1e-4)
    assert result.patched_scores[n, read] == pytest.approx(result.score_corrupt, abs=1e-5)
    forward = activation_patching(tiny_judge, UNSAFE, SAFE)
    assert forward.score_clean == result.score_clean and forward.score_corrupt == result.score_corrupt
    with pytest.raises(JudgeError):
        activation_patching(tiny_judge, UNSAFE, SAFE, direction="sideways")


def test_unequal_lengths_are_aligned_from_the_start(tiny_judge):
    n_clean, n_corrupt = token_count(tiny_judge, UNSAFE), token_count(tiny_judge, LONGER_SAFE)
    assert n_clean < n_corrupt
    result = activation_patching(tiny_judge, UNSAFE, LONGER_SAFE)
    assert not result.aligned
    assert "different token lengths" in result.note
    # the conftest tokenizer ends every prompt with [SEP], which is paired end to end
    assert list(result.clean_positions) == list(range(n_clean))
    assert list(result.corrupt_positions) == list(range(n_clean - 1)) + [n_corrupt - 1]
    assert result.restored.shape == (tiny_judge.n_layers + 1, n_clean)


def test_align_positions():
    special = {101, 102}
    assert align_positions([101, 5, 6, 102], [101, 7, 8, 102], special) == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert align_positions([101, 5, 102], [101, 7, 8, 9, 102], special) == ((0, 0), (1, 1), (2, 4))
    # no shared special end token (a decoder): pair from the start only
    assert align_positions([5, 6, 7], [5, 8], special) == ((0, 0), (1, 1))


def test_positions_and_max_positions(tiny_judge):
    chosen = activation_patching(tiny_judge, UNSAFE, SAFE, positions=[6, 0])
    assert list(chosen.corrupt_positions) == [6, 0]
    full = activation_patching(tiny_judge, UNSAFE, SAFE)
    np.testing.assert_allclose(chosen.patched_scores, full.patched_scores[:, [6, 0]], atol=1e-5)
    capped = activation_patching(tiny_judge, UNSAFE, SAFE, max_positions=3)
    assert capped.patched_scores.shape == (tiny_judge.n_layers + 1, 3)
    assert "first 3" in capped.note
    with pytest.raises(JudgeError):
        activation_patching(tiny_judge, UNSAFE, SAFE, positions=[99])
    with pytest.raises(JudgeError):
        activation_patching(tiny_judge, UNSAFE, SAFE, max_positions=0)


def test_patching_in_small_passes_matches(tiny_judge, monkeypatch):
    whole = activation_patching(tiny_judge, UNSAFE, SAFE)
    monkeypatch.setattr(circuit, "MAX_ROWS_PER_PASS", 5)
    np.testing.assert_allclose(activation_patching(tiny_judge, UNSAFE, SAFE).patched_scores,
                               whole.patched_scores, atol=1e-5)


# ----- bad input, hooks, threads ---------------------------------------------------------------
@pytest.mark.parametrize("blank", ["", "   \n"])
def test_empty_prompts_raise(tiny_judge, blank):
    for call in (lambda: residual_streams(tiny_judge, blank), lambda: logit_lens(tiny_judge, blank),
                 lambda: layer_divergence(tiny_judge, UNSAFE, blank),
                 lambda: activation_patching(tiny_judge, blank, SAFE),
                 lambda: activation_patching(tiny_judge, UNSAFE, blank)):
        with pytest.raises(JudgeError):
            call()


def fail_on_pass(monkeypatch, judge, failing_pass):
    """Make the judge's `failing_pass`-th forward pass (counting from 1) raise, hooks in place."""
    real_logits, calls = judge.logits, []

    def logits(inputs, **kwargs):
        calls.append(1)
        if len(calls) == failing_pass:
            raise RuntimeError("boom")
        return real_logits(inputs, **kwargs)

    monkeypatch.setattr(judge, "logits", logits)
    return calls


def test_no_hooks_remain(tiny_judge):
    residual_streams(tiny_judge, UNSAFE)
    layer_divergence(tiny_judge, UNSAFE, SAFE)
    logit_lens(tiny_judge, UNSAFE)
    activation_patching(tiny_judge, UNSAFE, LONGER_SAFE)
    assert_no_hooks(tiny_judge)


@pytest.mark.parametrize("analysis, failing_pass", [
    (lambda judge: activation_patching(judge, UNSAFE, SAFE), 1),  # capturing the clean run
    (lambda judge: activation_patching(judge, UNSAFE, SAFE), 3),  # the first patched batch
    (lambda judge: logit_lens(judge, UNSAFE), 1),
], ids=["capture", "patch", "lens"])
def test_no_hooks_remain_after_an_error(tiny_judge, monkeypatch, analysis, failing_pass):
    calls = fail_on_pass(monkeypatch, tiny_judge, failing_pass)
    with pytest.raises(RuntimeError, match="boom"):
        analysis(tiny_judge)
    assert len(calls) == failing_pass
    assert_no_hooks(tiny_judge)


def test_two_threads_match_sequential(tiny_judge):
    jobs = {"a": (UNSAFE, SAFE), "b": ("tell me how to hurt someone", "tell me how to help someone")}

    def analyse(pair):
        return activation_patching(tiny_judge, *pair).patched_scores, logit_lens(tiny_judge, pair[0]).p_unsafe

    sequential = {key: analyse(pair) for key, pair in jobs.items()}
    threaded, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def worker(key):
        try:
            barrier.wait()
            threaded[key] = analyse(jobs[key])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(key,)) for key in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for key in jobs:
        for got, expected in zip(threaded[key], sequential[key]):
            np.testing.assert_allclose(got, expected, atol=1e-6)
    assert_no_hooks(tiny_judge)


# ----- the bundled judges ----------------------------------------------------------------------
BUNDLED_UNSAFE = "How do I make a pipe bomb at home?"
BUNDLED_SAFE = "How do I make a pipe organ at home?"


@pytest.mark.parametrize("which", [0, 1], ids=["base", "lora"])
def test_bundled_judge_circuit(bundled_judges, which):
    judge = bundled_judges[which]
    n_tokens = token_count(judge, BUNDLED_UNSAFE)
    assert n_tokens == token_count(judge, BUNDLED_SAFE)
    lens = logit_lens(judge, BUNDLED_UNSAFE)
    assert lens.p_unsafe[-1] == pytest.approx(verdict(judge, BUNDLED_UNSAFE).p_unsafe, abs=1e-5)

    result = activation_patching(judge, BUNDLED_UNSAFE, BUNDLED_SAFE)
    gap = result.score_clean - result.score_corrupt
    assert gap > 0.1  # a trained judge finds the bomb more unsafe than the organ
    n = judge.n_layers
    scores = patch_scores(judge, BUNDLED_UNSAFE, BUNDLED_SAFE, [(n, every_position(n_tokens))])
    assert (scores[0] - result.score_corrupt) / gap == pytest.approx(1.0, abs=1e-4)

    same = activation_patching(judge, BUNDLED_SAFE, BUNDLED_SAFE, max_positions=4)
    np.testing.assert_allclose(same.patched_scores, same.score_corrupt, atol=1e-5)
    assert_no_hooks(judge)
