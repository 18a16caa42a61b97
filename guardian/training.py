"""Train a peft LoRA adapter on labelled prompts: the one training loop of the project.

Used to build the bundled judges (`python -m guardian.train`) and for in-app updates. The model
passed in is never changed: training works on a copy wrapped by peft.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

# (epoch, step, steps in all, mean loss so far this epoch)
TrainProgress = Callable[[int, int, int, float], None]


@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA update trains and how."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    modules_to_save: tuple[str, ...] = ()
    epochs: int = 3
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    max_tokens: int = 64
    top_layers: int | None = None  # adapt only the last N transformer blocks (None: all of them)
    bfloat16: bool = False  # matrix products in bfloat16 under CPU autocast (weights and optimiser stay float32)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def lora_targets(model: PreTrainedModel) -> tuple[str, ...]:
    """Linear-layer names inside the blocks to adapt, for the common architecture families."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if type(module).__name__ in ("Linear", "Conv1D")}
    for family in (("query", "key", "value", "dense"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                   ("c_attn", "c_proj"), ("q_lin", "k_lin", "v_lin", "out_lin"), ("query_proj", "key_proj", "value_proj", "dense")):
        present = tuple(n for n in family if n in names)
        if len(present) >= 2:
            return present
    raise ValueError("No attention projections found to adapt in this model.")


def top_layer_indices(model: PreTrainedModel, top_layers: int | None) -> list[int] | None:
    """Indices of the last `top_layers` transformer blocks (None: every block).

    Gradients then stop at the lowest adapted block, so the backward pass skips the blocks below.
    """
    if top_layers is None:
        return None
    n_layers = model.config.num_hidden_layers
    return list(range(max(0, n_layers - top_layers), n_layers))


def train_lora(model: PreTrainedModel, tokenizer, texts: Sequence[str], labels: Sequence[int],
               settings: LoraSettings = LoraSettings(), progress: TrainProgress | None = None,
               should_stop: Callable[[], bool] | None = None) -> PeftModel:
    """Fine-tune a LoRA adapter on a copy of `model` with cross-entropy; returns the peft model in eval mode."""
    if len(texts) != len(labels) or not texts:
        raise ValueError("Training needs the same, non-zero number of prompts and labels.")
    _seed_everything(settings.seed)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), modules_to_save=list(settings.modules_to_save) or None,
        task_type="SEQ_CLS" if not settings.modules_to_save else None,
        layers_to_transform=top_layer_indices(model, settings.top_layers),
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    order_rng = np.random.default_rng(settings.seed)
    labels_t = torch.tensor(list(labels), dtype=torch.long)
    lengths = np.array([len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=settings.max_tokens)["input_ids"]])
    batches_per_epoch = len(length_bucketed_batches(lengths, settings.batch_size, np.random.default_rng(0)))
    total = batches_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * max(0.0, (total - step) / total)
    )
    peft_model.train()
    step = 0
    for epoch in range(settings.epochs):
        running = 0.0
        for b, index in enumerate(length_bucketed_batches(lengths, settings.batch_size, order_rng)):
            if should_stop is not None and should_stop():
                raise InterruptedError("Training was stopped.")
            enc = tokenizer([texts[i] for i in index], padding=True, truncation=True,
                            max_length=settings.max_tokens, return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bfloat16):
                logits = peft_model(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels_t[index])
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimiser.step()
            scheduler.step()
            step += 1
            running += loss.item()
            if progress is not None:
                progress(epoch + 1, step, total, running / (b + 1))
    peft_model.eval()
    return peft_model


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                            bucket_batches: int = 8) -> list[np.ndarray]:
    """Shuffled batches of indices in which prompts have similar lengths (less padding).

    The indices are shuffled, cut into buckets of `bucket_batches` batches, sorted by length
    within each bucket and cut into batches; the batches are then shuffled.
    """
    order = rng.permutation(len(lengths))
    batches = []
    span = batch_size * bucket_batches
    for start in range(0, len(order), span):
        bucket = order[start:start + span]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
