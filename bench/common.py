"""Helpers shared by the bench/ scripts: device flags, interleaved timing, peak memory, tables.

Timing rule used everywhere: candidates are run round-robin (one call each per round, the order rotated
every round) so that drift on a shared machine hits all of them alike; a ratio is the median over rounds
of (candidate time / reference time in the same round), optionally with a reference call right before
each candidate call (paired_ref). CUDA times come from torch.cuda.Event pairs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the scripts run as `python bench/x.py`: make mor.py, llama.py importable
    sys.path.insert(0, ROOT)


PRESETS = {
    # LLaMA-2-7B's params.json (vocab 32000 as its tokenizer)
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    # the CPU default: two LLaMA-2-7B layers (the adapters' cost relative to the base depends on the layer
    # widths, so keep 7B's), and a vocabulary cut to 8192 so the output head does not dominate two layers
    "7b-2l": dict(dim=4096, n_layers=2, n_heads=32, vocab_size=8192, multiple_of=256),
    # ~135M non-embedding parameters, dim 1024: the adapters cost relatively more at this width
    "small": dict(dim=1024, n_layers=8, n_heads=16, vocab_size=32000, multiple_of=256),
    # seconds on any CPU: for checking that the scripts run (tests/test_bench.py), not for measuring
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32),
}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--preset and --n_layers: which random-weight LLaMA a whole-model script builds (see model_config)."""
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: 7b on CUDA, 7b-2l on CPU")
    ap.add_argument("--n_layers", type=int, default=None, help="override the preset's layer count (printed)")


def model_config(args: argparse.Namespace, cuda: bool) -> tuple[str, dict]:
    """(preset name, its config with --n_layers applied): 7b on CUDA, 7b-2l on CPU unless --preset says."""
    preset = args.preset or ("7b" if cuda else "7b-2l")
    cfg = dict(PRESETS[preset])
    if args.n_layers:
        cfg["n_layers"] = args.n_layers
    return preset, cfg


def random_base(params, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A frozen llama.Transformer(params) with random weights: built on meta, materialised directly in
    `dtype` (no fp32 copy of a 7B model), matrices N(0, 0.02), norms 1. Training mode."""
    from llama import Transformer
    with torch.device("meta"):
        model = Transformer(params)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.requires_grad_(False).train()


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda if available")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared box, OpenMP threads that wait at barriers for a "
                         "preempted peer add ~10 ms to every parallel op, swamping the small adapter ops; "
                         "0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)


def setup_device(args: argparse.Namespace) -> torch.device:
    # each printed line reaches a pipe or log file at once: a run stopped by a time limit keeps what it printed
    sys.stdout.reconfigure(line_buffering=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        # as train.py's default (--tf32 true); the bf16 GEMMs are unaffected
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(args.device)


def machine(device: torch.device) -> str:
    """One line naming what the numbers were measured on."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        hw = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        hw = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{hw}; torch {torch.__version__}; python {platform.python_version()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call: CUDA events around it on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                paired_ref: str | None = None, progress: bool = True, echo: bool = False) -> dict[str, list[float]]:
    """Per-call seconds of each fn over `repeats` rounds, after `warmup` untimed rounds, round-robin.

    With paired_ref, every other fn runs right after a call of fns[paired_ref] of its own, whose time is
    stored under "<paired_ref>><name>": ratio() divides by it, so slow drift on a shared machine cancels.
    echo: print each timed round's times as it ends (flushed, instead of the progress bar), so a run stopped
    by a time limit keeps the rounds it finished.
    """
    names = list(fns)
    others = [n for n in names if n != paired_ref]
    times = {n: [] for n in names}
    rounds = range(warmup + repeats)
    if progress and not echo:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc="rounds", leave=False, file=sys.stderr)
    for k in rounds:
        order = others[k % len(others):] + others[:k % len(others)] if paired_ref else \
            names[k % len(names):] + names[:k % len(names)]  # rotate: nobody always runs first
        for n in order:
            calls = [(paired_ref, f"{paired_ref}>{n}"), (n, n)] if paired_ref else [(n, n)]
            for fn_name, key in calls:
                sync(device)
                t = time_once(fns[fn_name], device)
                if k >= warmup:
                    times.setdefault(key, []).append(t)
                    if key != fn_name:
                        times[fn_name].append(t)
        if echo and k >= warmup:
            print(f"round {k - warmup + 1}/{repeats}: " + " | ".join(
                f"{n} {times[n][-1] * 1e3:.2f} ms" + (f" ({times[n][-1] / times[f'{paired_ref}>{n}'][-1]:.3f} x "
                                                      f"{paired_ref} before it)" if paired_ref and n != paired_ref
                                                      else "") for n in names), flush=True)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of name's time / ref's time in the same round (its paired call if there is one)."""
    refs = times.get(f"{ref}>{name}", times[ref])
    return statistics.median(a / b for a, b in zip(times[name], refs))


def min_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Fastest call of name / fastest (paired) call of ref: contention on a shared machine only ever adds."""
    return min(times[name]) / min(times.get(f"{ref}>{name}", times[ref]))


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated by tensors during fn(), above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU: the profiler's allocation/free events, replayed in order
    (exact for tensor memory; the Python heap is not counted).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for _, nbytes in sorted(events):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def count_ops(fn: Callable[[], object]) -> int:
    """Dispatcher-level aten ops that fn() runs (forward and backward): each is a kernel launch or more on a
    GPU, so this counts the per-op overhead that dominates small adapters in eager mode."""
    return count_kernels(fn)[0]


# ops that only make a view or an empty tensor: dispatched, but no kernel runs on a GPU
NO_KERNEL = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "slice", "select", "squeeze",
    "unsqueeze", "as_strided", "alias", "detach", "_unsafe_view", "split", "split_with_sizes", "unbind",
    "narrow", "empty", "empty_like", "empty_strided", "new_empty_strided", "new_empty", "resolve_conj", "resolve_neg", "lift_fresh", "to",
    "_to_copy_view", "view_as", "expand_as", "numpy_T", "chunk", "contiguous", "result_type")}


def count_kernels(fn: Callable[[], object]) -> tuple[int, int]:
    """(ops, kernels) that fn() runs, forward and backward: ops = outermost aten ops (see count_ops), kernels =
    the outermost aten ops that compute anything (views, allocations and same-dtype .to() left out): about one
    GPU launch each. Counting the CPU's innermost ops instead would add the CPU's own helpers (a mixed-dtype
    mul converts its input first, a sum fills its output first) that a GPU kernel does in one launch."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def computes(e) -> bool:  # a view-like op computes only if it calls one that does (.to() a new dtype)
        return e.name not in NO_KERNEL or any(computes(c) for c in e.cpu_children if c.name.startswith("aten::"))
    ops = kernels = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:  # outermost
            ops += 1
            kernels += computes(e)
    return ops, kernels


def saved_bytes(forward: Callable[[], object], exclude=()) -> int:
    """Bytes that autograd keeps for the backward while forward() runs (distinct storages), leaving out the
    storages of `exclude` (parameters, the frozen weight, the input: resident anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return tensor_bytes(saved)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among tensors (shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def print_table(header: list[str], rows: list[list], aligns: str | None = None) -> None:
    """Plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
