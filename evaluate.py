"""Zero-shot evaluation on the paper's ten benchmarks (Table 1, Appendix B), the lm-evaluation-harness way.

    python evaluate.py --ckpt_dir llama-2-7b --adapter out/adapter.pth --data_dir benchmarks --out results.json

Prompts, choices and metrics follow EleutherAI's lm-evaluation-harness (each task's prompt is in the
docstring of its `format_*` function below). The paper's own numbers come from OpenCompass, whose prompts
differ, so absolute values are not comparable with Table 1; differences between methods are what to compare.

Scoring. A multiple-choice question becomes one (context, " " + choice) request per choice. Every request
is scored by the summed log-probability of its continuation tokens (`loglikelihood`); `acc` takes the
argmax, `acc_norm` divides by the length in characters of the choice text first (harness convention).
Each batch is scored the cheapest exact way (`plan_scoring`): the one-token choices of a question (MMLU)
from one row, multi-token choices through the KV cache of their shared context where that saves tokens,
plain rows otherwise; bench/prefix.py times the ways against each other.

Reported number per task (the table): acc_norm for PIQA, ARC-E, ARC-C, HellaSwag, OBQA; acc for SIQA,
WinoGrande, MMLU, LAMBADA; exact match for NQ-open. Every metric is in the JSON.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import string
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import llama
from tools import checks
from tools.chat import apply_adapter
from tools.dist import setup_distributed

# paper column order (Table 1)
TASKS = ("siqa", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa", "lambada",
         "mmlu", "nq_open")
COLUMNS = dict(siqa="SIQA", piqa="PIQA", winogrande="WG", arc_easy="ARC-E", arc_challenge="ARC-C",
               hellaswag="Hella.", openbookqa="OBQA", lambada="Lam.", mmlu="MMLU", nq_open="NQ")
REPORTED = dict(siqa="acc", piqa="acc_norm", winogrande="acc", arc_easy="acc_norm", arc_challenge="acc_norm",
                hellaswag="acc_norm", openbookqa="acc_norm", lambada="acc", mmlu="acc", nq_open="exact_match")
ALIASES = dict(social_iqa="siqa", wg="winogrande", arc_e="arc_easy", arc_c="arc_challenge", hella="hellaswag",
               obqa="openbookqa", lambada_openai="lambada", lam="lambada", nq="nq_open")
# data file(s) looked for in data_dir/<task>/, first match wins: official release name first, then the
# Hugging Face split saved as JSONL. A "<stem>-labels.lst" next to the file supplies the labels.
FILES = dict(
    piqa=["valid.jsonl", "dev.jsonl", "validation.jsonl"],
    siqa=["dev.jsonl", "validation.jsonl"],
    winogrande=["dev.jsonl", "validation.jsonl"],
    arc_easy=["ARC-Easy-Test.jsonl", "test.jsonl"],
    arc_challenge=["ARC-Challenge-Test.jsonl", "test.jsonl"],
    hellaswag=["hellaswag_val.jsonl", "validation.jsonl"],
    openbookqa=["Main/test.jsonl", "test.jsonl"],
    lambada=["lambada_test.jsonl", "test.jsonl"],
    mmlu=["test/*_test.csv", "test.jsonl"],
    nq_open=["NQ-open.dev.jsonl", "validation.jsonl"],
)
NQ_STOP = ("\n", ".", ",")
NQ_MAX_NEW_TOKENS = 32   # the longest NQ-open dev answer is 51 characters: longer outputs cannot match


# -----------------------------------------------------------------------------
# core: log-likelihood of continuations

def encode_request(tokenizer, context: str, continuation: str, max_seq_len: int,
                   known: dict[str, int] | None = None) -> tuple[list[int], int, bool]:
    """Tokenise one (context, continuation) request as the harness does -> (tokens, n_continuation, truncated).

    Trailing whitespace of the context moves onto the continuation; BOS + encode(context + continuation) is
    the sequence, and its tokens after the length of encode(context) are the continuation. Sequences longer
    than max_seq_len + 1 keep their last tokens (left truncation): the model reads tokens[:-1] and predicts
    tokens[1:], whose last n_continuation are scored. `known`: context -> its token count, filled as it goes
    (the choices of a question share one context: encode it once).
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
        raise ValueError(f"continuation {continuation!r} adds no token after context {context[-40:]!r}")
    tokens = whole[-(max_seq_len + 1):]
    return tokens, min(n_cont, len(tokens) - 1), len(whole) > len(tokens)


