"""MoR: Mixture of Ranks for low-rank adaptation (Tang et al., paper §3), plus the paper's baselines.

One file, torch only: copy it into any PyTorch project whose model is made of nn.Linear layers.

    model = ...                                         # any nn.Module with nn.Linear layers
    add_adapters(model, "mor", targets=("w1", "w2", "w3"), r=8, alpha=32, num_experts=8)
    loss = task_loss + coef * balance_loss(model)       # balance_loss is 0 unless router="balanced"
    save_adapter(model, "adapter.pth"); load_adapter(fresh_model, "adapter.pth")

Where the equations of §3 live:
    eq. 6      MoRLinear docstring (the general transformed LoRA Λ_B B Λ_Bᵀ Λ_A A Λ_Aᵀ)
    eq. 7, 8   MoRLinear.__init__ (the diagonal scalings are the rows of omega_A / omega_B)
    eq. 9      MoRLinear.direction (a single transformed LoRA; N = 1)
    eq. 10     MoRLinear.direction (the direction D_i)
    eq. 11     route (the softmax router G(x) = softmax(W_r x))
    eq. 12     MoRLinear.forward (the mixture Σ_i G_i(x) D_i x)
    eq. 13     MoRLinear.forward (out = self.base(x)); AdapterLinear docstring: o = W x + ΔW x, W frozen
    eq. 14     MoRLinear.__init__ (λ_A, λ_B stacked into Ω_A ∈ R^{N×r}, Ω_B ∈ R^{N×d_out})
    eq. 15     MoRLinear.forward and TiedUp (the stacked, one-matmul form of Fig. 3)
    Table 2    python mor.py --params params.json (trainable-parameter formulas)
    Table 4    MoRLinear(router="learned" | "mean" | "balanced")

Dtypes: the adapter parameters are created in fp32 (or the base dtype if wider) because they are
master weights for the optimizer, while the frozen base may be bf16. Every adapter computes in the
dtype of the base layer's output (the activation dtype: x's, or bf16 under torch.autocast with an fp32
model, where x is cast once for the adapter path as autocast would): the small r×d factors are cast
down to it, the large tokens×d activations are never cast up. The result is added into, and has the
dtype of, the base layer's output. Gradients flow through the casts back to the fp32 parameters.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("learned", "mean", "balanced")


# -----------------------------------------------------------------------------
# shared pieces

class AdapterLinear(nn.Module):
    """Base of every adapter: keeps the frozen nn.Linear as `.base` and adds an update to it.

    eq. 13: o = W x + ΔW x, with W (and its bias) frozen; only ΔW's factors are trained.
    Subclasses implement `forward`; the base keeps state-dict keys as `<name>.base.weight`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        # as PEFT: dropout only on the adapter path; Identity when p = 0 so eval/no-dropout paths can fuse
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def factory(self) -> dict:
        """Where new adapter parameters live: the base's device, fp32 master weights (see module doc)."""
        w = self.base.weight
        return dict(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base.")]

    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        """Fold ΔW into the base weight: the layer then costs exactly a plain nn.Linear."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        with torch.no_grad():
            w = self.base.weight
            dt = torch.promote_types(w.dtype, torch.float32)  # fold in at least fp32, round once
            w.copy_((w.to(dt) + self.delta_weight().to(dt)).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge() (exact up to rounding in the base dtype)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        with torch.no_grad():
            w = self.base.weight
            dt = torch.promote_types(w.dtype, torch.float32)  # fold in at least fp32, round once
            w.copy_((w.to(dt) - self.delta_weight().to(dt)).to(w.dtype))
        self.merged = False

    def check_not_merged(self) -> None:
        # a merged layer in training mode would silently train nothing
        if self.merged and self.training:
            raise RuntimeError(f"{type(self).__name__} is merged: call unmerge() before training")

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype; when it already is, x itself without a call into torch (a dispatch per layer adds up)."""
    return x if x.dtype == dtype else x.to(dtype)


def add_update(out: torch.Tensor, z: torch.Tensor, up: torch.Tensor, scale: float, shape: tuple) -> torch.Tensor:
    """out += scale · z upᵀ, in place, as one GEMM with beta = 1 (addmm_); returns it viewed as `shape`.

    out: (tokens, d_out), a fresh matrix the caller owns: the base layer's output on the flattened input
    (nn.Linear's backward does not need its output, so writing into it is safe for autograd; it must not
    be a view, or autograd would track the write with copies). z: (tokens, k) adapter code; up: (d_out, k).
    In place because out-of-place addmm first copies out into a new tensor: a full extra read and write
    of tokens × d_out, which costs more than the rank-k GEMM itself. ΔW x is never stored on its own.
    """
    return out.addmm_(z, up.t(), alpha=scale).view(shape)


def balance_aux_loss(G: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss N · Σ_i f_i · P_i (Table 4, "balanced router").

    G: (tokens, N) router probabilities. f_i = fraction of tokens whose argmax is expert i (no gradient),
    P_i = mean probability of expert i. Equals 1 for uniform routing (ties go to expert 0 via argmax),
    and grows as the router concentrates tokens on few experts. Every token counts, padding included.
    """
    N = G.shape[-1]
    f = F.one_hot(G.argmax(-1), N).to(G.dtype).mean(0)
    P = G.mean(0)
    return N * (f * P).sum()


def route(layer: nn.Module, logits: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Router weights G(x) ∈ R^{tokens×N} in fp32 (fp64 for an fp64 x), for MoR and MoELoRA (eq. 11, Table 4).

    "learned" / "balanced": eq. 11, G_i(x) = exp(h_i) / Σ_j exp(h_j) with h(x) = W_r x on the undropped x
    (softmax in fp32 for bf16 safety). "mean": G_i = 1/N, no router parameters.
    Side effects: sets layer.aux_loss ("balanced" in training mode, else None) and, when
    layer.record_router, accumulates router_sum / router_count (paper Fig. 7).
    """
    N = layer.num_experts
    tokens = x.numel() // x.shape[-1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 for bf16 safety; fp64 stays fp64
    if layer.router_kind == "mean":
        G = torch.full((tokens, N), 1.0 / N, device=x.device, dtype=dt)
    else:
        G = torch.softmax(logits.reshape(tokens, N), dim=-1, dtype=dt)  # eq. 11
    aux = balance_aux_loss(G) if layer.router_kind == "balanced" and layer.training else None
    if aux is not None or layer.aux_loss is not None:  # nn.Module.__setattr__ is slow: skip None -> None
        layer.aux_loss = aux
    if layer.record_router:
        with torch.no_grad():
            layer.router_sum += G.sum(0).to(layer.router_sum.device)
            layer.router_count += tokens
    return G


def init_router(layer: nn.Module, router: str, num_experts: int, fk: dict) -> None:
    """Router W_r of eq. 11 as nn.Linear(d_in, N, bias=False) (random init, Table 2), or None for "mean"."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    layer.num_experts, layer.router_kind = num_experts, router
    layer.router = nn.Linear(layer.in_features, num_experts, bias=False, **fk) if router != "mean" else None
    layer.aux_loss = None
    layer.record_router = False
    layer.register_buffer("router_sum", torch.zeros(num_experts, device=fk["device"]), persistent=False)
    layer.router_count = 0


class DroppedLinear(torch.autograd.Function):
    """F.linear(F.dropout(x, p), A) that keeps x and the 1-byte dropout mask for the backward, not drop(x).

    Why (MoR): the router reads the undropped x and keeps it for its own weight gradient anyway, so the
    dropped copy that autograd would also keep for ∂L/∂A is a second tokens × d_in activation per layer.
    Here drop(x) = x ⊙ mask / (1 - p) is recomputed in the backward instead (one elementwise pass).
    The mask is F.dropout's own (torch.native_dropout is what F.dropout runs), so the RNG stream is the same.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        h, keep = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, keep, A)
        ctx.scale = 1.0 / (1.0 - p)
        return F.linear(h, A)

    @staticmethod
    def backward(ctx, ga: torch.Tensor):
        x, keep, A = ctx.saved_tensors
        masked = torch.ops.aten.native_dropout_backward  # t ⊙ keep · scale in one kernel: dropout's own backward
        gx = gA = None
        if ctx.needs_input_grad[1]:  # first, so that drop(x) is freed before gx is made
            h = masked(x, keep, ctx.scale)  # drop(x) again
            gA = ga.reshape(-1, ga.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
            del h
        if ctx.needs_input_grad[0]:
            gx = masked(ga @ A, keep, ctx.scale)
        return gx, gA, None


class TiedUp(torch.autograd.Function):
    """(α/r) B̃ ∈ R^{d_out×N·r} in `dtype`, B̃[:, i·r + j] = Ω_B[i] ⊙ B[:, j] · Ω_A[i, j] (eq. 15 stacked, Ω_A
    folded in), keeping only B, Ω_A, Ω_B for the backward.

    Why: autograd would keep the fp32 (d_out, N, r) intermediate of the two products for every layer (as
    large as B̃ itself, 2.8 MB per 7B w1 layer); the backward recomputes the one product it needs instead.
    The last product writes the compute dtype directly (no separate fp32 B̃ and cast).
    """

    @staticmethod
    def forward(ctx, B: torch.Tensor, omega_A: torch.Tensor, omega_B: torch.Tensor, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(B, omega_A, omega_B)
        ctx.scale = scale
        (d_out, r), N = B.shape, omega_A.shape[0]
        # B (d_out, 1, r) first: the product is laid out contiguously, so the reshape is a view, not a copy
        BA = B[:, None, :] * (scale * omega_A)
        out = torch.empty(d_out, N, r, device=B.device, dtype=dtype)
        return torch.mul(BA, omega_B.t()[:, :, None], out=out).view(d_out, N * r)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        B, omega_A, omega_B = ctx.saved_tensors
        (d_out, r), N = B.shape, omega_A.shape[0]
        g = g.view(d_out, N, r)
        gB = g * (ctx.scale * omega_B.t()[:, :, None])  # ∂/∂(B ⊙ Ω_A) · α/r, fp32 by type promotion
        dB = (gB * omega_A).sum(1) if ctx.needs_input_grad[0] else None
        dA = (gB * B[:, None, :]).sum(0) if ctx.needs_input_grad[1] else None
        dOB = None
        if ctx.needs_input_grad[2]:
            dOB = (g * (B[:, None, :] * (ctx.scale * omega_A))).sum(2).t()
        return dB, dA, dOB, None, None


def init_lora_A(A: torch.Tensor) -> None:
    """HF PEFT's LoRA A init: kaiming-uniform with a = √5, i.e. U(-1/√d_in, 1/√d_in)."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))


# -----------------------------------------------------------------------------
# baselines (Table 1)

class LoRALinear(AdapterLinear):
    """LoRA (Hu et al.) with HF PEFT numerics: o = W x + b + (α/r) · B A drop(x).

    A (r×d_in) kaiming-uniform(a=√5), B (d_out×r) = 0, so the layer equals the base at step 0.
    Trainable: r(d_in + d_out) = 2dr (Table 2). Mergeable.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        super().__init__(base, r, alpha, dropout)
        fk = self.factory()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fk))
        init_lora_A(self.lora_A)

    def up(self) -> torch.Tensor:
        """The d_out×r factor applied after A: B (MoSLoRA: B M)."""
        return self.lora_B

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.up() @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_not_merged()
        if self.merged:
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)  # tokens × d_in: the base output is then a matrix add_update can own
        out = self.base(x2)
        dt = out.dtype  # the compute dtype (see the module doc)
        a = F.linear(self.dropout(cast(x2, dt)), self.lora_A.to(dt))
        return add_update(out, a, self.up().to(dt), self.scale, (*x.shape[:-1], self.out_features))


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024) with HF PEFT numerics: LoRA's A, B plus a learned magnitude per output row.

    o = m / ‖W + s·B A‖_row ⊙ (W x + s·B A x) + b, s = α/r, the row norm detached (DoRA §4.3), m (d_out)
    the learned `magnitude`, initialised to ‖W‖_row so the layer equals the base at step 0.
    With adapter dropout active (training, p > 0) PEFT applies the direction to drop(x):
    o = W x + b + (g - 1) ⊙ W drop(x) + g ⊙ s·B A drop(x), g = m/‖W + s·BA‖; we do the same.
    The norm materialises W + s·BA (d_out×d_in) each forward, as PEFT does: DoRA is the slow baseline.
    Trainable: r(d_in + d_out) + d_out = 2dr + d (Table 2). Mergeable.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        super().__init__(base, r, alpha, dropout)  # LoRA's A, B and their init
        fk = self.factory()
        with torch.no_grad():
            self.magnitude = nn.Parameter(torch.linalg.vector_norm(base.weight.to(fk["dtype"]), dim=1))
        self._merged_gain = None

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row, detached (DoRA §4.3: treat the norm as a constant)."""
        with torch.no_grad():
            B = self.lora_B
            w = self.base.weight.to(B.dtype) + self.scale * (B @ self.lora_A)
            return torch.linalg.vector_norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_not_merged()
        if self.merged:
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)
        out = self.base(x2)
        dt = out.dtype
        g = self.magnitude / self.weight_norm()  # (d_out,)
        if self.dropout_active():
            h = self.dropout(cast(x2, dt))
            wx = F.linear(h, self.base.weight)
        else:
            h = cast(x2, dt)
            wx = out if self.base.bias is None else out - cast(self.base.bias, dt)
        a = F.linear(h, self.lora_A.to(dt))
        # g - 1 before rounding to dt: g is ~1, where bf16's step (2^-8) would swallow a small change of m
        # g ⊙ s·B A h = s · (diag(g) B) A h: fold g into B (d_out×r) rather than scaling tokens×d_out
        return add_update(out + (g - 1).to(dt) * wx, a, (g[:, None] * self.lora_B).to(dt), self.scale,
                          (*x.shape[:-1], self.out_features))

    def merge(self) -> None:
        """W ← g ⊙ (W + s·BA) row-wise; the bias is outside the magnitude in DoRA and stays as is."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        with torch.no_grad():
            g = self.magnitude / self.weight_norm()
            w = self.base.weight
            new = g[:, None] * (w.to(g.dtype) + self.scale * self.lora_B @ self.lora_A)
            w.copy_(new.to(w.dtype))
            self._merged_gain = g  # the norm depends on W, which merge overwrites: keep g for unmerge
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        with torch.no_grad():
            g, w = self._merged_gain, self.base.weight
            old = w.to(g.dtype) / g[:, None] - self.scale * self.lora_B @ self.lora_A
            w.copy_(old.to(w.dtype))
            self._merged_gain = None
        self.merged = False


