"""Instruction tuning of a LLaMA with MoR or a baseline adapter (paper §4.1), one CPU or many GPUs.

    python train.py              # the no-download demo (demo/demo.py; CPU, under a minute)
    python train.py --ckpt_dir llama-2-7b --data tulu_v2.jsonl --method mor --out_dir out/mor_e8r8
    python train.py --resume out/mor_e8r8             # continue a stopped run with its own settings
    torchrun --nproc_per_node=8 train.py --ckpt_dir llama-2-7b --data tulu_v2.jsonl   # DDP, batch 8
    torchrun --nproc_per_node=8 train.py ... --fsdp   # shard the frozen base (70B)

Every TrainConfig field is a flag (`--lr 1e-4`, `--compile false`, `--no_compile`, `--targets w1 w2
w3`; tools/train_cli.py). `train()` reads top to bottom: setup, then the loop (batch,
forward_backward, clip, finite check, step, log, eval, checkpoint or stop). The run folder (lock,
checkpoints, faults) is tools/run_dir.py, the log tools/steplog.py, the early stops tools/stop.py.

Dtypes on CUDA: the frozen base weights are stored in bf16 (halves memory; they never change, so
nothing is lost after the one rounding), trainable parameters (adapters; everything for --method
full) stay fp32 master weights, because an Adam update of lr 2e-4 is below bf16's resolution for
most weights and would be rounded away. The forward runs under bf16 autocast: matmuls in bf16,
mor.py casts the small adapter factors down to the activation dtype, and gradients arrive in the
fp32 parameters. On CPU all is fp32.

The loss of a step is the mean over every supervised token of the global batch (sum of token losses
over all micro-batches and ranks, divided by their total count, which is all-reduced before the
backward). So gradient accumulation and the number of processes change nothing but float summation
order.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import data
import mor
from llama import CheckpointError, Tokenizer, Transformer, check_tokenizer, no_init, tokenizer_path
from tools.dist import setup_distributed, under_torchrun
from tools import run_dir as folder
from tools import train_cli as cli
from tools.run_dir import find_checkpoint, read_state, write_checkpoint
from tools.schedule import make_scheduler, plan_schedule, resumed_schedule
from tools.steplog import StepLog
from tools.stop import Interrupted, Stop, stop_signals
from tools.table2 import count_parameters
from tools.train_cli import COMPILE_MODES, ConfigError   # noqa: F401 (COMPILE_MODES: for importers)


def opt(default, help: str):
    """A config field with its --help text (lists get a fresh default per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Instruction tuning of a LLaMA with MoR or a baseline adapter (paper §4.1), on one CPU or
    many GPUs. With no arguments: the demo."""
    # model and data
    ckpt_dir: str = opt("", "Meta checkpoint folder: params.json + consolidated.NN.pth")
    tokenizer: str = opt("", "tokenizer.model (default: in ckpt_dir, else its parent as in LLaMA-2 "
                             "downloads)")
    data: list = opt([], "training JSONL file(s): Tulu-v2 'messages' or 'prompt'/'completion' "
                         "lines")
    val_data: list = opt([], "validation JSONL file(s); default: hold out val_size training "
                             "examples")
    val_size: int = opt(256, "examples held out of the training data for the validation loss (0: "
                             "none)")
    skip_bad_examples: bool = opt(False, "skip and count bad JSONL lines instead of stopping at the "
                                         "first")
    max_len: int = opt(1024, "truncate examples to this many tokens (paper: 1024)")
    pack: bool = opt(False, "pack several examples into each max_len row")
    out_dir: str = opt("out/run", "checkpoints, adapter.pth and log.jsonl go here (a new folder for a "
                                  "new run)")
    resume: str = opt("", "continue the run in this out_dir (its latest checkpoint) or ckpt_<step> "
                          "folder, with its settings; only --max_steps, --epochs, --lr and system "
                          "flags may be given anew")
    # adapter (paper §4.1)
    method: str = opt("mor", "mor | lora | dora | moelora | moslora | full (all parameters, no "
                             "adapter)")
    r: int = opt(8, "LoRA rank r of the shared A, B")
    alpha: float = opt(32.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    num_experts: int = opt(8, "experts N for mor and moelora (the paper's MoELoRA row uses 2)")
    dropout: float = opt(0.05, "dropout on the adapter input")
    router: str = opt("learned", "mor/moelora router: learned | mean | balanced (Table 4)")
    targets: list = opt(["w1", "w2", "w3"], "nn.Linear names to adapt (paper: the FFN's gate, "
                                            "down, up)")
    balance_coef: float = opt(0.01, "weight of the router balance loss when router=balanced")
    # optimisation
    lr: float = opt(2e-4, "peak learning rate (paper: 2e-4); on resume, the new peak from the next "
                          "step on")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    warmup_ratio: float = opt(0.03, "fraction of steps of linear warmup before the cosine decay")
    min_lr_ratio: float = opt(0.0, "the cosine ends at lr * min_lr_ratio")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    global_batch: int = opt(8, "examples per optimizer step over all processes (paper: 8)")
    micro_batch: int = opt(1, "examples per forward on each process; accumulation fills the global "
                              "batch")
    epochs: int = opt(2, "passes over the training data (used when max_steps <= 0)")
    max_steps: int = opt(-1, "optimizer steps to run (overrides epochs when > 0); on resume, may "
                             "extend the run")
    seed: int = opt(42, "seeds data order, adapter init and dropout")
    # system
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    compile: bool = opt(True, "torch.compile every transformer block (CUDA only)")
    compile_mode: str = opt("default", "torch.compile mode: default (until the others are measured "
                                       "on a GPU) | reduce-overhead (CUDA graphs; one static graph "
                                       "per length bucket, see pad_to_multiple) | "
                                       "max-autotune-no-cudagraphs")
    tf32: bool = opt(True, "allow TF32 matmuls on CUDA")
    grad_ckpt: bool = opt(False, "activation checkpointing of every transformer block")
    fsdp: bool = opt(False, "shard the frozen base over processes with FSDP2 (for models beyond one "
                            "GPU)")
    pad_to_multiple: int = opt(64, "pad batch lengths to a multiple of this: the length buckets "
                                   "(shapes) to compile")
    peak_tflops: float = opt(0.0, "accelerator peak bf16 TFLOP/s for MFU (0: look up "
                                  "H100/H200/A100)")
    # logging and checkpoints
    eval_every: int = opt(200, "steps between validation losses (and at the end)")
    ckpt_every: int = opt(500, "steps between checkpoints (and at the end)")
    keep_ckpts: int = opt(2, "checkpoints kept in out_dir (the newest always; 0: all)")
    progress: bool = opt(True, "show the tqdm bar")
    crash_at_step: int = opt(-1, "testing aid: SIGKILL this process right after this step")


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
    """Add cfg.method's adapters (freezing the base), or make all trainable for --method full."""
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


def wrap_blocks(model: Transformer, compile: bool, grad_ckpt: bool, mode: str | None = None,
                buckets: int = 16, backend: str = "inductor") -> None:
    """torch.compile (with torch.compile's `mode`) and/or activation checkpointing, per block.

    Per block: the identical blocks share one compiled graph, so compile time does not grow with
    depth. Checkpointing keeps only each block's input and recomputes its inside during the backward
    (around the compiled function, which torch.compile would otherwise not enter). Replacing the
    instance's forward keeps module names, and so state-dict and checkpoint keys, unchanged.
    mode="reduce-overhead" replays each graph as a CUDA graph, which needs static shapes: one graph
    per padded batch length, `buckets` of them.
    """
    static = mode == "reduce-overhead"
    # graphs per bucket: 2 (the first block's input needs no grad) x 2 (train, eval)
    if compile and static:
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 4 * buckets + 2)
    for block in model.layers:
        forward = block.forward
        if compile:
            forward = torch.compile(forward, mode=mode, dynamic=False if static else None,
                                    backend=backend)
        if grad_ckpt:
            forward = partial(checkpoint, forward, use_reentrant=False)
        block.forward = forward


