"""The fast paths under the verdicts: tokenise once, length-bounded batches, bfloat16 verdicts."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from guardian import loading
from guardian.attribution import attribute
from guardian.judge import JudgeError
from guardian.scoring import length_batches, score_prompts, verdict

PROMPTS = ["a", "how do I bake bread", "word " * 500, "   spaced   out  ", "tell me how to hurt someone badly",
           "kill a python process"]


def test_encode_pads_exactly_like_one_tokenizer_call(tiny_judge):
    encoded = tiny_judge.encode(PROMPTS)
    direct = tiny_judge.tokenizer(PROMPTS, padding=True, truncation=True, max_length=tiny_judge.max_tokens,
                                  return_tensors="pt")
    assert set(encoded.inputs) == {k for k in direct if k in ("input_ids", "attention_mask", "token_type_ids")}
    for name, value in encoded.inputs.items():
        assert torch.equal(value, direct[name]), name
    assert encoded.truncated == [False, False, True, False, False, False]
    assert encoded.lengths == direct["attention_mask"].sum(1).tolist()


def test_batches_are_sorted_bounded_and_cover_every_prompt():
    lengths = [5, 300, 12, 12, 7, 64, 64, 64, 3, 40]
    batches = length_batches(lengths, batch_size=3, max_tokens=128, max_ratio=2.0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert len(batch) <= 3 and (padded <= 128 or len(batch) == 1)
        assert max(lengths[i] for i in batch) <= 2.0 * min(lengths[i] for i in batch)


def test_batch_scores_do_not_depend_on_the_batching(tiny_judge):
    alone = score_prompts(tiny_judge, PROMPTS, batch_size=1).p_unsafe
    together = score_prompts(tiny_judge, PROMPTS).p_unsafe
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_bfloat16_verdicts_are_close_and_leave_analyses_in_float32(tiny_judge):
    fast = dataclasses.replace(tiny_judge, verdict_dtype=torch.bfloat16)
    exact = score_prompts(tiny_judge, PROMPTS).p_unsafe
    approximate = score_prompts(fast, PROMPTS).p_unsafe
    np.testing.assert_allclose(approximate, exact, atol=0.05)
    assert verdict(fast, PROMPTS[1]).p_unsafe == pytest.approx(approximate[1], abs=1e-3)
    inputs = tiny_judge.encode(PROMPTS[:2]).inputs
    assert torch.equal(fast.logits(inputs), tiny_judge.logits(inputs))
    assert fast.leftover_hooks() == []


def test_bfloat16_verdicts_use_fused_attention_and_leave_the_model_eager(tiny_judge):
    fast = dataclasses.replace(tiny_judge, verdict_dtype=torch.bfloat16)
    inputs = tiny_judge.encode(PROMPTS).inputs
    seen = []
    handle = tiny_judge.model.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation))
    try:
        fast.verdict_logits(inputs)
        tiny_judge.verdict_logits(inputs)
    finally:
        handle.remove()
    assert seen == ["sdpa", "eager"], "bfloat16 verdicts fused, float32 verdicts exactly as explained"
    assert tiny_judge.model.config._attn_implementation == "eager"
    with tiny_judge.lock, torch.inference_mode():
        attentions = tiny_judge.model(**inputs, output_attentions=True).attentions
    assert all(a is not None for a in attentions), "analyses still get attention weights"


def test_precision_setting(monkeypatch):
    monkeypatch.setenv(loading.ENV_PRECISION, "float32")
    assert loading.bundled_verdict_dtype() == torch.float32
    monkeypatch.setenv(loading.ENV_PRECISION, "bf16")
    assert loading.bundled_verdict_dtype() == torch.bfloat16
    monkeypatch.setenv(loading.ENV_PRECISION, "auto")
    monkeypatch.setattr(loading, "native_bf16", lambda: False)
    assert loading.bundled_verdict_dtype() == torch.float32
    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    assert loading.bundled_verdict_dtype() == torch.bfloat16
    monkeypatch.setenv(loading.ENV_PRECISION, "half")
    with pytest.raises(JudgeError, match="GUARDIAN_PRECISION"):
        loading.bundled_verdict_dtype()


def test_integrated_gradients_do_not_depend_on_the_steps_per_pass(tiny_judge):
    one_pass = attribute(tiny_judge, PROMPTS[4], "ig", n_steps=20)
    many = attribute(tiny_judge, PROMPTS[4], "ig", n_steps=20, internal_batch_size=3)
    np.testing.assert_allclose(one_pass.token_scores, many.token_scores, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_heap_settings_are_accepted_by_glibc():
    from guardian.runtime import limit_heap_retention

    assert limit_heap_retention() is True  # both mallopt calls succeeded

