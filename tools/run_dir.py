"""The run folder (train.py's --out_dir): one writer at a time, checkpoints written whole or not at
all, and every file of it read back with torch.load(weights_only=True), so a checkpoint someone
hands you cannot run code.

    out_dir/.lock          flock-ed by the run writing here (rank r > 0: .lock.<r>); its pid and host
    out_dir/config.json    the run's settings; out_dir/log.jsonl one record per step (tools/steplog.py)
    out_dir/ckpt_<step>/   adapter.pth, state.pt, rng_<rank>.pt (optim_<rank>.pt under FSDP)
    out_dir/latest         the name of the newest complete checkpoint
    out_dir/adapter.pth    the final adapter (mor.save_adapter's file)

Every fault here is a FolderError or CheckpointError whose message names the file: train.main prints
it as one `error:` line.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import random
import re
import resource
import shutil
import socket
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

import data
import mor
from llama import CheckpointError


class FolderError(CheckpointError):
    """The run folder cannot be used as asked (held by another run, not writable): the message
    says why."""


# ----------------------------------------------------------------------------- finding checkpoints

def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, folder name) of the complete checkpoints in out_dir, oldest first: sorted by step, not
    by name."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [re.fullmatch(r"ckpt_(\d+)", d) for d in names]
    return sorted((int(m.group(1)), m.group(0)) for m in found if m)


def run_dir(ckpt: str) -> str:
    """The run folder (out_dir) a checkpoint folder lives in."""
    return os.path.dirname(os.path.abspath(ckpt))


def find_checkpoint(path: str) -> str:
    """A checkpoint folder from --resume: an out_dir (its `latest`) or a ckpt_<step> folder
    itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.pt")):
        in_run = re.fullmatch(r"ckpt_\d+", os.path.basename(os.path.normpath(path)))
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (expected `latest` or state.pt)"
                                + (f"; {older_checkpoint(path)}" if in_run else ""))
    return path


def older_checkpoint(ckpt: str) -> str:
    """A hint naming the newest readable checkpoint kept beside ckpt (rotation keeps keep_ckpts of
    them)."""
    m = re.fullmatch(r"ckpt_(\d+)", os.path.basename(os.path.normpath(ckpt)))
    for s, name in reversed(checkpoints(run_dir(ckpt)) if m else []):
        older = os.path.join(run_dir(ckpt), name)
        if s >= int(m.group(1)):
            continue
        try:   # a probe: any failure means "not this one"
            torch.load(os.path.join(older, "state.pt"), map_location="cpu", weights_only=True)
            torch.load(os.path.join(older, "adapter.pth"), map_location="cpu", weights_only=True,
                       mmap=True)
        except Exception:
            continue
        return f"the older checkpoint {older} is intact: resume from it with --resume {older}"
    return "no older readable checkpoint is kept beside it"


