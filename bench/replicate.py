"""Does MoR's mechanism pay? A small replication of the paper's comparisons that runs on a CPU, with bases,
task families and training budgets as factors.

    python bench/replicate.py --out_dir out/replicate            # the grid (docs/replication.md: its size, time)
    python bench/replicate.py --out_dir out/replicate --report   # rebuild results.md from results.jsonl
    python bench/replicate.py --out_dir out/replicate --rerun KEY  # run one finished row again, compare numbers
    python bench/replicate.py --quick --out_dir /tmp/rq          # the pipeline, tiny, and it learns (< 3 minutes)

Tasks map a string of L symbols to another, position by position; the task is named in the prompt
("task 17: c a h b") and the answer is the mapped string ("h d a e"). Two families (docs/replication.md):
"perm", every task its own random permutation per position (conflicting mappings, nothing shared), and
"shared", one common permutation per position followed by a small task-specific change (a few swapped
outputs), the structure MoR's shared (A, B) seen through per-expert rescalings is built for. A small LLaMA is
pretrained (all weights) on 24 tasks of the "perm" kind and written in Meta's layout; it knows the format and
how to apply a mapping, not the tuning tasks. A base is a random factor: each has its own pretraining seed,
task draw and data split. Every method is tuned on the same 8 tasks and scored on unseen inputs by
multiple choice: the gold string against the same input under three other tuning tasks (chance 25 %), each
answer scored on the tokens training taught (answer_logprobs).

Protocol: an lr sweep (4 points 2x apart, 2 seeds of their own, validation accuracy) on the first base, per
family and budget; then test seeds on every base at the chosen lr; the sweep's runs are not in the test mean.
Ablations (Ω's lr x 10, Ω = 1 + N(0, 0.1²)) reuse MoR's lr. Runs go to results.jsonl as they finish (one
line each); a rerun skips the runs already there, so an interrupted grid continues where it stopped. Every
run is train.train on a JSONL file, as a user would run it; nothing here is part of the trainer.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/replicate.py`: make train.py, mor.py importable
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data  # noqa: E402
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
FAMILIES = ("perm", "shared")
# the paper's claims and the ablations as paired comparisons (a - b); "MoR" stands for Setup.mor
CLAIMS = [("MoR", "LoRA R8"), ("MoR", "LoRA R16"), ("MoR", "MoELoRA E2R8"), ("LoRA R16", "LoRA R8"),
          ("MoELoRA E2R8", "LoRA R8"), ("MoR Ω lr ×10", "MoR"), ("MoR Ω=1+N(0,σ²)", "MoR"), ("Full FT", "MoR")]


@dataclass
class Setup:
    """Everything that fixes the tasks, the bases and the grid."""
    n_symbols: int = 16            # alphabet a, b, c, ... (8 was too easy: every method near 98 % at 300 steps)
    length: int = 4                # symbols per input
    n_pretrain_tasks: int = 24     # the base learns these (disjoint from the tuning tasks)
    n_tune_tasks: int = 8
    shared_swaps: int = 1          # "shared" family: swapped output pairs per position that make a task its own
    n_train: int = 256             # training examples per tuning task (fixed split per base)
    n_val: int = 100               # validation items per task (lr sweep)
    n_test: int = 250              # held-out items per task
    n_train_scored: int = 50       # training inputs per task also scored: fitting vs generalising
    n_pretrain: int = 400          # pretraining examples per pretraining task
    base: dict = field(default_factory=lambda: dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32,
                                                    norm_eps=1e-5, rope_theta=10000.0))
    pretrain_steps: int = 5000
    pretrain_lr: float = 1e-3      # 3e-3 left the base at chance on the mappings after 2000 steps
    bases: int = 3                 # base b: pretraining seed, task draw and split from data_seed + b
    families: list = field(default_factory=lambda: list(FAMILIES))
    # tuning steps: the steep part, and a plateau (calibration, docs/replication.md: on "shared" LoRA R8 test
    # accuracy 93.8 / 98.6 / 99.6 % at 250 / 500 / 1000 steps)
    budgets: list = field(default_factory=lambda: [250, 1000])
    # the families that also run the budgets after the first ("perm" is at its plateau at 250 steps: LoRA R8
    # 99.6 % in the calibration, so 1000 steps could only show a ceiling, at 4 x the time)
    long_families: list = field(default_factory=lambda: ["shared"])
    batch: int = 16
    dropout: float = 0.05
    # lr sweep per budget (4 points 2x apart around the optimum; index = position in budgets)
    # around the first replication's optimum (3e-3 for every adapter at 250 steps, 1e-3 and 1e-2 far worse);
    # a 4 x longer schedule moves Adam further at the same lr, so the plateau's points are 4 x lower
    lrs: list = field(default_factory=lambda: [[1.5e-3, 3e-3, 6e-3, 1.2e-2], [3.75e-4, 7.5e-4, 1.5e-3, 3e-3]])
    full_lrs: list = field(default_factory=lambda: [[2.5e-4, 5e-4, 1e-3, 2e-3], [6.25e-5, 1.25e-4, 2.5e-4, 5e-4]])
    sweep_seeds: int = 2           # seeds 100, 101, ...: none of them is a test seed
    # the families swept; the others reuse the first's lrs (time: one family's sweep costs ~ a third of the grid)
    sweep_families: list = field(default_factory=lambda: ["shared"])
    seeds: int = 2                 # test seeds 0, 1, ... per base
    # full fine-tuning only calibrates (docs/replication.md): the time goes to the adapters
    methods: list = field(default_factory=lambda: ["LoRA R8", "LoRA R16", "MoELoRA E2R8", "MoR E8R8"])
    mor: str = "MoR E8R8"          # the MoR method the ablations vary
    ablations: bool = True
    omega_std: float = 0.1         # the ablation's Ω = 1 + N(0, σ²)
    omega_lr_mult: float = 10.0    # the ablation's Ω learning rate multiplier
    data_seed: int = 1234


# tiny, and still learns: a base of dim 64 pretrained 1000 steps applies mappings well enough that full
# fine-tuning lifts held-out accuracy well above acc_before in 150 steps (~94 % vs ~26 %, 2 min on 2 cores)
QUICK = dict(n_symbols=6, length=3, n_pretrain_tasks=6, n_tune_tasks=4, n_train=64, n_val=16, n_test=32,
             n_train_scored=16, n_pretrain=200, pretrain_steps=1000, pretrain_lr=2e-3,
             base=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, norm_eps=1e-5, rope_theta=10000.0),
             bases=2, budgets=[150], lrs=[[1e-2]], full_lrs=[[3e-3]], sweep_seeds=1, sweep_families=["perm"],
             seeds=1, methods=["LoRA R8", "MoR E2R8", "Full FT"], mor="MoR E2R8")


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


def base_interval(a: dict[int, dict[int, float]], b: dict[int, dict[int, float]]) -> tuple[float, float, int]:
    """a, b: {base: {seed: value}}. Per base, the mean over the seeds both have of a - b (seeds paired: same
    split, init seed and data order); then bases are the unit: mean over bases and the half-width of its 95 %
    t-interval with n_bases - 1 degrees of freedom, so between-base variance is counted. Returns (mean,
    half-width, n_bases)."""
    per_base = []
    for k in sorted(set(a) & set(b)):
        common = sorted(set(a[k]) & set(b[k]))
        if common:
            per_base.append(statistics.mean(a[k][s] - b[k][s] for s in common))
    m, h = paired_interval(per_base, [0.0] * len(per_base))
    return m, h, len(per_base)


# ----------------------------------------------------------------------------- the task families

def make_tasks(n: int, n_symbols: int, length: int, seed: int) -> list[list[list[int]]]:
    """The "perm" family: n tasks, each `length` random permutations of range(n_symbols), one per position."""
    rng = random.Random(seed)
    return [[rng.sample(range(n_symbols), n_symbols) for _ in range(length)] for _ in range(n)]


def make_shared_tasks(n: int, n_symbols: int, length: int, swaps: int, seed: int) -> list[list[list[int]]]:
    """The "shared" family: one common permutation C_p per position, drawn once; task k then swaps the outputs
    of `swaps` random pairs of inputs in every position (its own change of C). Most of every task's table is
    C (with 16 symbols and one swap, 14 of 16 entries per position), so one low-rank update serves all tasks
    and each task adds a small correction: the structure MoR's shared (A, B) with per-expert scalings fits."""
    rng = random.Random(seed)
    common = [rng.sample(range(n_symbols), n_symbols) for _ in range(length)]
    tasks = []
    for _ in range(n):
        perms = []
        for c in common:
            p = list(c)
            for i, j in (rng.sample(range(n_symbols), 2) for _ in range(swaps)):
                p[i], p[j] = p[j], p[i]
            perms.append(p)
        tasks.append(perms)
    return tasks


