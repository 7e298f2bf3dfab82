"""Data for instruction tuning: Tulu-v2 JSONL -> (input_ids, labels) batches, and a synthetic set.

Formats read (one JSON object per line, one or several files):
  Tulu-v2 SFT mixture  {"dataset": ..., "id": ..., "messages": [{"role": ..., "content": str}]}
                       (role: "system" | "user" | "assistant")
  prompt/completion    {"prompt": str, "completion": str}   (raw text, loss on the completion only)

Chat template (open-instruct's Tulu template, which the paper's Tulu-v2 data was built for):
  <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{assistant}</s>\n<|user|>\n...
Labels follow the Hugging Face convention: labels[i] is the token at position i (the loss shifts by
one) and -100 means "not supervised". Only assistant replies and the EOS that ends each of them are
supervised: the model is taught to answer, not to imitate users.

Tokenisation is done piece by piece (template text, then reply, then EOS id), so label boundaries
are exact by construction. With SentencePiece (dummy prefix, split on whitespace) encode(a) +
encode(b) equals encode(a + " " + b), so a reply is tokenised as if it followed its prompt after one
space; the evaluator's `context + " " + choice` scoring therefore sees the very tokens training saw.
EOS is a token, not text: the newline the text template puts after `</s>` has no token of its own.
"""
from __future__ import annotations

import io
import json
import os
import random

import sentencepiece as spm
import torch

