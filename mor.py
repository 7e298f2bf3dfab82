"""MoR: Mixture of Ranks for low-rank adaptation (Tang et al., §3), and the paper's baselines.

One file, torch only: copy it into any PyTorch project whose model is made of nn.Linear layers.

    add_adapters(model, "mor", targets=("w1", "w2", "w3"), r=8, alpha=32, num_experts=8)
    loss = task_loss + coef * balance_loss(model)  # 0 unless router="balanced"
    save_adapter(model, "adapter.pth"); load_adapter(fresh_model, "adapter.pth")

Where the equations of §3 live:
    eq. 6      MoRLinear docstring (the general transformed LoRA Λ_B B Λ_Bᵀ Λ_A A Λ_Aᵀ)
    eq. 7, 8   MoRLinear.__init__ (the diagonal scalings are the rows of omega_A / omega_B)
    eq. 9, 10  MoRLinear.direction (D_i as a matrix; N = 1: eq. 9), MoRLinear.reference (D_i x)
    eq. 11     gate (G(x) = softmax(W_r x)); note_routing keeps it for the loss and Fig. 7
    eq. 12     MoRLinear.reference (the mixture Σ_i G_i(x) D_i x, literally)
    eq. 13     AdapterLinear; MoRLinear.reference (self.base(x) + ΔW x), StackedMixture (W x + B̃ z)
    eq. 14     MoRLinear.__init__ (λ_A, λ_B stacked into Ω_A ∈ R^{N×r}, Ω_B ∈ R^{N×d_out})
    eq. 15     MoRLinear.forward, "fast path": tied_up (B̃), StackedMixture (Fig. 3's one GEMM)
    Table 2    python mor.py --params params.json (in the project: tools/table2.py)
    Table 4    MoRLinear(router="learned" | "mean" | "balanced")

Dtypes: adapter parameters are fp32 master weights (or the base's dtype if wider); the frozen
base may be bf16. An adapter computes in its base output's dtype (x's, or autocast's: x is cast
once): the small r×d factors are cast down to it, the tokens×d activations never up.
"""
from __future__ import annotations

import inspect
import math
import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("learned", "mean", "balanced")