def apply_task(perms: list[list[int]], x: list[int]) -> list[int]:
    """The task's answer: position p's symbol goes through position p's permutation."""
    return [perms[p][s] for p, s in enumerate(x)]


def spell(x: list[int]) -> str:
    return " ".join(chr(ord("a") + s) for s in x)


def question(task_id: int, x: list[int]) -> str:
    return f"task {task_id}: {spell(x)}"


def base_seed(s: Setup, b: int) -> int:
    return s.data_seed + b


def task_ids(s: Setup, b: int) -> tuple[list[int], list[int]]:
    """(pretraining ids, tuning ids) of base b: one shuffled numbering, so tuning names look like pretraining
    names."""
    ids = list(range(s.n_pretrain_tasks + s.n_tune_tasks))
    random.Random(base_seed(s, b)).shuffle(ids)
    return ids[:s.n_pretrain_tasks], ids[s.n_pretrain_tasks:]


def all_tasks(s: Setup, b: int, family: str) -> dict[int, list[list[int]]]:
    """Base b's pretraining tasks (always "perm") and its tuning tasks of `family`, {task id: permutations}."""
    pre, tune = task_ids(s, b)
    ids = pre + tune
    perm = dict(zip(ids, make_tasks(len(ids), s.n_symbols, s.length, base_seed(s, b) + 1)))
    if family == "perm":
        return perm
    if family != "shared":
        raise ValueError(f"unknown task family {family!r}; choose from {', '.join(FAMILIES)}")
    shared = make_shared_tasks(len(tune), s.n_symbols, s.length, s.shared_swaps, base_seed(s, b) + 2)
    return {**{t: perm[t] for t in pre}, **dict(zip(tune, shared))}


def split_inputs(s: Setup, b: int, task_id: int) -> dict[str, list[list[int]]]:
    """Disjoint train / val / test inputs of one tuning task of base b (the same for both families)."""
    need = s.n_train + s.n_val + s.n_test
    if need > s.n_symbols ** s.length:
        raise ValueError(f"{need} inputs per task, but only {s.n_symbols ** s.length} exist")
    rng = random.Random(base_seed(s, b) * 1000 + task_id)
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
    return {"question": question(task_id, x), "choices": choices, "gold": choices.index(gold)}


