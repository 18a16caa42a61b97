"""Verdicts: p(unsafe) for one prompt or many.

Batch scoring tokenises every prompt once, sorts them by token length and scores them in buckets,
so short prompts are not padded to the longest one, under `torch.inference_mode()` without
attention outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from guardian.judge import CHARS_PER_TOKEN_CAP, Judge, JudgeError
from guardian.runtime import release_free_memory

THRESHOLD = 0.5
TOKENS_PER_BATCH = 2048  # rows x padded length of one batch: bounds memory for long prompts
MAX_LENGTH_RATIO = 1.5  # longest / shortest prompt in one batch
LARGE_JOB = 256  # prompts; after scoring this many, freed memory is handed back to the system
Progress = Callable[[int, int], None]  # (prompts done, prompts in all)


@dataclass(frozen=True)
class Verdict:
    """A judge's reading of one prompt."""

    prompt: str
    tokens: tuple[str, ...]
    probabilities: np.ndarray  # per class, sums to 1
    label_names: tuple[str, ...]
    p_unsafe: float
    truncated: bool

    @property
    def unsafe(self) -> bool:
        return self.p_unsafe >= THRESHOLD

    @property
    def label(self) -> str:
        return "unsafe" if self.unsafe else "safe"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"class": list(self.label_names), "probability": self.probabilities})


@dataclass(frozen=True)
class Scores:
    """p(unsafe) for a list of prompts, in the order given."""

    prompts: tuple[str, ...]
    p_unsafe: np.ndarray
    truncated: np.ndarray

    def predictions(self, threshold: float = THRESHOLD) -> np.ndarray:
        return (self.p_unsafe >= threshold).astype(int)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"prompt": list(self.prompts), "p_unsafe": self.p_unsafe,
             "verdict": np.where(self.predictions() == 1, "unsafe", "safe"), "truncated": self.truncated}
        )


def check_prompt(text: str) -> str:
    """The prompt as given, or a clear error when there is nothing to judge."""
    if not isinstance(text, str):
        raise JudgeError("The prompt must be text.")
    if not text.strip():
        raise JudgeError("The prompt is empty. Type something for the judge to read.")
    return text


def verdict(judge: Judge, text: str) -> Verdict:
    """Class probabilities of one prompt."""
    text = check_prompt(text)
    encoded = judge.encode([text])
    logits = judge.verdict_logits(encoded.inputs)[0]
    return Verdict(
        prompt=text, tokens=tuple(encoded.tokens[0]),
        probabilities=torch.softmax(logits, -1).numpy(), label_names=tuple(judge.label_names),
        p_unsafe=float(judge.p_unsafe(logits)), truncated=encoded.truncated[0],
    )


def score_prompts(judge: Judge, texts: Sequence[str], batch_size: int = 64,
                  progress: Progress | None = None) -> Scores:
    """p(unsafe) for every prompt, scored in length-sorted batches."""
    texts = [str(t) if t is not None else "" for t in texts]
    n = len(texts)
    p_unsafe = np.zeros(n, dtype=np.float64)
    tokenized = judge.tokenize(texts)  # once: the lengths order the batches, the ids fill them
    done = 0
    for index in length_batches(tokenized.lengths, batch_size):
        logits = judge.verdict_logits(judge.batch_inputs(tokenized, index))
        p_unsafe[index] = judge.p_unsafe(logits).double().numpy()
        done += len(index)
        if progress is not None:
            progress(done, n)
    if n >= LARGE_JOB:
        release_free_memory()  # the batches' freed buffers go back to the system, not kept resident
    return Scores(prompts=tuple(texts), p_unsafe=p_unsafe, truncated=np.array(tokenized.truncated, dtype=bool))


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = TOKENS_PER_BATCH,
                   max_ratio: float = MAX_LENGTH_RATIO) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches of at most `batch_size` prompts and `max_tokens`
    tokens once padded (a longer prompt goes alone), none more than `max_ratio` times longer than
    the shortest prompt of its batch (so little of a batch is padding)."""
    order = np.argsort(np.asarray(lengths, dtype=int), kind="stable")
    batches, start = [], 0
    while start < len(order):
        end, limit = start + 1, max_ratio * lengths[order[start]]
        while (end < len(order) and end - start < batch_size and lengths[order[end]] <= limit
               and (end - start + 1) * lengths[order[end]] <= max_tokens):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def _token_lengths(judge: Judge, texts: list[str]) -> np.ndarray:
    """Tokens per prompt without special tokens, capped at `max_tokens` (used by guardian.compare)."""
    if not texts:
        return np.zeros(0, dtype=int)
    cap = judge.max_tokens * CHARS_PER_TOKEN_CAP
    ids = judge.tokenizer([t[:cap] for t in texts], add_special_tokens=False)["input_ids"]
    return np.minimum([len(x) for x in ids], judge.max_tokens)
