"""Where the time of one adapted linear goes: torch.profiler over forward+backward, LoRA R8 vs MoR E8R8.

    python bench/profile_layer.py                      # CUDA if present: bf16 base, fp32 adapters, autocast
    python bench/profile_layer.py --tokens 4096 --rows 20

Prints, per method, the wall time of one fwd+bwd, the summed GPU kernel time (the device's own work), and
the top ops by self device time. Wall well above kernel time means the layer is launch-bound (too many
small ops for the GPU to be kept busy); kernel time well above the base's means real extra work.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from common import add_device_args, setup_device, time_once, median
import mor


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--d_in", type=int, default=4096)
    ap.add_argument("--d_out", type=int, default=11008)
    ap.add_argument("--rows", type=int, default=12, help="top ops shown per method")
    ap.add_argument("--dropout", type=float, default=0.05)
    args = ap.parse_args(argv)
    device = setup_device(args)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.d_out, device=device, dtype=dtype)
    layers = {"frozen base": None, "LoRA R8": ("lora", {}), "MoR E8R8": ("mor", dict(num_experts=8))}
    for label, spec in layers.items():
        torch.manual_seed(0)
        base = nn.Linear(args.d_in, args.d_out, bias=False).to(device, dtype).requires_grad_(False)
        layer = base
        if spec is not None:
            method, hyper = spec
            layer = mor.METHODS[method](base, r=8, alpha=32, dropout=args.dropout, **hyper).train()

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
