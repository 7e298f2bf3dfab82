"""Instruction tuning of a LLaMA with MoR or a baseline adapter (paper §4.1), on one CPU or many GPUs.

    python train.py                                   # the no-download demo (demo/demo.py; CPU, under a minute)
    python train.py --ckpt_dir llama-2-7b --data tulu_v2.jsonl --method mor --out_dir out/mor_e8r8
    python train.py --resume out/mor_e8r8             # continue a stopped run with its own settings
    torchrun --nproc_per_node=8 train.py --ckpt_dir llama-2-7b --data tulu_v2.jsonl   # DDP, global batch 8
    torchrun --nproc_per_node=8 train.py ... --fsdp   # shard the frozen base (70B)

Every TrainConfig field is a flag (`--lr 1e-4`, `--compile false`, `--no_compile`, `--targets w1 w2 w3`).
`train()` reads top to bottom: setup, then the loop (batch, forward_backward, clip, finite check, step, log, eval,
checkpoint or stop). The run folder (lock, checkpoint files, faults) is tools/run_dir.py; a
checkpoint is written by its write_checkpoint and read back by restore_checkpoint here.

Dtypes on CUDA: the frozen base weights are stored in bf16 (halves memory; they never change, so nothing is
lost after the one rounding), trainable parameters (adapters; everything for --method full) stay fp32
master weights, because an Adam update of lr 2e-4 is below bf16's resolution for most weights and would be
rounded away. The forward runs under bf16 autocast: matmuls in bf16, mor.py casts the small adapter factors
down to the activation dtype, and gradients arrive in the fp32 parameters. On CPU everything is fp32.

The loss of a step is the mean over every supervised token of the global batch (sum of token losses over
all micro-batches and ranks, divided by their total count, which is all-reduced before the backward). So
gradient accumulation and the number of processes change nothing but float summation order.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import mor
from tools import checks
from tools.dist import setup_distributed, under_torchrun
from llama import CheckpointError, Tokenizer, Transformer, check_tokenizer, no_init, tokenizer_path
from tools import run_dir as folder
from tools.run_dir import checkpoints, find_checkpoint, older_checkpoint, read_state, run_dir, write_checkpoint

METHODS = ("mor", "lora", "dora", "moelora", "moslora", "full")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def opt(default, help: str):
    """A config field with its --help text (lists get a fresh default per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # model and data
    ckpt_dir: str = opt("", "Meta checkpoint folder: params.json + consolidated.NN.pth")
    tokenizer: str = opt("", "tokenizer.model (default: in ckpt_dir, else its parent as in LLaMA-2 downloads)")
    data: list = opt([], "training JSONL file(s): Tulu-v2 'messages' or 'prompt'/'completion' lines")
    val_data: list = opt([], "validation JSONL file(s); default: hold out val_size training examples")
    val_size: int = opt(256, "examples held out of the training data for the validation loss (0: none)")
    skip_bad_examples: bool = opt(False, "skip and count bad JSONL lines instead of stopping at the first")
    max_len: int = opt(1024, "truncate examples to this many tokens (paper: 1024)")
    pack: bool = opt(False, "pack several examples into each max_len row")
    out_dir: str = opt("out/run", "checkpoints, adapter.pth and log.jsonl go here (a new folder for a new run)")
    resume: str = opt("", "continue the run in this out_dir (its latest checkpoint) or ckpt_<step> folder, with "
                          "its settings; only --max_steps, --epochs, --lr and system flags may be given anew")
    # adapter (paper §4.1)
    method: str = opt("mor", "mor | lora | dora | moelora | moslora | full (all parameters, no adapter)")
    r: int = opt(8, "LoRA rank r of the shared A, B")
    alpha: float = opt(32.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    num_experts: int = opt(8, "experts N for mor and moelora (the paper's MoELoRA row uses 2)")
    dropout: float = opt(0.05, "dropout on the adapter input")
    router: str = opt("learned", "mor/moelora router: learned | mean | balanced (Table 4)")
    targets: list = opt(["w1", "w2", "w3"], "nn.Linear names to adapt (paper: the FFN's gate, down, up)")
    balance_coef: float = opt(0.01, "weight of the router balance loss when router=balanced")
    # optimisation
    lr: float = opt(2e-4, "peak learning rate (paper: 2e-4); on resume, the new peak from the next step on")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    warmup_ratio: float = opt(0.03, "fraction of steps of linear warmup before the cosine decay")
    min_lr_ratio: float = opt(0.0, "the cosine ends at lr * min_lr_ratio")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    global_batch: int = opt(8, "examples per optimizer step over all processes (paper: 8)")
    micro_batch: int = opt(1, "examples per forward on each process; accumulation fills the global batch")
    epochs: int = opt(2, "passes over the training data (used when max_steps <= 0)")
    max_steps: int = opt(-1, "optimizer steps to run (overrides epochs when > 0); on resume, may extend the run")
    seed: int = opt(42, "seeds data order, adapter init and dropout")
    # system
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    compile: bool = opt(True, "torch.compile every transformer block (CUDA only)")
    compile_mode: str = opt("default", "torch.compile mode: default (until the others are measured on a GPU) | "
                                       "reduce-overhead (CUDA graphs; one static graph per length bucket, see "
                                       "pad_to_multiple) | max-autotune-no-cudagraphs")
    tf32: bool = opt(True, "allow TF32 matmuls on CUDA")
    grad_ckpt: bool = opt(False, "activation checkpointing of every transformer block")
    fsdp: bool = opt(False, "shard the frozen base over processes with FSDP2 (for models beyond one GPU)")
    pad_to_multiple: int = opt(64, "pad batch lengths to a multiple of this: the length buckets (shapes) to compile")
    peak_tflops: float = opt(0.0, "accelerator peak bf16 TFLOP/s for MFU (0: look up H100/H200/A100)")
    # logging and checkpoints
    eval_every: int = opt(200, "steps between validation losses (and at the end)")
    ckpt_every: int = opt(500, "steps between checkpoints (and at the end)")
    keep_ckpts: int = opt(2, "checkpoints kept in out_dir (the newest always; 0: all)")
    progress: bool = opt(True, "show the tqdm bar")
    crash_at_step: int = opt(-1, "testing aid: SIGKILL this process right after this step")


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# torchrun's own parser rejects `--r` after the script name (an ambiguous prefix of its --rdzv-*/--role/...
# flags), so the rank also answers to --lora_r
ALIASES = {"r": ("--lora_r",)}


def parser(defaults: bool = True) -> argparse.ArgumentParser:
    """Every TrainConfig field as --name; booleans also as bare --name / --no_name; lists take several values.
    With defaults=False, only the flags given on the command line appear in the result."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " With no arguments: the demo.")
    for f in fields(TrainConfig):
        d, h = getattr(TrainConfig(), f.name), f.metadata["help"]
        h += f" [default: {' '.join(map(str, d)) if isinstance(d, list) else d}]" if d not in ("", []) else ""
        dflt = d if defaults else argparse.SUPPRESS
        if isinstance(d, bool):
            ap.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=dflt, help=h)
            ap.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=dflt, help=argparse.SUPPRESS)
        elif isinstance(d, list):
            ap.add_argument(f"--{f.name}", nargs="+", default=dflt, help=h + " (space or comma separated)")
        else:
            ap.add_argument(f"--{f.name}", *ALIASES.get(f.name, ()), dest=f.name, type=type(d), default=dflt, help=h)
    return ap


def given_flags(argv: list[str]) -> dict:
    """The settings given on the command line (not defaulted), lists split at commas: "a,b" as well as "a b"."""
    given = vars(parser(defaults=False).parse_args(argv))
    return {k: [x for v in vals for x in str(v).split(",") if x] if isinstance(vals, list) else vals
            for k, vals in given.items()}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config of a command line: defaults, then the given flags."""
    return TrainConfig(**{**vars(parser().parse_args(argv)), **given_flags(argv)})


class ConfigError(ValueError):
    """A flag value that cannot work; the message says which and why."""


def check_config(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.router not in mor.ROUTERS:
        raise ConfigError(f"--router must be one of {', '.join(mor.ROUTERS)}, got {cfg.router!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if not cfg.ckpt_dir or not cfg.data:
        raise ConfigError("--ckpt_dir and --data are required (run `python train.py` alone for the demo)")
    if not os.path.isfile(os.path.join(cfg.ckpt_dir, "params.json")):   # fail before tokenising the data
        raise ConfigError(f"--ckpt_dir {cfg.ckpt_dir}: no params.json (Meta's layout: params.json + "
                          "consolidated.NN.pth)")
    for path in cfg.data + cfg.val_data:
        if not os.path.isfile(path):
            raise ConfigError(f"--data/--val_data: no such file {path}")
        if os.path.getsize(path) == 0:
            raise ConfigError(f"{path}: the file is empty (expected one JSON example per line)")
    try:   # every numeric flag's range, and a --device this machine has
        checks.check_ranges(vars(cfg), checks.TRAIN)
        checks.check_device(cfg.device if cfg.device != "auto" else "cpu")
    except checks.FlagError as e:
        raise ConfigError(str(e)) from None
    if cfg.method != "full" and not cfg.targets:
        raise ConfigError("--targets: no layer name given (e.g. --targets w1 w2 w3)")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"{cfg.out_dir}: --out_dir is a file, not a folder; choose another --out_dir")


# ----------------------------------------------------------------------------- resume and the run folder

# what may differ from the checkpoint's settings on resume: the schedule's length and peak (see lr_lambda), where
# the base now lives, and settings that do not change the math; everything else would be another run
RESUMABLE = ("max_steps", "epochs", "lr", "resume", "out_dir", "ckpt_dir", "tokenizer", "device", "compile",
             "compile_mode", "tf32", "grad_ckpt", "progress", "peak_tflops", "eval_every", "ckpt_every", "keep_ckpts",
             "crash_at_step")


def run_config(resume: str, given: dict) -> TrainConfig:
    """`--resume DIR`: the run's own settings (config.json of its folder), with the flags given now over them."""
    path = os.path.join(run_dir(find_checkpoint(resume)), "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the run's settings ({e})") from None
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.crash_at_step = -1   # a testing aid applies to one launch only
    if "epochs" in given and "max_steps" not in given:
        cfg.max_steps = -1   # a new --epochs sets the run's length
    for k, v in given.items():
        setattr(cfg, k, v)
    cfg.out_dir = given.get("out_dir", run_dir(find_checkpoint(resume)))
    return cfg


def check_resume(cfg: TrainConfig, state: dict, ckpt: str) -> None:
    """The resumed run must be the checkpoint's run: only the RESUMABLE settings may differ from its config."""
    old, flag = state["config"], lambda k: "--r" if k == "r" else f"--{k}"
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)
    diff = [f"{flag(k)} {show(getattr(cfg, k))} (the run has {show(v)})" for k, v in old.items()
            if hasattr(cfg, k) and k not in RESUMABLE and v != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"--resume {cfg.resume}: {', '.join(diff)}: cannot change on resume (only --max_steps, "
                          "--epochs, --lr and system flags can); leave them out, or start a new run in a new --out_dir")
    if os.path.realpath(cfg.out_dir) != os.path.realpath(run_dir(ckpt)):
        raise ConfigError(f"--out_dir {cfg.out_dir}: a resumed run writes into its own folder {run_dir(ckpt)}; "
                          "leave out --out_dir")


def check_out_dir(cfg: TrainConfig) -> None:
    """A new run needs a folder without another run in it: its checkpoints would be mixed with (and rotated
    away by) this run's, and its log rewritten. Checked before anything is written."""
    if cfg.resume or not os.path.isdir(cfg.out_dir):
        return
    ckpts = [name for _, name in checkpoints(cfg.out_dir)] + (["latest"] if os.path.isfile(
        os.path.join(cfg.out_dir, "latest")) else [])
    files = [f for f in ("log.jsonl", "adapter.pth") if os.path.isfile(os.path.join(cfg.out_dir, f))]
    if ckpts:
        raise ConfigError(f"{cfg.out_dir}: --out_dir holds another run's checkpoints ({', '.join(ckpts[-3:])}); "
                          f"continue it with --resume {cfg.out_dir}, or choose a new --out_dir")
    if files:
        raise ConfigError(f"{cfg.out_dir}: --out_dir holds another run's {' and '.join(files)} (no checkpoint to "
                          "resume); choose a new --out_dir")


# ----------------------------------------------------------------------------- distributed (llama.setup_distributed)

def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- model

def adapter_hyper(cfg: TrainConfig) -> dict:
    """The hyper-parameters mor.add_adapters accepts for cfg.method."""
    hyper = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    if cfg.method in ("mor", "moelora"):
        hyper.update(num_experts=cfg.num_experts, router=cfg.router)
    return hyper


def prepare_model(model: Transformer, cfg: TrainConfig) -> None:
    """Add cfg.method's adapters (freezing the base), or make everything trainable for --method full."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        model.adapter_config = {"method": "full"}
        return
    try:
        mor.add_adapters(model, cfg.method, tuple(cfg.targets), **adapter_hyper(cfg))
    except ValueError as e:   # e.g. a name that is no nn.Linear of the model
        raise ConfigError(f"--targets {' '.join(cfg.targets)}: {e}") from None


def cast_for_training(model: torch.nn.Module, base_dtype: torch.dtype) -> None:
    """Frozen parameters to base_dtype, trainable ones to fp32 master weights (see module doc)."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else base_dtype)


def wrap_blocks(model: Transformer, compile: bool, grad_ckpt: bool, mode: str | None = None, buckets: int = 16,
                backend: str = "inductor") -> None:
    """torch.compile (with torch.compile's `mode`) and/or activation checkpointing, per transformer block.

    Per block: the identical blocks share one compiled graph, so compile time does not grow with depth.
    Checkpointing keeps only each block's input and recomputes its inside during the backward (around the
    compiled function, which torch.compile would otherwise not enter). Replacing the instance's forward keeps
    module names, and so state-dict and checkpoint keys, unchanged. mode="reduce-overhead" replays each graph as
    a CUDA graph, which needs static shapes: one graph per padded batch length, `buckets` of them.
    """
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    static = mode == "reduce-overhead"
    if compile and static:   # graphs per bucket: 2 (the first block's input needs no grad) x 2 (train, eval)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * buckets + 2)
    for block in model.layers:
        forward = block.forward
        if compile:
            forward = torch.compile(forward, mode=mode, dynamic=False if static else None, backend=backend)
        if grad_ckpt:
            forward = partial(checkpoint, forward, use_reentrant=False)
        block.forward = forward


def shard_model(model: Transformer, bf16: bool) -> None:
    """FSDP2: shard every block's parameters (frozen base included) over the ranks, then the rest.
    With bf16: all-gathers in bf16, gradients reduced in fp32 (the adapters' master dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def full_state(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP-sharded DTensor) parameter; a collective under FSDP."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def build_model(cfg: TrainConfig, device: torch.device, base_dtype: torch.dtype, adapter: str | None = None
                ) -> Transformer:
    """Meta checkpoint -> model with cfg.method's adapters (seeded by cfg.seed), dtypes set for training, and
    (FSDP's host copy only) the weights of an adapter file."""
    model = Transformer.from_checkpoint(cfg.ckpt_dir, device=device, dtype=base_dtype, max_seq_len=cfg.max_len)
    model.train()
    torch.manual_seed(cfg.seed)
    prepare_model(model, cfg)
    cast_for_training(model, base_dtype)
    if adapter:
        mor.load_adapter(model, adapter)
    return model


def build_sharded(cfg: TrainConfig, adapter: str | None, device: torch.device, base_dtype: torch.dtype,
                  rank: int) -> Transformer:
    """FSDP2 for models that do not fit one GPU: no rank ever holds the whole model on its accelerator.

    Every rank builds the model on `meta` (no memory), adds adapters, and shards it; only rank 0 reads the
    checkpoint (and the resumed adapter) into host memory, and set_model_state_dict scatters each tensor's
    shards from it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full_sd, params = {}, [None]
    if rank == 0:
        host = build_model(cfg, torch.device("cpu"), base_dtype, adapter)
        full_sd, params = host.state_dict(), [host.params]
        del host
    dist.broadcast_object_list(params, src=0)   # vocab_size may come from the weights, not params.json
    with no_init():   # shapes only: the weights come from rank 0 next
        model = Transformer(params[0])
        prepare_model(model, cfg)
    cast_for_training(model, base_dtype)
    wrap_blocks(model, cfg.compile and device.type == "cuda", cfg.grad_ckpt, cfg.compile_mode, buckets(cfg))
    shard_model(model, bf16=device.type == "cuda")
    model.to_empty(device=device)
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for m in model.modules():   # non-persistent buffers are not in state dicts: to_empty left them undefined
        if hasattr(m, "router_sum"):
            m.router_sum.zero_()
            m.router_count.zero_()
    return model


def buckets(cfg: TrainConfig) -> int:
    """How many padded batch lengths (shapes) training can produce."""
    return math.ceil(cfg.max_len / cfg.pad_to_multiple)


def build(cfg: TrainConfig, ckpt: str | None, device: torch.device, rank: int) -> tuple[Transformer, torch.nn.Module]:
    """(raw model, the module to call): fp32 on CPU, bf16 frozen base on CUDA, adapters seeded identically on
    every rank; compiled blocks on CUDA; DDP or FSDP under torchrun."""
    on_cuda = device.type == "cuda"
    base_dtype = torch.bfloat16 if on_cuda else torch.float32
    if cfg.fsdp and not dist.is_initialized():
        raise ConfigError("--fsdp needs torchrun (torchrun --nproc_per_node=N train.py ...)")
    if cfg.fsdp:
        return (raw := build_sharded(cfg, ckpt and os.path.join(ckpt, "adapter.pth"), device, base_dtype, rank)), raw
    raw = build_model(cfg, device, base_dtype)
    wrap_blocks(raw, cfg.compile and on_cuda, cfg.grad_ckpt, cfg.compile_mode, buckets(cfg))
    if not dist.is_initialized():
        return raw, raw
    from torch.nn.parallel import DistributedDataParallel as DDP
    return raw, DDP(raw, device_ids=[device.index] if on_cuda else None)   # syncs only requires_grad params


# ----------------------------------------------------------------------------- loss and step

def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions: logits at t predict labels at t + 1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=data.IGNORE_INDEX, reduction="sum")


def count_targets(micro_batches: list[dict]) -> int:
    return sum(int((mb["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for mb in micro_batches)


def forward_backward(model: torch.nn.Module, micro_batches: list[dict], device: torch.device,
                     world_size: int = 1, balance_coef: float = 0.0, raw: torch.nn.Module | None = None,
                     autocast: bool = False) -> tuple[float, int]:
    """Accumulate the gradients of one optimizer step; returns (global mean token loss, global target count).

    Each micro-batch contributes sum(token losses) / N_global, N_global = supervised tokens of the whole
    global batch. DDP and FSDP average gradients over ranks, hence the factor world_size. Gradients are
    synchronised only on the last micro-batch. Gradients accumulate in place into .grad buffers made here,
    outside any backward: under CUDA graphs (--compile_mode reduce-overhead) a compiled backward's outputs live
    in the graph's memory pool, which the next micro-batch's replay overwrites, so a .grad taken over from the
    first backward would be overwritten too. Zero them with zero_grad(set_to_none=False) to keep them.
    """
    raw = raw if raw is not None else model
    for p in raw.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    n_global = int(all_reduce(torch.tensor(count_targets(micro_batches), device=device)))
    loss_total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if hasattr(model, "require_backward_grad_sync"):       # DDP (possibly compiled)
            model.require_backward_grad_sync = last
        if hasattr(raw, "set_requires_gradient_sync"):          # FSDP2
            raw.set_requires_gradient_sync(last)
        input_ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_sum = lm_loss_sum(model(input_ids), labels)
            loss = loss_sum * (world_size / max(n_global, 1))
            if balance_coef:
                loss = loss + balance_coef * mor.balance_loss(raw) / len(micro_batches)
        loss.backward()
        loss_total += loss_sum.detach()
    return float(all_reduce(loss_total)) / max(n_global, 1), n_global


@torch.no_grad()
def validation_loss(model: torch.nn.Module, examples: list, micro_batch: int, device: torch.device, pad_id: int,
                    rank: int = 0, world_size: int = 1, autocast: bool = False, pad_to_multiple: int = 1) -> float:
    """Mean token loss over the validation examples. Each round of micro_batch * world_size examples is
    split over the ranks; a rank whose share of the last round is empty still runs a forward (on a stand-in,
    not counted), because FSDP needs every rank in every forward. Lengths are padded as in training (the
    compiled shapes)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    per_round = micro_batch * world_size
    for j in range(0, len(examples), per_round):
        mine = examples[j:j + per_round][rank * micro_batch:(rank + 1) * micro_batch]
        mb = data.collate(mine or examples[:1], pad_id, pad_to_multiple)
        labels = mb["labels"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_sum = lm_loss_sum(model(mb["input_ids"].to(device)), labels).double()
        if mine:
            total[0] += loss_sum
            total[1] += (labels[:, 1:] != data.IGNORE_INDEX).sum()
    model.train(was_training)
    all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------- learning-rate schedule

def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, start: int = 0, start_mult: float = 1.0,
              rewarm: int = 0, before: dict | None = None) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine decay that would
    reach min_ratio at step `total` (so no step runs at the final lr).

    A run whose length changed on resume at step `start` keeps its earlier steps' multipliers (`before`, the
    plan it had) and from `start` on:
    - stopped before its end (rewarm 0): continues from start_mult, the multiplier of its last step, with a
      cosine from there down to min_ratio over the new remaining steps: no jump, and no step at the final lr;
    - finished and extended (rewarm > 0): a warmup of `rewarm` steps from start_mult (the last step's lr) up to
      1, then a cosine from 1 down to min_ratio, laid out as a new run's over the added steps.
    Resumed within the warmup, and still longer than it, the warmup goes on and the cosine is laid out for the
    new length (start 0).
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


def plan_schedule(cfg: TrainConfig, total: int, step: int = 0, saved: dict | None = None,
                  lr_was: float | None = None) -> dict:
    """lr_lambda's arguments (but min_ratio): a new run's, a resumed run's as saved, or re-fit to a new length.
    lr_was: the peak the saved plan ran at (the checkpoint's --lr), so an extension warms up from the lr the
    run really ended at even under a new --lr."""
    if saved is None:
        return {"warmup": round(cfg.warmup_ratio * total), "total": total, "start": 0, "start_mult": 1.0}
    if saved["total"] == total:
        return saved
    if step <= saved["warmup"] < total and not saved["start"]:
        return dict(saved, total=total)
    last = lr_lambda(step - 1, min_ratio=cfg.min_lr_ratio, **saved)
    if saved["total"] <= step < total:   # a finished run made longer: the added steps warm up again
        return dict(saved, total=total, start=step, start_mult=last * (lr_was or cfg.lr) / cfg.lr,
                    rewarm=max(1, round(cfg.warmup_ratio * (total - step))), before=saved)
    return dict(saved, total=total, start=step, start_mult=last, rewarm=0, before=saved)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, schedule: dict, step: int):
    """LambdaLR at `step`: the lr of the next step is cfg.lr (on resume: a new --lr applies) × its multiplier."""
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, min_ratio=cfg.min_lr_ratio, **schedule), last_epoch=step - 1)


