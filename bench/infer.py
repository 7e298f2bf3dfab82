"""Decoding speed with the KV cache: frozen base, merged LoRA, MoR (eval, cached B̃), MoELoRA.

    python bench/infer.py                          # CUDA: LLaMA-2-7B, bf16; CPU: two 7B layers (7b-2l), fp32
    python bench/infer.py --device cuda --cuda_graph   # also replay each decoding step as a CUDA graph
    python bench/infer.py --device cuda --compile reduce-overhead   # also torch.compile the step (+ CUDA graphs)

Each model first fills the KV cache with a random prompt (model.setup_cache + model(prompt, 0)), then every
round decodes --new_tokens tokens greedily, one forward(token, start_pos) per token, from the same position
(the static cache is simply overwritten), with no host sync inside the loop. Models are timed round-robin
in one process; the ratio is per-token time over merged LoRA's in the same round (median over rounds).
All models share one frozen base. Merged LoRA = LoRALinear.merge() on w1, w2, w3 (its B is the init's
zero, so the shared weights do not change; a merged layer runs only base(x)). MoR and MoELoRA get random
adapter weights. "unmerged LoRA" (eval mode, not merged) shows what any adapter costs when it cannot be
merged, as MoR cannot (G depends on x). MoR is checked first: its decoded logits must equal a full forward without any cache
(KV or B̃). --cuda_graph captures one decoding step per model (static token and position tensors) and
replays it: the GPU time without Python and kernel-launch overhead. --compile MODE times the decoding step
under torch.compile(mode=MODE, fullgraph=True) as well: elementwise work fused into fewer kernels (MoR's
softmax and outer product, B̃, the norms), and with reduce-overhead replayed as CUDA graphs by torch.compile.
Figures are printed as soon as they exist: each model's capture or compilation time, then every timed round,
then each mode's table.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import add_device_args, add_model_args, machine, model_config, print_table, random_base, setup_device, \
    sync, time_once
import mor
from llama import ModelArgs

MODELS = {  # label -> (mor method or None, hyper)
    "frozen base": (None, {}),
    "merged LoRA R8": ("lora", {}),
    "MoR E8R8": ("mor", dict(num_experts=8)),
    "MoELoRA E8R8": ("moelora", dict(num_experts=8)),
    "MoELoRA E2R8": ("moelora", dict(num_experts=2)),
    "unmerged LoRA R8": ("lora", {}),
}


def make_model(base, method, hyper, seed: int):
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # shares the frozen weights
    if method is not None:
        torch.manual_seed(seed)
        mor.add_adapters(model, method, ("w1", "w2", "w3"), r=8, alpha=32, dropout=0.05, **hyper)
        if method != "lora":  # a "trained" mixture: B != 0 and Ω != 1 so nothing is trivially zero
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 1e-2)
    model.eval().requires_grad_(False)
    return model


def check_mor(model, prompt: torch.Tensor) -> float:
    """Relative max |logits| difference between cached decoding (KV cache, cached B̃) and a full forward
    that recomputes B̃ (gradients on, so MoRLinear skips its eval cache) and uses no KV cache."""
    with torch.no_grad():
        model.setup_cache(prompt.shape[0], prompt.shape[1])
        model(prompt[:, :-1], start_pos=0)
        last = model(prompt[:, -1:], start_pos=prompt.shape[1] - 1)[:, -1].float()
    with torch.enable_grad():
        full = model(prompt)[:, -1].float().detach()
    return ((last - full).abs().max() / full.abs().max()).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    add_device_args(ap)
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--prompt_len", type=int, default=None, help="default: 128 CUDA, 32 CPU")
    ap.add_argument("--new_tokens", type=int, default=None, help="tokens per timed round (default: 32 CUDA, 8 CPU)")
    ap.add_argument("--models", default="frozen base,merged LoRA R8,MoR E8R8,MoELoRA E8R8,unmerged LoRA R8",
                    help=f"comma-separated, from {list(MODELS)}; merged LoRA R8 is the reference")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 2 CUDA, 1 CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7 CUDA, 5 CPU)")
    ap.add_argument("--cuda_graph", action="store_true", help="also time CUDA-graph replays of the decoding step")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="also time the decoding step under torch.compile with this mode")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for --compile (aot_eager: "
                                                          "Dynamo's capture alone, for a quick check)")
    args = ap.parse_args(argv)
    device = setup_device(args)
    cuda = device.type == "cuda"
    if args.cuda_graph and not cuda:
        raise SystemExit("--cuda_graph needs --device cuda")
    preset, cfg = model_config(args, cuda)
    prompt_len = args.prompt_len or (128 if cuda else 32)
    n_new = args.new_tokens or (32 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (7 if cuda else 5)
    labels = [s.strip() for s in args.models.split(",") if s.strip()]
    if bad := [s for s in labels if s not in MODELS]:
        raise SystemExit(f"--models: unknown {bad}; choose from {list(MODELS)}")
    ref = "merged LoRA R8"
    if ref not in labels:
        labels.insert(0, ref)
    dtype = torch.bfloat16 if cuda else torch.float32
    total_len = prompt_len + n_new
    params = ModelArgs(**cfg, max_seq_len=total_len, max_batch_size=args.batch)
    print(f"# bench/infer.py: greedy decoding with the KV cache, preset {preset}: dim {cfg['dim']}, {cfg['n_layers']} "
          f"layers{' (--n_layers override)' if args.n_layers else ''}, vocab {cfg['vocab_size']}, "
          f"{str(dtype).replace('torch.', '')} weights")
    print(f"# {machine(device)}")
    print(f"# batch {args.batch}, prompt {prompt_len}, {n_new} new tokens per round; {warmup} warm-up + {repeats} "
          "timed rounds; adapters r=8 on w1,w2,w3")

    base = random_base(params, device, dtype, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg["vocab_size"], (args.batch, prompt_len), generator=g).to(device)
    models = {}
    for label in labels:
        method, hyper = MODELS[label]
        model = make_model(base, method, hyper, args.seed)
        if label.startswith("merged"):
            for _, layer in mor.adapter_layers(model):
                layer.merge()
        if method == "mor":
            # in bf16 cached decoding and a full forward differ by rounding alone; the frozen base measured the
            # same way says how much, so MoR must stay within a few times that (fp32: 1e-4 outright)
            err = check_mor(model, prompt[:, :16])
            tol = max(3 * check_mor(base, prompt[:, :16]), 1e-2) if cuda else 1e-4
            print(f"# check {label}: cached decoding vs full forward without caches, max relative diff {err:.1e} "
                  f"(tolerance {tol:.1e})")
            if err > tol:
                raise SystemExit(f"{label}: cached decoding differs from the full forward by {err:.1e}: the "
                                 "benchmark would time a wrong computation")
        with torch.no_grad():
            model.setup_cache(args.batch, total_len)
            first = model(prompt, start_pos=0)[:, -1].argmax(-1, keepdim=True)  # prefill (untimed)
        models[label] = (model, first)

    def decoder(model, first):
        @torch.no_grad()
        def run():
            tok = first
            for i in range(n_new):
                tok = model(tok, start_pos=prompt_len + i)[:, -1].argmax(-1, keepdim=True)
            return tok
        return run

    def report(mode: str, times: dict[str, list[float]]) -> None:
        """Print one table as soon as it is measured, so a later mode that fails cannot take it along."""
        rows = []
        for label in times:
            per_tok = statistics.median(times[label]) / n_new
            r = statistics.median(a / b for a, b in zip(times[label], times[ref]))
            rows.append([label, f"{per_tok * 1e3:.2f}", f"{args.batch / per_tok:,.1f}", f"{r:.3f}"])
        print(f"\n{mode}")
        print_table(["model", "ms / token", "tokens/s", "time / merged LoRA"], rows)
        if "MoR E8R8" in times:
            r = statistics.median(a / b for a, b in zip(times["MoR E8R8"], times[ref]))
            print(f"target MoR decode <= 1.10 x merged LoRA ({mode}): {r:.3f} -> {'met' if r <= 1.10 else 'MISSED'}")

    report("eager", time_rounds({label: decoder(*models[label]) for label in labels}, device, warmup, repeats,
                                n_new, "eager"))
    makers = {"cuda graph": graph_decoder} if args.cuda_graph else {}
    if args.compile:
        makers[f"torch.compile, mode {args.compile}, {args.backend}"] = functools.partial(
            compiled_decoder, mode=args.compile, backend=args.backend)
    for mode, make in makers.items():
        fns = {}
        for label in labels:
            try:  # built and run once here: capture or compilation errors are reported, not hidden
                t0 = time.perf_counter()
                fns[label] = make(*models[label], prompt_len, n_new)
                fns[label]()
                sync(device)
                print(f"# {mode}, {label}: built and run once in {time.perf_counter() - t0:.1f} s")
            except Exception as e:
                print(f"# {mode} failed for {label}: {type(e).__name__}: {e}")
                fns.pop(label, None)
        if ref in fns:
            report(mode, time_rounds(fns, device, warmup, repeats, n_new, mode))


def time_rounds(fns: dict, device: torch.device, warmup: int, repeats: int, n_new: int, mode: str
                ) -> dict[str, list[float]]:
    """Seconds per round of each fn, round-robin with a rotating order (see bench/common.py); each timed
    round's per-token times are printed as it ends."""
    names, times = list(fns), {n: [] for n in fns}
    for k in range(warmup + repeats):
        for n in names[k % len(names):] + names[:k % len(names)]:
            sync(device)
            t = time_once(fns[n], device)
            if k >= warmup:
                times[n].append(t)
        if k >= warmup:
            print(f"{mode}, round {k - warmup + 1}/{repeats}: "
                  + " | ".join(f"{n} {times[n][-1] / n_new * 1e3:.2f} ms/token" for n in names))
    return times


