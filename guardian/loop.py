"""The Guardian loop: train a LoRA update on a user's patch set, measure it, export and re-load it.

`validate_patch` checks a patch set (prompt, label) and truncates prompts to the judge's length;
`train_update` trains a peft LoRA adapter on the patch set plus a replay sample of the bundled
training data (with `guardian.training.train_lora`, on a copy: the given judge never changes) and
measures before/after on the patch set and on a held-back regression sample; `export_adapter_zip`
and `load_adapter_zip` move the adapter in and out as a zip (adapter_model.safetensors +
adapter_config.json) that plain peft and `guardian.loading.load_judge(..., adapter=...)` load too.
`TrainingJob` runs one training in a background thread (for the app: reruns do not stop it).
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import pandas as pd
import torch

from guardian import datasets
from guardian.datasets import DataError
from guardian.judge import CHARS_PER_TOKEN_CAP, Judge
from guardian.loading import _judge, apply_adapter
from guardian.runtime import release_free_memory
from guardian.scoring import THRESHOLD, score_prompts
from guardian.train import REPLAY_PER_PATCH, VALIDATION_SHARE
from guardian.training import LoraSettings, TrainProgress, lora_targets, train_lora

MAX_PATCH_ROWS = 500
MAX_RANK = 64
MAX_EPOCHS = 10
LEARNING_RATE_RANGE = (1e-5, 1e-2)
REGRESSION_SIZE = 120
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_ZIP_BYTES = 64 * 2**20
MAX_ZIP_ENTRIES = 16
MAX_UNZIPPED_BYTES = 256 * 2**20
MAX_CONFIG_BYTES = 64 * 2**10
# rank 8, 3 epochs, batch 16, 64 tokens; only the last 3 blocks adapt, so the backward pass is half as
# long, and no dropout on the adapters' inputs (peft would copy every input of every adapted layer)
DEFAULT_SETTINGS = LoraSettings(learning_rate=1e-3, top_layers=3, dropout=0.0)


# ----- the patch set -------------------------------------------------------------------------------
def validate_patch(patch: pd.DataFrame, judge: Judge) -> pd.DataFrame:
    """The patch set as clean rows (prompt, label 0/1, truncated); raises DataError saying what is wrong.

    Accepts a `label` column of 0/1 or safe/unsafe; blank rows are dropped; prompts longer than the
    judge can read are cut to its `max_tokens` (and marked `truncated`).
    """
    if patch is None or not {"prompt", "label"} <= set(patch.columns):
        raise DataError("The patch set needs two columns: 'prompt' and 'label' (safe/unsafe or 0/1).")
    rows = patch[["prompt", "label"]].copy()
    rows["prompt"] = rows["prompt"].map(lambda p: "" if p is None or (isinstance(p, float) and np.isnan(p))
                                        else str(p).strip())
    blank_label = np.array([v is None or str(v).strip() in ("", "nan", "None") for v in rows["label"]], dtype=bool)
    rows = rows[(rows["prompt"] != "").to_numpy(dtype=bool) | ~blank_label]  # fully blank rows are ignored
    if rows.empty:
        raise DataError("The patch set is empty: add some prompts the judge gets wrong, with the right label.")
    missing = rows.index[rows["prompt"] == ""]
    if len(missing):
        raise DataError(f"Row {int(missing[0]) + 1} has a label but no prompt; type a prompt or delete the row.")
    labels = []
    for index, value in rows["label"].items():
        try:
            labels.append(datasets.parse_label(value))
        except DataError as exc:
            raise DataError(f"Row {int(index) + 1}: {exc}") from None
    if len(rows) > MAX_PATCH_ROWS:
        raise DataError(f"The patch set has {len(rows)} prompts; at most {MAX_PATCH_ROWS} can be trained on.")
    labels = np.array(labels, dtype=int)
    for value, name in ((1, "unsafe"), (0, "safe")):
        if not (labels == value).any():
            raise DataError(f"The patch set has no {name} prompt. Add at least one {name} example too, so the "
                            "update learns both sides and does not just push every verdict one way.")
    prompts, truncated = truncate_prompts(judge, rows["prompt"].tolist())
    return pd.DataFrame({"prompt": prompts, "label": labels, "truncated": truncated})


def truncate_prompts(judge: Judge, prompts: list[str]) -> tuple[list[str], list[bool]]:
    """Prompts cut to the text the judge reads (its first `max_tokens` tokens), and which were cut."""
    flags = judge.tokenize(prompts).truncated
    out = []
    for text, cut in zip(prompts, flags):
        if cut:
            text = _cut_to_tokens(judge, text[: judge.max_tokens * CHARS_PER_TOKEN_CAP])
        out.append(text)
    return out, list(flags)


def _cut_to_tokens(judge: Judge, text: str) -> str:
    try:
        enc = judge.tokenizer(text, truncation=True, max_length=judge.max_tokens, return_offsets_mapping=True)
        end = max((stop for _, stop in enc["offset_mapping"]), default=len(text))
        return text[:end] if end else text
    except (NotImplementedError, KeyError, TypeError):  # slow tokenizers have no offsets
        return text


def read_patch_csv(data: bytes) -> pd.DataFrame:
    """A patch set from a CSV/TSV with columns prompt and label (0/1 or safe/unsafe); raises DataError."""
    frame = datasets.read_prompt_table(data, max_rows=MAX_PATCH_ROWS)
    columns = {c.lower(): c for c in frame.columns}
    if "prompt" not in columns or "label" not in columns:
        raise DataError(f"The file needs a 'prompt' and a 'label' column; it has {', '.join(frame.columns)}.")
    frame = frame[[columns["prompt"], columns["label"]]].set_axis(["prompt", "label"], axis=1)
    labels = []
    for index, value in frame["label"].items():
        try:
            labels.append("unsafe" if datasets.parse_label(value) else "safe")
        except DataError as exc:
            raise DataError(f"Row {int(index) + 1}: {exc}") from None
    return pd.DataFrame({"prompt": frame["prompt"].astype(str), "label": labels})


def check_settings(settings: LoraSettings) -> LoraSettings:
    """Raise ValueError unless rank, epochs and learning rate are within the loop's limits."""
    low, high = LEARNING_RATE_RANGE
    if not 1 <= int(settings.rank) <= MAX_RANK:
        raise ValueError(f"The LoRA rank must be between 1 and {MAX_RANK} (got {settings.rank}).")
    if not 1 <= int(settings.epochs) <= MAX_EPOCHS:
        raise ValueError(f"The number of epochs must be between 1 and {MAX_EPOCHS} (got {settings.epochs}).")
    if not low <= float(settings.learning_rate) <= high:
        raise ValueError(f"The learning rate must be between {low:g} and {high:g} (got {settings.learning_rate:g}).")
    return settings