class MoSLoRALinear(LoRALinear):
    """MoSLoRA (Wu et al. 2024, Mixture-of-Subspaces LoRA): ΔW = (α/r) · B M A with a learnable r×r mixer M.

    M (`mixer`) kaiming-uniform(a=√5), A as LoRA, B = 0. Computed as (B M) A x: B M is d_out×r, so the
    cost is LoRA's, and everything else (forward, merge) is LoRA's with B M in place of B.
    Trainable: r(d_in + d_out) + r². Mergeable.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        super().__init__(base, r, alpha, dropout)  # LoRA's A, B and their init
        self.mixer = nn.Parameter(torch.empty(r, r, **self.factory()))
        nn.init.kaiming_uniform_(self.mixer, a=math.sqrt(5))

    def up(self) -> torch.Tensor:
        return self.lora_B @ self.mixer


class MoELoRALinear(AdapterLinear):
    """MoELoRA (Liu et al. 2023), eq. 2: o = W x + (α/r) Σ_i G_i(x) B_i A_i drop(x), N full LoRA experts.

    lora_A (N×r×d_in, each kaiming-uniform a=√5), lora_B (N×d_out×r, zeros), router W_r (N×d_in) on the
    undropped x. Like MoR it runs as one rank-N·r LoRA: z = (G ⊗ 1_r) ⊙ ([A_1;…;A_N] x) and
    ΔW x = (α/r) [B_1 … B_N] z. Trainable: N r(d_in + d_out) + N d_in = 2Ndr + Nd (Table 2, the router
    counted with d_in). Not mergeable: G depends on x.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, num_experts: int = 2,
                 dropout: float = 0.05, router: str = "learned"):
        super().__init__(base, r, alpha, dropout)
        fk = self.factory()
        init_router(self, router, num_experts, fk)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, **fk))
        for A in self.lora_A:  # per expert, so the fan-in is d_in (not r·d_in of the 3-d tensor)
            init_lora_A(A)

    def merge(self) -> None:
        raise RuntimeError("MoELoRA cannot be merged into W: the router weights G(x) depend on each input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, r = self.num_experts, self.r
        x2 = x.reshape(-1, self.in_features)
        out = self.base(x2)
        dt = out.dtype
        xa = cast(x2, dt)
        a = F.linear(self.dropout(xa), self.lora_A.reshape(N * r, -1).to(dt))  # (tokens, N·r)
        logits = F.linear(xa, self.router.weight.to(dt)) if self.router is not None else None
        G = route(self, logits, xa).to(dt)  # (tokens, N)
        z = (G[:, :, None] * a.reshape(-1, N, r)).reshape(-1, N * r)
        up = self.lora_B.permute(1, 0, 2).reshape(self.out_features, N * r).to(dt)  # [B_1 … B_N]
        return add_update(out, z, up, self.scale, (*x.shape[:-1], self.out_features))


# -----------------------------------------------------------------------------
# MoR

class MoRLinear(AdapterLinear):
    """Mixture of Ranks (paper §3): one shared LoRA (A, B) seen through N learned diagonal scalings.

    eq. 6 (the idea): a transformed LoRA B'A' = Λ_B B Λ_Bᵀ Λ_A A Λ_Aᵀ reaches a higher-rank subspace;
    absorbing Λ_Bᵀ and Λ_A and moving Λ_Aᵀ into the router leaves Λ_B B Λ_A A (eqs. 7–9).
    Expert i is the direction D_i = (α/r) diag(Ω_B[i]) B diag(Ω_A[i]) A (eq. 10), mixed by the router
    G(x) = softmax(W_r x) (eq. 11):

        o = W x + (α/r) Σ_i G_i(x) · Ω_B[i] ⊙ (B (Ω_A[i] ⊙ (A · drop(x))))       (eqs. 12, 15)

    Parameters (names of the paper): lora_A (r×d_in), lora_B (d_out×r), omega_A (N×r), omega_B (N×d_out),
    router = W_r = nn.Linear(d_in, N, bias=False) (absent for router="mean").
    Trainable: r(d_in + d_out) + N(d_in + d_out + r) = 2dr + N(2d + r) (Table 2).

    Why the forward is one matmul (Fig. 3's "vector stack", made exact): eq. 15 is a LoRA of rank N·r with
    tied factors. With z = G(x) ⊗ (A x) ∈ R^{N·r} (z[i·r + j] = G_i (A x)_j) and
    B̃ = [diag(Ω_B[1]) B diag(Ω_A[1]), …, diag(Ω_B[N]) B diag(Ω_A[N])] ∈ R^{d_out×N·r}, the sum over
    experts is the inner product of that matmul: ΔW x = (α/r) B̃ z. So the cost is A x (r·d_in),
    W_r x (N·d_in), one outer product of N·r numbers per token, and a single GEMM into d_out, instead of
    N GEMMs and a (tokens, N, d_out) tensor that a per-expert loop would write and read. Ω_A sits in B̃,
    not in z: building B̃ costs d_out·N·r once per forward, independent of tokens, whereas scaling z
    would cost a pass over tokens × N·r (the α/r scale is folded into B̃ for the same reason). The add
    into W x rides in the GEMM's beta (in place, see add_update), so ΔW x is never stored on its own.
    Training memory: with dropout on, x rather than drop(x) is kept for the backward (DroppedLinear),
    since the router keeps x anyway; B̃'s fp32 intermediates are recomputed, not kept (TiedUp).

    Init (Table 2: A, R ~ random, B = 0): A kaiming-uniform(a=√5) as PEFT, router nn.Linear's default,
    B = 0, Ω_A = Ω_B = 1, so at step 0 the layer equals the base and every expert is the same LoRA.
    (The paper leaves Ω's init open. Ω_B must not start at 0 together with B = 0: ∂L/∂B ∝ Ω_B and
    ∂L/∂Ω_B ∝ B, so neither would ever move.)

    Eval mode with gradients off caches B̃ and the fused [A; W_r] (invalidated by train() and eval(), .to(),
    and any in-place update of a parameter, which bumps its version counter; an update through `.data`
    bypasses that counter, so call eval() again after one), so decoding costs one rank-N·r LoRA plus
    the router.
    MoR cannot be merged into W (the paper's stated limitation): G depends on x.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, num_experts: int = 8,
                 dropout: float = 0.05, router: str = "learned"):
        super().__init__(base, r, alpha, dropout)
        fk = self.factory()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fk))
        init_lora_A(self.lora_A)
        # eqs. 7, 8: Λ_A = diag(λ_A) (r×r), Λ_B = diag(λ_B) (d_out×d_out), kept as their diagonals;
        # eq. 14: the N experts' λ_A, λ_B stacked as rows: Ω_A ∈ R^{N×r}, Ω_B ∈ R^{N×d_out}
        self.omega_A = nn.Parameter(torch.ones(num_experts, r, **fk))
        self.omega_B = nn.Parameter(torch.ones(num_experts, self.out_features, **fk))
        init_router(self, router, num_experts, fk)  # eq. 11's W_r
        self._cache = None

    def direction(self, i: int) -> torch.Tensor:
        """D_i = (α/r) Λ_B_i B Λ_A_i A (eq. 10) as a d_out×d_in matrix, for analysis.

        With N = 1 this is eq. 9's single transformed LoRA (α/r) Λ_B B Λ_A A.
        """
        return self.scale * (self.omega_B[i][:, None] * self.lora_B * self.omega_A[i]) @ self.lora_A

    def merge(self) -> None:
        raise RuntimeError("MoR cannot be merged into W: the router weights G(x) depend on each input "
                           "(the paper's stated limitation). In eval mode MoRLinear caches B̃ instead.")

    def up_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(α/r) B̃ = (α/r) [diag(Ω_B[i]) B diag(Ω_A[i])]_i ∈ R^{d_out×N·r} in dtype (eq. 15 stacked; TiedUp)."""
        return TiedUp.apply(self.lora_B, self.omega_A, self.omega_B, self.scale, dtype)

    def down_weight(self) -> torch.Tensor:
        """[A; W_r] ((r+N)×d_in): one GEMM for A x and W_r x when dropout is off (both read the same x)."""
        return self.lora_A if self.router is None else torch.cat([self.lora_A, self.router.weight])

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, (α/r) B̃) in the compute dtype; cached in eval mode with gradients off (see class doc)."""
        use_cache = not torch.compiler.is_compiling() and not self.training and not torch.is_grad_enabled()
        # the parameters read by attribute on every call (cheap, and a replaced Parameter is seen); the device is
        # covered by _apply (.to(), .cuda()) and by data_ptr
        params = (self.lora_A, self.lora_B, self.omega_A, self.omega_B) + (
            (self.router.weight,) if self.router is not None else ())
        # tensors made under torch.inference_mode() have no version counter to key on: no cache for them
        if not use_cache or any(p.is_inference() for p in params):
            return self.down_weight().to(dtype), self.up_weight(dtype)
        key = (dtype,) + tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, (self.down_weight().to(dtype), self.up_weight(dtype)))
        return self._cache[1]

    def train(self, mode: bool = True) -> MoRLinear:
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, r = self.num_experts, self.r
        x2 = x.reshape(-1, self.in_features)  # tokens × d_in: the base output is then a matrix add_update can own
        out = self.base(x2)  # eq. 13: W x (+ bias), frozen
        dt = out.dtype  # the compute dtype (see the module doc)
        xa = cast(x2, dt)
        if self.dropout_active():
            # A · drop(x), keeping x (which the router keeps anyway) rather than drop(x) for the backward
            a = DroppedLinear.apply(xa, self.lora_A.to(dt), self.dropout.p)
            # the router sees the undropped x
            logits = F.linear(xa, self.router.weight.to(dt)) if self.router is not None else None
            up = self.up_weight(dt)
        else:
            down, up = self.weights(dt)
            a_logits = F.linear(xa, down)  # A x and W_r x in one GEMM
            a, logits = a_logits[:, :r], (a_logits[:, r:] if self.router is not None else None)
        G = route(self, logits, xa).to(dt)  # eq. 11: (tokens, N)
        # eq. 15: z = G ⊗ (A x), the N experts' rank-r codes side by side (each expert's Ω_A is in B̃)
        z = (G[:, :, None] * a[:, None, :]).reshape(-1, N * r)
        # eqs. 12, 15: Σ_i G_i(x) D_i x = (α/r) B̃ z, added into W x by one GEMM (α/r is already in `up`)
        return add_update(out, z, up, 1.0, (*x.shape[:-1], self.out_features))


# -----------------------------------------------------------------------------
# model-level helpers

METHODS = {"lora": LoRALinear, "dora": DoRALinear, "moslora": MoSLoRALinear,
           "moelora": MoELoRALinear, "mor": MoRLinear}


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def add_adapters(model: nn.Module, method: str, targets=("w1", "w2", "w3"), **hyper) -> list[str]:
    """Replace every nn.Linear whose qualified name ends with a target by `method`'s adapter layer.

    A target matches the last name component ("w1") or a dotted suffix ("feed_forward.w1").
    Freezes every parameter that is not an adapter parameter. Sets model.adapter_config =
    {"method", "targets", **hyper with the layer's defaults filled in} (what save_adapter stores).
    Returns the replaced names. Raises if a target matches no nn.Linear or the model already has adapters.
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; choose from {sorted(METHODS)}")
    if isinstance(targets, str):
        targets = (targets,)
    if adapter_layers(model):
        raise RuntimeError("model already has adapters; build a fresh model to add different ones")
    cls = METHODS[method]
    sig = inspect.signature(cls.__init__)
    known = [p for p in sig.parameters if p not in ("self", "base")]
    bad = sorted(set(hyper) - set(known))
    if bad:
        raise TypeError(f"{method}: unknown hyper-parameter(s) {bad}; accepted: {known}")
    hyper = {k: hyper.get(k, sig.parameters[k].default) for k in known}

    def matches(name: str, t: str) -> bool:
        return name == t or name.endswith("." + t)

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmatched = [t for t in targets if not any(matches(n, t) for n in linears)]
    if unmatched:
        raise ValueError(f"target(s) {unmatched} match no nn.Linear in the model; "
                         f"nn.Linear names look like {list(linears)[:6]}")
    names = [n for n in linears if any(matches(n, t) for t in targets)]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(linears[name], **hyper))
    model.adapter_config = {"method": method, "targets": list(targets), **hyper}
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only (not the frozen bases), keyed by their names in model.state_dict()."""
    return {f"{ln}.{n}" if ln else n: p.detach() for ln, m in adapter_layers(model) for n, p in m.adapter_parameters()}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a model that has the same adapters; strict on names and shapes."""
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise RuntimeError("adapter state dict does not match the model:"
                           f"\n  missing keys: {missing}\n  unexpected keys: {unexpected}\n  mis-shaped: {shapes}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])


def save_adapter(model: nn.Module, path: str | None) -> dict:
    """The adapter file: {"config": model.adapter_config, "state_dict": ...}, written to path (a temp file renamed
    into place, so a kill never leaves half a file) and returned.

    For adapter_config {"method": "full"} (full fine-tuning, no adapters) the state dict is the whole
    model.state_dict(); otherwise only the adapter weights. Sharded parameters (FSDP2's DTensors) are gathered,
    which is a collective: then every process calls this, and all but one pass path=None.
    """
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise RuntimeError("model has no adapter_config: call add_adapters() (or set {'method': 'full'}) first")
    sd = model.state_dict() if config["method"] == "full" else adapter_state_dict(model)
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in sd.items()}
    payload = {"config": dict(config), "state_dict": sd}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)
    return payload


