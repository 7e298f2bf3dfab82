"""data.py: chat template, assistant-only labels, truncation/padding, bad lines, loader order and resume."""
import json
import os
import re

import pytest

import data
from data import IGNORE_INDEX
from llama import Tokenizer

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."}]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_literal_eos_text_is_not_the_eos_token(tok):
    ids, _ = data.encode_example({"messages": [{"role": "user", "content": "x"},
                                               {"role": "assistant", "content": "</s>"}]}, tok)
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id


def test_tulu_template_text():
    # open-instruct's Tulu format, written out by hand
    assert data.format_chat(CONV) == ("<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello!</s>\n"
                                      "<|user|>\nBye\n<|assistant|>\nGoodbye.</s>\n")
    assert data.chat_prompt("Hi there") == "<|user|>\nHi there\n<|assistant|>\n"
    assert data.chat_prompt("Hi", system="Be brief.") == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_only_assistant_tokens_supervised(tok):
    ids, labels = data.encode_example({"messages": CONV}, tok, max_len=1024)
    # independent construction: the four pieces encoded by hand, reply spans located by their lengths
    p1 = tok.encode("<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n", bos=True)
    r1 = tok.encode("Hello!", bos=False)
    p2 = tok.encode("<|user|>\nBye\n<|assistant|>\n", bos=False)
    r2 = tok.encode("Goodbye.", bos=False)
    assert ids == p1 + r1 + [tok.eos_id] + p2 + r2 + [tok.eos_id]
    supervised = set(range(len(p1), len(p1) + len(r1) + 1))
    start = len(p1) + len(r1) + 1 + len(p2)
    supervised |= set(range(start, start + len(r2) + 1))
    for i, (t, lab) in enumerate(zip(ids, labels)):   # token by token
        assert lab == (t if i in supervised else IGNORE_INDEX), i
    sup = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert sup.count(tok.eos_id) == 2 and sup[-1] == tok.eos_id
    assert tok.decode([t for t in sup if t != tok.eos_id]).replace(" ", "") == "Hello!Goodbye."
    # no user or system text among the supervised tokens
    assert "Bye" not in tok.decode(sup[:len(r1)]) and "brief" not in tok.decode(sup)


def test_prompt_completion_labels(tok):
    ids, labels = data.encode_example({"prompt": "Question: 2+3?", "completion": "5"}, tok)
    n_prompt = len(tok.encode("Question: 2+3?", bos=True))
    assert ids == tok.encode("Question: 2+3?", bos=True) + tok.encode("5", bos=False) + [tok.eos_id]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]


def test_truncation_never_supervises_user_tokens(tok):
    full_ids, full_labels = data.encode_example({"messages": CONV}, tok, max_len=1024)
    for max_len in range(2, len(full_ids) + 1):
        ids, labels = data.encode_example({"messages": CONV}, tok, max_len=max_len)
        assert len(ids) == len(labels) == max_len
        assert ids == full_ids[:max_len] and labels == full_labels[:max_len]
    # a cut inside the first prompt leaves nothing to learn: dropped and counted
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    kept, stats = data.tokenize_examples([long_user, {"messages": CONV}], tok, max_len=len(full_ids))
    assert stats["n_dropped_empty"] == 1 and stats["n_truncated"] == 1 and stats["n_examples"] == 1
    assert kept == [(full_ids, full_labels)]


