"""bench/replicate.py: the pipeline on a tiny setting (it learns, resumes, reports, reruns) and its arithmetic
by hand."""
import json
import math
import os
import random
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import replicate  # noqa: E402

import mor  # noqa: E402
import train  # noqa: E402

FIELDS = dict(key=str, phase=str, base=int, family=str, steps=int, label=str, variant=str, method=str, seed=int,
              lr=float, acc_before=float, per_task=dict, params=int, loss_first=float, loss_end=float)
# the sweep is scored on validation items only, a test run on test and training items only
SCORES = {"sweep": dict(acc_val=float, acc=type(None), acc_fit=type(None)),
          "test": dict(acc_val=type(None), acc=float, acc_fit=float)}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_quick_learns_resumes_reports_and_reruns(tmp_path, capsys):
    out = str(tmp_path / "rq")
    argv = ["--quick", "--out_dir", out, "--workers", "2"]
    replicate.main(argv)
    path = os.path.join(out, "results.jsonl")
    recs = read(path)
    variants = ("LoRA R8", "MoR E2R8", "Full FT", "MoR Ω lr ×10", "MoR Ω=1+N(0,σ²)")
    # --quick: sweep = base 0, perm, seed 100, one lr per method; test = 2 bases x 2 families x 5 variants x seed 0
    assert sorted((r["variant"], r["seed"]) for r in recs if r["phase"] == "sweep") == sorted(
        (m, 100) for m in variants[:3])
    assert sorted((r["base"], r["family"], r["variant"], r["seed"]) for r in recs if r["phase"] == "test") == sorted(
        (b, f, v, 0) for b in (0, 1) for f in ("perm", "shared") for v in variants)
    for r in recs:
        for k, t in dict(FIELDS, **SCORES[r["phase"]]).items():
            assert isinstance(r[k], t), (k, r[k])
    for r in (r for r in recs if r["phase"] == "test"):
        assert 0.0 <= r["acc"] <= 1.0 and len(r["per_task"]) == 4
        # acc over all items = mean of per-task accs (equal items per task)
        assert math.isclose(r["acc"], sum(r["per_task"].values()) / 4, abs_tol=1e-9)
    # it learns: full fine-tuning is far above the base on held-out inputs (~94 % vs ~26 %, 2 bases), so a training
    # pipeline that does not update the model, or a scorer that does not see the answers as trained, fails here
    full = [r for r in recs if r["variant"] == "Full FT" and r["phase"] == "test"]
    assert sum(r["acc"] for r in full) / len(full) > sum(r["acc_before"] for r in full) / len(full) + 0.3
    mor_runs = [r for r in recs if r["label"] == "MoR E2R8" and r["phase"] == "test"]
    assert all(set(r["omega_spread"]) == {"A", "B"} and len(r["router_entropy"]) == 4 for r in mor_runs)
    assert all(0.0 <= h <= 1.0 + 1e-6 for r in mor_runs for h in r["router_entropy"].values())
    assert all(0.0 <= r["router_tv"] <= 1.0 and r["d_spread"] >= 0.0 for r in mor_runs)
    lora = next(r for r in recs if r["variant"] == "LoRA R8" and r["phase"] == "test")
    assert lora["omega_spread"] is None and lora["router_entropy"] is None and lora["d_spread"] is None
    # LoRA R8 on w1/w2/w3: r (d_in + d_out) per layer; quick base: dim 64, hidden 176, 2 layers
    assert lora["params"] == 2 * (8 * (64 + 176) * 2 + 8 * (176 + 64))

    # a rerun skips every finished run; a lost line is redone, and only it
    n = len(recs)
    replicate.main(argv)
    assert len(read(path)) == n
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    replicate.main(argv)
    again = read(path)
    assert len(again) == n and again[-1]["key"] == json.loads(lines[-1])["key"]

    md = open(os.path.join(out, "results.md")).read()
    assert "### shared, 150 steps" in md and "| MoR E2R8 |" in md and f"{n - 3} of 20 test runs" in md
    capsys.readouterr()
    replicate.main(["--report", "--out_dir", out])
    assert capsys.readouterr().out == md

    # one row run again on the same code reproduces its numbers (same kernels, same inputs: exact)
    key = next(r["key"] for r in again if r["variant"] == "MoR Ω lr ×10" and r["base"] == 1)
    with pytest.raises(SystemExit) as e:
        replicate.main(["--rerun", key, "--out_dir", out])
    assert e.value.code == 0 and "same numbers" in capsys.readouterr().out


