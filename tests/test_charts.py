"""Every chart builder gives a valid Vega-Lite chart for a small synthetic result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from guardian.ui import charts

TOKENS = ("[CLS]", "how", "to", "make", "a", "bomb", "a", "[SEP]")
rng = np.random.default_rng(0)


def heads_frame(layers: int = 3, heads: int = 4) -> pd.DataFrame:
    return pd.DataFrame({"layer": np.repeat(np.arange(layers), heads), "head": np.tile(np.arange(heads), layers),
                         "attention": rng.random(layers * heads)})


def comparison_frame() -> pd.DataFrame:
    before = np.array([0.9, 0.2, 0.6, 0.1])
    after = np.array([0.95, 0.7, 0.3, 0.1])
    return pd.DataFrame({"prompt": ["a", "b", "c", "d"], "base_p_unsafe": before, "lora_p_unsafe": after,
                         "change": after - before, "flipped": (before >= 0.5) != (after >= 0.5),
                         "attention_change": [0.1, 0.5, 0.4, 0.0]})


def builders():
    n = len(TOKENS)
    lens = pd.DataFrame({"prompt": ["unsafe prompt"] * 3 + ["safe twin"] * 3, "layer": [0, 1, 2] * 2,
                         "p_unsafe": [0.5, 0.7, 0.9, 0.5, 0.3, 0.1]})
    patching = pd.DataFrame({"layer": np.repeat([0, 1, 2], n), "position": np.tile(np.arange(n), 3),
                             "restored": np.r_[rng.normal(size=3 * n - 1), np.nan], "patched_score": rng.normal(size=3 * n)})
    ablation = heads_frame().assign(delta_p_unsafe=rng.normal(scale=0.05, size=12),
                                    delta_log_odds=rng.normal(size=12))
    return {
        "verdict": lambda: charts.verdict_chart(pd.DataFrame({"judge": ["Base", "LoRA"], "p_unsafe": [0.97, 0.41]})),
        "token": lambda: charts.token_chart(TOKENS, rng.normal(size=n), "scores"),
        "layer_activation": lambda: charts.layer_activation_chart(pd.DataFrame(
            {"judge": ["Base"] * 3, "layer": [0, 1, 2], "mean_activation_norm": [3.0, 4.5, 9.1]})),
        "mutation": lambda: charts.mutation_chart(pd.DataFrame(
            {"description": ["wrote 'bomb' as 'b0mb'", "deleted 'bomb'"], "kind": ["leetspeak", "deletion"],
             "p_unsafe": [0.41, 0.8], "flipped": [True, False]})),
        "head_grid": lambda: charts.head_grid_chart(heads_frame()),
        "top_heads": lambda: charts.top_heads_chart(heads_frame()),
        "head_pattern": lambda: charts.head_pattern_chart(TOKENS, rng.dirichlet(np.ones(n), size=n)),
        "attention_vs_ablation": lambda: charts.attention_vs_ablation_chart(ablation),
        "divergence": lambda: charts.divergence_chart(pd.DataFrame(
            {"layer": [0, 1, 2, 3], "l2": [0.1, 0.4, 2.0, 2.2], "cosine": [1.0, 0.9, 0.6, 0.5]}), 2),
        "divergence_no_critical": lambda: charts.divergence_chart(pd.DataFrame(
            {"layer": [0, 1], "l2": [0.3, 0.1], "cosine": [0.9, 0.95]}), None),
        "logit_lens": lambda: charts.logit_lens_chart(lens),
        "patching": lambda: charts.patching_chart(patching, charts.token_labels(TOKENS)),
        "change": lambda: charts.change_chart(comparison_frame()),
        "change_vs_attention": lambda: charts.change_vs_attention_chart(comparison_frame()),
        "layer_shift": lambda: charts.layer_shift_chart(pd.DataFrame(
            {"layer": [0, 1, 2], "attention_change": [0.1, 0.2, 0.3], "representation_shift": [0.0, 0.01, 0.05]})),
        "weight_change": lambda: charts.weight_change_chart(pd.DataFrame(
            {"module": ["l.0.query", "l.0.value", "classifier"], "layer": [0, 0, -1],
             "kind": ["query", "value", "classifier"], "norm": [1.2, 0.7, 0.3]})),
    }


@pytest.mark.parametrize("name", list(builders()))
def test_chart_builds_a_valid_spec(name):
    spec = builders()[name]().to_dict()  # validates against the Vega-Lite schema
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    assert "data" in spec or "datasets" in spec


def test_signed_scores_share_one_centred_scale():
    spec = charts.token_chart(("a", "b"), [-0.2, 1.0]).to_dict()
    scale = spec["encoding"]["color"]["scale"]
    assert scale["domain"] == [-1.0, 0, 1.0]
    assert scale["range"] == [charts.SAFE_COLOR, charts.NEUTRAL_COLOR, charts.UNSAFE_COLOR]


def test_repeated_tokens_get_distinct_labels():
    labels = charts.token_labels(("a", "bomb", "a"))
    assert len(set(labels)) == 3 and labels[2].endswith("a")


def test_top_heads_keeps_the_ten_largest():
    frame = heads_frame(5, 4)
    chart = charts.top_heads_chart(frame, k=10)
    kept = chart.data["attention"].to_numpy()
    assert len(kept) == 10
    assert kept.min() >= np.sort(frame["attention"].to_numpy())[-10]


def test_charts_module_does_not_import_streamlit():
    source = open(charts.__file__, encoding="utf-8").read()
    assert "import streamlit" not in source
