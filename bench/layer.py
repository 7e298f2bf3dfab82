"""Forward+backward time and peak memory of ONE adapted linear at LLaMA-2-7B FFN shapes, vs the frozen base.

    python bench/layer.py                      # CUDA if present (bf16 base, fp32 adapters, autocast), else CPU fp32
    python bench/layer.py --device cpu --seq_len 128 --repeats 5

Shapes: 4096->11008 (w1, w3) and 11008->4096 (w2); tokens = batch x seq_len. The input x requires grad, as
inside a model: the frozen base still runs its input-gradient GEMM in the backward (but no weight gradient).
Every row is timed in the same process, round-robin, each call right after a call of the frozen base
(see bench/common.py); "time / base" is the median over rounds of (row / that base call), for the sum of
both shapes; "(min / min)" the fastest row call over the fastest base call (contention only adds time). Adapter dropout is on
(--dropout, the paper's 0.05) as in training. "MoR E8R8 naive" is `MoRLinear.reference`, eqs. 10-12 as
a loop over the 8 experts (each computes its own D_i x and is weighted by G_i): the definition that the
tied rank-N*r fast path of mor.py replaces. Before timing, its output and gradients are checked against
mor.MoRLinear's on the timed (training, dropout) path.
Peak memory: tensors allocated during forward+backward, plus the resident frozen weight, adapter
parameters and input (CUDA: max_memory_allocated; CPU: profiler allocation events).
ops: outermost aten ops per forward+backward (each a dispatch on the CPU; most launch a GPU kernel, views do not).
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn as nn

import common  # noqa: F401  (puts the repo root on sys.path)
from common import (add_device_args, count_ops, interleaved, machine, median, min_ratio, peak_bytes, print_table,
                    ratio, setup_device, tensor_bytes)
import mor

SHAPES = [(4096, 11008), (11008, 4096)]  # LLaMA-2-7B: w1/w3 (dim -> hidden) and w2 (hidden -> dim)

# (label, method, hyper); method None: the frozen base alone; "naive": the per-expert loop of eq. 12
ROWS = [
    ("frozen base", None, {}),
    ("LoRA R8", "lora", dict(r=8)),
    ("DoRA R8", "dora", dict(r=8)),
    ("MoSLoRA R8", "moslora", dict(r=8)),
    ("MoELoRA E2R8", "moelora", dict(r=8, num_experts=2)),
    ("MoELoRA E8R8", "moelora", dict(r=8, num_experts=8)),
    ("MoR E1R8", "mor", dict(r=8, num_experts=1)),
    ("MoR E2R8", "mor", dict(r=8, num_experts=2)),
    ("MoR E4R8", "mor", dict(r=8, num_experts=4)),
    ("MoR E8R8", "mor", dict(r=8, num_experts=8)),
    ("MoR E8R8 naive", "naive", dict(r=8, num_experts=8)),
]


def build(method, hyper: dict, base: nn.Linear, dropout: float, gen: torch.Generator):
    """The layer for one row (sharing the frozen base) and its forward function."""
    if method is None:
        return base, base
    layer = mor.METHODS["mor" if method == "naive" else method](base, dropout=dropout, **hyper)
    with torch.no_grad():  # a "trained" adapter: B != 0, Ω != 1 (values do not change the cost)
        for _, p in layer.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 1e-2)
    layer.train()
    if method == "naive":
        return layer, layer.reference
    return layer, layer


def check_naive(layer: mor.MoRLinear, x: torch.Tensor) -> float:
    """The two timed rows must compute the same thing, on the path that is timed: a copy of the layer in fp32,
    in training mode with its dropout (one mask for both: the same seed, and dropout is the first random draw
    of each), forward and backward on 64 tokens. Returns the largest relative difference over the output and
    the gradients of x and of every adapter parameter."""
    ref = copy.deepcopy(layer).float().train()
    xs = x[:64].detach().float().requires_grad_()
    g = torch.randn(xs.shape[0], ref.out_features, generator=torch.Generator().manual_seed(0)).to(xs.device)
    tensors = [xs] + [p for _, p in ref.adapter_parameters()]
    results, tf32 = [], torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 GEMMs: TF32's 10-bit mantissa would swamp 1e-4
    try:
        for fwd in (ref, ref.reference):
            torch.manual_seed(1234)
            out = fwd(xs)
            results.append([out.detach(), *torch.autograd.grad(out, tensors, g)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(*results))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    add_device_args(ap)
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch sizes (tokens = batch x seq_len); default: 1 4 on CUDA, 1 on CPU")
    ap.add_argument("--seq_len", type=int, default=None, help="default: 1024 on CUDA (the paper's max length), "
                                                               "128 on CPU (fp32 GEMMs at 7B shapes are slow there)")
    ap.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (paper: 0.05; 0 = eval-like path)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 10 CUDA, 1 CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 30 CUDA, 5 CPU)")
    ap.add_argument("--rows", default="", help="comma-separated row labels to run (default: all); the frozen "
                                               "base always runs")
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES),
                    help="comma-separated d_in x d_out of the linears timed together (default: LLaMA-2-7B's FFN)")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes: expected e.g. 4096x11008,11008x4096, got {args.shapes!r}")
    device = setup_device(args)
    cuda = device.type == "cuda"
    batches = args.batch or ([1, 4] if cuda else [1])
    seq_len = args.seq_len or (1024 if cuda else 128)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (30 if cuda else 5)
    base_dtype = torch.bfloat16 if cuda else torch.float32
    rows = ROWS
    if args.rows:
        wanted = {s.strip() for s in args.rows.split(",")}
        if bad := wanted - {r[0] for r in ROWS}:
            raise SystemExit(f"--rows: unknown {sorted(bad)}; choose from {[r[0] for r in ROWS]}")
        rows = [r for r in ROWS if r[1] is None or r[0] in wanted]

    def autocast():  # as train.py: bf16 autocast on CUDA, nothing on CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    print(f"# bench/layer.py: one adapted linear, forward+backward, shapes (d_in, d_out) {shapes}"
          f"{' (LLaMA-2-7B FFN)' if shapes == SHAPES else ''}")
    print(f"# {machine(device)}")
    print(f"# base {str(base_dtype).replace('torch.', '')}, adapter params fp32"
          f"{', bf16 autocast' if cuda else ''}; dropout {args.dropout}; {warmup} warm-up + {repeats} timed rounds")
    if not cuda and seq_len < 1024:
        print(f"# CPU: seq_len {seq_len} instead of 1024 so the run takes minutes, not hours (--seq_len to change)")
    gen = torch.Generator().manual_seed(args.seed)
    for batch in batches:
        tokens = batch * seq_len
        times = {}      # shape -> {label (or "frozen base>label"): list of seconds}
        peaks = {}      # label -> summed peak bytes over the shapes
        ops = {}        # label -> ops per forward+backward, summed over the shapes
        for d_in, d_out in shapes:
            base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=base_dtype).requires_grad_(False)
            x = torch.randn(tokens, d_in, device=device, dtype=base_dtype, requires_grad=True)
            g = torch.randn(tokens, d_out, device=device, dtype=base_dtype)
            fns, layers = {}, {}
            for label, method, hyper in rows:
                layer, fwd = build(method, hyper, base, args.dropout, gen)
                layers[label] = layer
                params = [p for p in layer.parameters() if p.requires_grad]

                def step(fwd=fwd, params=params):
                    with autocast():
                        out = fwd(x)
                    out.backward(g)
                    x.grad = None
                    for p in params:
                        p.grad = None
                fns[label] = step
            for label, method, _ in rows:
                if method == "naive":
                    err = check_naive(layers[label], x)
                    tol = 1e-4
                    if err > tol:
                        raise SystemExit(f"naive loop and mor.MoRLinear differ by {err:.2e} (relative) at "
                                         f"{d_in}->{d_out}: the benchmark would compare different computations")
                    print(f"# check {d_in}->{d_out}: naive eq. 12 loop vs mor.MoRLinear (training path, "
                          f"output and gradients), max relative diff {err:.1e}")
            print(f"# {d_in}->{d_out}, batch {batch}:")   # then each round's times as it ends
            times[(d_in, d_out)] = interleaved(fns, device, warmup, repeats, paired_ref="frozen base", echo=True)
            for label, fn in fns.items():  # memory and op counts after warm-up: one more pass each
                resident = tensor_bytes(list(layers[label].parameters()) + [x])
                peaks[label] = peaks.get(label, 0) + resident + peak_bytes(fn, device)
                ops[label] = ops.get(label, 0) + count_ops(fn)
            del base, x, g, fns, layers
            if cuda:
                torch.cuda.empty_cache()
        # ratios of the summed (both shapes) per-round times; each row against the base call right before it
        total = {k: [sum(ts) for ts in zip(*(times[s][k] for s in shapes))] for k in times[shapes[0]]}
        ref = "frozen base"
        table = []
        for label, _, _ in rows:
            table.append([label] + [f"{median(times[s][label]) * 1e3:.2f}" for s in shapes]
                         + [f"{ratio(total, label, ref):.3f}", f"{min_ratio(total, label, ref):.3f}",
                            f"{peaks[label] / 2**20:.0f}", f"{peaks[label] / peaks[ref]:.3f}", ops[label]])
        print(f"\nbatch {batch} x seq_len {seq_len} = {tokens} tokens")
        print_table(["method"] + [f"ms {a}->{b}" for a, b in shapes]
                    + ["time / base", "(min / min)", "peak MiB", "mem / base", "ops"], table)
        if "MoR E8R8" in total:
            r = ratio(total, "MoR E8R8", ref)
            print(f"target MoR E8R8 fwd+bwd <= 1.10 x frozen base: {r:.3f} -> {'met' if r <= 1.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
