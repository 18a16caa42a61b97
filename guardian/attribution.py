"""Which words push the judge toward *unsafe*: token attribution of the unsafe log-odds.

Every method explains F(x) = `judge.unsafe_score(logits)` through Captum, on the output of the
token-embedding layer (`judge.embeddings()`), which is fed to the model as `inputs_embeds`:

- "ig": `IntegratedGradients` from the baseline's embeddings to the prompt's; the token scores
  add up to F(x) - F(baseline) up to Captum's convergence delta, which is reported.
- "grad_x_input": `InputXGradient`, gradient times embedding (a first-order reading measured from
  the zero embedding, so its baseline is always "zero").
- "occlusion": `FeatureAblation` over token positions: F(x) minus F(x with that one token's
  embedding replaced by the baseline's), the token ablations scored in batches.

This is Captum's `LayerIntegratedGradients` / `LayerGradientXActivation` computation on the
embedding layer, but without hooks on it: GPT-2 embeds token types with the same module (a layer
hook fires twice there and silently gives all-zero attributions), and a zero-embedding baseline
cannot be given to the layer variants, which take baselines as token ids.

Baselines replace every non-special token ([CLS]/[SEP]/BOS/EOS stay) by the pad token ("pad"),
the mask token ("mask") or an all-zero embedding ("zero"). Token scores are summed over the
embedding dimension, and over the sub-word pieces of each word for the word view.

`faithfulness` scores an attribution the way the ferret library does (AOPC comprehensiveness and
sufficiency, tokens deleted from the sequence) and `agreement` compares two methods (Kendall tau).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients

from guardian.judge import CHARS_PER_TOKEN_CAP, Judge, JudgeError
from guardian.scoring import check_prompt

METHODS = ("ig", "grad_x_input", "occlusion")
BASELINES = ("pad", "mask", "zero")
TOKENS_PER_PASS = 1024  # default bound on steps (ig) or ablations (occlusion) x prompt tokens per pass
SCORING_BATCH = 64
AOPC_FRACTIONS = np.arange(1, 11) / 10  # 10 %, 20 %, ..., 100 % of the tokens, as in ferret
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WORD_START_MARKS = ("Ġ", "▁")  # byte-level BPE and sentencepiece word starts
CONTINUATION_MARK = "##"  # WordPiece word continuation


@dataclass(frozen=True)
class Attribution:
    """Per-token and per-word contributions to the unsafe log-odds of one prompt."""

    prompt: str
    method: str
    baseline: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    special: tuple[bool, ...]  # per token: kept by every baseline and dropped from the word view
    token_scores: np.ndarray
    token_words: tuple[int, ...]  # per token: index into `words`, -1 for special tokens
    words: tuple[str, ...]
    word_scores: np.ndarray
    word_spans: tuple[tuple[int, int], ...]  # (start, end) character offsets in `prompt`
    f_x: float  # unsafe log-odds of the prompt
    f_baseline: float  # unsafe log-odds of the baseline
    p_unsafe: float
    delta: float  # Captum's convergence delta (sum of scores - (f_x - f_baseline)); NaN if none
    delta_fraction: float  # |delta| / |f_x - f_baseline|
    truncated: bool

    def top_words(self, k: int = 5) -> tuple[tuple[str, float], ...]:
        """The k words that push most toward unsafe, highest score first.

        Punctuation and single characters (the "s" of "neighbour's") are left out when the
        prompt has other words.
        """
        content = [i for i, w in enumerate(self.words) if len(_plain(w)) > 1] or list(range(len(self.words)))
        order = sorted(content, key=lambda i: -self.word_scores[i])[:k]
        return tuple((self.words[i], float(self.word_scores[i])) for i in order)

    def to_frame(self, level: str = "word") -> pd.DataFrame:
        """A table of words (with character spans) or of tokens, with their scores."""
        if level == "token":
            return pd.DataFrame({"token": list(self.tokens), "special": list(self.special),
                                 "word": list(self.token_words), "score": self.token_scores})
        if level != "word":
            raise ValueError("level must be 'word' or 'token'")
        return pd.DataFrame({"word": list(self.words), "start": [s for s, _ in self.word_spans],
                             "end": [e for _, e in self.word_spans], "score": self.word_scores})


@dataclass(frozen=True)
class Faithfulness:
    """AOPC comprehensiveness and sufficiency of an attribution (ferret's definitions).

    At each fraction k of the (non-special) tokens, the rationale is the top-k tokens that have a
    positive score. Comprehensiveness: p(x) - p(x without the rationale), higher is better.
    Sufficiency: p(x) - p(only the rationale), lower is better. Fractions whose rationale is empty
    of tokens or the same as the previous one are skipped (NaN in the curves), as in ferret.
    """

    prompt: str
    method: str
    baseline: str
    fractions: np.ndarray
    rationale_sizes: np.ndarray  # tokens in each rationale, -1 where skipped
    comprehensiveness_curve: np.ndarray
    sufficiency_curve: np.ndarray
    comprehensiveness: float  # mean of the curve over the fractions not skipped
    sufficiency: float
    p_unsafe: float  # p(x) in the same batched pass
    p_empty: float  # p(unsafe) with every non-special token removed

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"fraction": self.fractions, "rationale_tokens": self.rationale_sizes,
                             "comprehensiveness": self.comprehensiveness_curve,
                             "sufficiency": self.sufficiency_curve})


# ----- attribution -----------------------------------------------------------------------------
def attribute(judge: Judge, text: str, method: str = "ig", baseline: str = "pad", n_steps: int = 50,
              internal_batch_size: int | None = None) -> Attribution:
    """Attribute the unsafe log-odds of `text` to its tokens and words with one Captum method.

    `n_steps` is the number of integration steps of "ig"; `internal_batch_size` bounds how many
    steps (ig) or token ablations (occlusion) go through the model at once (by default as many as
    keep a pass within `TOKENS_PER_PASS` tokens: all 50 steps of a short prompt in one pass).
    """
    text = check_prompt(text)
    if method not in METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {', '.join(METHODS)}.")
    if baseline not in BASELINES:
        raise ValueError(f"Unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}.")
    if n_steps < 1:
        raise ValueError("n_steps must be at least 1.")
    if method == "grad_x_input":
        baseline = "zero"  # gradient x input is measured from the zero embedding
    encoded = judge.encode([text])
    ids = encoded.inputs["input_ids"]
    batch = max(1, internal_batch_size or TOKENS_PER_PASS // ids.shape[1])
    extra_names = tuple(k for k in MODEL_INPUTS[1:] if k in encoded.inputs)
    extras = tuple(encoded.inputs[k] for k in extra_names)
    special = special_token_mask(judge, ids[0].tolist())
    if special.all():
        raise JudgeError("The prompt has no words the judge can read.")
    forward = _log_odds_forward(judge, extra_names)
    _quiet_inputs_embeds_warning(judge)

    with judge.lock:  # the whole Captum run: many forward and backward passes on the shared model
        with torch.no_grad():
            embeds = judge.embeddings()(ids)
            baseline_embeds = _baseline_embeddings(judge, ids, embeds, special, baseline)
        scores, delta = _RUNNERS[method](forward, embeds, baseline_embeds, extras, n_steps, batch)
        with torch.no_grad():
            both = forward(torch.cat([embeds, baseline_embeds]), *(e.repeat(2, 1) for e in extras))
    f_x, f_baseline = (float(v) for v in both)

    token_words, words, spans = word_alignment(judge, text, ids[0].tolist(), encoded.tokens[0], special)
    return Attribution(
        prompt=text, method=method, baseline=baseline, tokens=tuple(encoded.tokens[0]),
        token_ids=tuple(ids[0].tolist()), special=tuple(bool(s) for s in special),
        token_scores=scores, token_words=tuple(token_words), words=words,
        word_scores=merge_scores(scores, token_words, len(words)), word_spans=spans,
        f_x=f_x, f_baseline=f_baseline, p_unsafe=float(torch.sigmoid(torch.tensor(f_x))),
        delta=delta, delta_fraction=_delta_fraction(delta, f_x - f_baseline),
        truncated=encoded.truncated[0],
    )


def _log_odds_forward(judge: Judge, extra_names: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    """F(token embeddings, *extras): the unsafe log-odds per row (call under the judge's lock).

    The embeddings go in as `inputs_embeds`, i.e. as the output of `judge.embeddings()`: the model
    adds positions (and token types) itself, exactly as it does for input ids.
    """

    def forward(embeds: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(extra_names, extras), inputs_embeds=embeds)
        return judge.unsafe_score(judge.model(**inputs).logits.float())

    return forward


class _DropInputsEmbedsPaddingWarning(logging.Filter):
    """Decoder classifiers warn that they cannot find padding in `inputs_embeds`; ours has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "padding tokens in `inputs_embeds`" not in record.getMessage()


_INPUTS_EMBEDS_FILTER = _DropInputsEmbedsPaddingWarning()


def _quiet_inputs_embeds_warning(judge: Judge) -> None:
    """Attach the filter to the loggers of the judge's transformers classes (idempotent)."""
    for cls in type(judge.model).__mro__:
        if cls.__module__.startswith("transformers."):
            logging.getLogger(cls.__module__).addFilter(_INPUTS_EMBEDS_FILTER)


def _integrated_gradients(forward, embeds, baseline_embeds, extras, n_steps, batch):
    attributions, delta = IntegratedGradients(forward).attribute(
        embeds, baselines=baseline_embeds, additional_forward_args=extras, n_steps=n_steps,
        internal_batch_size=batch, return_convergence_delta=True,
    )
    return _per_token(attributions), float(delta.reshape(-1)[0])


def _gradient_x_input(forward, embeds, baseline_embeds, extras, n_steps, batch):
    leaf = embeds.detach().requires_grad_()
    attributions = InputXGradient(forward).attribute(leaf, additional_forward_args=extras)
    return _per_token(attributions), float("nan")


def _occlusion(forward, embeds, baseline_embeds, extras, n_steps, batch):
    positions = torch.arange(embeds.shape[1]).reshape(1, -1, 1)  # one feature per token
    with torch.no_grad():
        attributions = FeatureAblation(forward).attribute(
            embeds, baselines=baseline_embeds, additional_forward_args=extras, feature_mask=positions,
            perturbations_per_eval=batch,
        )
    return attributions[0, :, 0].double().numpy(), float("nan")  # the same value across a token's row


_RUNNERS = {"ig": _integrated_gradients, "grad_x_input": _gradient_x_input, "occlusion": _occlusion}


def _per_token(attributions: torch.Tensor) -> np.ndarray:
    """Sum a (1, tokens, hidden) embedding attribution over the embedding dimension."""
    return attributions[0].detach().sum(-1).double().numpy()


def _delta_fraction(delta: float, difference: float) -> float:
    if np.isnan(delta) or abs(difference) < 1e-12:
        return float("nan")
    return abs(delta) / abs(difference)


def special_token_mask(judge: Judge, ids: Sequence[int]) -> np.ndarray:
    """True for the tokenizer's special tokens ([CLS], [SEP], BOS, EOS, pad); [UNK] is a word."""
    tokenizer = judge.tokenizer
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    return np.array([i in specials for i in ids], dtype=bool)


def _baseline_embeddings(judge: Judge, ids: torch.Tensor, embeds: torch.Tensor, special: np.ndarray,
                         baseline: str) -> torch.Tensor:
    """The prompt's embeddings with every non-special token replaced by the baseline's."""
    keep = torch.as_tensor(special).reshape(1, -1, 1)
    if baseline == "zero":
        return torch.where(keep, embeds, torch.zeros_like(embeds))
    tokenizer = judge.tokenizer
    token = tokenizer.pad_token_id if baseline == "pad" else tokenizer.mask_token_id
    if token is None:
        raise JudgeError(f"This judge's tokenizer has no {baseline} token, so the '{baseline}' baseline "
                         "is not available; use " + ("'zero'." if baseline == "pad" else "'pad' or 'zero'."))
    return torch.where(keep, embeds, judge.embeddings()(torch.full_like(ids, token)))


# ----- words -----------------------------------------------------------------------------------
def word_alignment(judge: Judge, text: str, ids: Sequence[int], tokens: Sequence[str],
                   special: np.ndarray) -> tuple[list[int], tuple[str, ...], tuple[tuple[int, int], ...]]:
    """Per token its word index (-1 for special tokens), the words and their character spans.

    Uses the fast tokenizer's `word_ids()` and offsets; otherwise the '##' / 'Ġ' / '▁' marks.
    """
    tokenizer = judge.tokenizer
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text[: judge.max_tokens * CHARS_PER_TOKEN_CAP], truncation=True,
                        max_length=judge.max_tokens, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            return _words_from_offsets(text, enc.word_ids(), enc["offset_mapping"], special)
    return _words_from_marks(text, tokens, special)


def _words_from_offsets(text, word_ids, offsets, special):
    """Word grouping from the fast tokenizer's word ids; a word spans its pieces' offsets."""
    token_words, spans, seen = [], [], {}
    for word_id, (start, end), is_special in zip(word_ids, offsets, special):
        if is_special or word_id is None:
            token_words.append(-1)
            continue
        if word_id not in seen:
            seen[word_id] = len(spans)
            spans.append([start, end])
        index = seen[word_id]
        spans[index] = [min(spans[index][0], start), max(spans[index][1], end)]
        token_words.append(index)
    spans = tuple(_trim_space(text, int(s), int(e)) for s, e in spans)
    return token_words, tuple(text[s:e] for s, e in spans), spans


def _trim_space(text: str, start: int, end: int) -> tuple[int, int]:
    """A span without surrounding whitespace (sentencepiece offsets can include the space)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _words_from_marks(text, tokens, special):
    """Word grouping from sub-word marks; spans found by searching the prompt left to right."""
    marked_starts = any(t.startswith(WORD_START_MARKS) for t in tokens)
    token_words, pieces = [], []
    for token, is_special in zip(tokens, special):
        if is_special:
            token_words.append(-1)
            continue
        starts = (token.startswith(WORD_START_MARKS) if marked_starts
                  else not token.startswith(CONTINUATION_MARK))
        if starts or not pieces:
            pieces.append("")
        pieces[-1] += token.removeprefix(CONTINUATION_MARK).lstrip("".join(WORD_START_MARKS))
        token_words.append(len(pieces) - 1)
    words, spans, cursor, lowered = [], [], 0, text.lower()
    for piece in pieces:
        start = lowered.find(piece.lower(), cursor) if piece else -1
        if start < 0:
            spans.append((cursor, cursor))
            words.append(piece)
        else:
            cursor = start + len(piece)
            spans.append((start, cursor))
            words.append(text[start:cursor])
    return token_words, tuple(words), tuple(spans)


def word_positions(judge: Judge, text: str, words: Sequence[str]) -> tuple[int, ...]:
    """Token positions (in `judge.encode(text)`'s tokens) of the prompt's words that are among `words`.

    Whole words, compared case-insensitively without punctuation; a phrase counts as its words;
    special tokens are never words.
    """
    wanted = {_plain(w) for phrase in words for w in str(phrase).split()} - {""}
    encoded = judge.encode([check_prompt(text)])
    ids = encoded.inputs["input_ids"][0][encoded.inputs["attention_mask"][0].bool()].tolist()
    token_words, found, _ = word_alignment(judge, text, ids, encoded.tokens[0], special_token_mask(judge, ids))
    return tuple(i for i, w in enumerate(token_words) if w >= 0 and _plain(found[w]) in wanted)


def _plain(word: str) -> str:
    return re.sub(r"[\W_]+", "", word).lower()


def merge_scores(token_scores: np.ndarray, token_words: Sequence[int], n_words: int) -> np.ndarray:
    """Sum token scores into their words (special tokens, index -1, are left out)."""
    index = np.asarray(token_words)
    keep = index >= 0
    return np.bincount(index[keep], weights=np.asarray(token_scores)[keep], minlength=n_words)


# ----- faithfulness and agreement --------------------------------------------------------------
def faithfulness(judge: Judge, attribution: Attribution) -> Faithfulness:
    """AOPC comprehensiveness and sufficiency of `attribution`, every variant in one batched pass."""
    ids = np.asarray(attribution.token_ids)
    special = np.asarray(attribution.special)
    content = np.flatnonzero(~special)
    rationales = aopc_rationales(np.asarray(attribution.token_scores)[content])

    def keeping(kept_content: np.ndarray) -> list[int]:
        keep = special.copy()
        keep[content[kept_content]] = True
        return ids[keep].tolist()

    everything = np.arange(len(content))
    chosen = [r for r in rationales if r is not None]
    variants = ([keeping(everything), keeping(everything[:0])]
                + [keeping(np.setdiff1d(everything, r)) for r in chosen]
                + [keeping(r) for r in chosen])
    p = score_token_ids(judge, variants)
    p_x, p_empty, p_without, p_only = p[0], p[1], p[2:2 + len(chosen)], p[2 + len(chosen):]

    comprehensiveness = np.full(len(rationales), np.nan)
    sufficiency = np.full(len(rationales), np.nan)
    used = np.array([r is not None for r in rationales])
    comprehensiveness[used] = p_x - p_without
    sufficiency[used] = p_x - p_only
    return Faithfulness(
        prompt=attribution.prompt, method=attribution.method, baseline=attribution.baseline,
        fractions=AOPC_FRACTIONS.copy(),
        rationale_sizes=np.array([-1 if r is None else len(r) for r in rationales]),
        comprehensiveness_curve=comprehensiveness, sufficiency_curve=sufficiency,
        comprehensiveness=float(np.nanmean(comprehensiveness)), sufficiency=float(np.nanmean(sufficiency)),
        p_unsafe=float(p_x), p_empty=float(p_empty),
    )


def aopc_rationales(scores: np.ndarray) -> list[np.ndarray | None]:
    """Per AOPC fraction, the positions of the top-k positive-score tokens (k = fraction * n).

    None where k is 0 or the rationale repeats the previous one (ferret skips those).
    """
    n = len(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    rationales, previous = [], None
    for tenths in range(1, len(AOPC_FRACTIONS) + 1):
        k = tenths * n // len(AOPC_FRACTIONS)
        top = np.sort(np.array([i for i in order[:k] if scores[i] > 0], dtype=int))
        if k == 0 or (previous is not None and set(top) == previous):
            rationales.append(None)
            continue
        previous = set(top)
        rationales.append(top)
    return rationales


def score_token_ids(judge: Judge, sequences: Sequence[Sequence[int]], batch_size: int = SCORING_BATCH) -> np.ndarray:
    """p(unsafe) of token-id sequences (special tokens included), in length-sorted padded batches.

    An empty sequence is scored as the single BOS (or EOS, or pad) token.
    """
    tokenizer = judge.tokenizer
    fallback = next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 0)
                    if t is not None)
    sequences = [list(s) or [fallback] for s in sequences]
    with_types = "token_type_ids" in tokenizer.model_input_names
    p_unsafe = np.zeros(len(sequences), dtype=np.float64)
    order = np.argsort([len(s) for s in sequences], kind="stable")
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        features = {"input_ids": [sequences[i] for i in index]}
        if with_types:
            features["token_type_ids"] = [[0] * len(sequences[i]) for i in index]
        padded = tokenizer.pad(features, return_tensors="pt")
        inputs = {k: v for k, v in padded.items() if k in MODEL_INPUTS}
        p_unsafe[index] = judge.p_unsafe(judge.logits(inputs)).double().numpy()
    return p_unsafe


def agreement(a: Attribution, b: Attribution) -> float:
    """Kendall tau-b between two attributions' scores of the same prompt's non-special tokens."""
    if a.token_ids != b.token_ids:
        raise JudgeError("Only attributions of the same prompt, by the same judge, can be compared.")
    content = ~np.asarray(a.special)
    return kendall_tau(np.asarray(a.token_scores)[content], np.asarray(b.token_scores)[content])


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b (ties accounted for, as scipy's default); NaN when one side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    upper = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    denominator = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")
