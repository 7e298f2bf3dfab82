"""Processes under torchrun, for train.py and evaluate.py: the one rule for "launched by torchrun"
and the process-group setup both use."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """torchrun sets RANK and WORLD_SIZE, even for one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: a process group (NCCL on CUDA, gloo on CPU) and,
    on CUDA, the GPU of this process's LOCAL_RANK, as Meta's Llama.build does. Alone: rank 0 of
    1."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if under_torchrun() and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device