def _device(model: torch.nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    return t.device if t is not None else torch.device("cpu")


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    """Right padding with token 0: harmless under causal attention, padded positions are never read."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """(sum of log p(target), every target is the argmax) for logits [n, vocab] predicting n targets."""
    logp = F.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(targets, device=logits.device)
    return logp.gather(1, t[:, None]).sum().item(), bool((logp.argmax(-1) == t).all())


def _score_rows(model, encoded, rows: list[list[int]], out: list) -> None:
    """One causal forward of a batch of rows; a row is the input (tokens[:-1]) of its first request, and every
    other request in it has an input that is a prefix of that one (same logits there, attention is causal).
    Every scored position of the batch goes through one log_softmax and one gather (not one per request)."""
    logits = model(_pad([encoded[row[0]][0][:-1] for row in rows], _device(model)))
    where, targets, owner, ids = [], [], [], []   # owner: index into ids (the requests of this batch)
    for b, row in enumerate(rows):
        for i in row:
            tokens, n = encoded[i]
            L = len(tokens) - 1   # logits at positions L-n..L-1 predict the continuation tokens[L-n+1:]
            where += [(b, t) for t in range(L - n, L)]
            targets += tokens[L - n + 1:]
            owner += [len(ids)] * n
            ids.append(i)
    b_idx, t_idx = torch.tensor(where, device=logits.device).unbind(1)
    logp = F.log_softmax(logits[b_idx, t_idx].float(), dim=-1)
    tgt, own = torch.tensor(targets, device=logits.device), torch.tensor(owner, device=logits.device)
    ll = torch.zeros(len(ids), dtype=torch.float64, device=logits.device).index_add_(   # sums in float64:
        0, own, logp.gather(1, tgt[:, None])[:, 0].double())                                 # order-free
    missed = torch.zeros(len(ids), device=logits.device).index_add_(0, own, (logp.argmax(-1) != tgt).float())
    ll, missed = ll.tolist(), missed.tolist()
    for k, i in enumerate(ids):
        out[i] = (ll[k], missed[k] == 0)


def _score_shared(model, encoded, batch: list[list[int]], out: list) -> None:
    """A batch of groups (one row each, requests longest first) sharing each group's prefix via the KV cache.

    Step 1: one forward of every group's common prefix (p_g tokens, its own length) fills the KV cache.
    Step 2: for j = 0, 1, ..., one forward of every group's j-th request from its own position p_g on (a [B]
    start_pos), reading the cache. Step 2 overwrites cache slots >= p_g, which later steps rewrite before
    reading (the cache mask hides slots beyond a row's current position), so every request sees exactly its
    own tokens, and no part of a context is computed twice.
    """
    inputs = {i: encoded[i][0][:-1] for g in batch for i in g}
    p = [_common_prefix([inputs[i] for i in g]) for g in batch]
    device = _device(model)
    width = max(len(inputs[i]) - n for g, n in zip(batch, p) for i in g)   # the widest padded tail
    model.setup_cache(len(batch), max(p) + width)   # just long enough for this batch
    head = model(_pad([inputs[g[0]][:n] for g, n in zip(batch, p)], device), start_pos=0) if max(p) else None
    starts = torch.tensor(p, device=device)
    for j in range(max(len(g) for g in batch)):
        rows = [g[j] if j < len(g) else None for g in batch]
        tails = [inputs[i][n:] if i is not None else [] for i, n in zip(rows, p)]
        tail = model(_pad([t or [0] for t in tails], device), start_pos=starts) if any(tails) else None
        for b, (i, n) in enumerate(zip(rows, p)):
            if i is None:
                continue
            tokens, k = encoded[i]
            L = len(tokens) - 1
            lo = L - k   # logits at positions lo..L-1 predict the continuation
            parts = ([head[b, lo:min(L, n)]] if lo < n else []) + ([tail[b, max(lo, n) - n:L - n]] if L > n else [])
            out[i] = _score(torch.cat(parts), tokens[lo + 1:])


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _fed(lengths: list[int], batch_size: int) -> int:
    """Token positions that plain batches of these row lengths feed, longest first, padding included."""
    lengths = sorted(lengths, reverse=True)
    return sum(lengths[s] * len(lengths[s:s + batch_size]) for s in range(0, len(lengths), batch_size))


def plan_scoring(encoded: list[tuple[list[int], int]], groups: list[list[int]], batch_size: int,
                 min_saving: float = 0.1) -> list[tuple[str, list[list[int]]]]:
    """Batches [("rows" | "shared", [[request indices], ...])] scoring every request exactly once, each the
    cheapest exact way (token positions fed, padding included):
    - a group (one context) whose inputs (tokens[:-1]) are all prefixes of its longest is one row: causal
      attention gives a prefix the same logits inside the longer row (one-token choices: all from one row,
      even where the tokenizer splits " A" into two tokens and so lengthens that choice's input by one);
    - groups whose choices differ in their inputs (multi-token choices) are batched longest first, and a batch
      is scored through a shared prefix (`_score_shared`) only if that feeds >= min_saving fewer positions
      than plain rows would; otherwise its requests become plain rows;
    - rows are batched by length, longest first (the harness's order: little padding).
    """
    inputs = [tuple(tokens[:-1]) for tokens, _ in encoded]
    rows, multi = {}, []
    for g in groups:
        g = sorted(g, key=lambda i: -len(inputs[i]))
        longest = inputs[g[0]]
        if all(longest[:len(inputs[i])] == inputs[i] for i in g):   # causal: the longest row holds them all
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
    """(sum of log-probabilities of the continuation tokens, all of them greedy) for each (context, continuation).

    Tokenisation follows the harness (`encode_request`); requests longer than model.params.max_seq_len keep
    their last tokens. share_prefix: the requests of one context string are scored together, each batch the
    cheapest exact way (`plan_scoring`: one row for all one-token choices, a shared prefix through the KV
    cache where it saves tokens, plain rows otherwise); share_prefix False: one full forward per request,
    batched by length (the reference path). Results come back in the order of `requests`.
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
    bar = tqdm(total=len(requests), desc=desc, disable=desc is None or not _is_main(), leave=False)
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
    """(context, delimiter + choice) per choice; WinoGrande items instead have one context per choice."""
    if "contexts" in item:
        return [(c, delimiter + item["continuation"]) for c in item["contexts"]]
    return [(item["context"], delimiter + c) for c in item["choices"]]


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)   # first maximum on ties, like numpy


def choice_records(model, tokenizer, items: list[dict], batch_size: int = 16, delimiter: str = " ",
                   desc: str | None = None, share_prefix: bool = True) -> list[dict]:
    """Per item: log-likelihood of each choice, gold index, choice lengths in characters (for acc_norm)."""
    requests, spans = [], []
    for item in items:
        r = choice_requests(item, delimiter)
        spans.append((len(requests), len(requests) + len(r)))
        requests += r
    lls = [ll for ll, _ in loglikelihood(model, tokenizer, requests, batch_size, share_prefix, desc)]
    return [dict(ll=lls[a:b], gold=item["gold"], lens=[len(c) for c in item.get("choices", [])],
                 subject=item.get("subject")) for item, (a, b) in zip(items, spans)]


def choice_metrics(records: list[dict], norm: bool = True) -> dict:
    """acc: argmax of summed log-likelihood; acc_norm: argmax of log-likelihood / len(choice text)."""
    n = len(records)
    out = {"acc": sum(_argmax(r["ll"]) == r["gold"] for r in records) / max(n, 1)}
    if norm:
        out["acc_norm"] = sum(_argmax([ll / max(k, 1) for ll, k in zip(r["ll"], r["lens"])]) == r["gold"]
                              for r in records) / max(n, 1)
    out["n"] = n
    return out


def score_multiple_choice(model, tokenizer, items: list[dict], batch_size: int = 16, delimiter: str = " ") -> dict:
    """Items dict(context, choices, gold) -> {"acc", "acc_norm", "n"} (used by train.py's demo)."""
    return choice_metrics(choice_records(model, tokenizer, items, batch_size, delimiter))


# -----------------------------------------------------------------------------
# task formats: one short function per benchmark, official row or Hugging Face row -> item

def _label(value, n: int, base: int = 0) -> int:
    """Integer label (int or digit string) counted from `base` -> index in 0..n-1, or a clear error."""
    try:
        i = int(str(value).strip()) - base
    except ValueError:
        raise ValueError(f"label {value!r} is not an integer") from None
    if not 0 <= i < n:
        raise ValueError(f"label {value!r} out of range (expected {base}..{base + n - 1})")
    return i


def _text(value, what: str) -> str:
    """A text field of a row as it is (empty allowed: HellaSwag's ctx_b often is), or a clear error; so that a
    null or a number is a bad row here, not the prompt "None" or a crash in the tokenizer."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r:.40}")
    return value


def check_item(item: dict) -> None:
    """What the tokenizer will see: every prompt, choice and answer valid Unicode text (a file's bytes that are
    not UTF-8 arrive as lone surrogates, see _raw_rows), and nothing scored empty."""
    scored = list(item.get("choices", [])) + ([item["continuation"]] if "continuation" in item else [])
    texts = scored + list(item.get("contexts", [])) + ([item["context"]] if "context" in item else [])
    for t in texts + list(item.get("answers", [])):
        if not data.is_unicode(_text(t, "every choice and prompt")):
            raise ValueError(f"text {t[:30]!r} is not valid Unicode (bytes that are not UTF-8, or a lone "
                             "surrogate escape)")
    if any(not t.strip() for t in scored):
        raise ValueError("an empty choice or continuation (nothing to score)")


def _keyed_choices(choices, answer_key) -> tuple[list[str], int]:
    """ARC/OBQA choices: official [{"text", "label"}, ...] or HF {"text": [...], "label": [...]}; labels
    are A-E or 1-5 and the gold is the position of answerKey among them."""
    if isinstance(choices, dict):
        texts, labels = list(choices["text"]), [str(x) for x in choices["label"]]
    else:
        texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
    key = str(answer_key).strip()
    if key not in labels:
        raise ValueError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    return texts, labels.index(key)


def format_piqa(row: dict) -> dict:
    """PIQA: "Question: {goal}\\nAnswer:" -> [sol1, sol2]; label 0/1 (valid-labels.lst or HF "label")."""
    return dict(context=f"Question: {_text(row['goal'], 'goal')}\nAnswer:", choices=[row["sol1"], row["sol2"]],
                gold=_label(row["label"], 2))


def format_siqa(row: dict) -> dict:
    """SIQA: "Q: {context} {question}\\nA:" -> [answerA, answerB, answerC]; label 1..3 (both forms)."""
    return dict(context=f"Q: {_text(row['context'], 'context')} {_text(row['question'], 'question')}\nA:",
                choices=[row["answerA"], row["answerB"], row["answerC"]], gold=_label(row["label"], 3, base=1))


def format_winogrande(row: dict) -> dict:
    """WinoGrande, partial scoring: contexts = sentence up to "_" with option1 / option2 filled in; the
    shared continuation " {rest of the sentence}" is scored after each. answer "1"/"2"."""
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"sentence has no '_' blank: {sentence!r}")
    cut = sentence.index("_")   # the first one, as the harness
    return dict(contexts=[sentence[:cut] + row["option1"], sentence[:cut] + row["option2"]],
                continuation=sentence[cut + 1:].strip(), gold=_label(row.get("label", row.get("answer")), 2, base=1))


def format_arc(row: dict) -> dict:
    """ARC-Easy/Challenge: "Question: {question}\\nAnswer:" -> choice texts; gold = answerKey's position."""
    q = row["question"]
    stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, row["choices"])
    texts, gold = _keyed_choices(choices, row["answerKey"])
    return dict(context=f"Question: {_text(stem, 'question')}\nAnswer:", choices=texts, gold=gold)


def format_openbookqa(row: dict) -> dict:
    """OpenBookQA: "{question_stem}" -> choice texts (no prefix, no "Answer:"); gold = answerKey's position."""
    if "question_stem" in row:                     # Hugging Face
        stem, choices = row["question_stem"], row["choices"]
    else:                                          # official
        stem, choices = row["question"]["stem"], row["question"]["choices"]
    texts, gold = _keyed_choices(choices, row["answerKey"])
    return dict(context=stem, choices=texts, gold=gold)


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup of WikiHow artefacts: " [title]" -> ". ", other [brackets] dropped, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def format_hellaswag(row: dict) -> dict:
    """HellaSwag: "{activity_label}: {ctx_a} {ctx_b capitalised}" -> endings, all through
    hellaswag_preprocess; label 0..3 (int in the official file, string in HF)."""
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    endings = row["endings"]
    return dict(context=context, choices=[hellaswag_preprocess(e) for e in endings],
                gold=_label(row["label"], len(endings)))


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """MMLU 0-shot: "The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" (subject underscores -> spaces, question stripped)."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + question.strip() + "".join(f"\n{k}. {c}" for k, c in zip("ABCD", choices)) + "\nAnswer:"


def format_mmlu(row: dict) -> dict:
    """MMLU: mmlu_prompt -> [" A", " B", " C", " D"]. Official headerless CSV (question, A, B, C, D, answer
    letter) or HF row (question, subject, choices, answer 0..3 or letter)."""
    if "fields" in row:                            # official CSV, subject from the file name
        f = row["fields"]
        if len(f) != 6:
            raise ValueError(f"expected 6 CSV fields (question, A, B, C, D, answer), got {len(f)}")
        question, choices, answer = f[0], f[1:5], f[5]
    else:
        question, choices, answer = row["question"], list(row["choices"]), row["answer"]
    if len(choices) != 4:
        raise ValueError(f"expected 4 choices, got {len(choices)}")
    a = str(answer).strip()
    if a.isalpha() and a not in ("A", "B", "C", "D"):
        raise ValueError(f"answer {answer!r} is not one of A, B, C, D")
    gold = "ABCD".index(a) if a.isalpha() else _label(a, 4)
    return dict(context=mmlu_prompt(row["subject"], question, choices), choices=["A", "B", "C", "D"],
                gold=gold, subject=row["subject"])


def format_lambada(row: dict) -> dict:
    """LAMBADA (OpenAI): context = text without its last word (split on " "), continuation " {last word}"."""
    text = _text(row["text"], "text")
    if " " not in text:
        raise ValueError("text has no space: cannot split off the last word")
    context, word = text.rsplit(" ", 1)
    return dict(context=context, continuation=" " + word)


def nq_prompt(question: str) -> str:
    """NQ-open: "Answer these questions:\\n\\nQ: {question}?\\nA:", then greedy generation."""
    return f"Answer these questions:\n\nQ: {question}?\nA:"


def format_nq_open(row: dict) -> dict:
    """NQ-open: question + list of acceptable answers (official and HF rows are the same)."""
    answers = row["answer"]
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answer' must be a non-empty list of strings")
    return dict(context=nq_prompt(_text(row["question"], "question")), answers=answers)


FORMATS: dict[str, Callable[[dict], dict]] = dict(
    piqa=format_piqa, siqa=format_siqa, winogrande=format_winogrande, arc_easy=format_arc,
    arc_challenge=format_arc, hellaswag=format_hellaswag, openbookqa=format_openbookqa,
    lambada=format_lambada, mmlu=format_mmlu, nq_open=format_nq_open)


# -----------------------------------------------------------------------------
# reading the files

def find_data_file(task: str, folder: str) -> list[str]:
    """The data file(s) of a task folder (FILES order), or FileNotFoundError naming what was expected."""
    for pattern in FILES[task]:
        paths = sorted(glob.glob(os.path.join(folder, pattern)))
        if paths:
            return paths
    raise FileNotFoundError(f"{folder}: no {task} data file; expected one of {FILES[task]}")


def _raw_rows(task: str, paths: list[str]) -> list[tuple[str, object, str | None]]:
    """(where = "file:line", raw row: JSON text or dict, label from a -labels.lst file or None).

    Files are decoded with errors="surrogateescape": a byte that is not UTF-8 does not stop the whole read
    (with no line to name) but becomes a lone surrogate in its row, which check_item rejects as that row's.
    A UTF-8 BOM (utf-8-sig) and CRLF line ends (Windows, Excel) read as the plain UTF-8, LF file would."""
    if paths[0].endswith(".csv"):   # MMLU official: one headerless CSV per subject, fields may hold newlines
        rows = []
        for path in paths:
            subject = os.path.basename(path)[: -len("_test.csv")]
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                reader = csv.reader(f)
                line = 1
                while True:
                    try:
                        fields = next(reader, None)
                    except csv.Error as e:   # a field over csv.field_size_limit(): that row is bad, read on
                        rows.append((f"{path}:{line}", ValueError(f"CSV: {e}"), None))
                        line = reader.line_num + 1
                        continue
                    if fields is None:
                        break
                    if any(x.strip() for x in fields):   # a CRLF file's line breaks inside quotes -> "\n"
                        fields = [x.replace("\r\n", "\n") for x in fields]
                        rows.append((f"{path}:{line}", dict(subject=subject, fields=fields), None))
                    line = reader.line_num + 1
        return rows
    path = paths[0]
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:   # text mode: CRLF -> "\n"
        rows = [(f"{path}:{k}", line, None) for k, line in enumerate(f, 1) if line.strip()]
    labels_path = path[: -len(".jsonl")] + "-labels.lst"
    if os.path.isfile(labels_path):
        with open(labels_path, encoding="utf-8-sig", errors="surrogateescape") as f:
            labels = [x.strip() for x in f if x.strip()]
        if len(labels) != len(rows):
            raise ValueError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows of {path}")
        rows = [(where, raw, label) for (where, raw, _), label in zip(rows, labels)]
    return rows


def _why(e: Exception) -> str:
    if isinstance(e, RecursionError):   # json.loads of arrays/objects nested ~1000 deep
        return "JSON nested deeper than Python's recursion limit"
    return f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)


def load_task(task: str, data_dir: str, limit: int | None = None, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Items of one task from data_dir/<task>/ -> (items, number of bad rows skipped).

    A malformed row or an out-of-range label raises ValueError naming file and line, unless skip_bad.
    limit: the first `limit` items (for MMLU the first `limit` of every subject, as the harness does).
    """
    folder = os.path.join(data_dir, task)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no folder for task {task} (expected one of {FILES[task]} in it)")
    items, bad = [], 0
    for where, raw, label in _raw_rows(task, find_data_file(task, folder)):
        try:
            if isinstance(raw, Exception):   # a row the reader could not split
                raise raw
            row = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            if label is not None:
                row = {**row, "label": label}
            item = FORMATS[task](row)
            check_item(item)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
            if not skip_bad:
                raise ValueError(f"{where}: bad {task} row: {_why(e)}") from None
            bad += 1
            continue
        item["where"] = where
        items.append(item)
    if limit is not None and task == "mmlu":
        kept, seen = [], {}
        for x in items:
            seen[x["subject"]] = seen.get(x["subject"], 0) + 1
            if seen[x["subject"]] <= limit:
                kept.append(x)
        items = kept
    elif limit is not None:
        items = items[:limit]
    return items, bad


# -----------------------------------------------------------------------------
# NQ-open generation and its normalisation

def nq_normalize(text: str) -> str:
    """The harness's exact_match options for NQ-open: drop articles ("\\b(?:The |the |An |A |a |an )"),
    lower-case, remove string.punctuation. No other whitespace change."""
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
    """Greedy answers (llama.generate with the KV cache) stopping at "\\n", "." or ","; prompts of similar
    length are batched together and left-truncated to fit max_seq_len."""
    keep = model.params.max_seq_len - max_new_tokens
    tokens = [tokenizer.encode(p, bos=True, eos=False)[-keep:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(tokens[i]))
    batch_size = min(batch_size, model.params.max_batch_size)
    stop = lambda new: any(s in tokenizer.decode(new) for s in NQ_STOP)   # noqa: E731
    out = [""] * len(prompts)
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None or not _is_main(), leave=False):
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

def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _gather(records: list) -> list:
    """Under torchrun every rank scores items[rank::world]; all ranks get everyone's records."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def task_records(model, tokenizer, task: str, items: list[dict], batch_size: int = 16,
                 share_prefix: bool = True) -> list[dict]:
    """Per-item results of one task (what ranks exchange before the metrics are computed)."""
    if task == "nq_open":
        answers = generate_answers(model, tokenizer, [x["context"] for x in items], batch_size, desc=task)
        return [dict(em=float(any(nq_normalize(a) == nq_normalize(g) for g in x["answers"])), answer=a)
                for a, x in zip(answers, items)]
    if task == "lambada":
        res = loglikelihood(model, tokenizer, [(x["context"], x["continuation"]) for x in items], batch_size,
                            share_prefix, desc=task)
        return [dict(ll=ll, greedy=g) for ll, g in res]
    return choice_records(model, tokenizer, items, batch_size, desc=task, share_prefix=share_prefix)


def task_metrics(task: str, records: list[dict]) -> dict:
    """acc / acc_norm, LAMBADA acc + perplexity (exp of minus the mean log-likelihood of the target, as
    the harness), NQ exact_match, MMLU micro-average plus per-subject acc."""
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
    names = list(TASKS) if tasks == "all" else (tasks.split(",") if isinstance(tasks, str) else list(tasks))
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
        raise ValueError(f"block {layer} has no MoR/MoELoRA adapter with a router: --router_stats needs one")
    return found


def evaluate_tasks(model, tokenizer, tasks, data_dir: str, limit: int | None = None, batch_size: int = 16,
                   skip_bad: bool = False, router_layer: int | None = None, share_prefix: bool = True) -> dict:
    """{task: {metric: value, ..., "n": items}} for each task; with tasks="all" a task whose folder is missing
    is {"absent": reason} (never 0), a task named explicitly must exist. router_layer: also record the mean
    router weight per expert of that block's MoR/MoELoRA layers ({"router": {name: [..]}}, paper Fig. 7).
    Under torch.distributed each rank scores items[rank::world] and the records are gathered."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no benchmark folder")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    results = {}
    for task in resolve_tasks(tasks):
        if tasks == "all" and not os.path.isdir(os.path.join(data_dir, task)):
            results[task] = {"absent": f"no folder {os.path.join(data_dir, task)}"}
            continue
        t0 = time.time()
        items, bad = load_task(task, data_dir, limit, skip_bad)
        if not items:   # a score over no item is no score: absent, never 0 (nor in Avg.)
            why = f"every row malformed ({bad} skipped by --skip_bad)" if bad else "no rows in its data file"
            results[task] = {"absent": f"{os.path.join(data_dir, task)}: {why}", "n": 0, "skipped_bad_rows": bad}
            continue
        routers = router_layers(model, router_layer) if router_layer is not None else {}
        for m in routers.values():
            m.router_sum.zero_()
            m.router_count.zero_()
            m.record_router = True
        try:
            records = _gather(task_records(model, tokenizer, task, items[rank::world], batch_size, share_prefix))
        finally:
            for m in routers.values():
                m.record_router = False
        metrics = task_metrics(task, records)
        if bad:
            metrics["skipped_bad_rows"] = bad
        if routers:   # sum the weights and token counts of all ranks, then divide
            parts = _gather([{name: (m.router_sum.tolist(), int(m.router_count)) for name, m in routers.items()}])
            metrics["router"] = {name: [sum(p[name][0][e] for p in parts) / max(sum(p[name][1] for p in parts), 1)
                                        for e in range(len(m.router_sum))] for name, m in routers.items()}
        metrics["time_s"] = round(time.time() - t0, 2)
        results[task] = metrics
    return results


