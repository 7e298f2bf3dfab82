"""tools/run_dir.py through train.py: checkpoints load with weights_only=True (a crafted pickle runs nothing), one
run per folder (the lock), checkpoint-write faults, a half-written log line, damaged or missing RNG files, an
--out_dir that cannot be written, and the lr of a finished run that is made longer. Every fault checks the exit
code, the one `error:` line naming the file, and that the files already there are byte-identical afterwards."""
import errno
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT
from test_resume import KW, adapter_of, done, killed_after, log_of, one_error_line, run_main, snapshot  # noqa: F401
from test_train import ENV, cli, config, sft  # noqa: F401 (sft: fixture)
from tools import run_dir as folder
from tools import schedule


class Crafted:
    """Pickles as a call of open(path, "w"): an unsafe torch.load would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_no_unsafe_load_outside_tests():
    hits = []
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for f in files:
            if f.endswith(".py") and re.search(r"weights_only\s*=\s*False", open(os.path.join(root, f)).read()):
                hits.append(os.path.join(root, f))
    assert hits == []


@pytest.mark.parametrize("where", ["ckpt_00000004/state.pt", "ckpt_00000004/rng_0.pt", "ckpt_00000002/state.pt"])
def test_a_crafted_checkpoint_file_runs_nothing(done, tmp_path, capsys, where):
    run = killed_after(done, tmp_path / "run", 4)
    pwned = tmp_path / "pwned"
    path = run / where
    torch.save({"step": 4, "x": Crafted(pwned)}, path)
    if where.startswith("ckpt_00000002"):   # the older one is only probed when the latest is damaged
        latest = run / "ckpt_00000004" / "state.pt"
        latest.write_bytes(latest.read_bytes()[:100])
    before = snapshot(run)
    code, _, err = run_main(["--resume", run], capsys)
    assert code == 1 and not pwned.exists()
    line = one_error_line(err)
    if where.startswith("ckpt_00000002"):   # the probe refused it: not offered as intact
        assert line.startswith(f"error: {run / 'ckpt_00000004' / 'state.pt'}: unreadable") and \
            line.endswith("no older readable checkpoint is kept beside it")
        code, _, err = run_main(["--resume", run / "ckpt_00000002"], capsys)
        assert code == 1 and not pwned.exists()
        line = one_error_line(err)
    assert line.startswith(f"error: {path}: unreadable (it refers to ") and "a checkpoint must not run code" in line
    assert snapshot(run) == before
    torch.load(path, weights_only=False)   # the file is live: an unsafe load runs it
    assert pwned.exists()


def test_a_crafted_fsdp_optimizer_shard_runs_nothing(done, tiny_ckpt, sft, tmp_path):   # noqa: F811
    """optim_<rank>.pt is read only under --fsdp (which needs torchrun): run_dir.restore_checkpoint called
    directly."""
    run = killed_after(done, tmp_path / "run", 4)
    ckpt = str(run / "ckpt_00000004")
    pwned = tmp_path / "pwned"
    torch.save({"state": {}, "x": Crafted(pwned)}, os.path.join(ckpt, "optim_0.pt"))
    cfg = config(tiny_ckpt, sft, run, fsdp=True, **KW)
    with pytest.raises(train.CheckpointError, match=re.escape(f"{ckpt}/optim_0.pt: unreadable (it refers to ")):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        folder.restore_checkpoint(ckpt, folder.read_state(ckpt), cfg, None, optimizer, None, 0, 1)
    assert not pwned.exists()


HOLD = """
import sys
sys.path.insert(0, {root!r})
from tools.run_dir import lock
with lock({out!r}):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_a_held_folder_names_the_holder(done, tiny_ckpt, sft, tmp_path, capsys):  # noqa: F811
    run = killed_after(done, tmp_path / "run", 2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=str(run))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(run)
        expected = (f"error: {run}: another run is writing into this folder (pid {holder.pid} on "
                    f"{socket.gethostname()}; lock file {run / '.lock'}); wait for it to end or stop it, or choose "
                    "another --out_dir")
        for args in (["--resume", run], cli(config(tiny_ckpt, sft, run, **KW))):   # a resume, a fresh run
            code, out, err = run_main(args, capsys)
            assert code == 1 and one_error_line(err) == expected and out == ""
            assert snapshot(run) == before   # config.json, log.jsonl, checkpoints untouched
    finally:
        holder.kill()   # SIGKILL: the OS releases the lock
        holder.wait()
    code, out, err = run_main(["--resume", run], capsys)
    assert code == 0, err
    a, b = adapter_of(done), adapter_of(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_training_processes_one_folder(tiny_ckpt, sft, tmp_path):   # noqa: F811
    """A real run holds the folder; it is frozen (SIGSTOP) while a second train.py tries, so that any byte the
    second one wrote would show."""
    out = tmp_path / "run"
    args = cli(config(tiny_ckpt, sft, out, max_steps=100000, global_batch=4, micro_batch=4, ckpt_every=1))
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.jsonl").exists() and
                                              (out / "log.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)
        before = snapshot(out)
        for again in (["--resume", str(out)], args):   # a resume, a fresh run
            second = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + again, env=ENV,
                                    capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert second.returncode == 1 and second.stdout == ""
            assert one_error_line(second.stderr).startswith(f"error: {out}: another run is writing into this "
                                                            f"folder (pid {first.pid} on {socket.gethostname()}; ")
            assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)   # the first run checkpoints and stops cleanly
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "stopped by signal" in stdout, stderr[-2000:]


def test_a_failed_fresh_run_leaves_no_folder(tiny_ckpt, sft, tmp_path, capsys):   # noqa: F811
    out = tmp_path / "new" / "runs" / "a"
    code, _, err = run_main(cli(config(tiny_ckpt, sft, out, targets=["w4"])), capsys)   # fails after the lock
    assert code == 1 and one_error_line(err).startswith("error: --targets w4: ") and os.listdir(tmp_path) == []


def fsize_limit(limit: int):
    def set_limit():   # in the child: a write past the limit fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_checkpoint_over_the_file_size_limit_is_one_line(done, tmp_path):
    run = killed_after(done, tmp_path / "run", 2)
    before = {k: v for k, v in snapshot(run).items() if k.startswith("ckpt_") or k == "latest"}
    # 32 KB: the log, config and lock fit; adapter.pth (60 KB) does not
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(run)], capture_output=True,
                       text=True, timeout=300, env=dict(ENV, PYTHONDONTWRITEBYTECODE="1"),
                       preexec_fn=fsize_limit(32 * 1024))
    assert r.returncode == 1, r.stderr[-2000:]
    line = one_error_line(r.stderr)
    tmp = run / "ckpt_00000004.tmp"
    assert line.startswith(f"error: {tmp / 'adapter.pth'}: cannot be written (over the file-size limit (ulimit -f) "
                           "of 32.0 KB); it needs at least ")
    assert line.endswith(f"; removed {tmp}, ckpt_00000002 and `latest` are unchanged: free some space, then "
                         f"--resume {run}")
    need = float(re.search(r"it needs at least ([\d.]+) KB", line).group(1)) * 1024
    # the whole checkpoint's tensors (adapter, 2 Adam moments, RNG); the files add headers, 64-byte alignment per
    # tensor and the pickled Python RNG state: about 20% more for a model this small, under 1% for a 7B one
    files = sum(os.path.getsize(run / "ckpt_00000002" / f) for f in os.listdir(run / "ckpt_00000002"))
    assert 0.75 * files < need <= files
    assert not tmp.exists() and sorted(os.listdir(run)) == [".lock", "ckpt_00000002", "config.json", "latest",
                                                            "log.jsonl"]
    assert {k: v for k, v in snapshot(run).items() if k.startswith("ckpt_") or k == "latest"} == before