IGNORE_INDEX = -100  # ignore_index of F.cross_entropy
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Training data that cannot be used as given: a bad file (the message names the file and line)
    or a batch setting the data loader cannot honour."""


def train_tokenizer(texts: list[str], path: str, vocab_size: int = 512) -> str:
    """Train a tiny SentencePiece BPE model in LLaMA's id layout (unk 0, bos 1, eos 2, no pad).

    Used by the no-download demo and the tests; real runs use Meta's tokenizer.model. Byte fallback
    makes every string encodable, as in LLaMA's tokenizer. A newline is always a piece of its own
    (LLaMA encodes it as the byte <0x0A>): no piece straddles a line break, so text ending at a line
    end tokenises the same alone and followed by more text (the evaluator's context/continuation).
    """
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        user_defined_symbols=["\n"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path


# ----------------------------------------------------------------------------- chat template

EOS = None   # the piece that stands for the EOS token (a token id, not text: "</s>" in a reply stays text)


def chat_segments(messages: list[dict]) -> list[tuple[str | None, bool]]:
    """Split a conversation into (text, supervised) pieces of the Tulu template; EOS: the EOS token.

    Each assistant reply is its own supervised piece followed by a supervised EOS; everything else
    (system, user, the `<|assistant|>\\n` header) is context. Contents are stripped (open-instruct).
    """
    segments, context = [], ""
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "assistant":
            segments += [(context + "<|assistant|>\n", False), (content, True), (EOS, True)]
            context = ""
        elif role in ("system", "user"):
            context += f"<|{role}|>\n{content}\n"
        else:
            raise ValueError(f"unknown role {role!r}")
    if context:  # a trailing user turn: context only, nothing to learn from it
        segments.append((context, False))
    return segments


def format_chat(messages: list[dict]) -> str:
    """The conversation as one string in the Tulu template (to read; training: chat_segments)."""
    text = ""
    for piece, _ in chat_segments(messages):
        text += "</s>\n" if piece is EOS else piece
    return text


def chat_prompt(question: str, system: str | None = None) -> str:
    """The text a model sees before answering a user turn: evaluation's and generation's context."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}]
    return "".join(text for text, _ in chat_segments(messages)) + "<|assistant|>\n"


def encode_segments(segments: list[tuple[str | None, bool]], tokenizer,
                    max_len: int) -> tuple[list[int], list[int]]:
    """Tokenise pieces into input_ids and labels ([BOS] first, EOS -> eos id), cut to max_len."""
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for text, supervised in segments:
        toks = [tokenizer.eos_id] if text is EOS else tokenizer.encode(text, bos=False, eos=False)
        ids += toks
        labels += toks if supervised else [IGNORE_INDEX] * len(toks)
    return ids[:max_len], labels[:max_len]  # keep the start, as open-instruct does


def encode_example(example: dict, tokenizer, max_len: int = 1024) -> tuple[list[int], list[int]]:
    """One validated example (chat or prompt/completion) -> (input_ids, labels), cut to max_len."""
    if "messages" in example:
        return encode_segments(chat_segments(example["messages"]), tokenizer, max_len)
    # prompt/completion: raw text, no template (open-instruct: encode_with_prompt_completion_format)
    return encode_segments([(example["prompt"], False), (example["completion"], True), (EOS, True)],
                           tokenizer, max_len)


# ----------------------------------------------------------------------------- reading JSONL

def is_unicode(s: str) -> bool:
    """False for text with a lone surrogate ("\\ud83d": valid JSON, no character; the tokenizer
    rejects it)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_example(obj) -> str | None:
    """Why a parsed JSONL line is not a usable example, or None if it is."""
    if not isinstance(obj, dict):
        return "expected a JSON object"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"message {i} needs 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
            if not isinstance(m["content"], str) or not m["content"].strip():
                return f"message {i} ({m['role']}) has empty content"
            if not is_unicode(m["content"]):
                return f"message {i} ({m['role']}) has invalid unicode (a lone surrogate escape)"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant turn (nothing to learn)"
        return None
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str):
            return "'prompt' must be a string"
        if not isinstance(obj.get("completion"), str) or not obj["completion"].strip():
            return "'completion' is missing or empty"
        if not (is_unicode(obj["prompt"]) and is_unicode(obj["completion"])):
            return "'prompt' or 'completion' has invalid unicode (a lone surrogate escape)"
        return None
    return "expected a 'messages' list (Tulu format) or 'prompt' and 'completion' fields"


def parse_line(raw: bytes, first: bool = False) -> tuple[dict | None, str | None]:
    """One JSONL line (bytes) -> (example, None), or (None, why it is not one); a blank line: (None,
    None). A first line's UTF-8 BOM is dropped (utf-8-sig); a CRLF line end is whitespace."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start} of the line)"
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except RecursionError:
        return None, "not valid JSON for Python: nested deeper than its recursion limit"
    except ValueError as e:   # JSONDecodeError, or an integer longer than int() converts (4300 digits)
        return None, f"not valid JSON ({getattr(e, 'msg', str(e).split(':')[0])})"
    reason = check_example(obj)
    return (obj, None) if reason is None else (None, reason)


def read_jsonl(paths: list[str] | str, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Read examples from JSONL files in order. Returns (examples, number of bad lines skipped).

    A bad line raises DataError("file:line: reason") unless skip_bad, which counts it instead.
    Whitespace-only lines are not examples and are passed over.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    examples, n_bad = [], 0
    for path in paths:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is then a bad line like any other
            for lineno, raw in enumerate(f, 1):
                obj, reason = parse_line(raw, first=lineno == 1)
                if obj is not None:
                    examples.append(obj)
                elif reason is None:  # blank
                    continue
                elif skip_bad:
                    n_bad += 1
                else:
                    raise DataError(f"{path}:{lineno}: {reason} (pass --skip_bad_examples to skip such lines)")
    return examples, n_bad


def tokenize_examples(examples: list[dict], tokenizer, max_len: int = 1024,
                      progress: bool = False) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Tokenise examples; drop (and count) those with no supervised token left after truncation.

    A label at position 0 can never be predicted (nothing precedes it), so "something to learn"
    means a supervised label at position >= 1.
    """
    from tqdm import tqdm
    out, stats = [], dict(n_examples=0, n_truncated=0, n_dropped_empty=0, n_tokens=0, n_supervised=0)
    for ex in tqdm(examples, desc="tokenize", disable=not progress, mininterval=1.0):
        ids, labels = encode_example(ex, tokenizer, max_len=10**9)
        stats["n_truncated"] += len(ids) > max_len
        ids, labels = ids[:max_len], labels[:max_len]
        n_sup = sum(lab != IGNORE_INDEX for lab in labels[1:])
        if n_sup == 0:
            stats["n_dropped_empty"] += 1
            continue
        out.append((ids, labels))
        stats["n_examples"] += 1
        stats["n_tokens"] += len(ids)
        stats["n_supervised"] += n_sup
    return out, stats


def load_dataset(paths: list[str] | str, tokenizer, max_len: int = 1024, skip_bad: bool = False,
                 progress: bool = False) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """read_jsonl + tokenize_examples; stats also has n_bad (lines skipped by skip_bad)."""
    examples, n_bad = read_jsonl(paths, skip_bad=skip_bad)
    data, stats = tokenize_examples(examples, tokenizer, max_len, progress=progress)
    stats["n_bad"] = n_bad
    return data, stats


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate whole examples (in the given order) into rows of at most max_len tokens.

    Fewer pad tokens, same supervised tokens. Packed examples can attend to earlier ones in their
    row (the model takes no attention mask); each still starts with BOS, as usual in packed SFT.
    """
    rows, ids, labels = [], [], []
    for x, y in examples:
        if ids and len(ids) + len(x) > max_len:
            rows.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + x, labels + y
    if ids:
        rows.append((ids, labels))
    return rows


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-pad a micro-batch to a common length, rounded up to pad_to_multiple (fewer shapes for
    torch.compile); also returns each row's real length. Pads get label -100, never supervised;
    right padding is harmless under causal attention: no real token attends to a later pad."""
    T = max(len(x) for x, _ in examples)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        input_ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    lengths = torch.tensor([len(x) for x, _ in examples])   # real (unpadded) tokens, for throughput
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


class Loader:
    """Endless, deterministic, resumable micro-batches for one rank.

    Every epoch visits the examples in a fresh order drawn from (seed, epoch). Optimizer step s of
    an epoch uses the global batch order[s*G : (s+1)*G]; rank r reads only its contiguous
    G/world_size share, cut into micro-batches of micro_batch. The last partial global batch of an
    epoch is dropped, so every step has exactly G examples. The position is counted in global
    batches, so a run can resume on a different number of processes as long as G is the same.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], global_batch: int, micro_batch: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1, pad_id: int = 0, pad_to_multiple: int = 1):
        if global_batch % (micro_batch * world_size):
            raise DataError(f"global batch {global_batch} is not a multiple of micro_batch {micro_batch} "
                            f"x world size {world_size}")
        if len(examples) < global_batch:
            raise DataError(f"{len(examples)} training examples are fewer than one global batch "
                            f"({global_batch})")
        self.examples, self.global_batch, self.micro_batch = examples, global_batch, micro_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_id, self.pad_to_multiple = pad_id, pad_to_multiple
        self.accum_steps = global_batch // (micro_batch * world_size)
        self.steps_per_epoch = len(examples) // global_batch
        self.epoch, self.step = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)  # same on every rank and run
        return order

    def next_step(self) -> list[dict]:
        """The accum_steps micro-batches this rank contributes to the next optimizer step."""
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        share = self.global_batch // self.world_size
        start = self.step * self.global_batch + self.rank * share
        mine = self._order[start:start + share]
        self.step += 1
        return [collate([self.examples[i] for i in mine[j:j + self.micro_batch]], self.pad_id,
                        self.pad_to_multiple)
                for j in range(0, share, self.micro_batch)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "n_examples": len(self.examples), "global_batch": self.global_batch}

    def load_state_dict(self, sd: dict) -> None:
        now = self.state_dict()
        for k in ("seed", "n_examples", "global_batch"):  # another data set or batch: no resume
            if sd[k] != now[k]:
                raise DataError(f"cannot resume: the data loader's {k} was {sd[k]}, now {now[k]}")
        self.epoch, self.step = sd["epoch"], sd["step"]
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------- synthetic multi-task set

