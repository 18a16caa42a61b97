"""The benchmark's plumbing on tiny judges: every key reported, every value finite (no timings asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from conftest import make_judge
from guardian import bench
from guardian.loading import backbone_path

TINY = bench.Sizes(batch_prompts=40, seed_prompts=10, probe_prompts=2, repeats=1, lora_examples=16,
                   lora_epochs_run=1, dataset_prompts=30)


def tiny_judges():
    """Two tiny BERT judges for the benchmark's fresh process (imported there by name)."""
    tokenizer = AutoTokenizer.from_pretrained(backbone_path())
    return make_judge("bert", tokenizer), make_judge("bert", tokenizer, seed=1)


def test_report_has_every_key_with_a_finite_value(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    base, lora = tiny_judges()
    report = bench.run(base, lora, TINY, loader="test_bench:tiny_judges")
    assert set(bench.KEYS) <= set(report)
    for key in bench.KEYS:
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["probe_prompts"] == TINY.probe_prompts
    assert report["probe_max_tokens"] <= bench.PROBE_MAX_TOKENS
    text = bench.table(report)
    assert all(key in text for key in bench.KEYS)
    assert base.leftover_hooks() == [] and lora.leftover_hooks() == []


def test_bench_prompts_are_deterministic_and_varied():
    a, b = bench.bench_prompts(200), bench.bench_prompts(200)
    assert a == b
    pool = set(bench.data_prompts())
    assert len(set(a)) > 150
    assert any(p in pool for p in a) and any(p not in pool for p in a)  # single prompts and joined ones


def test_seed_code_agrees_with_batch_scoring(tokenizer):
    judge = make_judge("bert", tokenizer)
    prompts = bench.bench_prompts(12)
    seed = bench.seed_batch_analyze(judge, prompts, max_length=64)
    ours = bench.scoring.score_prompts(judge, prompts).p_unsafe
    np.testing.assert_allclose(seed, ours, atol=1e-4)


def test_patching_pair_has_the_asked_length(tokenizer):
    judge = make_judge("bert", tokenizer)
    unsafe, safe = bench.patching_pair(judge, 24)
    assert unsafe != safe
    assert list(bench.token_counts(judge, [unsafe, safe])) == [24, 24]


def test_target_verdicts():
    assert bench.verdict_on_target("ig_ms", 200) == "met"
    assert bench.verdict_on_target("ig_ms", 500).startswith("missed")
    assert bench.verdict_on_target("batch_prompts_per_s", 300) == "met"
    assert bench.verdict_on_target("batch_gflops", 1) == ""