# --- shared pieces ------------------------------------------------------------
class AdapterLinear(nn.Module):
    """eq. 13: o = W x + ΔW x. The frozen nn.Linear (W and its bias) stays as `.base` (state-dict
    keys `<name>.base.weight`); subclasses train ΔW's factors and implement `forward`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale, self.merged = r, alpha, alpha / r, False
        # as PEFT: dropout on the adapter path only; Identity at p = 0, so those paths can fuse
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factory(self) -> dict:
        """Where new adapter parameters live: the base's device, fp32 master weights."""
        w = self.base.weight
        return dict(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base.")]

    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def merge(self, merge: bool = True) -> None:
        """Fold ΔW into W: the layer then costs exactly a plain nn.Linear (unmerge undoes it)."""
        if self.merged == merge:
            raise RuntimeError(f"adapter is {'already' if merge else 'not'} merged")
        with torch.no_grad():
            self.fold(merge)
        self.merged = merge

    def unmerge(self) -> None:
        self.merge(False)

    def fold(self, merge: bool) -> None:
        """W ± ΔW; the routed layers (MoR, MoELoRA) keep this refusal (MoR: the paper's limitation)."""
        raise RuntimeError(f"{type(self).__name__} cannot be merged into W: the router weights "
                           "G(x) depend on each input (MoRLinear caches B̃ in eval mode instead)")

    def check_merged(self) -> bool:
        """Whether forward is the base alone; raises in training mode (it would train nothing)."""
        if self.merged and self.training:
            raise RuntimeError(f"{type(self).__name__} is merged: call unmerge() before training")
        return self.merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def gate(logits: torch.Tensor | None, num_experts: int, x: torch.Tensor, dtype=None):
    """G(x) = softmax(W_r x) (eq. 11), or 1/N for router "mean"; fp32 unless fp64 x or `dtype`."""
    dt = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if logits is None:
        return torch.full((x.shape[0], num_experts), 1.0 / num_experts, device=x.device, dtype=dt)
    return torch.softmax(logits, dim=-1, dtype=dt)


def note_routing(layer: nn.Module, G: torch.Tensor) -> None:
    """Keep this forward's balance loss as layer.aux_loss (router "balanced", training: read it
    before the next forward), and Fig. 7's sums router_sum / router_count if layer.record_router."""
    aux, N = None, G.shape[-1]
    if layer.router_kind == "balanced" and layer.training:  # Switch Transformer's N Σ_i f_i P_i:
        f = F.one_hot(G.argmax(-1), N).to(G.dtype).mean(0)  # f_i: share of argmax i; P_i: mean G_i
        aux = N * (f * G.mean(0)).sum()  # 1 if uniform, more as routing concentrates (Table 4)
    if aux is not None or layer.aux_loss is not None:  # Module.__setattr__ is slow: skip None->None
        layer.aux_loss = aux
    if layer.record_router:
        with torch.no_grad():  # in place, no Python number: a compiled block never recompiles
            layer.router_sum += G.sum(0).to(layer.router_sum.dtype)
            layer.router_count += G.shape[0]


def init_router(layer: nn.Module, router: str, num_experts: int, fk: dict) -> None:
    """W_r of eq. 11 as nn.Linear(d_in, N, bias=False) (random, Table 2), or None for "mean"."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    layer.num_experts, layer.router_kind = num_experts, router
    layer.router = None if router == "mean" else \
        nn.Linear(layer.in_features, num_experts, bias=False, **fk)
    layer.aux_loss, layer.record_router, dev = None, False, fk["device"]
    layer.register_buffer("router_sum", torch.zeros(num_experts, device=dev), persistent=False)
    layer.register_buffer("router_count", torch.zeros((), dtype=torch.long, device=dev), False)


# --- baselines (Table 1) ------------------------------------------------------
class LoRALinear(AdapterLinear):
    """LoRA (Hu et al.), HF PEFT numerics: o = W x + b + (α/r) · B A drop(x), B = 0 at first (the
    base at step 0). Trainable: r(d_in + d_out) = 2dr (Table 2). Mergeable."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        super().__init__(base, r, alpha, dropout)
        fk = self.factory()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fk))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's: U(±1/√d_in)

    def up(self) -> torch.Tensor:
        """The d_out×r factor applied after A: B (MoSLoRA: B M)."""
        return self.lora_B

    def fold(self, merge: bool) -> None:
        """W ← W ± (α/r) B A in at least fp32, rounded once to W's dtype (exact up to that)."""
        w, dt = self.base.weight, self.factory()["dtype"]
        delta = (self.scale * self.up() @ self.lora_A).to(dt)
        w.copy_((w.to(dt) + (1 if merge else -1) * delta).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_merged():
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)  # tokens × d_in
        out = self.base(x2)
        dt = out.dtype  # the compute dtype (module doc)
        a = F.linear(self.dropout(x2.to(dt)), self.lora_A.to(dt))
        # out += s·a upᵀ in place: out is ours (nn.Linear's backward does not keep it), and out of
        # place addmm would first copy it, more traffic than the rank-r GEMM itself
        out = out.addmm_(a, self.up().to(dt).t(), alpha=self.scale)
        return out.view(*x.shape[:-1], self.out_features)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, mergeable), HF PEFT numerics: o = g ⊙ (W x + s·BA x) + b, s = α/r,
    g = m / ‖W + s·BA‖_row detached (§4.3), m the `magnitude` (init ‖W‖_row). With dropout,
    as PEFT: o = W x + b + (g - 1) ⊙ W drop(x) + g ⊙ s·BA drop(x). Builds W + s·BA each
    forward: the slow baseline. Trainable: r(d_in + d_out) + d_out = 2dr + d (Table 2)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        super().__init__(base, r, alpha, dropout)  # LoRA's A, B and their init
        with torch.no_grad():
            w = base.weight.to(self.factory()["dtype"])
            self.magnitude = nn.Parameter(torch.linalg.vector_norm(w, dim=1))
        self._merged_gain = None

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ per output row, detached (DoRA §4.3: treat the norm as a constant)."""
        with torch.no_grad():
            B = self.lora_B
            w = self.base.weight.to(B.dtype) + self.scale * (B @ self.lora_A)
            return torch.linalg.vector_norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_merged():
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)
        out = self.base(x2)
        dt, g = out.dtype, self.magnitude / self.weight_norm()  # g: (d_out,)
        h = self.dropout(x2.to(dt))  # W h: with dropout its own GEMM (PEFT's), else out less b
        wx = F.linear(h, self.base.weight) if self.dropout_active() else \
            out if self.base.bias is None else out - self.base.bias.to(dt)
        a = F.linear(h, self.lora_A.to(dt))
        # g - 1 before rounding to dt: g is ~1, where bf16's step (2^-8) would swallow a change;
        # g ⊙ s·B A h = s · (diag(g) B) A h: g folded into B (d_out×r), not into tokens × d_out
        out = (out + (g - 1).to(dt) * wx).addmm_(a, (g[:, None] * self.lora_B).to(dt).t(),
                                                 alpha=self.scale)
        return out.view(*x.shape[:-1], self.out_features)

    def fold(self, merge: bool) -> None:
        """W ← g ⊙ (W + s·BA) row-wise, and back; the bias is outside DoRA's magnitude."""
        w, BA = self.base.weight, self.scale * self.lora_B @ self.lora_A
        if merge:
            g = self.magnitude / self.weight_norm()
            w.copy_((g[:, None] * (w.to(g.dtype) + BA)).to(w.dtype))
            self._merged_gain = g  # the norm depends on W, which this overwrites: kept for unmerge
        else:
            g, self._merged_gain = self._merged_gain, None
            w.copy_((w.to(g.dtype) / g[:, None] - BA).to(w.dtype))


