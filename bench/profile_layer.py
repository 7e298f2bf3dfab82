"""Where the time of one adapted linear goes: torch.profiler over forward+backward, LoRA R8 vs MoR E8R8.

    python bench/profile_layer.py                      # CUDA if present: bf16 base, fp32 adapters, autocast
    python bench/profile_layer.py --tokens 4096 --rows 20
    python bench/profile_layer.py --counts_only        # ops / kernels / saved bytes / tiny-shape time, no profile
    python bench/profile_layer.py --compiled           # one compiled block: captures, graph breaks, kernels

Default: per method, the wall time of one fwd+bwd, the summed kernel time (the device's own work), and the
top ops by self device time. Wall well above kernel time means the layer is launch-bound (too many small ops
for the GPU to be kept busy); kernel time well above the base's means real extra work.
--counts_only: per fwd+bwd of two FFN linears (d_in -> d_out, then back), under bf16 autocast (the GPU's
dtypes, also on the CPU), the dispatched ops, the kernels
(outermost ops that compute, about one GPU launch each; bench/common.py count_kernels), the activations kept
for the backward, and the median time at the given (small) shape, where per-op dispatch dominates.
--compiled: the two linears and a ReLU as one torch.compile'd block (inductor), trained for --steps steps
with router recording off and on: how many graphs were captured (1 = no recompile), graph breaks, and the
compiled kernels and extern GEMM calls one fwd+bwd runs.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from common import add_device_args, count_kernels, print_table, saved_bytes, setup_device, time_once, median
import mor

METHODS = {"frozen base": None, "LoRA R8": ("lora", {}), "MoR E8R8": ("mor", dict(num_experts=8)),
           "MoELoRA E8R8": ("moelora", dict(num_experts=8))}


def make(spec, d_in: int, d_out: int, dropout: float, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(device, dtype).requires_grad_(False)
    if spec is None:
        return base
    method, hyper = spec
    return mor.METHODS[method](base, r=8, alpha=32, dropout=dropout, **hyper).train()


def two_linears(spec, args, device, dtype) -> nn.Sequential:
    return nn.Sequential(make(spec, args.d_in, args.d_out, args.dropout, device, dtype), nn.ReLU(),
                         make(spec, args.d_out, args.d_in, args.dropout, device, dtype))


def counts(args, device) -> None:
    # train.py's dtypes on a GPU, on any device: frozen base and activations bf16, trainable fp32 (its
    # cast_for_training), bf16 autocast; --fp32_base: fp32 weights and input (the table before this option)
    dtype = torch.float32 if args.fp32_base else torch.bfloat16
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype)
    rows, times = [], {}
    for label, spec in METHODS.items():
        block = two_linears(spec, args, device, dtype)
        for p in block.parameters():
            p.data = p.data.float() if p.requires_grad else p.data

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):  # the GPU's dtypes, also on the CPU
                y = block(x)
            y.backward(g)
            for t in [x, *block.parameters()]:  # as zero_grad(set_to_none=True): no accumulation counted
                t.grad = None
        for _ in range(3):
            step()
        ops, kernels = count_kernels(step)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            kept = saved_bytes(lambda: block(x), exclude=[x, *block.parameters()])
        times[label] = median([time_once(step, device) for _ in range(args.repeats)])
        rows.append([label, ops, kernels, f"{kept / 2**20:.2f}", f"{1e3 * times[label]:.3f}"])
    for r in rows:
        r.append(f"{times[r[0]] / times['LoRA R8']:.2f}")
    print(f"two linears {args.d_in}->{args.d_out}->{args.d_in}, {args.tokens} tokens, {str(dtype)[6:]} base and "
          f"input, fp32 adapters, bf16 autocast, dropout {args.dropout}, fwd+bwd")
    print_table(["method", "ops", "kernels", "saved MiB", "ms", "time / LoRA"], rows)
    k = {r[0]: r[2] for r in rows}
    ratio = k["MoR E8R8"] / k["LoRA R8"]
    print(f"target MoR E8R8 kernels <= 1.5 x LoRA R8's: {k['MoR E8R8']} / {k['LoRA R8']} = {ratio:.2f} -> "
          f"{'met' if ratio <= 1.5 else 'MISSED'}")


def compiled(args, device, dtype) -> None:
    import torch._dynamo
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True  # CPU: name each C++ kernel in the profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for label, spec in list(METHODS.items())[1:3]:
        for record in (False, True):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            block = two_linears(spec, args, device, dtype)
            for m in block.modules():
                if hasattr(m, "record_router"):
                    m.record_router = record
            frames = []

            def backend(gm, example_inputs):  # counts captures, then compiles as inductor does
                frames.append(gm)
                if args.backend == "eager":   # --backend eager: Dynamo's capture alone, run as captured
                    return gm.forward
                from torch._inductor.compile_fx import compile_fx
                return compile_fx(gm, example_inputs)
            fn = torch.compile(block, backend=backend, dynamic=False)
            x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)

            def step():
                fn(x).sum().backward()
            for _ in range(args.steps):
                step()
            with profile(activities=acts) as prof:
                step()
            names = [e.name for e in prof.events()]
            fused = sum("cpp_fused" in n or n.startswith("triton_") for n in names)
            gemms = sum(n in ("aten::mm", "aten::addmm", "aten::bmm") for n in names)
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
            rows.append([label, "on" if record else "off", len(frames), breaks, fused, gemms])
            print(f"{label}, recording {rows[-1][1]}: {len(frames)} graph(s), {breaks} graph break(s), {fused} fused "
                  f"kernels, {gemms} GEMMs")   # as measured: a run stopped by a time limit keeps it
    print(f"\ncompiled block ({args.backend}), two linears {args.d_in}->{args.d_out}->{args.d_in}, {args.tokens} tokens, "
          f"{args.steps} training steps")
    print_table(["method", "recording", "graphs", "graph breaks", "fused kernels", "GEMMs"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap)
    ap.add_argument("--tokens", type=int, default=None, help="default: 1024 (profile), 64 (counts, compiled)")
    ap.add_argument("--d_in", type=int, default=None, help="default: 4096 (profile), 64 (counts, compiled)")
    ap.add_argument("--d_out", type=int, default=None, help="default: 11008 (profile), 192 (counts, compiled)")
    ap.add_argument("--rows", type=int, default=12, help="top ops shown per method")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=200, help="--counts_only: timed calls per method")
    ap.add_argument("--steps", type=int, default=5, help="--compiled: training steps before the profile")
    ap.add_argument("--counts_only", action="store_true")
    ap.add_argument("--fp32_base", action="store_true", help="--counts_only: fp32 base weights and input")
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--backend", choices=["inductor", "eager"], default="inductor",
                    help="--compiled: eager runs the captured graphs as they are (a quick check of the capture)")
    args = ap.parse_args(argv)
    small = args.counts_only or args.compiled
    args.tokens = args.tokens or (64 if small else 1024)
    args.d_in = args.d_in or (64 if small else 4096)
    args.d_out = args.d_out or (192 if small else 11008)
    device = setup_device(args)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.counts_only:
        return counts(args, device)
    if args.compiled:
        return compiled(args, device, dtype)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.d_out, device=device, dtype=dtype)
    for label, spec in list(METHODS.items())[:3]:
        layer = make(spec, args.d_in, args.d_out, args.dropout, device, dtype)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                y = layer(x)
            y.backward(g)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        for _ in range(5):
            step()
        wall = median([time_once(step, device) for _ in range(20)])
        with profile(activities=[activity]) as prof:
            for _ in range(10):
                step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        kernel_us = sum(getattr(e, key) for e in events) / 10
        print(f"\n== {label}: wall {1e3 * wall:.3f} ms per fwd+bwd, {'GPU kernels' if cuda else 'CPU self'} "
              f"{kernel_us / 1e3:.3f} ms, tokens {args.tokens}, {args.d_in}->{args.d_out}, {str(dtype)[6:]}")
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
