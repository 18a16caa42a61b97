"""Benchmark: how fast the bundled judges answer on this machine.

`python -m guardian.bench [--quick] [--json]` loads both bundled judges and measures, warm (every
timed call follows an untimed one of the same kind):

- `batch_prompts_per_s`: `score_prompts` on a fixed set of 2,000 varied prompts (built from the
  package's own data by `bench_prompts`), per judge; `batch_gflops`: the floating-point work that
  was useful (real tokens only, from `flops_per_token`) divided by the time;
  `batch_speedup_vs_seed`: against `seed_batch_analyze` on the same prompts, in the same run.
- `probe_p50_ms`, `probe_p95_ms`: the probe page's computation (`probe_page`) on prompts of at most
  32 tokens; `ig_ms`: integrated gradients (50 steps) alone.
- `patching_grid_s`: `circuit.activation_patching` (every layer x position) on a 24-token pair;
  `head_ablation_s`: `heads.head_ablation` (every head) on the pair's unsafe prompt.
- `cold_start_s`: a fresh Python process importing `guardian` and loading both judges, and
  `peak_rss_mb`: that process's peak resident memory after running every analysis once.
- `dataset_5000_s`: the dataset page reading, preparing and scoring 5,000 uploaded prompts with both judges.
- `lora_update_s`: the loop page's "Train update" (default settings) on a 300-prompt patch set plus its replay sample.

`--quick` shrinks the sample sizes (and trains one epoch, scaled by the epoch count) to finish in
under a minute. The figures and the machine they came from are recorded in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from guardian import attribution, batch, circuit, heads, loop, probe, scoring
from guardian.judge import Judge
from guardian.loading import native_bf16
from guardian.training import LoraSettings

DATA_DIR = Path(__file__).parent / "data"
PROMPT_FILES = ("train_safe.csv", "train_unsafe.csv", "patch.csv", "suite.csv")
LORA_FILE = "patch.csv"  # the in-app update trains on corrections like these
PROBE_MAX_TOKENS = 32
PATCH_TOKENS = 24
IG_STEPS = 50
MUTATION_LIMIT = 48  # what the probe page asks for
MIN_MUTATIONS = 24  # probe prompts whose top words give fewer rewrites are not timed
TARGET_WORDS = 3  # the page mutates the top three positively attributed words
SEED_MAX_LENGTH = 128
FILLER = ("Please explain each step in plain words so that a beginner like me can follow along "
          "without any trouble at all today").split()
DEFAULT_LOADER = "guardian.loading:load_bundled_judges"

KEYS = ("batch_prompts_per_s", "batch_gflops", "batch_speedup_vs_seed", "probe_p50_ms", "probe_p95_ms",
        "ig_ms", "patching_grid_s", "head_ablation_s", "cold_start_s", "peak_rss_mb", "lora_update_s", "dataset_5000_s")
# key -> (target, True if higher is better); keys without a target are not listed
TARGETS = {
    "batch_prompts_per_s": (250.0, True), "batch_speedup_vs_seed": (3.0, True), "probe_p50_ms": (400.0, False),
    "ig_ms": (250.0, False), "patching_grid_s": (1.5, False), "head_ablation_s": (1.0, False),
    "cold_start_s": (6.0, False), "peak_rss_mb": (1024.0, False), "lora_update_s": (30.0, False),
    "dataset_5000_s": (60.0, False),
}


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    batch_prompts: int = 2000
    seed_prompts: int = 2000  # the first this many of the batch prompts also go through the seed code
    probe_prompts: int = 20
    repeats: int = 5  # timed runs of the patching grid and head ablation (the median is reported)
    lora_examples: int = 300
    lora_epochs_run: int = 3  # epochs actually trained; the time is scaled to LoraSettings().epochs
    dataset_prompts: int = 5000  # prompts the dataset page scores; the time is scaled to 5,000


FULL = Sizes()
QUICK = Sizes(batch_prompts=500, seed_prompts=100, probe_prompts=5, repeats=2, lora_epochs_run=1, dataset_prompts=1000)


# ----- inputs ----------------------------------------------------------------------------------
def data_prompts(files: Sequence[str] = PROMPT_FILES) -> list[str]:
    """Every prompt in the package's training, patch and suite files, in file order."""
    frames = [pd.read_csv(DATA_DIR / name, dtype={"prompt": str}, keep_default_na=False) for name in files]
    return [p for frame in frames for p in frame["prompt"] if p.strip()]


