"""Version comparison: what changed between two judges that read text the same way (base vs LoRA).

`compare_versions` runs both judges over a suite of prompts — one batched forward per judge per
chunk, with attention patterns and every block's output — and reports, per prompt, p(unsafe) under
both, the change, whether the verdict flipped, how much the attention patterns moved (Frobenius
norm of the difference, padding masked out, per layer and head) and how far each layer's
representation moved (1 − cosine of the mean-pooled block outputs). `weight_change` lists the norm
of each adapted module's weight change, and `attribution_shift` compares two token-attribution
vectors (the page computes them with `guardian.attribution`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from guardian.judge import Judge, JudgeError
from guardian.probe import forward_with_block_outputs, masked_mean
from guardian.scoring import THRESHOLD, _token_lengths, check_prompt

SUITE_PATH = Path(__file__).parent / "data" / "suite.csv"
ATTENTION_BUDGET = 8_000_000  # attention weights per judge per chunk (bounds memory on long prompts)


# ----- the suite ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    """Prompts to compare the judges on, with their true labels (1 = unsafe) and kinds."""

    prompts: tuple[str, ...]
    labels: np.ndarray
    kinds: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"prompt": list(self.prompts), "label": self.labels, "kind": list(self.kinds)})


def default_suite(path: str | Path = SUITE_PATH) -> Suite:
    """The shipped comparison suite, `guardian/data/suite.csv` (columns prompt, label, kind)."""
    path = Path(path)
    if not path.exists():
        raise JudgeError(f"The comparison suite is missing: {path} does not exist.")
    frame = pd.read_csv(path, dtype={"prompt": str, "kind": str}, keep_default_na=False)
    missing = {"prompt", "label", "kind"} - set(frame.columns)
    if missing:
        raise JudgeError(f"The comparison suite {path.name} lacks the column(s) {', '.join(sorted(missing))}.")
    return Suite(prompts=tuple(frame["prompt"]), labels=frame["label"].to_numpy(dtype=int),
                 kinds=tuple(frame["kind"]))


# ----- the comparison -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionComparison:
    """Two judges over the same prompts: verdicts, attention and representation changes."""

    base_name: str
    lora_name: str
    prompts: tuple[str, ...]
    labels: np.ndarray | None  # 1 = unsafe, when known
    kinds: tuple[str, ...] | None
    base_p_unsafe: np.ndarray  # (prompts,)
    lora_p_unsafe: np.ndarray  # (prompts,)
    truncated: np.ndarray  # (prompts,)
    attention_change_by_head: np.ndarray  # (prompts, layers, heads): ||A_lora - A_base||_F
    representation_shift_by_layer: np.ndarray  # (prompts, layers): 1 - cos(mean-pooled outputs)

    @property
    def change(self) -> np.ndarray:
        """p(unsafe) under the LoRA judge minus under the base judge."""
        return self.lora_p_unsafe - self.base_p_unsafe

    @property
    def flipped(self) -> np.ndarray:
        """Whether the verdict (threshold 0.5) differs between the two judges."""
        return (self.base_p_unsafe >= THRESHOLD) != (self.lora_p_unsafe >= THRESHOLD)

    @property
    def attention_change(self) -> np.ndarray:
        """Per prompt, Frobenius norm of the attention difference over all layers and heads."""
        return np.sqrt((self.attention_change_by_head ** 2).sum(axis=(1, 2)))

    @property
    def attention_change_per_layer(self) -> np.ndarray:
        """Per layer, the mean over prompts of the Frobenius norm over that layer's heads."""
        return np.sqrt((self.attention_change_by_head ** 2).sum(axis=2)).mean(axis=0)

    @property
    def attention_change_per_head(self) -> np.ndarray:
        """(layers, heads): the mean over prompts of each head's Frobenius norm."""
        return self.attention_change_by_head.mean(axis=0)

    @property
    def representation_shift(self) -> np.ndarray:
        """Per layer, the mean over prompts of 1 − cosine of the mean-pooled block outputs."""
        return self.representation_shift_by_layer.mean(axis=0)

    def accuracy(self) -> dict[str, float]:
        """Share of prompts each judge ("base", "lora") labels correctly; empty when labels are unknown."""
        if self.labels is None:
            return {}
        return {"base": float(((self.base_p_unsafe >= THRESHOLD) == self.labels).mean()),
                "lora": float(((self.lora_p_unsafe >= THRESHOLD) == self.labels).mean())}

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt."""
        frame = pd.DataFrame({"prompt": list(self.prompts)})
        if self.kinds is not None:
            frame["kind"] = list(self.kinds)
        if self.labels is not None:
            frame["label"] = self.labels
        frame["base_p_unsafe"] = self.base_p_unsafe
        frame["lora_p_unsafe"] = self.lora_p_unsafe
        frame["change"] = self.change
        frame["flipped"] = self.flipped
        frame["attention_change"] = self.attention_change
        frame["representation_shift"] = self.representation_shift_by_layer.mean(axis=1)
        frame["truncated"] = self.truncated
        return frame

    def layer_frame(self) -> pd.DataFrame:
        """One row per layer: mean attention change and representation shift."""
        return pd.DataFrame({"layer": np.arange(len(self.representation_shift)),
                             "attention_change": self.attention_change_per_layer,
                             "representation_shift": self.representation_shift})

    def head_frame(self) -> pd.DataFrame:
        """One row per (layer, head): mean attention change."""
        layers, heads = self.attention_change_per_head.shape
        return pd.DataFrame({"layer": np.repeat(np.arange(layers), heads), "head": np.tile(np.arange(heads), layers),
                             "attention_change": self.attention_change_per_head.ravel()})


def check_comparable(base: Judge, lora: Judge) -> None:
    """Refuse judges that do not share a tokenizer and a block/head layout."""
    same_tokenizer = base.tokenizer is lora.tokenizer or base.tokenizer.get_vocab() == lora.tokenizer.get_vocab()
    if not same_tokenizer:
        raise JudgeError("These two judges use different tokenizers, so their attention cannot be compared.")
    if (base.n_layers, base.n_heads) != (lora.n_layers, lora.n_heads):
        raise JudgeError("These two judges have different numbers of layers or heads, so they cannot be compared.")


def chunks_by_attention_size(judge: Judge, prompts: list[str], batch_size: int) -> list[np.ndarray]:
    """Prompt indices in length-sorted chunks whose attention tensors stay within the budget."""
    lengths = _token_lengths(judge, prompts) + judge.tokenizer.num_special_tokens_to_add()
    per_token_pair = judge.n_layers * judge.n_heads
    order = np.argsort(lengths, kind="stable")
    chunks, current = [], []
    for i in order:
        longest = int(lengths[i])
        if current and (len(current) >= batch_size
                        or (len(current) + 1) * per_token_pair * longest ** 2 > ATTENTION_BUDGET):
            chunks.append(np.array(current))
            current = []
        current.append(i)
    if current:
        chunks.append(np.array(current))
    return chunks


@dataclass(frozen=True)
class _Pass:
    """What one judge's forward pass over a chunk yields."""

    p_unsafe: torch.Tensor  # (batch,)
    attentions: tuple[torch.Tensor, ...]  # per layer (batch, heads, query, key)
    pooled: list[torch.Tensor]  # per layer (batch, hidden)


