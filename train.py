"""Instruction tuning of a LLaMA with MoR or a baseline adapter (paper §4.1), on one CPU or many GPUs.

    python train.py                                   # the no-download demo (CPU, about two minutes)
    python train.py --ckpt_dir llama-2-7b --data tulu_v2.jsonl --method mor --out_dir out/mor_e8r8
    torchrun --nproc_per_node=8 train.py --ckpt_dir llama-2-7b --data tulu_v2.jsonl   # DDP, global batch 8
    torchrun --nproc_per_node=8 train.py ... --fsdp   # shard the frozen base (70B)

Every TrainConfig field is a flag (`--lr 1e-4`, `--compile false`, `--no_compile`, `--targets w1 w2 w3`).

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
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import mor
from llama import CheckpointError, ModelArgs, Tokenizer, Transformer, check_tokenizer, tokenizer_path

METHODS = ("mor", "lora", "dora", "moelora", "moslora", "full")


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
    out_dir: str = opt("out/run", "checkpoints, adapter.pth and log.jsonl go here")
    resume: str = opt("", "continue exactly from this out_dir (its latest checkpoint) or checkpoint folder")
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
    lr: float = opt(2e-4, "peak learning rate (paper: 2e-4)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    warmup_ratio: float = opt(0.03, "fraction of steps of linear warmup before the cosine decay")
    min_lr_ratio: float = opt(0.0, "the cosine ends at lr * min_lr_ratio")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    global_batch: int = opt(8, "examples per optimizer step over all processes (paper: 8)")
    micro_batch: int = opt(1, "examples per forward on each process; accumulation fills the global batch")
    epochs: int = opt(2, "passes over the training data (used when max_steps <= 0)")
    max_steps: int = opt(-1, "optimizer steps to run (overrides epochs when > 0)")
    seed: int = opt(42, "seeds data order, adapter init and dropout")
    # system
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    compile: bool = opt(True, "torch.compile the model (CUDA only)")
    tf32: bool = opt(True, "allow TF32 matmuls on CUDA")
    grad_ckpt: bool = opt(False, "activation checkpointing of every transformer block")
    fsdp: bool = opt(False, "shard the frozen base over processes with FSDP2 (for models beyond one GPU)")
    pad_to_multiple: int = opt(64, "pad batch lengths to a multiple of this (fewer shapes to compile)")
    peak_tflops: float = opt(0.0, "accelerator peak bf16 TFLOP/s for MFU (0: look up H100/H200/A100)")
    # logging and checkpoints
    eval_every: int = opt(200, "steps between validation losses (and at the end)")
    ckpt_every: int = opt(500, "steps between checkpoints (and at the end)")
    keep_ckpts: int = opt(2, "checkpoints kept in out_dir")
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


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Every TrainConfig field as --name; booleans also as bare --name / --no_name; lists take several values."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " With no arguments: the demo.")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        d, h = getattr(defaults, f.name), f.metadata["help"]
        h += f" [default: {' '.join(map(str, d)) if isinstance(d, list) else d}]" if d not in ("", []) else ""
        if isinstance(d, bool):
            ap.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=d, help=h)
            ap.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif isinstance(d, list):
            ap.add_argument(f"--{f.name}", nargs="+", default=d, help=h + " (space or comma separated)")
        else:
            ap.add_argument(f"--{f.name}", *ALIASES.get(f.name, ()), dest=f.name, type=type(d), default=d, help=h)
    cfg = TrainConfig(**vars(ap.parse_args(argv)))
    for name in ("data", "val_data", "targets"):   # accept "a,b" as well as "a b"
        setattr(cfg, name, [x for v in getattr(cfg, name) for x in str(v).split(",") if x])
    return cfg


class ConfigError(ValueError):
    """A flag value that cannot work; the message says which and why."""


def check_config(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.router not in mor.ROUTERS:
        raise ConfigError(f"--router must be one of {', '.join(mor.ROUTERS)}, got {cfg.router!r}")
    if not cfg.ckpt_dir or not cfg.data:
        raise ConfigError("--ckpt_dir and --data are required (run `python train.py` alone for the demo)")
    if not os.path.isfile(os.path.join(cfg.ckpt_dir, "params.json")):   # fail before tokenising the data
        raise ConfigError(f"--ckpt_dir {cfg.ckpt_dir}: no params.json (Meta's layout: params.json + "
                          "consolidated.NN.pth)")
    for path in cfg.data + cfg.val_data:
        if not os.path.isfile(path):
            raise ConfigError(f"--data/--val_data: no such file {path}")
    for name in ("r", "num_experts", "max_len", "global_batch", "micro_batch", "eval_every", "ckpt_every",
                 "pad_to_multiple"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(cfg, name)}")


RESUME_KEYS = ("method", "r", "alpha", "num_experts", "router", "targets")   # what shapes the trained weights


def check_resume(cfg: TrainConfig, state: dict, ckpt: str) -> None:
    """The run being resumed must build the adapter the checkpoint holds (else its weights would not load, or
    would mean something else)."""
    old = state["config"]
    diff = [f"--{k} {old.get(k)!r} there, {getattr(cfg, k)!r} here" for k in RESUME_KEYS
            if old.get(k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"--resume {ckpt}: the checkpoint was trained with other adapter settings: "
                          + "; ".join(diff))


# ----------------------------------------------------------------------------- distributed

def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU; one GPU per local rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():   # launched by torchrun (even with 1 process)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return rank, world, device


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    else:
        mor.add_adapters(model, cfg.method, tuple(cfg.targets), **adapter_hyper(cfg))


def cast_for_training(model: torch.nn.Module, base_dtype: torch.dtype) -> None:
    """Frozen parameters to base_dtype, trainable ones to fp32 master weights (see module doc)."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else base_dtype)


