"""Bad input to llama.py and evaluate.py is one line `error: <file>: <what is wrong>` with nothing written or
lost; files with a UTF-8 BOM and/or CRLF line ends read as their plain UTF-8, LF twins."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import data
import evaluate as ev
import llama
import mor
from conftest import ROOT
from test_evaluate import EXPECTED, STUBS, ByteTok, make_data, unigram_stub
from tiny import TINY_PARAMS, write_checkpoint
from tools import chat, eval_cli


def snapshot(*roots) -> dict[str, bytes]:
    """Every file under the given folders (or the files themselves), path -> bytes."""
    out = {}
    for root in roots:
        if os.path.isfile(root):
            out[root] = open(root, "rb").read()
        for d, _, files in os.walk(root):
            for f in files:
                out[os.path.join(d, f)] = open(os.path.join(d, f), "rb").read()
    return out


def one_line_error(main, argv: list[str]) -> str:
    """main(argv) exits with a single line starting `error: ` (sys.exit(str): exit status 1)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def edit_params(ckpt_dir: str, text: str) -> None:
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        f.write(text)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    """The tiny base with a MoR adapter in a run folder, a 3-layer base, benchmark data, an earlier results file."""
    root = tmp_path_factory.mktemp("inputs")
    run = str(root / "run")
    model = llama.Transformer.from_checkpoint(tiny_ckpt)
    torch.manual_seed(0)
    mor.add_adapters(model, "mor", r=2, num_experts=3)
    with torch.no_grad():   # a trained-looking adapter: B != 0, so it changes the outputs
        for _, p in mor.adapter_state_dict(model).items():
            p.add_(0.3 * torch.randn_like(p))
    mor.save_adapter(model, os.path.join(run, "adapter.pth"))
    deeper = str(root / "deeper")
    write_checkpoint(deeper, dict(TINY_PARAMS, n_layers=3), tokenizer=False)
    data_dir = make_data(str(root / "data"), "official")
    old = str(root / "old_results.json")
    with open(old, "w") as f:
        f.write('{"earlier": "results"}\n')
    return dict(run=run, deeper=deeper, data_dir=data_dir, old=old, base=tiny_ckpt)


PARAMS_CASES = [   # (params.json text, what the one line must say)
    ('{"dim": "32", "n_layers": 2, "n_heads": 4}', r"'dim' is \"32\", expected an integer: write 32$"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4.0}', r"'n_heads' is 4.0, expected an integer: write 4$"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4, "norm_eps": "1e-5"}',
     r"'norm_eps' is \"1e-5\", expected a number: write 1e-05$"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4, "use_scaled_rope": 1}',
     r"'use_scaled_rope' is 1, expected true or false$"),
    ('[32, 2, 4]', r"expected a JSON object .*got a JSON list"),
    ('{"n_layers": 2, "n_heads": 4, "vocab_size": 384}', r"missing key 'dim'"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 5}', r"'dim' 32 is not a multiple of 'n_heads' 5"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3}', r"'n_kv_heads' 3 does not divide 'n_heads' 4"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4.5}', r"'n_heads' is 4.5, expected an integer$"),
    ('{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": "two"}', r"expected an integer or null$"),
    ('{"dim": 32, "n_layers": 0, "n_heads": 4}', r"'n_layers' is 0, expected a positive integer"),
]


@pytest.mark.parametrize("text,reason", PARAMS_CASES)
def test_bad_params_json_is_one_line(tmp_path, setup, text, reason):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(setup["base"], ckpt)
    edit_params(ckpt, text)
    before = snapshot(ckpt, setup["old"])
    where = os.path.join(ckpt, "params.json")
    msg = one_line_error(chat.main, ["--ckpt_dir", ckpt, "--prompt", "hi"])
    assert msg.startswith(f"error: {where}: ") and re.search(reason, msg), msg
    msg = one_line_error(eval_cli.main, ["--ckpt_dir", ckpt, "--data_dir", setup["data_dir"], "--tasks", "piqa",
                                   "--out", setup["old"]])
    assert msg.startswith(f"error: {where}: ")
    assert snapshot(ckpt, setup["old"]) == before