class MoSLoRALinear(LoRALinear):
    """MoSLoRA (Wu et al. 2024, Mixture-of-Subspaces LoRA): ΔW = (α/r) · B M A, M (`mixer`) r×r.
    Run as (B M) A x: cost, forward and merge are LoRA's with B M for B. Trainable: 2dr + r²."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, dropout: float = 0.05):
        super().__init__(base, r, alpha, dropout)  # LoRA's A, B and their init
        self.mixer = nn.Parameter(torch.empty(r, r, **self.factory()))
        nn.init.kaiming_uniform_(self.mixer, a=math.sqrt(5))

    def up(self) -> torch.Tensor:
        return self.lora_B @ self.mixer


class MoELoRALinear(AdapterLinear):
    """MoELoRA (Liu et al. 2023), eq. 2: o = W x + (α/r) Σ_i G_i(x) B_i A_i drop(x), W_r on the
    undropped x. Run like MoR as one rank-N·r LoRA: (α/r) [B_1 … B_N] ((G ⊗ 1_r) ⊙ [A_1;…;A_N] x).
    Trainable: N r(d_in + d_out) + N d_in = 2Ndr + Nd (Table 2). Not mergeable."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, num_experts: int = 2,
                 dropout: float = 0.05, router: str = "learned"):
        super().__init__(base, r, alpha, dropout)
        fk = self.factory()
        init_router(self, router, num_experts, fk)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, **fk))
        for A in self.lora_A:  # per expert, so the fan-in is d_in (not r·d_in of the 3-d tensor)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, r = self.num_experts, self.r
        x2 = x.reshape(-1, self.in_features)
        out = self.base(x2)
        dt, xa = out.dtype, x2.to(out.dtype)
        a = F.linear(self.dropout(xa), self.lora_A.reshape(N * r, -1).to(dt))  # (tokens, N·r)
        logits = F.linear(xa, self.router.weight.to(dt)) if self.router is not None else None
        G = gate(logits, N, xa)
        note_routing(self, G)
        z = (G.to(dt)[:, :, None] * a.reshape(-1, N, r)).reshape(-1, N * r)
        up = self.lora_B.permute(1, 0, 2).reshape(self.out_features, N * r).to(dt)  # [B_1 … B_N]
        return out.addmm_(z, up.t(), alpha=self.scale).view(*x.shape[:-1], self.out_features)


