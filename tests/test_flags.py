"""Every numeric flag of train.py, evaluate.py and llama.py has a range (tools/checks.py); a value outside it, or
a --device this machine lacks, is one `error:` line naming the flag and a non-zero exit, before any work."""
import dataclasses
import os
import re

import pytest
import torch

import data
import train
from conftest import ROOT
from tools import chat, checks, eval_cli


@pytest.mark.parametrize("value,interval,inside", [
    (0, "[0, 1)", True), (1, "[0, 1)", False), (0.5, "(0, 1]", True), (0, "(0, 1]", False), (1, "(0, 1]", True),
    (float("nan"), "(0, inf)", False), (float("inf"), "(0, inf)", False), (10**6, "[1, inf)", True),
    (-1, "[-1, inf)", True), (-2, "[-1, inf)", False), (4294967296, checks.SEED, False)])
def test_in_range_by_hand(value, interval, inside):
    assert checks.in_range(value, interval) is inside


def run_main(main, argv, capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of a command line's main(); sys.exit("text") exits 1 and prints the text."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    return code, err.strip().splitlines()


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return data.write_jsonl(data.synthetic_tasks(2, seed=0), str(tmp_path_factory.mktemp("sft") / "train.jsonl"))


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.mark.parametrize("flags,named", [
    (["--targets", ","], "--targets"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--beta1", "2"], "--beta1"), (["--beta2", "-0.1"], "--beta2"), (["--dropout", "1.5"], "--dropout"),
    (["--val_size", "-1"], "--val_size"), (["--lora_r", "0"], "--r"), (["--warmup_ratio", "1.5"], "--warmup_ratio"),
    (["--global_batch", "0"], "--global_batch"), (["--seed", "-3"], "--seed"), (["--alpha", "inf"], "--alpha"),
    (["--device", "tpu"], "--device"), pytest.param(["--device", "cuda"], "--device", marks=NO_GPU)])
def test_train_flag_out_of_range(tiny_ckpt, sft, tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    code, err = run_main(train.main, ["--ckpt_dir", tiny_ckpt, "--data", sft, "--out_dir", str(out)] + flags, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {named}"), err
    assert not out.exists()   # nothing written


@pytest.mark.parametrize("flags,named", [
    (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"), (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "-3"], "--batch_size"), (["--max_seq_len", "0"], "--max_seq_len"),
    (["--router_stats", "--router_layer", "99"], "--router_layer"),
    (["--router_stats", "--router_layer", "-3"], "--router_layer")])   # the tiny model has 2 blocks
def test_evaluate_flag_out_of_range(tiny_ckpt, tmp_path, capsys, flags, named):
    out = tmp_path / "results.json"
    code, err = run_main(eval_cli.main, ["--ckpt_dir", tiny_ckpt, "--data_dir", str(tmp_path), "--out", str(out)]
                         + flags, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {named} must be in"), err
    assert not out.exists()


@pytest.mark.parametrize("flags,named", [
    (["--max_seq_len", "-5"], "--max_seq_len"), (["--max_seq_len", "0"], "--max_seq_len"),
    (["--max_new_tokens", "0"], "--max_new_tokens"), (["--top_p", "0"], "--top_p"), (["--top_p", "1.5"], "--top_p"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--device", "tpu"], "--device"), pytest.param(["--device", "cuda"], "--device", marks=NO_GPU)])
def test_llama_flag_out_of_range(tiny_ckpt, capsys, flags, named):
    code, err = run_main(chat.main, ["--ckpt_dir", tiny_ckpt, "--prompt", "hi"] + flags, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {named}"), err


def test_every_numeric_flag_has_a_range():
    """train.py: every int/float field of TrainConfig; evaluate.py and llama.py (tools/chat.py): every int/float option."""
    numeric = {f.name for f in dataclasses.fields(train.TrainConfig) if f.type in (int, float, "int", "float")}
    assert numeric == set(checks.TRAIN)
    for path, table in (("tools/eval_cli.py", {**checks.EVALUATE, "router_layer": None}),
                        ("tools/chat.py", checks.LLAMA)):
        src = open(os.path.join(ROOT, path)).read()
        assert set(re.findall(r'add_argument\("--(\w+)", type=(?:int|float)', src)) == set(table), path
