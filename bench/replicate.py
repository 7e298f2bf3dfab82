"""Does MoR beat LoRA? A small replication of the paper's Tables 1, 3 and 4 that runs on a CPU.

    python bench/replicate.py --out_dir out/replicate            # the full grid (~45 min on 2 busy cores)
    python bench/replicate.py --out_dir out/replicate --report   # rebuild results.md from results.jsonl
    python bench/replicate.py --quick --out_dir /tmp/rq          # the pipeline, tiny (well under 3 minutes)

The task family (docs/replication.md): each task maps a string of L symbols to another, position by position,
through its own permutation of the alphabet for every position; the task is named in the prompt
("task 17: c a h b") and the answer is the mapped string ("h d a e"). All tasks share the inputs and the
vocabulary but disagree on every answer, so one low-rank update must store several conflicting mappings:
the situation where mixing experts (MoR, MoELoRA) should help. A small LLaMA is pretrained (all weights) on
24 such tasks and written in Meta's layout; it then knows the format and how to apply a mapping, but not
the tuning tasks' mappings, which are disjoint. Every method is tuned on the same 8 (or 4, 16) tasks, scored
on unseen inputs by evaluate.py's multiple-choice scoring: the gold string against the same input mapped by
three other tuning tasks (chance 25 %).

Protocol: an lr sweep per method on seed 0 (chosen on a validation split), then more seeds at the chosen lr
with a fixed data split; ablations (Ω initialisation, balance-loss coefficient) and the 4/16-task variants
reuse their parent method's lr. Runs go to results.jsonl as they finish (one line each); a rerun skips the
runs already there, so an interrupted grid continues where it stopped. results.md is written at the end.
Every run is train.train on a JSONL file, as a user would run it; nothing here is part of the trainer.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/replicate.py`: make train.py, mor.py importable
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import mor  # noqa: E402
import train  # noqa: E402
from demo.demo import write_meta_checkpoint  # noqa: E402
from llama import ModelArgs, Tokenizer, Transformer  # noqa: E402
from tools.table2 import count_parameters  # noqa: E402

# ----------------------------------------------------------------------------- settings

# label -> TrainConfig fields. alpha 32 for every adapter, as the paper (§4.1).
METHODS = {
    "LoRA R8": dict(method="lora", r=8),
    "LoRA R16": dict(method="lora", r=16),
    "DoRA R8": dict(method="dora", r=8),
    "MoELoRA E2R8": dict(method="moelora", r=8, num_experts=2),
    "MoR E1R8": dict(method="mor", r=8, num_experts=1),
    "MoR E2R8": dict(method="mor", r=8, num_experts=2),
    "MoR E4R8": dict(method="mor", r=8, num_experts=4),
    "MoR E8R8": dict(method="mor", r=8, num_experts=8),
    "MoR E8R8 mean": dict(method="mor", r=8, num_experts=8, router="mean"),
    "MoR E8R8 balanced": dict(method="mor", r=8, num_experts=8, router="balanced"),
    "Full FT": dict(method="full"),
}
BASELINE = "LoRA R8"
# the paper's claims as paired comparisons (a - b over the seeds both have): Tables 1, 3, 4 and the ablations
CLAIMS = [("MoR E8R8", "LoRA R8"), ("MoR E8R8", "LoRA R16"), ("MoR E8R8", "MoELoRA E2R8"), ("MoR E8R8", "DoRA R8"),
          ("MoR E2R8", "MoR E1R8"), ("MoR E4R8", "MoR E2R8"), ("MoR E8R8", "MoR E4R8"), ("MoR E8R8", "MoR E1R8"),
          ("MoR E8R8", "MoR E8R8 mean"), ("MoR E8R8", "MoR E8R8 balanced"), ("LoRA R16", "LoRA R8"),
          ("MoR E8R8 Ω=1+N(0,σ²)", "MoR E8R8"), ("MoR E8R8 balanced, averaged", "MoR E8R8 balanced"),
          ("Full FT", "MoR E8R8")]


@dataclass
class Setup:
    """Everything that fixes the task, the base and the grid."""
    n_symbols: int = 16            # alphabet a, b, c, ... (8 was too easy: every method near 98 % at 300 steps)
    length: int = 4                # symbols per input
    per_position: bool = True      # each position has its own permutation (else one per task)
    n_pretrain_tasks: int = 24     # the base learns these (disjoint from the tuning tasks)
    n_tune_tasks: int = 8          # the main grid; task_counts adds variants
    task_counts: list = field(default_factory=lambda: [4, 16])
    n_train: int = 256             # training examples per tuning task (fixed split)
    n_val: int = 100               # validation items per task (lr sweep)
    n_test: int = 500              # held-out items per task
    n_pretrain: int = 400          # pretraining examples per pretraining task
    base: dict = field(default_factory=lambda: dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32,
                                                    norm_eps=1e-5, rope_theta=10000.0))
    pretrain_steps: int = 5000
    pretrain_lr: float = 1e-3      # 3e-3 left the base at chance on the mappings after 2000 steps
    steps: int = 250               # tuning steps per run: LoRA R8 62 % at 200, 82 % at 300 (calibration, seed 0)
    batch: int = 16
    dropout: float = 0.05
    lrs: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    full_lrs: list = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    seeds: int = 10
    variant_seeds: int = 5         # seeds of the 4/16-task variants
    methods: list = field(default_factory=lambda: list(METHODS))
    ablations: bool = True
    omega_std: float = 0.1         # the ablation's Ω = 1 + N(0, σ²)
    data_seed: int = 1234


QUICK = dict(n_symbols=8, n_tune_tasks=4, task_counts=[], n_train=32, n_val=10, n_test=20, n_pretrain=40, n_pretrain_tasks=6,
             base=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, norm_eps=1e-5,
                       rope_theta=10000.0),
             pretrain_steps=30, steps=8, batch=8, lrs=[3e-3], full_lrs=[1e-3], seeds=2, variant_seeds=0,
             methods=["LoRA R8", "MoR E2R8", "Full FT"], ablations=False)

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """Two-sided 95 % Student t quantile (table for df ≤ 30, normal beyond)."""
    return T975[df - 1] if df <= len(T975) else 1.96


def paired_interval(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Mean of xs[i] - ys[i] and the half-width of its 95 % t-interval (nan with fewer than 2 pairs)."""
    d = [x - y for x, y in zip(xs, ys)]
    if len(d) < 2:
        return (d[0] if d else math.nan), math.nan
    return statistics.mean(d), t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))