def task_data(s: Setup, b: int, family: str) -> dict:
    """Base b, family: training rows, and multiple-choice items {task name: items} for val, test and a sample
    of the training inputs ("fit": scored to tell not fitting from not generalising)."""
    tasks, (_, tune) = all_tasks(s, b, family), task_ids(s, b)
    rng = random.Random(base_seed(s, b) * 10 + FAMILIES.index(family))
    rows, out = [], {"val": {}, "test": {}, "fit": {}}
    for t in tune:
        split = split_inputs(s, b, t)
        rows += [chat_row(t, tasks[t], x) for x in split["train"]]
        others = [o for o in tune if o != t]
        for part, xs in (("val", split["val"]), ("test", split["test"]), ("fit", split["train"][:s.n_train_scored])):
            out[part][f"task {t}"] = [mc_item(t, tasks, others, x, rng) for x in xs]
    return {"train": rows, **out}


# ----------------------------------------------------------------------------- the bases

def code_key() -> str:
    """torch's version and the bytes of the files a base's numbers go through: a change in either may round
    differently, so the cache must not reuse a base built before it."""
    h = hashlib.sha1(torch.__version__.encode())
    for f in ("llama.py", "train.py", "data.py", "mor.py", os.path.join("demo", "demo.py")):
        with open(os.path.join(ROOT, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:10]


def fingerprint(s: Setup, b: int) -> str:
    """Hash of everything base b depends on (settings, its seed, the code): a cached base is reused only then."""
    keys = ("n_symbols", "length", "n_pretrain_tasks", "n_tune_tasks", "n_pretrain", "base", "pretrain_steps",
            "pretrain_lr", "data_seed")
    key = dict({k: getattr(s, k) for k in keys}, b=b, code=code_key())
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def build_base(s: Setup, b: int, out_dir: str) -> str:
    """Pretrain base b (all weights) on its pretraining tasks and write it in Meta's layout; cached."""
    base_dir = os.path.join(out_dir, f"base{b}_{fingerprint(s, b)}")
    if os.path.isfile(os.path.join(base_dir, "consolidated.00.pth")):
        return base_dir
    work = base_dir + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    tasks, (pre, tune) = all_tasks(s, b, "perm"), task_ids(s, b)
    rng = random.Random(base_seed(s, b) + 7)
    rows = [chat_row(t, tasks[t], [rng.randrange(s.n_symbols) for _ in range(s.length)])
            for t in pre for _ in range(s.n_pretrain)]
    rng.shuffle(rows)
    # the tokenizer sees every task name and symbol, tuning ones included, so no tuning name is an unknown piece
    texts = [data.format_chat(r["messages"]) for r in rows] + [question(t, [0] * s.length) for t in tune]
    with contextlib.redirect_stdout(io.StringIO()):
        tok = data.train_tokenizer(texts, os.path.join(work, "tokenizer.model"), vocab_size=320)
    params = dict(s.base, vocab_size=Tokenizer(tok).n_words)
    torch.manual_seed(base_seed(s, b))
    rand = write_meta_checkpoint(os.path.join(work, "random"), params, Transformer(ModelArgs(**params)).state_dict(),
                                 tok)
    cfg = train.TrainConfig(ckpt_dir=rand, data=[data.write_jsonl(rows, os.path.join(work, "pretrain.jsonl"))],
                            method="full", lr=s.pretrain_lr, val_size=0, max_steps=s.pretrain_steps,
                            global_batch=32, micro_batch=32, max_len=64, pad_to_multiple=8, progress=False,
                            ckpt_every=10**9, seed=b, dropout=0.0, device="cpu", out_dir=os.path.join(work, "run"))
    with contextlib.redirect_stdout(io.StringIO()):
        model = train.train(cfg)
    write_meta_checkpoint(work, params, model.state_dict(), tok)
    for sub in ("random", "run"):
        shutil.rmtree(os.path.join(work, sub))
    shutil.rmtree(base_dir, ignore_errors=True)
    os.rename(work, base_dir)   # complete or absent: a killed pretraining leaves only the .tmp folder
    return base_dir


def build_base_job(args: tuple) -> tuple[int, str]:
    """(b, build_base) for a worker process (one picklable argument; workers finish in any order)."""
    s, b, out_dir = args
    return b, build_base(Setup(**s), b, out_dir)


# ----------------------------------------------------------------------------- one run

def omega_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, m in mor.adapter_layers(model) if isinstance(m, mor.MoRLinear) for p in (m.omega_A, m.omega_B)]


def split_omega_group(optimizer: torch.optim.Optimizer, scheduler, omegas: list, mult: float) -> None:
    """Move the Ω parameters into a second param group whose lr is `mult` × the others' at every step.
    Called on an optimizer without state, right after its LambdaLR was made: the group's base lr is scaled
    and the schedule's multiplier then applies to both groups alike."""
    ids = {id(p) for p in omegas}
    group = optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": list(omegas), "lr": group["lr"] * mult, "initial_lr": group["initial_lr"] * mult})
    scheduler.base_lrs.append(group["initial_lr"] * mult)
    scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@contextlib.contextmanager