def test_report_without_results_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        replicate.main(["--report", "--out_dir", str(tmp_path)])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_paired_interval_by_hand():
    # differences 0.1, 0.2, 0.3, 0.4: mean 0.25, sample sd sqrt(0.05/3), t(0.975, 3) = 3.182
    m, h = replicate.paired_interval([0.5, 0.6, 0.7, 0.9], [0.4, 0.4, 0.4, 0.5])
    assert math.isclose(m, 0.25)
    assert math.isclose(h, 3.182 * math.sqrt(0.05 / 3) / 2, rel_tol=1e-9)
    assert math.isclose(h, 0.20541, abs_tol=1e-4)


def test_base_interval_by_hand():
    # base 0: seeds 0, 1 differ by 0.1, 0.3 -> 0.2; base 1: only seed 0 is in both -> 0.4; base 2: 0.0, 0.0 -> 0.0.
    # Bases are the unit: 0.2, 0.4, 0.0 -> mean 0.2, sd 0.2, t(0.975, 2) = 4.303, half-width 4.303 * 0.2 / sqrt(3)
    a = {0: {0: 0.6, 1: 0.8}, 1: {0: 0.9, 1: 0.5}, 2: {0: 0.3, 1: 0.4}}
    b = {0: {0: 0.5, 1: 0.5}, 1: {0: 0.5}, 2: {0: 0.3, 1: 0.4}, 3: {0: 0.1}}
    m, h, n = replicate.base_interval(a, b)
    assert n == 3 and math.isclose(m, 0.2)
    assert math.isclose(h, 4.303 * 0.2 / math.sqrt(3), rel_tol=1e-9)


def test_task_mapping_by_hand():
    perms = [[2, 0, 1], [1, 2, 0]]   # position 0: a->c, b->a, c->b; position 1: a->b, b->c, c->a
    assert replicate.apply_task(perms, [0, 2]) == [2, 0]
    assert replicate.spell([2, 0]) == "c a"
    other = [[0, 1, 2], [0, 1, 2]]
    tasks = {5: perms, 6: other, 7: [[1, 2, 0], [2, 0, 1]], 8: [[1, 0, 2], [0, 1, 2]]}
    item = replicate.mc_item(5, tasks, [6, 7, 8], [0, 2], random.Random(0))
    assert item["choices"][item["gold"]] == "c a"
    assert sorted(item["choices"]) == sorted(["c a", "a c", "b b", "b c"])   # input a c under tasks 5, 6, 7, 8
    assert item["question"] == "task 5: a c"


def test_shared_family_is_one_mapping_plus_small_changes():
    tasks = replicate.make_shared_tasks(6, 16, 4, swaps=1, seed=3)
    for p in range(4):
        # the common mapping: per input, the output most tasks give
        common = [Counter(t[p][x] for t in tasks).most_common(1)[0][0] for x in range(16)]
        assert sorted(common) == list(range(16))
        for t in tasks:
            assert sorted(t[p]) == list(range(16))                   # still a permutation
            assert sum(t[p][x] != common[x] for x in range(16)) == 2   # one swapped pair
    assert len({json.dumps(t) for t in tasks}) == 6                      # every task its own


def test_omega_lr_multiplier_by_hand():
    # AdamW's first step moves a parameter by lr * g / (|g| + eps) ~ lr: Ω (the second group) moves 10 x as far,
    # and the others' lr follows the same schedule as without the split
    other, omega = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    cfg = train.TrainConfig(lr=1e-2, warmup_ratio=0.0)
    schedule = train.plan_schedule(cfg, 10)
    opt = torch.optim.AdamW([other, omega], lr=cfg.lr, weight_decay=0.0)
    sched = train.make_scheduler(opt, cfg, schedule, 0)
    replicate.split_omega_group(opt, sched, [omega], 10.0)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr, weight_decay=0.0)
    ref = train.make_scheduler(ref_opt, cfg, schedule, 0)
    for step in range(10):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == ref_opt.param_groups[0]["lr"] and math.isclose(lrs[1], 10 * lrs[0], rel_tol=1e-12)
        if step == 0:
            assert lrs[0] == cfg.lr   # no warmup: the first step runs at the peak
            other.grad, omega.grad = torch.ones(3), torch.ones(2)
            opt.step()
            assert torch.allclose(other.detach(), torch.full((3,), -1e-2), rtol=1e-5)
            assert torch.allclose(omega.detach(), torch.full((2,), -1e-1), rtol=1e-5)
        sched.step()
        ref.step()


