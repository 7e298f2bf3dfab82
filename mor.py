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
    eq. 10     MoRLinear.direction (D_i as a matrix); MoRLinear.reference (D_i x, one expert at a time)
    eq. 11     gate (the softmax router G(x) = softmax(W_r x)); route also records it for the loss and Fig. 7
    eq. 12     MoRLinear.reference (the mixture Σ_i G_i(x) D_i x, literally)
    eq. 13     MoRLinear.reference / forward (out = self.base(x)); AdapterLinear docstring: o = W x + ΔW x
    eq. 14     MoRLinear.__init__ (λ_A, λ_B stacked into Ω_A ∈ R^{N×r}, Ω_B ∈ R^{N×d_out})
    eq. 15     MoRLinear.forward, under "fast path": tied_up (B̃), StackedMixture (the one-GEMM form of Fig. 3)
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


def add_update(out: torch.Tensor, z: torch.Tensor, up: torch.Tensor, scale: float, shape: tuple) -> torch.Tensor:
    """out += scale · z upᵀ, in place, as one GEMM with beta = 1 (addmm_); returns it viewed as `shape`.

    out: (tokens, d_out), a fresh matrix the caller owns: the base layer's output on the flattened input
    (nn.Linear's backward does not need its output, so writing into it is safe for autograd; it must not
    be a view, or autograd would track the write with copies). z: (tokens, k) adapter code; up: (d_out, k).
    In place because out-of-place addmm first copies out into a new tensor: a full extra read and write
    of tokens × d_out, which costs more than the rank-k GEMM itself. ΔW x is never stored on its own.
    """
    return out.addmm_(z, up.t(), alpha=scale).view(shape)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an nn.Linear computes x in: autocast's, where it casts x (floating, not fp64), else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


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


