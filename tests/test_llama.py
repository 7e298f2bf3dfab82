"""llama.py against independent computations: a naive loop implementation, hand formulas, hand values."""
import json
import math
import os
import shutil

import pytest
import torch

import llama
import sentencepiece as spm
from conftest import STORIES
from data import train_tokenizer
from llama import (CheckpointError, ModelArgs, Tokenizer, Transformer, apply_scaling, ffn_hidden_dim, generate,
                   load_params, precompute_freqs_cis, sample_top_p)
from tiny import CORPUS, TINY_PARAMS, ffn_hidden, random_state_dict, write_checkpoint


# ---------------------------------------------------------------- naive reference (float64, explicit loops)

def naive_logits(sd: dict, p: dict, seq: list[int]) -> torch.Tensor:
    """Meta's LLaMA for one sequence, written out: RoPE as 2x2 rotation matrices on pairs (2i, 2i+1),
    softmax attention by hand over positions j <= t, query head h reading kv head h // (n_heads / n_kv_heads)."""
    W = {k: v.double() for k, v in sd.items()}
    dim, nh, nkv = p["dim"], p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
    hd, eps, theta = dim // nh, p["norm_eps"], p.get("rope_theta", 10000.0)

    def rms(x, w):
        return x / math.sqrt(float((x * x).mean()) + eps) * w

    def rotation(pos):   # block-diagonal rotation of the interleaved pairs
        R = torch.zeros(hd, hd, dtype=torch.float64)
        for i in range(hd // 2):
            a = pos * theta ** (-2 * i / hd)
            R[2 * i, 2 * i], R[2 * i, 2 * i + 1] = math.cos(a), -math.sin(a)
            R[2 * i + 1, 2 * i], R[2 * i + 1, 2 * i + 1] = math.sin(a), math.cos(a)
        return R

    xs = [W["tok_embeddings.weight"][t] for t in seq]
    for layer in range(p["n_layers"]):
        pre = f"layers.{layer}."
        qs, ks, vs = [], [], []
        for t, x in enumerate(xs):
            h = rms(x, W[pre + "attention_norm.weight"])
            R = rotation(t)
            q, k, v = (W[pre + f"attention.{w}.weight"] @ h for w in ("wq", "wk", "wv"))
            qs.append([R @ q[i * hd:(i + 1) * hd] for i in range(nh)])
            ks.append([R @ k[i * hd:(i + 1) * hd] for i in range(nkv)])
            vs.append([v[i * hd:(i + 1) * hd] for i in range(nkv)])
        new = []
        for t, x in enumerate(xs):
            heads = []
            for i in range(nh):
                g = i // (nh // nkv)
                scores = [float(qs[t][i] @ ks[j][g]) / math.sqrt(hd) for j in range(t + 1)]
                m = max(scores)
                e = [math.exp(s - m) for s in scores]
                heads.append(sum(e[j] / sum(e) * vs[j][g] for j in range(t + 1)))
            h = x + W[pre + "attention.wo.weight"] @ torch.cat(heads)
            f = rms(h, W[pre + "ffn_norm.weight"])
            a, b = W[pre + "feed_forward.w1.weight"] @ f, W[pre + "feed_forward.w3.weight"] @ f
            new.append(h + W[pre + "feed_forward.w2.weight"] @ (a / (1 + torch.exp(-a)) * b))
        xs = new
    return torch.stack([W["output.weight"] @ rms(x, W["norm.weight"]) for x in xs])


def tiny_model(sd: dict, params: dict = TINY_PARAMS) -> Transformer:
    model = Transformer(ModelArgs(**params))
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    sd = random_state_dict(TINY_PARAMS, seed=3)
    return tiny_model(sd), sd


SEQS = [[1, 17, 250, 3, 99, 7, 42, 300, 5], [1, 8, 6, 120, 383, 0, 11, 64, 2]]


# ---------------------------------------------------------------- numerics

def test_logits_match_naive_loops_with_gqa(tiny):
    model, sd = tiny
    assert model.params.n_kv_heads < model.params.n_heads   # GQA is on
    logits = model(torch.tensor(SEQS))
    assert logits.dtype == torch.float32 and logits.shape == (2, 9, TINY_PARAMS["vocab_size"])
    for b, seq in enumerate(SEQS):
        torch.testing.assert_close(logits[b].double(), naive_logits(sd, TINY_PARAMS, seq), rtol=1e-5, atol=1e-5)


def test_code_llama_theta_matches_naive():
    params = dict(TINY_PARAMS, rope_theta=1e6, n_kv_heads=1)
    sd = random_state_dict(params, seed=4)
    logits = tiny_model(sd, params)(torch.tensor(SEQS[:1]))[0]
    torch.testing.assert_close(logits.double(), naive_logits(sd, params, SEQS[0]), rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward(tiny):
    model, _ = tiny
    tokens = torch.tensor(SEQS)
    full = model(tokens)
    model.setup_cache(max_batch_size=4, max_seq_len=16)   # larger than needed: stale slots must stay masked
    chunks = [(0, 4), (4, 5), (5, 6), (6, 9)]             # a prefill, single steps, then a 3-token chunk
    for _ in range(2):                                    # second pass reuses a dirty cache
        got = torch.cat([model(tokens[:, a:b], start_pos=a) for a, b in chunks], dim=1)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    model.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(tokens, start_pos=0)


def test_ffn_hidden_sizes_of_real_llama2_configs():
    assert ffn_hidden_dim(4096, 256) == 11008                  # 7B params.json
    assert ffn_hidden_dim(5120, 256) == 13824                  # 13B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672            # 70B
    assert ffn_hidden_dim(64, 4) == 172 == ffn_hidden(64, 4)   # stories260K


def test_7b_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256))
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert model.layers[0].feed_forward.w1.weight.shape == (11008, 4096)
    with torch.device("meta"):
        big = Transformer(ModelArgs(dim=8192, n_layers=1, n_heads=64, n_kv_heads=8, vocab_size=32000,
                                    multiple_of=4096, ffn_dim_multiplier=1.3))
    assert big.layers[0].attention.wk.weight.shape == (1024, 8192)   # 8 kv heads of 128
    assert big.layers[0].feed_forward.w2.weight.shape == (8192, 28672)


