"""The safety circuit: where, layer by layer, a judge tells an unsafe prompt from its safe twin.

The *residual stream at layer i* is the hidden state entering block i for i < n_layers, and the
output of the last block for i = n_layers. So there are n_layers + 1 layers and layer 0 is the
embedding output. Only the `Judge` view is used (hooks on `judge.blocks`), so encoders and
decoders are handled alike, and every pass runs under the judge's lock via `judge.hooked`.

- `residual_streams`: one prompt's residual stream at every layer and position.
- `layer_divergence`: how far apart an unsafe prompt and its safe twin are at each layer.
- `logit_lens`: p(unsafe) read from each layer through the judge's own head (later blocks skipped).
- `activation_patching`: which (layer, position) states carry the verdict, found by copying the
  unsafe ("clean") prompt's states into the run of its safe ("corrupt") twin one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from guardian.judge import (
    Judge,
    JudgeError,
    block_hidden,
    block_output_hidden,
    replace_block_output,
)
from guardian.scoring import check_prompt

MAX_ROWS_PER_PASS = 128  # replicated prompts in one batched forward pass
TOKENS_PER_PASS = 128 * 64  # and at most this many tokens (rows x prompt length)
DEFAULT_MAX_POSITIONS = 64
MIN_SCORE_GAP = 1e-6  # below this |F(clean) - F(corrupt)| the restored fraction is undefined
DIRECTIONS = ("clean_to_corrupt", "corrupt_to_clean")

# One patched run: (layer, ((source position, destination position), ...)).
Patch = tuple[int, tuple[tuple[int, int], ...]]


# ----- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidualStreams:
    """One prompt's residual stream: `states[layer, position, hidden]`, layer 0 = embeddings."""

    text: str
    tokens: tuple[str, ...]
    states: np.ndarray  # float32 [n_layers + 1, positions, hidden]
    truncated: bool

    @property
    def layers(self) -> np.ndarray:
        return np.arange(self.states.shape[0])

    def pooled(self) -> np.ndarray:
        """Mean over the prompt's tokens, per layer: float64 [n_layers + 1, hidden]."""
        return self.states.astype(np.float64).mean(axis=1)

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position) with the L2 norm of the state there."""
        n_layers, n_positions, _ = self.states.shape
        return pd.DataFrame({
            "layer": np.repeat(self.layers, n_positions),
            "position": np.tile(np.arange(n_positions), n_layers),
            "token": list(self.tokens) * n_layers,
            "norm": np.linalg.norm(self.states, axis=-1).reshape(-1),
        })


@dataclass(frozen=True)
class Divergence:
    """Per layer, how different the mean-pooled residual streams of two prompts are.

    `l2[i]` is the L2 norm of the difference of the pooled states at layer i and `cosine[i]` their
    cosine similarity. `critical_layer` is the layer i >= 1 where `l2` grows most from layer i - 1
    (the block before it pulls the prompts apart the most); None when no layer increases it.
    """

    unsafe_text: str
    safe_text: str
    unsafe_tokens: tuple[str, ...]
    safe_tokens: tuple[str, ...]
    l2: np.ndarray  # [n_layers + 1]
    cosine: np.ndarray  # [n_layers + 1]
    critical_layer: int | None
    truncated: bool

    @property
    def layers(self) -> np.ndarray:
        return np.arange(len(self.l2))

    @property
    def increase(self) -> np.ndarray:
        """Growth of `l2` from the previous layer (NaN at layer 0)."""
        return np.concatenate([[np.nan], np.diff(self.l2)])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "layer": self.layers, "l2": self.l2, "cosine": self.cosine, "increase": self.increase,
            "critical": self.layers == (self.critical_layer if self.critical_layer is not None else -1),
        })


@dataclass(frozen=True)
class LogitLens:
    """p(unsafe) read from each layer's residual stream by the judge's own final norm and head."""

    text: str
    tokens: tuple[str, ...]
    unsafe_score: np.ndarray  # log-odds of unsafe, [n_layers + 1]
    p_unsafe: np.ndarray  # [n_layers + 1]; the last entry is the judge's ordinary p(unsafe)
    truncated: bool

    @property
    def layers(self) -> np.ndarray:
        return np.arange(len(self.p_unsafe))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": self.layers, "unsafe_score": self.unsafe_score, "p_unsafe": self.p_unsafe})


@dataclass(frozen=True)
class PatchingResult:
    """Activation patching over a [layer, position] grid.

    Column k pairs token `clean_positions[k]` of the clean (unsafe) prompt with token
    `corrupt_positions[k]` of the corrupt (safe) twin. With `direction="clean_to_corrupt"` the clean
    state at (layer, pair) is written into the corrupt run; with "corrupt_to_clean" the reverse.
    `patched_scores` holds F (the judge's unsafe log-odds) of each patched run and `restored` the
    fraction of the way it moved from the patched run's own score to the other prompt's score:
    (F(patched) - F(destination)) / (F(source) - F(destination)); NaN when the two scores are equal.
    """

    clean_text: str
    corrupt_text: str
    direction: str
    clean_tokens: tuple[str, ...]
    corrupt_tokens: tuple[str, ...]
    clean_positions: np.ndarray  # [position]
    corrupt_positions: np.ndarray  # [position]
    patched_scores: np.ndarray  # [layer, position]
    restored: np.ndarray  # [layer, position]
    score_clean: float
    score_corrupt: float
    p_unsafe_clean: float
    p_unsafe_corrupt: float
    aligned: bool  # the prompts have the same number of tokens, so every position has a partner
    truncated: bool
    note: str

    @property
    def layers(self) -> np.ndarray:
        return np.arange(self.patched_scores.shape[0])

    @property
    def position_labels(self) -> tuple[str, ...]:
        """Column labels: 'position: token', naming both tokens where they differ."""
        labels = []
        for c, k in zip(self.clean_positions, self.corrupt_positions):
            a, b = self.clean_tokens[c], self.corrupt_tokens[k]
            where = f"{c}" if c == k else f"{c}/{k}"
            labels.append(f"{where}: {a}" if a == b else f"{where}: {a} / {b}")
        return tuple(labels)

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position pair)."""
        n_layers, n_positions = self.patched_scores.shape
        return pd.DataFrame({
            "layer": np.repeat(self.layers, n_positions),
            "clean_position": np.tile(self.clean_positions, n_layers),
            "corrupt_position": np.tile(self.corrupt_positions, n_layers),
            "clean_token": [self.clean_tokens[i] for i in self.clean_positions] * n_layers,
            "corrupt_token": [self.corrupt_tokens[i] for i in self.corrupt_positions] * n_layers,
            "patched_score": self.patched_scores.reshape(-1),
            "restored": self.restored.reshape(-1),
        })


# ----- public techniques -----------------------------------------------------------------------
def residual_streams(judge: Judge, text: str) -> ResidualStreams:
    """The residual stream of one prompt at every layer, captured by hooks in one forward pass."""
    text = check_prompt(text)
    encoded = judge.encode([text])
    states, _ = _capture(judge, encoded.inputs)
    return ResidualStreams(text=text, tokens=tuple(encoded.tokens[0]), states=states.numpy(),
                           truncated=encoded.truncated[0])


def layer_divergence(judge: Judge, unsafe_text: str, safe_text: str) -> Divergence:
    """L2 distance and cosine similarity of the two prompts' mean-pooled states, per layer."""
    unsafe, safe = residual_streams(judge, unsafe_text), residual_streams(judge, safe_text)
    a, b = unsafe.pooled(), safe.pooled()
    l2 = np.linalg.norm(a - b, axis=-1)
    return Divergence(
        unsafe_text=unsafe.text, safe_text=safe.text, unsafe_tokens=unsafe.tokens, safe_tokens=safe.tokens,
        l2=l2, cosine=_cosine(a, b), critical_layer=critical_layer(l2),
        truncated=unsafe.truncated or safe.truncated,
    )


def critical_layer(l2: np.ndarray) -> int | None:
    """The layer i >= 1 with the largest increase l2[i] - l2[i - 1]; None if nothing increases."""
    increase = np.diff(np.asarray(l2, dtype=np.float64))
    if increase.size == 0 or not np.nanmax(increase) > 0:
        return None
    return int(np.nanargmax(increase)) + 1


def logit_lens(judge: Judge, text: str) -> LogitLens:
    """p(unsafe) per layer: the run with blocks i..n_layers-1 skipped, read by the judge's own head.

    All layers are read in batched passes: the prompt is replicated once per layer and the forward
    hook on block j hands its input through unchanged for the rows that read a layer <= j.
    """
    text = check_prompt(text)
    encoded = judge.encode([text])
    read_layers = np.arange(judge.n_layers + 1)
    rows = _rows_per_pass(len(encoded.tokens[0]))
    scores = np.concatenate([
        _skipping_pass(judge, encoded.inputs, read_layers[start:start + rows])
        for start in range(0, len(read_layers), rows)
    ])
    return LogitLens(text=text, tokens=tuple(encoded.tokens[0]), unsafe_score=scores,
                     p_unsafe=_sigmoid(scores), truncated=encoded.truncated[0])


def activation_patching(judge: Judge, clean_text: str, corrupt_text: str, positions: Sequence[int] | None = None,
                        max_positions: int = DEFAULT_MAX_POSITIONS,
                        direction: str = "clean_to_corrupt") -> PatchingResult:
    """Patch one (layer, position) state at a time from one prompt's run into the other's.

    `clean_text` is the unsafe prompt and `corrupt_text` its safe twin. By default clean states are
    written into the corrupt run and the grid reports the fraction of F(clean) - F(corrupt) each
    patch restores. `positions` (token indices of the prompt being patched) limits the columns;
    at most `max_positions` columns are patched. Prompts of different token lengths are paired
    from the start (see `align_positions`) and the result says so in `note`.
    """
    if max_positions < 1:
        raise JudgeError("max_positions must be at least 1.")
    runs = _PatchRuns.prepare(judge, clean_text, corrupt_text, direction)
    pairs = align_positions(runs.source.ids, runs.destination.ids, set(judge.tokenizer.all_special_ids))
    notes = [_alignment_note(runs, pairs)]
    if positions is not None:
        pairs = _chosen_pairs(pairs, positions, runs.destination, notes)
    if len(pairs) > max_positions:
        notes.append(f"Only the first {max_positions} of {len(pairs)} positions were patched, to keep the grid "
                     "small; choose positions to see others.")
        pairs = pairs[:max_positions]
    n_rows = judge.n_layers + 1
    patches = [(layer, (pair,)) for layer in range(n_rows) for pair in pairs]
    scores = runs.patched_scores(judge, patches).reshape(n_rows, len(pairs))
    restored = _restored_fraction(scores, runs, notes)
    truncated = runs.clean.truncated or runs.corrupt.truncated
    if truncated:
        notes.append(f"Prompts longer than {judge.max_tokens} tokens were cut short before patching.")
    source_pos = np.array([s for s, _ in pairs], dtype=int)
    destination_pos = np.array([d for _, d in pairs], dtype=int)
    forward = direction == "clean_to_corrupt"
    return PatchingResult(
        clean_text=runs.clean.text, corrupt_text=runs.corrupt.text, direction=direction,
        clean_tokens=runs.clean.tokens, corrupt_tokens=runs.corrupt.tokens,
        clean_positions=source_pos if forward else destination_pos,
        corrupt_positions=destination_pos if forward else source_pos,
        patched_scores=scores, restored=restored,
        score_clean=runs.clean.score, score_corrupt=runs.corrupt.score,
        p_unsafe_clean=float(_sigmoid(runs.clean.score)), p_unsafe_corrupt=float(_sigmoid(runs.corrupt.score)),
        aligned=len(runs.clean.ids) == len(runs.corrupt.ids), truncated=truncated, note=" ".join(notes),
    )


def patch_scores(judge: Judge, clean_text: str, corrupt_text: str, patches: Sequence[Patch],
                 direction: str = "clean_to_corrupt") -> np.ndarray:
    """F of the patched run for each patch, in batched passes (the engine under the grid).

    Each patch is `(layer, ((source_position, destination_position), ...))`: all the listed
    states of the source run at that layer are written into one copy of the destination run
    (the corrupt run for "clean_to_corrupt"). A patch with no positions gives the unpatched score.
    """
    runs = _PatchRuns.prepare(judge, clean_text, corrupt_text, direction)
    n_source, n_destination = len(runs.source.ids), len(runs.destination.ids)
    for layer, pairs in patches:
        if not 0 <= layer <= judge.n_layers:
            raise JudgeError(f"Layer {layer} does not exist; this judge has layers 0 to {judge.n_layers}.")
        if any(not (0 <= s < n_source and 0 <= d < n_destination) for s, d in pairs):
            raise JudgeError("A patch names a position past the end of its prompt.")
    return runs.patched_scores(judge, [(int(layer), tuple(pairs)) for layer, pairs in patches])


def align_positions(source_ids: Sequence[int], destination_ids: Sequence[int],
                    special_ids: set[int]) -> tuple[tuple[int, int], ...]:
    """Pairs (source position, destination position) of tokens that correspond.

    Equal lengths pair every position with itself. Otherwise positions are paired from the start
    up to the shorter length; when both prompts end with the same special token (an encoder's
    [SEP]), that token is paired end to end instead of with a word of the longer prompt.
    """
    n_source, n_destination = len(source_ids), len(destination_ids)
    if n_source == n_destination:
        return tuple((k, k) for k in range(n_source))
    same_end = bool(n_source and n_destination and source_ids[-1] == destination_ids[-1]
                    and source_ids[-1] in special_ids)
    shared = min(n_source, n_destination) - int(same_end)
    pairs = [(k, k) for k in range(shared)]
    if same_end:
        pairs.append((n_source - 1, n_destination - 1))
    return tuple(pairs)


# ----- runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """One prompt, tokenised, with its residual stream and score from an ordinary forward pass."""

    text: str
    inputs: dict[str, torch.Tensor]
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    truncated: bool
    states: torch.Tensor  # [n_layers + 1, positions, hidden]
    score: float

    @classmethod
    def of(cls, judge: Judge, text: str) -> "_Run":
        text = check_prompt(text)
        encoded = judge.encode([text])
        states, logits = _capture(judge, encoded.inputs)
        return cls(text=text, inputs=encoded.inputs, ids=tuple(encoded.inputs["input_ids"][0].tolist()),
                   tokens=tuple(encoded.tokens[0]), truncated=encoded.truncated[0], states=states,
                   score=float(judge.unsafe_score(logits)))


@dataclass(frozen=True)
class _PatchRuns:
    clean: _Run
    corrupt: _Run
    direction: str

    @classmethod
    def prepare(cls, judge: Judge, clean_text: str, corrupt_text: str, direction: str) -> "_PatchRuns":
        if direction not in DIRECTIONS:
            raise JudgeError(f"Unknown patching direction '{direction}'; use one of {', '.join(DIRECTIONS)}.")
        return cls(clean=_Run.of(judge, clean_text), corrupt=_Run.of(judge, corrupt_text), direction=direction)

    @property
    def source(self) -> _Run:
        return self.clean if self.direction == "clean_to_corrupt" else self.corrupt

    @property
    def destination(self) -> _Run:
        return self.corrupt if self.direction == "clean_to_corrupt" else self.clean

    def patched_scores(self, judge: Judge, patches: Sequence[Patch]) -> np.ndarray:
        rows = _rows_per_pass(len(self.destination.ids))
        return np.concatenate([
            _patching_pass(judge, self.destination.inputs, self.source.states, patches[start:start + rows])
            for start in range(0, len(patches), rows)
        ]) if patches else np.zeros(0)


def _restored_fraction(scores: np.ndarray, runs: _PatchRuns, notes: list[str]) -> np.ndarray:
    """(F(patched) - F(destination)) / (F(source) - F(destination)); NaN, with a note, if they tie."""
    gap = runs.source.score - runs.destination.score
    if abs(gap) < MIN_SCORE_GAP:
        notes.append("The judge scores both prompts the same, so there is no difference to restore and the "
                     "restored fractions are undefined (shown as NaN); compare the patched scores instead.")
        return np.full_like(scores, np.nan)
    return (scores - runs.destination.score) / gap


def _alignment_note(runs: _PatchRuns, pairs: tuple[tuple[int, int], ...]) -> str:
    n_clean, n_corrupt = len(runs.clean.ids), len(runs.corrupt.ids)
    if n_clean == n_corrupt:
        return f"Both prompts have {n_clean} tokens; each position is patched into the same position."
    longer = "clean" if n_clean > n_corrupt else "corrupt"
    same_end = bool(pairs) and pairs[-1][0] != pairs[-1][1]  # only the end-to-end pair differs
    prefix = len(pairs) - int(same_end)
    start = {0: "No positions are", 1: "Position 0 is"}.get(prefix, f"Positions 0-{prefix - 1} are")
    end = f" and the final '{runs.clean.tokens[-1]}' is paired end to end" if same_end else ""
    left = max(n_clean, n_corrupt) - len(pairs)
    return (f"The prompts have different token lengths (clean {n_clean}, corrupt {n_corrupt}). {start} "
            f"paired from the start{end}; the other {left} token(s) of the {longer} prompt "
            "have no partner and are not patched. Paired positions may hold different words, so read the grid "
            "with care; twins of equal length give a clean comparison.")


def _chosen_pairs(pairs, positions, destination: _Run, notes: list[str]):
    """The pairs whose destination position was chosen, in the order chosen."""
    by_destination = {d: (s, d) for s, d in pairs}
    chosen = []
    for position in dict.fromkeys(int(p) for p in positions):
        if not 0 <= position < len(destination.ids):
            raise JudgeError(f"Position {position} is outside the prompt being patched "
                             f"({len(destination.ids)} tokens, positions 0 to {len(destination.ids) - 1}).")
        if position in by_destination:
            chosen.append(by_destination[position])
    skipped = len(set(int(p) for p in positions)) - len(chosen)
    if not chosen:
        raise JudgeError("None of the chosen positions has a partner in the other prompt.")
    if skipped:
        notes.append(f"{skipped} chosen position(s) have no partner in the other prompt and were left out.")
    return tuple(chosen)


# ----- hooked passes ---------------------------------------------------------------------------
def _capture(judge: Judge, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of one prompt: its residual stream [layer, position, hidden] and its logits."""
    n = judge.n_layers
    states: list[torch.Tensor | None] = [None] * (n + 1)

    def entering(i: int):
        def hook(module, args, kwargs):
            states[i] = block_hidden(args, kwargs)[0].detach().float().clone()
        return hook

    def leaving(module, args, kwargs, output):
        states[n] = block_output_hidden(output)[0].detach().float().clone()

    pre = [(block, entering(i)) for i, block in enumerate(judge.blocks)]
    with judge.hooked(pre=pre, forward=[(judge.blocks[-1], leaving)]):
        logits = judge.logits(inputs)[0]
    return torch.stack(states).cpu(), logits


def _skipping_pass(judge: Judge, inputs: dict[str, torch.Tensor], read_layers: np.ndarray) -> np.ndarray:
    """F per row; row r runs with blocks read_layers[r].. skipped (their input passed through)."""
    reads = torch.as_tensor(read_layers)

    def skip(j: int):
        def hook(module, args, kwargs, output):
            skipped = (reads <= j)
            if not skipped.any():
                return None
            out = block_output_hidden(output)
            inp = block_hidden(args, kwargs).to(out.dtype)
            return replace_block_output(output, torch.where(skipped.to(out.device).view(-1, 1, 1), inp, out))
        return hook

    with judge.hooked(forward=[(block, skip(j)) for j, block in enumerate(judge.blocks)]):
        logits = judge.logits(_replicate(inputs, len(read_layers)))
    return judge.unsafe_score(logits).double().cpu().numpy()


def _patching_pass(judge: Judge, inputs: dict[str, torch.Tensor], source_states: torch.Tensor,
                   patches: Sequence[Patch]) -> np.ndarray:
    """F per patch; row r is the destination run with patch r's source states written in."""
    n = judge.n_layers
    plan = _patch_plan(patches)

    def write(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        rows, destination, source = plan[layer]
        patched = hidden.clone()
        patched[rows, destination] = source_states[layer, source].to(hidden.device, hidden.dtype)
        return patched

    def entering(i: int):
        def hook(module, args, kwargs):
            return _replace_block_input(args, kwargs, write(i, block_hidden(args, kwargs)))
        return hook

    def leaving(module, args, kwargs, output):
        return replace_block_output(output, write(n, block_output_hidden(output)))

    pre = [(judge.blocks[i], entering(i)) for i in plan if i < n]
    forward = [(judge.blocks[-1], leaving)] if n in plan else []
    with judge.hooked(pre=pre, forward=forward):
        logits = judge.logits(_replicate(inputs, len(patches)))
    return judge.unsafe_score(logits).double().cpu().numpy()


def _patch_plan(patches: Sequence[Patch]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, the (row, destination position, source position) index tensors to write."""
    entries: dict[int, list[tuple[int, int, int]]] = {}
    for row, (layer, pairs) in enumerate(patches):
        entries.setdefault(layer, []).extend((row, d, s) for s, d in pairs)
    return {layer: tuple(torch.tensor(column, dtype=torch.long) for column in zip(*rows))
            for layer, rows in entries.items() if rows}


def _replace_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's call arguments with its residual-stream input replaced (for a pre-hook to return)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _replicate(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    return {name: value.expand(rows, *value.shape[1:]).contiguous() for name, value in inputs.items()}


def _rows_per_pass(n_tokens: int) -> int:
    """How many copies of an n-token prompt go into one batched pass."""
    return max(1, min(MAX_ROWS_PER_PASS, TOKENS_PER_PASS // max(n_tokens, 1)))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.clip((a * b).sum(-1) / np.maximum(norms, 1e-12), -1.0, 1.0)


def _sigmoid(x) -> np.ndarray:
    return torch.sigmoid(torch.as_tensor(x, dtype=torch.float64)).numpy()
