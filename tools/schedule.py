"""train.py's learning-rate schedule (paper §4.1: linear warmup, then cosine decay) and how it is
re-fit when a resumed run's length or peak changes, so that no step's lr jumps."""
from __future__ import annotations

import math

import torch


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, start: int = 0,
              start_mult: float = 1.0, rewarm: int = 0, before: dict | None = None) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine
    decay that would reach min_ratio at step `total` (so no step runs at the final lr).

    A run whose length changed on resume at step `start` keeps its earlier steps' multipliers
    (`before`, the plan it had) and from `start` on:
    - stopped before its end (rewarm 0): continues from start_mult, the multiplier of its last step,
      with a cosine from there down to min_ratio over the new remaining steps: no jump, and no step
      at the final lr;
    - finished and extended (rewarm > 0): a warmup of `rewarm` steps from start_mult (the last
      step's lr) up to 1, then a cosine from 1 down to min_ratio, laid out as a new run's over the
      added steps. Resumed within the warmup, and still longer than it, the warmup goes on and the
      cosine is laid out for the new length (start 0).
    """
    if before is not None and step < start:
        return lr_lambda(step, min_ratio=min_ratio, **before)
    if start and rewarm:
        if step - start < rewarm:
            return start_mult + (1 - start_mult) * (step - start + 1) / rewarm
        progress, top = min(1.0, (step - start - rewarm) / max(1, total - start - rewarm)), 1.0
    elif start:
        progress, top = (step - start + 1) / (total - start + 1), start_mult
    elif step < warmup:
        return (step + 1) / warmup
    else:
        progress, top = min(1.0, (step - warmup) / max(1, total - warmup)), 1.0
    return min_ratio + (top - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def plan_schedule(cfg, total: int, step: int = 0, saved: dict | None = None,
                  lr_was: float | None = None) -> dict:
    """lr_lambda's arguments (but min_ratio): a new run's, a resumed run's as saved, or re-fit to a
    new length. lr_was: the peak the saved plan ran at (the checkpoint's --lr), so an extension
    warms up from the lr the run really ended at even under a new --lr."""
    if saved is None:
        warmup = round(cfg.warmup_ratio * total)
        return {"warmup": warmup, "total": total, "start": 0, "start_mult": 1.0}
    if saved["total"] == total or step >= total:   # (past the new end: no step runs, nothing to re-fit)
        return saved
    if step <= saved["warmup"] < total and not saved["start"]:
        return dict(saved, total=total)
    last = lr_lambda(step - 1, min_ratio=cfg.min_lr_ratio, **saved)
    if saved["total"] <= step < total:   # a finished run made longer: the added steps warm up again
        return dict(saved, total=total, start=step, start_mult=last * (lr_was or cfg.lr) / cfg.lr,
                    rewarm=max(1, round(cfg.warmup_ratio * (total - step))), before=saved)
    return dict(saved, total=total, start=step, start_mult=last, rewarm=0, before=saved)


def resumed_schedule(cfg, state: dict, steps_per_epoch: int, total: int) -> dict:
    """A checkpoint's schedule re-fit to the run's length now (checkpoints written before the
    schedule was saved: their run's plan)."""
    old = state["config"]
    old_total = old["max_steps"] if old["max_steps"] > 0 else old["epochs"] * steps_per_epoch
    saved = state.get("schedule") or plan_schedule(cfg, old_total)
    return plan_schedule(cfg, total, state["step"], saved, old["lr"])


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, schedule: dict, step: int):
    """LambdaLR at `step`: the next step's lr is cfg.lr (on resume: a new --lr applies) × its
    multiplier."""
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr
    multiplier = lambda s: lr_lambda(s, min_ratio=cfg.min_lr_ratio, **schedule)   # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier, last_epoch=step - 1)
