"""The ten benchmarks' files -> items to score: where each task's data file is, how its rows read
(JSONL, MMLU's CSVs, -labels.lst files, bad bytes and rows), and each task's prompt and choices as
in EleutherAI's lm-evaluation-harness (one `format_*` per task; its docstring is the prompt).
evaluate.py scores the items.

An item is dict(context, choices, gold) (multiple choice), dict(contexts, continuation, gold)
(WinoGrande), dict(context, continuation) (LAMBADA) or dict(context, answers) (NQ-open), plus
"where" = "file:line".
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
from typing import Callable

import data

# data file(s) looked for in data_dir/<task>/, first match wins: official release name first, then
# the Hugging Face split saved as JSONL. A "<stem>-labels.lst" next to the file supplies the labels.
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


# -----------------------------------------------------------------------------
# task formats: one short function per benchmark, official row or Hugging Face row -> item

def _label(value, n: int, base: int = 0) -> int:
    """Integer label (int or digit string) counted from `base` -> index in 0..n-1, or an error."""
    try:
        i = int(str(value).strip()) - base
    except ValueError:
        raise ValueError(f"label {value!r} is not an integer") from None
    if not 0 <= i < n:
        raise ValueError(f"label {value!r} out of range (expected {base}..{base + n - 1})")
    return i


def _text(value, what: str) -> str:
    """A text field of a row as it is (empty allowed: HellaSwag's ctx_b often is), or a clear
    error; so that a null or a number is a bad row here, not the prompt "None" or a crash in the
    tokenizer."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r:.40}")
    return value


def check_item(item: dict) -> None:
    """What the tokenizer will see: every prompt, choice and answer valid Unicode text (a file's
    bytes that are not UTF-8 arrive as lone surrogates, see _raw_rows), and nothing scored empty."""
    scored = list(item.get("choices", [])) + ([item["continuation"]] if "continuation" in item
                                              else [])
    texts = scored + list(item.get("contexts", [])) + ([item["context"]] if "context" in item
                                                       else [])
    for t in texts + list(item.get("answers", [])):
        if not data.is_unicode(_text(t, "every choice and prompt")):
            raise ValueError(f"text {t[:30]!r} is not valid Unicode (bytes that are not UTF-8, "
                             "or a lone surrogate escape)")
    if any(not t.strip() for t in scored):
        raise ValueError("an empty choice or continuation (nothing to score)")


def _keyed_choices(choices, answer_key) -> tuple[list[str], int]:
    """ARC/OBQA choices: official [{"text", "label"}, ...] or HF {"text": [...], "label": [...]};
    labels are A-E or 1-5 and the gold is the position of answerKey among them."""
    if isinstance(choices, dict):
        texts, labels = list(choices["text"]), [str(x) for x in choices["label"]]
    else:
        texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
    key = str(answer_key).strip()
    if key not in labels:
        raise ValueError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    return texts, labels.index(key)


def format_piqa(row: dict) -> dict:
    """PIQA: "Question: {goal}\\nAnswer:" -> [sol1, sol2]; label 0/1 (valid-labels.lst or HF)."""
    return dict(context=f"Question: {_text(row['goal'], 'goal')}\nAnswer:",
                choices=[row["sol1"], row["sol2"]], gold=_label(row["label"], 2))


def format_siqa(row: dict) -> dict:
    """SIQA: "Q: {context} {question}\\nA:" -> [answerA, answerB, answerC]; label 1..3."""
    context, question = _text(row["context"], "context"), _text(row["question"], "question")
    return dict(context=f"Q: {context} {question}\nA:",
                choices=[row["answerA"], row["answerB"], row["answerC"]],
                gold=_label(row["label"], 3, base=1))


def format_winogrande(row: dict) -> dict:
    """WinoGrande, partial scoring: contexts = sentence up to "_" with option1 / option2 filled in;
    the shared continuation " {rest of the sentence}" is scored after each. answer "1"/"2"."""
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"sentence has no '_' blank: {sentence!r}")
    cut = sentence.index("_")   # the first one, as the harness
    return dict(contexts=[sentence[:cut] + row["option1"], sentence[:cut] + row["option2"]],
                continuation=sentence[cut + 1:].strip(),
                gold=_label(row.get("label", row.get("answer")), 2, base=1))


def format_arc(row: dict) -> dict:
    """ARC-Easy/Challenge: "Question: {question}\\nAnswer:" -> choice texts; gold: answerKey's."""
    q = row["question"]
    stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, row["choices"])
    texts, gold = _keyed_choices(choices, row["answerKey"])
    return dict(context=f"Question: {_text(stem, 'question')}\nAnswer:", choices=texts, gold=gold)


