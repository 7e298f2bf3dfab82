"""Meta's consolidated.NN.pth shards as llama.Transformer.from_checkpoint reads them: found in
order, loaded memory-mapped with weights_only=True, checked to belong to one checkpoint, and each
tensor's file pages released once it has been copied out. Every fault is one CheckpointError naming
the file."""
from __future__ import annotations

import ctypes
import glob
import mmap
import os
import sys

import torch


class CheckpointError(ValueError):
    """A checkpoint, params.json or tokenizer that cannot be used as given; the message names the
    file. Defined here, below llama.py (which imports it), so that this module needs nothing from
    llama.py."""


def find_shards(ckpt_dir: str) -> list[str]:
    """consolidated.00.pth, consolidated.01.pth, ... : one per model-parallel rank, no gaps."""
    # escaped: "[chat]" in a folder name is a name, not a glob pattern
    paths = sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), "consolidated.*.pth")))
    if not paths:
        raise FileNotFoundError(f"{ckpt_dir}: no consolidated.NN.pth weight files")
    for i, p in enumerate(paths):
        if os.path.basename(p) != f"consolidated.{i:02d}.pth":
            raise CheckpointError(f"{ckpt_dir}: consolidated.{i:02d}.pth is missing (found "
                                  f"{[os.path.basename(q) for q in paths]}); shards must be "
                                  "numbered 00, 01, ...")
    return paths


def load_shard(path: str) -> dict[str, torch.Tensor]:
    """Memory-mapped: tensors are read from disk only when merged and converted, one at a time."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:   # a bad file: torch raises several types (UnpicklingError, ...)
        raise CheckpointError(f"{path}: cannot be loaded as a torch checkpoint "
                              f"({type(e).__name__}: {e})") from None


def check_shards_match(paths: list[str], shards: list[dict]) -> None:
    """Shards of one checkpoint share keys and shapes, and replicate the 1-D norms bit for bit."""
    for path, sd in zip(paths[1:], shards[1:]):
        if diff := sorted(set(sd) ^ set(shards[0])):
            raise CheckpointError(f"{path} and {paths[0]} hold different keys (e.g. {diff[:3]}): "
                                  "shards from different checkpoints?")
        for k, a in shards[0].items():
            b = sd[k]
            if a.shape != b.shape or (a.dim() == 1 and not torch.equal(a, b)):
                raise CheckpointError(f"{path}: {k!r} ({tuple(b.shape)}) does not match {paths[0]} "
                                      f"({tuple(a.shape)}): shards from different checkpoints?")


def check_shard_count(paths: list[str], shard: dict[str, torch.Tensor],
                      expected: dict[str, torch.Size]) -> None:
    """A shard missing from the end (consolidated.01.pth of two) leaves no gap in the numbering; the
    shapes tell: the replicated norm is whole while a column-parallel matrix (wq: dim rows in all)
    is split n ways."""
    key = "layers.0.attention.wq.weight"
    if key not in expected or shard["norm.weight"].shape != expected["norm.weight"]:
        return   # no layers, or params.json's dim is not the weights' (merging names the shapes)
    rows, want = shard[key].shape[0], expected[key][0]
    if rows * len(paths) < want and want % rows == 0:
        n = want // rows
        ckpt_dir = os.path.dirname(paths[0])
        absent = ", ".join(f"consolidated.{i:02d}.pth" for i in range(len(paths), n))
        raise CheckpointError(f"{ckpt_dir}: {absent} missing: the weights are split in {n} shards "
                              f"({os.path.basename(paths[0])} holds {rows} of the {want} rows of "
                              f"{key!r} that params.json implies); copy every shard")


_madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None
MADV_DONTNEED = 4  # Linux


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped tensor that has been copied out (Linux; elsewhere
    a no-op).

    The pages are clean, private file pages, so the kernel just forgets them (a later read would
    fault them back in from the file). Without this every page read while loading stays resident
    until the load returns, and peak memory is the checkpoint plus its copy instead of about one
    copy. """
    if _madvise is None or t.numel() == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(MADV_DONTNEED))