# -----------------------------------------------------------------------------
# output

def format_table(results: dict) -> str:
    """One row in the paper's column order (x100); absent or not-run tasks show "-"; Avg. over those present."""
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
    lines = [" | ".join(h.rjust(k) for h, k in zip(head, w)), " | ".join(c.rjust(k) for c, k in zip(cells, w))]
    if 0 < len(values) < len(TASKS):
        lines.append(f"(Avg. over the {len(values)} tasks with a number)")
    return "\n".join(lines)


def format_router_chart(results: dict, width: int = 30) -> str:
    """Text bar chart of the mean router weight per expert and task (averaged over the block's adapted layers)."""
    lines = []
    for task, r in results.items():
        if "router" not in r:
            continue
        per_layer = list(r["router"].values())
        mean = [sum(col) / len(per_layer) for col in zip(*per_layer)]
        lines.append(f"{task} ({', '.join(r['router'])}):")
        top = max(mean) or 1.0
        lines += [f"  expert {i:2d} {w:.3f} {'#' * round(width * w / top)}" for i, w in enumerate(mean)]
    return "\n".join(lines)


def check_out_path(path: str) -> None:
    """--out can be written: not a folder, no file where a folder must be, permission to create it. Checked
    before the model is loaded, so a typo costs seconds, not a whole evaluation."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: --out is a folder; give a file name, e.g. {os.path.join(path, 'results.json')}")
    parent = os.path.dirname(path) or "."
    while not os.path.exists(parent):   # the nearest part of the path that exists must be a writable folder
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: cannot write --out there: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write --out there: no permission to write in {parent}")


def main(argv: list[str] | None = None) -> None:
    try:   # bad input (files, rows, labels, checkpoints): one line naming the file and the problem
        run(argv)
    except (ValueError, FileNotFoundError) as e:   # CheckpointError is a ValueError
        sys.exit(f"error: {e}")


def run(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Zero-shot evaluation on the paper's benchmarks (lm-eval-harness style).")
    ap.add_argument("--ckpt_dir", required=True, help="base model in Meta's layout (params.json, consolidated.NN.pth)")
    ap.add_argument("--adapter", help="train.py's adapter.pth, or its run folder (out_dir)")
    ap.add_argument("--tokenizer", help="default: tokenizer.model in ckpt_dir, else in its parent")
    ap.add_argument("--data_dir", required=True, help="one folder per task (see README)")
    ap.add_argument("--tasks", default="all", help="all, or a comma list: " + ",".join(TASKS))
    ap.add_argument("--limit", type=int, help="first N items per task (per subject for MMLU)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=2048, help="the model's context (stories260K: 512)")
    ap.add_argument("--skip_bad", action="store_true", help="skip and count malformed rows instead of stopping")
    ap.add_argument("--out", default="out/results.json", help="JSON with every metric, counts and times")
    ap.add_argument("--router_stats", action="store_true", help="mean router weight per expert and task (Fig. 7)")
    ap.add_argument("--router_layer", type=int, default=-1, help="transformer block for --router_stats")
    args = ap.parse_args(argv)
    checks.check_ranges(vars(args), checks.EVALUATE)
    check_out_path(args.out)   # before any scoring: a bad --out must not cost the results
    _, _, device = setup_distributed(cuda=torch.cuda.is_available())   # a process group under torchrun
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.time()
    model = llama.Transformer.from_checkpoint(args.ckpt_dir, device, dtype, max_seq_len=args.max_seq_len,
                                              max_batch_size=args.batch_size)
    if args.adapter:   # a file or train.py's run folder, checked against this base
        apply_adapter(model, args.adapter)
    model.eval()
    n = model.params.n_layers   # a block index, Python-style negatives included
    checks.check_ranges(vars(args), {"router_layer": f"[{-n}, {n - 1}]"})
    tokenizer = llama.load_tokenizer(args.ckpt_dir, model.params.vocab_size, args.tokenizer)
    results = evaluate_tasks(model, tokenizer, args.tasks, args.data_dir, args.limit, args.batch_size, args.skip_bad,
                             args.router_layer if args.router_stats else None)
    wall = time.time() - t0
    if _is_main():
        for task, r in results.items():
            if "absent" in r and "n" in r:   # read, but nothing to score: said here, left out of table and Avg.
                print(f"[{task}] not scored: {r['absent']}", file=sys.stderr)
            if r.get("skipped_bad_rows"):
                print(f"[{task}] skipped {r['skipped_bad_rows']} malformed rows (--skip_bad)", file=sys.stderr)
        print(format_table(results))
        if args.router_stats:
            print(f"mean router weight per expert, block {args.router_layer} (paper Fig. 7):")
            print(format_router_chart(results))
        summary = dict(ckpt_dir=args.ckpt_dir, adapter=args.adapter, limit=args.limit, batch_size=args.batch_size,
                       max_seq_len=args.max_seq_len, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                       device=str(device), dtype=str(dtype), wall_time_s=round(wall, 1),
                       router_layer=args.router_layer if args.router_stats else None,
                       reported={t: r[REPORTED[t]] for t, r in results.items() if REPORTED[t] in r}, tasks=results)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:   # then renamed: an older results file is never half-overwritten
            json.dump(summary, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(f"[wrote {args.out}; {wall:.1f} s]", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
