"""The adversarial probe: does the verdict survive the edits people use to dodge a judge?

`probe` rewrites a prompt with `guardian.mutations` (spelling disguises and softer wording of the
words the judge leans on, plus role-play/fiction/hypothetical/research framings), scores every
rewrite in one batched call, and ranks them by how far each lowers p(unsafe). A mutation *flips*
the verdict when it lands on the other side of the 0.5 threshold; the robustness score is the
share of mutations that keep the verdict.

`layer_activations` is a separate, small view of the same prompt: how strongly each transformer
block's output responds (mean L2 norm of its hidden states over the prompt's real tokens).
Attribution (which words to target) lives in `guardian.attribution`; the page passes its top words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from guardian import scoring
from guardian.judge import Judge, block_output_hidden
from guardian.mutations import Mutation, generate_mutations
from guardian.scoring import THRESHOLD, Verdict, check_prompt

Reduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden states, attention mask) -> value


# ----- shared: block outputs of one batched forward -----------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the token axis (dim 1) of `values`, counting only real (unpadded) tokens."""
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def forward_with_block_outputs(judge: Judge, inputs: dict[str, torch.Tensor], reduce: Reduce, **model_kwargs):
    """One forward pass under the judge's lock, passing every block's output hidden states
    through `reduce(hidden, attention_mask)` as they are produced.

    Returns the model output and the per-block reduced values, in block order. The hooks are
    removed on the way out, also when the forward pass fails.
    """
    mask = inputs["attention_mask"]
    reduced: list[torch.Tensor] = []

    def capture(module, args, kwargs, output):
        reduced.append(reduce(block_output_hidden(output).float(), mask))

    with judge.hooked(forward=[(block, capture) for block in judge.blocks]), torch.inference_mode():
        output = judge.model(**inputs, **model_kwargs)
    return output, reduced


def block_names(judge: Judge) -> tuple[str, ...]:
    """Qualified module names of the judge's transformer blocks, e.g. 'bert.encoder.layer.0'."""
    names = {id(module): name for name, module in judge.model.named_modules()}
    return tuple(names.get(id(block), f"block {i}") for i, block in enumerate(judge.blocks))


# ----- layer activations --------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerActivations:
    """How strongly each block's output responds to a prompt."""

    prompt: str
    tokens: tuple[str, ...]
    layer_names: tuple[str, ...]
    magnitudes: np.ndarray  # per block: mean L2 norm of its output hidden states over real tokens
    truncated: bool

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": np.arange(len(self.layer_names)), "module": list(self.layer_names),
                             "mean_activation_norm": self.magnitudes})


def token_norm_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean, over real tokens, of each token's hidden-state L2 norm."""
    return masked_mean(hidden.norm(dim=-1), mask)


def layer_activations(judge: Judge, text: str) -> LayerActivations:
    """Per-block activation magnitude: mean L2 norm of the block's output over the prompt's tokens."""
    text = check_prompt(text)
    encoded = judge.encode([text])
    _, per_block = forward_with_block_outputs(judge, encoded.inputs, token_norm_mean)
    return LayerActivations(
        prompt=text, tokens=tuple(encoded.tokens[0]), layer_names=block_names(judge),
        magnitudes=np.array([float(v[0]) for v in per_block]), truncated=encoded.truncated[0],
    )


# ----- the probe ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgeReading:
    """One judge's p(unsafe) for the original prompt (its verdict) and for every mutation."""

    judge_name: str
    verdict: Verdict
    p_unsafe: np.ndarray  # per mutation, in the probe's ranked order
    truncated: np.ndarray

    @property
    def drop(self) -> np.ndarray:
        """How much each mutation lowers p(unsafe): original minus mutated."""
        return self.verdict.p_unsafe - self.p_unsafe

    @property
    def flipped(self) -> np.ndarray:
        """Whether each mutation lands on the other side of the threshold from the original."""
        return (self.p_unsafe >= THRESHOLD) != self.verdict.unsafe

    @property
    def robustness(self) -> float:
        """Share of mutations that keep the original verdict (nan when there are none)."""
        return float(1.0 - self.flipped.mean()) if len(self.p_unsafe) else float("nan")

    def reordered(self, order: np.ndarray) -> "JudgeReading":
        return JudgeReading(self.judge_name, self.verdict, self.p_unsafe[order], self.truncated[order])


@dataclass(frozen=True)
class ProbeResult:
    """Mutations of a prompt, ranked by how much they lower the judge's p(unsafe)."""

    prompt: str
    target_words: tuple[str, ...]
    mutations: tuple[Mutation, ...]  # largest drop first
    reading: JudgeReading
    other: JudgeReading | None = None  # the same mutations read by a second judge

    @property
    def verdict(self) -> Verdict:
        return self.reading.verdict

    @property
    def p_unsafe(self) -> np.ndarray:
        return self.reading.p_unsafe

    @property
    def drop(self) -> np.ndarray:
        return self.reading.drop

    @property
    def flipped(self) -> np.ndarray:
        return self.reading.flipped

    @property
    def robustness(self) -> float:
        return self.reading.robustness

    @property
    def flips(self) -> tuple[Mutation, ...]:
        """The mutations that change the verdict, largest drop first."""
        return tuple(m for m, f in zip(self.mutations, self.flipped) if f)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({
            "mutation": [m.text for m in self.mutations], "family": [m.family for m in self.mutations],
            "kind": [m.kind for m in self.mutations], "target": [m.target for m in self.mutations],
            "description": [m.description for m in self.mutations],
            "p_unsafe": self.reading.p_unsafe, "drop": self.reading.drop, "flipped": self.reading.flipped,
            "truncated": self.reading.truncated,
        })
        if self.other is not None:
            frame["other_p_unsafe"] = self.other.p_unsafe
            frame["other_drop"] = self.other.drop
            frame["other_flipped"] = self.other.flipped
        return frame


def read_mutations(judge: Judge, text: str, mutations: Sequence[Mutation]) -> JudgeReading:
    """The judge's verdict on `text` and p(unsafe) of all mutations, scored in one batched call."""
    scores = scoring.score_prompts(judge, [m.text for m in mutations])
    return JudgeReading(judge.name, scoring.verdict(judge, text), scores.p_unsafe, scores.truncated)


def probe(judge: Judge, text: str, target_words: Sequence[str], other_judge: Judge | None = None,
          limit: int = 48) -> ProbeResult:
    """Mutate `text` around `target_words`, score every mutation and rank by drop in p(unsafe).

    With `other_judge`, the same mutations are also scored by it (e.g. base vs LoRA judge); the
    ranking follows `judge`.
    """
    text = check_prompt(text)
    mutations = generate_mutations(text, target_words, limit=limit)
    reading = read_mutations(judge, text, mutations)
    other = read_mutations(other_judge, text, mutations) if other_judge is not None else None
    order = np.argsort(-reading.drop, kind="stable")
    return ProbeResult(
        prompt=text, target_words=tuple(str(w) for w in target_words),
        mutations=tuple(mutations[i] for i in order), reading=reading.reordered(order),
        other=other.reordered(order) if other is not None else None,
    )