def wrap_blocks(model: Transformer, compile: bool, grad_ckpt: bool, mode: str | None = None) -> None:
    """torch.compile (with torch.compile's `mode`) and/or activation checkpointing, per transformer block.

    Per block: the identical blocks share one compiled graph, so compile time does not grow with depth.
    Checkpointing keeps only each block's input and recomputes its inside during the backward (around the
    compiled function, which torch.compile would otherwise not enter). Replacing the instance's forward keeps
    module names, and so state-dict and checkpoint keys, unchanged.
    """
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for block in model.layers:
        forward = block.forward
        if compile:
            forward = torch.compile(forward, mode=mode)
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


def adapter_payload(model: torch.nn.Module) -> dict:
    """What mor.save_adapter writes, {"config", "state_dict"}, gathered from FSDP shards if needed."""
    sd = model.state_dict() if model.adapter_config["method"] == "full" else mor.adapter_state_dict(model)
    return {"config": dict(model.adapter_config), "state_dict": {k: full_state(v) for k, v in sd.items()}}


def build_model(cfg: TrainConfig, ckpt: str | None, device: torch.device, base_dtype: torch.dtype) -> Transformer:
    """Meta checkpoint -> model with cfg.method's adapters (seeded by cfg.seed), dtypes set for training, and
    the adapter (or full) weights of the checkpoint being resumed."""
    model = Transformer.from_checkpoint(cfg.ckpt_dir, device=device, dtype=base_dtype, max_seq_len=cfg.max_len)
    torch.manual_seed(cfg.seed)
    prepare_model(model, cfg)
    cast_for_training(model, base_dtype)
    if ckpt:
        resumed = torch.load(os.path.join(ckpt, "adapter.pth"), map_location="cpu", weights_only=True)
        if cfg.method == "full":
            model.load_state_dict(resumed["state_dict"])
        else:
            mor.load_adapter_state_dict(model, resumed["state_dict"])
    return model


