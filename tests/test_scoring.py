"""evaluate.plan_scoring: every way it scores a batch (one row for many choices, shared prefix, plain rows)
gives the log-likelihoods of an independent per-request loop, on mixed tasks with different context lengths."""
import os

import pytest
import torch
import torch.nn.functional as F

import evaluate as ev

# (context, continuation) pairs of three "tasks": MMLU-like one-token letters, ARC-like multi-token answers,
# PIQA-like short context with long answers; contexts of different lengths in every task
MMLU = [(f"Question {i}: {'which one is right? ' * (i % 3 + 1)}\nAnswer:", " " + c) for i in range(5) for c in "ABCD"]
ARC = [(f"Question: what does a plant need{' to grow tall' * (i % 2)}?\nAnswer:", c) for i in range(3)
       for c in (" water", " light and air", " a very large and sunny garden", " soil")]
PIQA = [(f"Goal: {g}\nSolution:", c) for g in ("open a jar", "boil an egg quickly at home")
        for c in (" twist the lid hard with a towel", " hit it")]
REQUESTS = MMLU + ARC + PIQA


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    import llama
    model = llama.Transformer.from_checkpoint(tiny_ckpt, max_seq_len=64, max_batch_size=8)
    return model, llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))


def naive(model, tok, context, continuation):
    """One forward per request, written out: harness tokenisation, log_softmax, sum over the continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok.encode(stripped + continuation)
    n = len(whole) - len(tok.encode(stripped))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).double()[0], dim=-1)
    return sum(logp[p, whole[p + 1]].item() for p in range(len(whole) - 1 - n, len(whole) - 1))


def greedy_margin(model, tok, context, continuation):
    """Smallest gap, over the continuation's positions, between its token's log-prob and the best other one:
    "greedy" flags from two computations can only be compared where this exceeds their difference."""
    stripped = context.rstrip()
    whole = tok.encode(stripped + context[len(stripped):] + continuation)
    n = len(whole) - len(tok.encode(stripped))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).double()[0], dim=-1)
    gaps = []
    for p in range(len(whole) - 1 - n, len(whole) - 1):
        others = logp[p].clone()
        others[whole[p + 1]] = -float("inf")
        gaps.append(abs(logp[p, whole[p + 1]] - others.max()).item())
    return min(gaps)


def run_plan(model, tok, requests, batch_size, min_saving):
    encoded = [ev.encode_request(tok, c, x, 64)[:2] for c, x in requests]
    groups = {}
    for i, (c, _) in enumerate(requests):
        groups.setdefault(c, []).append(i)
    plan = ev.plan_scoring(encoded, list(groups.values()), batch_size, min_saving)
    out = [None] * len(requests)
    with torch.no_grad():
        for kind, batch in plan:
            if kind == "shared":
                ev._score_shared(model, encoded, batch, out)
                model.clear_cache()
            else:
                ev._score_rows(model, encoded, batch, out)
    return [ll for ll, _ in out], plan


@pytest.mark.parametrize("min_saving", [-1.0, 0.1, 2.0])   # always shared / the default rule / never shared
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_plan_equals_the_naive_loop(tiny, min_saving, batch_size):
    model, tok = tiny
    got, plan = run_plan(model, tok, REQUESTS, batch_size, min_saving)
    assert sorted(i for _, b in plan for r in b for i in r) == list(range(len(REQUESTS)))   # each once
    kinds = {k for k, _ in plan}
    assert ("shared" in kinds) == (min_saving < 0) or min_saving == 0.1
    for (c, x), ll in zip(REQUESTS, got):
        # a sum of fp32 log-probs from other GEMM shapes than the naive forward's: each rounds at ~eps 1.2e-7
        # x |sum| (up to ~140 here; seen 1.3e-5 with ATEN_CPU_CAPABILITY=avx2), so relative 1e-6
        assert ll == pytest.approx(naive(model, tok, c, x), rel=1e-6, abs=1e-5), (c, x)


def test_one_token_choices_take_one_row_each_question(tiny):
    model, tok = tiny
    _, plan = run_plan(model, tok, MMLU, 8, 0.1)
    rows = [r for _, b in plan for r in b]
    assert len(rows) == 5 and all(sorted(MMLU[i][1] for i in r) == [" A", " B", " C", " D"] for r in rows)


def test_planned_loglikelihood_and_accuracy_equal_the_plain_path(tiny):
    model, tok = tiny
    planned = ev.loglikelihood(model, tok, REQUESTS, 4, share_prefix=True)
    plain = ev.loglikelihood(model, tok, REQUESTS, 4, share_prefix=False)
    for (c, x), (a, ga), (b, gb) in zip(REQUESTS, planned, plain):
        # the paths' log-probs differ ~1e-6 (fp32 eps x reduction length): greedy compares only past a clear gap
        assert greedy_margin(model, tok, c, x) > 1e-4, "a near tie: greedy is undecidable here"
        assert a == pytest.approx(b, rel=1e-6, abs=1e-5) and ga == gb   # as above
    items = [dict(context=c, choices=[x[1:] for _, x in REQUESTS[s:s + 4]], gold=1) for s in range(0, 32, 4)
             for c in [REQUESTS[s][0]]]
    shared = ev.choice_records(model, tok, items, 4, share_prefix=True)
    rows = ev.choice_records(model, tok, items, 4, share_prefix=False)
    # the two paths run other GEMM shapes (log-likelihoods differ ~1e-6: fp32 eps x reduction length), so
    # equal accuracies follow only if every item's best choice leads its runner-up by more than that
    for r in rows:
        for scores in (r["ll"], [ll / max(k, 1) for ll, k in zip(r["ll"], r["lens"])]):
            best, second = sorted(scores, reverse=True)[:2]
            assert best - second > 1e-4, "a near tie: accuracy is undecidable here"
    assert ev.choice_metrics(shared) == ev.choice_metrics(rows)
