"""Side by side with the tools users would pick instead: lm-evaluation-harness, HF `generate`, PEFT.

NEEDS A SEPARATE VIRTUAL ENVIRONMENT: these tools are never dependencies of this project. Make one with
    python -m venv ../peers-venv
    ../peers-venv/bin/pip install torch==2.13.0        # first, so that no CUDA build is pulled in
    ../peers-venv/bin/pip install transformers==5.25.0 lm-eval==0.4.13 peft==0.21.2 sentencepiece numpy tqdm
and run this script with its python:
    OMP_NUM_THREADS=1 ../peers-venv/bin/python bench/peers.py --ckpt_dir ../shared/models/stories260K \
        --data_dir ../shared/benchmarks --rounds 5

Both sides run the same model with the same weights in one process, 1 torch thread (set OMP_NUM_THREADS=1),
in alternating rounds (ours first in even rounds, the peer first in odd ones); a ratio is the peer's median
time over ours (above 1: this project is faster). The Meta checkpoint is converted to a Hugging Face
LlamaForCausalLM in memory (wq/wk rows permuted from Meta's interleaved RoPE pairs to HF's halves) and
checked to give the same logits. Parts (--parts):
  eval    evaluate.py on piqa, arc_easy, mmlu (the first --items items of each; mmlu across its subjects)
          vs lm-evaluation-harness's HFLM (HF backend). "whole": items -> accuracies (tokenisation,
          batching, forwards, metrics; the harness's loglikelihood on our requests, our metric code for
          both). "scoring": pre-tokenised requests -> log-likelihoods (ours: plan_scoring and its batches;
          harness: _loglikelihood_tokens). Accuracies must be equal.
  decode  greedy decoding of --new_tokens tokens, batch 1, random dim-1024 x 4-layer LLaMA (vocab 32000):
          llama.generate vs HF generate, base and merged LoRA R8 (PEFT merge_and_unload, same A and B).
          The generated tokens are compared.
  train   one training step (forward, cross-entropy, backward, clip, AdamW) of LoRA R8 / DoRA R8 on
          w1, w2, w3 (gate/down/up), alpha 32, dropout 0.05, 256 tokens, same model: mor.py vs HF + PEFT.
  load    a --load_gb bf16 checkpoint written in Meta's layout (bench/load.py's) and the same weights
          written by HF save_pretrained (safetensors), each loaded in bf16 on the CPU by a fresh process:
          Transformer.from_checkpoint vs LlamaForCausalLM.from_pretrained, then the logits of 8 tokens.
          Times: the load call to those logits (after the imports), and the whole process (python start
          to exit). Both files are in the page cache (just written, then read once by the warm-up round).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import transformers
except ImportError:
    sys.exit("error: bench/peers.py: transformers is not importable; run it with the peers venv's python "
             "(../peers-venv/bin/python, see the top of this file)")
import torch
import torch.nn.functional as F

import common  # noqa: F401  (puts the repo root on sys.path)
import evaluate as ev
import llama
import mor
from common import ROOT, random_base

HF_NAMES = dict(wq="self_attn.q_proj", wk="self_attn.k_proj", wv="self_attn.v_proj", wo="self_attn.o_proj",
                w1="mlp.gate_proj", w2="mlp.down_proj", w3="mlp.up_proj")


def to_hf(model: llama.Transformer) -> transformers.LlamaForCausalLM:
    """The same weights as a Hugging Face LlamaForCausalLM (fp32, SDPA attention)."""
    p = model.params
    n_kv = p.n_kv_heads or p.n_heads
    config = transformers.LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.dim, num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
        num_key_value_heads=n_kv, intermediate_size=llama.ffn_hidden_dim(p.dim, p.multiple_of, p.ffn_dim_multiplier),
        rms_norm_eps=p.norm_eps, rope_theta=p.rope_theta, max_position_embeddings=p.max_seq_len,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(config).eval()
    hd = p.dim // p.n_heads

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:   # Meta (x0,x1),(x2,x3).. -> HF (x0,x2,..),(x1,x3,..)
        return w.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, block in enumerate(model.layers):
        pre = f"model.layers.{i}."
        for name, hf_name in HF_NAMES.items():
            mod = getattr(block.attention if name in ("wq", "wk", "wv", "wo") else block.feed_forward, name)
            w = (mod.base if hasattr(mod, "base") else mod).weight
            w = halves(w, p.n_heads) if name == "wq" else halves(w, n_kv) if name == "wk" else w
            sd[pre + hf_name + ".weight"] = w
        sd[pre + "input_layernorm.weight"] = block.attention_norm.weight
        sd[pre + "post_attention_layernorm.weight"] = block.ffn_norm.weight
    hf.load_state_dict({k: v.detach().clone().float() for k, v in sd.items()})
    return hf


class SPTokenizer(transformers.PreTrainedTokenizer):
    """The project's sentencepiece tokenizer behind the slow-tokenizer API the harness calls (encode, decode,
    special ids): transformers 5 cannot build a LLaMA tokenizer from this tokenizer.model offline."""

    def __init__(self, tok: llama.Tokenizer):
        self.tok = tok
        super().__init__(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")

    @property
    def vocab_size(self) -> int:
        return self.tok.n_words

    def get_vocab(self) -> dict:
        return {self.tok.sp.id_to_piece(i): i for i in range(self.tok.n_words)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tok.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tok.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tok.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.tok.sp.decode(tokens)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return self.tok.encode(text, bos=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if ids == [self.tok.bos_id] and not skip_special_tokens:   # as HF's LLaMA tokenizers: the harness checks
            return "<s>"                                           # whether a prompt already starts with it
        return self.tok.decode(ids)


def alternate(ours, peer, rounds: int) -> tuple[float, float, object, object]:
    """(median s ours, median s peer, last results) over rounds run in alternating order, after one warm-up."""
    times, res = {ours: [], peer: []}, {}
    for k in range(rounds + 1):
        for fn in ((ours, peer) if k % 2 == 0 else (peer, ours)):
            t0 = time.perf_counter()
            res[fn] = fn()
            if k:
                times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[ours]), statistics.median(times[peer]), res[ours], res[peer]


def report(work: str, ours: float, peer: float, unit: str, n: float, target: float) -> None:
    r = peer / ours
    print(f"{work:42s} ours {n / ours:9.1f} {unit}  peer {n / peer:9.1f} {unit}  ratio {r:.3f}  "
          f"(target >= {target}: {'met' if r >= target else 'MISSED'})", flush=True)


def part_eval(args) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    model = llama.Transformer.from_checkpoint(args.ckpt_dir, max_seq_len=args.max_seq_len, max_batch_size=args.batch)
    tok = llama.load_tokenizer(args.ckpt_dir, model.params.vocab_size)
    hf = to_hf(model)
    x = torch.randint(0, model.params.vocab_size, (2, 40))
    with torch.no_grad():
        print(f"# converted model: max |logits difference| {(hf(x).logits - model(x)).abs().max().item():.1e}")
    lm = HFLM(pretrained=hf, tokenizer=SPTokenizer(tok), batch_size=args.batch, max_length=args.max_seq_len)
    tasks = {t: ev.load_task(t, args.data_dir, None)[0][:args.items] for t in ("piqa", "arc_easy", "mmlu")}
    n_items = sum(map(len, tasks.values()))

    def ours_whole():
        return {t: ev.task_metrics(t, ev.task_records(model, tok, t, items, args.batch)) for t, items in tasks.items()}

    def harness_whole():
        out = {}
        for t, items in tasks.items():
            reqs = [r for item in items for r in ev.choice_requests(item)]
            inst = [Instance("loglikelihood", {}, r, j) for j, r in enumerate(reqs)]
            lls, k = [ll for ll, _ in lm.loglikelihood(inst, disable_tqdm=True)], 0
            records = []
            for item in items:
                n = len(ev.choice_requests(item))
                records.append(dict(ll=lls[k:k + n], gold=item["gold"], lens=[len(c) for c in item["choices"]],
                                    subject=item.get("subject")))
                k += n
            out[t] = ev.task_metrics(t, records)
        return out
    a, b, ra, rb = alternate(ours_whole, harness_whole, args.rounds)
    same = all(ra[t][m] == rb[t][m] for t in ra for m in ("acc", "acc_norm") if m in ra[t])
    print("# accuracies " + ", ".join(f"{t} {ra[t]['acc']:.3f}/{rb[t]['acc']:.3f}" for t in ra) +
          f" (ours/harness): {'identical' if same else 'DIFFERENT'}")
    report(f"whole evaluator call, {n_items} items", a, b, "items/s", n_items, 1.5)
    total = [0.0, 0.0, 0]
    for t, items in tasks.items():   # scoring alone: the same pre-tokenised requests on both sides
        reqs = [r for item in items for r in ev.choice_requests(item)]
        enc = [ev.encode_request(tok, c, x, args.max_seq_len)[:2] for c, x in reqs]
        groups = {}
        for i, (c, _) in enumerate(reqs):
            groups.setdefault(c, []).append(i)
        hreqs = [((c, x), *lm._encode_pair(c, x)) for c, x in reqs]

        @torch.inference_mode()
        def ours_scoring(enc=enc, groups=list(groups.values())):
            out = [None] * len(enc)
            for kind, batch in ev.plan_scoring(enc, groups, args.batch):
                if kind == "shared":
                    ev._score_shared(model, enc, batch, out)
                    model.clear_cache()
                else:
                    ev._score_rows(model, enc, batch, out)
            return out
        a, b, ra, rb = alternate(ours_scoring, lambda h=hreqs: lm._loglikelihood_tokens(h, disable_tqdm=True),
                                 args.rounds)
        diff = max(abs(x[0] - y[0]) for x, y in zip(ra, rb))
        report(f"scoring only, {t} ({len(reqs)} requests)", a, b, "req/s", len(reqs), 1.2)
        print(f"#   max |log-likelihood difference| {diff:.1e}")
        total = [total[0] + a, total[1] + b, total[2] + len(reqs)]
    report(f"scoring only, all ({total[2]} requests)", total[0], total[1], "req/s", total[2], 1.2)


def lora_pair(base: llama.Transformer, hf_base, method: str, seed: int):
    """(ours with adapters, HF + PEFT with the same A, B (and DoRA magnitude)) on w1, w2, w3."""
    import peft
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    mor.add_adapters(ours, method, ("w1", "w2", "w3"), r=8, alpha=32, dropout=0.05)
    with torch.no_grad():
        for _, layer in mor.adapter_layers(ours):
            layer.lora_B.normal_(0, 0.02)   # a "trained" adapter: B != 0
    cfg = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["gate_proj", "down_proj", "up_proj"],
                          use_dora=method == "dora")
    peer = peft.get_peft_model(copy.deepcopy(hf_base), cfg)
    names = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    with torch.no_grad():
        for name, layer in mor.adapter_layers(ours):
            i, w = int(name.split(".")[1]), name.split(".")[-1]
            mod = getattr(peer.base_model.model.model.layers[i].mlp, names[w])
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)
            if method == "dora":
                mod.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return ours, peer


def part_decode(args) -> None:
    params = llama.ModelArgs(dim=1024, n_layers=4, n_heads=16, vocab_size=32000, multiple_of=256,
                             max_seq_len=args.prompt_len + args.new_tokens, max_batch_size=1)
    base = random_base(params, torch.device("cpu"), torch.float32, 0).eval().requires_grad_(False)
    hf = to_hf(base)
    prompt = torch.randint(3, 32000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ours_lora, peer_lora = lora_pair(base, hf, "lora", 0)
    for _, layer in mor.adapter_layers(ours_lora):
        layer.merge()
    peer_lora = peer_lora.merge_and_unload()
    for label, ours, peer in (("base", base, hf), ("merged LoRA R8", ours_lora.eval(), peer_lora.eval())):
        def run_ours(m=ours):
            return llama.generate(m, prompt.tolist(), args.new_tokens)[0]

        @torch.inference_mode()
        def run_peer(m=peer):
            out = m.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[0, args.prompt_len:].tolist()
        a, b, ra, rb = alternate(run_ours, run_peer, args.rounds)
        print(f"# {label}: generated tokens {'identical' if ra == rb else 'DIFFERENT'}")
        report(f"greedy decode {args.new_tokens} tokens, {label}", a, b, "tok/s", args.new_tokens, 1.0)


def part_train(args) -> None:
    params = llama.ModelArgs(dim=1024, n_layers=4, n_heads=16, vocab_size=32000, multiple_of=256,
                             max_seq_len=256, max_batch_size=1)
    base = random_base(params, torch.device("cpu"), torch.float32, 0).requires_grad_(False)
    hf = to_hf(base).requires_grad_(False)
    tokens = torch.randint(3, 32000, (1, 257), generator=torch.Generator().manual_seed(0))
    for method in ("lora", "dora"):
        ours, peer = lora_pair(base, hf, method, 0)

        def stepper(model, logits_of):
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

            def step():
                loss = F.cross_entropy(logits_of(model, tokens[:, :-1]).flatten(0, 1), tokens[0, 1:])
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()
            return step
        a, b, _, _ = alternate(stepper(ours, lambda m, x: m(x)), stepper(peer, lambda m, x: m(input_ids=x).logits),
                               args.rounds)
        report(f"training step {method} R8, 256 tokens", a, b, "step/s", 1, 1.0)


LOAD_CHILD = {   # argv[1]: the checkpoint folder; prints the seconds from the load call to the logits, and them
    "ours": "import llama; model = llama.Transformer.from_checkpoint(d, dtype=torch.bfloat16); fwd = model",
    "peer": "import transformers; model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16); "
            "fwd = lambda x: model(input_ids=x).logits",
}


def load_child(side: str, ckpt: str) -> tuple[float, float, torch.Tensor]:
    """(load call -> logits seconds, whole process seconds, logits) of one fresh process."""
    code = ("import json, sys, time, torch; d = sys.argv[1]; t0 = time.perf_counter(); " + LOAD_CHILD[side] + "\n"
            "with torch.no_grad(): y = fwd(torch.arange(1, 9)[None]).float()\n"
            "print(json.dumps([time.perf_counter() - t0, y[0, -1, :64].tolist()]))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, ckpt], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{side} load failed:\n{out.stderr[-2000:]}")
    seconds, logits = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, wall, torch.tensor(logits)


def part_load(args) -> None:
    import load as bench_load   # bench/load.py: the synthetic Meta-layout checkpoint
    tmp = tempfile.mkdtemp(prefix="peers_load_")
    try:
        meta_dir, hf_dir = os.path.join(tmp, "meta"), os.path.join(tmp, "hf")
        os.makedirs(meta_dir)
        params, vocab = bench_load.config_for(args.load_gb * 1e9, 2)
        size = bench_load.write_checkpoint(meta_dir, params, vocab, 1, torch.bfloat16)
        hf = to_hf(llama.Transformer.from_checkpoint(meta_dir, dtype=torch.bfloat16))
        hf.to(torch.bfloat16).save_pretrained(hf_dir)
        del hf
        print(f"# load: {size / 1e9:.2f} GB bf16 (dim {params['dim']}, {params['n_layers']} layers, vocab {vocab}); "
              f"HF safetensors {sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)) / 1e9:.2f} GB")
        times, logits = {"ours": [], "peer": []}, {}
        for k in range(args.rounds + 1):
            for side in (("ours", "peer") if k % 2 == 0 else ("peer", "ours")):
                seconds, wall, logits[side] = load_child(side, meta_dir if side == "ours" else hf_dir)
                times[side].append((seconds, wall))
        print(f"# load: logits of the last position (64 of them, up to {logits['ours'].abs().max().item():.3g} in "
              f"size) differ by at most {(logits['ours'] - logits['peer']).abs().max().item():.3g} (bf16 on both sides)")
        for i, work in enumerate(("load call -> logits of 8 tokens", "fresh process, start to exit")):
            a = statistics.median(t[i] for t in times["ours"][1:])
            b = statistics.median(t[i] for t in times["peer"][1:])
            print(f"{work:42s} ours {a:6.2f} s  peer {b:6.2f} s  ratio {b / a:.3f}  "
                  f"(ours: {', '.join(f'{t[i]:.2f}' for t in times['ours'][1:])}; "
                  f"peer: {', '.join(f'{t[i]:.2f}' for t in times['peer'][1:])})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--ckpt_dir", default="../shared/models/stories260K")
    ap.add_argument("--data_dir", default="../shared/benchmarks")
    ap.add_argument("--parts", default="eval,decode,train")
    ap.add_argument("--items", type=int, default=200, help="eval: first N items of each task")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load_gb", type=float, default=2.17, help="load: checkpoint size in GB")
    args = ap.parse_args(argv)
    import lm_eval
    import peft
    print(f"# bench/peers.py: torch {torch.__version__} ({torch.get_num_threads()} thread(s)), transformers "
          f"{transformers.__version__}, lm-eval {lm_eval.__version__}, peft {peft.__version__}; "
          f"{args.rounds} alternating rounds, ratio = peer median time / ours (> 1: ours faster)")
    for part in args.parts.split(","):
        dict(eval=part_eval, decode=part_decode, train=part_train, load=part_load)[part.strip()](args)


if __name__ == "__main__":
    main()