def build_sharded(cfg: TrainConfig, ckpt: str | None, device: torch.device, base_dtype: torch.dtype,
                  rank: int) -> Transformer:
    """FSDP2 for models that do not fit one GPU: no rank ever holds the whole model on its accelerator.

    Every rank builds the model on `meta` (no memory), adds adapters, and shards it; only rank 0 reads the
    checkpoint, into host memory, and set_model_state_dict scatters each tensor's shards from it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full_sd, params = {}, [None]
    if rank == 0:
        host = build_model(cfg, ckpt, torch.device("cpu"), base_dtype)
        full_sd, params = host.state_dict(), [host.params]
        del host
    dist.broadcast_object_list(params, src=0)   # vocab_size may come from the weights, not params.json
    with torch.device("meta"):
        model = Transformer(params[0])
        prepare_model(model, cfg)
    cast_for_training(model, base_dtype)
    wrap_blocks(model, compile=cfg.compile and device.type == "cuda", grad_ckpt=cfg.grad_ckpt)
    shard_model(model, bf16=device.type == "cuda")
    model.to_empty(device=device)
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for m in model.modules():   # non-persistent buffers are not in state dicts: to_empty left them undefined
        if hasattr(m, "router_sum"):
            m.router_sum.zero_()
    return model


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
    synchronised only on the last micro-batch.
    """
    raw = raw if raw is not None else model
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
                    rank: int = 0, world_size: int = 1, autocast: bool = False) -> float:
    """Mean token loss over the validation examples. Each round of micro_batch * world_size examples is
    split over the ranks; a rank whose share of the last round is empty still runs a forward (on a stand-in,
    not counted), because FSDP needs every rank in every forward."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    per_round = micro_batch * world_size
    for j in range(0, len(examples), per_round):
        mine = examples[j:j + per_round][rank * micro_batch:(rank + 1) * micro_batch]
        mb = data.collate(mine or examples[:1], pad_id)
        labels = mb["labels"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_sum = lm_loss_sum(model(mb["input_ids"].to(device)), labels).double()
        if mine:
            total[0] += loss_sum
            total[1] += (labels[:, 1:] != data.IGNORE_INDEX).sum()
    model.train(was_training)
    all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


# ----------------------------------------------------------------------------- checkpoints

def write_checkpoint(out_dir: str, step: int, raw: torch.nn.Module, optimizer, scheduler, loader: data.Loader,
                     cfg: TrainConfig, rank: int, world: int, extra: dict) -> str:
    """Write out_dir/ckpt_<step>/ atomically: everything goes to a temp folder that is renamed once complete,
    then the `latest` pointer is replaced (os.replace), then old checkpoints are deleted. A kill at any
    moment leaves `latest` naming a complete checkpoint.

    adapter.pth (mor.save_adapter's format; adapters only), state.pt (optimizer, scheduler, step, data
    position, config), rng_<rank>.pt (each rank's RNG states; dropout differs per rank), and under FSDP
    optim_<rank>.pt (each rank's optimizer shard).
    """
    final = os.path.join(out_dir, f"ckpt_{step:08d}")
    tmp = final + ".tmp"
    payload = adapter_payload(raw)   # collective under FSDP: every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(payload, os.path.join(tmp, "adapter.pth"))
        torch.save({"step": step, "config": dataclasses.asdict(cfg), "scheduler": scheduler.state_dict(),
                    "loader": loader.state_dict(), "world_size": world, **extra,
                    "optimizer": None if cfg.fsdp else optimizer.state_dict()}, os.path.join(tmp, "state.pt"))
    barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    torch.save(rng, os.path.join(tmp, f"rng_{rank}.pt"))
    if cfg.fsdp:
        torch.save(optimizer.state_dict(), os.path.join(tmp, f"optim_{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        old = sorted(d for d in os.listdir(out_dir) if d.startswith("ckpt_") and not d.endswith(".tmp"))
        for d in old[:-cfg.keep_ckpts] if cfg.keep_ckpts > 0 else []:
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    barrier()
    return final


def find_checkpoint(path: str) -> str:
    """A checkpoint folder from --resume: an out_dir (its `latest`) or a ckpt_<step> folder itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (expected `latest` or state.pt)")
    return path


def save_final_adapter(raw: torch.nn.Module, path: str, rank: int) -> None:
    """mor.save_adapter's file, written atomically (temp file + os.replace)."""
    payload = adapter_payload(raw)
    if rank == 0:
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- training

class Stop(Exception):
    """Training stopped on a non-finite loss or gradient; the message says where the good checkpoint is."""


def log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def load_data(cfg: TrainConfig, tokenizer: Tokenizer, rank: int) -> tuple[list, list, dict]:
    """Training and validation examples (tokenised) and the data statistics to report."""
    train, stats = data.load_dataset(cfg.data, tokenizer, cfg.max_len, cfg.skip_bad_examples,
                                     progress=rank == 0 and cfg.progress)
    if cfg.val_data:
        val, vstats = data.load_dataset(cfg.val_data, tokenizer, cfg.max_len, cfg.skip_bad_examples)
        stats["n_bad"] += vstats["n_bad"]
    elif 0 < cfg.val_size and cfg.val_size + cfg.global_batch <= len(train):
        held = set(random.Random(cfg.seed).sample(range(len(train)), cfg.val_size))
        val = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    else:
        val = []
    if cfg.pack:
        random.Random(cfg.seed).shuffle(train)   # mix sources before packing neighbours together
        train = data.pack(train, cfg.max_len)
    return train, val, stats


def train(cfg: TrainConfig) -> torch.nn.Module:
    """Run training as configured; returns the trained (unwrapped) model. See the module doc."""
    check_config(cfg)
    rank, world, device = setup_distributed(cfg)
    on_cuda = device.type == "cuda"
    if on_cuda and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
    state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False) if ckpt else None
    if state:
        check_resume(cfg, state, ckpt)

    tok_path = tokenizer_path(cfg.ckpt_dir, cfg.tokenizer)
    tokenizer = Tokenizer(tok_path)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id   # LLaMA has no pad token
    train_ex, val_ex, stats = load_data(cfg, tokenizer, rank)
    loader = data.Loader(train_ex, cfg.global_batch, cfg.micro_batch, cfg.seed, rank, world, pad_id,
                         cfg.pad_to_multiple)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * loader.steps_per_epoch
    warmup = round(cfg.warmup_ratio * total_steps)

    # model: fp32 on CPU, bf16 frozen base on CUDA; adapters seeded identically on every rank
    base_dtype = torch.bfloat16 if on_cuda else torch.float32
    if cfg.fsdp and not dist.is_initialized():
        raise ConfigError("--fsdp needs torchrun (torchrun --nproc_per_node=N train.py ...)")
    if cfg.fsdp:
        raw = build_sharded(cfg, ckpt, device, base_dtype, rank)
    else:
        raw = build_model(cfg, ckpt, device, base_dtype)
    check_tokenizer(tok_path, raw.params.vocab_size)
    raw.train()
    model = raw
    if not cfg.fsdp:
        wrap_blocks(raw, compile=cfg.compile and on_cuda, grad_ckpt=cfg.grad_ckpt)
        if dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(raw, device_ids=[device.index] if on_cuda else None)   # syncs only requires_grad params
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=on_cuda and not cfg.fsdp)   # FSDP's sharded params: default foreach
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total_steps, cfg.min_lr_ratio))
    step, tokens_seen = 0, 0
    if state:
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, f"optim_{rank}.pt"), weights_only=False)
                                  if cfg.fsdp else state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        rng_path = os.path.join(ckpt, f"rng_{rank}.pt")
        if os.path.isfile(rng_path) and state["world_size"] == world:   # continue each rank's dropout exactly
            rng = torch.load(rng_path, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and on_cuda:
                torch.cuda.set_rng_state(rng["cuda"])
        else:   # another number of processes: same data order, fresh dropout streams
            torch.manual_seed(cfg.seed + 1000 * rank + step)
        log(rank, f"resumed from {ckpt} at step {step}")
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)   # different dropout masks on different ranks

    n_train, n_total = mor.count_parameters(raw)
    log(rank, f"{cfg.method}: {n_train:,} trainable of {n_total:,} parameters | {len(train_ex)} train, "
              f"{len(val_ex)} val examples | {world} process(es) x {loader.accum_steps} micro-batch(es) of "
              f"{cfg.micro_batch} = global batch {cfg.global_batch} | {total_steps} steps | {device}")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if rank == 0:   # a resumed run rewrites the steps after its checkpoint
        kept = []
        if state and os.path.isfile(log_path):
            with open(log_path) as f:
                kept = [ln for ln in f if json.loads(ln).get("step", 0) <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    stop_signal = []
    handlers = {}

    def on_signal(signum, frame):   # finish the step, checkpoint, exit
        stop_signal.append(signum)
    for s in (signal.SIGINT, signal.SIGTERM):
        handlers[s] = signal.signal(s, on_signal)

    peak = peak_flops(device, cfg.peak_tflops) * world
    balance = cfg.balance_coef if cfg.router == "balanced" and cfg.method in ("mor", "moelora") else 0.0
    last_ckpt = find_checkpoint(cfg.out_dir) if os.path.isfile(os.path.join(cfg.out_dir, "latest")) else None
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True,
               desc=cfg.method)
    val_loss = None
    try:
        while step < total_steps:
            t0 = time.time()
            micro_batches = loader.next_step()
            loss, n_tgt = forward_backward(model, micro_batches, device, world, balance, raw, autocast=on_cuda)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            grad_norm = float(full_state(grad_norm))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise Stop(f"step {step + 1}: loss {loss}, gradient norm {grad_norm} is not finite; stopped before "
                           f"updating. Last good checkpoint: {last_ckpt or 'none yet'} (resume from it with "
                           f"--resume {cfg.out_dir}, e.g. with a lower --lr)")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_cuda:
                torch.cuda.synchronize()
            dt = time.time() - t0
            n_tok = int(all_reduce(torch.tensor(sum(int(mb["lengths"].sum()) for mb in micro_batches), device=device)))
            tokens_seen += n_tok
            seq = sum(float((mb["lengths"].float() ** 2).sum()) for mb in micro_batches) / max(
                1, sum(int(mb["lengths"].sum()) for mb in micro_batches))   # token-weighted sequence length
            mfu = n_tok * flops_per_token(raw, seq) / dt / peak if peak else None
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                   "targets": n_tgt, "tok_per_s": n_tok / dt, "step_s": dt}
            if mfu is not None:
                rec["mfu"] = mfu
            if val_ex and (step % cfg.eval_every == 0 or step == total_steps):
                val_loss = rec["val_loss"] = validation_loss(model, val_ex, cfg.micro_batch, device, pad_id, rank,
                                                             world, autocast=on_cuda)
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                post = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{n_tok / dt:,.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                if val_loss is not None:
                    post["val"] = f"{val_loss:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            # every rank must stop at the same step: a signal seen by any rank stops all
            stopping = bool(all_reduce(torch.tensor(len(stop_signal), device=device), dist.ReduceOp.MAX))
            if step % cfg.ckpt_every == 0 or step == total_steps or stopping:
                last_ckpt = write_checkpoint(cfg.out_dir, step, raw, optimizer, scheduler, loader, cfg, rank, world,
                                             {"tokens_seen": tokens_seen})
            if step == cfg.crash_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                bar.close()
                log(rank, f"stopped by signal at step {step}; checkpoint {last_ckpt}; "
                          f"continue with --resume {cfg.out_dir}")
                break
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if step == total_steps:
        save_final_adapter(raw, os.path.join(cfg.out_dir, "adapter.pth"), rank)
        log(rank, f"done: {step} steps, adapter in {os.path.join(cfg.out_dir, 'adapter.pth')}"
                  + (f", val loss {val_loss:.4f}" if val_loss is not None else ""))
    log(rank, f"data: {stats['n_bad']} bad line(s) skipped, {stats['n_dropped_empty']} example(s) dropped "
              f"(nothing to learn after truncation to {cfg.max_len}), {stats['n_truncated']} truncated")
    return raw


# ----------------------------------------------------------------------------- the no-download demo

DEMO_PARAMS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)


