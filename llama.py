"""A single-file LLaMA in plain PyTorch that loads Meta's original checkpoints.

Covers LLaMA-1/2 (7B/13B/70B, GQA on 70B), Code Llama (rope_theta 1e6) and the Llama-3/3.1
architecture (rope_theta 500000, scaled RoPE). Module names are Meta's (llama/model.py), so Meta's
state dicts load by key. Where this file differs from Meta's, and why:
- RoPE rotates Meta's interleaved pairs (x[2i], x[2i+1]) with real cos/sin instead of complex
  numbers (torch.compile cannot trace complex tensors), computed from the positions at every
  forward: there are no rope buffers to materialise after building on `meta`, and none for
  `model.to(bfloat16)` to round.
- The KV cache is static (allocated once, written at each row's `start_pos`, attended through a
  mask). Eager attention reads only the filled part rounded up to KV_BUCKET slots (shapes change
  once per 32 steps); under torch.compile with a tensor position it reads the whole cache: one
  graph, friendly to CUDA graphs.
- No model-parallel layers: Meta's model-parallel shards are merged once, at load time.

    python llama.py --ckpt_dir path/to/llama-2-7b --prompt "Once upon a time"
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.shards import (CheckpointError, check_shard_count, check_shards_match, find_shards,
                          load_shard, release_pages)


@dataclass
class ModelArgs:
    """The fields of Meta's params.json (plus the two sizes Meta passes to its Transformer
    separately)."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None       # None: one kv head per query head; 70B and Llama-3: 8 (GQA)
    vocab_size: int = -1                # -1 (LLaMA-2's params.json): take it from the checkpoint
    multiple_of: int = 256              # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0         # Code Llama 1e6, Llama-3 500000
    use_scaled_rope: bool = False       # Llama-3.1 long-context frequency scaling
    max_batch_size: int = 32            # largest batch generate() accepts
    max_seq_len: int = 2048             # prompt + generation never goes beyond this in generate()


# What a params.json value must be, by its ModelArgs annotation: what to write, and the test.
# JSON's 8.0 is no integer (head counts index tensors), and true is no number.
PARAM_KINDS = {"int": ("an integer", lambda v: type(v) is int),
               "float": ("a number", lambda v: type(v) in (int, float)),
               "bool": ("true or false", lambda v: type(v) is bool)}
POSITIVE = ("dim", "n_layers", "n_heads", "multiple_of")   # the first three: no default is right


def load_params(path: str, **overrides) -> ModelArgs:
    """Read Meta's params.json; unknown keys (newer releases add some) are warned about and ignored.
    A missing dim/n_layers/n_heads, a value of the wrong type, or sizes that cannot build a model
    are a CheckpointError naming the file and the key. A UTF-8 BOM and CRLF line ends are fine."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no params.json (Meta's layout is params.json + "
                                "consolidated.NN.pth)")
    with open(path, encoding="utf-8-sig") as f:   # -sig: a BOM (Windows editors add one) isn't JSON
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") \
                from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{\"dim\": ..., \"n_layers\": "
                              f"...}}, got a JSON {type(raw).__name__}")
    if missing := [k for k in POSITIVE[:3] if k not in raw]:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} (Meta's params.json gives "
                              f"{', '.join(POSITIVE[:3])}): add it")
    known = {f.name: f.type for f in fields(ModelArgs)}   # "int | None": annotations are strings
    if unknown := sorted(set(raw) - set(known)):
        warnings.warn(f"{path}: ignoring unknown keys {unknown}")
    for k, v in raw.items():
        if k not in known or (v is None and "None" in known[k]):
            continue
        kind = known[k].split(" ")[0]
        want, ok = PARAM_KINDS[kind]
        if ok(v) and (k not in POSITIVE or v >= 1):
            continue
        if ok(v):
            raise CheckpointError(f"{path}: {k!r} is {v}, expected a positive integer")
        try:   # the fix, when the value is a number written the wrong way: 8.0 or "8" for 8, "1e-5"
            x = None if type(v) is bool else float(v)
        except (TypeError, ValueError):
            x = None
        fix = (f": write {int(x)}" if kind == "int" and x is not None and x.is_integer() else
               f": write {json.dumps(x)}" if kind == "float" and x is not None else "")
        raise CheckpointError(f"{path}: {k!r} is {json.dumps(v)}, expected {want}"
                              f"{' or null' if 'None' in known[k] else ''}{fix}")
    args = ModelArgs(**{**{k: v for k, v in raw.items() if k in known}, **overrides})
    if args.dim % args.n_heads:
        raise CheckpointError(f"{path}: 'dim' {args.dim} is not a multiple of 'n_heads' "
                              f"{args.n_heads}")
    if args.n_kv_heads is not None and (args.n_kv_heads < 1 or args.n_heads % args.n_kv_heads):
        raise CheckpointError(f"{path}: 'n_kv_heads' {args.n_kv_heads} does not divide 'n_heads' "
                              f"{args.n_heads}")
    return args


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim (three matrices cost what a 4*dim two-matrix MLP costs),
    then optionally scaled (70B: 1.3) and rounded up to multiple_of. 7B -> 11008, 13B -> 13824, 70B
    -> 28672."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def apply_scaling(freqs: torch.Tensor, factor: float = 8.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Llama-3.1 RoPE scaling: wavelengths longer than the old context are stretched by `factor`,
    those much shorter are kept (local order still matters), and the band in between is blended
    linearly."""
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_context_len / low_freq_factor, freqs / factor, blended)
    return torch.where(wavelen < old_context_len / high_freq_factor, freqs, out)


