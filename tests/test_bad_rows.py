"""Lines Python's json and csv modules refuse although they look like data (arrays nested thousands deep, an
integer of 5000 digits, a CSV field over csv.field_size_limit()): one `error: file:line` line, or skipped and
counted under --skip_bad_examples (train.py) / --skip_bad (evaluate.py)."""
import csv
import json
import re

import pytest

import data
import evaluate as ev
import train
from test_flags import run_main   # (exit code, stderr lines) of a command line's main()
from tools import eval_cli

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
NESTED = "[" * 5000 + "]" * 5000                      # valid JSON; json.loads overflows the recursion limit
BIG_INT = '{"prompt": "x", "completion": "y", "n": ' + "9" * 5000 + "}"   # int() takes at most 4300 digits
PIQA = {"goal": "Open a jar.", "sol1": "Twist.", "sol2": "Cut.", "label": 0}


@pytest.mark.parametrize("bad,why", [(NESTED, "nested deeper"), (BIG_INT, "4300 digits")])
def test_training_line_refused_by_json_is_a_bad_line(tiny_ckpt, tmp_path, capsys, bad, why):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(CHAT), bad, json.dumps(CHAT)]) + "\n")
    with pytest.raises(data.DataError, match=f"train.jsonl:2: .*{why}"):
        data.read_jsonl(str(path))
    assert data.read_jsonl(str(path), skip_bad=True) == ([CHAT, CHAT], 1)
    out = tmp_path / "run"
    code, err = run_main(train.main, ["--ckpt_dir", tiny_ckpt, "--data", str(path), "--out_dir", str(out),
                                      "--val_size", "0", "--progress", "false"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {path}:2: not valid JSON"), err


@pytest.mark.parametrize("bad,why", [(NESTED, "nested deeper"), (BIG_INT, "4300 digits")])
def test_benchmark_line_refused_by_json_is_a_bad_row(tiny_ckpt, tmp_path, capsys, bad, why):
    path = tmp_path / "piqa" / "valid.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join([json.dumps(PIQA), bad, json.dumps(PIQA)]) + "\n")
    items, skipped = ev.load_task("piqa", str(tmp_path), skip_bad=True)
    assert len(items) == 2 and skipped == 1
    code, err = run_main(eval_cli.main, ["--ckpt_dir", tiny_ckpt, "--data_dir", str(tmp_path), "--tasks", "piqa",
                                   "--out", str(tmp_path / "r.json")], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {path}:2: bad piqa row") and why in err[0]
    assert not (tmp_path / "r.json").exists()


def test_csv_field_over_the_limit_is_a_bad_row(tiny_ckpt, tmp_path, capsys):
    path = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    path.parent.mkdir(parents=True)
    huge = "x" * (csv.field_size_limit() + 1)
    path.write_text(f"Q1,a,b,c,d,A\n\"{huge}\",a,b,c,d,B\nQ3,a,b,c,d,C\n")
    items, skipped = ev.load_task("mmlu", str(tmp_path), skip_bad=True)
    assert [x["gold"] for x in items] == [0, 2] and skipped == 1 and items[1]["where"].endswith("_test.csv:3")
    code, err = run_main(eval_cli.main, ["--ckpt_dir", tiny_ckpt, "--data_dir", str(tmp_path), "--tasks", "mmlu",
                                   "--out", str(tmp_path / "r.json")], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {path}:2: bad mmlu row: CSV: field larger")


@pytest.mark.parametrize("content,flags,why", [("", [], "no rows in its data file"),
                                               ('{"x": 1}\n[2]\n', ["--skip_bad"], "every row malformed (2 skipped by --skip_bad)")])
def test_task_with_nothing_scored_is_absent_not_zero(tiny_ckpt, tmp_path, capsys, content, flags, why):
    """An empty file, or every row skipped: no number for that task (not 0.0), not in Avg., said on stderr."""
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("\n".join(json.dumps(PIQA) for _ in range(3)) + "\n")
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(content)
    out = tmp_path / "r.json"
    eval_cli.main(["--ckpt_dir", tiny_ckpt, "--data_dir", str(tmp_path), "--out", str(out)] + flags)
    captured = capsys.readouterr()
    wg = json.loads(out.read_text())["tasks"]["winogrande"]
    assert wg["n"] == 0 and "acc" not in wg and wg["absent"].endswith(why) and "winogrande" in wg["absent"]
    assert f"[winogrande] not scored: {wg['absent']}" in captured.err
    head, row = captured.out.splitlines()[:2]
    cells = dict(zip([h.strip() for h in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["WG"] == "absent" and cells["Avg."] == cells["PIQA"] != "-"   # Avg. of PIQA alone


def test_val_size_larger_than_the_data_is_said(tiny_ckpt, tmp_path, capsys):
    path = data.write_jsonl(data.synthetic_tasks(2, seed=0), str(tmp_path / "train.jsonl"))   # 8 lines
    train.main(["--ckpt_dir", tiny_ckpt, "--data", path, "--out_dir", str(tmp_path / "run"), "--val_size", "100",
                "--global_batch", "4", "--micro_batch", "4", "--max_steps", "1", "--max_len", "64",
                "--progress", "false", "--compile", "false"])
    err = capsys.readouterr().err
    assert re.search(r"warning: --val_size 100 would leave fewer than --global_batch 4 of the [1-8] examples to "
                     r"train on: no validation loss", err), err