def full_state(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP-sharded DTensor) parameter; a collective under FSDP."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def build_model(cfg: TrainConfig, device: torch.device, base_dtype: torch.dtype,
                adapter: str | None = None) -> Transformer:
    """Meta checkpoint -> model with cfg.method's adapters (seeded by cfg.seed), dtypes set for
    training, and (FSDP's host copy only) the weights of an adapter file."""
    model = Transformer.from_checkpoint(cfg.ckpt_dir, device=device, dtype=base_dtype,
                                        max_seq_len=cfg.max_len)
    model.train()
    torch.manual_seed(cfg.seed)
    prepare_model(model, cfg)
    cast_for_training(model, base_dtype)
    if adapter:
        mor.load_adapter(model, adapter)
    return model


def build_sharded(cfg: TrainConfig, adapter: str | None, device: torch.device,
                  base_dtype: torch.dtype, rank: int) -> Transformer:
    """FSDP2 for models that do not fit one GPU: no rank ever holds the whole model on its
    accelerator.

    Every rank builds the model on `meta` (no memory), adds adapters, and shards every block (frozen
    base included), then the rest; only rank 0 reads the checkpoint (and the resumed adapter) into
    host memory, and set_model_state_dict scatters each tensor's shards from it. On CUDA,
    all-gathers run in bf16 and gradients are reduced in fp32 (the adapters' master dtype).
    """
    # imported here, not at the top: only --fsdp needs them, and they add seconds to every start
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    full_sd, params = {}, [None]
    if rank == 0:
        host = build_model(cfg, torch.device("cpu"), base_dtype, adapter)
        full_sd, params = host.state_dict(), [host.params]
        del host
    dist.broadcast_object_list(params, src=0)   # vocab_size may come from the weights
    with no_init():   # shapes only: the weights come from rank 0 next
        model = Transformer(params[0])
        prepare_model(model, cfg)
    cast_for_training(model, base_dtype)
    on_cuda = device.type == "cuda"
    wrap_blocks(model, cfg.compile and on_cuda, cfg.grad_ckpt, cfg.compile_mode, buckets(cfg))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_cuda else None,
                              reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_sd, options=options)
    for m in model.modules():   # non-persistent buffers, not in state dicts: to_empty left them undefined
        if hasattr(m, "router_sum"):
            m.router_sum.zero_()
            m.router_count.zero_()
    return model