def precompute_freqs_cis(head_dim: int, positions: torch.Tensor, theta: float = 10000.0,
                         use_scaled_rope: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Real form of Meta's freqs_cis: cos and sin of position * theta^(-2i/head_dim), float32 [...,
    head_dim/2] for positions of any shape ([T], or [B, T] when every row has its own positions)."""
    i2 = torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2].float()   # 2i
    freqs = 1.0 / (theta ** (i2 / head_dim))
    if use_scaled_rope:
        freqs = apply_scaling(freqs)
    angles = positions.float()[..., None] * freqs
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by angle i of its position. x:
    [B, T, H, D], cos/sin: [T, D/2] or [B, T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))   # float32 like Meta: bf16 angles drift at long range
    cos, sin = cos[..., None, :], sin[..., None, :]   # [(B,) T, 1, D/2]: broadcast over heads
    if torch.compiler.is_compiling():   # written out: inductor fuses it (not complex ops)
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).type_as(x)
    # eager: the same rotation as one complex multiply, (x0 + i x1)(cos + i sin), as Meta writes it:
    # one kernel instead of six strided ones (5x faster at head dim 8, 12% of a stories260K
    # evaluation; tested equal)
    out = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv, S, D] -> [B, n_kv * n_rep, S, D]; query head h reads kv head h // n_rep, as in
    Meta's GQA."""
    if n_rep == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, D).reshape(B, H * n_rep, S, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32 (bf16 loses digits over 4096 features), one op
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # [max_batch, n_kv_heads, max_seq, head_dim] once setup_cache() runs; not in state dicts
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        """input_pos [B, T]: each row's positions, written into the cache; attention then reads the
        first mask.shape[-1] slots (the filled part, rounded up to a bucket), masked per row."""
        B, T, _ = x.shape
        q = apply_rotary_emb(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary_emb(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # SDPA: [B, heads, T, D]
        if input_pos is not None:   # decoding: store this step, attend over the filled cache
            rows = torch.arange(B, device=x.device)[:, None]
            # slots [B, T, heads, D]
            self.cache_k[rows, :, input_pos] = k.transpose(1, 2).to(self.cache_k.dtype)
            self.cache_v[rows, :, input_pos] = v.transpose(1, 2).to(self.cache_v.dtype)
            k, v = self.cache_k[:B, :, :mask.shape[-1]], self.cache_v[:B, :, :mask.shape[-1]]
        n_rep = self.n_heads // self.n_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                             attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)   # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)   # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)   # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))     # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


KV_BUCKET = 32   # attention reads the filled cache rounded up to a multiple of this


@contextlib.contextmanager
def no_init(device: str | torch.device = "meta") -> Iterator[None]:
    """Build modules on `device` without running their parameter initialisers: weights that a
    checkpoint overwrites next need no random numbers. On `meta` it also keeps torch._dynamo out of
    the load path (nn.Embedding's normal_ on meta goes through torch._refs, which imports it: 1-3 s
    of a load)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        with torch.device(device):
            yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError("vocab_size must be set (from_checkpoint resolves params.json's -1 "
                             "from the weights)")
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.cache_size: tuple[int, int] | None = None   # KV cache's (max_batch_size, max_seq_len)

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate a zeroed KV cache (model dtype and device) for forward(tokens,
        start_pos=...)."""
        w = self.tok_embeddings.weight
        for m in self.modules():   # not self.layers[i].attention: train.py may wrap the blocks
            if isinstance(m, Attention):
                shape = (max_batch_size, m.n_kv_heads, max_seq_len, m.head_dim)
                m.cache_k = torch.zeros(shape, dtype=w.dtype, device=w.device)
                m.cache_v = torch.zeros_like(m.cache_k)
        self.cache_size = (max_batch_size, max_seq_len)

    def clear_cache(self) -> None:
        """Free the KV cache (e.g. before training); setup_cache() makes a new one."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.cache_k = m.cache_v = None
        self.cache_size = None

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """float32 logits [B, T, vocab] ([B, 1, vocab] with last_only: a prefill needs only the next
        token's). start_pos None: causal forward over `tokens` alone, no cache. start_pos k (an int,
        a 0-d tensor, or a [B] tensor giving every row its own position): row b's tokens sit at
        positions k[b].. and attend to the cache of its earlier steps."""
        B, T = tokens.shape
        pos, mask = torch.arange(T, device=tokens.device)[None], None   # [1 or B, T]
        if start_pos is not None:
            pos, mask = self._cache_positions(B, T, start_pos, tokens.device)
        p = self.params
        cos, sin = precompute_freqs_cis(p.dim // p.n_heads, pos, p.rope_theta, p.use_scaled_rope)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, None if start_pos is None else pos.expand(B, T), mask)
        if last_only:   # the output head is the widest matrix: skip it for positions nobody reads
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def _cache_positions(self, B: int, T: int, start_pos,
                         device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, T] and the attention mask [B, 1, T, S] over the first S cache slots: the
        filled part rounded up to KV_BUCKET (attention cost follows the filled length, while shapes
        change only once per bucket, so a compiled step has one graph per bucket). Under
        torch.compile or CUDA-graph capture a tensor start_pos is not read on the host: S is the
        whole cache (one graph for every step, as a static cache intends)."""
        if self.cache_size is None:
            raise RuntimeError("forward(tokens, start_pos) needs a KV cache: call setup_cache() "
                               "first")
        start = torch.as_tensor(start_pos, device=device).reshape(-1, 1)   # [1, 1] or [B, 1]
        # no host read while compiling or capturing a CUDA graph
        traced = torch.compiler.is_compiling() or (start.is_cuda and
                                                   torch.cuda.is_current_stream_capturing())
        if traced and isinstance(start_pos, torch.Tensor):
            end = self.cache_size[1]
        else:
            end = (int(start_pos) if isinstance(start_pos, int) else
                   int(start.max()) if start.numel() else 0)
            if B > self.cache_size[0] or end + T > self.cache_size[1] or int(start.min()) < 0:
                raise ValueError(f"batch {B} at positions {end}..{end + T - 1} does not fit the KV "
                                 f"cache of size {self.cache_size}")
            end = min(self.cache_size[1], -(-(end + T) // KV_BUCKET) * KV_BUCKET)
        pos = start + torch.arange(T, device=device)
        # causal per row: slots after a row's current position hold stale or zero values
        mask = torch.arange(end, device=device) <= pos[..., None]
        return pos, mask[:, None]

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, max_seq_len: int = 2048,
                        max_batch_size: int = 32) -> Transformer:
        """Load Meta's params.json + consolidated.NN.pth (merging model-parallel shards); eval mode.

        Peak host memory is about one copy of the weights in `dtype`: the model is built on `meta`,
        shards are memory-mapped, and each tensor is merged and converted on its own before
        load_state_dict(assign=True). One shard loaded on the CPU in its stored dtype is not copied
        at all: the weights are the file's pages (read on first use, shared with the page cache), so
        do not rewrite the .pth in place while it is in use. A sentencepiece tokenizer.model inside
        ckpt_dir is checked against the vocabulary (CheckpointError if they differ); one elsewhere
        (LLaMA-2 downloads keep it in the parent dir) is checked by the CLI. """
        params = load_params(os.path.join(ckpt_dir, "params.json"), max_seq_len=max_seq_len,
                             max_batch_size=max_batch_size)
        paths = find_shards(ckpt_dir)
        shards = [load_shard(p) for p in paths]
        for sd in shards:
            sd.pop("rope.freqs", None)   # LLaMA-1 saved its complex RoPE table; ours is computed
        check_shards_match(paths, shards)
        if "tok_embeddings.weight" not in shards[0]:
            raise CheckpointError(f"{paths[0]}: missing key 'tok_embeddings.weight'")
        if params.vocab_size <= 0:   # embedding rows, times the shards if Llama-3 split the vocab
            rows, cols = shards[0]["tok_embeddings.weight"].shape
            params.vocab_size = rows * (len(shards) if cols == params.dim else 1)
        tok_path = os.path.join(ckpt_dir, "tokenizer.model")
        # a Llama-3 tokenizer is out of scope, but its model loads
        if os.path.isfile(tok_path) and not is_tiktoken(tok_path):
            check_tokenizer(tok_path, params.vocab_size)
        with no_init():   # shapes only: init costs no memory and no time
            model = cls(params)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if missing := [k for k in expected if k not in shards[0]]:
            raise CheckpointError(f"{paths[0]}: missing keys {missing[:5]} (model built from "
                                  "params.json)")
        if unexpected := [k for k in shards[0] if k not in expected]:
            raise CheckpointError(f"{paths[0]}: unexpected keys {unexpected[:5]} (model built from "
                                  "params.json)")
        check_shard_count(paths, shards[0], expected)
        state = {}
        for k, shape in expected.items():
            parts = [sd[k] for sd in shards]
            # On the CPU in the file's own dtype, .to() is a no-op: the parameter stays in the
            # memory-mapped file (a private mapping: pages are read on first use and a write copies
            # the page, never reaching the file). Anything converted, merged or moved is a copy, and
            # the file pages it was read from go.
            state[k] = merge_shards(k, parts, shape, paths).to(device, dtype)
            for t in parts:
                if t is not state[k]:
                    release_pages(t)
        model.load_state_dict(state, assign=True)
        return model.eval()


# fairscale's ColumnParallelLinear splits the output rows, RowParallelLinear the input columns
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")


def merge_shards(key: str, parts: list[torch.Tensor], shape: torch.Size,
                 paths: list[str]) -> torch.Tensor:
    """One full tensor from Meta's model-parallel pieces, checked against the shape params.json
    implies."""
    if len(parts) == 1 or parts[0].dim() == 1:
        t = parts[0]   # single file, or a replicated norm
    else:
        name = key.split(".")[-2]
        if name in COLUMN_PARALLEL or name in ROW_PARALLEL:
            t = torch.cat(parts, dim=0 if name in COLUMN_PARALLEL else 1)
        else:   # tok_embeddings: Llama-3 splits the vocabulary (dim 0), LLaMA-1/2 the features
            t = torch.cat(parts, dim=0 if parts[0].shape[1] == shape[1] else 1)
    if t.shape != shape:
        where = (paths[0] if len(paths) == 1 else
                 f"{len(paths)} merged shards in {os.path.dirname(paths[0])}")
        raise CheckpointError(f"{where}: {key!r} has shape {tuple(t.shape)} but params.json "
                              f"implies {tuple(shape)}")
    return t


def is_tiktoken(path: str) -> bool:
    """Llama-3's tokenizer.model is tiktoken text ('<base64 token> <rank>' lines), not a
    sentencepiece proto."""
    with open(path, "rb") as f:
        first = f.readline(1000)
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\s*", first) is not None


class Tokenizer:
    """SentencePiece tokenizer of LLaMA-1/2 and Code Llama (Llama-3's tiktoken tokenizer is out of
    scope)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: no tokenizer file")
        if is_tiktoken(model_path):   # check first: sentencepiece half-parses these files
            raise CheckpointError(f"{model_path} is a Llama-3 (tiktoken) tokenizer: Llama-3 "
                                  "tokenizers are out of scope here; only sentencepiece "
                                  "tokenizer.model files (LLaMA-1/2, Code Llama)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{model_path}: not a sentencepiece model ({e})") from None
        self.n_words, self.bos_id, self.eos_id, self.pad_id = (
            self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(s) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def check_tokenizer(path: str, vocab_size: int) -> None:
    """Token ids index the embedding rows: the tokenizer and the model must agree on the vocabulary
    size."""
    if (n := Tokenizer(path).n_words) != vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {n} tokens but the model's vocabulary is "
                              f"{vocab_size}")


def tokenizer_path(ckpt_dir: str, path: str | None = None) -> str:
    """`path`, else tokenizer.model in ckpt_dir, else in its parent (where LLaMA-2 downloads keep
    it)."""
    candidates = [os.path.join(ckpt_dir, "tokenizer.model"),
                  os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "tokenizer.model")]
    return path or next((p for p in candidates if os.path.isfile(p)), candidates[0])


def load_tokenizer(ckpt_dir: str, vocab_size: int, path: str | None = None) -> Tokenizer:
    """The tokenizer of a Meta checkpoint (see tokenizer_path), checked against the model's
    vocabulary."""
    path = tokenizer_path(ckpt_dir, path)
    check_tokenizer(path, vocab_size)
    return Tokenizer(path)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens until their mass reaches p (the one crossing p
    included)."""
    sorted_probs, idx = probs.sort(dim=-1, descending=True)
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > p] = 0.0
    # multinomial renormalises
    return idx.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Greedy when temperature is 0, else temperature + nucleus sampling. logits: [..., vocab]."""
    if temperature > 0:
        return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p)
    return logits.argmax(dim=-1)


@torch.inference_mode()
def generate(model: Transformer, prompt_tokens: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 0.9, eos_id: int | None = None,
             stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """New tokens for each prompt: greedy when temperature is 0, else temperature + top-p sampling.

    A row ends at eos_id (not returned), after max_new_tokens, when stop(new_tokens) is true (the
    token that made it true is returned), or at the model's max_seq_len. One prefill fills the KV
    cache and gives the first token's logits (only those: last_only); then each step feeds every row
    one token at the row's own position (a [B] start_pos), so prompts of different lengths decode
    together (prompts of different lengths are prefilled without their last token, which the first
    step feeds). Reuses the KV cache if it is large enough, else sets one up. """
    B, lens = len(prompt_tokens), [len(p) for p in prompt_tokens]
    max_len = model.params.max_seq_len
    if B > model.params.max_batch_size or min(lens) < 1 or max(lens) > max_len:
        raise ValueError(f"{B} prompts of lengths {min(lens)}..{max(lens)}: need "
                         f"1..{model.params.max_batch_size} non-empty prompts of at most "
                         f"max_seq_len={max_len} tokens")
    total = min(max_len, max(lens) + max_new_tokens)
    if model.cache_size is None or model.cache_size[0] < B or model.cache_size[1] < total:
        model.setup_cache(B, total)
    device = model.tok_embeddings.weight.device
    out, done = [[] for _ in range(B)], [max_new_tokens <= 0 or n >= max_len for n in lens]
    was_training = model.training
    model.eval()   # adapters may carry dropout
    try:
        if len(set(lens)) == 1:   # one prefill of the whole prompts gives the first token's logits
            tokens = torch.tensor(prompt_tokens, device=device)
            logits = model(tokens, start_pos=0, last_only=True)[:, -1]
        else:   # padded: shorter rows' stale slots stay masked; each last prompt token goes at its
            # own position
            if max(lens) > 1:
                padded = [p[:-1] + [0] * (max(lens) - n) for p, n in zip(prompt_tokens, lens)]
                model(torch.tensor(padded, device=device), start_pos=0, last_only=True)
            last = torch.tensor([[p[-1]] for p in prompt_tokens], device=device)
            start = torch.tensor(lens, device=device) - 1
            logits = model(last, start_pos=start, last_only=True)[:, -1]
        pos = torch.tensor(lens, device=device)
        while not all(done):
            tok = next_token(logits, temperature, top_p)
            for i, t in enumerate(tok.tolist()):
                if done[i]:
                    continue
                if t != eos_id:
                    out[i].append(t)
                done[i] = (t == eos_id or len(out[i]) >= max_new_tokens
                           or lens[i] + len(out[i]) >= max_len
                           or (stop is not None and stop(out[i])))
            if not all(done):
                logits = model(tok[:, None], start_pos=pos, last_only=True)[:, -1]
                # finished rows keep writing their last slot, never read
                pos = (pos + 1).clamp(max=total - 1)
    finally:
        model.train(was_training)
    return out


if __name__ == "__main__":
    # the command line joins the model to mor.py and data.py, which the model itself never needs
    from tools import chat
    chat.main()
