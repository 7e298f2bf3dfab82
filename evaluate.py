"""Zero-shot scoring of the paper's ten benchmarks (Table 1, Appendix B), as lm-eval-harness does.

    python evaluate.py --ckpt_dir llama-2-7b --adapter out/adapter.pth --data_dir benchmarks \
        --out results.json

Prompts, choices and metrics follow EleutherAI's lm-evaluation-harness (each task's prompt is in the
docstring of its `format_*` in tools/benchmarks.py, which reads the files; the command line is
tools/eval_cli.py). The paper's own numbers come from OpenCompass, whose prompts differ, so absolute
values are not comparable with Table 1; differences between methods are what to compare.

Scoring. A multiple-choice question becomes one (context, " " + choice) request per choice. Every
request is scored by the summed log-probability of its continuation tokens (`loglikelihood`); `acc`
takes the argmax, `acc_norm` divides by the length in characters of the choice text first (harness
convention). Each batch is scored the cheapest exact way (`plan_scoring`): the one-token choices of
a question (MMLU) from one row, multi-token choices through the KV cache of their shared context
where that saves tokens, plain rows otherwise; bench/prefix.py times the ways against each other.

Reported number per task (the table): acc_norm for PIQA, ARC-E, ARC-C, HellaSwag, OBQA; acc for
SIQA, WinoGrande, MMLU, LAMBADA; exact match for NQ-open. Every metric is in the JSON.
"""
from __future__ import annotations

import math
import os
import re
import string
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import llama
from tools.benchmarks import load_task   # the tasks' files and prompts; evaluate.load_task stays

# paper column order (Table 1)
TASKS = ("siqa", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa",
         "lambada", "mmlu", "nq_open")
COLUMNS = dict(siqa="SIQA", piqa="PIQA", winogrande="WG", arc_easy="ARC-E", arc_challenge="ARC-C",
               hellaswag="Hella.", openbookqa="OBQA", lambada="Lam.", mmlu="MMLU", nq_open="NQ")
REPORTED = dict(siqa="acc", piqa="acc_norm", winogrande="acc", arc_easy="acc_norm",
                arc_challenge="acc_norm", hellaswag="acc_norm", openbookqa="acc_norm",
                lambada="acc", mmlu="acc", nq_open="exact_match")
ALIASES = dict(social_iqa="siqa", wg="winogrande", arc_e="arc_easy", arc_c="arc_challenge",
               hella="hellaswag", obqa="openbookqa", lambada_openai="lambada", lam="lambada",
               nq="nq_open")
NQ_STOP = ("\n", ".", ",")
NQ_MAX_NEW_TOKENS = 32   # the longest NQ-open dev answer is 51 characters: no longer output matches


# -----------------------------------------------------------------------------
# core: log-likelihood of continuations

def encode_request(tokenizer, context: str, continuation: str, max_seq_len: int,
                   known: dict[str, int] | None = None) -> tuple[list[int], int, bool]:
    """Tokenise one (context, continuation) request as the harness does -> (tokens, n_continuation,
    truncated).

    Trailing whitespace of the context moves onto the continuation; BOS + encode(context +
    continuation) is the sequence, and its tokens after the length of encode(context) are the
    continuation. Sequences longer than max_seq_len + 1 keep their last tokens (left truncation):
    the model reads tokens[:-1] and predicts tokens[1:], whose last n_continuation are scored.
    `known`: context -> its token count, filled as it goes (the choices of a question share one
    context: encode it once).
    """
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True, eos=False)
    known = {} if known is None else known
    if context not in known:
        known[context] = len(tokenizer.encode(context, bos=True, eos=False))
    n_cont = len(whole) - known[context]
    if n_cont <= 0:
        raise ValueError(f"continuation {continuation!r} adds no token after context "
                         f"{context[-40:]!r}")
    tokens = whole[-(max_seq_len + 1):]
    return tokens, min(n_cont, len(tokens) - 1), len(whole) > len(tokens)