def load_adapter(model: nn.Module, path: str) -> dict:
    """Load a save_adapter() file into a model: adds the adapters it describes, then loads their weights. A model
    that already has adapters (as when training resumes) must have the file's config; only weights are loaded.

    For method "full" the whole model.state_dict() is loaded (strict). Returns the config. A file that is not
    an adapter file (truncated, other bytes) raises ValueError naming it.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:   # truncated zip, empty file, other bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "file ends early"
        raise ValueError(f"{path}: not a readable adapter file ({type(e).__name__}: {reason[:120]})") from None
    if not (isinstance(ckpt, dict) and "config" in ckpt and "state_dict" in ckpt):
        raise ValueError(f"{path}: not a save_adapter() file (expected keys 'config' and 'state_dict')")
    config = dict(ckpt["config"])
    own = getattr(model, "adapter_config", None)
    if own is not None and own != config:
        raise ValueError(f"{path}: the file holds adapters {config}, the model already has {own}")
    if config.get("method") == "full":
        model.load_state_dict(ckpt["state_dict"])
        model.adapter_config = config
        return config
    if own is None:
        hyper = {k: v for k, v in config.items() if k not in ("method", "targets")}
        add_adapters(model, config["method"], tuple(config["targets"]), **hyper)
    try:
        load_adapter_state_dict(model, ckpt["state_dict"])
    except RuntimeError as e:
        raise RuntimeError(f"{path}: {e}") from None
    return config


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Σ over layers of the last forward's Switch balance loss (router="balanced"); 0 when there is none."""
    losses = [m.aux_loss for _, m in adapter_layers(model) if getattr(m, "aux_loss", None) is not None]
    if losses:
        return torch.stack(losses).sum()
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on the meta device."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