def write_meta_checkpoint(ckpt_dir: str, params: dict, state_dict: dict, tokenizer_path: str | None = None) -> str:
    """params.json + consolidated.00.pth (+ tokenizer.model) in Meta's layout: what from_checkpoint reads."""
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()},
               os.path.join(ckpt_dir, "consolidated.00.pth"))
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        json.dump(params, f)
    if tokenizer_path and os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(ckpt_dir, "tokenizer.model")):
        shutil.copyfile(tokenizer_path, os.path.join(ckpt_dir, "tokenizer.model"))
    return ckpt_dir


def mc_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, mc: dict[str, list[dict]]) -> dict[str, float]:
    """Held-out multiple-choice accuracy per skill (evaluate.py's scoring) and over all items."""
    import evaluate
    accs = {name: evaluate.score_multiple_choice(model, tokenizer, items, batch_size=64, delimiter=" ")["acc"]
            for name, items in mc.items()}
    accs["all"] = sum(accs[n] * len(mc[n]) for n in mc) / sum(len(items) for items in mc.values())
    return accs


def demo(out_dir: str = "out/demo", n_per_skill: int = 400, n_eval: int = 50, pretrain_steps: int = 600,
         steps: int = 300, progress: bool = True) -> dict:
    """`python train.py`: MoR instruction tuning end to end on CPU, nothing downloaded.

    1. Synthetic multi-task chat data (data.SKILLS) and an unseen multiple-choice split.
    2. A tiny random LLaMA written in Meta's layout (params.json, consolidated.00.pth, tokenizer.model).
    3. "Pretraining": a random frozen base cannot learn these skills through FFN adapters alone (like a real
       LLM, the base must already know things), so the base is first trained with --method full on plain
       "Q: ... A: ..." text of the same skills (other random draws, no chat template). It is written back to
       disk in Meta's layout as the base to tune.
    4. MoR (E8R8 on w1/w2/w3, as the paper) on the chat-format data, base loaded by Transformer.from_checkpoint.
    5. Held-out multiple-choice accuracy before and after, scored by evaluate.py.
    """
    t_start = time.time()
    # one thread: the matrices are tiny, and two threads on a busy 2-core machine wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(out_dir, n_per_skill, n_eval, pretrain_steps, steps, progress, t_start)
    finally:
        torch.set_num_threads(threads)


