"""Log-likelihood scoring three ways on the benchmarks' multiple-choice requests: times, token positions, agreement.

    OMP_NUM_THREADS=1 python bench/prefix.py --ckpt_dir ../shared/models/stories260K \
        --data_dir ../shared/benchmarks --max_seq_len 512 --tasks piqa,arc_easy,mmlu --limit 200

Per task (one evaluate.loglikelihood call per task, as evaluate_tasks makes): a plain loop of one forward per
choice (batch 1), batched plain forwards (the harness's way, share_prefix=False), and evaluate.py's planned
scoring (plan_scoring: one row for one-token choices, a shared prefix where it saves tokens, plain rows
otherwise). Also counts the token positions fed to the model (padding included): the compute that dominates
for large models, where the linear layers outweigh attention and per-call overhead. The three ways are run
round-robin for --repeats rounds (the order rotated each round) and the median time is shown; the
log-likelihoods of the planned way must equal the one-forward loop's (max difference printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
import evaluate as ev
import llama

WAYS = ("one_forward_per_choice", "batched_plain", "planned")


def measure(model, tokenizer, requests: list, batch_size: int, repeats: int) -> dict:
    """{way: (median seconds, positions fed, results)} for one task's requests."""
    fed = [0]
    hook = model.register_forward_pre_hook(lambda m, args: fed.__setitem__(0, fed[0] + args[0].numel()))
    setting = dict(one_forward_per_choice=(1, False), batched_plain=(batch_size, False), planned=(batch_size, True))
    times, got = {w: [] for w in WAYS}, {}
    try:
        ev.loglikelihood(model, tokenizer, requests[:batch_size], batch_size)   # warm-up
        for k in range(repeats):
            for w in WAYS[k % 3:] + WAYS[:k % 3]:
                fed[0], t0 = 0, time.perf_counter()
                got[w] = ev.loglikelihood(model, tokenizer, requests, setting[w][0], share_prefix=setting[w][1])
                times[w].append(time.perf_counter() - t0)
                got[w] = (got[w], fed[0])
    finally:
        hook.remove()
    return {w: (statistics.median(times[w]), got[w][1], got[w][0]) for w in WAYS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    model = llama.Transformer.from_checkpoint(args.ckpt_dir, max_seq_len=args.max_seq_len,
                                              max_batch_size=args.batch_size)
    tokenizer = llama.load_tokenizer(args.ckpt_dir, model.params.vocab_size)
    print(f"# bench/prefix.py: {args.ckpt_dir}, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
          f"median of {args.repeats} round(s)")
    print(f"{'task':14s} {'requests':>8s} " + " ".join(f"{w + ' s (tokens)':>32s}" for w in WAYS) +
          "  speedup vs loop / vs batched (tokens)")
    total, diff = {w: [0.0, 0] for w in WAYS}, 0.0
    for task in ev.resolve_tasks(args.tasks):
        if task in ("nq_open", "lambada") or not os.path.isdir(os.path.join(args.data_dir, task)):
            continue
        requests = [r for item in ev.load_task(task, args.data_dir, args.limit)[0] for r in ev.choice_requests(item)]
        res = measure(model, tokenizer, requests, args.batch_size, args.repeats)
        diff = max([diff] + [abs(a[0] - b[0]) for a, b in zip(res["one_forward_per_choice"][2], res["planned"][2])])
        for w in WAYS:
            total[w][0] += res[w][0]
            total[w][1] += res[w][1]
        row(task, len(requests), {w: res[w][:2] for w in WAYS})
    row("total", None, total)
    print(f"max |log-likelihood difference| planned vs one forward per choice: {diff:.1e}")


def row(task: str, n: int | None, r: dict) -> None:
    (t1, _), (t2, k2), (t3, k3) = (r[w] for w in WAYS)
    print(f"{task:14s} {n if n is not None else '':>8} " + " ".join(f"{r[w][0]:>20.2f} ({r[w][1]:>9d})" for w in WAYS)
          + f"  x{t1 / t3:.2f} / x{t2 / t3:.2f} (x{k2 / k3:.2f})")


if __name__ == "__main__":
    main()