def run_pass(judge: Judge, inputs: dict[str, torch.Tensor]) -> _Pass:
    output, pooled = forward_with_block_outputs(judge, inputs, masked_mean, output_attentions=True)
    if not output.attentions or any(a is None for a in output.attentions):
        raise JudgeError(f"The judge '{judge.name}' does not return attention patterns "
                         "(load it with attn_implementation='eager').")
    return _Pass(judge.p_unsafe(output.logits.float()), tuple(a.float() for a in output.attentions), pooled)


def attention_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], mask: torch.Tensor) -> np.ndarray:
    """(batch, layers, heads) Frobenius norms of the attention difference over real tokens only."""
    pair = mask[:, None, :, None].float() * mask[:, None, None, :].float()
    return torch.stack([((x - y) * pair).pow(2).sum((-1, -2)).sqrt() for x, y in zip(a, b)], dim=1).numpy()


def representation_shift(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> np.ndarray:
    """(batch, layers) 1 − cosine similarity of mean-pooled block outputs."""
    cos = torch.stack([torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12)
                       for x, y in zip(a, b)], dim=1)
    return (1.0 - cos).clamp_min(0.0).numpy()


def compare_versions(base: Judge, lora: Judge, prompts: Sequence[str] | Suite, labels: Sequence[int] | None = None,
                     kinds: Sequence[str] | None = None, batch_size: int = 64) -> VersionComparison:
    """Compare two judges that share a tokenizer on a suite of prompts.

    `prompts` may be a `Suite` (from `default_suite()`), whose labels and kinds are then used.
    Both judges read exactly the same tokens; padding is masked out of every statistic.
    """
    if isinstance(prompts, Suite):
        labels = prompts.labels if labels is None else labels
        kinds = prompts.kinds if kinds is None else kinds
        prompts = prompts.prompts
    prompts = [check_prompt(p) for p in prompts]
    if not prompts:
        raise JudgeError("There are no prompts to compare the judges on.")
    label_array = None if labels is None else np.asarray(labels, dtype=int)
    if label_array is not None and label_array.shape != (len(prompts),):
        raise JudgeError("There must be one label per prompt.")
    if kinds is not None and len(kinds) != len(prompts):
        raise JudgeError("There must be one kind per prompt.")
    check_comparable(base, lora)

    n, layers, heads = len(prompts), base.n_layers, base.n_heads
    p_base, p_lora = np.zeros(n), np.zeros(n)
    truncated = np.zeros(n, dtype=bool)
    attention = np.zeros((n, layers, heads))
    shift = np.zeros((n, layers))
    for index in chunks_by_attention_size(base, prompts, batch_size):
        encoded = base.encode([prompts[i] for i in index])
        a, b = run_pass(base, encoded.inputs), run_pass(lora, encoded.inputs)
        p_base[index], p_lora[index] = a.p_unsafe.double().numpy(), b.p_unsafe.double().numpy()
        truncated[index] = encoded.truncated
        attention[index] = attention_difference(a.attentions, b.attentions, encoded.inputs["attention_mask"])
        shift[index] = representation_shift(a.pooled, b.pooled)
    return VersionComparison(
        base_name=base.name, lora_name=lora.name, prompts=tuple(prompts), labels=label_array,
        kinds=None if kinds is None else tuple(str(k) for k in kinds), base_p_unsafe=p_base, lora_p_unsafe=p_lora,
        truncated=truncated, attention_change_by_head=attention, representation_shift_by_layer=shift,
    )