def omega_changes(std: float, lr_mult: float):
    """While active, MoR layers start from Ω = 1 + N(0, std²) instead of mor.py's ones, and Ω trains at
    lr_mult × the lr of the other parameters (the ablations). train.prepare_model and train.make_scheduler are
    wrapped rather than train.py changed: the noise is drawn right after add_adapters from the run's seed, the
    second param group is made before the first step, and the rest of the run is the stock trainer."""
    if not std and lr_mult == 1:
        yield
        return
    stock_prepare, stock_scheduler, seen = train.prepare_model, train.make_scheduler, {}

    def prepare(model, cfg):
        stock_prepare(model, cfg)
        seen["omegas"] = omega_params(model)
        g = torch.Generator().manual_seed(cfg.seed + 99)
        with torch.no_grad():
            for p in seen["omegas"] if std else []:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)

    def make_scheduler(optimizer, cfg, schedule, step):
        scheduler = stock_scheduler(optimizer, cfg, schedule, step)
        if lr_mult != 1:
            split_omega_group(optimizer, scheduler, seen["omegas"], lr_mult)
        return scheduler
    train.prepare_model, train.make_scheduler = prepare, make_scheduler
    try:
        yield
    finally:
        train.prepare_model, train.make_scheduler = stock_prepare, stock_scheduler


def mor_layers(model: torch.nn.Module) -> list:
    return [m for _, m in mor.adapter_layers(model) if isinstance(m, mor.MoRLinear) and m.num_experts > 1]


def omega_spread(model: torch.nn.Module) -> dict | None:
    """Per MoR layer, std over experts / |mean| of each Ω entry, averaged over entries and layers (0 when
    every expert is the same rescaling). None without multi-expert MoR layers."""
    out = {"A": [], "B": []}
    for m in mor_layers(model):
        for k, p in (("A", m.omega_A), ("B", m.omega_B)):
            w = p.detach().float()
            out[k].append(float((w.std(0) / w.mean(0).abs().clamp(min=1e-8)).mean()))
    return {k: statistics.mean(v) for k, v in out.items()} if out["A"] else None


def d_spread(model: torch.nn.Module) -> float | None:
    """How far the experts' directions are apart: per MoR layer, the mean over experts of ‖D_i − D̄‖ / ‖D̄‖
    (Frobenius; D_i = mor's `direction`, D̄ their mean), averaged over layers. 0: every expert is one update."""
    out = []
    with torch.no_grad():
        for m in mor_layers(model):
            D = torch.stack([m.direction(i).double() for i in range(m.num_experts)])
            mean = D.mean(0)
            out.append(float(torch.linalg.norm(D - mean, dim=(1, 2)).mean() / torch.linalg.norm(mean).clamp(min=1e-30)))
    return statistics.mean(out) if out else None


def routed_layers(model: torch.nn.Module) -> list:
    return [m for _, m in mor.adapter_layers(model) if hasattr(m, "record_router") and m.router_kind != "mean"
            and m.num_experts > 1]


def entropy(p: list[float]) -> float:
    """Entropy of p divided by log N (1 = uniform)."""
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def total_variation(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


@torch.inference_mode()
def answer_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 256) -> list[float]:
    """Per chat row, the summed log-probability of its supervised tokens (the answer and its EOS) tokenised
    exactly as training tokenises the row (data.encode_example). Not evaluate.py's harness tokenisation,
    which encodes context + answer as one string: there the answer's first symbol follows "\\n" and becomes
    another token than the one training taught, so a tuned model's gold answer scored like a wrong one.
    Rows of equal length are batched together: no padding, so the router statistics see real tokens only."""
    encoded = [data.encode_example(r, tokenizer, max_len=10**9) for r in rows]
    by_len: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out = [0.0] * len(rows)
    for idx in by_len.values():
        for k in range(0, len(idx), batch_size):
            part = idx[k:k + batch_size]
            ids = torch.tensor([encoded[i][0] for i in part])
            labels = torch.tensor([encoded[i][1] for i in part])[:, 1:]
            logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)
            keep = labels != data.IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            for i, v in zip(part, picked.double().sum(1).tolist()):
                out[i] = v
    return out


def mc_accuracy(model, tokenizer, items: list[dict]) -> float:
    """Share of items whose gold choice has the highest answer log-probability (first maximum on ties)."""
    rows = [{"messages": [{"role": "user", "content": it["question"]}, {"role": "assistant", "content": c}]}
            for it in items for c in it["choices"]]
    lls, right, k = answer_logprobs(model, tokenizer, rows), 0, 0
    for it in items:
        ll = lls[k:k + len(it["choices"])]
        k += len(it["choices"])
        right += max(range(len(ll)), key=ll.__getitem__) == it["gold"]
    return right / len(items)


def score(model, tokenizer, items: dict[str, list[dict]], routers: list | None = None) -> tuple[dict, dict]:
    """Accuracy per task and over all items (mc_accuracy); with routers, each layer's mean router weights over
    each task's tokens: {task: [per layer: [N weights]]} (the Fig. 7 view)."""
    acc, weights = {}, {}
    for name, its in items.items():
        for m in routers or []:
            m.router_sum.zero_()
            m.router_count.zero_()
            m.record_router = True
        acc[name] = mc_accuracy(model, tokenizer, its)
        for m in routers or []:
            m.record_router = False
        if routers:
            weights[name] = [(m.router_sum / m.router_count.clamp(min=1)).tolist() for m in routers]
    acc["all"] = sum(acc[n] * len(items[n]) for n in items) / sum(len(v) for v in items.values())
    return acc, weights