def bench_prompts(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` varied prompts: each is 1 to 3 of the package's prompts (drawn with replacement) joined."""
    pool = data_prompts()
    rng = np.random.default_rng(seed)
    return [" ".join(pool[i] for i in rng.integers(0, len(pool), size=rng.integers(1, 4))) for _ in range(n)]


def token_counts(judge: Judge, texts: Sequence[str]) -> np.ndarray:
    """Tokens per prompt as the judge reads them (special tokens included, truncation applied)."""
    ids = judge.tokenizer(list(texts), truncation=True, max_length=judge.max_tokens)["input_ids"]
    return np.array([len(x) for x in ids])


def probe_prompts(judge: Judge, n: int | None = None) -> list[str]:
    """Unsafe prompts of at most 32 tokens from the suite, examples, pairs and patch files (the first `n`)."""
    unsafe = []
    for name, column in (("suite.csv", "prompt"), ("examples.csv", "prompt"), ("pairs.csv", "unsafe"),
                         ("patch.csv", "prompt")):
        frame = pd.read_csv(DATA_DIR / name, keep_default_na=False)
        labels = frame["label"] if "label" in frame else [1] * len(frame)
        unsafe += [p for p, label in zip(frame[column], labels) if int(label) == 1]
    return [p for p, k in zip(unsafe, token_counts(judge, unsafe)) if k <= PROBE_MAX_TOKENS][:n]


def patching_pair(judge: Judge, n_tokens: int = PATCH_TOKENS) -> tuple[str, str]:
    """An unsafe/safe twin pair from data/pairs.csv grown with shared filler words to `n_tokens` tokens."""
    pairs = pd.read_csv(DATA_DIR / "pairs.csv", keep_default_na=False)
    for unsafe, safe in zip(pairs["unsafe"], pairs["safe"]):
        counts = token_counts(judge, [unsafe, safe])
        if counts[0] != counts[1] or counts[0] > n_tokens:
            continue
        for word in FILLER:
            longer = token_counts(judge, [f"{unsafe} {word}", f"{safe} {word}"])
            if longer[0] == longer[1] <= n_tokens:
                unsafe, safe = f"{unsafe} {word}", f"{safe} {word}"
            if longer[0] >= n_tokens:
                break
        if token_counts(judge, [unsafe])[0] == n_tokens:
            return unsafe, safe
    raise ValueError(f"No pair in pairs.csv could be grown to {n_tokens} tokens.")


def lora_examples(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` labelled prompts drawn (without replacement where possible) from data/patch.csv."""
    frame = pd.read_csv(DATA_DIR / LORA_FILE, keep_default_na=False)
    rows = np.random.default_rng(seed).choice(len(frame), size=n, replace=n > len(frame))
    return [frame["prompt"][i] for i in rows], [int(frame["label"][i]) for i in rows]


# ----- the code measured -----------------------------------------------------------------------
def seed_batch_analyze(judge: Judge, prompts: Sequence[str], max_length: int = SEED_MAX_LENGTH) -> np.ndarray:
    """The seed guide's `batch_analyze`, re-implemented as naive code writes it: p(unsafe) per prompt.

    One prompt at a time: the tokenizer is called on that prompt alone with
    `padding="max_length", max_length=128, truncation=True`, the model runs once per prompt with
    `output_attentions=True` (attentions always computed, then unused) under `torch.no_grad()`
    (not `inference_mode`), and p(unsafe) is read from the softmax of the logits.
    """
    out = np.zeros(len(prompts))
    with judge.lock, torch.no_grad():
        for i, text in enumerate(prompts):
            enc = judge.tokenizer(text, padding="max_length", truncation=True, max_length=max_length,
                                  return_tensors="pt")
            result = judge.model(**enc, output_attentions=True)
            out[i] = float(torch.softmax(result.logits.float(), -1)[0, list(judge.unsafe_labels)].sum())
    return out


def probe_page(base: Judge, lora: Judge, text: str, n_steps: int = IG_STEPS) -> probe.ProbeResult:
    """The probe page's computation: both verdicts, IG on the base judge, mutations of its top
    words scored by both judges, and both judges' layer activations."""
    for judge in (base, lora):
        scoring.verdict(judge, text)
    attr = attribution.attribute(base, text, "ig", "pad", n_steps)
    targets = tuple(w for w, s in attr.top_words(TARGET_WORDS) if s > 0) or tuple(w for w, _ in attr.top_words(1))
    result = probe.probe(base, text, targets, other_judge=lora, limit=MUTATION_LIMIT)
    for judge in (base, lora):
        probe.layer_activations(judge, text)
    return result


def every_analysis(base: Judge, lora: Judge, prompts: Sequence[str]) -> None:
    """Run each analysis the app offers once (the peak-memory workload)."""
    from guardian import compare

    text = probe_prompts(base, 1)[0]
    unsafe, safe = patching_pair(base)
    for judge in (base, lora):
        scoring.score_prompts(judge, prompts)
    probe_page(base, lora, text)
    for method in ("grad_x_input", "occlusion"):
        attribution.attribute(base, text, method)
    ig = attribution.attribute(lora, text, "ig", "pad", IG_STEPS)
    attribution.faithfulness(lora, ig)
    patterns = heads.attention_patterns(base, text)
    heads.safety_token_attention(patterns, [1])
    heads.head_ablation(base, unsafe)
    circuit.layer_divergence(base, unsafe, safe)
    circuit.logit_lens(base, unsafe)
    circuit.activation_patching(base, unsafe, safe)
    compare.compare_versions(base, lora, compare.default_suite())


# ----- measuring -------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def warm_median(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, after one untimed call."""
    fn()
    return float(np.median([timed(fn) for _ in range(max(1, repeats))]))


def flops_per_token(judge: Judge, n_tokens: int) -> float:
    """Forward FLOPs for one token of an `n_tokens` prompt: 2 per weight of every matrix in the
    blocks, plus the attention scores and mixing (4 x positions x width per block)."""
    dense = sum(p.numel() for block in judge.blocks for p in block.parameters() if p.dim() == 2)
    width = judge.n_heads * judge.head_dim
    return 2.0 * dense + 4.0 * judge.n_layers * n_tokens * width


def batch_flops(judge: Judge, prompts: Sequence[str]) -> float:
    """Useful forward FLOPs to score `prompts` (real tokens only, no padding)."""
    return float(sum(n * flops_per_token(judge, n) for n in token_counts(judge, prompts)))


def measure_batch(judges: Sequence[Judge], prompts: Sequence[str], seed_prompts: int) -> dict:
    """Batch throughput per judge, achieved GFLOP/s, and the speed-up over the seed code on the
    first `seed_prompts` prompts (both codes on the first judge, same prompts)."""
    warm = list(prompts[:64])
    seconds = []
    for judge in judges:
        scoring.score_prompts(judge, warm)
        seconds.append(timed(lambda: scoring.score_prompts(judge, prompts)))
    flops = sum(batch_flops(judge, prompts) for judge in judges)
    subset = list(prompts[:seed_prompts])
    first = judges[0]
    seed_analyze = lambda: seed_batch_analyze(first, subset)  # noqa: E731
    seed_batch_analyze(first, subset[:8])
    seed_s = timed(seed_analyze)
    ours_s = seconds[0] if len(subset) == len(prompts) else timed(lambda: scoring.score_prompts(first, subset))
    exact = dataclasses.replace(first, verdict_dtype=torch.float32, lock=first.lock)
    fp32_s = seconds[0] if first.verdict_dtype == torch.float32 else timed(lambda: scoring.score_prompts(exact, prompts))
    return {
        "batch_prompts_per_s": len(prompts) * len(judges) / sum(seconds),
        "batch_gflops": flops / sum(seconds) / 1e9,
        "batch_speedup_vs_seed": seed_s / ours_s,
        "per_judge_prompts_per_s": [len(prompts) / s for s in seconds],
        "seed_prompts_per_s": len(subset) / seed_s,
        "float32_prompts_per_s": len(prompts) / fp32_s,
        "mean_tokens": float(token_counts(first, prompts).mean()),
    }


def measure_probe(base: Judge, lora: Judge, n: int, n_steps: int = IG_STEPS) -> dict:
    """Probe-page latency percentiles and integrated-gradients latency over the first `n` probe
    prompts whose page computation scores at least `MIN_MUTATIONS` mutations."""
    candidates = probe_prompts(base)
    probe_page(base, lora, candidates[0], n_steps)
    probe_s, ig_s, used = [], [], []
    for text in candidates:
        start = time.perf_counter()
        result = probe_page(base, lora, text, n_steps)
        seconds = time.perf_counter() - start
        if len(result.mutations) < MIN_MUTATIONS:
            continue
        probe_s.append(seconds)
        ig_s.append(timed(lambda: attribution.attribute(base, text, "ig", "pad", n_steps)))
        used.append(text)
        if len(used) == n:
            break
    return {
        "probe_p50_ms": 1000 * float(np.percentile(probe_s, 50)),
        "probe_p95_ms": 1000 * float(np.percentile(probe_s, 95)),
        "ig_ms": 1000 * float(np.median(ig_s)),
        "probe_prompts": len(used),
        "probe_max_tokens": int(token_counts(base, used).max()),
    }


def measure_circuit(judge: Judge, repeats: int) -> dict:
    """Patching grid (every layer x position of a 24-token pair) and all-head ablation, median seconds."""
    unsafe, safe = patching_pair(judge)
    return {
        "patching_grid_s": warm_median(lambda: circuit.activation_patching(judge, unsafe, safe), repeats),
        "head_ablation_s": warm_median(lambda: heads.head_ablation(judge, unsafe), repeats),
    }


def measure_lora(judge: Judge, n_examples: int, epochs_run: int, settings: LoraSettings = loop.DEFAULT_SETTINGS) -> dict:
    """Seconds the loop page's "Train update" spends training on a patch set of `n_examples` prompts
    (plus its replay sample); when fewer epochs are run than `settings.epochs`, the time is scaled
    up by the ratio."""
    texts, labels = lora_examples(n_examples)
    patch = pd.DataFrame({"prompt": texts, "label": labels})
    update = loop.train_update(judge, patch, dataclasses.replace(settings, epochs=epochs_run))
    return {"lora_update_s": update.seconds * settings.epochs / epochs_run,
            "lora_trained_prompts": update.n_patch + update.n_replay}


def measure_dataset_page(base: Judge, lora: Judge, n_prompts: int) -> dict:
    """Seconds the dataset page takes to score `n_prompts` uploaded prompts with both judges (read,
    prepare and score, as the page does), scaled to 5,000 prompts."""
    frame = pd.DataFrame({"prompt": bench_prompts(n_prompts, seed=1)})
    raw = frame.to_csv(index=False).encode()
    started = time.perf_counter()
    table = batch.prepare_table(batch.read_upload(raw), "prompt")
    batch.score_batch({"base": base, "lora": lora}, table)
    return {"dataset_5000_s": (time.perf_counter() - started) * 5000 / n_prompts}


def measure_fresh_process(loader: str = DEFAULT_LOADER, n_prompts: int = 2000, env: dict | None = None) -> dict:
    """Cold start (a new process imports guardian and loads both judges via `loader`, "module:function")
    and that process's peak RSS after running every analysis once on `n_prompts` batch prompts."""
    module, function = loader.split(":")
    code = (
        "import importlib; import guardian\n"
        f"base, lora = getattr(importlib.import_module({module!r}), {function!r})()\n"
        "print('loaded', flush=True)\n"
        "from guardian import bench\n"
        f"bench.every_analysis(base, lora, bench.bench_prompts({n_prompts}))\n"
        "print(bench.peak_rss_kb(), flush=True)\n"
    )
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})}, cwd=Path(__file__).parent.parent)
    lines = []
    for line in child.stdout:
        lines.append(line.strip())
        if lines[-1] == "loaded":
            cold = time.perf_counter() - start
    if child.wait() != 0 or len(lines) < 2:
        raise RuntimeError(f"The fresh benchmark process failed (exit code {child.returncode}).")
    return {"cold_start_s": cold, "peak_rss_mb": int(lines[-1]) / 1024}


