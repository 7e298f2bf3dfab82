"""The no-download demo that `python train.py` runs with no arguments: MoR instruction tuning end
to end on CPU.

It drives train.py and evaluate.py exactly as a user would (a Meta-layout checkpoint on disk, a JSONL
file, a TrainConfig); nothing here is part of the trainer. Each run starts over in out/demo. It
imports train.py, so train.py imports it only in its `__main__` block (no import cycle).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import torch

import data
import evaluate
import train
from llama import ModelArgs, Tokenizer, Transformer

DEMO_PARAMS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5,
                   rope_theta=10000.0)


def write_meta_checkpoint(ckpt_dir: str, params: dict, state_dict: dict, tokenizer_path: str | None = None) -> str:
    """params.json + consolidated.00.pth (+ tokenizer.model) in Meta's layout: what from_checkpoint reads."""
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()},
               os.path.join(ckpt_dir, "consolidated.00.pth"))
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        json.dump(params, f)
    if tokenizer_path and os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(ckpt_dir, "tokenizer.model")):
        shutil.copyfile(tokenizer_path, os.path.join(ckpt_dir, "tokenizer.model"))
    return ckpt_dir


def mc_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, mc: dict[str, list[dict]]) -> dict[str, float]:
    """Held-out multiple-choice accuracy per skill (evaluate.py's scoring) and over all items."""
    accs = {name: evaluate.score_multiple_choice(model, tokenizer, items, batch_size=64, delimiter=" ")["acc"]
            for name, items in mc.items()}
    accs["all"] = sum(accs[n] * len(mc[n]) for n in mc) / sum(len(items) for items in mc.values())
    return accs


def demo(out_dir: str = "out/demo", n_per_skill: int = 400, n_eval: int = 50, pretrain_steps: int = 600,
         steps: int = 300, progress: bool = True) -> dict:
    """MoR instruction tuning end to end on CPU, nothing downloaded.

    1. Synthetic multi-task chat data (data.SKILLS) and an unseen multiple-choice split.
    2. A tiny random LLaMA written in Meta's layout (params.json, consolidated.00.pth, tokenizer.model).
    3. "Pretraining": a random frozen base cannot learn these skills through FFN adapters alone (like a real
       LLM, the base must already know things), so the base is first trained with --method full on plain
       "Q: ... A: ..." text of the same skills (other random draws, no chat template). It is written back to
       disk in Meta's layout as the base to tune.
    4. MoR (E8R8 on w1/w2/w3, as the paper) on the chat-format data, base loaded by Transformer.from_checkpoint.
    5. Held-out multiple-choice accuracy before and after, scored by evaluate.py.
    """
    t_start = time.time()
    # one thread: the matrices are tiny, and two threads on a busy 2-core machine wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(out_dir, n_per_skill, n_eval, pretrain_steps, steps, progress, t_start)
    finally:
        torch.set_num_threads(threads)


def _demo(out_dir: str, n_per_skill: int, n_eval: int, pretrain_steps: int, steps: int, progress: bool,
          t_start: float) -> dict:
    sft_rows = data.synthetic_tasks(n_per_skill, seed=0)
    mc = data.synthetic_mc(n_eval, seed=1, exclude=sft_rows)
    pre_rows = [{"prompt": "", "completion": f"Q: {r['messages'][0]['content']} A: {r['messages'][1]['content']}"}
                for r in data.synthetic_tasks(n_per_skill, seed=2)]
    for stage in ("pretrain", "mor"):   # the demo starts over: its training runs are regenerated, not resumed
        shutil.rmtree(os.path.join(out_dir, stage), ignore_errors=True)
    sft_path = data.write_jsonl(sft_rows, os.path.join(out_dir, "sft.jsonl"))
    pre_path = data.write_jsonl(pre_rows, os.path.join(out_dir, "pretrain.jsonl"))
    texts = [data.format_chat(r["messages"]) for r in sft_rows] + [r["completion"] for r in pre_rows]
    tok_path = data.train_tokenizer(texts, os.path.join(out_dir, "tokenizer.model"), vocab_size=512)
    tokenizer = Tokenizer(tok_path)
    params = dict(DEMO_PARAMS, vocab_size=tokenizer.n_words)
    torch.manual_seed(0)
    random_base = write_meta_checkpoint(os.path.join(out_dir, "random_base"), params,
                                        Transformer(ModelArgs(**params)).state_dict(), tok_path)
    common = dict(global_batch=16, micro_batch=16, max_len=128, pad_to_multiple=8, progress=progress,
                  ckpt_every=10**9, seed=0)
    print(f"[demo] 1/3 pretraining a tiny LLaMA ({params['n_layers']} layers, dim {params['dim']}) with "
          f"--method full on {len(pre_rows)} plain-text examples", flush=True)
    pre = train.train(train.TrainConfig(ckpt_dir=random_base, data=[pre_path], method="full", lr=3e-3, val_size=0,
                                        max_steps=pretrain_steps, out_dir=os.path.join(out_dir, "pretrain"), **common))
    base = write_meta_checkpoint(os.path.join(out_dir, "base"), params, pre.state_dict(), tok_path)
    before = mc_accuracy(Transformer.from_checkpoint(base), tokenizer, mc)
    print(f"[demo] 2/3 MoR instruction tuning on {len(sft_rows)} chat examples ({', '.join(data.SKILLS)})",
          flush=True)
    cfg = train.TrainConfig(ckpt_dir=base, data=[sft_path], method="mor", lr=3e-3, val_size=64,
                            eval_every=max(1, steps // 4), max_steps=steps, out_dir=os.path.join(out_dir, "mor"),
                            **common)
    model = train.train(cfg)
    model.eval()
    after = mc_accuracy(model, tokenizer, mc)
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    chance = {name: sum(1 / len(it["choices"]) for it in items) / len(items) for name, items in mc.items()}
    chance["all"] = sum(chance[n] * len(mc[n]) for n in mc) / sum(len(v) for v in mc.values())
    print(f"[demo] 3/3 held-out multiple choice ({n_eval} unseen questions per skill), accuracy:")
    print(f"  {'skill':<10}{'chance':>8}{'before':>8}{'after':>8}")
    for name in list(mc) + ["all"]:
        print(f"  {name:<10}{chance[name]:>8.2f}{before[name]:>8.2f}{after[name]:>8.2f}")
    first, last = sum(r["loss"] for r in log[:10]) / len(log[:10]), sum(r["loss"] for r in log[-10:]) / len(log[-10:])
    print(f"  MoR training loss {first:.3f} -> {last:.3f} (mean of first/last 10 steps); "
          f"adapter: {os.path.join(cfg.out_dir, 'adapter.pth')}; {time.time() - t_start:.0f} s in all")
    return {"before": before, "after": after, "chance": chance, "loss_first": first, "loss_last": last}


def main(**kw) -> None:
    """`python train.py` with no arguments. Ctrl-C (or SIGTERM) ends the whole demo: a later stage on a
    half-trained base would print other numbers, and the demo has nothing to resume (it starts over)."""
    try:
        demo(**kw)
    except (train.Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, train.Interrupted) else signal.SIGINT
        print(f"\n[demo] stopped by {signal.Signals(signum).name}; the demo ends here. Run `python train.py` to "
              "start it again (it starts over).", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