def test_full_disk_while_writing_state_is_one_line(done, tmp_path, capsys, monkeypatch):
    run = killed_after(done, tmp_path / "run", 2)
    before = {k: v for k, v in snapshot(run).items() if k.startswith("ckpt_") or k == "latest"}
    save = torch.save

    def full_disk(obj, path, *a, **kw):
        if str(path).endswith("state.pt"):
            save(obj, path, *a, **kw)   # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_main(["--resume", run], capsys)
    assert code == 1
    tmp = run / "ckpt_00000004.tmp"
    assert one_error_line(err).startswith(f"error: {tmp / 'state.pt'}: cannot be written (No space left on device); "
                                          "it needs at least ")
    assert not tmp.exists()
    assert {k: v for k, v in snapshot(run).items() if k.startswith("ckpt_") or k == "latest"} == before


def test_a_half_written_last_log_line_is_dropped(done, tmp_path, capsys):
    run = killed_after(done, tmp_path / "run", 2)
    log = run / "log.jsonl"
    log.write_text(log.read_text() + log.read_text().splitlines()[2][:40])   # killed while writing step 3
    code, out, err = run_main(["--resume", run], capsys)
    assert code == 0, err
    assert err.strip() == f"{log}: dropped the half-written last line 5 (the run was killed while writing it)"
    a, b = adapter_of(done), adapter_of(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log_of(run)] == [r["loss"] for r in log_of(done)]


def test_a_bad_log_line_before_the_last_is_one_line(done, tmp_path, capsys):
    run = killed_after(done, tmp_path / "run", 2)
    log = run / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    before = snapshot(run)
    code, _, err = run_main(["--resume", run], capsys)
    assert code == 1 and one_error_line(err).startswith(f"error: {log}:2: not a JSON record")
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_damaged_or_missing_rng_offers_the_older_checkpoint(done, tmp_path, capsys, damage):
    run = killed_after(done, tmp_path / "run", 4)
    path = run / "ckpt_00000004" / "rng_0.pt"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"")
    before = snapshot(run)
    code, _, err = run_main(["--resume", run, "--max_steps", 6], capsys)
    assert code == 1
    line = one_error_line(err)
    reason = "missing, so the resumed run could not continue its random streams (dropout) exactly" \
        if damage == "missing" else "unreadable ("
    assert line.startswith(f"error: {path}: {reason}")
    assert line.endswith(f"resume from it with --resume {run / 'ckpt_00000002'}")
    assert snapshot(run) == before


