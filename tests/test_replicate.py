"""bench/replicate.py: the pipeline on a tiny setting (fields, resume, report) and its arithmetic by hand."""
import json
import math
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import replicate  # noqa: E402

FIELDS = dict(key=str, phase=str, label=str, variant=str, method=str, seed=int, lr=float, acc=float, acc_val=float,
              acc_before=float, per_task=dict, params=int, n_tasks=int, loss_first=float, loss_last=float)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_quick_pipeline_fields_resume_and_report(tmp_path, capsys):
    out = str(tmp_path / "rq")
    argv = ["--quick", "--out_dir", out, "--workers", "1", "--steps", "4", "--n_test", "8"]
    replicate.main(argv)
    path = os.path.join(out, "results.jsonl")
    recs = read(path)
    # --quick: 3 methods x 2 seeds, one lr each: the sweep is seed 0, the seed phase adds seed 1
    assert sorted((r["variant"], r["seed"]) for r in recs) == sorted(
        (m, s) for m in ("LoRA R8", "MoR E2R8", "Full FT") for s in (0, 1))
    for r in recs:
        for k, t in FIELDS.items():
            assert isinstance(r[k], t), (k, r[k])
        assert 0.0 <= r["acc"] <= 1.0 and len(r["per_task"]) == 4
        # acc over all items = mean of per-task accs (equal items per task)
        assert math.isclose(r["acc"], sum(r["per_task"].values()) / 4, abs_tol=1e-9)
    mor = [r for r in recs if r["variant"] == "MoR E2R8"]
    assert all(set(r["omega_spread"]) == {"A", "B"} and len(r["router_entropy"]) == 4 for r in mor)
    assert all(0.0 <= h <= 1.0 + 1e-6 for r in mor for h in r["router_entropy"].values())
    lora = next(r for r in recs if r["variant"] == "LoRA R8")
    assert lora["omega_spread"] is None and lora["router_entropy"] is None
    # LoRA R8 on w1/w2/w3: r (d_in + d_out) per layer; quick base: dim 32, hidden 96, 2 layers
    assert lora["params"] == 2 * (8 * (32 + 96) * 2 + 8 * (96 + 32))

    # a rerun skips every finished run
    replicate.main(argv)
    assert len(read(path)) == 6
    # a lost line is redone, and only it
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    replicate.main(argv)
    again = read(path)
    assert len(again) == 6 and again[-1]["key"] == json.loads(lines[-1])["key"]

    md = open(os.path.join(out, "results.md")).read()
    rows = [line for line in md.splitlines() if line.startswith("| LoRA R8 |") or line.startswith("| MoR E2R8 |")]
    assert len(rows) >= 2 and "acc % (mean ± std)" in md
    capsys.readouterr()
    replicate.main(["--report", "--out_dir", out])
    assert capsys.readouterr().out == md


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


def test_task_mapping_by_hand():
    perms = [[2, 0, 1], [1, 2, 0]]   # position 0: a->c, b->a, c->b; position 1: a->b, b->c, c->a
    assert replicate.apply_task(perms, [0, 2]) == [2, 0]
    assert replicate.spell([2, 0]) == "c a"
    other = [[0, 1, 2], [0, 1, 2]]
    tasks = {5: perms, 6: other, 7: [[1, 2, 0], [2, 0, 1]], 8: [[1, 0, 2], [0, 1, 2]]}
    item = replicate.mc_item(5, tasks, [6, 7, 8], [0, 2], random.Random(0))
    assert item["choices"][item["gold"]] == "c a"
    assert sorted(item["choices"]) == sorted(["c a", "a c", "b b", "b c"])   # input a c under tasks 5, 6, 7, 8
    assert item["context"].endswith("task 5: a c\n<|assistant|>\n")
    one = replicate.make_tasks(3, 5, 4, seed=0, per_position=False)
    assert all(t[0] == t[3] and sorted(t[0]) == list(range(5)) for t in one)
