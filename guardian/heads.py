"""Attention heads of a judge for one prompt: where they look, and what they are worth.

* `attention_patterns` — every head's attention weights over the prompt's real tokens.
* `safety_token_attention` — how much attention each head pays a chosen set of tokens (a pure
  function of the patterns; `attribution.word_positions` turns words into token positions).
* `head_ablation` — the change in p(unsafe) and in the unsafe log-odds when one head's output
  is zeroed, for every head, computed in a few batched passes.
* `ablate_heads` — p(unsafe) with an explicit set of heads zeroed together.

A head is ablated by zeroing its slice ``[h * head_dim, (h + 1) * head_dim)`` of the input of
the block's attention output projection (`Judge.attention_outputs`), which is the concatenation
of the heads' outputs (a Linear for BERT and Llama, a Conv1D for GPT-2; both take it as the last
dimension of their first positional argument).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from guardian.judge import Judge, JudgeError
from guardian.scoring import check_prompt

DEFAULT_ROWS_PER_PASS = 96  # ablated copies of the prompt run together in one forward pass


Head = tuple[int, int]  # (layer, head)


# ----- attention patterns ----------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionPatterns:
    """Attention weights of every head for one prompt, real tokens only.

    `patterns[layer, head, query, key]` is the weight query token `query` puts on key token `key`;
    each query row sums to 1 (for decoders, keys after the query get 0).
    """

    prompt: str
    tokens: tuple[str, ...]
    patterns: np.ndarray  # float32 [layer, head, query, key]
    truncated: bool

    @property
    def n_layers(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.patterns.shape[1])

    def head_pattern(self, layer: int, head: int) -> np.ndarray:
        """The [query, key] attention matrix of one head."""
        _check_head((layer, head), self.n_layers, self.n_heads)
        return self.patterns[layer, head]

    def to_frame(self, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
        """Long format (layer, head, query, query_token, key, key_token, attention).

        One head when `layer` and `head` are given, every head when both are None.
        """
        if (layer is None) != (head is None):
            raise JudgeError("Give both a layer and a head, or neither for every head.")
        heads = [(layer, head)] if layer is not None else _all_heads(self.n_layers, self.n_heads)
        n = len(self.tokens)
        query, key = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        tokens = np.array(self.tokens, dtype=object)
        frames = [
            pd.DataFrame({
                "layer": l, "head": h, "query": query.ravel(), "query_token": tokens[query.ravel()],
                "key": key.ravel(), "key_token": tokens[key.ravel()],
                "attention": self.head_pattern(l, h).ravel(),
            })
            for l, h in heads
        ]
        return pd.concat(frames, ignore_index=True)


def attention_patterns(judge: Judge, text: str) -> AttentionPatterns:
    """Every head's attention weights over the prompt (one forward pass with attentions)."""
    text = check_prompt(text)
    encoded = judge.encode([text])
    with judge.hooked(), torch.inference_mode():
        attentions = judge.model(**encoded.inputs, output_attentions=True).attentions
    if not attentions or len(attentions) != judge.n_layers or any(a is None for a in attentions):
        raise JudgeError(
            "This judge did not return its attention weights. Load the model with "
            'attn_implementation="eager" to see attention patterns.'
        )
    real = encoded.inputs["attention_mask"][0].bool()
    stacked = torch.stack([a[0] for a in attentions])  # [layer, head, query, key]
    patterns = stacked[:, :, real][:, :, :, real].float().numpy()
    return AttentionPatterns(prompt=text, tokens=tuple(encoded.tokens[0]), patterns=patterns,
                             truncated=encoded.truncated[0])


# ----- attention paid to chosen tokens ---------------------------------------------------------
@dataclass(frozen=True)
class HeadAttention:
    """Per head, the attention paid to a chosen set of (safety) tokens.

    `scores[layer, head]` = mean over every query position q of sum over the chosen key
    positions k of `patterns[layer, head, q, k]`: the average share of a token's attention that
    goes to the chosen tokens, in [0, 1]. For decoders, queries before a chosen token cannot
    attend to it and count as 0 in the mean.
    """

    tokens: tuple[str, ...]
    token_indices: tuple[int, ...]
    scores: np.ndarray  # float64 [layer, head]

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The `k` heads paying the chosen tokens most attention, as (layer, head, score)."""
        return _top_heads(self.scores, k, key=lambda s: -s)

    def to_frame(self) -> pd.DataFrame:
        """One row per head (layer, head, attention), strongest first."""
        rows = _top_heads(self.scores, self.scores.size, key=lambda s: -s)
        return pd.DataFrame(rows, columns=["layer", "head", "attention"])


def safety_token_attention(patterns: AttentionPatterns, token_indices: Iterable[int]) -> HeadAttention:
    """Mean over queries of the summed attention each head pays the given token positions."""
    n = len(patterns.tokens)
    indices = tuple(sorted({int(i) for i in token_indices}))
    if not indices:
        raise JudgeError("Choose at least one token to measure the attention paid to it.")
    if indices[0] < 0 or indices[-1] >= n:
        raise JudgeError(f"Token positions must lie between 0 and {n - 1}.")
    paid = patterns.patterns[..., list(indices)].astype(np.float64).sum(-1)  # [layer, head, query]
    return HeadAttention(tokens=patterns.tokens, token_indices=indices, scores=paid.mean(-1))


# ----- head ablation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadAblation:
    """What zeroing each head's output alone does to the verdict on one prompt.

    `delta_p_unsafe[layer, head]` and `delta_log_odds[layer, head]` are ablated minus original
    p(unsafe) and unsafe log-odds; positive means the head was pushing towards *safe*.
    """

    prompt: str
    tokens: tuple[str, ...]
    truncated: bool
    p_unsafe: float  # unablated
    log_odds: float  # unablated unsafe log-odds
    delta_p_unsafe: np.ndarray  # float64 [layer, head]
    delta_log_odds: np.ndarray  # float64 [layer, head]

    @property
    def ablated_p_unsafe(self) -> np.ndarray:
        return self.p_unsafe + self.delta_p_unsafe

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The `k` heads whose removal moves the log-odds most, as (layer, head, delta_log_odds)."""
        return _top_heads(self.delta_log_odds, k, key=lambda d: -abs(d))

    def to_frame(self) -> pd.DataFrame:
        """One row per head, largest log-odds change first."""
        rows = _top_heads(self.delta_log_odds, self.delta_log_odds.size, key=lambda d: -abs(d))
        frame = pd.DataFrame(rows, columns=["layer", "head", "delta_log_odds"])
        layer, head = frame["layer"].to_numpy(), frame["head"].to_numpy()
        frame.insert(2, "p_unsafe_ablated", self.ablated_p_unsafe[layer, head])
        frame.insert(3, "delta_p_unsafe", self.delta_p_unsafe[layer, head])
        return frame


