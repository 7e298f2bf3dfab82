"""`python mor.py [--params params.json]`: the paper's Table 2 (trainable parameters), counted.

Each method's adapters are added to a stand-in for a LLaMA's adapted part (the FFN's w1/w2/w3 of
every layer, on the meta device: no memory, no weights), the trainable parameters counted with
count_parameters and set beside Table 2's formula evaluated on the same layers. mor.py hands
its command line over to main() here, so that mor.py stays the file one copies alone.
"""
from __future__ import annotations

import argparse
import json
import os

import torch.nn as nn

import mor
from llama import ffn_hidden_dim

LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
             "vocab_size": -1}

# (label, method, hyper, paper's "# Params" for LLaMA-2-7B: Table 1, Table 4's mean pooling)
TABLE = [
    ("LoRA R8", "lora", dict(r=8), "11.6M"),
    ("LoRA R16", "lora", dict(r=16), "23.2M"),
    ("DoRA R8", "dora", dict(r=8), "12.3M"),
    ("DoRA R16", "dora", dict(r=16), "23.9M"),
    ("MoSLoRA R8", "moslora", dict(r=8), "-"),
    ("MoELoRA E2R8", "moelora", dict(r=8, num_experts=2), "24.7M"),
    ("MoR E1R8", "mor", dict(r=8, num_experts=1), "12.9M"),
    ("MoR E2R8", "mor", dict(r=8, num_experts=2), "14.3M"),
    ("MoR E4R8", "mor", dict(r=8, num_experts=4), "17.7M"),
    ("MoR E8R8", "mor", dict(r=8, num_experts=8), "23.2M"),
    ("MoR E8R8 mean", "mor", dict(r=8, num_experts=8, router="mean"), "17.4M"),
]

# Table 2 with d_in, d_out kept apart (the paper's square d×d case: d_in = d_out = d):
# method -> (Table 2's form, the d_in/d_out form, one layer's count (d_in, d_out, r, N, router))
FORMULAS = {
    "lora": ("2dr", "r(d_in+d_out)", lambda i, o, r, N, rt: r * (i + o)),
    "dora": ("2dr + d", "r(d_in+d_out) + d_out", lambda i, o, r, N, rt: r * (i + o) + o),
    "moslora": ("2dr + r^2", "r(d_in+d_out) + r^2", lambda i, o, r, N, rt: r * (i + o) + r * r),
    "moelora": ("2Ndr + Nd", "N r(d_in+d_out) + N d_in",
                lambda i, o, r, N, rt: N * r * (i + o) + N * i),
    "mor": ("2dr + N(2d + r)", "r(d_in+d_out) + N(d_in+d_out+r)",   # "mean": no W_r, no N·d_in
            lambda i, o, r, N, rt: r * (i + o) + N * ((0 if rt == "mean" else i) + o + r)),
}


def ffn_stack(params: dict, device: str = "meta") -> nn.Module:
    """A LLaMA's adapted part: layers[i].feed_forward.w1/w2/w3 as bias-free nn.Linear."""
    dim = params["dim"]
    hidden = ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))

    def ffn():
        return nn.ModuleDict({"w1": nn.Linear(dim, hidden, bias=False, device=device),
                              "w2": nn.Linear(hidden, dim, bias=False, device=device),
                              "w3": nn.Linear(dim, hidden, bias=False, device=device)})
    return nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"feed_forward": ffn()})
                                                  for _ in range(params["n_layers"]))})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on the meta device."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def parameter_table(params: dict, targets=("w1", "w2", "w3")) -> list[dict]:
    """Trainable parameters of each method on the FFN stand-in, next to Table 2's formula."""
    rows = []
    for label, method, hyper, paper in TABLE:
        model = ffn_stack(params)
        mor.add_adapters(model, method, targets, **hyper)
        cfg = model.adapter_config
        formula = sum(FORMULAS[method][2](m.in_features, m.out_features, cfg["r"],
                                          cfg.get("num_experts", 1), cfg.get("router"))
                      for _, m in mor.adapter_layers(model))
        table2, general = FORMULAS[method][:2]
        if cfg.get("router") == "mean":  # no router W_r: the N·d_in term drops out
            table2, general = "2dr + N(d + r)", "r(d_in+d_out) + N(d_out+r)"
        rows.append(dict(label=label, method=method, trainable=count_parameters(model)[0],
                         formula=formula, table2=table2, general=general, paper=paper))
    return rows


def read_params(path: str) -> dict:
    """A params.json with at least dim and n_layers; a fault is one SystemExit line naming it."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --params: no such file {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            params = json.load(f)
    except (ValueError, OSError) as e:   # not JSON, not UTF-8, unreadable
        raise SystemExit(f"error: {path}: not a params.json ({e})") from None
    for k in ("dim", "n_layers"):
        if not isinstance(params, dict) or not isinstance(params.get(k), int) or params[k] < 1:
            raise SystemExit(f"error: {path}: needs a positive integer {k!r}")
    return params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Trainable parameters per adapter method (paper Table "
                                 "2), counted on the meta device for LLaMA FFN layers w1/w2/w3.")
    ap.add_argument("--params", default=None,
                    help="Meta params.json (default: LLaMA-2-7B's values)")
    ap.add_argument("--targets", default="w1,w2,w3",
                    help="comma-separated nn.Linear names to adapt")
    args = ap.parse_args(argv)
    params = dict(LLAMA2_7B) if args.params is None else read_params(args.params)
    mult, ffn_mult = params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
    is_7b = (params["dim"], params["n_layers"], mult, ffn_mult) == (4096, 32, 256, None)
    hidden = ffn_hidden_dim(params["dim"], mult, ffn_mult)
    try:
        rows = parameter_table(params, tuple(args.targets.split(",")))
    except ValueError as e:   # a target that names no nn.Linear of the FFN stand-in
        raise SystemExit(f"error: --targets {args.targets}: {e}") from None
    print(f"dim {params['dim']}, hidden {hidden}, {params['n_layers']} layers, "
          f"targets {args.targets}")
    print(f"{'method':<15}{'trainable':>13}{'':>9}  {'Table 2':<17}{'as d_in, d_out':<34}"
          f"{'formula':>13}  ok" + ("  paper" if is_7b else ""))
    for row in rows:
        ok = "yes" if row["formula"] == row["trainable"] else "NO"
        print(f"{row['label']:<15}{row['trainable']:>13,}{row['trainable'] / 1e6:>8.2f}M  "
              f"{row['table2']:<17}{row['general']:<34}{row['formula']:>13,}  {ok}"
              + (f"  {row['paper']}" if is_7b else ""))