def decode_state(model) -> tuple:
    """Per MoRLinear, the eval cache's generation (bumped by each rebuild, train(), eval(), .to()) and whether
    its parameters are unchanged. A CUDA graph captured over the cache replays it by address: replay it only
    while this equals its value right after the capture."""
    return tuple((m.generation, m._cache is not None and m._cache[0] == mor.weights_key(m, m._cache[0][0]))
                 for _, m in mor.adapter_layers(model) if isinstance(m, mor.MoRLinear))


def graph_decoder(model, first: torch.Tensor, prompt_len: int, n_new: int):
    """One decoding step (forward, argmax, advance the position) captured as a CUDA graph; returns a
    function replaying it n_new times from the prompt's end. Token and position live in static tensors."""
    tok = first.clone()
    pos = torch.tensor(prompt_len, device=first.device)

    @torch.no_grad()
    def one_step():
        nxt = model(tok, start_pos=pos)[:, -1].argmax(-1, keepdim=True)
        tok.copy_(nxt)
        pos.add_(1)

    def capture():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's docs require
            for _ in range(min(3, n_new)):  # each step writes one KV-cache position: stay within prompt + n_new
                one_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_step()
        return graph, decode_state(model)
    captured = [capture()]

    def run():
        # the graph reads MoR's cached B̃ by address: after train(), eval(), .to() or a weight update that memory
        # is freed or stale, so capture again rather than replay (decode_state)
        if decode_state(model) != captured[0][1]:
            captured[0] = capture()
        tok.copy_(first)
        pos.fill_(prompt_len)
        for _ in range(n_new):
            captured[0][0].replay()
    return run