# ----------------------------------------------------------------------------- the task family

def make_tasks(n: int, n_symbols: int, length: int, seed: int, per_position: bool = True) -> list[list[list[int]]]:
    """n tasks, each a list of `length` random permutations of range(n_symbols): one per position, or
    (per_position=False) the same one at every position."""
    rng = random.Random(seed)
    if not per_position:
        return [[perm] * length for perm in (rng.sample(range(n_symbols), n_symbols) for _ in range(n))]
    return [[rng.sample(range(n_symbols), n_symbols) for _ in range(length)] for _ in range(n)]


def apply_task(perms: list[list[int]], x: list[int]) -> list[int]:
    """The task's answer: position p's symbol goes through position p's permutation."""
    return [perms[p][s] for p, s in enumerate(x)]


def spell(x: list[int]) -> str:
    return " ".join(chr(ord("a") + s) for s in x)


def question(task_id: int, x: list[int]) -> str:
    return f"task {task_id}: {spell(x)}"


def task_ids(s: Setup) -> tuple[list[int], list[int]]:
    """(pretraining ids, tuning ids): one shuffled numbering, so tuning names look like pretraining names."""
    ids = list(range(s.n_pretrain_tasks + max([s.n_tune_tasks] + s.task_counts)))
    random.Random(s.data_seed).shuffle(ids)
    return ids[:s.n_pretrain_tasks], ids[s.n_pretrain_tasks:]


