"""Whole training steps (forward, backward, clip, AdamW) of a random-weight LLaMA: MoR vs LoRA, MoELoRA, DoRA.

    python bench/step.py                     # CUDA: LLaMA-2-7B, bf16 base; CPU: two 7B layers (preset 7b-2l), fp32
    python bench/step.py --device cuda --preset 7b --n_layers 16 --batch 2
    python bench/step.py --device cuda --compile --methods "MoR E8R8,LoRA R8"
    python bench/step.py --device cuda --compile_mode reduce-overhead --n_layers 8   # compiled + CUDA graphs
    python bench/step.py --device cpu --preset small --seq_len 256

Each method's figures are printed as soon as they exist (flushed): its warm-up steps (the first compiles)
and peak memory right after it is built, then every timed round; the table and targets come last.

The step is train.py's: train.forward_backward (bf16 autocast on CUDA), clip_grad_norm_(1.0), AdamW
(fused on CUDA), zero_grad. Adapters on w1, w2, w3 with the paper's r=8, alpha=32, dropout 0.05. All
methods share one frozen base (its weights are stored once) and are timed round-robin in one process,
each step right after a LoRA step ("time / LoRA": median over rounds of the pair's ratio; "(min / min)":
fastest over fastest).
Peak memory of a method = frozen base + its own trainable parameters and optimizer state + the peak of
tensors allocated during its step (CUDA max_memory_allocated; CPU profiler allocation events): what a
training process of that method alone would hold at its peak (allocator caching aside).
MFU (CUDA) counts the frozen-base FLOPs only, the same for every method:
    FLOPs/token = 4 N + 12 L d T
N = non-embedding parameters of the base (every matmul weight incl. the output head): forward 2N, plus 2N
for the input gradients, which the backward still needs through the frozen base (no weight gradients);
12 L d T = attention scores and values, forward + backward (PaLM's convention: full T x T, causal mask
not halved). Adapter FLOPs are left out, so a method's extra cost shows as lower MFU. Peak: tools.steplog.peak_flops.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import add_device_args, add_model_args, interleaved, machine, median, min_ratio, model_config, \
    peak_bytes, print_table, random_base, ratio, setup_device, sync, tensor_bytes
import mor
from llama import ModelArgs, Transformer

METHODS = {  # label -> (mor method, hyper)
    "MoR E8R8": ("mor", dict(num_experts=8)),
    "LoRA R8": ("lora", {}),
    "MoELoRA E8R8": ("moelora", dict(num_experts=8)),
    "DoRA R8": ("dora", {}),
    "MoELoRA E2R8": ("moelora", dict(num_experts=2)),
    "MoSLoRA R8": ("moslora", {}),
}


def frozen_flops_per_token(model: Transformer, seq_len: int) -> float:
    """4 N + 12 L d T (see the module doc); N excludes the embedding table (a lookup, no matmul)."""
    # adapters add their own 2-D parameters (lora_A, ...): count only the frozen base's
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.dim() == 2 and "tok_embeddings" not in name and not p.requires_grad)
    L, d = model.params.n_layers, model.params.dim
    return 4 * n + 12 * L * d * seq_len


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    add_device_args(ap)
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1: the paper's global batch "
                                                         "8 over 8 GPUs)")
    ap.add_argument("--seq_len", type=int, default=None, help="default: 1024 on CUDA (paper), 128 on CPU")
    ap.add_argument("--methods", default="MoR E8R8,LoRA R8,MoELoRA E8R8,DoRA R8",
                    help=f"comma-separated, from {list(METHODS)}; LoRA R8 is the reference")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per method, run right after it is "
                                                             "built (default: 3 CUDA, 1 CPU; at least 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 10 CUDA, 4 CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every transformer block with train.wrap_blocks, as train.py does on CUDA "
                         "(identical blocks share one compilation: the cost is a block or two per method, not 32)")
    ap.add_argument("--compile_mode", default=None,
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile's mode for --compile (implies it); reduce-overhead and max-autotune also "
                         "replay each compiled block as a CUDA graph, which removes the per-kernel launch cost")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend for --compile (aot_eager: Dynamo's capture without code generation, "
                         "for a quick check)")
    args = ap.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    device = setup_device(args)
    cuda = device.type == "cuda"
    # CUDA graphs (on CUDA only) reuse their output memory each replay: a training loop marks each step's start
    graphs = cuda and args.compile_mode in ("reduce-overhead", "max-autotune")
    import train  # the real training step (forward_backward)
    from tools.steplog import peak_flops   # the peak-FLOPs table MFU uses
    preset, cfg = model_config(args, cuda)
    seq_len = args.seq_len or (1024 if cuda else 128)
    # at least one: the first step compiles and creates the optimizer state, which the peak memory counts
    warmup = max(1, args.warmup if args.warmup is not None else (3 if cuda else 1))
    repeats = args.repeats if args.repeats is not None else (10 if cuda else 4)
    labels = [s.strip() for s in args.methods.split(",") if s.strip()]
    if bad := [s for s in labels if s not in METHODS]:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    if "LoRA R8" not in labels:
        labels.insert(0, "LoRA R8")
    base_dtype = torch.bfloat16 if cuda else torch.float32
    params = ModelArgs(**cfg, max_seq_len=seq_len, max_batch_size=args.batch)

    compiled = f", torch.compile per block (mode {args.compile_mode or 'default'}, {args.backend})" if args.compile \
        else ""
    print(f"# bench/step.py: training step of a random-weight LLaMA, preset {preset}: dim {cfg['dim']}, "
          f"{cfg['n_layers']} layers{' (--n_layers override)' if args.n_layers else ''}, vocab {cfg['vocab_size']}")
    print(f"# {machine(device)}")
    print(f"# base {str(base_dtype).replace('torch.', '')} frozen, adapters fp32 on w1,w2,w3 r=8 alpha=32 dropout "
          f"{args.dropout}{', bf16 autocast' if cuda else ''}{compiled}; "
          f"batch {args.batch} x seq_len {seq_len}; {warmup} warm-up step(s) per method, then {repeats} timed rounds")

    base = random_base(params, device, base_dtype, args.seed)
    base_bytes = tensor_bytes(base.parameters())
    shared = {id(p): p for p in base.parameters()}  # deepcopy memo: every model reuses the frozen weights
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg["vocab_size"], (args.batch, seq_len), generator=g)
    micro = [{"input_ids": tokens, "labels": tokens.clone(), "lengths": torch.full((args.batch,), seq_len)}]
    steps, states, peaks = {}, {}, {}
    for label in sorted(labels, key=lambda s: s != "LoRA R8"):  # the reference first: every ratio needs it
        method, hyper = METHODS[label]
        model = copy.deepcopy(base, memo=dict(shared))
        torch.manual_seed(args.seed)
        mor.add_adapters(model, method, ("w1", "w2", "w3"), r=8, alpha=32, dropout=args.dropout, **hyper)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=cuda)
        if args.compile:
            # exactly train.py's per-block compile
            train.wrap_blocks(model, compile=True, grad_ckpt=False, mode=args.compile_mode, backend=args.backend)

        def step(model=model, trainable=trainable, opt=opt):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            train.forward_backward(model, micro, device, autocast=cuda, raw=model, keep_grads=graphs)
            float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))  # train.py reads the norm: a sync
            opt.step()
            opt.zero_grad(set_to_none=not graphs)  # as train.py (see train.forward_backward)
        steps[label] = step
        states[label] = (model, trainable, opt)
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(device)
        warm_s = time.perf_counter() - t0
        # after warm-up, so gradients and optimizer state exist and count as resident
        own = tensor_bytes(trainable + [p.grad for p in trainable if p.grad is not None]
                           + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)])
        # CUDA graphs replay into their own memory pool, outside the allocator's counters: no peak to report
        peaks[label] = float("nan") if graphs else base_bytes + own + peak_bytes(step, device)
        peak = "no peak memory under CUDA graphs" if graphs else f"peak {peaks[label] / 2**30:.3f} GiB"
        print(f"{label}: {warmup} warm-up step(s) {warm_s:.1f} s (the first{' compiles and' if args.compile else ''}"
              f" creates the optimizer state), {peak}", flush=True)
    times = interleaved(steps, device, 0, repeats, paired_ref="LoRA R8", echo=True)
    rows = []
    flops = frozen_flops_per_token(base, seq_len)
    peak_fl = peak_flops(device) if cuda else 0.0
    ref = "LoRA R8"
    for label in labels:
        t = median(times[label])
        row = [label, f"{sum(p.numel() for p in states[label][1]) / 1e6:.2f}M", f"{t * 1e3:.0f}",
               f"{args.batch * seq_len / t:,.0f}", f"{ratio(times, label, ref):.3f}",
               f"{min_ratio(times, label, ref):.3f}",
               f"{peaks[label] / 2**30:.3f}", f"{peaks[label] / peaks[ref]:.3f}"]
        if peak_fl:
            row.append(f"{args.batch * seq_len * flops / t / peak_fl * 100:.1f}%")
        rows.append(row)
    print()
    print_table(["method", "trainable", "step ms", "tokens/s", "time / LoRA", "(min / min)", "peak GiB", "mem / LoRA"]
                + (["MFU"] if peak_fl else []), rows)
    if peak_fl:
        print(f"MFU = tokens/s x {flops / 1e9:.2f} GFLOP/token (4N + 12LdT, frozen base only) / "
              f"{peak_fl / 1e12:.0f} TFLOP/s peak ({torch.cuda.get_device_name(device)})")
    if "MoR E8R8" in labels:
        r = ratio(times, "MoR E8R8", ref)
        print(f"target MoR E8R8 step <= 1.05 x LoRA R8: {r:.3f} -> {'met' if r <= 1.05 else 'MISSED'}")
        if "MoELoRA E8R8" in labels:
            r = ratio(times, "MoR E8R8", "MoELoRA E8R8")
            print(f"target MoR E8R8 step <= 0.80 x MoELoRA E8R8: {r:.3f} -> {'met' if r <= 0.80 else 'MISSED'}")
        r = peaks["MoR E8R8"] / peaks[ref]
        if graphs:
            print("target MoR E8R8 peak memory <= 1.05 x LoRA R8: not measured under CUDA graphs (their memory pool "
                  "is not in the allocator's counters); run without --compile_mode for it")
        else:
            print(f"target MoR E8R8 peak memory <= 1.05 x LoRA R8: {r:.3f} -> {'met' if r <= 1.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