def peak_rss_kb() -> int:
    """Peak resident memory of this process in KiB: VmHWM of its own address space.

    (`ru_maxrss` would do, but Linux carries it across exec: a child spawned by a large parent
    would report the parent's size.)
    """
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(base: Judge, lora: Judge, sizes: Sizes = FULL, loader: str = DEFAULT_LOADER,
        progress: Callable[[str], None] | None = None) -> dict:
    """Every measurement; returns the KEYS (plus a few details) as plain floats."""
    say = progress or (lambda _: None)
    report: dict = {}
    say("batch scoring")
    report.update(measure_batch((base, lora), bench_prompts(sizes.batch_prompts), sizes.seed_prompts))
    say("probe page")
    report.update(measure_probe(base, lora, sizes.probe_prompts))
    say("patching grid and head ablation")
    report.update(measure_circuit(base, sizes.repeats))
    say("LoRA update")
    report.update(measure_lora(base, sizes.lora_examples, sizes.lora_epochs_run))
    say("dataset page")
    report.update(measure_dataset_page(base, lora, sizes.dataset_prompts))
    say("cold start and peak memory (fresh process)")
    report.update(measure_fresh_process(loader, sizes.batch_prompts))
    return report


# ----- reporting -------------------------------------------------------------------------------
def machine() -> dict:
    """What the figures were measured on."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    return {
        "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": model,
        "native_bf16": native_bf16(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def verdict_agreement(judge: Judge, prompts: Sequence[str], dtype: torch.dtype = torch.bfloat16) -> dict:
    """How `dtype` verdicts of `judge` compare with float32 ones on `prompts` (both batch-scored)."""
    views = {d: dataclasses.replace(judge, verdict_dtype=d, lock=judge.lock) for d in (torch.float32, dtype)}
    p32, p_low = (scoring.score_prompts(views[d], prompts).p_unsafe for d in (torch.float32, dtype))
    differ = (p32 >= scoring.THRESHOLD) != (p_low >= scoring.THRESHOLD)
    return {"judge": judge.name, "prompts": len(prompts), "verdicts_differ": int(differ.sum()),
            "agreement": float(1 - differ.mean()), "max_abs_diff_p": float(np.abs(p32 - p_low).max()),
            "mean_abs_diff_p": float(np.abs(p32 - p_low).mean())}


def verdict_on_target(key: str, value: float) -> str:
    """'met', 'missed by N%' or '' for a key without a target."""
    if key not in TARGETS:
        return ""
    target, higher = TARGETS[key]
    met = value >= target if higher else value < target
    if met:
        return "met"
    off = (target / value - 1) if higher else (value / target - 1)
    return f"missed ({off:+.0%} off)" if math.isfinite(off) else "missed"


def table(report: dict) -> str:
    """A plain-text table of the KEYS with their targets."""
    rows = []
    for key in KEYS:
        value = report[key]
        target = TARGETS.get(key)
        goal = "" if target is None else f"{'>=' if target[1] else '<'} {target[0]:g}"
        rows.append(f"{key:<24}{value:>12.2f}   {goal:<10}{verdict_on_target(key, value)}")
    return "\n".join([f"{'measure':<24}{'value':>12}   {'target':<10}", *rows])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guardian.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples; finishes in under a minute")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--agreement", metavar="CSV", help="instead, compare bfloat16 with float32 verdicts of both "
                        "judges on the 'prompt' column of CSV")
    args = parser.parse_args(argv)
    from guardian.loading import load_bundled_judges

    log = (lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    base, lora = load_bundled_judges()
    if args.agreement:
        prompts = pd.read_csv(args.agreement, dtype={"prompt": str}, keep_default_na=False)["prompt"].tolist()
        print(json.dumps([verdict_agreement(j, prompts) for j in (base, lora)], indent=2))
        return
    report = run(base, lora, QUICK if args.quick else FULL, progress=log)
    if args.json:
        print(json.dumps({key: round(float(report[key]), 4) for key in KEYS}, indent=2))
        return
    info = machine()
    print(f"{info['cpu']}, {info['usable_cpus']} of {info['nproc']} CPUs, torch {info['torch']} with "
          f"{info['torch_threads']} threads, verdicts in {str(base.verdict_dtype).removeprefix('torch.')}, "
          f"load average {', '.join(f'{x:.2f}' for x in info['load_average'])}")
    print(table(report))
    print(f"(per judge {', '.join(f'{x:.0f}' for x in report['per_judge_prompts_per_s'])} prompts/s, "
          f"{report['float32_prompts_per_s']:.0f} with float32 verdicts; seed code "
          f"{report['seed_prompts_per_s']:.1f} prompts/s; {report['mean_tokens']:.1f} tokens per prompt on average; "
          f"{report['probe_prompts']} probe prompts of up to {report['probe_max_tokens']} tokens, each with at "
          f"least {MIN_MUTATIONS} mutations)")


if __name__ == "__main__":
    main()