# ----------------------------------------------------------------------------- logging

def flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Training FLOPs per token: 2N forward + 2N input gradients + 2N_trainable weight gradients (frozen
    weights need none), plus attention 12·L·d·T as in PaLM's MFU. N excludes the embedding lookup."""
    n = sum(p.numel() for name, p in model.named_parameters() if "tok_embeddings" not in name)
    n_train = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "tok_embeddings" not in name)
    L, d = model.params.n_layers, model.params.dim
    return 4 * n + 2 * n_train + 12 * L * d * seq_len


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """Dense bf16 peak of one accelerator (0 when unknown, and MFU is not shown)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("H800", 989),
                        ("GH200", 989), ("A100", 312), ("A800", 312), ("L40S", 362)):
        if key in name:
            return tflops * 1e12
    return 0.0


class StepLog:
    """What a run writes besides checkpoints: config.json (its settings, read by --resume), log.jsonl (one record
    per step), the tqdm bar, and the tokens/s and MFU arithmetic. Rank 0 writes."""

    def __init__(self, cfg: TrainConfig, raw: torch.nn.Module, device: torch.device, world: int, rank: int,
                 total: int, step: int, tokens_seen: int):
        from tqdm import tqdm
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
        self.path, self.raw, self.device, self.rank = os.path.join(cfg.out_dir, "log.jsonl"), raw, device, rank
        self.peak = peak_flops(device, cfg.peak_tflops) * world
        self.tokens_seen, self.val_loss = tokens_seen, None
        self.bar = tqdm(total=total, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True,
                        desc=cfg.method)

    def step(self, step: int, micro_batches: list[dict], dt: float, loss: float, lr: float, grad_norm: float,
             targets: int, val_loss: float | None) -> None:
        lengths = [mb["lengths"] for mb in micro_batches]
        n_tok = int(all_reduce(torch.tensor(sum(int(n.sum()) for n in lengths), device=self.device)))
        self.tokens_seen += n_tok
        seq = sum(float((n.float() ** 2).sum()) for n in lengths) / max(1, sum(int(n.sum()) for n in lengths))
        mfu = n_tok * flops_per_token(self.raw, seq) / dt / self.peak if self.peak else None   # seq: token-weighted
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
               "targets": targets, "tok_per_s": n_tok / dt, "step_s": dt}
        if mfu is not None:
            rec["mfu"] = mfu
        if val_loss is not None:
            self.val_loss = rec["val_loss"] = val_loss
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            post = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{n_tok / dt:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            if self.val_loss is not None:
                post["val"] = f"{self.val_loss:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- checkpoints

def restore_checkpoint(ckpt: str, state: dict, cfg: TrainConfig, raw: torch.nn.Module, optimizer,
                       loader: data.Loader, total: int, rank: int, world: int) -> tuple[int, int, dict]:
    """Everything write_checkpoint wrote, back in place: adapter (or full) weights, optimizer, lr schedule (re-fit
    when the run's length changed), data position, RNG streams, and log.jsonl cut after the checkpoint's step.
    Returns (step, tokens_seen, schedule). Under FSDP the adapter came in with the model (build_sharded)."""
    step = state["step"]
    if not cfg.fsdp:
        try:
            mor.load_adapter(raw, os.path.join(ckpt, "adapter.pth"))
        except ValueError as e:   # truncated or overwritten: offer the checkpoint before it
            raise CheckpointError(f"{e}; {older_checkpoint(ckpt)}") from None
    optimizer.load_state_dict(folder.load(os.path.join(ckpt, f"optim_{rank}.pt"), ckpt) if cfg.fsdp
                              else state["optimizer"])
    try:
        loader.load_state_dict(state["loader"])
    except data.DataError as e:
        raise ConfigError(f"--resume {ckpt}: {e}: the --data files changed since this checkpoint") from None
    if not folder.restore_rng(ckpt, rank, state["world_size"] == world):   # continue each rank's dropout exactly
        torch.manual_seed(cfg.seed + 1000 * rank + step)   # another number of processes: fresh dropout streams
    if rank == 0:
        folder.trim_log(cfg.out_dir, step)   # the steps after the checkpoint run again
    old = state["config"]   # checkpoints written before the schedule was saved: their run's plan
    saved = state.get("schedule") or plan_schedule(cfg, old["max_steps"] if old["max_steps"] > 0 else
                                                   old["epochs"] * loader.steps_per_epoch)
    return step, state.get("tokens_seen", 0), plan_schedule(cfg, total, step, saved, old["lr"])


# ----------------------------------------------------------------------------- training

class Stop(Exception):
    """Training stopped on a non-finite loss or gradient; the message says where the good checkpoint is."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextmanager
def stop_signals():
    """SIGINT and SIGTERM append to the yielded list instead of killing: the loop finishes its step first."""
    seen = []
    handlers = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def load_data(cfg: TrainConfig, tokenizer: Tokenizer, rank: int) -> tuple[list, list, dict]:
    """Training and validation examples (tokenised) and the data statistics to report."""
    train, stats = data.load_dataset(cfg.data, tokenizer, cfg.max_len, cfg.skip_bad_examples,
                                     progress=rank == 0 and cfg.progress)
    if not train:
        raise ConfigError(f"{', '.join(cfg.data)}: no training examples in --data (every line bad or empty?)")
    if cfg.val_data:
        val, vstats = data.load_dataset(cfg.val_data, tokenizer, cfg.max_len, cfg.skip_bad_examples)
        stats["n_bad"] += vstats["n_bad"]
    elif 0 < cfg.val_size and cfg.val_size + cfg.global_batch <= len(train):
        held = set(random.Random(cfg.seed).sample(range(len(train)), cfg.val_size))
        val = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    else:
        if cfg.val_size > 0 and rank == 0:   # too few to hold out: say so rather than silently validate nothing
            print(f"warning: --val_size {cfg.val_size} would leave fewer than --global_batch {cfg.global_batch} of the "
                  f"{len(train)} examples to train on: no validation loss (give a smaller --val_size, or --val_data)",
                  file=sys.stderr)
        val = []
    if cfg.pack:
        random.Random(cfg.seed).shuffle(train)   # mix sources before packing neighbours together
        train = data.pack(train, cfg.max_len)
    return train, val, stats


def finished(cfg: TrainConfig, state: dict | None, total: int, rank: int) -> bool:
    """A resumed run that has done its steps and written its adapter: says so (nothing is written)."""
    done = state is not None and state["step"] >= total and os.path.isfile(os.path.join(cfg.out_dir, "adapter.pth"))
    if done:
        log(rank, f"{cfg.out_dir}: nothing left to do: the run is at step {state['step']} of {total} (a larger "
                  "--max_steps or --epochs trains further)")
    return done


def train(cfg: TrainConfig) -> torch.nn.Module | None:
    """Run training as configured; returns the trained (unwrapped) model, or None when a resumed run had
    nothing left to do. See the module doc."""
    check_config(cfg)
    folder.check_writable(cfg.out_dir)   # before data and model are loaded
    with folder.lock(cfg.out_dir, int(os.environ.get("RANK", 0))):   # one run per folder, held by every rank
        return train_locked(cfg)


def train_locked(cfg: TrainConfig) -> torch.nn.Module | None:
    """train() once this process holds the run folder."""
    ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
    state = read_state(ckpt) if ckpt else None
    if ckpt:   # nothing is written before these checks
        check_resume(cfg, state, ckpt)
    check_out_dir(cfg)
    rank, world, device = setup_distributed(cuda=cfg.device == "cuda" or (cfg.device == "auto" and
                                                                          torch.cuda.is_available()))
    on_cuda = device.type == "cuda"
    if on_cuda and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = Tokenizer(tok_path := tokenizer_path(cfg.ckpt_dir, cfg.tokenizer))
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id   # LLaMA has no pad token
    train_ex, val_ex, stats = load_data(cfg, tokenizer, rank)
    loader = data.Loader(train_ex, cfg.global_batch, cfg.micro_batch, cfg.seed, rank, world, pad_id,
                         cfg.pad_to_multiple)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * loader.steps_per_epoch
    if finished(cfg, state, total_steps, rank):
        return None
    raw, model = build(cfg, ckpt, device, rank)
    check_tokenizer(tok_path, raw.params.vocab_size)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=on_cuda and not cfg.fsdp)   # FSDP's sharded params: default foreach
    if ckpt:
        step, tokens_seen, schedule = restore_checkpoint(ckpt, state, cfg, raw, optimizer, loader, total_steps,
                                                         rank, world)
        log(rank, f"resumed from {ckpt} at step {step}")
    else:
        step, tokens_seen, schedule = 0, 0, plan_schedule(cfg, total_steps)
        torch.manual_seed(cfg.seed + 1000 * rank)   # different dropout masks on different ranks
    scheduler = make_scheduler(optimizer, cfg, schedule, step)
    n_train, n_total = mor.count_parameters(raw)
    log(rank, f"{cfg.method}: {n_train:,} trainable of {n_total:,} parameters | {len(train_ex)} train, "
              f"{len(val_ex)} val examples | {world} process(es) x {loader.accum_steps} micro-batch(es) of "
              f"{cfg.micro_batch} = global batch {cfg.global_batch} | {total_steps} steps | {device}")
    balance = cfg.balance_coef if cfg.router == "balanced" and cfg.method in ("mor", "moelora") else 0.0
    last_ckpt, steplog = ckpt, StepLog(cfg, raw, device, world, rank, total_steps, step, tokens_seen)
    with stop_signals() as signalled, closing(steplog):
        while step < total_steps:
            t0 = time.time()
            micro_batches = loader.next_step()
            loss, n_tgt = forward_backward(model, micro_batches, device, world, balance, raw, autocast=on_cuda)
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")   # the norm is logged either way
            grad_norm = float(full_state(torch.nn.utils.clip_grad_norm_(params, clip)))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):   # stop before the update spoils weights
                raise Stop(f"step {step + 1}: loss {loss}, gradient norm {grad_norm} is not finite; stopped "
                           f"before updating. Last good checkpoint: {last_ckpt or 'none yet'} (resume from it "
                           f"with --resume {cfg.out_dir}, e.g. with a lower --lr)")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=False)   # the .grad buffers stay: see forward_backward
            step += 1
            if on_cuda:
                torch.cuda.synchronize()   # time the step, not its kernel launches
            dt = time.time() - t0
            due = val_ex and (step % cfg.eval_every == 0 or step == total_steps)
            val_loss = validation_loss(model, val_ex, cfg.micro_batch, device, pad_id, rank, world, on_cuda,
                                       cfg.pad_to_multiple) if due else None
            steplog.step(step, micro_batches, dt, loss, lr, grad_norm, n_tgt, val_loss)
            # every rank must stop at the same step: a signal seen by any rank stops all
            stopping = bool(all_reduce(torch.tensor(len(signalled), device=device), dist.ReduceOp.MAX))
            if step % cfg.ckpt_every == 0 or step == total_steps or stopping:
                last_ckpt = write_checkpoint(cfg.out_dir, step, raw, optimizer, loader, cfg, rank, world,
                                             {"tokens_seen": steplog.tokens_seen, "schedule": schedule})
            if step == cfg.crash_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                raise Interrupted(f"stopped by signal at step {step}; checkpoint {last_ckpt}; continue with "
                                  f"--resume {cfg.out_dir}", (signalled or [signal.SIGTERM])[0])
    folder.save_adapter(raw, cfg.out_dir, rank)
    log(rank, f"done: {step} steps, adapter in {os.path.join(cfg.out_dir, 'adapter.pth')}"
              + (f", val loss {steplog.val_loss:.4f}" if steplog.val_loss is not None else ""))
    log(rank, f"data: {stats['n_bad']} bad line(s) skipped, {stats['n_dropped_empty']} example(s) dropped "
              f"(nothing to learn after truncation to {cfg.max_len}), {stats['n_truncated']} truncated")
    return raw


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv and under_torchrun():   # N processes would each run the demo into the same folder
        if os.environ.get("RANK") == "0":
            print("error: the demo runs in one process: start it with `python train.py` (torchrun is for runs "
                  "with --ckpt_dir and --data)", file=sys.stderr)
        sys.exit(1)
    if not argv:
        from demo.demo import main as demo   # the demo lives in demo/, outside the trainer
        return demo()
    try:
        given = given_flags(argv)
        train(run_config(given["resume"], given) if given.get("resume") else parse_args(argv))
    except Interrupted as e:   # the checkpoint is written: a clean stop
        log(int(os.environ.get("RANK", 0)), str(e))
    except (data.DataError, ConfigError, CheckpointError, Stop, FileNotFoundError) as e:   # bad input: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:   # Ctrl-C outside a training step (loading, the final save): files are whole
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