def load(path: str, ckpt: str):
    """A file of checkpoint folder ckpt, loaded with weights_only=True: tensors and plain values
    only, so a crafted pickle runs nothing. Any fault is one CheckpointError naming the file and
    offering the older checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, overwritten, another format, a pickle of objects: many types
        text = str(e).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        reason = (f"it refers to {unsafe.group(1)}, not only tensors and plain values; not loaded: a checkpoint "
                  "must not run code" if unsafe else
                  f"{type(e).__name__}: {(text.splitlines() or ['file ends early'])[0][:120]}")
        raise CheckpointError(f"{path}: unreadable ({reason}); {older_checkpoint(ckpt)}") from None


def read_state(ckpt: str) -> dict:
    """state.pt of a checkpoint; an unreadable one is one error line offering the older
    checkpoint."""
    state = load(path := os.path.join(ckpt, "state.pt"), ckpt)
    missing = [k for k in ("step", "config", "loader", "world_size", "optimizer") if not isinstance(state, dict)
               or k not in state or k == "config" and not isinstance(state[k], dict)]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint state (no {', '.join(missing)}); "
                              f"{older_checkpoint(ckpt)}")
    return state


# ----------------------------------------------------------------------------- the folder itself

@contextmanager
def lock(out_dir: str, rank: int = 0) -> Iterator[None]:
    """Hold an exclusive flock on out_dir/.lock (rank r > 0: .lock.<r>) for the life of the run: a
    second run into the folder stops before writing anything, saying which process holds it. The OS
    releases the lock when the process ends however it ends, so a SIGKILLed run can be resumed. A
    folder this call created is removed again if the run fails before writing anything else into
    it."""
    new = [d := os.path.abspath(out_dir)]   # the folders this call creates, innermost first
    while not os.path.exists(d := os.path.dirname(d)):
        new.append(d)
    new = new if not os.path.isdir(out_dir) else []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock" if rank == 0 else f".lock.{rank}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:   # held: its holder wrote who it is
        holder = os.read(fd, 200).decode(errors="replace").strip()
        holder = holder or "a process that has not yet written its pid"
        os.close(fd)
        raise FolderError(f"{out_dir}: another run is writing into this folder ({holder}; lock file {path}); wait "
                          "for it to end or stop it, or choose another --out_dir") from None
    except OSError as e:   # a file system without locks
        os.close(fd)
        raise FolderError(f"{path}: cannot lock the run folder ({e.strerror}); choose another "
                          "--out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    try:
        yield
    except BaseException:
        if new and os.listdir(out_dir) == [os.path.basename(path)]:   # the run wrote nothing else
            os.unlink(path)   # still locked: nobody else can take it in between
            for d in new:
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
        raise
    finally:
        os.close(fd)   # releases the lock


# ----------------------------------------------------------------------------- writing checkpoints

def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def nbytes(obj) -> int:
    """The bytes of obj's tensor storages: what torch.save writes for it, but for its headers and
    pickled rest."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def size(n: float) -> str:
    return next(f"{n / 2**p:.1f} {unit}" for p, unit in ((30, "GB"), (20, "MB"), (10, "KB"), (0, "bytes"))
                if n >= 2**p or p == 0)


def write_fault(path: str, e: Exception, need: int, out_dir: str) -> str:
    """Why writing path failed, and how much room the checkpoint needed. torch.save's own writer
    reports a full disk or the file-size limit as RuntimeError('unexpected pos ...'), so the cause
    is read off the disk."""
    free = shutil.disk_usage(out_dir).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        why = e.strerror
    elif free < need:
        why = "the disk is full"
    elif limit != resource.RLIM_INFINITY and limit < need:
        why = f"over the file-size limit (ulimit -f) of {size(limit)}"
    else:
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
    return (f"{path}: cannot be written ({why}); it needs at least {size(need)}, {size(free)} are free "
            f"in {out_dir}")


