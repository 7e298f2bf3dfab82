"""evaluate.py: log-likelihoods against a direct computation, every task's accuracy against hand-computed values
(stub models whose logits are fixed by construction), prompt strings, normalisation, and bad input."""
import json
import math
import os
import re
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate as ev
from conftest import BENCHMARKS, STORIES
from tools import benchmarks, eval_cli


# -----------------------------------------------------------------------------
# stubs: a byte tokenizer and bigram "models" (logits depend only on the current token)

class ByteTok:
    """id = byte + 3 (0 unk, 1 bos, 2 eos): no merges, so continuation tokens are exactly its bytes."""
    bos_id, eos_id, n_words = 1, 2, 259

    def encode(self, s, bos=True, eos=False):
        return [1] * bos + [b + 3 for b in s.encode()] + [2] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def tid(ch):
    return ord(ch) + 3


class Bigram(nn.Module):
    """Logits of the next token = table[current token]; the KV cache API is honoured (bounds checked)."""

    def __init__(self, table, max_seq_len=256, max_batch_size=8):
        super().__init__()
        self.params = types.SimpleNamespace(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        self.tok_embeddings = nn.Embedding(1, 1)   # llama.generate reads the device from here
        self.register_buffer("table", table)
        self.cache_size = None

    def setup_cache(self, max_batch_size, max_seq_len):
        self.cache_size = (max_batch_size, max_seq_len)

    def clear_cache(self):
        self.cache_size = None

    def forward(self, tokens, start_pos=None, last_only=False):
        if start_pos is not None:   # an int, or a [B] tensor of per-row positions (llama.generate)
            B, T = tokens.shape
            end = int(torch.as_tensor(start_pos).max()) + T
            assert self.cache_size and B <= self.cache_size[0] and end <= self.cache_size[1]
        logits = self.table[tokens]
        return logits[:, -1:] if last_only else logits


def unigram_stub():
    """Every step: logit log(258) for 'z', 1 for 'B', 0 for the other 257 tokens. So 'z' costs ~0.7 nats,
    any other byte ~6.25 nats ('B' ~5.25): the choice with the fewest non-'z' characters (the leading
    space counts) has the highest log-likelihood. Context is ignored."""
    t = torch.zeros(259, 259)
    t[:, tid("z")] = math.log(258)
    t[:, tid("B")] = 1.0
    return Bigram(t)


def after_z_stub():
    """Uniform, except that after 'z' a space gets logit 10 (WinoGrande: the option ending in z wins)."""
    t = torch.zeros(259, 259)
    t[tid("z"), tid(" ")] = 10.0
    return Bigram(t)


CHAIN = {"b": " ", " ": "c", "c": "d", "d": ".", ":": " "}


def chain_stub():
    """Uniform, except logit 10 for one next token after b, space, c, d and ':' (CHAIN): greedy text after
    "A:" is " cd." and after "ab" is " cd."."""
    t = torch.zeros(259, 259)
    for a, b in CHAIN.items():
        t[tid(a), tid(b)] = 10.0
    return Bigram(t)


# -----------------------------------------------------------------------------
# loglikelihood == one full forward, log_softmax, sum over the continuation positions

def direct_loglikelihood(model, tok, context, continuation, max_len):
    """Written out independently: harness tokenisation, left truncation, one forward per request."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok.encode(stripped + continuation)
    n = len(whole) - len(tok.encode(stripped))
    seq = whole[-(max_len + 1):]
    n = min(n, len(seq) - 1)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]])).float()[0], dim=-1)
    ll, greedy = 0.0, True
    for pos in range(len(seq) - 1 - n, len(seq) - 1):
        ll += logp[pos, seq[pos + 1]].item()
        greedy &= int(logp[pos].argmax()) == seq[pos + 1]
        # batched and prefix-shared scoring run other GEMM shapes (logits differ ~1e-6: fp32 eps x reduction
        # length 96): "greedy" is comparable only where the target is clearly the argmax or clearly not
        others = torch.cat([logp[pos, :seq[pos + 1]], logp[pos, seq[pos + 1] + 1:]])
        assert abs(logp[pos, seq[pos + 1]] - others.max()) > 1e-4, "a near tie: greedy is undecidable here"
    return ll, greedy


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    import llama
    model = llama.Transformer.from_checkpoint(tiny_ckpt, max_seq_len=64, max_batch_size=8)
    return model, llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))


REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " the quick brown fox jumps"),   # many tokens
    ("Question: What is the capital of France?\nAnswer:", " A"),
    ("Once upon a time there was ", "a little cat"),                # trailing space moves to the continuation
    ("The", " quick brown fox jumps over the lazy dog near the river bank."),
    ("She opened the door,", " looked outside"),
    ("She opened the door,", " smiled at the blue sky and the sun"),
    ("She opened the door,", " and"),
    ("A B C D", " 0 1 2"),
]


@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihood_matches_direct_computation(tiny, share_prefix, batch_size):
    model, tok = tiny
    got = ev.loglikelihood(model, tok, REQUESTS, batch_size, share_prefix=share_prefix)
    for (c, x), (ll, greedy) in zip(REQUESTS, got):
        ref_ll, ref_greedy = direct_loglikelihood(model, tok, c, x, 64)
        # batched / prefix-shared GEMM shapes against one forward: an fp32 sum of log-probs rounds at ~eps
        # 1.2e-7 x |sum|, so relative 1e-6 (plus 1e-4 for sums near 0)
        assert ll == pytest.approx(ref_ll, rel=1e-6, abs=1e-4), (c, x)
        assert greedy == ref_greedy
    assert model.cache_size is None   # the cache is freed afterwards


def test_loglikelihood_left_truncation(tiny):
    model, tok = tiny
    long_context = " ".join(["the quick brown fox"] * 30)   # far more than max_seq_len = 64 tokens
    reqs = [(long_context, " jumps over"), (long_context, " lazy dog"), ("The", " cat")]
    for share in (False, True):
        got = ev.loglikelihood(model, tok, reqs, 2, share_prefix=share)
        for (c, x), (ll, _) in zip(reqs, got):
            assert ll == pytest.approx(direct_loglikelihood(model, tok, c, x, 64)[0], rel=1e-6, abs=1e-4)   # as above


def test_empty_and_order(tiny):
    model, tok = tiny
    assert ev.loglikelihood(model, tok, []) == []
    rev = ev.loglikelihood(model, tok, REQUESTS[::-1], 4)
    fwd = ev.loglikelihood(model, tok, REQUESTS, 4)
    # other batches, other GEMM shapes: fp32 sums of log-probs round at ~eps 1.2e-7 x |sum|, so relative 1e-6
    assert [r[0] for r in rev] == pytest.approx([r[0] for r in fwd[::-1]], rel=1e-6, abs=1e-5)


# -----------------------------------------------------------------------------
# benchmark files (a few rows per task, official and Hugging Face forms) and hand-computed accuracies

def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write("".join(lines))


# With unigram_stub, per choice (cost = -log-likelihood; "/len" = acc_norm's cost per character):
#   "zz" 7.6 (/2 3.8)   "zzz" 8.3 (/3 2.8)   "zzzz" 9.0 (/4 2.3)   "a","b","c","d","q" 12.5 (/1 12.5)
#   "ab" 18.7 (/2 9.4)  "abc" 25.0 (/3 8.3)  "zzzzzzzzzz yy" 31.9 (/13 2.5)
# Rows "OK" (gold wins both), "NORM" (gold = the long z-choice: loses acc, wins acc_norm), "BAD" (loses both):
# every 3-row set below is OK, NORM, BAD -> acc 1/3, acc_norm 2/3 unless said otherwise.
LONG = "zzzzzzzzzz yy"
FOUR = [(["ab", "zz", "abc", "b"], 1), (["a", LONG, "b", "c"], 1), (["zz", "a", "b", "c"], 2)]   # OK, NORM, BAD


def make_data(root, form):
    """All ten task folders under root in the official release form or as HF rows."""
    j = lambda *p: os.path.join(root, *p)   # noqa: E731
    piqa = [("g0", "zzz", "ab", 0), ("g1", LONG, "q", 0), ("g2", "ab", "zz", 0)]          # OK, NORM, BAD
    siqa = [("zz", "ab", "abc", 1), ("ab", "zzzz", "a", 2), ("zz", "a", "b", 3)]           # OK, OK, BAD (1-based)
    wg = [("Liz", "Bob", "1"), ("Liz", "Bob", "2"), ("Ann", "Fitz", "2")]                   # after_z: OK, BAD, OK
    arc = [(["ab", "zz", "abc", "b"], "ABCD", "B"), (["a", LONG, "b", "c", "d"], "12345", "2"),
           (["zz", "a", "b"], "ABC", "C")]                                                 # 5 and 3 choices too
    mmlu = [("abstract_algebra", "Q1 ", ["1", "2", "3", "4"], "A"), ("abstract_algebra", "Q2", ["5", "6", "7", "8"], "B"),
            ("anatomy", "Q3", ["x", "y", "w", "v"], "C")]                                   # unigram: " B" always wins
    lambada = ["ab cd", "xx ab xy"]                                   # chain: " cd" greedy, " xy" not
    nq = [("q1", ["CD"]), ("q2", ["The cd!", "other"]), ("q3", ["xy"])]                  # chain answers "cd"
    if form == "official":
        write_jsonl(j("piqa", "valid.jsonl"), [dict(goal=g, sol1=a, sol2=b) for g, a, b, _ in piqa])
        write_lines(j("piqa", "valid-labels.lst"), [f"{y}\n" for *_, y in piqa])
        write_jsonl(j("siqa", "dev.jsonl"), [dict(context="c", question="q?", answerA=a, answerB=b, answerC=c)
                                             for a, b, c, _ in siqa])
        write_lines(j("siqa", "dev-labels.lst"), [f"{y}\n" for *_, y in siqa])
        write_jsonl(j("winogrande", "dev.jsonl"), [dict(qID=str(i), sentence="Then _ ran home.", option1=a, option2=b,
                                                        answer=y) for i, (a, b, y) in enumerate(wg)])
        write_lines(j("winogrande", "dev-labels.lst"), [f"{y}\n" for *_, y in wg])
        arc_rows = [dict(id=str(i), question=dict(stem="s?", choices=[dict(text=t, label=k) for t, k in zip(c, ks)]),
                         answerKey=y) for i, (c, ks, y) in enumerate(arc)]
        write_jsonl(j("arc_easy", "ARC-Easy-Test.jsonl"), arc_rows)
        write_jsonl(j("arc_challenge", "ARC-Challenge-Test.jsonl"), arc_rows)
        write_jsonl(j("openbookqa", "Main", "test.jsonl"), arc_rows)
        write_jsonl(j("hellaswag", "hellaswag_val.jsonl"),
                    [dict(ind=i, activity_label="Act", ctx_a="a.", ctx_b="b", ctx="a. b", endings=e, label=y,
                          split="val", split_type="indomain", source_id="x") for i, (e, y) in enumerate(FOUR)])
        for subject in ("abstract_algebra", "anatomy"):
            rows = [[q, *c, y] for s, q, c, y in mmlu if s == subject]
            lines = []
            for r in rows:
                lines.append(",".join(f'"{x}"' if " " in x else x for x in r) + "\r\n")
            write_lines(j("mmlu", "test", f"{subject}_test.csv"), lines)
        write_jsonl(j("lambada", "lambada_test.jsonl"), [dict(text=t) for t in lambada])
        write_jsonl(j("nq_open", "NQ-open.dev.jsonl"), [dict(question=q, answer=a) for q, a in nq])
    else:   # Hugging Face datasets rows saved as JSONL
        write_jsonl(j("piqa", "validation.jsonl"), [dict(goal=g, sol1=a, sol2=b, label=y) for g, a, b, y in piqa])
        write_jsonl(j("siqa", "validation.jsonl"), [dict(context="c", question="q?", answerA=a, answerB=b, answerC=c,
                                                         label=str(y)) for a, b, c, y in siqa])
        write_jsonl(j("winogrande", "validation.jsonl"), [dict(sentence="Then _ ran home.", option1=a, option2=b,
                                                               answer=y) for a, b, y in wg])
        arc_rows = [dict(id=str(i), question="s?", choices=dict(text=c, label=list(ks)), answerKey=y)
                    for i, (c, ks, y) in enumerate(arc)]
        write_jsonl(j("arc_easy", "test.jsonl"), arc_rows)
        write_jsonl(j("arc_challenge", "test.jsonl"), arc_rows)
        write_jsonl(j("openbookqa", "test.jsonl"), [dict(id=r["id"], question_stem="s?", choices=r["choices"],
                                                         answerKey=r["answerKey"]) for r in arc_rows])
        write_jsonl(j("hellaswag", "validation.jsonl"),
                    [dict(ind=i, activity_label="Act", ctx_a="a.", ctx_b="b", ctx="a. b", endings=e, label=str(y),
                          source_id="x", split="val", split_type="indomain") for i, (e, y) in enumerate(FOUR)])
        write_jsonl(j("mmlu", "test.jsonl"), [dict(question=q, subject=s, choices=c, answer="ABCD".index(y))
                                              for s, q, c, y in mmlu])
        write_jsonl(j("lambada", "test.jsonl"), [dict(text=t, domain=None) for t in lambada])
        write_jsonl(j("nq_open", "validation.jsonl"), [dict(question=q, answer=a) for q, a in nq])
    return root


g = 10 - math.log(math.exp(10) + 258)   # chain_stub: log p of the favoured token
o = -math.log(math.exp(10) + 258)       #             log p of any other token after a chain character
u = -math.log(259)                      #             log p of any token after a non-chain character
EXPECTED = dict(   # by hand from the comments above
    piqa=dict(acc=1 / 3, acc_norm=2 / 3, n=3),
    siqa=dict(acc=2 / 3, acc_norm=2 / 3, n=3),
    winogrande=dict(acc=2 / 3, n=3),
    arc_easy=dict(acc=1 / 3, acc_norm=2 / 3, n=3),
    arc_challenge=dict(acc=1 / 3, acc_norm=2 / 3, n=3),
    openbookqa=dict(acc=1 / 3, acc_norm=2 / 3, n=3),
    hellaswag=dict(acc=1 / 3, acc_norm=2 / 3, n=3),
    mmlu=dict(acc=1 / 3, n=3, subjects=dict(abstract_algebra=dict(acc=1 / 2, n=2), anatomy=dict(acc=0.0, n=1))),
    # "ab|cd": ' ' 'c' 'd' all favoured (3g); "xx ab|xy": ' ' favoured, 'x' not (o), 'y' after 'x' (u)
    lambada=dict(acc=1 / 2, perplexity=math.exp(-(3 * g + (g + o + u)) / 2), n=2),
    nq_open=dict(exact_match=2 / 3, n=3),
)
STUBS = dict(winogrande=after_z_stub, lambada=chain_stub, nq_open=chain_stub)


@pytest.mark.parametrize("form", ["official", "hf"])
def test_every_task_matches_hand_computed_accuracy(tmp_path, form):
    root = make_data(str(tmp_path), form)
    for task, expected in EXPECTED.items():
        model = STUBS.get(task, unigram_stub)()
        got = ev.evaluate_tasks(model, ByteTok(), [task], root, batch_size=2)[task]
        for key, value in expected.items():
            if key == "subjects":
                assert {s: (m["acc"], m["n"]) for s, m in got[key].items()} == {s: (m["acc"], m["n"]) for s, m in value.items()}
            else:
                assert got[key] == pytest.approx(value, rel=1e-5), (task, key)


def test_limit_absent_table_and_score_multiple_choice(tmp_path):
    root = make_data(str(tmp_path), "official")
    os.remove(os.path.join(root, "hellaswag", "hellaswag_val.jsonl"))
    os.rmdir(os.path.join(root, "hellaswag"))
    res = ev.evaluate_tasks(unigram_stub(), ByteTok(), "all", root, limit=1)
    assert res["hellaswag"] == {"absent": f"no folder {os.path.join(root, 'hellaswag')}"}
    assert res["piqa"]["n"] == 1 and res["mmlu"]["n"] == 2   # MMLU: the limit is per subject
    table = ev.format_table(res).splitlines()
    assert table[0].split() == "SIQA | PIQA | WG | ARC-E | ARC-C | Hella. | OBQA | Lam. | MMLU | NQ | Avg.".split()
    assert table[1].split(" | ")[5].strip() == "absent"
    with pytest.raises(FileNotFoundError, match="hellaswag"):   # named explicitly: must exist
        ev.evaluate_tasks(unigram_stub(), ByteTok(), ["hellaswag"], root)
    items = [dict(context="Q", choices=c, gold=y) for c, y in FOUR]
    assert ev.score_multiple_choice(unigram_stub(), ByteTok(), items, batch_size=2) == \
        dict(acc=pytest.approx(1 / 3), acc_norm=pytest.approx(2 / 3), n=3)


# -----------------------------------------------------------------------------
# prompts and normalisation, against hand-written strings

def test_requests_of_each_format():
    assert ev.choice_requests(benchmarks.format_piqa(dict(goal="Open a jar.", sol1="Twist.", sol2="Cut.", label="1"))) == [
        ("Question: Open a jar.\nAnswer:", " Twist."), ("Question: Open a jar.\nAnswer:", " Cut.")]
    siqa = benchmarks.format_siqa(dict(context="Ann ran.", question="Why?", answerA="a", answerB="b", answerC="c", label="3"))
    assert siqa["context"] == "Q: Ann ran. Why?\nA:" and siqa["gold"] == 2
    arc = benchmarks.format_arc(json.loads('{"question": {"stem": "Why?", "choices": [{"text": "x", "label": "1"}, '
                                   '{"text": "y", "label": "2"}]}, "answerKey": "2"}'))
    assert (arc["context"], arc["choices"], arc["gold"]) == ("Question: Why?\nAnswer:", ["x", "y"], 1)
    obqa = benchmarks.format_openbookqa(dict(question_stem="Predators eat", choices=dict(text=["a", "b"], label=["A", "B"]),
                                     answerKey="B"))
    assert (obqa["context"], obqa["gold"]) == ("Predators eat", 1)
    lam = benchmarks.format_lambada(dict(text='He said "no.\n\nI know Shane'))
    assert (lam["context"], lam["continuation"]) == ('He said "no.\n\nI know', " Shane")
    assert benchmarks.format_nq_open(dict(question="who wrote it", answer=["Bob"]))["context"] == \
        "Answer these questions:\n\nQ: who wrote it?\nA:"


def test_winogrande_partial_scoring():
    item = benchmarks.format_winogrande(dict(sentence="The trophy didn't fit in the suitcase because _ was too big.",
                                     option1="the trophy", option2="the suitcase", answer="1"))
    assert ev.choice_requests(item) == [
        ("The trophy didn't fit in the suitcase because the trophy", " was too big."),
        ("The trophy didn't fit in the suitcase because the suitcase", " was too big.")]
    assert item["gold"] == 0


def test_hellaswag_cleanup():
    row = dict(activity_label="Home and Garden", ctx_a="[header] How to grow tomatoes [title] Pick a spot.",
               ctx_b="then Water them", endings=["[step] Dig  a hole.", "Wait [substeps] a day."], label=0)
    item = benchmarks.format_hellaswag(row)
    assert item["context"] == "Home and Garden: How to grow tomatoes. Pick a spot. Then water them"
    # strip comes first, so removing a leading "[step]" leaves its space (as in the harness)
    assert item["choices"] == [" Dig a hole.", "Wait a day."]


def test_mmlu_prompt():
    item = benchmarks.format_mmlu(dict(subject="high_school_chemistry", fields=["  What is H2O?\n", "salt", "water", "ice", "air", "B"]))
    assert item["context"] == ("The following are multiple choice questions (with answers) about high school chemistry."
                               "\n\nWhat is H2O?\nA. salt\nB. water\nC. ice\nD. air\nAnswer:")
    assert ev.choice_requests(item)[1] == (item["context"], " B") and item["gold"] == 1


def test_nq_normalisation():
    assert ev.nq_normalize("The Beatles") == "beatles"
    assert ev.nq_normalize("a U.S. president") == "us president"
    assert ev.nq_normalize("Lord of the Rings") == "lord of rings"
    assert ev.nq_normalize("Iran and Iraq") == "iran and iraq"
    assert ev.nq_normalize("14 December 1972 UTC") == "14 december 1972 utc"
    assert ev.nq_answer(" Paris, France.") == "Paris"
    assert ev.nq_answer(" 1972\nQ: next") == "1972"
    assert ev.nq_answer("\n") == ""


# -----------------------------------------------------------------------------
# bad input

def test_malformed_files_name_file_and_line(tmp_path):
    root = str(tmp_path)
    piqa = os.path.join(root, "piqa", "valid.jsonl")
    write_jsonl(piqa, [dict(goal="g", sol1="a", sol2="b")] * 2)
    write_lines(os.path.join(root, "piqa", "valid-labels.lst"), ["0\n", "2\n"])
    with pytest.raises(ValueError, match=re.escape(f"{piqa}:2: bad piqa row: label '2' out of range")):
        ev.load_task("piqa", root)
    items, bad = ev.load_task("piqa", root, skip_bad=True)
    assert len(items) == 1 and bad == 1
    write_lines(os.path.join(root, "piqa", "valid-labels.lst"), ["0\n"])
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        ev.load_task("piqa", root)

    siqa = os.path.join(root, "siqa", "validation.jsonl")
    write_lines(siqa, ['{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"}\n',
                       "\n", '{"context": "c", "question": "q", "answerA": "a"\n'])
    with pytest.raises(ValueError, match=re.escape(f"{siqa}:3: bad siqa row: ")):
        ev.load_task("siqa", root)
    write_lines(siqa, ['{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "label": "1"}\n'])
    with pytest.raises(ValueError, match=re.escape(f"{siqa}:1: bad siqa row: missing field 'answerC'")):
        ev.load_task("siqa", root)

    arc = os.path.join(root, "arc_easy", "ARC-Easy-Test.jsonl")
    write_jsonl(arc, [dict(question=dict(stem="s", choices=[dict(text="x", label="A")]), answerKey="E")])
    with pytest.raises(ValueError, match=re.escape(f"{arc}:1: bad arc_easy row: answerKey 'E' is not one of the choice labels ['A']")):
        ev.load_task("arc_easy", root)

    csv = os.path.join(root, "mmlu", "test", "anatomy_test.csv")
    write_lines(csv, ['"multi\nline, question",a,b,c,d,A\n', "q,a,b,c,d,E\n", "q,a,b,c\n"])
    with pytest.raises(ValueError, match=re.escape(f"{csv}:3: bad mmlu row: answer 'E' is not one of A, B, C, D")):
        ev.load_task("mmlu", root)
    items, bad = ev.load_task("mmlu", root, skip_bad=True)
    assert len(items) == 1 and bad == 2 and items[0]["where"] == f"{csv}:1"

    wg = os.path.join(root, "winogrande", "dev.jsonl")
    write_jsonl(wg, [dict(sentence="no blank here", option1="a", option2="b", answer="1")])
    with pytest.raises(ValueError, match=re.escape(f"{wg}:1: bad winogrande row: sentence has no '_' blank")):
        ev.load_task("winogrande", root)

    os.makedirs(os.path.join(root, "openbookqa"))
    with pytest.raises(FileNotFoundError, match=r"openbookqa: no openbookqa data file; expected one of"):
        ev.load_task("openbookqa", root)
    with pytest.raises(FileNotFoundError, match="no folder for task lambada"):
        ev.load_task("lambada", root)
    with pytest.raises(ValueError, match="unknown task 'hellaswog'"):
        ev.resolve_tasks("piqa,hellaswog")
    assert ev.resolve_tasks("NQ,arc_e,piqa") == ["piqa", "arc_easy", "nq_open"]


@pytest.mark.parametrize("row,reason", [
    (dict(goal="g", sol1="a", sol2=None), "every choice and prompt must be a string, got None"),
    (dict(goal="g", sol1="a", sol2=7), "every choice and prompt must be a string, got 7"),
    (dict(goal=None, sol1="a", sol2="b"), "goal must be a string, got None"),   # not the prompt "None"
    (dict(goal="g", sol1="a", sol2=""), "an empty choice or continuation"),
    (dict(goal="g", sol1="a \ud83d", sol2="b"), "is not valid Unicode"),       # half an emoji: valid JSON
], ids=["null", "number", "null_prompt", "empty", "surrogate"])
def test_bad_field_values_name_file_and_line(tmp_path, row, reason):
    """Rows the tokenizer could not take are bad rows at load time (file:line, or skipped), not a crash later."""
    root = str(tmp_path)
    piqa = os.path.join(root, "piqa", "valid.jsonl")
    write_jsonl(piqa, [dict(goal="g", sol1="a", sol2="b"), row, dict(goal="g", sol1="a", sol2="b")])
    write_lines(os.path.join(root, "piqa", "valid-labels.lst"), ["0\n", "1\n", "0\n"])
    with pytest.raises(ValueError, match=re.escape(f"{piqa}:2: bad piqa row: ") + ".*" + re.escape(reason)):
        ev.load_task("piqa", root)
    items, bad = ev.load_task("piqa", root, skip_bad=True)
    assert len(items) == 2 and bad == 1


def test_bytes_not_utf8_and_empty_winogrande_rest(tmp_path):
    root = str(tmp_path)
    piqa = os.path.join(root, "piqa", "valid.jsonl")
    os.makedirs(os.path.dirname(piqa))
    with open(piqa, "wb") as f:  # line 2 holds "café" with é as one Latin-1 byte
        f.write(b'{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "g", "sol1": "caf\xe9", "sol2": "b"}\n')
    write_lines(os.path.join(root, "piqa", "valid-labels.lst"), ["0\n", "1\n"])
    with pytest.raises(ValueError, match=re.escape(f"{piqa}:2: bad piqa row: text 'caf")):
        ev.load_task("piqa", root)
    csv = os.path.join(root, "mmlu", "test", "anatomy_test.csv")
    os.makedirs(os.path.dirname(csv))
    with open(csv, "wb") as f:
        f.write(b"q,a,b,c,d,A\nq\xe9,a,b,c,d,B\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:2: bad mmlu row: ") + ".*not valid Unicode"):
        ev.load_task("mmlu", root)
    wg = os.path.join(root, "winogrande", "dev.jsonl")
    write_jsonl(wg, [dict(sentence="The cup is on the _", option1="a", option2="b", answer="1")])
    with pytest.raises(ValueError, match=re.escape(f"{wg}:1: bad winogrande row: an empty choice")):
        ev.load_task("winogrande", root)


# -----------------------------------------------------------------------------
# router statistics, CLI, real files

def test_router_stats_mean_router(tmp_path, tiny_ckpt):
    import llama
    import mor
    model = llama.Transformer.from_checkpoint(tiny_ckpt, max_seq_len=64)
    mor.add_adapters(model, "mor", r=2, num_experts=4, router="mean")
    root = make_data(str(tmp_path), "official")
    tok = llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    res = ev.evaluate_tasks(model, tok, ["piqa"], root, router_layer=-1)
    assert sorted(res["piqa"]["router"]) == ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    for weights in res["piqa"]["router"].values():
        assert weights == pytest.approx([0.25] * 4)   # the "mean" router: G = 1/N exactly
    assert "expert  3 0.250" in eval_cli.format_router_chart(res)
    with pytest.raises(ValueError, match="no MoR/MoELoRA adapter"):
        ev.evaluate_tasks(llama.Transformer.from_checkpoint(tiny_ckpt), tok, ["piqa"], root, router_layer=-1)


def test_cli_writes_json(tmp_path, tiny_ckpt, capsys):
    root = make_data(str(tmp_path / "data"), "official")
    out = str(tmp_path / "r.json")
    eval_cli.main(["--ckpt_dir", tiny_ckpt, "--data_dir", root, "--tasks", "piqa,arc_c", "--max_seq_len", "64", "--out", out])
    res = json.load(open(out))
    assert res["tasks"]["piqa"]["n"] == 3 and res["tasks"]["arc_challenge"]["n"] == 3
    assert set(res["reported"]) == {"piqa", "arc_challenge"} and res["wall_time_s"] >= 0
    assert "ARC-C" in capsys.readouterr().out


def test_real_benchmark_files_parse():
    if not os.path.isdir(BENCHMARKS):
        pytest.skip("shared benchmarks absent")
    counts = dict(piqa=1838, siqa=1954, winogrande=1267, arc_easy=2376, arc_challenge=1172, openbookqa=500,
                  lambada=5153, mmlu=1409, nq_open=3610)
    for task, n in counts.items():
        items, bad = ev.load_task(task, BENCHMARKS)
        assert (len(items), bad) == (n, 0), task
    arc = ev.load_task("arc_easy", BENCHMARKS)[0]
    assert {len(x["choices"]) for x in arc} == {3, 4, 5}


def test_stories260k_on_real_benchmarks():
    if not (os.path.isdir(BENCHMARKS) and os.path.isdir(STORIES)):
        pytest.skip("stories260K or shared benchmarks absent")
    import llama
    model = llama.Transformer.from_checkpoint(STORIES, max_seq_len=512)
    tok = llama.Tokenizer(os.path.join(STORIES, "tokenizer.model"))
    res = ev.evaluate_tasks(model, tok, "all", BENCHMARKS, limit=2, batch_size=8)
    assert "absent" in res["hellaswag"]
    assert all(0 <= res[t][ev.REPORTED[t]] <= 1 for t in ev.TASKS if t != "hellaswag")


def _rank_main(rank, root, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        res = ev.evaluate_tasks(unigram_stub(), ByteTok(), ["piqa", "mmlu"], root, batch_size=2)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_items_split_across_ranks_and_gathered(tmp_path):
    """Two gloo ranks each score half of the items; both report the metrics of all of them."""
    root = make_data(str(tmp_path / "data"), "official")
    out = str(tmp_path / "res")
    torch.multiprocessing.spawn(_rank_main, args=(root, str(tmp_path / "init"), out), nprocs=2)
    for rank in range(2):
        res = json.load(open(f"{out}.{rank}"))
        assert (res["piqa"]["acc"], res["piqa"]["acc_norm"], res["piqa"]["n"]) == pytest.approx((1 / 3, 2 / 3, 3))
        assert (res["mmlu"]["acc"], res["mmlu"]["n"]) == pytest.approx((1 / 3, 3))
        assert res["mmlu"]["subjects"]["abstract_algebra"]["n"] == 2


def test_cli_bad_input_is_one_line_error(tiny_ckpt, tmp_path, capsys):
    """A task named on the command line whose folder is missing, and a malformed row: `error: <file>: ...`
    and exit, no traceback."""
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--ckpt_dir", tiny_ckpt, "--data_dir", str(tmp_path), "--tasks", "hellaswag"])
    assert re.fullmatch(r"error: .*hellaswag.*no folder for task hellaswag.*", str(e.value))
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\nnot json\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--ckpt_dir", tiny_ckpt, "--data_dir", str(tmp_path), "--tasks", "piqa"])
    assert str(e.value).startswith(f"error: {tmp_path / 'piqa' / 'valid.jsonl'}:2: ")
