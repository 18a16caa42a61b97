"""Tiny judges built from configs (random weights, no downloads) for fast unit tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from guardian.judge import Judge
from guardian.loading import backbone_path

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
APP_TIMEOUT = 300  # seconds per AppTest run: two shared CPU cores; the first run also loads the judges

ARCHITECTURES = ("bert", "gpt2", "llama")
LABELS = {0: "safe", 1: "unsafe"}


def tiny_model(arch: str, seed: int = 0):
    """A two-class classifier of the given family with a few random layers."""
    torch.manual_seed(seed)
    common = dict(num_labels=2, id2label=LABELS, label2id={"safe": 0, "unsafe": 1}, vocab_size=30522,
                  initializer_range=0.2,
                  attn_implementation="eager")
    if arch == "bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, **common)
        return BertForSequenceClassification(config)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
                            bos_token_id=101, eos_token_id=102, **common)
        return GPT2ForSequenceClassification(config)
    if arch == "llama":
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                             bos_token_id=101, eos_token_id=102, **common)
        return LlamaForSequenceClassification(config)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(backbone_path())


def make_judge(arch: str, tokenizer, seed: int = 0) -> Judge:
    model = tiny_model(arch, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return Judge(name=f"tiny-{arch}", model=model, tokenizer=tokenizer, max_tokens=64)


@pytest.fixture(params=ARCHITECTURES)
def tiny_judge(request, tokenizer) -> Judge:
    return make_judge(request.param, tokenizer)


@pytest.fixture(scope="session")
def bundled_judges():
    """The shipped base and LoRA judges, loaded once for the session."""
    from guardian.loading import load_bundled_judges

    return load_bundled_judges()


def open_app(prompt: str | None = None, page: str = "probe", pair: str | None = None, steps: int = 4):
    """An AppTest session of the app opened from a link, with few integration steps to stay quick."""
    from streamlit.testing.v1 import AppTest

    from guardian.ui import state

    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT)
    at.session_state[state.STEPS] = steps
    if prompt is not None:
        at.query_params["prompt"] = prompt
    if pair is not None:
        at.query_params["pair"] = pair
    at.run()
    if page != "probe":
        at.switch_page(f"pages/{page}.py").run()
    return at
