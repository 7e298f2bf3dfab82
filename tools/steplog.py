"""What a training run writes besides checkpoints: config.json (its settings, read by --resume),
log.jsonl (one record per step), the tqdm bar, and the tokens/s and MFU arithmetic. Rank 0
writes."""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from tqdm import tqdm


def flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Training FLOPs per token: 2N forward + 2N input gradients + 2N_trainable weight gradients
    (frozen weights need none), plus attention 12·L·d·T as in PaLM's MFU. N excludes the embedding
    lookup."""
    counted = [(p.numel(), p.requires_grad) for name, p in model.named_parameters()
               if "tok_embeddings" not in name]
    n, n_train = sum(k for k, _ in counted), sum(k for k, trains in counted if trains)
    L, d = model.params.n_layers, model.params.dim
    return 4 * n + 2 * n_train + 12 * L * d * seq_len


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """Dense bf16 peak of one accelerator (0 when unknown, and MFU is not shown)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989),
                        ("H800", 989), ("GH200", 989), ("A100", 312), ("A800", 312), ("L40S", 362)):
        if key in name:
            return tflops * 1e12
    return 0.0


class StepLog:
    """config.json at the start, then one log.jsonl record and one bar update per step."""

    def __init__(self, cfg, raw: torch.nn.Module, device: torch.device, world: int, rank: int,
                 total: int, step: int, tokens_seen: int):
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
        self.path, self.raw, self.rank = os.path.join(cfg.out_dir, "log.jsonl"), raw, rank
        self.peak = peak_flops(device, cfg.peak_tflops) * world
        self.tokens_seen, self.val_loss = tokens_seen, None
        self.bar = tqdm(total=total, initial=step, disable=rank != 0 or not cfg.progress,
                        dynamic_ncols=True, desc=cfg.method)

    def step(self, step: int, micro_batches: list[dict], n_tok: int, dt: float, loss: float,
             lr: float, grad_norm: float, targets: int, val_loss: float | None) -> None:
        """n_tok: the step's tokens over all ranks; the MFU's sequence length is this rank's,
        token-weighted."""
        lengths = [mb["lengths"] for mb in micro_batches]
        self.tokens_seen += n_tok
        n_local = max(1, sum(int(n.sum()) for n in lengths))
        seq = sum(float((n.float() ** 2).sum()) for n in lengths) / n_local
        mfu = n_tok * flops_per_token(self.raw, seq) / dt / self.peak if self.peak else None
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens": self.tokens_seen, "targets": targets, "tok_per_s": n_tok / dt, "step_s": dt}
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