def buckets(cfg: TrainConfig) -> int:
    """How many padded batch lengths (shapes) training can produce."""
    return math.ceil(cfg.max_len / cfg.pad_to_multiple)


def build(cfg: TrainConfig, ckpt: str | None, device: torch.device,
          rank: int) -> tuple[Transformer, torch.nn.Module]:
    """(raw model, the module to call): fp32 on CPU, bf16 frozen base on CUDA, adapters seeded
    identically on every rank; compiled blocks on CUDA; DDP or FSDP under torchrun."""
    on_cuda = device.type == "cuda"
    base_dtype = torch.bfloat16 if on_cuda else torch.float32
    if cfg.fsdp and not dist.is_initialized():
        raise ConfigError("--fsdp needs torchrun (torchrun --nproc_per_node=N train.py ...)")
    if cfg.fsdp:
        adapter = ckpt and os.path.join(ckpt, "adapter.pth")
        raw = build_sharded(cfg, adapter, device, base_dtype, rank)
        return raw, raw
    raw = build_model(cfg, device, base_dtype)
    wrap_blocks(raw, cfg.compile and on_cuda, cfg.grad_ckpt, cfg.compile_mode, buckets(cfg))
    if not dist.is_initialized():
        return raw, raw
    return raw, DDP(raw, device_ids=[device.index] if on_cuda else None)   # syncs trainable params


# ----------------------------------------------------------------------------- loss and step

def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions: logits at t predict labels at
    t+1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=data.IGNORE_INDEX,
                           reduction="sum")


