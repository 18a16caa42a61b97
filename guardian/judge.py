"""One view of any Hugging Face sequence-classification judge.

A `Judge` wraps a model and its tokenizer and finds, once, the parts every technique needs:
the input embeddings, the list of transformer blocks, each block's attention output projection
(whose input is the concatenation of the heads) and which class indices mean *unsafe*. The
techniques in this package use only this view, so BERT-style encoders and GPT-2/Llama-style
decoders are handled alike.

Judges are shared by every browser session at once. Every forward pass, and every hook, runs
under the judge's lock (`Judge.hooked`), and hooks are always removed on the way out.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Relative names (inside one block) of the attention output projection, per architecture family.
ATTENTION_OUTPUT_NAMES = (
    "attention.output.dense",  # BERT, RoBERTa, DeBERTa, ELECTRA
    "attention.out_lin",  # DistilBERT
    "attn.c_proj",  # GPT-2
    "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma
    "self_attn.out_proj",  # OPT, BART
    "attn.out_proj",  # GPT-Neo
)
UNSAFE_LABEL_HINTS = ("unsafe", "harm", "toxic", "jailbreak", "injection", "flag", "danger")
DEFAULT_MAX_TOKENS = 256
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
CHARS_PER_TOKEN_CAP = 24  # text beyond max_tokens * this many characters can never fit


class JudgeError(Exception):
    """A problem with a judge or its input, worded for the person using the app."""


@dataclass(frozen=True)
class Encoded:
    """Tokenised prompts: model inputs plus the readable tokens and truncation flags."""

    inputs: dict[str, torch.Tensor]
    tokens: list[list[str]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


@dataclass(frozen=True)
class Tokenized:
    """Prompts tokenised once, unpadded: per model input, one list of ids per prompt."""

    features: dict[str, list[list[int]]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]


@dataclass(eq=False)
class Judge:
    """A classifier over prompts with the structural handles the analyses need."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    unsafe_labels: tuple[int, ...] = (1,)
    max_tokens: int = DEFAULT_MAX_TOKENS
    weight_deltas: dict[str, float] = field(default_factory=dict)
    description: str = ""
    verdict_dtype: torch.dtype = torch.float32  # of verdict-only passes (`verdict_logits`)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        self.model.eval()
        n = self.num_labels
        if not self.unsafe_labels or any(not 0 <= i < n for i in self.unsafe_labels):
            raise JudgeError(f"Unsafe labels {self.unsafe_labels} do not fit a model with {n} classes.")
        if len(set(self.unsafe_labels)) == n:
            raise JudgeError("At least one class must mean safe.")
        self.max_tokens = min(self.max_tokens, self._model_token_limit())
        self._resident_hooks = self._prime_output_capture()

    def _prime_output_capture(self) -> frozenset:
        """Let transformers install its permanent output-capturing hooks now, and remember them.

        transformers adds inert forward hooks the first time attentions or hidden states are
        asked for. Installing them at load time means every hook found later is one of ours.
        """
        try:
            with self.lock, torch.inference_mode():
                self.model(**self.encode(["a"]).inputs, output_attentions=True, output_hidden_states=True)
        except Exception:  # a model that cannot return attentions still serves verdicts
            pass
        return frozenset(_hook_keys(self.model))

    def leftover_hooks(self) -> list[str]:
        """Names of modules carrying hooks that were not there at load time (should be none)."""
        resident = self._resident_hooks
        return sorted({name for name, module in self.model.named_modules()
                       for key in _module_hook_keys(module) if (id(module), key) not in resident})

    # ----- structure -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)

    @property
    def label_names(self) -> list[str]:
        id2label = getattr(self.config, "id2label", None) or {}
        return [str(id2label.get(i, f"class {i}")) for i in range(self.num_labels)]

    @property
    def safe_labels(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_labels) if i not in self.unsafe_labels)

    @cached_property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order: the ModuleList as long as the model is deep."""
        depth = _config_int(self.config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
        for _, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return list(module)
        raise JudgeError("Could not find the transformer blocks of this model.")

    @cached_property
    def attention_outputs(self) -> list[nn.Module]:
        """Per block, the projection that mixes the concatenated head outputs."""
        found = []
        for block in self.blocks:
            named = dict(block.named_modules())
            module = next((named[n] for n in ATTENTION_OUTPUT_NAMES if n in named), None)
            if module is None:
                raise JudgeError("Could not find the attention output of this model's blocks.")
            found.append(module)
        return found

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return _config_int(self.config, "num_attention_heads", "n_head", "n_heads")

    @property
    def head_dim(self) -> int:
        explicit = getattr(self.config, "head_dim", None)
        if isinstance(explicit, int) and explicit > 0:
            return explicit
        return _config_int(self.config, "hidden_size", "n_embd", "dim", "d_model") // self.n_heads

    def embeddings(self) -> nn.Module:
        """The token-embedding layer (the input to integrated gradients)."""
        return self.model.get_input_embeddings()

    def _model_token_limit(self) -> int:
        limits = [
            getattr(self.tokenizer, "model_max_length", None),
            getattr(self.config, "max_position_embeddings", None),
            getattr(self.config, "n_positions", None),
        ]
        usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        return min(usable) if usable else DEFAULT_MAX_TOKENS

    # ----- text in, numbers out --------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> Encoded:
        """Tokenise prompts (padded, truncated to `max_tokens`), noting which were cut short."""
        if isinstance(texts, str):
            texts = [texts]
        tokenized = self.tokenize(texts)
        tokens = [self.tokenizer.convert_ids_to_tokens(ids) for ids in tokenized.features["input_ids"]]
        return Encoded(inputs=self.batch_inputs(tokenized), tokens=tokens, truncated=tokenized.truncated)

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """Tokenise prompts once, unpadded and truncated to `max_tokens`; pad batches with `batch_inputs`."""
        capped = [t[: self.max_tokens * CHARS_PER_TOKEN_CAP] for t in texts]
        enc = self.tokenizer(capped, truncation=True, max_length=self.max_tokens) if capped else {}
        features = {k: list(enc[k]) for k in MODEL_INPUT_NAMES if k in enc}
        features.setdefault("input_ids", [])
        truncated = [len(ids) >= self.max_tokens and self._needs_more(text)
                     for ids, text in zip(features["input_ids"], texts)]
        return Tokenized(features=features, truncated=truncated)

    def batch_inputs(self, tokenized: Tokenized, index: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for the prompts at `index` (all by default), padded to the longest of them."""
        chosen = range(len(tokenized.truncated)) if index is None else index
        features = {k: [v[i] for i in chosen] for k, v in tokenized.features.items()}
        return dict(self.tokenizer.pad(features, return_tensors="pt"))

    def _needs_more(self, text: str) -> bool:
        if len(text) > self.max_tokens * CHARS_PER_TOKEN_CAP:
            return True
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(body) + self.tokenizer.num_special_tokens_to_add() > self.max_tokens

    def unsafe_score(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-odds of unsafe: logsumexp over unsafe classes minus logsumexp over safe ones."""
        unsafe = logits[..., list(self.unsafe_labels)].logsumexp(-1)
        safe = logits[..., list(self.safe_labels)].logsumexp(-1)
        return unsafe - safe

    def p_unsafe(self, logits: torch.Tensor) -> torch.Tensor:
        """Probability mass on the unsafe classes."""
        return torch.sigmoid(self.unsafe_score(logits))

    @torch.inference_mode()
    def logits(self, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """One forward pass under the judge's lock; returns the class logits."""
        with self.lock:
            return self.model(**inputs, **kwargs).logits.float()

    @torch.inference_mode()
    def verdict_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits for verdicts only (no hooks, no attentions), computed in `verdict_dtype`.

        With bfloat16 the pass runs under CPU autocast (matrix products in bfloat16, norms and
        softmax in float32) with fused attention. Every analysis that explains a score uses
        `logits` (float32, eager attention), as do float32 verdicts.
        """
        if self.verdict_dtype == torch.float32:
            return self.logits(inputs)  # exactly what the explanations compute
        with self.lock, self._fused_attention(), torch.autocast("cpu", dtype=self.verdict_dtype):
            return self.model(**inputs).logits.float()

    @contextmanager
    def _fused_attention(self) -> Iterator[None]:
        """Run the model with PyTorch's fused attention (SDPA) where it supports it, then go back.

        Explanations need eager attention (it returns the attention weights); a verdict does not,
        and SDPA never holds a whole attention matrix in memory. The attention kernel is read from
        the config on every forward pass, so the switch is made and undone under the judge's lock.
        """
        config = self.model.config
        if not getattr(self.model, "_supports_sdpa", False) or getattr(config, "_attn_implementation", None) != "eager":
            yield
            return
        config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            config._attn_implementation = "eager"

    # ----- hooks -----------------------------------------------------------------------------
    @contextmanager
    def hooked(
        self,
        forward: Sequence[tuple[nn.Module, Callable]] = (),
        pre: Sequence[tuple[nn.Module, Callable]] = (),
    ) -> Iterator["Judge"]:
        """Hold the judge's lock with the given forward and pre-forward hooks in place.

        Hooks take `(module, args, kwargs[, output])` and are removed on exit, even after an
        error, so no state is left on the shared model.
        """
        with self.lock:
            handles = []
            try:
                for module, fn in pre:
                    handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
                for module, fn in forward:
                    handles.append(module.register_forward_hook(fn, with_kwargs=True))
                yield self
            finally:
                for handle in handles:
                    handle.remove()


def _module_hook_keys(module: nn.Module) -> list[tuple[str, int]]:
    return [("forward", k) for k in module._forward_hooks] + [("pre", k) for k in module._forward_pre_hooks]


def _hook_keys(model: nn.Module) -> set[tuple[int, tuple[str, int]]]:
    return {(id(m), key) for m in model.modules() for key in _module_hook_keys(m)}


def _config_int(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise JudgeError(f"The model's configuration has none of {', '.join(names)}.")


def block_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual-stream tensor a block receives (first positional or `hidden_states`)."""
    return args[0] if args else kwargs["hidden_states"]


def replace_block_output(output, hidden: torch.Tensor):
    """A block's output with its hidden states replaced, whatever form the block returns."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output[0] = hidden  # ModelOutput-like
    return output


def block_output_hidden(output) -> torch.Tensor:
    """The hidden states inside a block's output, whatever form the block returns."""
    return output if isinstance(output, torch.Tensor) else output[0]


def infer_unsafe_labels(id2label: dict | None, num_labels: int) -> tuple[int, ...]:
    """Which classes mean unsafe: names that say so, else class 1 of a two-class model."""
    names = {int(k): str(v).lower() for k, v in (id2label or {}).items()}
    hinted = tuple(i for i, n in sorted(names.items()) if any(h in n for h in UNSAFE_LABEL_HINTS)
                   and not n.startswith(("not", "non", "no_", "no ", "safe")))
    if hinted and len(hinted) < num_labels:
        return hinted
    if num_labels == 2:
        return (1,)
    raise JudgeError(
        "This model has more than two classes and its labels do not say which mean unsafe; "
        "name the unsafe classes."
    )