# ----- weights and attributions -------------------------------------------------------------------
LAYER_INDEX = re.compile(r"\.(\d+)\.")


def weight_change(judge: Judge) -> pd.DataFrame:
    """Norm of each adapted module's weight change (from `judge.weight_deltas`), with the layer
    index and module kind parsed from its name; layer is -1 for modules outside the blocks."""
    rows = []
    for name, norm in judge.weight_deltas.items():
        dotted = f"{name}."
        match = LAYER_INDEX.search(dotted)
        layer = int(match.group(1)) if match else -1
        kind = (dotted[match.end():-1] or "block") if match else name
        rows.append({"module": name, "layer": layer, "kind": kind, "norm": float(norm)})
    frame = pd.DataFrame(rows, columns=["module", "layer", "kind", "norm"])
    return frame.sort_values(["layer", "module"], kind="stable").reset_index(drop=True)


def attribution_shift(a_scores: np.ndarray, b_scores: np.ndarray) -> float:
    """L1 distance between two token-attribution vectors after L1-normalising each (0 to 2)."""
    a, b = np.asarray(a_scores, dtype=float).ravel(), np.asarray(b_scores, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"Attribution vectors differ in length ({a.size} vs {b.size}).")

    def normalised(x: np.ndarray) -> np.ndarray:
        total = np.abs(x).sum()
        return x / total if total > 0 else x

    return float(np.abs(normalised(a) - normalised(b)).sum())
