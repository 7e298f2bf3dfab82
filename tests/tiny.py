"""Tiny random LLaMA checkpoints in Meta's exact on-disk layout, built on the fly (nothing downloads)."""
from __future__ import annotations

import json
import os

import sentencepiece as spm
import torch

from data import train_tokenizer

# Small but exercises everything: GQA (4 query heads share 2 kv heads), 2 layers, odd FFN rounding.
TINY_PARAMS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384,
                   multiple_of=16, norm_eps=1e-5, rope_theta=10000.0)

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # split along dim 0 by Meta
ROW_PARALLEL = ("wo", "w2")                                 # split along dim 1 by Meta

CORPUS = [
    "Once upon a time there was a little cat who liked to play in the sun.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "She opened the door, looked outside, and smiled at the blue sky.",
    "A B C D 0 1 2 3 4 5 6 7 8 9 apple banana cherry grape lemon mango",
    "<|user|>\nWhat is two plus three?\n<|assistant|>\nFive.",
    "The following are multiple choice questions (with answers) about physics.",
]


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden-size rule, written out independently of llama.py."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def random_state_dict(params: dict, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random fp32 weights with Meta's key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    dim, nh = params["dim"], params["n_heads"]
    nkv = params.get("n_kv_heads") or nh
    hd = dim // nh
    hidden = ffn_hidden(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    V = params["vocab_size"]

    def w(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return 1.0 + 0.1 * torch.randn(dim, generator=g)

    sd = {"tok_embeddings.weight": w(V, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(nh * hd, dim)
        sd[p + "attention.wk.weight"] = w(nkv * hd, dim)
        sd[p + "attention.wv.weight"] = w(nkv * hd, dim)
        sd[p + "attention.wo.weight"] = w(dim, nh * hd)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = w(V, dim)
    return sd


def shard_state_dict(sd: dict[str, torch.Tensor], n_shards: int, vocab_parallel: bool = False) -> list[dict]:
    """Split weights the way Meta's model-parallel checkpoints are split.

    LLaMA-1/2 use ParallelEmbedding (tok_embeddings split on dim 1); Llama-3 uses
    VocabParallelEmbedding (split on dim 0). Norms are replicated in every shard.
    """
    shards = [dict() for _ in range(n_shards)]
    for k, v in sd.items():
        name = k.split(".")[-2]
        if v.dim() == 1:
            parts = [v.clone() for _ in range(n_shards)]
        elif name in COLUMN_PARALLEL:
            parts = v.chunk(n_shards, dim=0)
        elif name in ROW_PARALLEL:
            parts = v.chunk(n_shards, dim=1)
        elif name == "tok_embeddings":
            parts = v.chunk(n_shards, dim=0 if vocab_parallel else 1)
        else:
            raise KeyError(k)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    return shards


def write_checkpoint(ckpt_dir: str, params: dict | None = None, n_shards: int = 1, seed: int = 0,
                     vocab_parallel: bool = False, tokenizer: bool = True,
                     extra_keys: dict | None = None) -> dict[str, torch.Tensor]:
    """Write params.json + consolidated.NN.pth (+ tokenizer.model) and return the unsharded weights."""
    params = dict(TINY_PARAMS if params is None else params)
    os.makedirs(ckpt_dir, exist_ok=True)
    if tokenizer:
        tok = train_tokenizer(CORPUS * 4, os.path.join(ckpt_dir, "tokenizer.model"), vocab_size=params["vocab_size"])
        # a tiny corpus may give fewer pieces than asked: the model's vocabulary follows the tokenizer
        params["vocab_size"] = spm.SentencePieceProcessor(model_file=tok).vocab_size()
    sd = random_state_dict(params, seed)
    for i, shard in enumerate(shard_state_dict(sd, n_shards, vocab_parallel)):
        shard.update(extra_keys or {})
        torch.save(shard, os.path.join(ckpt_dir, f"consolidated.{i:02d}.pth"))
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        json.dump(params, f)
    return sd