def compiled_decoder(model, first: torch.Tensor, prompt_len: int, n_new: int, mode: str, backend: str = "inductor"):
    """The decoding step under torch.compile(mode=mode, fullgraph=True); the position is a tensor, so one
    compiled graph (and, with CUDA graphs, one recorded graph) serves every step. The first call compiles:
    the warm-up rounds absorb it. Inductor's freezing treats the (frozen, inference-only) weights as constants
    and folds work that depends on weights alone into them once: MoR's B̃ and [A; W_r] in the compute dtype,
    which the eager path caches for the same reason (without it the compiled step rebuilds them every token)."""
    import torch._inductor.config
    torch._inductor.config.freezing = True  # process-wide; this script only ever runs inference
    step = torch.compile(lambda tok, pos: model(tok, start_pos=pos)[:, -1].argmax(-1, keepdim=True),
                         mode=mode, fullgraph=True, backend=backend)

    @torch.no_grad()
    def run():
        tok, pos = first, torch.tensor(prompt_len, device=first.device)
        for _ in range(n_new):
            # clone: with CUDA graphs a call's output lives in the graph's memory, which the next call reuses
            tok = step(tok, pos).clone()
            pos = pos + 1  # a fresh tensor: the step's input is never written while a graph may still read it
        return tok
    return run


if __name__ == "__main__":
    main()