def all_tasks(s: Setup) -> dict[int, list[list[int]]]:
    pre, tune = task_ids(s)
    ids = pre + tune
    return dict(zip(ids, make_tasks(len(ids), s.n_symbols, s.length, s.data_seed + 1, s.per_position)))


def split_inputs(s: Setup, task_id: int) -> dict[str, list[list[int]]]:
    """Disjoint train / val / test inputs of one tuning task (the same split for every run)."""
    need = s.n_train + s.n_val + s.n_test
    if need > s.n_symbols ** s.length:
        raise ValueError(f"{need} inputs per task, but only {s.n_symbols ** s.length} exist")
    rng = random.Random(s.data_seed * 1000 + task_id)
    picks = rng.sample(range(s.n_symbols ** s.length), need)
    xs = [[(k // s.n_symbols ** p) % s.n_symbols for p in range(s.length)] for k in picks]
    return dict(train=xs[:s.n_train], val=xs[s.n_train:s.n_train + s.n_val], test=xs[s.n_train + s.n_val:])


def chat_row(task_id: int, perms: list[list[int]], x: list[int]) -> dict:
    return {"messages": [{"role": "user", "content": question(task_id, x)},
                         {"role": "assistant", "content": spell(apply_task(perms, x))}]}


def mc_item(task_id: int, tasks: dict, others: list[int], x: list[int], rng: random.Random) -> dict:
    """Gold = this task's answer; distractors = the same input under three other tuning tasks (conflicting
    mappings), topped up with one-symbol corruptions of the gold if some coincide."""
    gold = spell(apply_task(tasks[task_id], x))
    choices = [gold]
    for o in rng.sample(others, len(others)):
        c = spell(apply_task(tasks[o], x))
        if c not in choices and len(choices) < 4:
            choices.append(c)
    while len(choices) < 4:
        y = apply_task(tasks[task_id], x)
        y[rng.randrange(len(y))] = rng.randrange(len(tasks[task_id][0]))
        if spell(y) not in choices:
            choices.append(spell(y))
    rng.shuffle(choices)
    return {"context": data.chat_prompt(question(task_id, x)), "choices": choices, "gold": choices.index(gold)}


def task_data(s: Setup, n_tasks: int) -> dict:
    """Training rows and val/test multiple-choice items {task name: items} of the first n_tasks tuning tasks."""
    tasks, (_, tune) = all_tasks(s), task_ids(s)
    active = tune[:n_tasks]
    rng = random.Random(s.data_seed + n_tasks)
    rows, val, test = [], {}, {}
    for t in active:
        split = split_inputs(s, t)
        rows += [chat_row(t, tasks[t], x) for x in split["train"]]
        others = [o for o in active if o != t]
        val[f"task {t}"] = [mc_item(t, tasks, others, x, rng) for x in split["val"]]
        test[f"task {t}"] = [mc_item(t, tasks, others, x, rng) for x in split["test"]]
    return {"train": rows, "val": val, "test": test}


# ----------------------------------------------------------------------------- the base

def fingerprint(s: Setup) -> str:
    """Hash of what the base depends on: a cached base is reused only for the same settings."""
    keys = ("n_symbols", "length", "per_position", "n_pretrain_tasks", "n_tune_tasks", "task_counts", "n_pretrain", "base",
            "pretrain_steps", "pretrain_lr", "data_seed")
    return hashlib.sha1(json.dumps({k: getattr(s, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:10]


def build_base(s: Setup, out_dir: str) -> str:
    """Pretrain the small LLaMA on the pretraining tasks (all weights) and write it in Meta's layout; cached."""
    base_dir = os.path.join(out_dir, f"base_{fingerprint(s)}")
    if os.path.isfile(os.path.join(base_dir, "consolidated.00.pth")):
        return base_dir
    work = base_dir + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    tasks, (pre, tune) = all_tasks(s), task_ids(s)
    rng = random.Random(s.data_seed + 7)
    rows = [chat_row(t, tasks[t], [rng.randrange(s.n_symbols) for _ in range(s.length)])
            for t in pre for _ in range(s.n_pretrain)]
    rng.shuffle(rows)
    # the tokenizer sees every task name and symbol, tuning ones included, so no tuning name is an unknown piece
    texts = [data.format_chat(r["messages"]) for r in rows] + [question(t, [0] * s.length) for t in tune]
    tok = data.train_tokenizer(texts, os.path.join(work, "tokenizer.model"), vocab_size=320)
    params = dict(s.base, vocab_size=Tokenizer(tok).n_words)
    torch.manual_seed(s.data_seed)
    rand = write_meta_checkpoint(os.path.join(work, "random"), params, Transformer(ModelArgs(**params)).state_dict(),
                                 tok)
    cfg = train.TrainConfig(ckpt_dir=rand, data=[data.write_jsonl(rows, os.path.join(work, "pretrain.jsonl"))],
                            method="full", lr=s.pretrain_lr, val_size=0, max_steps=s.pretrain_steps,
                            global_batch=32, micro_batch=32, max_len=64, pad_to_multiple=8, progress=True,
                            ckpt_every=10**9, seed=0, dropout=0.0, out_dir=os.path.join(work, "run"))
    model = train.train(cfg)
    write_meta_checkpoint(work, params, model.state_dict(), tok)
    for sub in ("random", "run"):
        shutil.rmtree(os.path.join(work, sub))
    shutil.rmtree(base_dir, ignore_errors=True)
    os.rename(work, base_dir)   # complete or absent: a killed pretraining leaves only the .tmp folder
    return base_dir


# ----------------------------------------------------------------------------- one run

@contextlib.contextmanager
def omega_noise(std: float):
    """While active, MoR layers start from Ω = 1 + N(0, std²) instead of mor.py's ones (the ablation).
    train.prepare_model is wrapped rather than mor.py changed: the noise is drawn right after add_adapters,
    from the run's seed, so the rest of the run is the stock trainer."""
    if not std:
        yield
        return
    stock = train.prepare_model

    def prepare(model, cfg):
        stock(model, cfg)
        g = torch.Generator().manual_seed(cfg.seed + 99)
        with torch.no_grad():
            for _, m in mor.adapter_layers(model):
                if isinstance(m, mor.MoRLinear):
                    for p in (m.omega_A, m.omega_B):
                        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    train.prepare_model = prepare
    try:
        yield
    finally:
        train.prepare_model = stock


def omega_spread(model: torch.nn.Module) -> dict | None:
    """How different the experts are: per MoR layer, std over experts / |mean| of each Ω entry, averaged over
    entries and layers (0 when every expert is the same rescaling). None without multi-expert MoR layers."""
    out = {"A": [], "B": []}
    for _, m in mor.adapter_layers(model):
        if isinstance(m, mor.MoRLinear) and m.num_experts > 1:
            for k, p in (("A", m.omega_A), ("B", m.omega_B)):
                w = p.detach().float()
                out[k].append(float((w.std(0) / w.mean(0).abs().clamp(min=1e-8)).mean()))
    return {k: statistics.mean(v) for k, v in out.items()} if out["A"] else None


def routed_layers(model: torch.nn.Module) -> list:
    return [m for _, m in mor.adapter_layers(model) if hasattr(m, "record_router") and m.router_kind != "mean"
            and m.num_experts > 1]


def score(model, tokenizer, items: dict[str, list[dict]], routers: list | None = None) -> tuple[dict, dict]:
    """Accuracy per task and over all items (evaluate.py's scoring); with routers, the entropy (nats, divided
    by log N) of each layer's mean router weights over the task's tokens, averaged over layers (Fig. 7's view:
    low = the task picks a few experts)."""
    acc, entropy = {}, {}
    for name, its in items.items():
        for m in routers or []:
            m.router_sum.zero_()
            m.router_count.zero_()
            m.record_router = True
        acc[name] = evaluate.score_multiple_choice(model, tokenizer, its, batch_size=64, delimiter="")["acc"]
        if routers:
            hs = []
            for m in routers:
                m.record_router = False
                p = (m.router_sum / m.router_count.clamp(min=1)).clamp(min=1e-12)
                hs.append(float(-(p * p.log()).sum() / math.log(m.num_experts)))
            entropy[name] = statistics.mean(hs)
    acc["all"] = sum(acc[n] * len(items[n]) for n in items) / sum(len(v) for v in items.values())
    return acc, entropy


def run_one(spec: dict) -> dict:
    """Train one configuration with train.train and score it; the run folder is deleted afterwards."""
    t0 = time.time()
    s = Setup(**spec["setup"])
    d = json.load(open(spec["data_path"]))
    run_dir = os.path.join(spec["out_dir"], "runs", spec["key"].replace(" ", "_").replace("|", "_"))
    shutil.rmtree(run_dir, ignore_errors=True)   # a run killed half-way starts over
    hyper = {k: v for k, v in METHODS[spec["label"]].items()}
    hyper.update(spec.get("override", {}))
    cfg = train.TrainConfig(ckpt_dir=spec["base"], data=[spec["train_path"]], lr=spec["lr"], val_size=0,
                            max_steps=s.steps, global_batch=s.batch, micro_batch=s.batch, max_len=64,
                            pad_to_multiple=8, progress=False, ckpt_every=10**9, seed=spec["seed"],
                            dropout=s.dropout, device="cpu", out_dir=run_dir, **hyper)
    with omega_noise(spec.get("omega_std", 0.0)), contextlib.redirect_stdout(io.StringIO()):
        model = train.train(cfg)
    model.eval()
    tokenizer = Tokenizer(os.path.join(spec["base"], "tokenizer.model"))
    val, _ = score(model, tokenizer, d["val"])
    test, entropy = score(model, tokenizer, d["test"], routed_layers(model))
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    shutil.rmtree(run_dir, ignore_errors=True)
    return dict(key=spec["key"], phase=spec["phase"], label=spec["label"], variant=spec["variant"],
                method=cfg.method, r=cfg.r, num_experts=cfg.num_experts, router=cfg.router,
                balance_coef=cfg.balance_coef, omega_std=spec.get("omega_std", 0.0), n_tasks=spec["n_tasks"],
                seed=spec["seed"], lr=spec["lr"], acc=test["all"], acc_val=val["all"],
                acc_before=spec["acc_before"], per_task={k: v for k, v in test.items() if k != "all"},
                params=count_parameters(model)[0], omega_spread=omega_spread(model),
                router_entropy=entropy or None, loss_first=log[0]["loss"], loss_last=log[-1]["loss"],
                time_s=round(time.time() - t0, 1))


def worker_init() -> None:
    torch.set_num_threads(1)   # tiny matrices: one thread per process, processes in parallel


# ----------------------------------------------------------------------------- the grid

def variants(s: Setup, out_dir: str) -> list[dict]:
    """(variant name, label, n_tasks, overrides, omega_std, parent label for the lr, seeds) of the grid."""
    out = [dict(variant=m, label=m, n_tasks=s.n_tune_tasks, override={}, omega_std=0.0, parent=None,
                seeds=s.seeds) for m in s.methods]
    if s.ablations and "MoR E8R8" in s.methods:
        out.append(dict(variant="MoR E8R8 Ω=1+N(0,σ²)", label="MoR E8R8", n_tasks=s.n_tune_tasks, override={},
                        omega_std=s.omega_std, parent="MoR E8R8", seeds=s.seeds))
    if s.ablations and "MoR E8R8 balanced" in s.methods:
        n_layers = s.base["n_layers"] * 3   # w1, w2, w3 of every block
        out.append(dict(variant="MoR E8R8 balanced, averaged", label="MoR E8R8 balanced", n_tasks=s.n_tune_tasks,
                        override=dict(balance_coef=0.01 / n_layers), omega_std=0.0, parent="MoR E8R8 balanced",
                        seeds=s.seeds))
    for n in s.task_counts:
        for m in (BASELINE, "MoR E8R8"):
            if m in s.methods:
                out.append(dict(variant=f"{m}, {n} tasks", label=m, n_tasks=n, override={}, omega_std=0.0,
                                parent=m, seeds=s.variant_seeds))
    return out


def run_key(v: dict, seed: int, lr: float) -> str:
    return f"{v['variant']}|seed{seed}|lr{lr:g}"


def load_results(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut by a kill: that run is redone
                    print(f"warning: {path}:{i}: unreadable line skipped (the run will be redone)", file=sys.stderr)
    return out


def chosen_lr(results: list[dict], variant: str) -> float | None:
    """The sweep's lr with the best validation accuracy (seed 0); the smaller lr on a tie."""
    sweep = sorted((r for r in results if r["variant"] == variant and r["phase"] == "sweep"), key=lambda r: r["lr"])
    return max(sweep, key=lambda r: r["acc_val"])["lr"] if sweep else None


def execute(specs: list[dict], workers: int, results_path: str, desc: str) -> list[dict]:
    """Run specs (in parallel processes), appending each result to results.jsonl as it finishes."""
    from tqdm import tqdm
    done = []
    if not specs:
        return done
    bar = tqdm(total=len(specs), desc=desc, unit="run", dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, initializer=worker_init))
            it = pool.imap_unordered(run_one, specs)
        else:
            worker_init()
            it = map(run_one, specs)
        for rec in it:
            with open(results_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            done.append(rec)
            bar.set_postfix_str(f"{rec['variant']} seed {rec['seed']}: {rec['acc']:.3f}")
            bar.update(1)
    bar.close()
    return done


def prepare_data(s: Setup, out_dir: str, base: str) -> dict[int, dict]:
    """Per task count: training JSONL, items JSON and the base's accuracy before tuning (all cached)."""
    out = {}
    tokenizer = None
    for n in sorted({s.n_tune_tasks, *s.task_counts}):
        prefix = os.path.join(out_dir, f"data_{fingerprint(s)}_{n}tasks")
        d = task_data(s, n)
        train_path = data.write_jsonl(d["train"], prefix + ".jsonl")
        with open(prefix + ".items.json", "w") as f:
            json.dump({"val": d["val"], "test": d["test"]}, f)
        before_path = prefix + ".before.json"
        if not os.path.isfile(before_path):
            tokenizer = tokenizer or Tokenizer(os.path.join(base, "tokenizer.model"))
            acc, _ = score(Transformer.from_checkpoint(base).eval(), tokenizer, d["test"])
            with open(before_path, "w") as f:
                json.dump(acc, f)
        out[n] = dict(train_path=train_path, data_path=prefix + ".items.json",
                      acc_before=json.load(open(before_path))["all"])
    return out


def grid(s: Setup, out_dir: str, workers: int) -> list[dict]:
    """Phase 1: the lr sweep (seed 0, every method); phase 2: the other seeds, ablations and variants."""
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the base and the before-scores run here, the runs in the workers
    try:
        return _grid(s, out_dir, workers)
    finally:
        torch.set_num_threads(threads)


def _grid(s: Setup, out_dir: str, workers: int) -> list[dict]:
    base = build_base(s, out_dir)
    per_n = prepare_data(s, out_dir, base)
    results_path = os.path.join(out_dir, "results.jsonl")
    vs = variants(s, out_dir)

    def spec(v: dict, seed: int, lr: float, phase: str) -> dict:
        return dict(key=run_key(v, seed, lr), phase=phase, label=v["label"], variant=v["variant"], seed=seed, lr=lr,
                    n_tasks=v["n_tasks"], override=v["override"], omega_std=v["omega_std"], base=base,
                    out_dir=out_dir, setup=asdict(s), **per_n[v["n_tasks"]])

    have = {r["key"] for r in load_results(results_path)}
    sweep = [spec(v, 0, lr, "sweep") for v in vs if v["parent"] is None
             for lr in (s.full_lrs if METHODS[v["label"]]["method"] == "full" else s.lrs)]
    execute([p for p in sweep if p["key"] not in have], workers, results_path, "lr sweep")
    results = load_results(results_path)
    have = {r["key"] for r in results}
    seeds = []
    for seed in range(max(v["seeds"] for v in vs)):   # seed-major: a cut-short grid has even seed counts
        for v in vs:
            lr = chosen_lr(results, v["parent"] or v["variant"])
            if seed < v["seeds"] and lr is not None and (v["parent"] is not None or seed > 0):
                seeds.append(spec(v, seed, lr, "seed"))
    execute([p for p in seeds if p["key"] not in have], workers, results_path, "seeds")
    return load_results(results_path)


# ----------------------------------------------------------------------------- the report

def final_runs(results: list[dict]) -> dict[str, dict[int, dict]]:
    """{variant: {seed: record}} at each variant's chosen lr (its parent's for ablations and variants)."""
    parent = {r["variant"]: (r["label"] if r["phase"] == "seed" and r["variant"] != r["label"] else r["variant"])
              for r in results}
    out: dict[str, dict[int, dict]] = {}
    for r in results:
        lr = chosen_lr(results, parent[r["variant"]])
        if lr is not None and r["lr"] == lr:
            out.setdefault(r["variant"], {})[r["seed"]] = r
    return out


def pm(xs: list[float], scale: float = 100.0) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else math.nan
    return f"{statistics.mean(xs) * scale:.1f} ± {sd:.1f}"


def diag(runs: list[dict]) -> tuple[str, str]:
    """Mean Ω spread (Ω_B) and mean router entropy over runs, '-' where a method has none."""
    om = [r["omega_spread"]["B"] for r in runs if r.get("omega_spread")]
    ent = [statistics.mean(r["router_entropy"].values()) for r in runs if r.get("router_entropy")]
    return (f"{statistics.mean(om):.3f}" if om else "-", f"{statistics.mean(ent):.3f}" if ent else "-")


def report(results: list[dict]) -> str:
    """results.md: the main table (mean ± std over seeds, paired Δ vs LoRA R8 with 95 % t-interval), the lr
    sweep and the router entropy per task."""
    runs = final_runs(results)
    lines = ["| method | tasks | lr | trainable params | seeds | acc % (mean ± std) | Δ vs LoRA R8 (paired, 95 % CI) "
             "| acc before % | Ω_B spread | router entropy |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["variant"] for r in results))
    for v in order:
        if v not in runs:
            continue
        rs = runs[v]
        any_r = next(iter(rs.values()))
        base_v = next((b for b in runs if b.startswith(BASELINE) and runs[b] and
                       next(iter(runs[b].values()))["n_tasks"] == any_r["n_tasks"]), None)
        seeds = sorted(rs)
        delta = "-"
        if base_v and base_v != v:
            common = [k for k in seeds if k in runs[base_v]]
            m, h = paired_interval([rs[k]["acc"] for k in common], [runs[base_v][k]["acc"] for k in common])
            delta = f"{m * 100:+.1f} ± {h * 100:.1f} (n={len(common)})" if common else "-"
        om, ent = diag(list(rs.values()))
        lines.append(f"| {v} | {any_r['n_tasks']} | {any_r['lr']:g} | {any_r['params']:,} | {len(seeds)} | "
                     f"{pm([rs[k]['acc'] for k in seeds])} | {delta} | {any_r['acc_before'] * 100:.1f} | {om} | {ent} |")
    lines += ["", "Paired differences (a − b, accuracy points, mean over the seeds both have, 95 % t-interval):", "",
              "| a | b | a − b | seeds |", "|---|---|---|---|"]
    for a, b in CLAIMS + [(f"MoR E8R8, {n} tasks", f"{BASELINE}, {n} tasks") for n in (4, 16)]:
        if a in runs and b in runs:
            common = sorted(set(runs[a]) & set(runs[b]))
            m, h = paired_interval([runs[a][k]["acc"] for k in common], [runs[b][k]["acc"] for k in common])
            lines.append(f"| {a} | {b} | {m * 100:+.1f} ± {h * 100:.1f} | {len(common)} |")
    sweep = [r for r in results if r["phase"] == "sweep"]
    lrs = sorted({r["lr"] for r in sweep})
    lines += ["", "lr sweep, seed 0, validation accuracy % (the chosen lr in bold):", "",
              "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for v in dict.fromkeys(r["variant"] for r in sweep):
        best = chosen_lr(results, v)
        cells = {r["lr"]: (f"**{r['acc_val'] * 100:.1f}**" if r["lr"] == best else f"{r['acc_val'] * 100:.1f}")
                 for r in sweep if r["variant"] == v}
        lines.append(f"| {v} | " + " | ".join(cells.get(lr, "") for lr in lrs) + " |")
    routed = [v for v in order if v in runs and any(r.get("router_entropy") for r in runs[v].values())]
    if routed:
        tasks = list(next(r for r in runs[routed[0]].values() if r.get("router_entropy"))["router_entropy"])
        lines += ["", "Router entropy per task (mean router weights over the task's tokens, entropy / log N, "
                  "mean over layers and seeds; 1 = uniform):", "",
                  "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for v in routed:
            ents = [r["router_entropy"] for r in runs[v].values() if r.get("router_entropy")]
            if set(ents[0]) == set(tasks):
                lines.append(f"| {v} | " + " | ".join(f"{statistics.mean(e[t] for e in ents):.3f}" for t in tasks)
                             + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str) -> str:
    path = os.path.join(out_dir, "results.jsonl")
    results = load_results(path)
    if not results:
        raise FileNotFoundError(f"{path}: no results (run the grid first, with the same --out_dir)")
    md = report(results)
    tmp = os.path.join(out_dir, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(out_dir, "results.md"))
    return md


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Setup]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", default="out/replicate", help="base cache, results.jsonl, results.md")
    ap.add_argument("--quick", action="store_true", help="the pipeline on a tiny setting (3 methods x 2 seeds)")
    ap.add_argument("--report", action="store_true", help="only rebuild results.md from results.jsonl")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes, one thread each")
    ap.add_argument("--seeds", type=int, help=f"seeds per method (default {Setup.seeds}; --quick 2)")
    ap.add_argument("--steps", type=int, help=f"tuning steps per run (default {Setup.steps})")
    ap.add_argument("--methods", nargs="+", help=f"a subset of: {', '.join(METHODS)}")
    ap.add_argument("--n_test", type=int, help=f"held-out items per task (default {Setup.n_test})")
    args = ap.parse_args(argv)
    s = Setup(**(QUICK if args.quick else {}))
    for k in ("seeds", "steps", "methods", "n_test"):
        if getattr(args, k) is not None:
            s = replace(s, **{k: getattr(args, k)})
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    if args.workers < 1 or s.seeds < 1 or s.steps < 1 or s.n_test < 1:
        ap.error("--workers, --seeds, --steps and --n_test must be positive")
    return args, s


def main(argv: list[str] | None = None) -> None:
    args, s = parse_args(argv)
    try:
        if not args.report:
            t0 = time.time()
            grid(s, args.out_dir, args.workers)
            print(f"grid done in {time.time() - t0:.0f} s", flush=True)
        print(write_report(args.out_dir), end="")
    except (FileNotFoundError, ValueError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