# --- MoR ----------------------------------------------------------------------
class MoRLinear(LoRALinear):
    """Mixture of Ranks (§3): one shared LoRA (A, B) seen through N learned diagonal scalings.

    eq. 6: a transformed LoRA Λ_B B Λ_Bᵀ Λ_A A Λ_Aᵀ reaches a higher-rank subspace; absorbing Λ_Bᵀ
    and Λ_A and moving Λ_Aᵀ into the router leaves Λ_B B Λ_A A (eqs. 7–9). Expert i is the
    direction D_i = (α/r) diag(Ω_B[i]) B diag(Ω_A[i]) A (eq. 10), mixed by G(x) = softmax(W_r x):

        o = W x + (α/r) Σ_i G_i(x) · Ω_B[i] ⊙ (B (Ω_A[i] ⊙ (A · drop(x))))       (eqs. 11–13)

    Trainable 2dr + N(2d + r). Init (Table 2: A, R random, B = 0): LoRA's, Ω_A = Ω_B = 1: at
    step 0 the base, every expert the same LoRA (the paper leaves Ω's init open; Ω_B = 0 with
    B = 0 would keep ∂L/∂B ∝ Ω_B and ∂L/∂Ω_B ∝ B at 0). Not mergeable: G depends on x."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32, num_experts: int = 8,
                 dropout: float = 0.05, router: str = "learned"):
        if type(base).forward is not nn.Linear.forward:  # StackedMixture computes W x + b itself
            raise TypeError(f"MoR needs a plain nn.Linear base, got {type(base).__name__}")
        super().__init__(base, r, alpha, dropout)  # LoRA's A, B and their init
        fk = self.factory()
        # eqs. 7, 8: Λ_A = diag(λ_A) (r×r), Λ_B = diag(λ_B) (d_out×d_out), kept as diagonals;
        # eq. 14: the N experts' λ_A, λ_B stacked as rows: Ω_A ∈ R^{N×r}, Ω_B ∈ R^{N×d_out}
        self.omega_A = nn.Parameter(torch.ones(num_experts, r, **fk))
        self.omega_B = nn.Parameter(torch.ones(num_experts, self.out_features, **fk))
        init_router(self, router, num_experts, fk)  # eq. 11's W_r
        self._cache, self.generation = None, 0  # the eval cache (cached_weights), its changes

    fold = AdapterLinear.fold  # not LoRA's: ΔW depends on x through G(x)

    def direction(self, i: int) -> torch.Tensor:
        """D_i = (α/r) Λ_B_i B Λ_A_i A (eq. 10) as a d_out×d_in matrix (N = 1: eq. 9)."""
        return self.scale * (self.omega_B[i][:, None] * self.lora_B * self.omega_A[i]) @ self.lora_A

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """MoR as the paper writes it (eqs. 10–13), one expert at a time: `forward`'s definition."""
        x2 = x.reshape(-1, self.in_features)
        out = self.base(x2)  # eq. 13: W x (+ b), frozen
        dt = out.dtype  # adapters compute in the base output's dtype (module doc)
        x2 = x2.to(dt)
        A, B, om_A, om_B = (p.to(dt) for p in (self.lora_A, self.lora_B, self.omega_A, self.omega_B))
        h = self.dropout(x2)  # drop(x): the adapter's input only, not the router's
        logits = F.linear(x2, self.router.weight.to(dt)) if self.router is not None else None
        G = gate(logits, self.num_experts, x2)  # eq. 11: G(x) = softmax(W_r x), (tokens, N)
        note_routing(self, G)
        for i in range(self.num_experts):
            D_i_x = self.scale * om_B[i] * F.linear(om_A[i] * F.linear(h, A), B)  # eq. 10: D_i x
            out = out + G.to(dt)[:, i:i + 1] * D_i_x  # eq. 12: Σ_i G_i(x) D_i x
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same numbers as `reference`, as one rank-N·r GEMM (eq. 15, Fig. 3: "fast path" below)."""
        x2, dev = x.reshape(-1, self.in_features), x.device.type
        cast = torch.is_autocast_enabled(dev) and x2.dtype != torch.float64  # base, adapter alike
        dt = torch.get_autocast_dtype(dev) if cast else None  # None: x's own dtype, as nn.Linear
        if not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            x2 = x2 if dt is None else x2.to(dt)
            out = self.base(x2)  # eq. 13: W x (+ bias), frozen
            down, up = cached_weights(self, out.dtype)  # decoding: built once, not per token
            z, G, _, _ = stacked_codes(x2, down, self.r, self.num_experts, self.scale)
            out.addmm_(z, up.t())  # eqs. 12, 15: (α/r) Σ_i G_i(x) D_i x = B̃ z (α/r is in z)
        else:
            p = self.dropout.p if self.dropout_active() else 0.0
            W_r = self.router.weight if self.router is not None else None
            args = (self.lora_A, W_r, self.lora_B, self.omega_A, self.omega_B, p, self.scale, dt)
            out, G = StackedMixture.apply(x2, self.base.weight, self.base.bias, *args)
        note_routing(self, G)
        return out.view(*x.shape[:-1], self.out_features)

    def train(self, mode: bool = True) -> MoRLinear:  # (eval() too) drops the eval cache
        self._cache, self.generation = None, self.generation + 1
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), ...: the cache would be stale
        self._cache, self.generation = None, self.generation + 1
        return super()._apply(fn, *args, **kwargs)


# --- fast path: the same math as `reference` ----------------------------------
# eq. 15 is a LoRA of rank N·r with tied factors: with z = (α/r) G(x) ⊗ (A x) ∈ R^{N·r} and
# B̃ = [diag(Ω_B[i]) B diag(Ω_A[i])]_i ∈ R^{d_out×N·r}, (α/r) Σ_i G_i D_i x = B̃ z: A x and W_r x
# (one GEMM), N·r products per token and one GEMM into d_out, not N GEMMs and a tokens×N×d_out
# tensor. Ω_A sits in B̃ (work independent of tokens); α/r in the outer product's free alpha.
#   x ──┬── W ─────────────────────────────────────────┐
#       ├── drop ── A ──┐                              + ── o
#       └── W_r ── softmax ── G ⊗ (A x) = z ── B̃ ───────┘

def tied_up(B: torch.Tensor, omega_A: torch.Tensor, omega_B: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """B̃ (d_out × N·r) in `dtype`: B̃[:, i·r + j] = Ω_B[i] ⊙ B[:, j] · Ω_A[i, j] (eq. 15)."""
    (d_out, r), N = B.shape, omega_A.shape[0]
    out = torch.empty(d_out, N, r, device=B.device, dtype=dtype)  # the last product writes dtype
    return torch.mul(B[:, None, :] * omega_A, omega_B.t()[:, :, None], out=out).view(d_out, N * r)


def down_factors(A: torch.Tensor, W_r: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[A; W_r] ((r + N) × d_in) in `dtype`: A x and W_r x read the same x, so they are one GEMM."""
    if W_r is None:
        return A.to(dtype)
    out = torch.empty(A.shape[0] + W_r.shape[0], A.shape[1], dtype=dtype, device=A.device)
    return torch.cat([A, W_r], out=out)