def gate(logits: torch.Tensor | None, num_experts: int, x: torch.Tensor,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Router weights G(x) ∈ R^{tokens×N} (eq. 11, Table 4), in `dtype`, by default fp32 for bf16 safety (fp64
    for an fp64 x).

    "learned" / "balanced": G_i(x) = exp(h_i) / Σ_j exp(h_j), h = W_r x (logits: tokens × N, on the undropped x).
    "mean" (logits None): G_i = 1/N, no router parameters.
    """
    dt = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if logits is None:
        return torch.full((x.shape[0], num_experts), 1.0 / num_experts, device=x.device, dtype=dt)
    return torch.softmax(logits, dim=-1, dtype=dt)


def note_routing(layer: nn.Module, G: torch.Tensor) -> None:
    """What a layer keeps of its routing: the Switch balance loss of this forward (router="balanced", training)
    as layer.aux_loss, and, when layer.record_router, the running sums behind Fig. 7 (router_sum / router_count).

    aux_loss is a tensor of this step's graph: read it (balance_loss) in the same step, before the next forward,
    which also holds under CUDA-graph replay, where the next replay overwrites it.
    """
    aux = balance_aux_loss(G) if layer.router_kind == "balanced" and layer.training else None
    if aux is not None or layer.aux_loss is not None:  # nn.Module.__setattr__ is slow: skip None -> None
        layer.aux_loss = aux
    if layer.record_router:
        with torch.no_grad():  # buffers updated in place, no Python number: a compiled block does not recompile
            layer.router_sum += G.sum(0).to(layer.router_sum.dtype)
            layer.router_count += G.shape[0]


def route(layer: nn.Module, logits: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """G(x) of eq. 11 for MoR / MoELoRA (`gate`), noted by `note_routing`. x, logits: flattened to tokens."""
    G = gate(logits, layer.num_experts, x)
    note_routing(layer, G)
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
    layer.register_buffer("router_count", torch.zeros((), dtype=torch.int64, device=fk["device"]), persistent=False)


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
        a = F.linear(self.dropout(x2.to(dt)), self.lora_A.to(dt))
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
            h = self.dropout(x2.to(dt))
            wx = F.linear(h, self.base.weight)
        else:
            h = x2.to(dt)
            wx = out if self.base.bias is None else out - self.base.bias.to(dt)
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
        xa = x2.to(dt)
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

    eq. 6 (the idea): a transformed LoRA Λ_B B Λ_Bᵀ Λ_A A Λ_Aᵀ reaches a higher-rank subspace; absorbing
    Λ_Bᵀ and Λ_A and moving Λ_Aᵀ into the router leaves Λ_B B Λ_A A (eqs. 7–9). Expert i is the direction
    D_i = (α/r) diag(Ω_B[i]) B diag(Ω_A[i]) A (eq. 10), mixed per token by G(x) = softmax(W_r x) (eq. 11):

        o = W x + (α/r) Σ_i G_i(x) · Ω_B[i] ⊙ (B (Ω_A[i] ⊙ (A · drop(x))))       (eqs. 12, 13)

    Parameters (the paper's names): lora_A (r×d_in), lora_B (d_out×r), omega_A (N×r), omega_B (N×d_out),
    router = W_r = nn.Linear(d_in, N, bias=False) (absent for router="mean"). Trainable: 2dr + N(2d + r).
    Init (Table 2: A, R random, B = 0): A kaiming-uniform(a=√5) as PEFT, router nn.Linear's default, B = 0,
    Ω_A = Ω_B = 1: at step 0 the layer is the base and every expert the same LoRA. (The paper leaves Ω's
    init open; Ω_B must not start at 0 with B = 0: ∂L/∂B ∝ Ω_B and ∂L/∂Ω_B ∝ B would both stay 0.)
    Not mergeable into W (the paper's stated limitation): G depends on x.
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
        self._cache, self.generation = None, 0  # the eval cache (cached_weights), counted each rebuild or drop

    def direction(self, i: int) -> torch.Tensor:
        """D_i = (α/r) Λ_B_i B Λ_A_i A (eq. 10) as a d_out×d_in matrix, for analysis (N = 1: eq. 9)."""
        return self.scale * (self.omega_B[i][:, None] * self.lora_B * self.omega_A[i]) @ self.lora_A

    def merge(self) -> None:
        raise RuntimeError("MoR cannot be merged into W: the router weights G(x) depend on each input "
                           "(the paper's stated limitation). In eval mode MoRLinear caches B̃ instead.")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """MoR as the paper writes it (eqs. 10–13), one expert at a time: the definition `forward` is tested against."""
        x2 = x.reshape(-1, self.in_features)
        out = self.base(x2)  # eq. 13: W x (+ b), frozen
        dt = out.dtype  # adapters compute in the base output's dtype (module doc)
        x2 = x2.to(dt)
        A, B, omega_A, omega_B = (p.to(dt) for p in (self.lora_A, self.lora_B, self.omega_A, self.omega_B))
        h = self.dropout(x2)  # drop(x): the adapter's input only, not the router's
        logits = F.linear(x2, self.router.weight.to(dt)) if self.router is not None else None
        G = route(self, logits, x2).to(dt)  # eq. 11: G(x) = softmax(W_r x), (tokens, N)
        for i in range(self.num_experts):
            # eq. 10: D_i x = (α/r) Ω_B[i] ⊙ (B (Ω_A[i] ⊙ (A drop(x))))
            D_i_x = self.scale * omega_B[i] * F.linear(omega_A[i] * F.linear(h, A), B)
            out = out + G[:, i:i + 1] * D_i_x  # eq. 12: Σ_i G_i(x) D_i x
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same numbers as `reference`, computed as one rank-N·r GEMM (eq. 15, Fig. 3); why below."""
        x2 = x.reshape(-1, self.in_features)  # tokens × d_in: the base output is then a matrix add_update can own
        x2 = x2.to(autocast_dtype(x2))  # autocast's cast of x, done once: the base and the adapter share it
        out = self.base(x2)  # eq. 13: W x (+ bias), frozen
        dt = out.dtype
        x2 = x2.to(dt)
        if not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            down, up = cached_weights(self, dt)  # decoding: B̃ and [A; W_r] built once, not per token
            a, logits, _ = down_project(x2, down, self.r, self.router is not None)
            z, G = stacked_codes(a, logits, self.num_experts, self.scale)
        else:
            p = self.dropout.p if self.dropout_active() else 0.0
            W_r = self.router.weight if self.router is not None else None
            z, G, up = StackedMixture.apply(x2, self.lora_A, W_r, self.lora_B, self.omega_A, self.omega_B, p, self.scale)
        note_routing(self, G)
        # eqs. 12, 15: (α/r) Σ_i G_i(x) D_i x = B̃ z, added into W x by one GEMM (α/r is already in z)
        return add_update(out, z, up, 1.0, (*x.shape[:-1], self.out_features))

    def drop_cache(self) -> None:
        self._cache, self.generation = None, self.generation + 1

    def train(self, mode: bool = True) -> MoRLinear:
        self.drop_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.drop_cache()
        return super()._apply(fn, *args, **kwargs)


# -----------------------------------------------------------------------------
# fast path: same math as `reference`
#
# eq. 15 is a LoRA of rank N·r with tied factors. With the codes z = (α/r) G(x) ⊗ (A x) ∈ R^{N·r}
# (z[i·r + j] = (α/r) G_i (A x)_j) and B̃ = [diag(Ω_B[1]) B diag(Ω_A[1]), …, diag(Ω_B[N]) B diag(Ω_A[N])]
# ∈ R^{d_out×N·r}, the sum over experts is the inner product of one GEMM: (α/r) Σ_i G_i D_i x = B̃ z. So MoR
# costs A x and W_r x (one GEMM when dropout is off), an outer product of N·r numbers per token and one GEMM into
# d_out, instead of N GEMMs and a (tokens, N, d_out) tensor. Ω_A sits in B̃ (d_out·N·r work, independent of
# tokens), not in z; α/r rides in the outer product's alpha (a free scalar of a batched GEMM): no kernel of its own.
#
#   x ──┬── W ─────────────────────────────────────────┐
#       ├── drop ── A ──┐                              + ── o
#       └── W_r ── softmax ── G ⊗ (A x) = z ── B̃ ───────┘

def tied_up(B: torch.Tensor, omega_A: torch.Tensor, omega_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B̃ ∈ R^{d_out×N·r} in `dtype`: B̃[:, i·r + j] = Ω_B[i] ⊙ B[:, j] · Ω_A[i, j] (eq. 15 stacked; α/r is in z)"""
    (d_out, r), N = B.shape, omega_A.shape[0]
    out = torch.empty(d_out, N, r, device=B.device, dtype=dtype)  # the last product writes the compute dtype
    return torch.mul(B[:, None, :] * omega_A, omega_B.t()[:, :, None], out=out).view(d_out, N * r)


def down_project(x: torch.Tensor, down: torch.Tensor, r: int, routed: bool,
                 p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(A drop(x), W_r x, dropout mask) from [A; W_r] (`down_factors`): one GEMM when dropout is off; with
    dropout the router still reads the undropped x, and the mask is F.dropout's own (native_dropout), so the
    RNG stream is the same as `reference`'s."""
    if p > 0:
        h, keep = torch.native_dropout(x, p, True)
        return F.linear(h, down[:r]), (F.linear(x, down[r:]) if routed else None), keep
    a_logits = F.linear(x, down)
    return a_logits[:, :r], (a_logits[:, r:] if routed else None), None


def outer(u: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha · u v per token (u: t×m×k, v: t×k×n): eager, a batched GEMM whose alpha does the scaling in the same
    kernel (beta = 0: the input is ignored); compiled, bmm and a multiply, which inductor fuses into the neighbouring
    kernels where it lowers baddbmm on its own (4 more kernels per two layers)."""
    if torch.compiler.is_compiling():
        return torch.bmm(u, v) * alpha
    return torch.baddbmm(u.new_empty(()), u, v, beta=0, alpha=alpha)


def softmax_backward(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """∂logits = G ⊙ (g − Σ_k G_k g_k) over the last dim (G = softmax(logits), g = ∂G). torch's own kernel, one
    launch working in fp32 inside, where it exists: written out in bf16 the router's gradient was 1.2–1.4 × further
    from fp64 (docs/performance.md); the written-out form is the fallback for a torch without it."""
    own = getattr(torch, "_softmax_backward_data", None)
    if own is None:
        return G * (g - (G * g).sum(-1, keepdim=True))
    return own(g, G, -1, G.dtype)


def stacked_codes(a: torch.Tensor, logits: torch.Tensor | None, num_experts: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, G): G of eq. 11 and z = (α/r) G ⊗ (A x) (tokens × N·r, eq. 15), in a's dtype."""
    G = gate(logits, num_experts, a, a.dtype)
    return outer(G[:, :, None], a[:, None, :], scale).view(-1, num_experts * a.shape[1]), G


def down_factors(A: torch.Tensor, W_r: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[A; W_r] ((r + N) × d_in) in `dtype`: A x and W_r x read the same x, so they are one GEMM."""
    if W_r is None:
        return A.to(dtype)
    return torch.cat([A, W_r], out=torch.empty(A.shape[0] + W_r.shape[0], A.shape[1], dtype=dtype, device=A.device))


def cached_weights(layer: MoRLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """([A; W_r], B̃) in eval mode with gradients off, rebuilt only when a parameter changed.

    Keyed on each parameter's version counter (bumped by in-place updates such as an optimizer step), data
    pointer and dtype; dropped by train(), eval() and .to(). An update through `.data` bypasses the counter:
    call eval() again after one. Parameters made under torch.inference_mode() have no counter: no cache.
    """
    W_r = layer.router.weight if layer.router is not None else None
    build = lambda: (down_factors(layer.lora_A, W_r, dtype),  # noqa: E731
                     tied_up(layer.lora_B, layer.omega_A, layer.omega_B, dtype))
    key = weights_key(layer, dtype)
    if key is None:
        return build()
    if layer._cache is None or layer._cache[0] != key:
        layer._cache, layer.generation = (key, build()), layer.generation + 1
    return layer._cache[1]


def weights_key(layer: MoRLinear, dtype: torch.dtype) -> tuple | None:
    """What the eval cache is keyed on: dtype, and each parameter's version counter, data pointer and dtype; None for
    parameters made under torch.inference_mode() (no counter, so no cache)."""
    params = [layer.lora_A, layer.lora_B, layer.omega_A, layer.omega_B]
    params += [layer.router.weight] if layer.router is not None else []
    if any(p.is_inference() for p in params):
        return None
    return (dtype,) + tuple((p._version, p.data_ptr(), p.dtype) for p in params)


def decode_state(model: nn.Module) -> tuple:
    """What a CUDA graph captured over MoR's eval cache depends on: per MoRLinear, the cache's generation (bumped
    when cached_weights rebuilds it and when train(), eval() or .to() drop it) and whether the parameters are still
    the ones it was built from. A graph replays the cached B̃ and [A; W_r] by address, so replay it only while this
    equals its value just after the capture; otherwise it reads freed memory or stale weights: capture again."""
    return tuple((m.generation, m._cache is not None and m._cache[0] == weights_key(m, m._cache[0][0]))
                 for _, m in adapter_layers(model) if isinstance(m, MoRLinear))


class StackedMixture(torch.autograd.Function):
    """(z, G, B̃) for `MoRLinear.forward`: the router, the codes and B̃ as one autograd node.

    Why by hand: plain autograd runs ~2.4× LoRA's kernels per layer (each small op is a node and a launch
    on a GPU), keeps drop(x) besides x, and B̃'s fp32 intermediate. Here the backward keeps x, the 1-byte
    dropout mask, A x (tokens × r), G (tokens × N) and [A; W_r] in the compute dtype, and recomputes x ⊙ mask
    and B̃'s intermediate. G is in the compute dtype (softmax kernels accumulate in fp32 anyway). Dropout's
    backward is written out (x ⊙ mask, its 1/(1-p) carried by ∂a); softmax's is torch's (softmax_backward).
    """

    @staticmethod
    def forward(ctx, x, A, W_r, B, omega_A, omega_B, p: float, scale: float):
        dt = x.dtype
        down = down_factors(A, W_r, dt)
        a, logits, keep = down_project(x, down, A.shape[0], W_r is not None, p)
        z, G = stacked_codes(a, logits, omega_A.shape[0], scale)
        ctx.save_for_backward(x, keep, a, G, down, B, omega_A, omega_B)
        ctx.p, ctx.scale, ctx.router, ctx.master = p, scale, W_r is not None, A.dtype
        ctx.set_materialize_grads(False)  # G's gradient is None unless a balance loss used it
        return z, G, tied_up(B, omega_A, omega_B, dt)

    @staticmethod
    def backward(ctx, gz, gG, gup):
        # autocast off: eager runs a backward without it, but torch.compile traces the backward under the forward's
        # autocast, which would round the factor products below to bf16; the dtypes here are the ones written
        x, keep, a, G, down, B, omega_A, omega_B = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            (r, N), s = (a.shape[1], G.shape[1]), ctx.scale
            if gz is None or gup is None:  # only a balance loss was differentiated (a test's case, not training's)
                gz = a.new_zeros(a.shape[0], N * r) if gz is None else gz
                gup = B.new_zeros(B.shape[0], N * r, dtype=a.dtype) if gup is None else gup
            q = 1.0 / (1.0 - ctx.p)  # drop(x) = x ⊙ keep · q: q rides in ∂a, so the masked products need no scaling
            # z = s G ⊗ a: ∂a = s Σ_i G_i ∂z_i, ∂G_i = s ∂z_i · a (batched GEMMs over tokens)
            gz = gz.view(-1, N, r)
            ga = outer(G[:, None, :], gz, s * q).squeeze(1)
            glogits = None
            if ctx.router:
                gGz = outer(gz, a[:, :, None], s).squeeze(2)
                glogits = softmax_backward(gGz if gG is None else gGz + gG, G)
            # [A; W_r] read drop(x) and x: the weight gradients (cast once, together, to the parameters' dtype) and x's
            want_gx = ctx.needs_input_grad[0]  # False where x comes from frozen layers only
            if keep is None:
                g_al = ga if glogits is None else torch.cat([ga, glogits], 1)
                g_down, gx = (g_al.t() @ x).to(ctx.master), (g_al @ down if want_gx else None)
            else:
                g_down = torch.empty(down.shape, dtype=ctx.master, device=down.device)
                g_down = torch.cat([ga.t() @ (x * keep)] + ([glogits.t() @ x] if ctx.router else []), out=g_down)
                gx = (ga @ down[:r]) * keep if want_gx else None
                if ctx.router and want_gx:
                    gx = gx.addmm_(glogits, down[r:])
            gA, gW = g_down[:r], (g_down[r:] if ctx.router else None)
            # B̃[o, i, j] = Ω_B[i, o] B[o, j] Ω_A[i, j]: each factor's gradient sums ∂B̃ ⊙ the other two, as a
            # batched GEMM over the experts or rows; ∂B̃ ⊙ B serves Ω_A's and Ω_B's (fp32 from here, by promotion)
            g3 = gup.view(-1, N, r)
            P = (g3 * B[:, None, :]).transpose(0, 1)  # (N, d_out, r)
            gOB = torch.bmm(P, omega_A[:, :, None]).squeeze(2)  # Σ_j
            gOA = torch.bmm(omega_B[:, None, :], P).squeeze(1)  # Σ_o
            gB = torch.bmm(omega_B.t()[:, None, :], g3 * omega_A).squeeze(1)  # Σ_i
            return gx, gA, gW, gB, gOA, gOB, None, None


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
    if unmatched:   # only nn.Linear layers are adapted: name what the target did match (HF GPT-2's Conv1D, ...)
        other = [f"{n} is {type(m).__name__}, not nn.Linear" for n, m in model.named_modules()
                 if n and not isinstance(m, nn.Linear) and any(matches(n, t) for t in unmatched)]
        hint = (f"; {', '.join(other[:3])}: only nn.Linear layers are adapted, so replace those modules by "
                "nn.Linear ones (Conv1D holds the transposed weight: nn.Linear's weight = conv.weight.T)") if other \
            else f"; only nn.Linear layers are adapted, and their names look like {list(linears)[:6]}"
        raise ValueError(f"target(s) {unmatched} match no nn.Linear in the model{hint}")
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