def head_ablation(judge: Judge, text: str, rows_per_pass: int = DEFAULT_ROWS_PER_PASS) -> HeadAblation:
    """Zero each head's output in turn; report the change in p(unsafe) and in the log-odds.

    The prompt is replicated once per head and run in passes of at most `rows_per_pass` rows,
    each row with its own head zeroed.
    """
    text = check_prompt(text)
    encoded = judge.encode([text])
    if rows_per_pass < 1:
        raise ValueError("rows_per_pass must be at least 1.")
    heads = _all_heads(judge.n_layers, judge.n_heads)
    base = judge.unsafe_score(judge.logits(encoded.inputs))[0]
    scores = torch.cat([
        judge.unsafe_score(_ablated_logits(judge, encoded.inputs, [[h] for h in heads[i:i + rows_per_pass]]))
        for i in range(0, len(heads), rows_per_pass)
    ])
    shape = (judge.n_layers, judge.n_heads)
    base_p = torch.sigmoid(base)
    return HeadAblation(
        prompt=text, tokens=tuple(encoded.tokens[0]), truncated=encoded.truncated[0],
        p_unsafe=float(base_p), log_odds=float(base),
        delta_p_unsafe=(torch.sigmoid(scores) - base_p).double().numpy().reshape(shape),
        delta_log_odds=(scores - base).double().numpy().reshape(shape),
    )


def ablate_heads(judge: Judge, text: str, heads: Iterable[Head]) -> float:
    """p(unsafe) with all the given (layer, head) outputs zeroed together (none: unchanged)."""
    text = check_prompt(text)
    chosen = [(int(l), int(h)) for l, h in heads]
    for head in chosen:
        _check_head(head, judge.n_layers, judge.n_heads)
    encoded = judge.encode([text])
    return float(judge.p_unsafe(_ablated_logits(judge, encoded.inputs, [chosen]))[0])


def _ablated_logits(judge: Judge, inputs: dict[str, torch.Tensor], rows: list[list[Head]]) -> torch.Tensor:
    """Logits of a one-prompt input repeated once per row, row i with the heads `rows[i]` zeroed."""
    width = judge.n_heads * judge.head_dim
    masks = torch.zeros(judge.n_layers, len(rows), width, dtype=torch.bool)
    for row, heads in enumerate(rows):
        for layer, head in heads:
            masks[layer, row, head * judge.head_dim:(head + 1) * judge.head_dim] = True
    batch = {k: v.repeat(len(rows), *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    hooks = [(module, _zero_heads_hook(masks[layer])) for layer, module in enumerate(judge.attention_outputs)]
    with judge.hooked(pre=hooks):
        return judge.logits(batch)


def _zero_heads_hook(mask: torch.Tensor):
    """A pre-hook zeroing, row by row, the masked part of the concatenated head outputs."""

    def hook(module, args, kwargs):
        if not args:
            raise JudgeError("The attention output projection was called without a positional input.")
        heads = args[0]
        if heads.shape[0] != mask.shape[0] or heads.shape[-1] != mask.shape[-1]:
            raise JudgeError(
                f"The attention output takes {heads.shape[-1]} features per token, but the judge "
                f"reports heads of {mask.shape[-1]} features in all; heads cannot be ablated."
            )
        row_mask = mask.to(heads.device).view(mask.shape[0], *([1] * (heads.dim() - 2)), mask.shape[-1])
        return (heads.masked_fill(row_mask, 0), *args[1:]), kwargs

    return hook


# ----- small helpers ---------------------------------------------------------------------------
def _all_heads(n_layers: int, n_heads: int) -> list[Head]:
    return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def _check_head(head: Head, n_layers: int, n_heads: int) -> None:
    layer, index = head
    if not (0 <= layer < n_layers and 0 <= index < n_heads):
        raise JudgeError(f"No head ({layer}, {index}): layers run 0–{n_layers - 1}, heads 0–{n_heads - 1}.")


def _top_heads(grid: np.ndarray, k: int, key) -> list[tuple[int, int, float]]:
    """Heads of a [layer, head] grid ordered by `key(value)`, then by layer and head; first `k`."""
    cells = [(layer, head, float(grid[layer, head])) for layer, head in _all_heads(*grid.shape)]
    return sorted(cells, key=lambda c: (key(c[2]), c[0], c[1]))[:max(0, k)]