def count_targets(micro_batches: list[dict]) -> int:
    return sum(int((mb["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for mb in micro_batches)


def forward_backward(model: torch.nn.Module, micro_batches: list[dict], device: torch.device,
                     world_size: int = 1, balance_coef: float = 0.0,
                     raw: torch.nn.Module | None = None, autocast: bool = False,
                     keep_grads: bool = False) -> tuple[float, int]:
    """Accumulate the gradients of one optimizer step; returns (global mean token loss, global
    target count).

    Each micro-batch contributes sum(token losses) / N_global, N_global = supervised tokens of the
    whole global batch. DDP and FSDP average gradients over ranks, hence the factor world_size.
    Gradients are synchronised only on the last micro-batch. keep_grads (CUDA graphs: --compile_mode
    reduce-overhead): gradients accumulate in place into .grad buffers made here, outside any
    backward, because a compiled backward's outputs live in the graph's memory pool, which the next
    micro-batch's replay overwrites, so a .grad taken over from the first backward would be
    overwritten too; zero them with zero_grad(set_to_none=False) to keep them. Otherwise autograd
    makes .grad as usual and zero_grad() frees it between steps (full fine-tuning's gradients are
    then not held through the next forward, and a parameter without a gradient is not updated).
    """
    raw = raw if raw is not None else model
    for p in raw.parameters() if keep_grads else []:
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
def validation_loss(model: torch.nn.Module, examples: list, micro_batch: int, device: torch.device,
                    pad_id: int, rank: int = 0, world_size: int = 1, autocast: bool = False,
                    pad_to_multiple: int = 1) -> float:
    """Mean token loss over the validation examples. Each round of micro_batch * world_size examples
    is split over the ranks; a rank whose share of the last round is empty still runs a forward (on
    a stand-in, not counted), because FSDP needs every rank in every forward. Lengths are padded as
    in training (the compiled shapes)."""
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


# ----------------------------------------------------------------------------- training

def log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def load_data(cfg: TrainConfig, tokenizer: Tokenizer, rank: int) -> tuple[list, list, dict]:
    """Training and validation examples (tokenised) and the data statistics to report."""
    train, stats = data.load_dataset(cfg.data, tokenizer, cfg.max_len, cfg.skip_bad_examples,
                                     progress=rank == 0 and cfg.progress)
    if not train:
        raise ConfigError(f"{', '.join(cfg.data)}: no training examples in --data (every line bad "
                          "or empty?)")
    if cfg.val_data:
        val, vstats = data.load_dataset(cfg.val_data, tokenizer, cfg.max_len, cfg.skip_bad_examples)
        stats["n_bad"] += vstats["n_bad"]
    elif 0 < cfg.val_size and cfg.val_size + cfg.global_batch <= len(train):
        held = set(random.Random(cfg.seed).sample(range(len(train)), cfg.val_size))
        val = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    else:
        if cfg.val_size > 0 and rank == 0:   # too few to hold out: say so, not validate nothing
            print(f"warning: --val_size {cfg.val_size} would leave fewer than --global_batch "
                  f"{cfg.global_batch} of the {len(train)} examples to train on: no validation loss "
                  "(give a smaller --val_size, or --val_data)", file=sys.stderr)
        val = []
    if cfg.pack:
        random.Random(cfg.seed).shuffle(train)   # mix sources before packing neighbours together
        train = data.pack(train, cfg.max_len)
    return train, val, stats


def train(cfg: TrainConfig) -> torch.nn.Module | None:
    """Run training as configured; returns the trained (unwrapped) model, or None when a resumed run
    had nothing left to do. See the module doc."""
    cli.check_config(cfg)
    with folder.lock(cfg.out_dir, int(os.environ.get("RANK", 0))):   # one run per folder
        return train_locked(cfg)


def train_locked(cfg: TrainConfig) -> torch.nn.Module | None:
    """train() once this process holds the run folder."""
    ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
    state = read_state(ckpt) if ckpt else None
    if ckpt:   # nothing is written before these checks
        cli.check_resume(cfg, state, ckpt)
    cli.check_out_dir(cfg)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, device = setup_distributed(cuda=cuda)
    on_cuda = device.type == "cuda"
    if on_cuda and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = Tokenizer(tok_path := tokenizer_path(cfg.ckpt_dir, cfg.tokenizer))
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id   # LLaMA has no pad
    train_ex, val_ex, stats = load_data(cfg, tokenizer, rank)
    loader = data.Loader(train_ex, cfg.global_batch, cfg.micro_batch, cfg.seed, rank, world, pad_id,
                         cfg.pad_to_multiple)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * loader.steps_per_epoch
    if state is not None and state["step"] >= total_steps and os.path.isfile(
            os.path.join(cfg.out_dir, "adapter.pth")):   # a finished run: nothing is written
        log(rank, f"{cfg.out_dir}: nothing left to do: the run is at step {state['step']} of "
                  f"{total_steps} (a larger --max_steps or --epochs trains further)")
        return None
    raw, model = build(cfg, ckpt, device, rank)
    check_tokenizer(tok_path, raw.params.vocab_size)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay,
                                  fused=on_cuda and not cfg.fsdp)   # FSDP's shards: foreach
    if ckpt:
        step, tokens_seen = folder.restore_checkpoint(ckpt, state, cfg, raw, optimizer, loader, rank,
                                                      world)
        schedule = resumed_schedule(cfg, state, loader.steps_per_epoch, total_steps)
        log(rank, f"resumed from {ckpt} at step {step}")
    else:
        step, tokens_seen, schedule = 0, 0, plan_schedule(cfg, total_steps)
        torch.manual_seed(cfg.seed + 1000 * rank)   # different dropout masks on different ranks
    scheduler = make_scheduler(optimizer, cfg, schedule, step)
    n_train, n_total = count_parameters(raw)
    log(rank, f"{cfg.method}: {n_train:,} trainable of {n_total:,} parameters | {len(train_ex)} "
              f"train, {len(val_ex)} val examples | {world} process(es) x {loader.accum_steps} "
              f"micro-batch(es) of {cfg.micro_batch} = global batch {cfg.global_batch} | "
              f"{total_steps} steps | {device}")
    graphs = on_cuda and cfg.compile and cfg.compile_mode == "reduce-overhead"   # CUDA graphs
    balanced = cfg.router == "balanced" and cfg.method in ("mor", "moelora")
    balance = cfg.balance_coef if balanced else 0.0
    last_ckpt = ckpt
    steplog = StepLog(cfg, raw, device, world, rank, total_steps, step, tokens_seen)
    with stop_signals() as signalled, closing(steplog):
        while step < total_steps:
            t0 = time.time()
            micro_batches = loader.next_step()
            loss, n_tgt = forward_backward(model, micro_batches, device, world, balance, raw,
                                           autocast=on_cuda, keep_grads=graphs)
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")   # the norm is logged
            grad_norm = float(full_state(torch.nn.utils.clip_grad_norm_(params, clip)))
            # stop before the update spoils the weights
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise Stop(f"step {step + 1}: loss {loss}, gradient norm {grad_norm} is not finite; "
                           f"stopped before updating. Last good checkpoint: {last_ckpt or 'none yet'} "
                           f"(resume from it with --resume {cfg.out_dir}, e.g. with a lower --lr)")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=not graphs)   # see forward_backward
            step += 1
            if on_cuda:
                torch.cuda.synchronize()   # time the step, not its kernel launches
            dt = time.time() - t0
            due = val_ex and (step % cfg.eval_every == 0 or step == total_steps)
            val_loss = validation_loss(model, val_ex, cfg.micro_batch, device, pad_id, rank, world,
                                       on_cuda, cfg.pad_to_multiple) if due else None
            n_tok = sum(int(mb["lengths"].sum()) for mb in micro_batches)
            n_tok = int(all_reduce(torch.tensor(n_tok, device=device)))
            steplog.step(step, micro_batches, n_tok, dt, loss, lr, grad_norm, n_tgt, val_loss)
            # every rank must stop at the same step: a signal seen by any rank stops all
            seen = all_reduce(torch.tensor(len(signalled), device=device), dist.ReduceOp.MAX)
            stopping = bool(seen)
            if step % cfg.ckpt_every == 0 or step == total_steps or stopping:
                extra = {"tokens_seen": steplog.tokens_seen, "schedule": schedule}
                last_ckpt = write_checkpoint(cfg.out_dir, step, raw, optimizer, loader, cfg, rank,
                                             world, extra)
            if step == cfg.crash_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                raise Interrupted(f"stopped by signal at step {step}; checkpoint {last_ckpt}; continue "
                                  f"with --resume {cfg.out_dir}", (signalled or [signal.SIGTERM])[0])
    folder.save_adapter(raw, cfg.out_dir, rank)
    log(rank, f"done: {step} steps, adapter in {os.path.join(cfg.out_dir, 'adapter.pth')}"
              + (f", val loss {steplog.val_loss:.4f}" if steplog.val_loss is not None else ""))
    log(rank, f"data: {stats['n_bad']} bad line(s) skipped, {stats['n_dropped_empty']} example(s) "
              f"dropped (nothing to learn after truncation to {cfg.max_len}), "
              f"{stats['n_truncated']} truncated")
    return raw


def main(argv: list[str] | None = None) -> None:
    """A training run from a command line (`python train.py` alone runs the demo: see the end of
    file)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv and under_torchrun():   # N processes would each run the demo into the same folder
        if os.environ.get("RANK") == "0":
            print("error: the demo runs in one process: start it with `python train.py` (torchrun is "
                  "for runs with --ckpt_dir and --data)", file=sys.stderr)
        sys.exit(1)
    try:
        train(cli.parse_args(TrainConfig, argv))
    except Interrupted as e:   # the checkpoint is written: a clean stop
        log(int(os.environ.get("RANK", 0)), str(e))
    except (data.DataError, ConfigError, CheckpointError, Stop, FileNotFoundError) as e:   # input
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:   # Ctrl-C outside a step (loading, the final save): files are whole
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 1 and not under_torchrun():
        # demo/ imports this file as `train`: imported here, at the command line, makes no cycle
        from demo.demo import main as demo
        demo()
    else:
        main()