def router_stats(weights: dict[str, list[list[float]]]) -> tuple[dict, float] | tuple[None, None]:
    """({task: entropy of its mean router weights / log N, averaged over layers}, per-task router divergence:
    the total variation between two tasks' mean router weights, averaged over task pairs and layers). Equal
    entropies can hide different experts; the divergence is 0 only when every task uses the experts alike."""
    if not weights:
        return None, None
    ent = {t: statistics.mean(entropy(p) for p in ws) for t, ws in weights.items()}
    tv = [total_variation(weights[a][k], weights[b][k]) for a, b in itertools.combinations(weights, 2)
          for k in range(len(weights[a]))]
    return ent, (statistics.mean(tv) if tv else 0.0)


def run_one(spec: dict) -> dict:
    """Train one configuration with train.train and score it; the run folder is deleted afterwards."""
    t0 = time.time()
    s = Setup(**spec["setup"])
    d = json.load(open(spec["data_path"]))
    run_dir = os.path.join(spec["out_dir"], "runs", spec["key"].replace(" ", "_").replace("|", "_"))
    shutil.rmtree(run_dir, ignore_errors=True)   # a run killed half-way starts over
    hyper = {k: v for k, v in METHODS[spec["label"]].items()}
    cfg = train.TrainConfig(ckpt_dir=spec["base_dir"], data=[spec["train_path"]], lr=spec["lr"], val_size=0,
                            max_steps=spec["steps"], global_batch=s.batch, micro_batch=s.batch, max_len=64,
                            pad_to_multiple=8, progress=False, ckpt_every=10**9, seed=spec["seed"],
                            dropout=s.dropout, device="cpu", out_dir=run_dir, **hyper)
    with omega_changes(spec["omega_std"], spec["omega_lr_mult"]), contextlib.redirect_stdout(io.StringIO()):
        model = train.train(cfg)
    model.eval()
    tokenizer = Tokenizer(os.path.join(spec["base_dir"], "tokenizer.model"))
    # the sweep is scored on validation only, a test run on test and training inputs only (time: scoring is
    # about a third of a 250-step run)
    sweep = spec["phase"] == "sweep"
    val = score(model, tokenizer, d["val"])[0] if sweep else {"all": None}
    fit = {"all": None} if sweep else score(model, tokenizer, d["fit"])[0]
    test, weights = ({"all": None}, {}) if sweep else score(model, tokenizer, d["test"], routed_layers(model))
    ent, tv = router_stats(weights)
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    shutil.rmtree(run_dir, ignore_errors=True)
    tail = log[-max(1, len(log) // 10):]   # the last 10 % of steps: the train loss the run ended at
    keep = ("key", "phase", "base", "family", "steps", "label", "variant", "seed", "lr", "omega_std", "omega_lr_mult")
    return dict({k: spec[k] for k in keep}, method=cfg.method, r=cfg.r, num_experts=cfg.num_experts,
                acc=test["all"], acc_val=val["all"], acc_fit=fit["all"], acc_before=spec["acc_before"],
                per_task={k: v for k, v in test.items() if k != "all"}, params=count_parameters(model)[0],
                omega_spread=omega_spread(model), d_spread=d_spread(model), router_entropy=ent, router_tv=tv,
                loss_first=log[0]["loss"], loss_end=statistics.mean(r["loss"] for r in tail),
                time_s=round(time.time() - t0, 1))


def worker_init() -> None:
    torch.set_num_threads(1)   # tiny matrices: one thread per process, processes in parallel


# ----------------------------------------------------------------------------- the grid

def variants(s: Setup) -> list[dict]:
    """The grid's rows: every method, and the ablations of Setup.mor (they reuse its lr: `parent`)."""
    out = [dict(variant=m, label=m, omega_std=0.0, omega_lr_mult=1.0, parent=None) for m in s.methods]
    if s.ablations and s.mor in s.methods:
        out.append(dict(variant="MoR Ω lr ×10", label=s.mor, omega_std=0.0, omega_lr_mult=s.omega_lr_mult,
                        parent=s.mor))
        out.append(dict(variant="MoR Ω=1+N(0,σ²)", label=s.mor, omega_std=s.omega_std, omega_lr_mult=1.0,
                        parent=s.mor))
    return out


def budgets_of(s: Setup, family: str) -> list[int]:
    """The budgets a family runs: all of them for Setup.long_families, the first for the others."""
    return s.budgets if family in s.long_families else s.budgets[:1]


def cells_run(s: Setup) -> list[tuple[str, int]]:
    """(family, steps) of the grid, in table order."""
    return [(f, n) for f in s.families for n in budgets_of(s, f)]


def run_key(base: int, family: str, steps: int, variant: str, seed: int, lr: float) -> str:
    return f"base{base}|{family}|{steps}steps|{variant}|seed{seed}|lr{lr:g}"


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


def sweep_table(results: list[dict], family: str, steps: int, variant: str) -> dict[float, float]:
    """{lr: validation accuracy averaged over the sweep's seeds} of one method, family and budget."""
    by_lr: dict[float, list[float]] = {}
    for r in results:
        if r["phase"] == "sweep" and (r["family"], r["steps"], r["variant"]) == (family, steps, variant):
            by_lr.setdefault(r["lr"], []).append(r["acc_val"])
    return {lr: statistics.mean(v) for lr, v in sorted(by_lr.items())}


def chosen_lr(results: list[dict], s: Setup, family: str, steps: int, label: str) -> float | None:
    """The sweep's lr with the best mean validation accuracy (the smaller on a tie), from this family's sweep
    or, for a family that was not swept, the first swept family's."""
    swept = family if family in s.sweep_families else s.sweep_families[0]
    table = sweep_table(results, swept, steps, label)
    return max(table, key=lambda lr: (table[lr], -lr)) if table else None


def execute(fn, specs: list[dict], workers: int, results_path: str | None, desc: str) -> list:
    """Run fn over specs in parallel processes; with results_path, append each result to it as it finishes."""
    from tqdm import tqdm
    done = []
    if not specs:
        return done
    bar = tqdm(total=len(specs), desc=desc, unit="run", dynamic_ncols=True, mininterval=30)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(specs) > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, initializer=worker_init))
            it = pool.imap_unordered(fn, specs)
        else:
            worker_init()
            it = map(fn, specs)
        for rec in it:
            if results_path:
                with open(results_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix_str(f"{rec['key']}: {rec['acc'] if rec['acc'] is not None else rec['acc_val']:.3f}")
            done.append(rec)
            bar.update(1)
    bar.close()
    return done


def prepare_data(s: Setup, out_dir: str, bases: list[str]) -> dict[tuple[int, str], dict]:
    """Per (base, family): training JSONL, items JSON and the base's test accuracy before tuning (cached)."""
    out = {}
    for b, base in enumerate(bases):
        for family in s.families:
            prefix = os.path.join(out_dir, f"data{b}_{fingerprint(s, b)}_{family}")
            d = task_data(s, b, family)
            train_path = data.write_jsonl(d["train"], prefix + ".jsonl")
            with open(prefix + ".items.json", "w") as f:
                json.dump({k: d[k] for k in ("val", "test", "fit")}, f)
            # ".v2": scored on the answer's training tokens (an older grid's before-scores used the harness's)
            before_path = prefix + ".before.v2.json"
            if not os.path.isfile(before_path):
                tokenizer = Tokenizer(os.path.join(base, "tokenizer.model"))
                acc, _ = score(Transformer.from_checkpoint(base).eval(), tokenizer, d["test"])
                with open(before_path, "w") as f:
                    json.dump(acc, f)
            out[b, family] = dict(train_path=train_path, data_path=prefix + ".items.json",
                                  acc_before=json.load(open(before_path))["all"])
    return out


def plan(s: Setup, out_dir: str, bases: list[str], per: dict, results: list[dict], phase: str) -> list[dict]:
    """The runs of one phase. "sweep": base 0, the swept families, every budget, method and lr, the sweep seeds
    (100, 101, ...). "test": every base, family and budget, at the chosen lrs, seed-major (a grid cut short
    has the same seeds everywhere), the methods before the ablations within a seed."""
    vs, out = variants(s), []

    def spec(b, family, i, v, seed, lr):
        return dict(key=run_key(b, family, s.budgets[i], v["variant"], seed, lr), phase=phase, base=b, family=family,
                    steps=s.budgets[i], label=v["label"], variant=v["variant"], seed=seed, lr=lr,
                    omega_std=v["omega_std"], omega_lr_mult=v["omega_lr_mult"], base_dir=bases[b], out_dir=out_dir,
                    setup=asdict(s), **per[b, family])
    if phase == "sweep":
        for family, i, v, seed in itertools.product(s.sweep_families, range(len(s.budgets)), vs,
                                                    range(100, 100 + s.sweep_seeds)):
            if v["parent"] is None and s.budgets[i] in budgets_of(s, family):
                full = METHODS[v["label"]]["method"] == "full"
                out += [spec(0, family, i, v, seed, lr) for lr in (s.full_lrs if full else s.lrs)[i]]
        return out
    # within a seed, the methods on every base before the ablations: a grid cut short still compares the methods
    for seed, ablation, b, i, family, v in itertools.product(range(s.seeds), (False, True), range(s.bases),
                                                             range(len(s.budgets)), s.families, vs):
        if (v["parent"] is not None) != ablation or s.budgets[i] not in budgets_of(s, family):
            continue
        lr = chosen_lr(results, s, family, s.budgets[i], v["label"])
        if lr is None:   # the sweep phase ran before: a cell without one is a setting's mistake
            raise ValueError(f"no lr sweep for {v['label']} at {s.budgets[i]} steps (family {family}); sweep "
                             f"families {s.sweep_families} must cover the budgets of {family}")
        out.append(spec(b, family, i, v, seed, lr))
    return out


def grid(s: Setup, out_dir: str, workers: int) -> list[dict]:
    """The bases (in parallel), then phase 1, the lr sweep, then phase 2, the test seeds."""
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the before-scores run here, the runs in the workers
    try:
        built = execute(build_base_job, [(asdict(s), b, out_dir) for b in range(s.bases)], workers, None, "bases")
        bases = [d for _, d in sorted(built)]
        per = prepare_data(s, out_dir, bases)
        results_path = os.path.join(out_dir, "results.jsonl")
        for phase in ("sweep", "test"):
            results = load_results(results_path)
            have = {r["key"] for r in results}
            specs = plan(s, out_dir, bases, per, results, phase)
            execute(run_one, [p for p in specs if p["key"] not in have], workers, results_path, phase)
        return load_results(results_path)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the report

def cells(results: list[dict], s: Setup) -> dict[tuple, dict[int, dict[int, dict]]]:
    """{(family, steps, variant): {base: {seed: record}}} of the test runs at each cell's chosen lr."""
    out: dict[tuple, dict[int, dict[int, dict]]] = {}
    for r in results:
        if r["base"] >= s.bases or r["seed"] >= s.seeds:   # a grid reported smaller than it ran
            continue
        if r["phase"] == "test" and r["lr"] == chosen_lr(results, s, r["family"], r["steps"], r["label"]):
            out.setdefault((r["family"], r["steps"], r["variant"]), {}).setdefault(r["base"], {})[r["seed"]] = r
    return out


def values(cell: dict[int, dict[int, dict]], field_: str) -> dict[int, dict[int, float]]:
    return {b: {k: r[field_] for k, r in runs.items()} for b, runs in cell.items()}


def base_means(cell: dict[int, dict[int, dict]], field_: str) -> list[float]:
    """Per base, the mean over its seeds (bases sorted), skipping runs without the field."""
    out = []
    for b in sorted(cell):
        xs = [r[field_] for r in cell[b].values() if r.get(field_) is not None]
        if xs:
            out.append(statistics.mean(xs))
    return out


def fmt_mean(xs: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{statistics.mean(xs) * scale:.{digits}f}" if xs else "-"


def report(results: list[dict], s: Setup) -> str:
    """results.md: per family and budget, the methods' accuracy per base and the paired differences with bases
    as the unit; the claims side by side; the lr sweeps; what is missing."""
    c = cells(results, s)
    variants_ = [v["variant"] for v in variants(s)]
    mor_name = lambda v: s.mor if v == "MoR" else v   # noqa: E731
    lines = []
    for family, steps in cells_run(s):
        lines += [f"### {family}, {steps} steps", "",
                  "| method | lr | trainable params | acc before % | test acc % per base (mean over seeds) "
                  "| mean | Δ vs LoRA R8 (95 % CI, bases) | seeds per base | train-input acc % | train loss (end) "
                  "| D-spread | Ω_B spread | router entropy | router divergence |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base_cell = c.get((family, steps, BASELINE))
        for v in variants_:
            cell = c.get((family, steps, v))
            if not cell:
                lines.append(f"| {v} | - | - | - | not run | - | - | 0 | - | - | - | - | - | - |")
                continue
            any_r = next(iter(next(iter(cell.values())).values()))
            accs = base_means(cell, "acc")
            delta = "-"
            if base_cell and v != BASELINE:
                m, h, n = base_interval(values(cell, "acc"), values(base_cell, "acc"))
                delta = f"{m * 100:+.1f} ± {h * 100:.1f} (n={n})"
            om = [r["omega_spread"]["B"] for rs in cell.values() for r in rs.values() if r.get("omega_spread")]
            ent = [statistics.mean(r["router_entropy"].values()) for rs in cell.values() for r in rs.values()
                   if r.get("router_entropy")]
            lines.append(
                f"| {v} | {any_r['lr']:g} | {any_r['params']:,} | {fmt_mean(base_means(cell, 'acc_before'), 100, 1)} | "
                + ", ".join(f"{a * 100:.1f}" for a in accs) + f" | {fmt_mean(accs, 100, 1)} | {delta} | "
                + ",".join(str(len(cell.get(b, {}))) for b in range(s.bases))
                + f" | {fmt_mean(base_means(cell, 'acc_fit'), 100, 1)} | {fmt_mean(base_means(cell, 'loss_end'))} | "
                f"{fmt_mean(base_means(cell, 'd_spread'))} | {fmt_mean(om)} | {fmt_mean(ent)} | "
                f"{fmt_mean(base_means(cell, 'router_tv'))} |")
        lines.append("")
    heads = cells_run(s)
    lines += ["Paired differences a − b (accuracy points): per base the mean over seeds, then the mean over bases "
              f"± the 95 % t-interval with n_bases − 1 df; the per-base differences in brackets. MoR = {s.mor}.", "",
              "| a | b | " + " | ".join(f"{f}, {n} steps" for f, n in heads) + " |", "|---|---|" + "---|" * len(heads)]
    for a, b in CLAIMS:
        row = []
        for family, steps in heads:
            ca, cb = c.get((family, steps, mor_name(a))), c.get((family, steps, mor_name(b)))
            if not (ca and cb):
                row.append("-")
                continue
            m, h, n = base_interval(values(ca, "acc"), values(cb, "acc"))
            per = [statistics.mean(ca[k][x]["acc"] - cb[k][x]["acc"] for x in set(ca[k]) & set(cb[k]))
                   for k in sorted(set(ca) & set(cb)) if set(ca[k]) & set(cb[k])]
            row.append(f"{m * 100:+.1f} ± {h * 100:.1f} ({', '.join(f'{d * 100:+.1f}' for d in per)})")
        if any(x != "-" for x in row):   # a pair the grid did not run (e.g. full FT) is left out
            lines.append(f"| {a} | {b} | " + " | ".join(row) + " |")
    for family, steps in [c for c in cells_run(s) if c[0] in s.sweep_families]:
        sweep = [v for v in variants_ if sweep_table(results, family, steps, v)]
        if not sweep:
            continue
        lrs = sorted({r["lr"] for r in results if r["phase"] == "sweep" and (r["family"], r["steps"]) == (family, steps)})
        lines += ["", f"lr sweep, {family}, {steps} steps, base 0, validation accuracy % averaged over the sweep "
                  "seeds (chosen in bold; * = at the edge of the method's range):", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for v in sweep:
            table, best = sweep_table(results, family, steps, v), chosen_lr(results, s, family, steps, v)
            edge = "*" if best in (min(table), max(table)) else ""
            cellstr = {lr: (f"**{a * 100:.1f}**{edge}" if lr == best else f"{a * 100:.1f}") for lr, a in table.items()}
            lines.append(f"| {v} | " + " | ".join(cellstr.get(lr, "") for lr in lrs) + " |")
    n_test = sum(r["phase"] == "test" for r in results)
    want = s.bases * s.seeds * len(cells_run(s)) * len(variants_)
    lines += ["", f"{len(results)} runs ({n_test} of {want} test runs), {sum(r['time_s'] for r in results) / 3600:.2f} "
              "h of worker time."]
    return "\n".join(lines) + "\n"


def read_setup(out_dir: str) -> Setup:
    path = os.path.join(out_dir, "setup.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no grid here (run it first, with the same --out_dir)")
    with open(path) as f:
        stored = json.load(f)
    if set(stored) != {f.name for f in fields(Setup)}:   # e.g. no long_families: before the scoring fix
        raise ValueError(f"{path}: written by another version of bench/replicate.py (its runs may be scored "
                         "differently); use a new --out_dir")
    return Setup(**stored)


def same_grid(old: Setup, new: Setup) -> bool:
    """Whether a folder's grid (old) may go on as `new`: every setting equal but the number of bases and
    seeds, which only add or leave out rows (base b and seed k are the same run in any grid)."""
    return replace(old, bases=new.bases, seeds=new.seeds) == new


def write_report(out_dir: str) -> str:
    path = os.path.join(out_dir, "results.jsonl")
    results = load_results(path)
    if not results:
        raise FileNotFoundError(f"{path}: no results (run the grid first, with the same --out_dir)")
    md = report(results, read_setup(out_dir))
    tmp = os.path.join(out_dir, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(out_dir, "results.md"))
    return md


def rerun(out_dir: str, key: str) -> bool:
    """Run the finished row `key` again (same setup, base from the cache) and print its numbers beside the
    stored ones; True when they are equal (same code, torch and CPU kind: the same kernels on the same inputs)."""
    s = read_setup(out_dir)
    old = next((r for r in load_results(os.path.join(out_dir, "results.jsonl")) if r["key"] == key), None)
    if old is None:
        raise ValueError(f"--rerun: no row {key!r} in {os.path.join(out_dir, 'results.jsonl')}")
    worker_init()
    bases = [build_base(s, b, out_dir) for b in range(s.bases)]
    per = prepare_data(s, out_dir, bases)
    spec = dict({k: old[k] for k in ("key", "phase", "base", "family", "steps", "label", "variant", "seed", "lr",
                                      "omega_std", "omega_lr_mult")},
                base_dir=bases[old["base"]], out_dir=os.path.join(out_dir, "rerun"), setup=asdict(s),
                **per[old["base"], old["family"]])
    new = run_one(spec)
    fields = ("acc", "acc_val", "acc_fit", "loss_end", "d_spread", "router_tv")
    for f in fields:
        print(f"{f}: stored {old[f]!r}, rerun {new[f]!r}")
    same = all(old[f] == new[f] for f in fields)
    print("same numbers" if same else "DIFFERENT numbers")
    return same


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Setup]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", default="out/replicate", help="base cache, setup.json, results.jsonl, results.md")
    ap.add_argument("--quick", action="store_true", help="the pipeline on a tiny setting that still learns")
    ap.add_argument("--report", action="store_true", help="only rebuild results.md from results.jsonl")
    ap.add_argument("--rerun", metavar="KEY", help="run one finished row (its key in results.jsonl) again and compare")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes, one thread each")
    ap.add_argument("--bases", type=int, help=f"bases (default {Setup.bases})")
    ap.add_argument("--seeds", type=int, help=f"test seeds per base (default {Setup.seeds})")
    ap.add_argument("--budgets", type=int, nargs="+", help="tuning steps, one per lr row (default 250 1000)")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, help="task families (default both)")
    ap.add_argument("--methods", nargs="+", help=f"a subset of: {', '.join(METHODS)}")
    ap.add_argument("--n_test", type=int, help=f"held-out items per task (default {Setup.n_test})")
    args = ap.parse_args(argv)
    s = Setup(**(QUICK if args.quick else {}))
    for k in ("bases", "seeds", "budgets", "families", "methods", "n_test"):
        if getattr(args, k) is not None:
            s = replace(s, **{k: getattr(args, k)})
    s = replace(s, sweep_families=[f for f in s.sweep_families if f in s.families] or s.families[:1])
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    if args.workers < 1 or s.bases < 1 or s.seeds < 1 or s.n_test < 1 or min(s.budgets) < 1:
        ap.error("--workers, --bases, --seeds, --budgets and --n_test must be positive")
    if len(s.budgets) > len(s.lrs):
        ap.error(f"--budgets: at most {len(s.lrs)} (one lr row each)")
    return args, s


def main(argv: list[str] | None = None) -> None:
    args, s = parse_args(argv)
    try:
        if args.rerun:
            sys.exit(0 if rerun(args.out_dir, args.rerun) else 1)
        if not args.report:
            os.makedirs(args.out_dir, exist_ok=True)
            path = os.path.join(args.out_dir, "setup.json")
            if os.path.isfile(path) and not same_grid(read_setup(args.out_dir), s):
                raise ValueError(f"{path}: this folder holds a grid with other settings; use a new --out_dir")
            with open(path, "w") as f:
                json.dump(asdict(s), f)
            t0 = time.time()
            grid(s, args.out_dir, args.workers)
            print(f"grid done in {time.time() - t0:.0f} s", flush=True)
        print(write_report(args.out_dir), end="")
    except (FileNotFoundError, ValueError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