def _device(model: torch.nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    return t.device if t is not None else torch.device("cpu")


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    """Right padding with token 0: harmless under causal attention (padded positions go unread)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """(sum of log p(target), every target the argmax) for logits [n, vocab] and n targets."""
    logp = F.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(targets, device=logits.device)
    return logp.gather(1, t[:, None]).sum().item(), bool((logp.argmax(-1) == t).all())


def _score_rows(model, encoded, rows: list[list[int]], out: list) -> None:
    """One causal forward of a batch of rows; a row is the input (tokens[:-1]) of its first
    request, and every other request in it has an input that is a prefix of that one (same logits
    there, attention is causal). Every scored position of the batch goes through one log_softmax
    and one gather (not one per request)."""
    logits = model(_pad([encoded[row[0]][0][:-1] for row in rows], _device(model)))
    where, targets, owner, ids = [], [], [], []   # owner: index into ids (this batch's requests)
    for b, row in enumerate(rows):
        for i in row:
            tokens, n = encoded[i]
            L = len(tokens) - 1   # logits at L-n..L-1 predict the continuation tokens[L-n+1:]
            where += [(b, t) for t in range(L - n, L)]
            targets += tokens[L - n + 1:]
            owner += [len(ids)] * n
            ids.append(i)
    b_idx, t_idx = torch.tensor(where, device=logits.device).unbind(1)
    logp = F.log_softmax(logits[b_idx, t_idx].float(), dim=-1)
    dev = logits.device
    tgt, own = torch.tensor(targets, device=dev), torch.tensor(owner, device=dev)
    ll = torch.zeros(len(ids), dtype=torch.float64, device=dev).index_add_(   # sums in float64:
        0, own, logp.gather(1, tgt[:, None])[:, 0].double())                  # order-free
    missed = torch.zeros(len(ids), device=dev).index_add_(0, own, (logp.argmax(-1) != tgt).float())
    ll, missed = ll.tolist(), missed.tolist()
    for k, i in enumerate(ids):
        out[i] = (ll[k], missed[k] == 0)


def _score_shared(model, encoded, batch: list[list[int]], out: list) -> None:
    """A batch of groups (one row each, requests longest first) sharing each group's prefix via the
    KV cache.

    Step 1: one forward of every group's common prefix (p_g tokens, its own length) fills the KV
    cache. Step 2: for j = 0, 1, ..., one forward of every group's j-th request from its own
    position p_g on (a [B] start_pos), reading the cache. Step 2 overwrites cache slots >= p_g,
    which later steps rewrite before reading (the cache mask hides slots beyond a row's current
    position), so every request sees exactly its own tokens, and no part of a context is computed
    twice.
    """
    inputs = {i: encoded[i][0][:-1] for g in batch for i in g}
    p = [_common_prefix([inputs[i] for i in g]) for g in batch]
    device = _device(model)
    width = max(len(inputs[i]) - n for g, n in zip(batch, p) for i in g)   # the widest padded tail
    model.setup_cache(len(batch), max(p) + width)   # just long enough for this batch
    head = None
    if max(p):
        head = model(_pad([inputs[g[0]][:n] for g, n in zip(batch, p)], device), start_pos=0)
    starts = torch.tensor(p, device=device)
    for j in range(max(len(g) for g in batch)):
        rows = [g[j] if j < len(g) else None for g in batch]
        tails = [inputs[i][n:] if i is not None else [] for i, n in zip(rows, p)]
        tail = None
        if any(tails):
            tail = model(_pad([t or [0] for t in tails], device), start_pos=starts)
        for b, (i, n) in enumerate(zip(rows, p)):
            if i is None:
                continue
            tokens, k = encoded[i]
            L = len(tokens) - 1
            lo = L - k   # logits at positions lo..L-1 predict the continuation
            parts = ([head[b, lo:min(L, n)]] if lo < n else []) + \
                    ([tail[b, max(lo, n) - n:L - n]] if L > n else [])
            out[i] = _score(torch.cat(parts), tokens[lo + 1:])


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _fed(lengths: list[int], batch_size: int) -> int:
    """Token positions that plain batches of these row lengths feed, longest first, padding in."""
    lengths = sorted(lengths, reverse=True)
    starts = range(0, len(lengths), batch_size)
    return sum(lengths[s] * len(lengths[s:s + batch_size]) for s in starts)


def plan_scoring(encoded: list[tuple[list[int], int]], groups: list[list[int]], batch_size: int,
                 min_saving: float = 0.1) -> list[tuple[str, list[list[int]]]]:
    """Batches [("rows" | "shared", [[request indices], ...])] scoring every request exactly once,
    each the cheapest exact way (token positions fed, padding included):
    - a group (one context) whose inputs (tokens[:-1]) are all prefixes of its longest is one row:
      causal attention gives a prefix the same logits inside the longer row (one-token choices: all
      from one row, even where the tokenizer splits " A" into two tokens and so lengthens that
      choice's input by one);
    - groups whose choices differ in their inputs (multi-token choices) are batched longest first,
      and a batch is scored through a shared prefix (`_score_shared`) only if that feeds >=
      min_saving fewer positions than plain rows would; otherwise its requests become plain rows;
    - rows are batched by length, longest first (the harness's order: little padding).
    """
    inputs = [tuple(tokens[:-1]) for tokens, _ in encoded]
    rows, multi = {}, []
    for g in groups:
        g = sorted(g, key=lambda i: -len(inputs[i]))
        longest = inputs[g[0]]
        if all(longest[:len(inputs[i])] == inputs[i] for i in g):   # causal: the longest holds all
            rows.setdefault(longest, []).extend(g)
        else:
            multi.append(g)
    plan = []
    multi.sort(key=lambda g: -len(inputs[g[0]]))
    for s in range(0, len(multi), batch_size):
        batch = multi[s:s + batch_size]
        p = [_common_prefix([inputs[i] for i in g]) for g in batch]
        tails = [max((len(inputs[g[j]]) - n for g, n in zip(batch, p) if j < len(g)), default=0)
                 for j in range(max(map(len, batch)))]
        shared = len(batch) * (max(p) + sum(tails))
        plain = _fed([len(inputs[i]) for g in batch for i in g], batch_size)
        if shared <= (1 - min_saving) * plain:
            plan.append(("shared", batch))
        else:
            for g in batch:
                for i in g:
                    rows.setdefault(inputs[i], []).append(i)
    ordered = sorted(rows.values(), key=lambda r: -len(inputs[r[0]]))
    plan += [("rows", ordered[s:s + batch_size]) for s in range(0, len(ordered), batch_size)]
    return plan


@torch.inference_mode()
def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                  share_prefix: bool = True, desc: str | None = None) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation tokens, all of them greedy) for each (context,
    continuation).

    Tokenisation follows the harness (`encode_request`); requests longer than
    model.params.max_seq_len keep their last tokens. share_prefix: the requests of one context
    string are scored together, each batch the cheapest exact way (`plan_scoring`: one row for all
    one-token choices, a shared prefix through the KV cache where it saves tokens, plain rows
    otherwise); share_prefix False: one full forward per request, batched by length (the reference
    path). Results come back in the order of `requests`.
    """
    if not requests:
        return []
    max_len = model.params.max_seq_len
    known: dict[str, int] = {}
    encoded = [encode_request(tokenizer, c, x, max_len, known) for c, x in requests]
    if n_long := sum(truncated for _, _, truncated in encoded):
        print(f"[{desc or 'loglikelihood'}] {n_long} of {len(requests)} requests are longer than "
              f"max_seq_len={max_len}: they keep their last tokens", file=sys.stderr)
    encoded = [(tokens, n) for tokens, n, _ in encoded]
    was_training = model.training
    model.eval()   # adapters may carry dropout
    bar = tqdm(total=len(requests), desc=desc, disable=desc is None or not is_main(), leave=False)
    try:
        groups: dict[str, list[int]] = {}
        for i, (context, _) in enumerate(requests):
            groups.setdefault(context if share_prefix else i, []).append(i)
        out = [None] * len(requests)
        for kind, batch in plan_scoring(encoded, list(groups.values()), batch_size):
            if kind == "shared":
                try:
                    _score_shared(model, encoded, batch, out)
                finally:
                    model.clear_cache()
            else:
                _score_rows(model, encoded, batch, out)
            bar.update(sum(map(len, batch)))
        return out
    finally:
        bar.close()
        model.train(was_training)


# -----------------------------------------------------------------------------
# multiple choice

def choice_requests(item: dict, delimiter: str = " ") -> list[tuple[str, str]]:
    """(context, delimiter + choice) per choice; a WinoGrande item has one context per choice."""
    if "contexts" in item:
        return [(c, delimiter + item["continuation"]) for c in item["contexts"]]
    return [(item["context"], delimiter + c) for c in item["choices"]]


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)   # first maximum on ties, like numpy


def choice_records(model, tokenizer, items: list[dict], batch_size: int = 16, delimiter: str = " ",
                   desc: str | None = None, share_prefix: bool = True) -> list[dict]:
    """Per item: log-likelihood of each choice, gold index, choice lengths in characters."""
    requests, spans = [], []
    for item in items:
        r = choice_requests(item, delimiter)
        spans.append((len(requests), len(requests) + len(r)))
        requests += r
    lls = [ll for ll, _ in loglikelihood(model, tokenizer, requests, batch_size, share_prefix,
                                         desc)]
    return [dict(ll=lls[a:b], gold=item["gold"], lens=[len(c) for c in item.get("choices", [])],
                 subject=item.get("subject")) for item, (a, b) in zip(items, spans)]


def choice_metrics(records: list[dict], norm: bool = True) -> dict:
    """acc: argmax of summed log-likelihood; acc_norm: argmax of log-likelihood / len(choice)."""
    n = len(records)
    out = {"acc": sum(_argmax(r["ll"]) == r["gold"] for r in records) / max(n, 1)}
    if norm:
        normed = [[ll / max(k, 1) for ll, k in zip(r["ll"], r["lens"])] for r in records]
        out["acc_norm"] = sum(_argmax(x) == r["gold"] for x, r in zip(normed, records)) / max(n, 1)
    out["n"] = n
    return out


def score_multiple_choice(model, tokenizer, items: list[dict], batch_size: int = 16,
                          delimiter: str = " ") -> dict:
    """Items dict(context, choices, gold) -> {"acc", "acc_norm", "n"} (used by train.py's demo)."""
    return choice_metrics(choice_records(model, tokenizer, items, batch_size, delimiter))


# -----------------------------------------------------------------------------
# NQ-open generation and its normalisation

def nq_normalize(text: str) -> str:
    """The harness's exact_match options for NQ-open: drop articles
    ("\\b(?:The |the |An |A |a |an )"), lower-case, remove string.punctuation; no other whitespace
    change."""
    text = re.sub(r"\b(?:The |the |An |A |a |an )", "", text).lower()
    return text.translate(str.maketrans("", "", string.punctuation))


def nq_answer(text: str) -> str:
    """Generated text -> answer: cut at the first "\\n", "." or ",", then drop one leading space."""
    for s in NQ_STOP:
        text = text.split(s)[0]
    return text[1:] if text.startswith(" ") else text


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int = 16,
                     max_new_tokens: int = NQ_MAX_NEW_TOKENS, desc: str | None = None) -> list[str]:
    """Greedy answers (llama.generate with the KV cache) stopping at "\\n", "." or ","; prompts
    of similar length are batched together and left-truncated to fit max_seq_len."""
    keep = model.params.max_seq_len - max_new_tokens
    tokens = [tokenizer.encode(p, bos=True, eos=False)[-keep:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(tokens[i]))
    batch_size = min(batch_size, model.params.max_batch_size)
    stop = lambda new: any(s in tokenizer.decode(new) for s in NQ_STOP)   # noqa: E731
    out = [""] * len(prompts)
    try:
        quiet = desc is None or not is_main()
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=quiet, leave=False):
            idx = order[s:s + batch_size]
            new = llama.generate(model, [tokens[i] for i in idx], max_new_tokens, temperature=0.0,
                                 eos_id=tokenizer.eos_id, stop=stop)
            for i, t in zip(idx, new):
                out[i] = nq_answer(tokenizer.decode(t))
    finally:
        model.clear_cache()
    return out


# -----------------------------------------------------------------------------
# tasks -> metrics

def _rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return _rank_world()[0] == 0


def _gather(records: list) -> list:
    """Under torchrun every rank scores items[rank::world]; all ranks get everyone's records."""
    if _rank_world()[1] == 1:
        return records
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def task_records(model, tokenizer, task: str, items: list[dict], batch_size: int = 16,
                 share_prefix: bool = True) -> list[dict]:
    """Per-item results of one task (what ranks exchange before the metrics are computed)."""
    if task == "nq_open":
        prompts = [x["context"] for x in items]
        answers = generate_answers(model, tokenizer, prompts, batch_size, desc=task)
        return [dict(em=float(any(nq_normalize(a) == nq_normalize(g) for g in x["answers"])),
                     answer=a) for a, x in zip(answers, items)]
    if task == "lambada":
        requests = [(x["context"], x["continuation"]) for x in items]
        res = loglikelihood(model, tokenizer, requests, batch_size, share_prefix, desc=task)
        return [dict(ll=ll, greedy=g) for ll, g in res]
    return choice_records(model, tokenizer, items, batch_size, desc=task, share_prefix=share_prefix)


def task_metrics(task: str, records: list[dict]) -> dict:
    """acc / acc_norm, LAMBADA acc + perplexity (exp of minus the mean log-likelihood of the
    target, as the harness), NQ exact_match, MMLU micro-average plus per-subject acc."""
    n = len(records)
    if task == "nq_open":
        return dict(exact_match=sum(r["em"] for r in records) / max(n, 1), n=n)
    if task == "lambada":
        return dict(acc=sum(r["greedy"] for r in records) / max(n, 1),
                    perplexity=math.exp(-sum(r["ll"] for r in records) / max(n, 1)), n=n)
    if task == "mmlu":
        subjects = {}
        for s in sorted({r["subject"] for r in records}):
            subjects[s] = choice_metrics([r for r in records if r["subject"] == s], norm=False)
        return dict(choice_metrics(records, norm=False), subjects=subjects)
    return choice_metrics(records, norm=task != "winogrande")


def resolve_tasks(tasks) -> list[str]:
    """"all", "piqa,arc_e" or a list -> canonical task names in the paper's order."""
    if tasks == "all":
        tasks = TASKS
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = []
    for t in names:
        t = ALIASES.get(t.strip().lower(), t.strip().lower())
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)} or 'all'")
        out.append(t)
    return [t for t in TASKS if t in out]