# ----- results -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BeforeAfter:
    """p(unsafe) of the same labelled prompts before and after an update."""

    name: str
    prompts: tuple[str, ...]
    labels: np.ndarray
    before: np.ndarray
    after: np.ndarray

    def right(self, p: np.ndarray) -> np.ndarray:
        return (p >= THRESHOLD).astype(int) == self.labels

    @property
    def accuracy_before(self) -> float:
        return float(self.right(self.before).mean()) if len(self.labels) else float("nan")

    @property
    def accuracy_after(self) -> float:
        return float(self.right(self.after).mean()) if len(self.labels) else float("nan")

    @property
    def fixed(self) -> np.ndarray:
        """Prompts wrong before and right after."""
        return ~self.right(self.before) & self.right(self.after)

    @property
    def broken(self) -> np.ndarray:
        """Prompts right before and wrong after."""
        return self.right(self.before) & ~self.right(self.after)

    def summary(self) -> dict:
        return {"set": self.name, "prompts": len(self.labels), "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "fixed": int(self.fixed.sum()), "broken": int(self.broken.sum())}

    def to_frame(self) -> pd.DataFrame:
        change = np.where(self.fixed, "fixed", np.where(self.broken, "broken", ""))
        return pd.DataFrame({"prompt": list(self.prompts), "label": np.where(self.labels == 1, "unsafe", "safe"),
                             "p_unsafe_before": self.before, "p_unsafe_after": self.after, "change": change})


@dataclass(frozen=True, eq=False)
class Update:
    """A trained LoRA update: the merged session judge, the adapter files and what it changed."""

    judge: Judge
    adapter_files: tuple[tuple[str, bytes], ...]
    settings: LoraSettings
    patch: BeforeAfter
    regression: BeforeAfter
    n_patch: int
    n_replay: int
    losses: tuple[float, ...]
    seconds: float

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.patch.summary(), self.regression.summary()])