def write_checkpoint(out_dir: str, step: int, raw: torch.nn.Module, optimizer, loader, cfg, rank: int,
                     world: int, extra: dict) -> str:
    """Write out_dir/ckpt_<step>/ atomically: everything goes to a temp folder that is renamed once
    complete, then the `latest` pointer is replaced (os.replace), then older checkpoints are
    deleted. A kill at any moment leaves `latest` naming a complete checkpoint, and rotation never
    deletes the one just written. A write that fails (full disk, file-size limit) removes the temp
    folder and is one CheckpointError: the previous checkpoint and `latest` are untouched.

    adapter.pth (mor.save_adapter's file; adapters only), state.pt (optimizer, lr schedule, step,
    data position, config), rng_<rank>.pt (each rank's RNG states; dropout differs per rank), and
    under FSDP optim_<rank>.pt (each rank's optimizer shard). Only tensors and plain values, so that
    load (weights_only) reads them all. restore_checkpoint reads them back.
    """
    final = os.path.join(out_dir, f"ckpt_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    adapter = mor.save_adapter(raw, None)   # a collective under FSDP: all ranks gather, rank 0 writes
    first = {"adapter.pth": adapter,
             "state.pt": {"step": step, "config": dataclasses.asdict(cfg), "loader": loader.state_dict(),
                          "world_size": world, **extra, "optimizer": None if cfg.fsdp else optimizer.state_dict()}
             } if rank == 0 else {}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),   # (int, tuple of ints, float|None)
           "cuda": torch.cuda.get_rng_state() if cuda else None}
    then = {f"rng_{rank}.pt": rng, **({f"optim_{rank}.pt": optimizer.state_dict()} if cfg.fsdp else {})}
    need = nbytes([first, then])
    for files in (first, then):   # rank 0 makes the folder first
        for name, obj in files.items():
            path = os.path.join(tmp, name)
            try:
                os.makedirs(tmp, exist_ok=True)
                torch.save(obj, path)
            except (OSError, RuntimeError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                kept = checkpoints(out_dir)
                raise CheckpointError(f"{write_fault(path, e, need, out_dir)}; removed {tmp}, "
                                      + (f"{kept[-1][1]} and `latest` are unchanged" if kept else "no checkpoint yet")
                                      + f": free some space, then --resume {out_dir}") from None
        barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        older = [name for s, name in checkpoints(out_dir) if s < step]   # later: a future this run replaces
        for name in older[:max(0, len(older) - cfg.keep_ckpts + 1)] if cfg.keep_ckpts > 0 else []:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    barrier()
    return final


def save_adapter(raw: torch.nn.Module, out_dir: str, rank: int) -> None:
    """The run's final out_dir/adapter.pth (mor.save_adapter's file, via a temp name); a failed
    write is one CheckpointError, and the last checkpoint holds the same weights."""
    payload = mor.save_adapter(raw, None)   # a collective under FSDP
    path = os.path.join(out_dir, "adapter.pth")
    if rank == 0:
        try:
            torch.save(payload, path + ".tmp")
            os.replace(path + ".tmp", path)
        except (OSError, RuntimeError) as e:
            if os.path.exists(path + ".tmp"):
                os.unlink(path + ".tmp")
            raise CheckpointError(f"{write_fault(path, e, nbytes(payload), out_dir)}; the latest checkpoint's "
                                  "adapter.pth holds the same weights: free some space and copy it") from None


# ----------------------------------------------------------------------------- restoring

def restore_checkpoint(ckpt: str, state: dict, cfg, raw: torch.nn.Module, optimizer,
                       loader: data.Loader, rank: int, world: int) -> tuple[int, int]:
    """Everything write_checkpoint wrote, back in place (but the lr schedule: train.py re-fits it):
    adapter (or full) weights, optimizer, data position, RNG streams, and log.jsonl cut after the
    checkpoint's step. Returns (step, tokens_seen). Under FSDP the adapter came in with the model
    (train.build_sharded)."""
    step = state["step"]
    if not cfg.fsdp:
        try:
            mor.load_adapter(raw, os.path.join(ckpt, "adapter.pth"))
        except ValueError as e:   # truncated or overwritten: offer the checkpoint before it
            raise CheckpointError(f"{e}; {older_checkpoint(ckpt)}") from None
    optimizer.load_state_dict(load(os.path.join(ckpt, f"optim_{rank}.pt"), ckpt) if cfg.fsdp
                              else state["optimizer"])
    try:
        loader.load_state_dict(state["loader"])
    except data.DataError as e:
        raise CheckpointError(f"--resume {ckpt}: {e}: the --data files changed since this "
                              "checkpoint") from None
    if not restore_rng(ckpt, rank, state["world_size"] == world):   # each rank's dropout goes on exactly
        torch.manual_seed(cfg.seed + 1000 * rank + step)   # another number of processes: fresh streams
    if rank == 0:
        trim_log(cfg.out_dir, step)   # the steps after the checkpoint run again
    return step, state.get("tokens_seen", 0)


def restore_rng(ckpt: str, rank: int, same_world: bool) -> bool:
    """Put back this rank's RNG streams (dropout) from rng_<rank>.pt; False when the run had another
    number of processes (the caller re-seeds). A missing file would silently make the resume
    inexact: an error."""
    path = os.path.join(ckpt, f"rng_{rank}.pt")
    if not same_world:
        return False
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing, so the resumed run could not continue its random streams (dropout) "
                              f"exactly; {older_checkpoint(ckpt)}")
    rng = load(path, ckpt)
    try:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.set_rng_state(rng["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not the RNG states train.py writes ({type(e).__name__}: {e}); "
                              f"{older_checkpoint(ckpt)}") from None
    return True


def trim_log(out_dir: str, step: int) -> None:
    """Cut log.jsonl after `step` (the steps after the checkpoint run again). A half-written last
    line (a kill while it was written) is dropped, and said on stderr; a bad line before it is an
    error naming it."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            rec_step = json.loads(line).get("step", 0)
            keep = rec_step <= step   # a non-number step fails here, as a bad line
        except (ValueError, AttributeError, TypeError):
            if i < len(lines):
                raise CheckpointError(f"{path}:{i}: not a JSON record; delete or fix the line, then resume "
                                      "again") from None
            print(f"{path}: dropped the half-written last line {i} (the run was killed while writing it)",
                  file=sys.stderr)
            continue
        if keep:
            kept.append(line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