# -----------------------------------------------------------------------------
# python mor.py --params params.json: Table 2's parameter counts

LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}

# (label, method, hyper, paper's "# Params" for LLaMA-2-7B: Table 1, Table 4's mean pooling)
TABLE = [
    ("LoRA R8", "lora", dict(r=8), "11.6M"),
    ("LoRA R16", "lora", dict(r=16), "23.2M"),
    ("DoRA R8", "dora", dict(r=8), "12.3M"),
    ("DoRA R16", "dora", dict(r=16), "23.9M"),
    ("MoSLoRA R8", "moslora", dict(r=8), "-"),
    ("MoELoRA E2R8", "moelora", dict(r=8, num_experts=2), "24.7M"),
    ("MoR E1R8", "mor", dict(r=8, num_experts=1), "12.9M"),
    ("MoR E2R8", "mor", dict(r=8, num_experts=2), "14.3M"),
    ("MoR E4R8", "mor", dict(r=8, num_experts=4), "17.7M"),
    ("MoR E8R8", "mor", dict(r=8, num_experts=8), "23.2M"),
    ("MoR E8R8 mean", "mor", dict(r=8, num_experts=8, router="mean"), "17.4M"),
]

# Table 2 with d_in, d_out kept apart (the paper's square d×d case: d_in = d_out = d)
FORMULAS = {
    "lora": ("2dr", "r(d_in+d_out)", lambda i, o, r, N, rt: r * (i + o)),
    "dora": ("2dr + d", "r(d_in+d_out) + d_out", lambda i, o, r, N, rt: r * (i + o) + o),
    "moslora": ("2dr + r^2", "r(d_in+d_out) + r^2", lambda i, o, r, N, rt: r * (i + o) + r * r),
    "moelora": ("2Ndr + Nd", "N r(d_in+d_out) + N d_in", lambda i, o, r, N, rt: N * r * (i + o) + N * i),
    "mor": ("2dr + N(2d + r)", "r(d_in+d_out) + N(d_in+d_out+r)",
            lambda i, o, r, N, rt: r * (i + o) + N * ((0 if rt == "mean" else i) + o + r)),
}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4·dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_stack(params: dict, device: str = "meta") -> nn.Module:
    """Stand-in for a LLaMA's adapted part: layers[i].feed_forward.w1/w2/w3 as bias-free nn.Linear."""
    dim = params["dim"]
    hidden = ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))

    def ffn():
        return nn.ModuleDict({"w1": nn.Linear(dim, hidden, bias=False, device=device),
                              "w2": nn.Linear(hidden, dim, bias=False, device=device),
                              "w3": nn.Linear(dim, hidden, bias=False, device=device)})
    return nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"feed_forward": ffn()})
                                                  for _ in range(params["n_layers"]))})


