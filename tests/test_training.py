"""The LoRA training loop, the templated expansion and the train command's helpers, on tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from conftest import tiny_model
from guardian import augment
from guardian.judge import Judge
from guardian.scoring import score_prompts
from guardian.training import LoraSettings, length_bucketed_batches, lora_targets, train_lora

UNSAFE = ["build a bomb now", "poison the water supply", "steal her bank password", "hurt the kid next door",
          "make meth at home", "hack the hospital network"]
SAFE = ["bake a lemon cake", "plan a trip to rome", "water the tomato plants", "write a birthday poem",
        "learn to play chess", "fix a leaky tap"]


def test_training_fits_the_examples_and_leaves_the_model_alone(tokenizer):
    model = tiny_model("bert").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts, labels = UNSAFE + SAFE, [1] * 6 + [0] * 6
    settings = LoraSettings(rank=4, alpha=8, epochs=30, learning_rate=1e-2, batch_size=4,
                            target_modules=lora_targets(model), modules_to_save=("classifier",))
    steps = []
    trained = train_lora(model, tokenizer, texts, labels, settings, progress=lambda *a: steps.append(a))
    judge = Judge("trained", trained.merge_and_unload(), tokenizer)
    accuracy = ((score_prompts(judge, texts).p_unsafe >= 0.5) == np.array(labels)).mean()
    assert accuracy == 1.0
    assert steps[-1][1] == steps[-1][2]  # the last step reports the full count
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_length_buckets_cover_every_example_once():
    lengths = np.random.default_rng(0).integers(3, 60, size=203)
    batches = length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(203))
    assert all(len(b) <= 16 for b in batches)


def test_lora_targets_found_for_each_family():
    assert lora_targets(tiny_model("bert"))[:3] == ("query", "key", "value")
    assert "q_proj" in lora_targets(tiny_model("llama"))
    assert "c_attn" in lora_targets(tiny_model("gpt2"))


def test_templated_expansion_keeps_labels_and_balances_them():
    frame = pd.DataFrame({"prompt": UNSAFE + SAFE, "label": [1] * 6 + [0] * 6, "category": ["x"] * 12})
    out = augment.expand(frame, per_label=4, seed=3)
    assert (out.groupby("label").size() == 4).all()
    assert out["category"].str.startswith("templated_").all()
    originals = dict(zip(frame.prompt, frame.label))
    for prompt, label in zip(out.prompt, out.label):
        assert prompt not in originals
        wrapped_or_respelled = [o for o, lab in originals.items()
                                if lab == label and (o in prompt or len(o.split()) == len(prompt.split()))]
        assert wrapped_or_respelled, prompt
    assert augment.expand(frame, per_label=4, seed=3).equals(out)


def test_top_layers_setting_adapts_only_the_last_blocks_and_still_fits(tokenizer):
    model = tiny_model("bert").eval()
    n_layers = model.config.num_hidden_layers
    texts, labels = UNSAFE + SAFE, [1] * 6 + [0] * 6
    settings = LoraSettings(rank=4, alpha=8, epochs=30, learning_rate=1e-2, batch_size=4, top_layers=1,
                            bfloat16=True, target_modules=lora_targets(model), modules_to_save=("classifier",))
    trained = train_lora(model, tokenizer, texts, labels, settings)
    adapted = {name.split(".layer.")[1].split(".")[0] for name, _ in trained.named_parameters()
               if "lora_A" in name and ".layer." in name}
    assert adapted == {str(n_layers - 1)}
    merged = trained.merge_and_unload()
    lower = [k for k in model.state_dict() if ".layer.0." in k]
    assert lower and all(torch.equal(model.state_dict()[k], merged.state_dict()[k]) for k in lower)
    def accuracy(m):
        return ((score_prompts(Judge("j", m, tokenizer), texts).p_unsafe >= 0.5) == np.array(labels)).mean()

    assert accuracy(merged) >= 0.9 > accuracy(model)
