"""The command line of evaluate.py (`python evaluate.py --ckpt_dir ... --data_dir ...`, see
docs/evaluation.md): its flags and their checks, the model and adapter it loads, the printed table
and router chart, and the JSON written to --out. evaluate.py holds the scoring it calls."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import evaluate
import llama
from tools import checks
from tools.chat import apply_adapter
from tools.dist import setup_distributed


def format_router_chart(results: dict, width: int = 30) -> str:
    """Text bar chart of the mean router weight per expert and task (over the block's layers)."""
    lines = []
    for task, r in results.items():
        if "router" not in r:
            continue
        per_layer = list(r["router"].values())
        mean = [sum(col) / len(per_layer) for col in zip(*per_layer)]
        lines.append(f"{task} ({', '.join(r['router'])}):")
        top = max(mean) or 1.0
        lines += [f"  expert {i:2d} {w:.3f} {'#' * round(width * w / top)}"
                  for i, w in enumerate(mean)]
    return "\n".join(lines)


def check_out_path(path: str) -> None:
    """--out can be written: a file name, not a folder, where this user may create it."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: --out is a folder; give a file name, "
                         f"e.g. {os.path.join(path, 'results.json')}")
    checks.check_writable(path, "--out", os.path.dirname(path) or ".")


def main(argv: list[str] | None = None) -> None:
    try:   # bad input (files, rows, labels, checkpoints): one line naming the file and the problem
        run(argv)
    except (ValueError, FileNotFoundError) as e:   # CheckpointError is a ValueError
        sys.exit(f"error: {e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Zero-shot evaluation on the paper's benchmarks (lm-eval-harness style).")
    ap.add_argument("--ckpt_dir", required=True,
                    help="base model in Meta's layout (params.json, consolidated.NN.pth)")
    ap.add_argument("--adapter", help="train.py's adapter.pth, or its run folder (out_dir)")
    ap.add_argument("--tokenizer", help="default: tokenizer.model in ckpt_dir, else in its parent")
    ap.add_argument("--data_dir", required=True, help="one folder per task (see README)")
    ap.add_argument("--tasks", default="all",
                    help="all, or a comma list: " + ",".join(evaluate.TASKS))
    ap.add_argument("--limit", type=int, help="first N items per task (per subject for MMLU)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=2048,
                    help="the model's context (stories260K: 512)")
    ap.add_argument("--skip_bad", action="store_true",
                    help="skip and count malformed rows instead of stopping")
    ap.add_argument("--out", default="out/results.json",
                    help="JSON with every metric, counts and times")
    ap.add_argument("--router_stats", action="store_true",
                    help="mean router weight per expert and task (Fig. 7)")
    ap.add_argument("--router_layer", type=int, default=-1,
                    help="transformer block for --router_stats")
    return ap.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    checks.check_ranges(vars(args), checks.EVALUATE)
    check_out_path(args.out)   # before any scoring: a bad --out must not cost the results
    _, _, device = setup_distributed(cuda=torch.cuda.is_available())   # under torchrun
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.time()
    model = llama.Transformer.from_checkpoint(args.ckpt_dir, device, dtype,
                                              max_seq_len=args.max_seq_len,
                                              max_batch_size=args.batch_size)
    if args.adapter:   # a file or train.py's run folder, checked against this base
        apply_adapter(model, args.adapter)
    model.eval()
    n = model.params.n_layers   # a block index, Python-style negatives included
    checks.check_ranges(vars(args), {"router_layer": f"[{-n}, {n - 1}]"})
    tokenizer = llama.load_tokenizer(args.ckpt_dir, model.params.vocab_size, args.tokenizer)
    results = evaluate.evaluate_tasks(model, tokenizer, args.tasks, args.data_dir, args.limit,
                                      args.batch_size, args.skip_bad,
                                      args.router_layer if args.router_stats else None)
    wall = time.time() - t0
    if evaluate.is_main():
        report(args, results, str(device), str(dtype), wall)
    if dist.is_initialized():
        dist.destroy_process_group()


def report(args: argparse.Namespace, results: dict, device: str, dtype: str, wall: float) -> None:
    """The table (and router chart) on stdout, skipped tasks on stderr, all numbers in --out."""
    for task, r in results.items():
        if "absent" in r and "n" in r:   # read, nothing to score: said here, not in table and Avg.
            print(f"[{task}] not scored: {r['absent']}", file=sys.stderr)
        if r.get("skipped_bad_rows"):
            print(f"[{task}] skipped {r['skipped_bad_rows']} malformed rows (--skip_bad)",
                  file=sys.stderr)
    print(evaluate.format_table(results))
    if args.router_stats:
        print(f"mean router weight per expert, block {args.router_layer} (paper Fig. 7):")
        print(format_router_chart(results))
    reported = {t: r[evaluate.REPORTED[t]] for t, r in results.items() if evaluate.REPORTED[t] in r}
    summary = dict(ckpt_dir=args.ckpt_dir, adapter=args.adapter, limit=args.limit,
                   batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                   world_size=dist.get_world_size() if dist.is_initialized() else 1,
                   device=device, dtype=dtype, wall_time_s=round(wall, 1),
                   router_layer=args.router_layer if args.router_stats else None,
                   reported=reported, tasks=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:   # renamed after: no half-overwritten older file
        json.dump(summary, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"[wrote {args.out}; {wall:.1f} s]", file=sys.stderr)
