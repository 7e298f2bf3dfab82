"""Time and peak resident memory of llama.Transformer.from_checkpoint on a synthetic Meta-layout checkpoint.

    python bench/load.py --device cpu             # 1 GB bf16 checkpoint, loaded as bf16 into host memory
    python bench/load.py --size_gb 4 --n_shards 2 --device cuda

Writes params.json + consolidated.NN.pth (random bf16 weights, Meta's key names and model-parallel
split, vocab_size -1 as in LLaMA-2's params.json) of about --size_gb, then loads it in a fresh
subprocess that first imports torch and llama (and starts CUDA when loading to a GPU) and records its
resident memory: the baseline. The memory of the load and the first forward is reported above that
baseline, as a ratio to the checkpoint's bytes on disk:
  peak RSS     VmHWM (the kernel's exact high-water mark of resident memory) - baseline VmRSS. Includes the
               checkpoint's file pages while they are memory-mapped (clean page cache the kernel can drop
               and re-read under pressure, but resident all the same).
  peak anon    max RssAnon - baseline RssAnon, sampled every millisecond from /proc/self/status: the
               memory the process itself allocated (the loaded weights, temporaries).
  peak file    max RssFile - baseline RssFile, sampled likewise: mapped file pages (the checkpoint).
The time is the from_checkpoint call, then the call plus one forward of 8 tokens: a CPU load in the stored
dtype leaves the weights in the mapped file, and that forward is where they are first read.
Linux only (/proc). The checkpoint lies in the page cache when it is read (it was just written).
--repeats N loads it N times, each in a fresh process, and reports the median load (time and memory).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import ROOT, print_table

ROW_PARALLEL = ("wo", "w2")  # Meta's RowParallelLinear: split along the input dim; the rest along dim 0


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def config_for(size_bytes: float, elem: int) -> dict:
    """A LLaMA params.json whose weights take about size_bytes: dim 4096 layers (7B's) from 4 GB up,
    dim 2048 from 0.5 GB, dim 256 below (checks that the script runs), as many layers as fit (at least one)."""
    dim = 4096 if size_bytes >= 4e9 else 2048 if size_bytes >= 0.5e9 else 256
    vocab, hidden = 32000, 256 * ((int(8 * dim / 3) + 255) // 256)
    per_layer = (4 * dim * dim + 3 * dim * hidden + 2 * dim) * elem
    fixed = (2 * vocab * dim + dim) * elem
    n_layers = max(1, round((size_bytes - fixed) / per_layer))
    return dict(dim=dim, n_layers=n_layers, n_heads=dim // 128, multiple_of=256, norm_eps=1e-5, vocab_size=-1), vocab


def write_checkpoint(ckpt_dir: str, params: dict, vocab: int, n_shards: int, dtype) -> int:
    """Meta's layout: params.json + consolidated.NN.pth, matrices split over n_shards as Meta's model-parallel
    ranks do. Returns the bytes of the weight files."""
    from llama import ModelArgs, Transformer
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**{**params, "vocab_size": vocab})).state_dict().items()}
    shards = [dict() for _ in range(n_shards)]
    for k, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype).uniform_(-0.02, 0.02) if len(shape) == 2 else torch.ones(shape, dtype=dtype)
        name = k.split(".")[-2]
        if t.dim() == 1:
            parts = [t] * n_shards
        elif name == "tok_embeddings":
            parts = t.chunk(n_shards, dim=1)  # LLaMA-2 ParallelEmbedding splits the features
        else:
            parts = t.chunk(n_shards, dim=1 if name in ROW_PARALLEL else 0)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    total = 0
    for i, sd in enumerate(shards):
        path = os.path.join(ckpt_dir, f"consolidated.{i:02d}.pth")
        torch.save(sd, path)
        total += os.path.getsize(path)
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        json.dump(params, f)
    return total


def child(ckpt_dir: str, load_dtype: str, device: str) -> None:
    """Runs in the fresh subprocess: baseline, load with a sampler thread, print one JSON line."""
    from llama import Transformer
    if device == "cuda":
        torch.zeros(1, device="cuda")  # CUDA context (hundreds of MB of host memory) belongs to the baseline
    base = status()
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, v in status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.001)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    model = Transformer.from_checkpoint(ckpt_dir, device=device, dtype=getattr(torch, load_dtype))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # A load that leaves the weights in the mapped file reads them here, on first use: count it (time, memory)
    with torch.no_grad():
        model(torch.arange(1, 9, device=device)[None])
    if device == "cuda":
        torch.cuda.synchronize()
    first_logits = time.perf_counter() - t0
    stop.set()
    th.join()
    end = status()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(base=base, peak=peak, end=end, hwm=end["VmHWM"], seconds=seconds, first_logits=first_logits,
                          model_bytes=model_bytes, model_device=str(next(model.parameters()).device))))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--size_gb", type=float, default=1.0, help="checkpoint size to write, in GB (1e9 bytes)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="dtype stored in the checkpoint (Meta's files are bf16)")
    ap.add_argument("--load_dtype", default=None, help="dtype= for from_checkpoint (default: the stored dtype; "
                                                       "float32 from bf16 files is 2x the bytes by definition)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device= for from_checkpoint (default: cuda if available); the memory measured is the "
                         "host's either way")
    ap.add_argument("--n_shards", type=int, default=1, help="model-parallel shards (consolidated.00.pth, ...)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory, "
                                                "removed afterwards)")
    ap.add_argument("--repeats", type=int, default=1, help="loads, each in a fresh process (warm page cache): "
                                                             "the median time and the median memory are shown")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    load_dtype = args.load_dtype or args.dtype
    if args.child:
        return child(args.child, load_dtype, args.device)
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("bench/load.py reads /proc/self/status: Linux only")
    from common import machine
    dtype = getattr(torch, args.dtype)
    params, vocab = config_for(args.size_gb * 1e9, dtype.itemsize)
    ckpt_dir = args.dir or tempfile.mkdtemp(prefix="bench_load_")
    os.makedirs(ckpt_dir, exist_ok=True)
    try:
        print(f"# bench/load.py: llama.Transformer.from_checkpoint peak memory; "
              f"{machine(torch.device(args.device))}")
        print(f"# writing {args.size_gb:g} GB {args.dtype} checkpoint (dim {params['dim']}, {params['n_layers']} layers, "
              f"vocab {vocab}, {args.n_shards} shard(s)) to {ckpt_dir}", flush=True)
        ckpt_bytes = write_checkpoint(ckpt_dir, params, vocab, args.n_shards, dtype)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", ckpt_dir, "--load_dtype", load_dtype,
               "--device", args.device]
        runs = []
        for _ in range(max(1, args.repeats)):
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                raise SystemExit(f"loading subprocess failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]   # the median load (its memory too)
    finally:
        if args.dir is None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    b, p = r["base"], r["peak"]
    gib = 2**30
    rows = [
        ["checkpoint on disk", f"{ckpt_bytes / gib:.3f}", "1.000"],
        [f"loaded model ({load_dtype}, {r['model_device']})", f"{r['model_bytes'] / gib:.3f}",
         f"{r['model_bytes'] / ckpt_bytes:.3f}"],
        ["baseline RSS (python + torch + llama" + (" + CUDA" if args.device == "cuda" else "") + ")",
         f"{b['VmRSS'] / gib:.3f}", "-"],
        ["peak RSS - baseline (VmHWM)", f"{(r['hwm'] - b['VmRSS']) / gib:.3f}", f"{(r['hwm'] - b['VmRSS']) / ckpt_bytes:.3f}"],
        ["peak anon - baseline (sampled)", f"{(p['RssAnon'] - b['RssAnon']) / gib:.3f}",
         f"{(p['RssAnon'] - b['RssAnon']) / ckpt_bytes:.3f}"],
        ["peak file - baseline (sampled)", f"{(p['RssFile'] - b['RssFile']) / gib:.3f}",
         f"{(p['RssFile'] - b['RssFile']) / ckpt_bytes:.3f}"],
        ["RSS after first forward - baseline", f"{(r['end']['VmRSS'] - b['VmRSS']) / gib:.3f}",
         f"{(r['end']['VmRSS'] - b['VmRSS']) / ckpt_bytes:.3f}"],
    ]
    print()
    print_table(["memory", "GiB", "/ checkpoint"], rows)
    times = ", ".join(f"{x['seconds']:.2f}" for x in runs)
    print(f"load time {r['seconds']:.2f} s (median of {len(runs)} fresh processes: {times})")
    firsts = sorted(x["first_logits"] for x in runs)
    print(f"load + first forward (8 tokens) {firsts[len(firsts) // 2]:.2f} s median "
          f"({', '.join(f'{x:.2f}' for x in firsts)})")
    total = (r["hwm"] - b["VmRSS"]) / ckpt_bytes
    anon = (p["RssAnon"] - b["RssAnon"]) / ckpt_bytes
    print(f"target peak resident memory <= 1.2 x checkpoint: total RSS {total:.3f} -> "
          f"{'met' if total <= 1.2 else 'MISSED'}; anonymous {anon:.3f} -> {'met' if anon <= 1.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