def test_padding_is_masked(tok):
    a = data.encode_example({"messages": CONV}, tok)
    b = data.encode_example({"prompt": "x", "completion": "y"}, tok)
    batch = data.collate([a, b], pad_id=tok.eos_id, pad_to_multiple=8)
    T = batch["input_ids"].shape[1]
    assert T % 8 == 0 and T >= len(a[0])
    assert batch["lengths"].tolist() == [len(a[0]), len(b[0])]
    for row, (ids, labels) in enumerate([a, b]):
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["labels"][row, :n].tolist() == labels
        assert (batch["input_ids"][row, n:] == tok.eos_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()   # pads never supervised


def test_pack_keeps_every_supervised_token(tok):
    exs = [data.encode_example(e, tok, max_len=100) for e in data.synthetic_tasks(6, seed=3)]
    rows = data.pack(exs, max_len=200)
    assert all(len(x) <= 200 for x, _ in rows) and len(rows) < len(exs)
    assert [t for x, _ in rows for t in x] == [t for x, _ in exs for t in x]
    assert [t for _, y in rows for t in y] == [t for _, y in exs for t in y]


BAD = [
    ("not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
     "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
     "empty content"),
    (json.dumps({"prompt": "p", "completion": ""}), "'completion' is missing or empty"),
    (json.dumps({"text": "hello"}), "expected a 'messages' list"),
    # valid JSON (json.dumps escapes it as \ud83d) that the tokenizer cannot take: half an emoji
    (json.dumps({"messages": [{"role": "user", "content": "hi \ud83d"}, {"role": "assistant", "content": "x"}]}),
     "message 0 (user) has invalid unicode"),
    (json.dumps({"prompt": "p", "completion": "\udc00 x"}), "'prompt' or 'completion' has invalid unicode"),
]


@pytest.mark.parametrize("line,reason", BAD, ids=["json", "no_assistant", "role", "empty", "completion", "schema",
                                                  "surrogate_chat", "surrogate_completion"])
def test_bad_line_names_file_and_line(tmp_path, line, reason):
    good = json.dumps({"dataset": "d", "id": "1", "messages": CONV})
    first = write_lines(tmp_path / "a.jsonl", [good, good])
    second = write_lines(tmp_path / "b.jsonl", [good, "", good, line, good])   # blank line 2 is passed over
    with pytest.raises(ValueError, match=re.escape(f"{second}:4: ") + ".*" + re.escape(reason)):
        data.read_jsonl([first, second])
    examples, n_bad = data.read_jsonl([first, second], skip_bad=True)
    assert n_bad == 1 and len(examples) == 5


def test_line_not_utf8_names_file_and_line(tmp_path):
    good = json.dumps({"messages": CONV}).encode()
    bad = json.dumps({"messages": CONV}).replace("Hello", "H\u00e9llo").encode("latin-1")  # é as one Latin-1 byte
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid UTF-8")):
        data.read_jsonl(str(path))
    examples, n_bad = data.read_jsonl(str(path), skip_bad=True)
    assert n_bad == 1 and len(examples) == 2


def test_load_dataset_counts(tmp_path, tok):
    good = json.dumps({"messages": CONV})
    path = write_lines(tmp_path / "c.jsonl", [good, "{oops", good, json.dumps({"prompt": "a", "completion": "b"})])
    exs, stats = data.load_dataset(path, tok, max_len=64, skip_bad=True)
    assert len(exs) == 3 and stats["n_bad"] == 1 and stats["n_examples"] == 3
    assert stats["n_supervised"] == sum(sum(lab != IGNORE_INDEX for lab in y) for _, y in exs)


def fake_examples(n):
    return [([1, 100 + i, 2], [IGNORE_INDEX, 100 + i, 2]) for i in range(n)]   # example i carries token 100+i


def ids_of(micro_batches):
    return [int(t) for mb in micro_batches for t in mb["input_ids"][:, 1]]


def test_loader_epochs_shards_and_resume():
    exs = fake_examples(21)
    one = data.Loader(exs, global_batch=4, micro_batch=1, seed=7)
    assert one.steps_per_epoch == 5 and one.accum_steps == 4
    epoch0 = [ids_of(one.next_step()) for _ in range(5)]
    seen = [t for b in epoch0 for t in b]
    assert len(set(seen)) == 20 and all(100 <= t < 121 for t in seen)   # each example at most once; 1 left over
    epoch1 = [ids_of(one.next_step()) for _ in range(5)]
    assert epoch1 != epoch0   # a fresh order every epoch
    # same seed, same order; two ranks split each global batch without overlap
    r0 = data.Loader(exs, 4, 2, seed=7, rank=0, world_size=2)
    r1 = data.Loader(exs, 4, 2, seed=7, rank=1, world_size=2)
    assert r0.accum_steps == 1
    for s in range(10):
        a, b = ids_of(r0.next_step()), ids_of(r1.next_step())
        assert sorted(a + b) == sorted((epoch0 + epoch1)[s]) and not set(a) & set(b)
    # resume: a fresh loader given the state continues with the next unseen batch
    two = data.Loader(exs, 4, 2, seed=7)
    for _ in range(3):
        two.next_step()
    state = json.loads(json.dumps(two.state_dict()))
    three = data.Loader(exs, 4, 2, seed=7)
    three.load_state_dict(state)
    assert [ids_of(three.next_step()) for _ in range(7)] == (epoch0 + epoch1)[3:10]
    with pytest.raises(ValueError, match="seed"):
        data.Loader(exs, 4, 2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple"):
        data.Loader(exs, 4, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.Loader(exs[:3], 4, 1)


def test_synthetic_tasks_and_heldout_items():
    train = data.synthetic_tasks(30, seed=0)
    assert len(train) == 120 and {r["dataset"] for r in train} == {f"synthetic_{s}" for s in data.SKILLS}
    mc = data.synthetic_mc(25, seed=1, exclude=train)
    questions = {r["messages"][0]["content"] for r in train}
    for skill, items in mc.items():
        assert len(items) == 25
        for it in items:
            q = it["context"][len("<|user|>\n"):-len("\n<|assistant|>\n")]
            assert it["context"] == data.chat_prompt(q) and q not in questions   # unseen
            gold = it["choices"][it["gold"]]
            # the gold answer by each skill's rule, recomputed from the question text
            if skill == "compare":
                assert int(gold) == max(int(x) for x in re.findall(r"\d+", q))
            elif skill == "kind":
                a, b = re.search(r"are (\w+) and (\w+)\?", q).groups()
                assert [gold[:-1]] == [c for c, ws in data.WORDS.items() if a in ws and b in ws]
            elif skill == "sentiment":
                words = set(re.findall(r"\w+", q))
                assert gold == ("positive" if words & set(data.GOOD) else "negative")
            else:
                assert gold == q.split(": ")[1]
