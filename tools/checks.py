"""Command-line checks shared by train.py, evaluate.py and llama.py: the range of every numeric flag (one table
per command line, one rule, one message form), whether --device exists on this machine, and whether an output path
can be written. Each fault is a
FlagError (a ValueError) whose message starts with the flag, so each command line prints it as one line."""
import math
import os

import torch

# Ranges in interval notation: "[" / "]" include the bound, "(" / ")" exclude it; "inf" is unbounded. NaN is
# outside every range (it fails every comparison).
SEED = "[0, 4294967295]"   # what every seeded generator (random, torch, numpy) accepts
TRAIN = {
    "val_size": "[0, inf)", "max_len": "[1, inf)", "r": "[1, inf)", "alpha": "(0, inf)", "num_experts": "[1, inf)",
    "dropout": "[0, 1)", "balance_coef": "[0, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]",
    "grad_clip": "[0, inf)", "global_batch": "[1, inf)", "micro_batch": "[1, inf)", "epochs": "[1, inf)",
    "max_steps": "[-1, inf)", "seed": SEED, "pad_to_multiple": "[1, inf)", "peak_tflops": "[0, inf)",
    "eval_every": "[1, inf)", "ckpt_every": "[1, inf)", "keep_ckpts": "[0, inf)", "crash_at_step": "[-1, inf)",
}
EVALUATE = {"limit": "[1, inf)", "batch_size": "[1, inf)", "max_seq_len": "[1, inf)"}   # + --router_layer: the model's
LLAMA = {"max_new_tokens": "[1, inf)", "temperature": "[0, inf)", "top_p": "(0, 1]", "max_seq_len": "[1, inf)",
         "seed": SEED}


class FlagError(ValueError):
    """A flag value that cannot work; the message names the flag."""


def in_range(value: float, interval: str) -> bool:
    """value in an interval written as "[0, 1)", "(0, inf)", ...; False for NaN."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def check_ranges(values: dict, ranges: dict[str, str]) -> None:
    """Every flag of `ranges` whose value is given (not None) must lie in its range: else a FlagError naming it."""
    for name, interval in ranges.items():
        value = values.get(name)
        if value is not None and not in_range(value, interval):
            raise FlagError(f"--{name} must be in {interval}, got {value}")


def check_device(device: str, flag: str = "--device") -> None:
    """A device torch knows and this machine has: `--device cuda` without a GPU is one line, not a traceback
    from deep inside the first .to(device)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FlagError(f"{flag} {device}: not a device name (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlagError(f"{flag} {device}: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                            f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlagError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise FlagError(f"{flag} {device}: only cpu and cuda are supported")


def check_writable(path: str, flag: str, folder: str) -> None:
    """`flag`'s path can be written: the nearest existing part of `folder` (the folder path is created in or is) is
    a folder this user may write in. Checked before data and model are loaded, so a typo costs seconds."""
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise FlagError(f"{path}: cannot write {flag} there: {folder} is a file, not a folder; choose another {flag}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FlagError(f"{path}: cannot write {flag} there: no permission to write in {folder}; choose another "
                        f"{flag}")
