"""train.py: --resume from the run folder, out_dir reuse, stopping (signals, demo, torchrun), and bad input that
must be one line. Every case checks the exit code, the one-line message naming the file or flag, and that the
files already there are byte-identical afterwards."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data
import train
from conftest import ROOT
from llama import Transformer
from tools import run_dir as folder
from test_train import ENV, cli, config, free_port, sft, signal_after_two_steps  # noqa: F401 (sft: fixture)

KW = dict(max_steps=4, ckpt_every=2, global_batch=4, micro_batch=2, dropout=0.1, lr=5e-3)


def snapshot(folder) -> dict:
    """Every file under folder: relative path -> bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def run_main(args, capsys) -> tuple[int, str, str]:
    """train.main in-process: (exit code, stdout, stderr)."""
    try:
        train.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def log_of(folder) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(folder, "log.jsonl"))]


def adapter_of(folder) -> dict:
    return torch.load(os.path.join(folder, "adapter.pth"), weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def done(tiny_ckpt, sft, tmp_path_factory):   # noqa: F811
    """A finished 4-step run with checkpoints at steps 2 and 4 (dropout on: resuming must continue its RNG)."""
    out = tmp_path_factory.mktemp("done") / "run"
    train.main(cli(config(tiny_ckpt, sft, out, **KW)))
    return out


def killed_after(done, dst, step: int):
    """A copy of the finished run as a SIGKILL right after `step`'s checkpoint leaves it."""
    shutil.copytree(done, dst)
    for s, name in folder.checkpoints(dst):
        if s > step:
            shutil.rmtree(dst / name)
    (dst / "latest").write_text(f"ckpt_{step:08d}\n")
    (dst / "adapter.pth").unlink()
    return dst


def test_resume_alone_continues_with_the_runs_settings(done, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the default --out_dir out/run would land here
    run = killed_after(done, tmp_path / "run", 2)
    code, out, err = run_main(["--resume", run], capsys)
    assert code == 0, err
    assert f"resumed from {run / 'ckpt_00000002'} at step 2" in out and "done: 4 steps" in out
    a, b = adapter_of(done), adapter_of(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # bit-identical to the unbroken run
    assert [r["loss"] for r in log_of(run)] == [r["loss"] for r in log_of(done)]
    assert not (tmp_path / "out").exists()


def test_resume_with_nothing_left_says_so_and_writes_nothing(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done, run)
    before = snapshot(run)
    code, out, err = run_main(["--resume", run], capsys)
    assert code == 0, err
    assert f"{run}: nothing left to do: the run is at step 4 of 4" in out
    assert snapshot(run) == before


def test_resume_extends_a_finished_run_with_its_own_warmup_and_cosine(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done, run)
    code, out, err = run_main(["--resume", run, "--max_steps", 8], capsys)
    assert code == 0, err
    lrs = [r["lr"] for r in log_of(run)]
    assert [r["step"] for r in log_of(run)] == list(range(1, 9))
    # by hand: 4 steps, no warmup (round(0.03 * 4) = 0): lr_k = peak * (1 + cos(pi k / 4)) / 2, k = 0..3, as run;
    # the 4 added steps: a warmup of max(1, round(0.03 * 4)) = 1 step from the last lr up to the peak, then the
    # cosine of a new 4-step run with that warmup: (1 + cos(pi j / 3)) / 2, j = 0..2
    peak = KW["lr"]
    expected = [peak * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)] + \
               [peak] + [peak * (1 + math.cos(math.pi * j / 3)) / 2 for j in range(3)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[:4] == [r["lr"] for r in log_of(done)]   # the steps already run are untouched
    assert json.load(open(run / "config.json"))["max_steps"] == 8   # a later --resume alone keeps the new length


def test_resume_epochs_extends_an_epoch_run(tiny_ckpt, sft, tmp_path, capsys):   # noqa: F811
    run = tmp_path / "run"
    train.main(cli(config(tiny_ckpt, sft, run, max_steps=-1, epochs=1, global_batch=8, micro_batch=8)))
    capsys.readouterr()
    code, out, err = run_main(["--resume", run, "--epochs", 2], capsys)   # 16 examples / 8 = 2 steps per epoch
    assert code == 0, err
    assert [r["step"] for r in log_of(run)] == [1, 2, 3, 4] and "done: 4 steps" in out


def test_resume_lr_applies(done, tmp_path, capsys):
    run = killed_after(done, tmp_path / "run", 2)
    code, out, err = run_main(["--resume", run, "--lr", 1e-3], capsys)
    assert code == 0, err
    lrs = [r["lr"] for r in log_of(run)]
    # steps 3, 4 of the unchanged 4-step cosine at the new peak: multipliers (1 + cos(pi k / 4)) / 2, k = 2, 3
    assert lrs[2:] == pytest.approx([1e-3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (2, 3)], rel=1e-12)
    state = torch.load(run / "ckpt_00000004" / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3   # the optimizer's peak, not only the log
    assert lrs[:2] == [r["lr"] for r in log_of(done)][:2]


def test_resume_with_a_changed_setting_names_the_flag(done, tmp_path, capsys):
    run = killed_after(done, tmp_path / "run", 2)
    before = snapshot(run)
    code, out, err = run_main(["--resume", run, "--val_size", 4, "--alpha", 8, "--max_steps", 6], capsys)
    assert code == 1
    line = one_error_line(err)
    assert f"error: --resume {run}: --val_size 4 (the run has 0), --alpha 8.0 (the run has 32.0): cannot change" \
           in line
    assert snapshot(run) == before
    code, _, err = run_main(["--resume", run, "--out_dir", tmp_path / "elsewhere"], capsys)
    assert code == 1 and f"a resumed run writes into its own folder {run}" in one_error_line(err)
    assert snapshot(run) == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("broken", ["state.pt", "adapter.pth"])
def test_corrupt_latest_checkpoint_offers_the_older_one(done, tmp_path, capsys, broken):
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "adapter.pth").unlink()   # killed while the run was ending
    path = run / "ckpt_00000004" / broken
    path.write_bytes(path.read_bytes()[:100])   # truncated
    before = snapshot(run)
    code, _, err = run_main(["--resume", run], capsys)
    assert code == 1
    line = one_error_line(err)
    older = run / "ckpt_00000002"
    assert line.startswith(f"error: {path}: ") and f"resume from it with --resume {older}" in line
    assert snapshot(run) == before
    code, out, err = run_main(["--resume", older], capsys)   # the hint works
    assert code == 0, err
    a, b = adapter_of(done), adapter_of(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert folder.checkpoints(run) == [(2, "ckpt_00000002"), (4, "ckpt_00000004")]   # the broken one was replaced
    torch.load(run / "ckpt_00000004" / broken, weights_only=True)


def test_fresh_run_into_another_runs_folder_stops_before_writing(done, tiny_ckpt, sft, tmp_path, capsys):  # noqa
    run = tmp_path / "run"
    shutil.copytree(done, run)
    before = snapshot(run)
    code, _, err = run_main(cli(config(tiny_ckpt, sft, run, **dict(KW, max_steps=1))), capsys)
    assert code == 1
    assert one_error_line(err) == (f"error: {run}: --out_dir holds another run's checkpoints (ckpt_00000002, "
                                   f"ckpt_00000004, latest); continue it with --resume {run}, or choose a new "
                                   "--out_dir")
    assert snapshot(run) == before


def tiny_parts(tiny_ckpt, sft, out):   # noqa: F811
    """What write_checkpoint needs, for a LoRA model on the tiny checkpoint."""
    cfg = config(tiny_ckpt, sft, out, method="lora", keep_ckpts=2)
    model = Transformer.from_checkpoint(tiny_ckpt)
    train.prepare_model(model, cfg)
    tok = train.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    loader = data.Loader(data.load_dataset(sft, tok, 128)[0], 8, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return cfg, model, optimizer, loader


def test_rotation_sorts_by_step_and_keeps_the_newest(tiny_ckpt, sft, tmp_path):   # noqa: F811
    cfg, model, optimizer, loader = tiny_parts(tiny_ckpt, sft, tmp_path)
    for name in ("ckpt_99999998", "ckpt_99999999"):   # by name, ckpt_100000000 would sort first
        (tmp_path / name).mkdir()
    train.write_checkpoint(str(tmp_path), 10**8, model, optimizer, loader, cfg, 0, 1, {})
    assert sorted(os.listdir(tmp_path)) == ["ckpt_100000000", "ckpt_99999999", "latest"]
    # a resumed run writing a step below older leftovers: the new checkpoint is never the one deleted
    for name in ("ckpt_00000004", "ckpt_00000006"):
        (tmp_path / name).mkdir()
    train.write_checkpoint(str(tmp_path), 1, model, optimizer, loader, cfg, 0, 1, {})
    assert (tmp_path / "ckpt_00000001").is_dir() and open(tmp_path / "latest").read() == "ckpt_00000001\n"
    assert (tmp_path / "ckpt_00000004").is_dir() and (tmp_path / "ckpt_00000006").is_dir()


def test_bad_out_dir_targets_and_empty_data_are_one_line(tiny_ckpt, sft, tmp_path, capsys):   # noqa: F811
    file = tmp_path / "a_file"
    file.write_text("keep me")
    code, _, err = run_main(cli(config(tiny_ckpt, sft, file)), capsys)
    assert code == 1 and one_error_line(err) == f"error: {file}: --out_dir is a file, not a folder; choose another " \
                                                "--out_dir"
    assert file.read_text() == "keep me"
    code, _, err = run_main(cli(config(tiny_ckpt, sft, tmp_path / "t", targets=["w4"])), capsys)
    assert code == 1 and one_error_line(err).startswith("error: --targets w4: ")
    assert not (tmp_path / "t").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_main(cli(config(tiny_ckpt, str(empty), tmp_path / "e")), capsys)
    assert code == 1 and one_error_line(err).startswith(f"error: {empty}: the file is empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    code, _, err = run_main(cli(config(tiny_ckpt, str(blank), tmp_path / "b")), capsys)
    assert code == 1 and one_error_line(err).startswith(f"error: {blank}: no training examples")
    assert not (tmp_path / "e").exists() and not (tmp_path / "b").exists()


def test_demo_under_torchrun_is_one_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_main([], capsys)
    assert code == 1 and "demo runs in one process" in one_error_line(err) and out == ""
    monkeypatch.setenv("RANK", "1")
    assert run_main([], capsys) == (1, "", "")   # one line in all, from rank 0


def test_torchrun_without_arguments_runs_no_demo(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", os.path.join(ROOT, "train.py")],
                       env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "[demo]" not in r.stdout and not (tmp_path / "out").exists()
    assert r.stderr.count("error: the demo runs in one process") == 1


DEMO = """
import sys
sys.path.insert(0, {root!r})
from demo.demo import main
main(out_dir={out!r}, n_per_skill=8, n_eval=4, pretrain_steps=10**6, steps=2, progress=False)
"""


def test_ctrl_c_ends_the_demo(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.Popen([sys.executable, "-c", DEMO.format(root=ROOT, out=str(out))], env=ENV, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = signal_after_two_steps(p, out / "pretrain" / "log.jsonl", lambda: p.send_signal(signal.SIGINT))
    assert p.returncode == 130, stderr[-2000:]
    assert "[demo] 1/3" in stdout and "[demo] 2/3" not in stdout and not (out / "mor").exists()
    assert "[demo] stopped by SIGINT; the demo ends here. Run `python train.py` to start it again" in stderr
    assert "--resume" not in stdout + stderr and "Traceback" not in stderr


def test_ctrl_c_to_torchrun_ranks_checkpoint_and_exit_cleanly(tiny_ckpt, sft, tmp_path):   # noqa: F811
    """Ctrl-C reaches the launcher and every rank (one process group). The ranks finish the step, write one
    checkpoint and exit 0; the launcher forwards the signal, waits for them, then exits non-zero with its
    own SignalException traceback (torch's, not ours)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "train.py")] + cli(config(tiny_ckpt, sft, out, max_steps=100000, global_batch=4,
                                                        micro_batch=1, ckpt_every=10**6))
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    # what a terminal's Ctrl-C does: SIGINT to the whole process group, launcher and ranks
    stdout, stderr = signal_after_two_steps(p, out / "log.jsonl", lambda: os.killpg(p.pid, signal.SIGINT))
    last = log_of(out)[-1]["step"]
    assert f"stopped by signal at step {last}; checkpoint {out / f'ckpt_{last:08d}'}; continue with --resume {out}" \
           in stdout
    assert open(out / "latest").read().strip() == f"ckpt_{last:08d}"
    assert "[rank" not in stderr and stderr.count("Traceback") <= 1   # no rank failed; only the launcher's own