# ----- training ------------------------------------------------------------------------------------
def replay_and_regression(patch_prompts: list[str], n_replay: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A replay sample of the bundled training data and a held-back regression sample, both avoiding the patch."""
    data = datasets.base_training_set()
    train, held = datasets.split(data, VALIDATION_SHARE)
    taken = {datasets.normalise(p) for p in patch_prompts}
    train = train[~train["prompt"].map(datasets.normalise).isin(taken)]
    held = held[~held["prompt"].map(datasets.normalise).isin(taken)]
    replay = train.sample(n=min(len(train), n_replay), random_state=seed)
    regression = held.sample(n=min(len(held), REGRESSION_SIZE), random_state=seed)
    return replay.reset_index(drop=True), regression.reset_index(drop=True)


def train_update(base: Judge, patch: pd.DataFrame, settings: LoraSettings = DEFAULT_SETTINGS,
                 progress: TrainProgress | None = None, should_stop: Callable[[], bool] | None = None,
                 replay_per_patch: int = REPLAY_PER_PATCH) -> Update:
    """Train a LoRA update of `base` on the patch set plus replayed bundled prompts; `base` is never changed.

    The adapter is trained on a copy (train_lora), saved, and merged into a fresh copy of the base
    model through the same path an uploaded adapter takes (`load_adapter_files`).
    """
    check_settings(settings)
    rows = validate_patch(patch, base)
    settings = replace(settings, target_modules=lora_targets(base.model),
                       max_tokens=min(settings.max_tokens, base.max_tokens),
                       bfloat16=base.verdict_dtype == torch.bfloat16)
    replay, regression = replay_and_regression(rows["prompt"].tolist(), replay_per_patch * len(rows), settings.seed)
    texts = rows["prompt"].tolist() + replay["prompt"].tolist()
    labels = rows["label"].tolist() + replay["label"].astype(int).tolist()
    losses: list[float] = []

    def report(epoch: int, step: int, total: int, loss: float) -> None:
        losses.append(loss)
        if progress is not None:
            progress(epoch, step, total, loss)

    started = time.perf_counter()
    peft_model = train_lora(base.model, base.tokenizer, texts, labels, settings, report, should_stop)
    files = _adapter_files(peft_model)
    del peft_model  # only one extra model copy at a time: the trained copy goes before the merged one
    seconds = time.perf_counter() - started
    judge = load_adapter_files(base, files)
    update = Update(
        judge=judge, adapter_files=files, settings=settings,
        patch=before_after("patch set", base, judge, rows["prompt"].tolist(), rows["label"].to_numpy()),
        regression=before_after("regression sample", base, judge, regression["prompt"].tolist(),
                                regression["label"].astype(int).to_numpy()),
        n_patch=len(rows), n_replay=len(replay), losses=tuple(losses), seconds=seconds,
    )
    release_free_memory()  # the training's buffers go back to the system, not kept for the next job
    return update


def before_after(name: str, before: Judge, after: Judge, prompts: list[str], labels: np.ndarray) -> BeforeAfter:
    """Score the same labelled prompts with two judges."""
    return BeforeAfter(name=name, prompts=tuple(prompts), labels=np.asarray(labels, dtype=int),
                       before=score_prompts(before, prompts).p_unsafe, after=score_prompts(after, prompts).p_unsafe)


def _adapter_files(peft_model) -> tuple[tuple[str, bytes], ...]:
    with tempfile.TemporaryDirectory(prefix="guardian-adapter-") as folder:
        peft_model.peft_config["default"].base_model_name_or_path = None
        peft_model.save_pretrained(folder, safe_serialization=True)
        return tuple((name, (Path(folder) / name).read_bytes()) for name in ADAPTER_FILES)


def load_adapter_files(base: Judge, files: tuple[tuple[str, bytes], ...]) -> Judge:
    """Merge adapter files (name, bytes) into a copy of `base`'s model: a new session judge."""
    with tempfile.TemporaryDirectory(prefix="guardian-adapter-") as folder:
        for name, data in files:
            (Path(folder) / name).write_bytes(data)
        model, deltas = apply_adapter(base.model, folder)
    return _judge("session update", model, base.tokenizer, unsafe_labels=base.unsafe_labels,
                  max_tokens=base.max_tokens, deltas=deltas,
                  description=f"{base.description or base.name} + your LoRA update")


# ----- the adapter as a zip ------------------------------------------------------------------------
def export_adapter_zip(update: Update) -> bytes:
    """The adapter as a zip: adapter_model.safetensors + adapter_config.json at its root."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in update.adapter_files:
            archive.writestr(name, data)
    return buffer.getvalue()


def read_adapter_zip(data: bytes) -> tuple[tuple[str, bytes], ...]:
    """The two adapter files from a zip, after safety checks; raises DataError saying what is wrong.

    Refused: not a zip, over MAX_ZIP_BYTES, more than MAX_ZIP_ENTRIES entries, absolute paths or '..',
    more than MAX_UNZIPPED_BYTES once unpacked (counted while reading, not trusted from the header),
    a missing or duplicated adapter file, or a config that is not a LoRA adapter config.
    """
    if len(data) > MAX_ZIP_BYTES:
        raise DataError(f"The zip is larger than {MAX_ZIP_BYTES // 2**20} MB.")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError("This file is not a zip archive; upload the zip the loop page let you download.") from exc
    with archive:
        if len(entries) > MAX_ZIP_ENTRIES:
            raise DataError(f"The zip holds {len(entries)} files; an adapter zip holds only {len(ADAPTER_FILES)}.")
        found: dict[str, zipfile.ZipInfo] = {}
        for entry in entries:
            name = entry.filename.replace("\\", "/")
            path = PurePosixPath(name)
            if name.startswith("/") or (path.parts and ":" in path.parts[0]):
                raise DataError(f"The zip contains an absolute path ('{entry.filename}'); it was refused.")
            if ".." in path.parts:
                raise DataError(f"The zip contains a path leaving its folder ('{entry.filename}'); it was refused.")
            if entry.is_dir() or path.name not in ADAPTER_FILES:
                continue
            if path.name in found:
                raise DataError(f"The zip contains {path.name} twice.")
            found[path.name] = entry
        if sum(e.file_size for e in entries) > MAX_UNZIPPED_BYTES:
            raise DataError(f"The zip unpacks to more than {MAX_UNZIPPED_BYTES // 2**20} MB; it was refused.")
        missing = [n for n in ADAPTER_FILES if n not in found]
        if missing:
            raise DataError(f"The zip has no {' and no '.join(missing)}; an adapter zip holds both "
                            f"{' and '.join(ADAPTER_FILES)}.")
        budget = MAX_UNZIPPED_BYTES
        files = []
        for name in ADAPTER_FILES:
            blob = _read_capped(archive, found[name], budget)
            budget -= len(blob)
            files.append((name, blob))
    _check_config(files[0][1])
    return tuple(files)


def _read_capped(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, budget: int) -> bytes:
    chunks, size = [], 0
    try:
        with archive.open(entry) as stream:
            while chunk := stream.read(2**20):
                size += len(chunk)
                if size > budget:
                    raise DataError(f"The zip unpacks to more than {MAX_UNZIPPED_BYTES // 2**20} MB; it was refused.")
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
        raise DataError(f"{entry.filename} could not be unpacked (damaged or encrypted zip).") from exc
    return b"".join(chunks)


def _check_config(raw: bytes) -> None:
    if len(raw) > MAX_CONFIG_BYTES:
        raise DataError("adapter_config.json is far too large for an adapter config.")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError("adapter_config.json is not valid JSON.") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise DataError("adapter_config.json does not describe a LoRA adapter.")


def load_adapter_zip(base: Judge, data: bytes) -> Judge:
    """A session judge from an adapter zip (see read_adapter_zip) merged into a copy of `base`."""
    return load_adapter_files(base, read_adapter_zip(data))


# ----- one training in the background --------------------------------------------------------------
_PROCESS_SLOT = threading.BoundedSemaphore(1)  # one training at a time in the whole process (2 CPU cores)


@dataclass(eq=False)
class TrainingJob:
    """One training running in a background thread; the app polls `epoch`, `step`, `loss` and `done`."""

    base: Judge
    patch: pd.DataFrame
    settings: LoraSettings
    epoch: int = 0
    step: int = 0
    total: int = 0
    loss: float = float("nan")
    waiting: bool = True
    update: Update | None = None
    error: Exception | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "TrainingJob":
        self._thread = threading.Thread(target=self._run, name="guardian-loop-training", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _progress(self, epoch: int, step: int, total: int, loss: float) -> None:
        self.epoch, self.step, self.total, self.loss = epoch, step, total, loss

    def _run(self) -> None:
        try:
            with _PROCESS_SLOT:
                self.waiting = False
                if self._stop.is_set():
                    raise InterruptedError("Training was stopped.")
                self.update = train_update(self.base, self.patch, self.settings, self._progress, self._stop.is_set)
        except Exception as exc:  # noqa: BLE001 - handed to the page, which words it
            self.error = exc