def format_openbookqa(row: dict) -> dict:
    """OpenBookQA: "{question_stem}" -> choice texts (no "Answer:"); gold: answerKey's position."""
    if "question_stem" in row:                     # Hugging Face
        stem, choices = row["question_stem"], row["choices"]
    else:                                          # official
        stem, choices = row["question"]["stem"], row["question"]["choices"]
    texts, gold = _keyed_choices(choices, row["answerKey"])
    return dict(context=stem, choices=texts, gold=gold)


def hellaswag_preprocess(text: str) -> str:
    """The harness's WikiHow cleanup: " [title]" -> ". ", other [brackets] out, "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def format_hellaswag(row: dict) -> dict:
    """HellaSwag: "{activity_label}: {ctx_a} {ctx_b capitalised}" -> endings, all through
    hellaswag_preprocess; label 0..3 (int in the official file, string in HF)."""
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " "
                                   + row["ctx_b"].capitalize())
    endings = row["endings"]
    return dict(context=context, choices=[hellaswag_preprocess(e) for e in endings],
                gold=_label(row["label"], len(endings)))


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """MMLU 0-shot: "The following are multiple choice questions (with answers) about
    {subject}.\\n\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" (subject underscores ->
    spaces, question stripped)."""
    subject = subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    options = "".join(f"\n{k}. {c}" for k, c in zip("ABCD", choices))
    return header + question.strip() + options + "\nAnswer:"


def format_mmlu(row: dict) -> dict:
    """MMLU: mmlu_prompt -> [" A", " B", " C", " D"]. Official headerless CSV (question, A, B, C, D,
    answer letter) or HF row (question, subject, choices, answer 0..3 or letter)."""
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
    return dict(context=mmlu_prompt(row["subject"], question, choices),
                choices=["A", "B", "C", "D"], gold=gold, subject=row["subject"])


def format_lambada(row: dict) -> dict:
    """LAMBADA (OpenAI): context = text but its last word (split on " "), continuation " {word}"."""
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
    """The data file(s) of a task folder (FILES order), or FileNotFoundError naming the expected."""
    for pattern in FILES[task]:
        paths = sorted(glob.glob(os.path.join(folder, pattern)))
        if paths:
            return paths
    raise FileNotFoundError(f"{folder}: no {task} data file; expected one of {FILES[task]}")


def _raw_rows(task: str, paths: list[str]) -> list[tuple[str, object, str | None]]:
    """(where = "file:line", raw row: JSON text or dict, label from a -labels.lst file or None).

    Files are decoded with errors="surrogateescape": a byte that is not UTF-8 does not stop the
    whole read (with no line to name) but becomes a lone surrogate in its row, which check_item
    rejects as that row's. A UTF-8 BOM (utf-8-sig) and CRLF line ends (Windows, Excel) read as the
    plain UTF-8, LF file would."""
    if paths[0].endswith(".csv"):   # MMLU: a headerless CSV per subject
        rows = []
        for path in paths:
            subject = os.path.basename(path)[: -len("_test.csv")]
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                reader = csv.reader(f)
                line = 1
                while True:
                    try:
                        fields = next(reader, None)
                    except csv.Error as e:   # a field over csv.field_size_limit(): a bad row
                        rows.append((f"{path}:{line}", ValueError(f"CSV: {e}"), None))
                        line = reader.line_num + 1
                        continue
                    if fields is None:
                        break
                    if any(x.strip() for x in fields):   # CRLF inside quotes -> "\n"
                        fields = [x.replace("\r\n", "\n") for x in fields]
                        rows.append((f"{path}:{line}", dict(subject=subject, fields=fields), None))
                    line = reader.line_num + 1
        return rows
    path = paths[0]
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:   # text: CRLF -> "\n"
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


def load_task(task: str, data_dir: str, limit: int | None = None,
              skip_bad: bool = False) -> tuple[list[dict], int]:
    """Items of one task from data_dir/<task>/ -> (items, number of bad rows skipped).

    A malformed row or an out-of-range label raises ValueError naming file and line, unless
    skip_bad. limit: the first `limit` items (for MMLU the first `limit` of every subject, as the
    harness does).
    """
    folder = os.path.join(data_dir, task)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no folder for task {task} "
                                f"(expected one of {FILES[task]} in it)")
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
