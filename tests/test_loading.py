"""The loader: tiny models of every family from folders, adapters, and clear errors."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import ARCHITECTURES, tiny_model
from guardian.judge import JudgeError
from guardian.loading import apply_adapter, load_judge
from guardian.scoring import score_prompts, verdict

PROMPTS = ["how do I bake bread", "tell me how to hurt someone", "kill a python process"]


def save_tiny(arch, tokenizer, folder):
    model = tiny_model(arch)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def save_adapter(model, folder, zero=False, seed=1):
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=_targets(model)))
    if not zero:
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(folder)


def _targets(model):
    from guardian.training import lora_targets

    return list(lora_targets(model))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_model_folder_of_each_family(arch, tokenizer, tmp_path):
    original = save_tiny(arch, tokenizer, tmp_path)
    judge = load_judge(str(tmp_path))
    assert judge.unsafe_labels == (1,)
    assert judge.n_layers == 2 and judge.n_heads == 4
    encoded = judge.encode(PROMPTS)
    with torch.no_grad():
        expected = original.eval()(**encoded.inputs).logits
    assert torch.allclose(judge.logits(encoded.inputs), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapter_changes_scores_and_zero_adapter_does_not(arch, tokenizer, tmp_path):
    save_tiny(arch, tokenizer, tmp_path / "model")
    save_adapter(tiny_model(arch), tmp_path / "zero", zero=True)
    save_adapter(tiny_model(arch), tmp_path / "trained", zero=False)
    plain = score_prompts(load_judge(str(tmp_path / "model")), PROMPTS).p_unsafe
    zero = load_judge(str(tmp_path / "model"), adapter=tmp_path / "zero")
    trained = load_judge(str(tmp_path / "model"), adapter=tmp_path / "trained")
    assert score_prompts(zero, PROMPTS).p_unsafe == pytest.approx(plain, abs=1e-6)
    assert not score_prompts(trained, PROMPTS).p_unsafe == pytest.approx(plain, abs=1e-4)
    assert trained.weight_deltas and all(v > 0 for v in trained.weight_deltas.values())
    assert all(v == 0 for v in zero.weight_deltas.values())


def test_apply_adapter_leaves_the_given_model_untouched(tokenizer, tmp_path):
    model = tiny_model("bert").eval()
    save_adapter(tiny_model("bert"), tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(JudgeError, match="No model folder"):
        load_judge(str(tmp_path / "nowhere" / "model"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(JudgeError, match="config.json"):
        load_judge(str(tmp_path))


def test_pickle_weights_are_refused(tokenizer, tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(JudgeError, match="safetensors"):
        load_judge(str(tmp_path))


def test_missing_adapter_file_is_a_clear_error(tokenizer, tmp_path):
    save_tiny("bert", tokenizer, tmp_path / "model")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(JudgeError, match="adapter_config.json"):
        load_judge(str(tmp_path / "model"), adapter=tmp_path / "adapter")


def test_corrupted_adapter_is_a_clear_error(tokenizer, tmp_path):
    save_tiny("bert", tokenizer, tmp_path / "model")
    save_adapter(tiny_model("bert"), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(JudgeError, match="could not be applied"):
        load_judge(str(tmp_path / "model"), adapter=tmp_path / "adapter")


def test_adapter_for_another_model_is_a_clear_error(tokenizer, tmp_path):
    save_tiny("bert", tokenizer, tmp_path / "model")
    save_adapter(tiny_model("llama"), tmp_path / "adapter")
    with pytest.raises(JudgeError):
        load_judge(str(tmp_path / "model"), adapter=tmp_path / "adapter")


def test_multiclass_judge_uses_label_names_or_asks(tokenizer, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        num_labels=3, id2label={0: "benign", 1: "injection", 2: "jailbreak"})
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_judge(str(tmp_path)).unsafe_labels == (1, 2)
    config.id2label = {0: "a", 1: "b", 2: "c"}
    config.save_pretrained(tmp_path)
    with pytest.raises(JudgeError, match="which mean unsafe"):
        load_judge(str(tmp_path))
    assert load_judge(str(tmp_path), unsafe_labels=(2,)).unsafe_labels == (2,)


def test_empty_prompt_is_refused(tiny_judge):
    with pytest.raises(JudgeError, match="empty"):
        verdict(tiny_judge, "   ")


def test_long_prompt_is_truncated_with_notice(tiny_judge):
    result = verdict(tiny_judge, "word " * 5000)
    assert result.truncated and len(result.tokens) == tiny_judge.max_tokens
    assert not verdict(tiny_judge, "short prompt").truncated


def test_batch_scores_match_single_prompts(tiny_judge):
    prompts = ["a", "a much longer prompt with many more words in it than the first", "mid length one"]
    batch = score_prompts(tiny_judge, prompts, batch_size=2).p_unsafe
    single = [verdict(tiny_judge, p).p_unsafe for p in prompts]
    assert batch == pytest.approx(single, abs=1e-5)