def outer(u: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha · u v per token (u: t×m×k, v: t×k×n). Eager: one batched GEMM whose alpha scales for
    free; compiled: bmm and a multiply, which inductor fuses into neighbours (not baddbmm)."""
    if torch.compiler.is_compiling():
        return torch.bmm(u, v) * alpha
    return torch.baddbmm(u.new_empty(()), u, v, beta=0, alpha=alpha)


def stacked_codes(x: torch.Tensor, down: torch.Tensor, r: int, num_experts: int, scale: float,
                  p: float = 0.0) -> tuple[torch.Tensor, ...]:
    """(z, G, A drop(x), dropout mask) from [A; W_r]: G of eq. 11, z = (α/r) G ⊗ (A x) (eq. 15).
    One GEMM without dropout; with it the router reads x, and the mask is F.dropout's own."""
    routed, keep = down.shape[0] > r, None
    if p > 0:
        h, keep = torch.native_dropout(x, p, True)
        a, logits = F.linear(h, down[:r]), (F.linear(x, down[r:]) if routed else None)
    else:
        a_logits = F.linear(x, down)
        a, logits = a_logits[:, :r], (a_logits[:, r:] if routed else None)
    G = gate(logits, num_experts, a, a.dtype)
    return outer(G[:, :, None], a[:, None, :], scale).view(-1, num_experts * r), G, a, keep


def softmax_backward(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """∂logits = G ⊙ (g − Σ_k G_k g_k) (G = softmax, g = ∂G): torch's kernel (fp32 inside) if it
    exists, as written out in bf16 the gradient is 1.2–1.4× further from fp64 (docs/performance.md)."""
    own = getattr(torch, "_softmax_backward_data", None)
    return own(g, G, -1, G.dtype) if own else G * (g - (G * g).sum(-1, keepdim=True))


def weights_key(layer: MoRLinear, dtype: torch.dtype) -> tuple | None:
    """The eval cache's key: dtype, each parameter's version (bumped in place by an optimizer step,
    not by `.data` writes: call eval() after one), address, dtype; None for inference tensors."""
    params = [layer.lora_A, layer.lora_B, layer.omega_A, layer.omega_B]
    params += [layer.router.weight] if layer.router is not None else []
    if any(p.is_inference() for p in params):
        return None
    return (dtype,) + tuple((p._version, p.data_ptr(), p.dtype) for p in params)


def cached_weights(layer: MoRLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """([A; W_r], B̃) for eval without gradients, rebuilt when `weights_key` changes."""
    key, W_r = weights_key(layer, dtype), layer.router.weight if layer.router is not None else None
    if key is None or layer._cache is None or layer._cache[0] != key:
        built = (down_factors(layer.lora_A, W_r, dtype),
                 tied_up(layer.lora_B, layer.omega_A, layer.omega_B, dtype))
        if key is None:
            return built
        layer._cache, layer.generation = (key, built), layer.generation + 1
    return layer._cache[1]


class StackedMixture(torch.autograd.Function):
    """(o, G) of `MoRLinear.forward`, W x + b included, as one autograd node (plain autograd: ~2.4×
    LoRA's kernels); saves x, W, z, B̃ (in `dt`), the 1-byte mask, A x, G, [A; W_r]."""

    @staticmethod
    def forward(ctx, x, W, bias, A, W_r, B, omega_A, omega_B, p: float, scale: float, dt):
        with torch.autocast(x.device.type, enabled=False):  # dtypes as written (as the backward)
            xd, Wd = (x, W) if dt is None else (x.to(dt), W.to(dt))
            out = F.linear(xd, Wd, None if bias is None else bias.to(Wd.dtype))  # eq. 13: W x + b
            dt = out.dtype  # = xd's: the adapters compute in the base output's dtype
            down, up = down_factors(A, W_r, dt), tied_up(B, omega_A, omega_B, dt)
            z, G, a, keep = stacked_codes(xd, down, A.shape[0], omega_A.shape[0], scale, p)
            out.addmm_(z, up.t())  # eqs. 12, 15: (α/r) Σ_i G_i(x) D_i x = B̃ z (α/r is in z)
        ctx.save_for_backward(xd, Wd, keep, a, G, z, down, up, B, omega_A, omega_B)
        ctx.p, ctx.scale, ctx.router, ctx.master = p, scale, W_r is not None, A.dtype
        ctx.x_dtype, ctx.w_dtypes = x.dtype, (W.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)  # G's gradient is None unless a balance loss used it
        return out, G

    @staticmethod
    def backward(ctx, g, gG):
        # autocast off: torch.compile traces the backward under the forward's autocast, which would
        # round the factor products to bf16 (eager runs it without); dtypes are as written here
        x, W, keep, a, G, z, down, up, B, omega_A, omega_B = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            (r, N), s, need = (a.shape[1], G.shape[1]), ctx.scale, ctx.needs_input_grad
            o_used = g is not None  # else only G was differentiated (a balance loss alone)
            g = g if o_used else x.new_zeros(x.shape[0], W.shape[0])
            gz, gup = (g @ up).view(-1, N, r), g.t() @ z  # o = W x + B̃ z
            gW = (g.t() @ x).to(ctx.w_dtypes[0]) if o_used and need[1] else None  # unfrozen base
            gb = g.sum(0).to(ctx.w_dtypes[1]) if o_used and need[2] else None
            # z = s G ⊗ a: ∂a = s Σ_i G_i ∂z_i, ∂G_i = s ∂z_i · a (batched GEMMs over tokens);
            # drop(x) = x ⊙ keep / (1 − p): the 1 / (1 − p) rides in ∂a, the masks need none
            ga = outer(G[:, None, :], gz, s / (1.0 - ctx.p)).squeeze(1)
            gGz = outer(gz, a[:, :, None], s).squeeze(2) if ctx.router else None
            glogits = softmax_backward(gGz if gG is None else gGz + gG, G) if ctx.router else None
            # [A; W_r] read drop(x) and x: their gradients (cast once, together, to the
            # parameters'); ∂x sums W's, W_r's and A's terms in place, the last in x's own dtype
            gx = g @ W if need[0] else None  # False where x comes from frozen layers only
            if keep is None:
                g_al = ga if glogits is None else torch.cat([ga, glogits], 1)
                g_down = (g_al.t() @ x).to(ctx.master)
                gx = gx.addmm_(g_al, down).to(ctx.x_dtype) if need[0] else None
            else:
                rows = [ga.t() @ (x * keep)] + ([glogits.t() @ x] if ctx.router else [])
                g_down = torch.cat(rows, out=down.new_empty(down.shape, dtype=ctx.master))
                if need[0]:
                    gx = gx.addmm_(glogits, down[r:]) if ctx.router else gx
                    gx = torch.addcmul(gx, ga @ down[:r], keep, out=x.new_empty(gx.shape,
                                                                                dtype=ctx.x_dtype))
            gA, gWr = g_down[:r], (g_down[r:] if ctx.router else None)
            # B̃[o, i, j] = Ω_B[i, o] B[o, j] Ω_A[i, j]: each factor's gradient sums ∂B̃ ⊙ the other
            # two, a batched GEMM over experts or rows; ∂B̃ ⊙ B serves Ω_A and Ω_B (fp32 by promotion)
            g3 = gup.view(-1, N, r)
            P = (g3 * B[:, None, :]).transpose(0, 1)  # (N, d_out, r)
            gOB = torch.bmm(P, omega_A[:, :, None]).squeeze(2)  # Σ_j
            gOA = torch.bmm(omega_B[:, None, :], P).squeeze(1)  # Σ_o
            gB = torch.bmm(omega_B.t()[:, None, :], g3 * omega_A).squeeze(1)  # Σ_i
            return gx, gW, gb, gA, gWr, gB, gOA, gOB, None, None, None


# --- model-level helpers and the adapter file ---------------------------------
METHODS = {"lora": LoRALinear, "dora": DoRALinear, "moslora": MoSLoRALinear,
           "moelora": MoELoRALinear, "mor": MoRLinear}


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def targeted(name: str, targets) -> bool:
    """A target names a module by its last name component ("w1") or a dotted suffix ("ffn.w1")."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_adapters(model: nn.Module, method: str, targets=("w1", "w2", "w3"), **hyper) -> list[str]:
    """Replace every nn.Linear a target names by `method`'s adapter, freeze all else; returns the
    names. Sets model.adapter_config (what save_adapter stores), the layer's defaults filled in."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; choose from {sorted(METHODS)}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if adapter_layers(model):
        raise RuntimeError("model already has adapters; build a fresh model to add different ones")
    sig = inspect.signature(METHODS[method].__init__)
    known = [p for p in sig.parameters if p not in ("self", "base")]
    if bad := sorted(set(hyper) - set(known)):
        raise TypeError(f"{method}: unknown hyper-parameter(s) {bad}; accepted: {known}")
    hyper = {k: hyper.get(k, sig.parameters[k].default) for k in known}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if unmatched := [t for t in targets if not any(targeted(n, (t,)) for n in linears)]:
        # only nn.Linear layers are adapted: name what the target did match (GPT-2's Conv1D, ...)
        other = [f"{n} is {type(m).__name__}, not nn.Linear" for n, m in model.named_modules()
                 if n and not isinstance(m, nn.Linear) and targeted(n, unmatched)]
        hint = f"their names look like {list(linears)[:6]}" if not other else \
            (f"{', '.join(other[:3])}: replace those modules by nn.Linear ones (Conv1D holds the "
             "transposed weight: nn.Linear's weight = conv.weight.T)")
        raise ValueError(f"target(s) {unmatched} match no nn.Linear in the model; only nn.Linear "
                         f"layers are adapted, and {hint}")
    names = [n for n in linears if targeted(n, targets)]
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, METHODS[method](linears[name], **hyper))
    model.adapter_config = {"method": method, "targets": list(targets), **hyper}
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only (not the frozen bases), keyed as in model.state_dict()."""
    return {f"{ln}.{n}" if ln else n: p.detach()
            for ln, m in adapter_layers(model) for n, p in m.adapter_parameters()}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a model that has the same adapters; strict on names and shapes."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise RuntimeError(f"adapter state dict does not match the model:\n  missing keys: "
                           f"{missing}\n  unexpected keys: {unexpected}\n  mis-shaped: {shapes}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])


def save_adapter(model: nn.Module, path: str | None) -> dict:
    """{"config": model.adapter_config, "state_dict": the adapters' (method "full": all)}, returned
    and written to path via a temp file (a kill never leaves half a file). Sharded (FSDP2)
    parameters are gathered, a collective: every process calls this, all but one with path=None."""
    if (config := getattr(model, "adapter_config", None)) is None:
        raise RuntimeError("model has no adapter_config: call add_adapters() (or set "
                           "{'method': 'full'}) first")
    sd = model.state_dict() if config["method"] == "full" else adapter_state_dict(model)
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
          for k, v in sd.items()}
    payload = {"config": dict(config), "state_dict": sd}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)
    return payload


def describe(shapes: dict[str, tuple[int, int]]) -> str:
    """"dim 64 / 4 layers (w1 64x172, w2 172x64, w3 64x172)" for {linear: (in, out)}: the width
    where Meta's names show it, the depth (a name's first number) and each last part's shapes."""
    dims, layers, kinds = set(), {-1}, set()
    for name, (i, o) in shapes.items():
        *path, last = name.split(".")
        layers.add(next((int(p) for p in path if p.isdigit()), -1))
        kinds.add(f"{last} {i}x{o}")
        dims |= {i} if last in ("wq", "wk", "wv", "w1", "w3", "output") else \
            {o} if last in ("wo", "w2") else set()
    head = [f"dim {'/'.join(map(str, sorted(dims)))}"] if dims else []
    head += [f"{max(layers) + 1} layers"] if max(layers) >= 0 else []
    return " ".join([" / ".join(head)] * bool(head) + [f"({', '.join(sorted(kinds))})"])


def check_adapter(model: nn.Module, path: str) -> dict:
    """The save_adapter() file at path (weights_only=True: a crafted file runs no code) if it fits
    the model; else a ValueError naming the file and why ("trained on dim 64 / 4 layers, ...")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such adapter file")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a truncated one has no directory
        raise ValueError(f"{path}: not an adapter file (not a torch.save archive: truncated, "
                         "garbage, or another format)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged archive or a pickle of objects: torch raises several types
        reason = (str(e).strip().splitlines() or ["file ends early"])[0][:120]
        raise ValueError(f"{path}: not an adapter file ({type(e).__name__}: {reason})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)
            and "method" in ckpt["config"] and isinstance(ckpt.get("state_dict"), dict)):
        raise ValueError(f"{path}: not an adapter file (expected save_adapter()'s "
                         "{'config', 'state_dict'})")
    config, sd, own = ckpt["config"], ckpt["state_dict"], getattr(model, "adapter_config", None)
    if own is not None and own != config:
        raise ValueError(f"{path}: the file holds adapters {config}, the model already has {own}")
    # (in, out) of each linear the file was trained on, beside the model's
    full, mods = config["method"] == "full", dict(model.named_modules())
    kind = nn.Linear if full or own is None else AdapterLinear  # (resuming: the model's adapters)
    here = {n: (m.in_features, m.out_features) for n, m in mods.items()
            if isinstance(m, kind) and (full or targeted(n, config.get("targets", ())))}
    if full:  # every 2-D weight but those of modules that are not nn.Linear (embeddings)
        trained = {k[:-7]: (t.shape[1], t.shape[0]) for k, t in sd.items() if k.endswith(".weight")
                   and t.dim() == 2 and isinstance(mods.get(k[:-7]), (nn.Linear, type(None)))}
    else:  # every method's factors: lora_A (.., r, in), lora_B (.., out, r)
        ins = {k[:-7]: t.shape[-1] for k, t in sd.items() if k.endswith(".lora_A")}
        outs = {k[:-7]: t.shape[-2] for k, t in sd.items() if k.endswith(".lora_B") and t.dim() > 1}
        trained = {n: (ins.get(n, 0), outs.get(n, 0)) for n in {**ins, **outs}}
    differ = sorted(n for n in set(here) | set(trained) if here.get(n) != trained.get(n))
    if here and differ:  # (no target matched at all: add_adapters says what the names look like)
        a, b = describe(trained), describe(here)
        if a == b:  # the same summary: name the first linear that differs
            n = differ[0]
            a, b = (f"{n} {'x'.join(map(str, d[n]))}" if n in d else f"no {n}"
                    for d in (trained, here))
        raise ValueError(f"{path}: trained on {a}, this base is {b}")
    return ckpt


def load_adapter(model: nn.Module, path: str) -> dict:
    """Add the adapters a save_adapter() file describes (a model that has them keeps its own) and
    load their weights ("full": the whole state dict). Returns the config; faults: ValueError."""
    ckpt = check_adapter(model, path)
    config = dict(ckpt["config"])
    try:
        if config["method"] == "full":
            model.load_state_dict(ckpt["state_dict"])
            model.adapter_config = config
            return config
        if getattr(model, "adapter_config", None) is None:
            hyper = {k: v for k, v in config.items() if k not in ("method", "targets")}
            add_adapters(model, config["method"], tuple(config["targets"]), **hyper)
        load_adapter_state_dict(model, ckpt["state_dict"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # a method, hyper-parameter
        raise ValueError(f"{path}: {' '.join(str(e).split())}") from None  # or key unknown here
    return config


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Σ over layers of the last forward's Switch balance loss (router="balanced"); else 0."""
    losses = [m.aux_loss for _, m in adapter_layers(model)
              if getattr(m, "aux_loss", None) is not None]
    if losses:
        return torch.stack(losses).sum()
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else None)


if __name__ == "__main__":
    try:  # Table 2's command line lives in the project's tools/, so that this file copies alone
        from tools.table2 import main
    except ModuleNotFoundError as e:
        raise e if e.name not in ("tools", "tools.table2") else SystemExit(
            "error: `python mor.py` prints Table 2 with the MoR project's tools/table2.py, which "
            "is not beside this copy of mor.py") from None
    main()