def router_layers(model, layer: int) -> dict[str, torch.nn.Module]:
    """MoR / MoELoRA adapter layers (those with record_router) inside transformer block `layer`."""
    block = model.layers[layer]
    found = {n: m for n, m in block.named_modules() if hasattr(m, "record_router")}
    if not found:
        raise ValueError(f"block {layer} has no MoR/MoELoRA adapter with a router: "
                         "--router_stats needs one")
    return found


def evaluate_tasks(model, tokenizer, tasks, data_dir: str, limit: int | None = None,
                   batch_size: int = 16, skip_bad: bool = False, router_layer: int | None = None,
                   share_prefix: bool = True) -> dict:
    """{task: {metric: value, ..., "n": items}} for each task; with tasks="all" a task whose
    folder is missing is {"absent": reason} (never 0), a task named explicitly must exist.
    router_layer: also record the mean router weight per expert of that block's MoR/MoELoRA
    layers ({"router": {name: [..]}}, paper Fig. 7). Under torch.distributed each rank scores
    items[rank::world] and the records are gathered."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no benchmark folder")
    rank, world = _rank_world()
    results = {}
    for task in resolve_tasks(tasks):
        if tasks == "all" and not os.path.isdir(os.path.join(data_dir, task)):
            results[task] = {"absent": f"no folder {os.path.join(data_dir, task)}"}
            continue
        t0 = time.time()
        items, bad = load_task(task, data_dir, limit, skip_bad)
        if not items:   # a score over no item is no score: absent, never 0 (nor in Avg.)
            why = f"every row malformed ({bad} skipped by --skip_bad)" if bad else \
                "no rows in its data file"
            results[task] = {"absent": f"{os.path.join(data_dir, task)}: {why}", "n": 0,
                             "skipped_bad_rows": bad}
            continue
        routers = router_layers(model, router_layer) if router_layer is not None else {}
        for m in routers.values():
            m.router_sum.zero_()
            m.router_count.zero_()
            m.record_router = True
        try:
            mine = task_records(model, tokenizer, task, items[rank::world], batch_size,
                                share_prefix)
            records = _gather(mine)
        finally:
            for m in routers.values():
                m.record_router = False
        metrics = task_metrics(task, records)
        if bad:
            metrics["skipped_bad_rows"] = bad
        if routers:
            metrics["router"] = _router_means(routers)
        metrics["time_s"] = round(time.time() - t0, 2)
        results[task] = metrics
    return results


def _router_means(routers: dict[str, torch.nn.Module]) -> dict[str, list[float]]:
    """Mean router weight per expert of each layer: the weights and token counts of all ranks are
    summed, then divided."""
    parts = _gather([{name: (m.router_sum.tolist(), int(m.router_count))
                      for name, m in routers.items()}])
    means = {}
    for name, m in routers.items():
        tokens = max(sum(p[name][1] for p in parts), 1)
        means[name] = [sum(p[name][0][e] for p in parts) / tokens for e in range(len(m.router_sum))]
    return means


# -----------------------------------------------------------------------------
# output

def format_table(results: dict) -> str:
    """One row in the paper's column order (x100); absent or not-run tasks show "-"; Avg. over the
    tasks present."""
    cells, values = [], []
    for task in TASKS:
        r = results.get(task, {})
        if REPORTED[task] in r:
            values.append(100 * r[REPORTED[task]])
            cells.append(f"{values[-1]:.1f}")
        else:
            cells.append("absent" if "absent" in r else "-")
    avg = f"{sum(values) / len(values):.1f}" if values else "-"
    head = [COLUMNS[t] for t in TASKS] + ["Avg."]
    cells.append(avg)
    w = [max(len(h), len(c)) for h, c in zip(head, cells)]
    lines = [" | ".join(x.rjust(k) for x, k in zip(row, w)) for row in (head, cells)]
    if 0 < len(values) < len(TASKS):
        lines.append(f"(Avg. over the {len(values)} tasks with a number)")
    return "\n".join(lines)


if __name__ == "__main__":
    from tools import eval_cli   # the command line; it imports evaluate, so it is imported here
    eval_cli.main()