def test_diagnostics_by_hand():
    layer = mor.MoRLinear(torch.nn.Linear(4, 3, bias=False), r=2, alpha=2, num_experts=2)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(3, 2))
        layer.omega_B[1].fill_(3.0)   # D_1 = 3 D_0: mean 2 D_0, each |D_i - mean| = |D_0|, spread 1/2
    model = torch.nn.Sequential(layer)
    # D_i is formed in fp32 (mor's direction, a 4-term product): rounding of a few fp32 ulps
    assert math.isclose(replicate.d_spread(model), 0.5, rel_tol=1e-6)
    # entropy / log N: uniform 1, one-hot 0; total variation: half the L1 distance
    assert math.isclose(replicate.entropy([0.25] * 4), 1.0) and replicate.entropy([1.0, 0.0]) == 0.0
    ent, tv = replicate.router_stats({"t1": [[0.5, 0.5], [1.0, 0.0]], "t2": [[0.5, 0.5], [0.0, 1.0]],
                                      "t3": [[0.5, 0.5], [1.0, 0.0]]})
    assert ent == {"t1": 0.5, "t2": 0.5, "t3": 0.5}
    # layer 0: all pairs 0; layer 1: pairs (1,2) 1, (1,3) 0, (2,3) 1 -> mean over 6 (pair, layer) = 2/6
    assert math.isclose(tv, 2 / 6)


def test_answer_logprobs_against_a_token_by_token_loop(tiny_ckpt):
    # the scored tokens are the answer and EOS as training encodes them: the template's context and the answer
    # tokenised apart (written out here by hand); each log-probability from a forward over its own prefix
    from llama import Tokenizer, Transformer
    model, tok = Transformer.from_checkpoint(tiny_ckpt).eval(), Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    qa = [("task 3: a b", "b c"), ("task 12: c a", "a a"), ("task 3: b b", "c c"), ("task 7: a", "b")]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]
    got = replicate.answer_logprobs(model, tok, rows, batch_size=2)
    for (q, a), g in zip(qa, got):
        context = [tok.bos_id] + tok.encode(f"<|user|>\n{q}\n<|assistant|>\n", bos=False)
        answer = tok.encode(a, bos=False) + [tok.eos_id]
        ids, want = context + answer, 0.0
        with torch.no_grad():
            for t in range(len(context), len(ids)):
                want += torch.log_softmax(model(torch.tensor([ids[:t]]))[0, -1].double(), -1)[ids[t]].item()
        # one forward over the whole row vs one per prefix: fp32 rounding of a few ulps per logit
        assert math.isclose(g, want, rel_tol=1e-5, abs_tol=1e-4), (q, a, g, want)


def test_mc_accuracy_by_hand(monkeypatch):
    # 3 items of 2, 3 and 2 choices; scores in row order; a tie goes to the first maximum (item 3: choice 0)
    lls = [-1.0, -2.0, -5.0, -0.5, -3.0, -4.0, -4.0]
    monkeypatch.setattr(replicate, "answer_logprobs", lambda model, tok, rows: lls[:len(rows)])
    items = [dict(question="q1", choices=["x", "y"], gold=0), dict(question="q2", choices=["x", "y", "z"], gold=2),
             dict(question="q3", choices=["x", "y"], gold=1)]
    assert replicate.mc_accuracy(None, None, items) == 1 / 3


def test_a_grid_may_grow_by_bases_and_seeds_only(tmp_path):
    # a folder from a version without long_families (scored by the old scorer) is refused, not continued
    stored = replicate.asdict(replicate.Setup())
    del stored["long_families"]
    (tmp_path / "setup.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="another version of bench/replicate.py"):
        replicate.read_setup(str(tmp_path))
    old = replicate.Setup()
    assert replicate.same_grid(old, replicate.replace(old, bases=5, seeds=3))
    assert not replicate.same_grid(old, replicate.replace(old, n_test=100))
    assert not replicate.same_grid(old, replicate.replace(old, bases=5, budgets=[250]))