def test_params_json_with_bom_and_crlf_loads(tmp_path):
    d = str(tmp_path)
    write_checkpoint(d, tokenizer=False)
    text = json.dumps(dict(TINY_PARAMS), indent=1).replace("\n", "\r\n")
    with open(os.path.join(d, "params.json"), "wb") as f:
        f.write(b"\xef\xbb\xbf" + text.encode())
    args = llama.load_params(os.path.join(d, "params.json"))
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.multiple_of) == (32, 2, 4, 2, 16)
    assert llama.Transformer.from_checkpoint(d).params.vocab_size == 384


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_missing_last_shard_is_named(tmp_path, vocab_parallel):
    """consolidated.01.pth of two deleted: no gap in the numbering, so the shapes tell (wq holds 16 of 32 rows)."""
    d = str(tmp_path)
    write_checkpoint(d, n_shards=2, tokenizer=False, vocab_parallel=vocab_parallel)
    if vocab_parallel:   # Llama-3 style: params.json's vocab_size -1, taken from the (half) embedding
        edit_params(d, json.dumps(dict(TINY_PARAMS, vocab_size=-1)))
    os.remove(os.path.join(d, "consolidated.01.pth"))
    before = snapshot(d)
    msg = one_line_error(chat.main, ["--ckpt_dir", d, "--prompt", "hi"])
    assert msg == (f"error: {d}: consolidated.01.pth missing: the weights are split in 2 shards (consolidated.00.pth "
                   "holds 16 of the 32 rows of 'layers.0.attention.wq.weight' that params.json implies); "
                   "copy every shard")
    assert snapshot(d) == before
    # a params.json whose dim is not the weights' still names the key and both shapes, not a missing shard
    write_checkpoint(str(tmp_path / "wide"), tokenizer=False)
    edit_params(str(tmp_path / "wide"), json.dumps(dict(TINY_PARAMS, dim=64, n_heads=8, n_kv_heads=4)))
    msg = one_line_error(chat.main, ["--ckpt_dir", str(tmp_path / "wide"), "--prompt", "hi"])
    assert "has shape (384, 32) but params.json implies (384, 64)" in msg


def test_out_under_a_file_fails_before_scoring(tmp_path, setup, monkeypatch):
    def no_scoring(*a, **k):
        raise AssertionError("scoring started before --out was checked")
    monkeypatch.setattr(ev, "evaluate_tasks", no_scoring)
    monkeypatch.setattr(llama.Transformer, "from_checkpoint", no_scoring)
    before = snapshot(setup["old"])
    argv = ["--ckpt_dir", setup["base"], "--data_dir", setup["data_dir"], "--tasks", "piqa", "--out"]
    bad = os.path.join(setup["old"], "sub", "r.json")
    msg = one_line_error(eval_cli.main, argv + [bad])
    assert msg == (f"error: {bad}: cannot write --out there: {setup['old']} is a file, not a folder; "
                   "choose another --out")
    msg = one_line_error(eval_cli.main, argv + [str(tmp_path)])
    assert msg.startswith(f"error: {tmp_path}: --out is a folder; give a file name")
    assert snapshot(setup["old"]) == before


def test_adapter_run_folder_equals_its_file(tmp_path, setup):
    """--adapter RUN_DIR uses RUN_DIR/adapter.pth: same JSON numbers as the file itself, and not the base's."""
    res = {}
    file = os.path.join(setup["run"], "adapter.pth")
    for name, adapter in (("folder", setup["run"]), ("file", file), ("base", None)):
        out = str(tmp_path / f"{name}.json")
        eval_cli.main(["--ckpt_dir", setup["base"], "--data_dir", setup["data_dir"], "--tasks", "lambada",
                 "--max_seq_len", "64", "--out", out] + (["--adapter", adapter] if adapter else []))
        res[name] = json.load(open(out))["tasks"]["lambada"]
    assert res["folder"]["perplexity"] == res["file"]["perplexity"] != res["base"]["perplexity"]
    unfinished = tmp_path / "unfinished"
    (unfinished / "ckpt_00000004").mkdir(parents=True)
    (unfinished / "latest").write_text("ckpt_00000004\n")
    msg = one_line_error(chat.main, ["--ckpt_dir", setup["base"], "--adapter", str(unfinished), "--prompt", "hi"])
    assert msg == (f"error: {unfinished}: no adapter.pth in this folder (the run has not finished; its latest "
                   f"checkpoint's is {unfinished / 'ckpt_00000004' / 'adapter.pth'})")