def test_out_dir_below_a_file_is_one_line_before_loading(tiny_ckpt, sft, tmp_path, capsys, monkeypatch):  # noqa
    file = tmp_path / "a_file"
    file.write_text("keep me")
    monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("data loaded before the --out_dir check"))
    code, _, err = run_main(cli(config(tiny_ckpt, sft, file / "sub" / "run")), capsys)
    assert code == 1 and one_error_line(err) == (f"error: {file / 'sub' / 'run'}: cannot write --out_dir there: "
                                                 f"{file} is a file, not a folder; choose another --out_dir")
    assert file.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["a_file"]


def test_read_only_out_dir_is_one_line_before_loading(tiny_ckpt, sft, tmp_path, capsys, monkeypatch):  # noqa
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if os.access(ro, os.W_OK):   # root writes in any folder; /proc/sys is read-only even to root (as mkdir finds)
        if os.access("/proc/sys", os.W_OK):
            pytest.skip("no folder here that this user cannot write in")
        ro = "/proc/sys"
    monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("data loaded before the --out_dir check"))
    out = os.path.join(ro, "run")
    code, _, err = run_main(cli(config(tiny_ckpt, sft, out)), capsys)
    assert code == 1 and one_error_line(err) == (f"error: {out}: cannot write --out_dir there: no permission to "
                                                 f"write in {ro}; choose another --out_dir")
    assert not os.path.exists(out)


def test_extending_a_finished_run_warms_up_again_by_hand():
    cfg = train.TrainConfig(warmup_ratio=0.25, min_lr_ratio=0.1)
    plan = schedule.plan_schedule(cfg, 4)   # warmup 1; the cosine over steps 1..3 of 4
    lrs = [schedule.lr_lambda(s, min_ratio=0.1, **plan) for s in range(4)]
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 1 / 3, 2 / 3)]
    assert lrs == pytest.approx([1.0] + cos, rel=1e-12)
    longer = schedule.plan_schedule(cfg, 12, step=4, saved=plan)   # 8 added steps: warmup round(0.25 * 8) = 2
    new = [schedule.lr_lambda(s, min_ratio=0.1, **longer) for s in range(12)]
    assert new[:4] == lrs   # the steps already run keep their lrs exactly
    m = cos[-1]   # the last step's multiplier: the warmup climbs from there to 1 in 2 steps
    assert new[4:6] == pytest.approx([m + (1 - m) / 2, 1.0], rel=1e-12)
    # then a new run's cosine over the 6 steps left: 1 down towards min_lr_ratio, never reaching it
    assert new[6:] == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)], rel=1e-12)
    # under a new --lr twice the run's: it still starts from the lr the run ended at, m x the old peak
    doubled = schedule.plan_schedule(train.TrainConfig(warmup_ratio=0.25, min_lr_ratio=0.1, lr=2 * cfg.lr), 12, 4,
                                  plan, lr_was=cfg.lr)
    assert 2 * schedule.lr_lambda(4, min_ratio=0.1, **doubled) == pytest.approx(m + (2 - m) / 2, rel=1e-12)
    # extended again after 2 more steps (not finished): continues from where it is, the first 6 steps kept
    again = schedule.plan_schedule(cfg, 20, step=6, saved=longer)
    assert [schedule.lr_lambda(s, min_ratio=0.1, **again) for s in range(6)] == new[:6]


def test_a_state_of_plain_values_but_not_a_checkpoint_is_one_line(done, tmp_path, capsys):
    run = killed_after(done, tmp_path / "run", 4)
    path = run / "ckpt_00000004" / "state.pt"
    torch.save({"step": 4, "config": "mor"}, path)   # loads with weights_only=True, but is not train.py's
    before = snapshot(run)
    code, _, err = run_main(["--resume", run], capsys)
    assert code == 1 and one_error_line(err) == (
        f"error: {path}: not a train.py checkpoint state (no config, loader, world_size, optimizer); the older "
        f"checkpoint {run / 'ckpt_00000002'} is intact: resume from it with --resume {run / 'ckpt_00000002'}")
    assert snapshot(run) == before


def test_a_log_line_whose_step_is_not_a_number_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": "x", "loss": 1.0}\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(train.CheckpointError, match=re.escape(f"{log}:2: not a JSON record")):
        folder.trim_log(str(tmp_path), 2)
    assert log.read_text().count("\n") == 3   # untouched