def parameter_table(params: dict, targets=("w1", "w2", "w3")) -> list[dict]:
    """Trainable parameters of each method on the FFN stand-in (meta device) next to Table 2's formula."""
    rows = []
    for label, method, hyper, paper in TABLE:
        model = ffn_stack(params)
        add_adapters(model, method, targets, **hyper)
        cfg = model.adapter_config
        formula = sum(FORMULAS[method][2](m.in_features, m.out_features, cfg["r"], cfg.get("num_experts", 1),
                                          cfg.get("router")) for _, m in adapter_layers(model))
        table2, general = FORMULAS[method][:2]
        if cfg.get("router") == "mean":  # no router W_r: the N·d_in term drops out
            table2, general = "2dr + N(d + r)", "r(d_in+d_out) + N(d_out+r)"
        rows.append(dict(label=label, method=method, trainable=count_parameters(model)[0], formula=formula,
                         table2=table2, general=general, paper=paper))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Trainable parameters per adapter method (paper Table 2), "
                                             "counted on the meta device for LLaMA FFN layers w1/w2/w3.")
    ap.add_argument("--params", default=None, help="Meta params.json (default: LLaMA-2-7B's values)")
    ap.add_argument("--targets", default="w1,w2,w3", help="comma-separated nn.Linear names to adapt")
    args = ap.parse_args(argv)
    params = dict(LLAMA2_7B)
    if args.params is not None:
        if not os.path.isfile(args.params):
            raise SystemExit(f"--params: no such file {args.params}")
        with open(args.params) as f:
            params = json.load(f)
        for k in ("dim", "n_layers"):
            if k not in params:
                raise SystemExit(f"{args.params}: missing key {k!r}")
    is_7b = (params["dim"], params["n_layers"], params.get("multiple_of", 256),
             params.get("ffn_dim_multiplier")) == (4096, 32, 256, None)
    hidden = ffn_hidden_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    print(f"dim {params['dim']}, hidden {hidden}, {params['n_layers']} layers, targets {args.targets}")
    print(f"{'method':<15}{'trainable':>13}{'':>9}  {'Table 2':<17}{'as d_in, d_out':<34}{'formula':>13}  ok"
          + ("  paper" if is_7b else ""))
    for row in parameter_table(params, tuple(args.targets.split(","))):
        print(f"{row['label']:<15}{row['trainable']:>13,}{row['trainable'] / 1e6:>8.2f}M  {row['table2']:<17}"
              f"{row['general']:<34}{row['formula']:>13,}  {'yes' if row['formula'] == row['trainable'] else 'NO'}"
              + (f"  {row['paper']}" if is_7b else ""))


if __name__ == "__main__":
    main()