WORDS = {
    "animal": ["cat", "dog", "horse", "tiger", "lion", "mouse", "rabbit", "sheep", "goat", "bear"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "color": ["red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink", "gray"],
    "vehicle": ["car", "bus", "train", "truck", "bike", "boat", "plane", "ship", "tram", "van"],
}
NOUNS = ["food", "movie", "room", "service", "book", "hotel", "music", "game", "trip", "show"]
GOOD = ["great", "wonderful", "lovely", "excellent", "amazing", "delightful", "superb", "pleasant"]
BAD = ["terrible", "awful", "boring", "horrible", "bad", "dreadful", "poor", "nasty"]


def _kind(rng: random.Random) -> tuple[str, list[str], int]:
    """Knowledge lookup: the category two words share (the words are facts to know, not to read)."""
    target = rng.randrange(len(WORDS))
    a, b = rng.sample(WORDS[list(WORDS)[target]], 2)
    return f"What kind of things are {a} and {b}?", [c + "s" for c in WORDS], target


def _sentiment(rng: random.Random) -> tuple[str, list[str], int]:
    """Classification: the polarity of a two-clause review."""
    gold = rng.randrange(2)
    adjs = GOOD if gold == 0 else BAD
    n1, n2 = rng.sample(NOUNS, 2)
    review = f"The {n1} was {rng.choice(adjs)} and the {n2} was {rng.choice(adjs)}."
    return f"Is this review positive or negative? {review}", ["positive", "negative"], gold


def _repeat(rng: random.Random) -> tuple[str, list[str], int]:
    """Copying: repeat two words (distractors: other word pairs)."""
    pool = [w for ws in WORDS.values() for w in ws]
    words = rng.sample(pool, 8)
    return (f"Repeat after me: {words[0]} {words[1]}", [f"{words[i]} {words[i + 1]}" for i in range(0, 8, 2)], 0)


def _compare(rng: random.Random) -> tuple[str, list[str], int]:
    """Comparison: the larger of two different two-digit numbers."""
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", [str(a), str(b)], int(b > a)


SKILLS = {"kind": _kind, "sentiment": _sentiment, "repeat": _repeat, "compare": _compare}


def _shuffled_choices(rng: random.Random, choices: list[str], gold: int) -> tuple[list[str], int]:
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(gold)


def synthetic_tasks(n_per_skill: int, seed: int = 0, skills: tuple[str, ...] | None = None) -> list[dict]:
    """Chat examples in the Tulu-v2 JSONL schema, n_per_skill of each skill, interleaved."""
    rng = random.Random(seed)
    out = []
    for i in range(n_per_skill):
        for name in skills or SKILLS:
            question, choices, gold = SKILLS[name](rng)
            out.append({"dataset": f"synthetic_{name}", "id": f"synthetic_{name}_{i}",
                        "messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": choices[gold]}]})
    return out


def synthetic_mc(n_per_skill: int, seed: int = 1, exclude: list[dict] | None = None,
                 skills: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    """Held-out multiple-choice items per skill, as evaluate.score_multiple_choice expects:
    dict(context=chat prompt ending in "<|assistant|>\\n", choices, gold). Score with delimiter " ".
    Questions in `exclude` (the training examples) are skipped, so every item is unseen."""
    seen = {ex["messages"][0]["content"] for ex in exclude or []}
    rng = random.Random(seed)
    out = {}
    for name in skills or SKILLS:
        items, tries = [], 0
        while len(items) < n_per_skill:
            tries += 1
            if tries > 100 * n_per_skill:
                raise RuntimeError(f"cannot draw {n_per_skill} unseen {name} questions")
            question, choices, gold = SKILLS[name](rng)
            if question in seen:
                continue
            seen.add(question)
            choices, gold = _shuffled_choices(rng, choices, gold)
            items.append({"context": chat_prompt(question), "choices": choices, "gold": gold})
        out[name] = items
    return out


def write_jsonl(rows: list[dict], path: str) -> str:
    """Write rows as JSONL (one object per line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