def test_scaled_rope_matches_llama31_formula():
    hd, theta = 128, 500000.0
    base = [theta ** (-2 * i / hd) for i in range(hd // 2)]
    want = []
    for f in base:   # Llama-3.1: factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(f)
        elif wavelen > 8192 / 1:
            want.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want.append((1 - s) * f / 8 + s * f)
    got = apply_scaling(torch.tensor(base, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert sum(w == f for w, f in zip(want, base)) not in (0, len(base))   # all three bands are exercised
    pos = torch.tensor([0, 1, 5000])
    cos, sin = precompute_freqs_cis(hd, pos, theta, use_scaled_rope=True)
    angles = pos[:, None].double() * torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2e-3)   # float32 angles near 5000 rad
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2e-3)
    cos1, _ = precompute_freqs_cis(hd, pos[1:2], theta, use_scaled_rope=True)
    torch.testing.assert_close(cos1[0].double(), torch.tensor(want, dtype=torch.float64).cos())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_eager_and_compiled_forms_equal_pair_rotations(monkeypatch, dtype):
    """Both forms of apply_rotary_emb (complex multiply in eager, the rotation written out under compile)
    against a loop rotating every pair (x[2i], x[2i+1]) by pos * theta^(-2i/D), per-row positions included."""
    B, T, H, D, theta = 2, 5, 3, 8, 500.0
    x = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    want = torch.empty(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for i in range(D // 2):
                a = float(pos[b, t]) * theta ** (-2 * i / D)
                x0, x1 = x[b, t, :, 2 * i].double(), x[b, t, :, 2 * i + 1].double()
                want[b, t, :, 2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
                want[b, t, :, 2 * i + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    cos, sin = precompute_freqs_cis(D, pos, theta)
    eager = llama.apply_rotary_emb(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    written_out = llama.apply_rotary_emb(x, cos, sin)
    monkeypatch.undo()
    graphs = []

    def capture(gm, example_inputs):   # dynamo's traced graph, run as is (no inductor)
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    traced = torch.compile(llama.apply_rotary_emb, backend=capture, fullgraph=True)(x, cos, sin)
    assert graphs and not any("complex" in str(n.target) for g in graphs for n in g.graph.nodes)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for got in (eager, written_out, traced):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


# ---------------------------------------------------------------- loading Meta's layout

def test_from_checkpoint_matches_in_memory_weights(tiny_ckpt):
    model = Transformer.from_checkpoint(tiny_ckpt, max_seq_len=64)
    sd = torch.load(os.path.join(tiny_ckpt, "consolidated.00.pth"))
    assert not model.training and model.params.max_seq_len == 64
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert model.params.vocab_size == Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model")).n_words
    bf16 = Transformer.from_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    assert bf16.output.weight.dtype == torch.bfloat16 and bf16(torch.tensor([[1, 5]])).dtype == torch.float32


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_two_shards_give_exactly_one_shard_logits(tmp_path, vocab_parallel):
    one = write_checkpoint(str(tmp_path / "one"), seed=7, tokenizer=False)
    two_dir = str(tmp_path / "two[chat]")   # glob characters in the path are part of the name
    two = write_checkpoint(two_dir, seed=7, n_shards=2, vocab_parallel=vocab_parallel, tokenizer=False)
    emb = torch.load(os.path.join(two_dir, "consolidated.01.pth"))["tok_embeddings.weight"]
    assert emb.shape == ((192, 32) if vocab_parallel else (384, 16))   # really split the way asked
    tokens = torch.tensor(SEQS)
    a = Transformer.from_checkpoint(str(tmp_path / "one"))(tokens)
    b = Transformer.from_checkpoint(two_dir)(tokens)
    assert torch.equal(a, b)
    torch.testing.assert_close(a[0].double(), naive_logits(one, TINY_PARAMS, SEQS[0]), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_vocab_minus_one_taken_from_weights_and_rope_freqs_skipped(tmp_path):
    for n, vp in [(1, False), (2, False), (2, True)]:
        d = str(tmp_path / f"{n}{vp}")
        write_checkpoint(d, n_shards=n, vocab_parallel=vp, tokenizer=False,
                         extra_keys={"rope.freqs": torch.randn(4, dtype=torch.complex64)})
        _edit_params(d, vocab_size=-1)
        assert Transformer.from_checkpoint(d).params.vocab_size == 384


def _edit_params(d, **changes):
    path = os.path.join(d, "params.json")
    with open(path) as f:
        params = json.load(f)
    with open(path, "w") as f:
        json.dump({**params, **changes}, f)


def test_unknown_params_key_warns_not_crashes(tmp_path):
    write_checkpoint(str(tmp_path), tokenizer=False)
    _edit_params(str(tmp_path), some_future_key=3)
    with pytest.warns(UserWarning, match="some_future_key"):
        model = Transformer.from_checkpoint(str(tmp_path))
    assert model.params.dim == 32
    with pytest.warns(UserWarning, match="params.json"):
        assert load_params(str(tmp_path / "params.json"), max_seq_len=7).max_seq_len == 7


def test_bad_inputs_raise_clear_errors(tmp_path):
    ok = str(tmp_path / "ok")
    write_checkpoint(ok, tokenizer=False)

    def variant(name, n_shards=1, **kw):
        d = str(tmp_path / name)
        write_checkpoint(d, n_shards=n_shards, tokenizer=False, **kw)
        return d

    with pytest.raises(FileNotFoundError, match="params.json"):
        Transformer.from_checkpoint(str(tmp_path / "nothing_here"))
    d = variant("no_shards")
    os.remove(os.path.join(d, "consolidated.00.pth"))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        Transformer.from_checkpoint(d)
    d = variant("truncated")
    with open(os.path.join(d, "consolidated.00.pth"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot be loaded"):
        Transformer.from_checkpoint(d)
    d = variant("bad_json")
    with open(os.path.join(d, "params.json"), "w") as f:
        f.write('{"dim": 32,\n "n_layers": }')
    with pytest.raises(CheckpointError, match=r"params.json:2: not valid JSON"):
        Transformer.from_checkpoint(d)
    d = variant("gap", n_shards=3)
    os.remove(os.path.join(d, "consolidated.01.pth"))
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth is missing"):
        Transformer.from_checkpoint(d)
    # shard 01 from another checkpoint (other seed): replicated norms differ
    d, other = variant("mixed", n_shards=2), variant("other", n_shards=2, seed=1)
    shutil.copy(os.path.join(other, "consolidated.01.pth"), os.path.join(d, "consolidated.01.pth"))
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth.*norm.*different checkpoints"):
        Transformer.from_checkpoint(d)
    # shard 01 with a different key set
    d = variant("keys", n_shards=2)
    sd = torch.load(os.path.join(d, "consolidated.01.pth"))
    del sd["layers.1.ffn_norm.weight"]
    torch.save(sd, os.path.join(d, "consolidated.01.pth"))
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth.*layers.1.ffn_norm.weight"):
        Transformer.from_checkpoint(d)
    # a key missing from a single-file checkpoint
    d = variant("missing")
    sd = torch.load(os.path.join(d, "consolidated.00.pth"))
    del sd["layers.0.attention.wv.weight"]
    torch.save(sd, os.path.join(d, "consolidated.00.pth"))
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: missing keys \['layers.0.attention.wv.weight"):
        Transformer.from_checkpoint(d)
    d = variant("unexpected", extra_keys={"layers.0.attention.bogus.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['layers.0.attention.bogus.weight"):
        Transformer.from_checkpoint(d)
    # params.json that does not describe the weights: the key and both shapes are named
    _edit_params(ok, multiple_of=64)   # FFN hidden int(2 * 128 / 3) = 85 rounds to 128, not 96
    with pytest.raises(CheckpointError, match=r"'layers.0.feed_forward.w1.weight' has shape \(96, 32\) "
                                              r"but params.json implies \(128, 32\)"):
        Transformer.from_checkpoint(ok)
    d = variant("misshaped2", n_shards=2)
    _edit_params(d, n_kv_heads=4)
    with pytest.raises(CheckpointError, match=r"2 merged shards.*'layers.0.attention.wk.weight' has shape \(16, 32\)"
                                              r" but params.json implies \(32, 32\)"):
        Transformer.from_checkpoint(d)


def test_tokenizer_errors_and_vocab_check(tmp_path, tiny_ckpt):
    d = str(tmp_path / "ckpt")
    shutil.copytree(tiny_ckpt, d)
    train_tokenizer(CORPUS * 4, os.path.join(d, "tokenizer.model"), vocab_size=360)
    n = Tokenizer(os.path.join(d, "tokenizer.model")).n_words
    assert n != 384
    with pytest.raises(CheckpointError, match=rf"tokenizer.model: tokenizer has {n} tokens but the model's "
                                              r"vocabulary is 384"):
        Transformer.from_checkpoint(d)
    # a Llama-3 tiktoken file: clear error from Tokenizer; the model itself still loads
    with open(os.path.join(d, "tokenizer.model"), "w") as f:
        f.write("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(CheckpointError, match="Llama-3"):
        Tokenizer(os.path.join(d, "tokenizer.model"))
    assert Transformer.from_checkpoint(d).params.vocab_size == 384
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        Tokenizer(os.path.join(d, "tokenizer.model"))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_tokenizer_ids(tiny_ckpt):
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 384)
    ids = tok.encode("Once upon a time", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 2 not in ids[1:-1]
    assert tok.decode(ids) == "Once upon a time" and tok.encode("hi", bos=False)[0] != 1


# ---------------------------------------------------------------- generation

# Greedy decoding through the KV cache runs other GEMM shapes than these full forwards, so logits differ by
# ~1e-6 (fp32 eps x reduction length 96 x |logit|); an argmax is only comparable across the two where the
# winner leads the runner-up by far more than that, which the reference checks at every step.
ARGMAX_MARGIN = 1e-4


def argmax_loop(model, seq, n, eos_id=None):
    seq, out = list(seq), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > ARGMAX_MARGIN, "a near tie: this reference cannot decide the greedy token"
        t = int(logits.argmax())
        if t == eos_id:
            break
        out.append(t)
        seq.append(t)
    return out


def test_greedy_generate_equals_argmax_loop_over_full_forwards(tiny):
    model, _ = tiny
    prompts = [[1, 17, 250], [1, 8, 6, 120, 383, 0, 11], [1]]   # different lengths in one batch
    got = generate(model, prompts, max_new_tokens=6)
    assert got == [argmax_loop(model, p, 6) for p in prompts]
    eos = got[1][2]   # pretend the third greedy token of prompt 1 is EOS: that row stops before it
    got_eos = generate(model, prompts, max_new_tokens=6, eos_id=eos)
    assert got_eos == [argmax_loop(model, p, 6, eos_id=eos) for p in prompts]
    assert got_eos[1] == got[1][:got[1].index(eos)]
    assert generate(model, prompts, 6, stop=lambda new: len(new) == 2) == [g[:2] for g in got]
    # nucleus of one token: sampling at any temperature is greedy
    assert generate(model, prompts, 6, temperature=0.7, top_p=1e-9) == got
    saved, model.params.max_seq_len = model.params.max_seq_len, 9   # the context caps generation:
    try:                                                           # the 7-token prompt gets 2 new tokens
        assert [len(g) for g in generate(model, prompts, 6)] == [6, 2, 6]
    finally:
        model.params.max_seq_len = saved


def test_sample_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    probs = torch.tensor([[0.2, 0.5, 0.3]]).expand(20000, 3).contiguous()
    draws = sample_top_p(probs, 0.7)   # 0.5 (mass before: 0) and 0.3 (mass before: 0.5 <= 0.7) stay
    counts = torch.bincount(draws, minlength=3).double() / len(draws)
    assert counts[0] == 0
    torch.testing.assert_close(counts[1:], torch.tensor([0.625, 0.375], dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="stories260K not present")
def test_stories260k_greedy_continuation():
    model = Transformer.from_checkpoint(STORIES, max_seq_len=512)
    tok = Tokenizer(os.path.join(STORIES, "tokenizer.model"))
    assert model.params.vocab_size == tok.n_words == 512 and model.params.n_kv_heads == 4
    assert sum(p.numel() for p in model.parameters()) == 260_032 + 512 * 64   # README count ties emb/output
    prompt = tok.encode("Once upon a time, there was a little girl")
    text = tok.decode(prompt + generate(model, [prompt], 40, eos_id=tok.eos_id)[0])
    # the README's greedy continuation, which llama2.c's run.c reproduces character for character
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside "
                           "in the park. One day, she saw a big, red ball.")
    prompt = tok.encode("Once upon a time")
    text = tok.decode(prompt + generate(model, [prompt], 60, eos_id=tok.eos_id)[0])
    words = set(text.replace(".", " ").replace(",", " ").split())
    assert {"the", "a", "was", "She"} & words and text.startswith("Once upon a time")


def test_load_tokenizer_finds_parent_and_checks_vocab(tmp_path):
    """LLaMA-2 downloads keep tokenizer.model beside the model folder: it is found there, and a tokenizer
    whose vocabulary differs from the model's is refused by name."""
    params = dict(TINY_PARAMS, vocab_size=384)
    write_checkpoint(str(tmp_path / "llama-tiny"), params=params, tokenizer=False)
    train_tokenizer(CORPUS * 4, str(tmp_path / "tokenizer.model"), vocab_size=320)
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).vocab_size()
    assert llama.tokenizer_path(str(tmp_path / "llama-tiny")) == str(tmp_path / "tokenizer.model")
    with pytest.raises(llama.CheckpointError, match=rf"tokenizer.model: tokenizer has {n} tokens but the model's vocabulary is 384"):
        llama.load_tokenizer(str(tmp_path / "llama-tiny"), 384)
    assert llama.load_tokenizer(str(tmp_path / "llama-tiny"), n).n_words == n


def test_bf16_checkpoint_loads_exactly(tmp_path):
    """Meta ships bf16 tensors: loaded as fp32 they are the bf16 values exactly, and as bf16 bit for bit."""
    d = str(tmp_path / "bf16")
    sd = write_checkpoint(d, n_shards=2)
    for i in range(2):
        path = os.path.join(d, f"consolidated.{i:02d}.pth")
        shard = torch.load(path, weights_only=True)
        torch.save({k: v.to(torch.bfloat16) for k, v in shard.items()}, path)
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer.from_checkpoint(d, dtype=dtype)
        for k, v in model.state_dict().items():
            assert v.dtype == dtype and torch.equal(v, sd[k].to(torch.bfloat16).to(dtype)), k


def _mapped_from(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of `path` (Linux /proc/self/maps)."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_stored_dtype_on_cpu_is_the_files_pages_and_writes_stay_private(tmp_path):
    """One shard on the CPU in its own dtype: every weight lies inside the file's mapping (no copy); a write
    to a parameter changes the model, not the file. In another dtype, nothing lies in the mapping."""
    d = str(tmp_path / "ck")
    sd = write_checkpoint(d)
    path = os.path.join(d, "consolidated.00.pth")
    with open(path, "rb") as f:
        before = f.read()
    model = Transformer.from_checkpoint(d)   # the tiny checkpoint is fp32, the default dtype
    ranges = _mapped_from(path)
    inside = {k: any(lo <= v.data_ptr() < hi for lo, hi in ranges) for k, v in model.state_dict().items()}
    assert ranges and all(inside.values()), [k for k, v in inside.items() if not v]
    with torch.no_grad():
        model.output.weight.add_(1.0)
        model.layers[0].attention.wq.weight.zero_()
    assert torch.equal(model.output.weight, sd["output.weight"] + 1.0)
    with open(path, "rb") as f:
        assert f.read() == before
    again = Transformer.from_checkpoint(d)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())
    del model, again
    converted = Transformer.from_checkpoint(d, dtype=torch.bfloat16)
    ranges = _mapped_from(path)
    assert not any(lo <= v.data_ptr() < hi for v in converted.state_dict().values() for lo, hi in ranges)


# ---------------------------------------------------------------- decoding: per-row positions, buckets, last_only

def test_decode_steps_equal_naive_logits_past_a_bucket(tiny):
    """Each single-token step through the cache (crossing KV_BUCKET, so the attended length changes) gives the
    naive loop's logits for that position."""
    model, sd = tiny
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, TINY_PARAMS["vocab_size"], (llama.KV_BUCKET + 6,), generator=g).tolist()
    ref = naive_logits(sd, TINY_PARAMS, seq)
    model.setup_cache(1, 2 * llama.KV_BUCKET + 8)
    first = model(torch.tensor([seq[:3]]), start_pos=0, last_only=True)
    assert first.shape == (1, 1, TINY_PARAMS["vocab_size"])
    got = [first[0, -1]] + [model(torch.tensor([[t]]), start_pos=p)[0, -1] for p, t in enumerate(seq[3:], 3)]
    torch.testing.assert_close(torch.stack(got).double(), ref[2:], rtol=1e-5, atol=1e-5)
    model.clear_cache()


def test_rows_at_their_own_positions_equal_one_by_one(tiny):
    """A [B] start_pos: rows of different prompt lengths decoded together give each row's own logits."""
    model, sd = tiny
    prompts = [[1, 17, 250, 3, 99], [1, 8], [1, 8, 6, 120, 383, 0, 11, 64]]
    nxt = [[5, 77, 300], [42, 9, 10], [2, 3, 4]]
    model.setup_cache(3, 16)
    width = max(map(len, prompts))
    model(torch.tensor([p + [0] * (width - len(p)) for p in prompts]), start_pos=0)   # padding: stale slots
    pos = torch.tensor([len(p) for p in prompts])
    for step in range(3):
        got = model(torch.tensor([[n[step]] for n in nxt]), start_pos=pos + step)[:, -1]
        for b, p in enumerate(prompts):
            ref = naive_logits(sd, TINY_PARAMS, p + nxt[b][:step + 1])[-1]
            torch.testing.assert_close(got[b].double(), ref, rtol=1e-5, atol=1e-5)
    model.clear_cache()


def test_last_only_equals_the_full_forwards_last_row(tiny):
    model, _ = tiny
    tokens = torch.tensor(SEQS)
    # one output row against all rows: BLAS may block the dim-32 reduction differently per GEMM shape (seen:
    # 4.8e-7 on AVX-512), so fp32 eps 1.2e-7 x 32 terms x |logit| < 1e-5 bounds the difference
    torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:], rtol=1e-5, atol=1e-5)


def test_loading_imports_no_dynamo(tiny_ckpt):
    """no_init: the load path runs no parameter initialisers on meta (which import torch._dynamo). And
    the model knows nothing of adapters, templates or its command line: mor, data and tools.chat stay
    unimported."""
    import subprocess
    import sys
    code = ("import sys, llama; llama.Transformer.from_checkpoint(sys.argv[1]); "
            "print([m for m in ('torch._dynamo', 'mor', 'data', 'tools.chat') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, tiny_ckpt], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_generate_equal_length_prompts_equals_argmax_loop(tiny):
    """Prompts of one length take the one-prefill path (the prefill's last_only logits give the first token)."""
    model, _ = tiny
    prompts = [[1, 17, 250, 3], [1, 8, 6, 120]]
    assert generate(model, prompts, max_new_tokens=5) == [argmax_loop(model, p, 5) for p in prompts]