def _demo(out_dir: str, n_per_skill: int, n_eval: int, pretrain_steps: int, steps: int, progress: bool,
          t_start: float) -> dict:
    sft_rows = data.synthetic_tasks(n_per_skill, seed=0)
    mc = data.synthetic_mc(n_eval, seed=1, exclude=sft_rows)
    pre_rows = [{"prompt": "", "completion": f"Q: {r['messages'][0]['content']} A: {r['messages'][1]['content']}"}
                for r in data.synthetic_tasks(n_per_skill, seed=2)]
    sft_path = data.write_jsonl(sft_rows, os.path.join(out_dir, "sft.jsonl"))
    pre_path = data.write_jsonl(pre_rows, os.path.join(out_dir, "pretrain.jsonl"))
    texts = [data.format_chat(r["messages"]) for r in sft_rows] + [r["completion"] for r in pre_rows]
    tok_path = data.train_tokenizer(texts, os.path.join(out_dir, "tokenizer.model"), vocab_size=512)
    tokenizer = Tokenizer(tok_path)
    params = dict(DEMO_PARAMS, vocab_size=tokenizer.n_words)
    torch.manual_seed(0)
    random_base = write_meta_checkpoint(os.path.join(out_dir, "random_base"), params,
                                        Transformer(ModelArgs(**params)).state_dict(), tok_path)
    common = dict(global_batch=16, micro_batch=16, max_len=128, pad_to_multiple=8, progress=progress,
                  ckpt_every=10**9, seed=0)
    print(f"[demo] 1/3 pretraining a tiny LLaMA ({params['n_layers']} layers, dim {params['dim']}) with "
          f"--method full on {len(pre_rows)} plain-text examples", flush=True)
    pre = train(TrainConfig(ckpt_dir=random_base, data=[pre_path], method="full", lr=3e-3, val_size=0,
                            max_steps=pretrain_steps, out_dir=os.path.join(out_dir, "pretrain"), **common))
    base = write_meta_checkpoint(os.path.join(out_dir, "base"), params, pre.state_dict(), tok_path)
    before = mc_accuracy(Transformer.from_checkpoint(base), tokenizer, mc)
    print(f"[demo] 2/3 MoR instruction tuning on {len(sft_rows)} chat examples ({', '.join(data.SKILLS)})",
          flush=True)
    cfg = TrainConfig(ckpt_dir=base, data=[sft_path], method="mor", lr=3e-3, val_size=64,
                      eval_every=max(1, steps // 4), max_steps=steps, out_dir=os.path.join(out_dir, "mor"), **common)
    model = train(cfg)
    model.eval()
    after = mc_accuracy(model, tokenizer, mc)
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    chance = {name: sum(1 / len(it["choices"]) for it in items) / len(items) for name, items in mc.items()}
    chance["all"] = sum(chance[n] * len(mc[n]) for n in mc) / sum(len(v) for v in mc.values())
    print(f"[demo] 3/3 held-out multiple choice ({n_eval} unseen questions per skill), accuracy:")
    print(f"  {'skill':<10}{'chance':>8}{'before':>8}{'after':>8}")
    for name in list(mc) + ["all"]:
        print(f"  {name:<10}{chance[name]:>8.2f}{before[name]:>8.2f}{after[name]:>8.2f}")
    first, last = sum(r["loss"] for r in log[:10]) / len(log[:10]), sum(r["loss"] for r in log[-10:]) / len(log[-10:])
    print(f"  MoR training loss {first:.3f} -> {last:.3f} (mean of first/last 10 steps); "
          f"adapter: {os.path.join(cfg.out_dir, 'adapter.pth')}; {time.time() - t_start:.0f} s in all")
    return {"before": before, "after": after, "chance": chance, "loss_first": first, "loss_last": last}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        demo()
        return
    cfg = parse_args(argv)
    try:
        check_config(cfg)
        train(cfg)
    except (data.DataError, ConfigError, CheckpointError, Stop, FileNotFoundError) as e:   # bad input: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