def test_bad_adapters_are_one_line(tmp_path, setup):
    before = snapshot(setup["run"], setup["old"])
    adapter = os.path.join(setup["run"], "adapter.pth")
    ev_argv = ["--data_dir", setup["data_dir"], "--tasks", "piqa", "--out", setup["old"]]
    # trained on the 2-layer base, loaded on a 3-layer one
    # (mor.load_adapter's message, exact in tests/test_mor.py; "(w1 32x96, ...)" follows each side)
    for main, extra in ((chat.main, ["--prompt", "hi"]), (eval_cli.main, ev_argv)):
        msg = one_line_error(main, ["--ckpt_dir", setup["deeper"], "--adapter", setup["run"]] + extra)
        assert msg.startswith(f"error: {adapter}: trained on dim 32 / 2 layers") and \
            ", this base is dim 32 / 3 layers" in msg, msg
    # same depth and width, another FFN width: both shapes
    other = str(tmp_path / "other_ffn")
    write_checkpoint(other, dict(TINY_PARAMS, multiple_of=64), tokenizer=False)
    msg = one_line_error(chat.main, ["--ckpt_dir", other, "--adapter", adapter, "--prompt", "hi"])
    assert re.fullmatch(rf"error: {re.escape(adapter)}: trained on .*\b32\D+96\b.*, this base is .*\b32\D+128\b.*",
                        msg), msg
    garbage, truncated, not_adapter = (str(tmp_path / n) for n in ("garbage.pth", "truncated.pth", "weights.pth"))
    with open(garbage, "wb") as f:
        f.write(bytes(range(256)) * 8)
    with open(truncated, "wb") as f:
        f.write(open(adapter, "rb").read()[:500])
    torch.save({"layers.0.feed_forward.w1.weight": torch.zeros(2, 2)}, not_adapter)
    for path, reason in ((garbage, "not a torch.save archive"), (truncated, "not a torch.save archive"),
                         (not_adapter, "{'config', 'state_dict'}")):
        for main, extra in ((chat.main, ["--prompt", "hi"]), (eval_cli.main, ev_argv)):
            msg = one_line_error(main, ["--ckpt_dir", setup["base"], "--adapter", path] + extra)
            assert msg.startswith(f"error: {path}: not an adapter file (") and reason in msg, msg
    nope = str(tmp_path / "nope")
    msg = one_line_error(chat.main, ["--ckpt_dir", setup["base"], "--adapter", nope, "--prompt", "x"])
    assert msg == f"error: {tmp_path / 'nope'}: no adapter file or run folder there"
    assert snapshot(setup["run"], setup["old"]) == before


def test_cli_exit_status_and_stderr(setup):
    """The real process: exit status 1, one `error:` line on stderr, nothing on stdout, no traceback."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "llama.py"), "--ckpt_dir", setup["deeper"], "--adapter",
                        setup["run"], "--prompt", "hi"], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in p.stderr


def bom_crlf(root: str) -> None:
    """Rewrite every file under root as Windows tools would: UTF-8 BOM first, CRLF line ends."""
    for path in snapshot(root):
        raw = open(path, "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + raw)


def test_benchmarks_with_bom_and_crlf_score_as_plain(tmp_path):
    """Every task's hand-computed accuracy (test_evaluate's EXPECTED) from BOM + CRLF files, both forms."""
    for form in ("official", "hf"):
        root = make_data(str(tmp_path / form), form)
        bom_crlf(root)
        for task, expected in EXPECTED.items():
            got = ev.evaluate_tasks(STUBS.get(task, unigram_stub)(), ByteTok(), [task], root, batch_size=2)[task]
            for key in set(expected) - {"subjects"}:
                assert got[key] == pytest.approx(expected[key], rel=1e-5), (form, task, key)


def test_mmlu_csv_bom_and_crlf_inside_quotes(tmp_path):
    """A BOM before a quoted first field, and a CRLF line break inside a quoted question: six fields, and the
    prompt is the hand-written one (no BOM, "\\n" not "\\r\\n")."""
    path = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'\xef\xbb\xbf"Which bone,\r\nif any?",skull,rib,"femur, long",none,C\r\nQ2,a,b,c,d,A\r\n')
    items, bad = ev.load_task("mmlu", str(tmp_path))
    assert bad == 0 and [x["gold"] for x in items] == [2, 0] and items[1]["where"].endswith("_test.csv:3")
    assert items[0]["context"] == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                                   "Which bone,\nif any?\nA. skull\nB. rib\nC. femur, long\nD. none\nAnswer:")


def test_training_jsonl_with_bom_and_crlf(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"prompt": "2+2=", "completion": " 4"}]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows) + b"\r\n")
    assert data.read_jsonl(str(path)) == (rows, 0)
    # a BOM anywhere but the start of the file is still a bad line, named
    path.write_bytes(json.dumps(rows[0]).encode() + b"\n\xef\xbb\xbf" + json.dumps(rows[1]).encode() + b"\n")
    with pytest.raises(data.DataError, match=r"train.jsonl:2: not valid JSON"):
        data.read_jsonl(str(path))
