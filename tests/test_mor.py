"""Tests for mor.py: every layer is checked against the paper's equations written out naively here."""
import ast
import copy
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mor
from conftest import ROOT
from tools import table2

sys.path.insert(0, os.path.join(ROOT, "bench"))
from infer import decode_state  # noqa: E402  (bench/infer.py's CUDA-graph decoder keeps its replays valid with it)

torch.set_num_threads(2)


def mlp(seed=0, d_in=12, hidden=10, d_out=6, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, d_out, bias=bias))


def randomize(layer, seed=1):
    """Random values for every adapter parameter (B = 0 and Ω = 1 would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


def by_hand(layer, x, h=None):
    """eqs. 10–12 with the experts' matrices built from torch.diag: W x + b + Σ_i G_i(x) D_i drop(x)."""
    W, b = layer.base.weight, layer.base.bias
    A, B, omA, omB = layer.lora_A, layer.lora_B, layer.omega_A, layer.omega_B
    N, scale = omA.shape[0], layer.alpha / layer.r
    h = x if h is None else h
    if layer.router is None:
        G = torch.full(x.shape[:-1] + (N,), 1.0 / N, dtype=x.dtype)
    else:
        G = torch.softmax(x @ layer.router.weight.T, dim=-1)  # undropped x
    out = x @ W.T + (b if b is not None else 0)
    for i in range(N):
        D_i = scale * torch.diag(omB[i]) @ B @ torch.diag(omA[i]) @ A  # eq. 10
        out = out + G[..., i:i + 1] * (h @ D_i.T)
    return out


def grads(out, tensors, seed=5):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), tensors)


def assert_same_and_same_grads(out, ref, tensors, tol=1e-5):
    """out equals ref, and so do the gradients of a random projection of each w.r.t. tensors."""
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for g, g_ref in zip(grads(out, tensors), grads(ref, tensors)):
        torch.testing.assert_close(g, g_ref, atol=tol, rtol=tol)


def adapter_tensors(layer):
    return [p for _, p in layer.adapter_parameters()]


# ----------------------------------------------------------------------------- MoR numerics

@pytest.mark.parametrize("router", ["learned", "mean"])
def test_reference_is_eq12_by_hand(router):
    """MoRLinear.reference (the readable definition) against the experts' d_out × d_in matrices, fp64."""
    layer = mor.MoRLinear(nn.Linear(12, 10).double(), r=4, alpha=8, num_experts=3, dropout=0.0, router=router)
    randomize(layer)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert_same_and_same_grads(layer.reference(x), by_hand(layer, x), adapter_tensors(layer) + [x], tol=1e-12)


def test_reference_drops_only_the_adapter_input():
    layer = mor.MoRLinear(nn.Linear(12, 10).double(), r=4, alpha=8, num_experts=3, dropout=0.3)
    randomize(layer)
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.manual_seed(123)
    out = layer.reference(x)
    torch.manual_seed(123)
    h = F.dropout(x, 0.3, training=True)
    torch.testing.assert_close(out, by_hand(layer, x, h), atol=1e-12, rtol=1e-12)


def fp64_layer(N, router, bias=True, dropout=0.0):
    layer = mor.MoRLinear(nn.Linear(12, 10, bias=bias).double(), r=4, alpha=8, num_experts=N, dropout=dropout,
                          router=router)
    randomize(layer)
    return layer


@pytest.mark.parametrize("N,router,bias", [(1, "learned", True), (3, "learned", False), (8, "learned", True),
                                           (3, "mean", True), (8, "mean", False), (3, "balanced", True)])
@pytest.mark.parametrize("record", [False, True])
def test_forward_equals_reference_fp64(N, router, bias, record):
    """The fast path (StackedMixture, tied_up, the in-place add) against the literal eqs. 10–12, outputs and
    every gradient (the balance loss's included) to 1e-9, in training mode, in eval mode with gradients
    on, and in eval mode with gradients off (the cached B̃)."""
    layer = fp64_layer(N, router, bias)
    layer.record_router = record
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    tensors = adapter_tensors(layer) + [x]
    for mode in (True, False):
        layer.train(mode)
        results = []
        for fwd in (layer, layer.reference):
            out = fwd(x)
            aux = layer.aux_loss if layer.aux_loss is not None else 0.0
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
            results.append([out.detach(), *torch.autograd.grad((out * w).sum() + 0.7 * aux, tensors)])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference(x), atol=1e-9, rtol=1e-9)
    if record:  # 3 modes × 2 paths: the same 10 tokens 6 times
        assert int(layer.router_count) == 60 and layer.router_count.dtype == torch.int64


@pytest.mark.parametrize("bias", [True, False])
def test_unfrozen_base_gradients_equal_reference_fp64(bias):
    """StackedMixture computes W x + b inside its node: an unfrozen base (a user's choice) gets W's and b's
    gradients as autograd gives `reference`'s nn.Linear, to 1e-9 (fp64: two summation orders)."""
    layer = fp64_layer(3, "learned", bias).requires_grad_(True)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    tensors = [x, layer.base.weight] + ([layer.base.bias] if bias else []) + adapter_tensors(layer)
    w = torch.randn(7, 10, dtype=torch.float64)
    got, want = (torch.autograd.grad((f(x) * w).sum(), tensors) for f in (layer, layer.reference))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_balance_loss_alone_leaves_an_unfrozen_base_without_gradient():
    # the balance loss depends on the router only: W and b get no gradient (None, as reference gives),
    # not zeros that AdamW would still decay
    for f in ("forward", "reference"):
        layer = fp64_layer(3, "balanced", bias=True).requires_grad_(True)
        getattr(layer, f)(torch.randn(7, 12, dtype=torch.float64))
        layer.aux_loss.backward()
        assert layer.base.weight.grad is None and layer.base.bias.grad is None, f
        assert layer.router.weight.grad.abs().sum() > 0, f


@pytest.mark.parametrize("router", ["learned", "mean", "balanced"])
def test_forward_equals_reference_with_dropout_fp64(router):
    """With dropout on, the fast path keeps x and the mask and recomputes x ⊙ mask; softmax's and dropout's backwards
    are written out with public ops: same numbers and gradients (the balance loss's included) as the reference
    given the same mask (the same seed: dropout is the first random draw of both)."""
    layer = fp64_layer(3, router, dropout=0.3)
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    tensors = adapter_tensors(layer) + [x]
    results = []
    for fwd in (layer, layer.reference):
        torch.manual_seed(11)
        out = fwd(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        aux = layer.aux_loss if layer.aux_loss is not None else 0.0
        results.append([out.detach(), *torch.autograd.grad((out * w).sum() + 0.7 * aux, tensors)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_softmax_backward_fallback_equals_reference(monkeypatch):
    """A torch without `_softmax_backward_data` gets the written-out softmax backward: same gradients (fp64, 1e-9),
    balance loss and dropout included; the fallback itself equals torch's kernel."""
    g, G = torch.randn(7, 5, dtype=torch.float64), torch.softmax(torch.randn(7, 5, dtype=torch.float64), -1)
    own = mor.softmax_backward(g, G)
    monkeypatch.delattr(torch, "_softmax_backward_data")
    torch.testing.assert_close(mor.softmax_backward(g, G), own, atol=1e-12, rtol=1e-12)
    test_forward_equals_reference_with_dropout_fp64("balanced")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_skips_the_input_gradient_when_x_needs_none(dropout):
    """x from frozen layers only (no requires_grad): the parameters' gradients still equal the reference's."""
    layer = fp64_layer(3, "learned", dropout=dropout)
    x = torch.randn(9, 12, dtype=torch.float64)
    results = []
    for fwd in (layer, layer.reference):
        torch.manual_seed(11)
        out = fwd(x)
        results.append(grads(out, adapter_tensors(layer)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_forward_equals_reference_under_bf16_autocast():
    """fp32 weights under bf16 autocast (the training recipe): fast path vs reference to bf16 precision, outputs
    and gradients, both computing in bf16 with fp32 parameters."""
    layer = mor.MoRLinear(nn.Linear(64, 48), r=4, alpha=8, num_experts=8, dropout=0.0, router="balanced")
    randomize(layer)
    x = torch.randn(32, 64, requires_grad=True)
    tensors = adapter_tensors(layer) + [x]
    results = []
    for fwd in (layer, layer.reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fwd(x)
            loss = (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum()
            loss = loss + layer.aux_loss
        assert out.dtype == torch.bfloat16
        results.append([out.float(), *torch.autograd.grad(loss, tensors)])
    for a, b in zip(*results):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 0.03 * b.abs().max()  # a few bf16 roundings (2^-8 relative) apart


def test_compiled_block_with_recording_does_not_recompile():
    """router_count is a tensor buffer, not a Python int (a guard that changed every step): a compiled block with
    record_router on is captured once and reused across training steps; counts and sums stay right."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = nn.Sequential(mor.MoRLinear(nn.Linear(8, 16), r=2, num_experts=4, dropout=0.1, router="balanced"),
                          nn.ReLU(), mor.MoRLinear(nn.Linear(16, 8), r=2, num_experts=4, dropout=0.1))
    for m in (block[0], block[2]):
        m.record_router = True
    frames = []

    def counting(gm, example_inputs):  # Dynamo calls its backend once per captured graph
        frames.append(gm)
        return gm.forward
    compiled = torch.compile(block, backend=counting, dynamic=False)
    opt = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.1)
    for _ in range(4):
        out = compiled(torch.randn(6, 8))
        (out.square().mean() + 0.01 * block[0].aux_loss).backward()
        opt.step()
        opt.zero_grad()
    assert len(frames) == 1
    assert int(block[0].router_count) == int(block[2].router_count) == 24
    torch.testing.assert_close(block[2].router_sum.sum(), torch.tensor(24.0))  # each token's G sums to 1


def test_mor_direction_is_eq10():
    layer = mor.MoRLinear(nn.Linear(6, 5), r=3, alpha=6, num_experts=2, dropout=0.0)
    randomize(layer)
    i = 1
    ref = 2.0 * torch.diag(layer.omega_B[i]) @ layer.lora_B @ torch.diag(layer.omega_A[i]) @ layer.lora_A
    torch.testing.assert_close(layer.direction(i), ref)


def test_mor_single_expert_equals_lora():
    base = nn.Linear(12, 10)
    lora = mor.LoRALinear(copy.deepcopy(base), r=4, alpha=8, dropout=0.0)
    m = mor.MoRLinear(copy.deepcopy(base), r=4, alpha=8, num_experts=1, dropout=0.0)
    randomize(lora)
    with torch.no_grad():
        m.lora_A.copy_(lora.lora_A)
        m.lora_B.copy_(lora.lora_B)
    assert torch.all(m.omega_A == 1) and torch.all(m.omega_B == 1)  # the init
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(m(x), lora(x), atol=1e-6, rtol=1e-6)


def test_mean_router_is_plain_average():
    layer = mor.MoRLinear(nn.Linear(8, 6), r=2, alpha=4, num_experts=4, dropout=0.0, router="mean")
    assert layer.router is None
    randomize(layer)
    x = torch.randn(5, 8)
    experts = [x @ (2.0 * (layer.omega_B[i][:, None] * layer.lora_B * layer.omega_A[i]) @ layer.lora_A).T
               for i in range(4)]
    ref = layer.base(x) + sum(experts) / 4
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_balance_loss_hand_value_and_uniform():
    # router W_r = I on 2-d inputs: tokens [ln3, 0], [ln3, 0], [0, ln3] -> G = [.75,.25], [.75,.25], [.25,.75]
    # f = [2/3, 1/3], P = [1.75/3, 1.25/3], loss = 2 (2/3·1.75/3 + 1/3·1.25/3) = 19/18
    layer = mor.MoRLinear(nn.Linear(2, 3), r=2, alpha=2, num_experts=2, dropout=0.0, router="balanced")
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)]])
    layer(x)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(19 / 18))
    model = nn.Sequential(layer, nn.Identity())
    torch.testing.assert_close(mor.balance_loss(model), torch.tensor(19 / 18))
    # uniform routing: zero router weights -> loss exactly 1
    for N in (3, 8):
        m = mor.MoRLinear(nn.Linear(5, 4), r=2, num_experts=N, router="balanced")
        nn.init.zeros_(m.router.weight)
        m(torch.randn(6, 5))
        torch.testing.assert_close(m.aux_loss, torch.tensor(1.0))
    # the loss has a gradient into the router, and "learned" has none
    layer(x)
    assert torch.autograd.grad(layer.aux_loss, layer.router.weight)[0].abs().sum() > 0
    learned = mor.MoRLinear(nn.Linear(2, 3), r=2, num_experts=2)
    learned(x)
    assert learned.aux_loss is None and mor.balance_loss(nn.Sequential(learned)).item() == 0


def test_balance_loss_sums_layers():
    model = mlp()
    mor.add_adapters(model, "mor", targets=("0", "2"), num_experts=3, router="balanced")
    model(torch.randn(4, 12))
    ref = model[0].aux_loss + model[2].aux_loss
    torch.testing.assert_close(mor.balance_loss(model), ref)


def test_record_router_mean_weights():
    layer = mor.MoRLinear(nn.Linear(8, 6), r=2, num_experts=3)
    layer.eval()
    layer.record_router = True
    xs = [torch.randn(2, 5, 8), torch.randn(3, 8)]
    with torch.no_grad():
        for x in xs:
            layer(x)
    G = torch.cat([torch.softmax(x.reshape(-1, 8) @ layer.router.weight.T, -1) for x in xs])
    assert layer.router_count == 13
    torch.testing.assert_close(layer.router_sum / layer.router_count, G.mean(0))


def test_eval_cache_matches_train_and_invalidates():
    layer = mor.MoRLinear(nn.Linear(12, 10), r=4, alpha=8, num_experts=3, dropout=0.0)
    randomize(layer)
    x = torch.randn(4, 12)
    train_out = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        out1 = layer(x)
        cached = layer._cache
        out2 = layer(x)
        assert cached is not None and layer._cache is cached  # reused, not rebuilt
    torch.testing.assert_close(out1, train_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out2, train_out, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.omega_B.mul_(2.0)  # an in-place update (as an optimizer step) must invalidate the cache
        out3 = layer(x)
    torch.testing.assert_close(out3, layer.reference(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.lora_B.data.mul_(3.0)  # .data bypasses the version counter: eval() again is the documented refresh
        layer.eval()
        out4 = layer(x)
    torch.testing.assert_close(out4, layer.reference(x), atol=1e-5, rtol=1e-5)
    layer.train()
    assert layer._cache is None


def test_decode_state_changes_whenever_a_captured_graph_would_go_stale():
    """A CUDA graph captured over the eval cache replays B̃'s address: decode_state, read after the capture,
    must change on everything that frees or outdates the cache (train(), eval(), .to(), an in-place update) and
    on nothing else (repeated cached forwards), so a replay can refuse or capture again (bench/infer.py)."""
    model = nn.Sequential(mor.MoRLinear(nn.Linear(12, 10), r=4, alpha=8, num_experts=3, dropout=0.0), nn.ReLU(),
                          nn.Linear(10, 4))
    randomize(model[0])
    model.eval()
    x = torch.randn(4, 12)

    def capture():  # what a capture leaves behind: the cache's tensors, read by address on every replay
        with torch.no_grad():
            model(x)
        return decode_state(model), model[0]._cache[1][1].data_ptr()
    state, _ = capture()
    assert state == ((state[0][0], True),)
    with torch.no_grad():
        model(x)
    assert decode_state(model) == state  # a forward that reuses the cache keeps the graph valid
    for stale in (lambda: model.train().eval(), lambda: model.eval(), lambda: model.to(torch.float32),
                  lambda: model[0].omega_B.add_(0.0)):  # an optimizer step: same values would do, same address
        with torch.no_grad():
            stale()
            model(x)  # an eager forward rebuilds the cache at a new address: only the generation tells
        assert not model.training and decode_state(model) != state, stale
        state, _ = capture()  # captured again: valid until the next change
        assert decode_state(model) == state and state[0][1]


def test_eval_with_parameters_made_under_inference_mode():
    """Inference tensors have no version counter (the cache key): such a layer computes B̃ afresh, correctly."""
    with torch.inference_mode():
        layer = mor.MoRLinear(nn.Linear(12, 10), r=4, alpha=8, num_experts=3, dropout=0.0)
        randomize(layer)
        layer.eval()
        x = torch.randn(4, 12)
        out = layer(x)
        assert layer.lora_B.is_inference()
    with torch.no_grad():
        out2 = layer(x)
        ref = layer.reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out)


def test_mor_gradcheck_fp64():
    """Finite differences in fp64 agree with MoR's gradients (StackedMixture's hand-written backward
    included: dropout on, with the same mask for every evaluation); the router stays fp64 for fp64 inputs."""
    torch.manual_seed(0)
    layer = mor.MoRLinear(nn.Linear(6, 5).double(), r=3, alpha=6, num_experts=2, dropout=0.3)
    randomize(layer)
    names = [n for n, _ in layer.adapter_parameters()]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        torch.manual_seed(7)  # one dropout mask for every call
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))
    inputs = (x, *(p.detach().clone().requires_grad_() for _, p in layer.adapter_parameters()))
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)
    assert layer.router_sum.dtype == torch.float32 and f(*inputs).dtype == torch.float64


@pytest.mark.parametrize("cls", [mor.LoRALinear, mor.DoRALinear, mor.MoSLoRALinear, mor.MoELoRALinear, mor.MoRLinear])
def test_fp32_model_under_autocast(cls):
    """The standard mixed-precision recipe (fp32 weights, bf16 autocast): the adapter follows the base output's
    dtype and matches the same layer in fp32 to bf16 precision; gradients reach the fp32 parameters."""
    layer = cls(nn.Linear(16, 8), r=4, dropout=0.0)
    randomize(layer)
    x = torch.randn(2, 3, 16, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16: 2^-8 relative per rounding
    layer.dropout = nn.Dropout(0.1)  # the training path (dropout mask kept by StackedMixture for MoR) too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert x.grad.dtype == torch.float32
    for n, p in layer.adapter_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("cls", [mor.LoRALinear, mor.DoRALinear, mor.MoSLoRALinear, mor.MoELoRALinear, mor.MoRLinear])
def test_bf16_base_fp32_adapter_all_methods(cls):
    layer = cls(nn.Linear(16, 8).to(torch.bfloat16), r=4, dropout=0.1)
    randomize(layer)
    out = layer(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 8)
    out.float().sum().backward()
    for n, p in layer.adapter_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n


def test_bf16_base_fp32_adapter():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = mor.MoRLinear(base, r=4, num_experts=2, dropout=0.0)
    assert layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    randomize(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    fp32 = copy.deepcopy(layer).float()
    torch.testing.assert_close(out.float(), fp32.reference(x.float()), atol=0.1, rtol=0.05)


def test_mor_compiles_fullgraph():
    """torch.compile(fullgraph=True) captures MoRLinear (aux-loss side effect included) without graph breaks.

    The backend is aot_eager by default: Dynamo's capture and AOT autograd's forward+backward graphs are
    what fullgraph checks, and a cold inductor C++ build takes ~40 s on 2 cores. MOR_COMPILE_BACKEND=inductor
    runs the full inductor path.
    """
    backend = os.environ.get("MOR_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    layer = mor.MoRLinear(nn.Linear(8, 6), r=2, alpha=4, num_experts=3, dropout=0.0, router="balanced")
    randomize(layer)
    x = torch.randn(5, 8)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)
    out = compiled(x)
    aux = layer.aux_loss
    ref = layer(x)
    torch.testing.assert_close(aux, layer.aux_loss, atol=1e-6, rtol=1e-6)
    assert_same_and_same_grads(out, ref, adapter_tensors(layer))


def test_compiled_backward_keeps_eager_dtypes_under_bf16_autocast():
    """torch.compile traces StackedMixture's backward with the forward's autocast still on; the backward turns it
    off, so a compiled layer's gradients are as far from the fp64 reference as eager's, not farther (with
    autocast leaking in, B̃'s factor products round to bf16: lora_B's error was 1.15x eager's, omega_B's 1.09x).
    aot_eager traces the same forward and backward graphs as inductor, without a C++ build."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = mor.MoRLinear(nn.Linear(64, 96), r=8, alpha=32, num_experts=8, dropout=0.0)
    randomize(layer)
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 64, generator=gen), torch.randn(256, 96, generator=gen)
    exact = copy.deepcopy(layer).double()
    (exact.reference(x.double()) * w.double()).sum().backward()

    def errors(fn):  # relative Frobenius error of each adapter gradient against the fp64 reference
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        (y.float() * w).sum().backward()
        return {n: ((p.grad.double() - exact.get_parameter(n).grad).norm() / exact.get_parameter(n).grad.norm()).item()
                for n, p in layer.adapter_parameters()}
    eager = errors(layer)
    compiled = errors(torch.compile(layer, backend="aot_eager", dynamic=False))
    for n in eager:  # the same bf16 roundings in the same order give the same error; 1.05 leaves room for reordering
        assert 1e-4 < eager[n] and compiled[n] <= 1.05 * eager[n], (n, eager[n], compiled[n])


# ----------------------------------------------------------------------------- baselines

def test_moelora_matches_naive_loop():
    layer = mor.MoELoRALinear(nn.Linear(12, 10), r=3, alpha=6, num_experts=3, dropout=0.0)
    randomize(layer)
    x = torch.randn(2, 4, 12, requires_grad=True)
    G = torch.softmax(x @ layer.router.weight.T, -1)
    ref = layer.base(x) + sum(G[..., i:i + 1] * (2.0 * x @ (layer.lora_B[i] @ layer.lora_A[i]).T) for i in range(3))
    out = layer(x)  # eq. 2
    assert_same_and_same_grads(out, ref, adapter_tensors(layer) + [x])


def test_lora_and_moslora_match_formula():
    x = torch.randn(3, 12)
    lora = mor.LoRALinear(nn.Linear(12, 10), r=4, alpha=8, dropout=0.0)
    randomize(lora)
    torch.testing.assert_close(lora(x), lora.base(x) + 2.0 * x @ (lora.lora_B @ lora.lora_A).T, atol=1e-5, rtol=1e-5)
    mos = mor.MoSLoRALinear(nn.Linear(12, 10), r=4, alpha=8, dropout=0.0)
    randomize(mos)
    ref = mos.base(x) + 2.0 * x @ (mos.lora_B @ mos.mixer @ mos.lora_A).T
    torch.testing.assert_close(mos(x), ref, atol=1e-5, rtol=1e-5)


def test_lora_init_like_peft():
    layer = mor.LoRALinear(nn.Linear(400, 30), r=8)
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(400)  # kaiming-uniform a=√5: U(±1/√fan_in)
    assert layer.lora_A.abs().max() > 0.9 / math.sqrt(400)


def test_dora_init_equals_base_and_formula():
    base = nn.Linear(12, 10)
    layer = mor.DoRALinear(copy.deepcopy(base), r=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 12, requires_grad=True)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.magnitude, base.weight.norm(dim=1))
    randomize(layer)
    W, s = layer.base.weight, 2.0
    V = W + s * layer.lora_B @ layer.lora_A
    ref = (layer.magnitude / V.norm(dim=1).detach()) * (x @ W.T + s * x @ (layer.lora_B @ layer.lora_A).T) + base.bias
    out = layer(x)
    assert_same_and_same_grads(out, ref, adapter_tensors(layer) + [x])


def test_dora_bf16_keeps_a_small_magnitude_change():
    """m moved by 0.3 % (a few optimizer steps) must move a bf16 layer's output by 0.3 % on average; rounding g
    to bf16 before subtracting 1 (bf16's step at 1 is 2^-8 = 0.4 %) used to make the change vanish."""
    torch.manual_seed(0)
    layer = mor.DoRALinear(nn.Linear(64, 32, bias=False).to(torch.bfloat16), r=4, alpha=8, dropout=0.0)  # B = 0
    with torch.no_grad():
        layer.magnitude.mul_(1.003)  # g = m / ||W|| = 1.003 on every row
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    out, base_out = layer(x).double(), layer.base(x).double()
    gain = ((out - base_out) * base_out).sum() / (base_out ** 2).sum()  # least-squares out ≈ (1 + gain) base_out
    assert abs(gain.item() - 0.003) < 0.0005


def test_dora_dropout_like_peft():
    # PEFT: W x + b + (g - 1) ⊙ W drop(x) + g ⊙ s B A drop(x), g = m / ‖W + sBA‖
    layer = mor.DoRALinear(nn.Linear(12, 10), r=4, alpha=8, dropout=0.4)
    randomize(layer)
    x = torch.randn(6, 12)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    h = F.dropout(x, 0.4, training=True)
    W, s = layer.base.weight, 2.0
    g = layer.magnitude / (W + s * layer.lora_B @ layer.lora_A).norm(dim=1)
    ref = layer.base(x) + (g - 1) * (h @ W.T) + g * (s * h @ (layer.lora_B @ layer.lora_A).T)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [mor.LoRALinear, mor.DoRALinear, mor.MoSLoRALinear])
def test_merge_unmerge(cls):
    layer = cls(nn.Linear(12, 10), r=4, alpha=8, dropout=0.0)
    randomize(layer)
    layer.eval()
    x = torch.randn(5, 12)
    w0 = layer.base.weight.clone()
    ref = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base(x), ref, atol=1e-5, rtol=1e-5)  # W itself now holds the update
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [mor.MoRLinear, mor.MoELoRALinear])
def test_mixtures_cannot_merge(cls):
    with pytest.raises(RuntimeError, match="depend on each input"):
        cls(nn.Linear(4, 4), r=2).merge()
    with pytest.raises(RuntimeError, match="depend on each input"):   # MoR inherits LoRA's A, B, not its fold
        cls(nn.Linear(4, 4), r=2).fold(True)


# ----------------------------------------------------------------------------- model helpers

METHODS = {"lora": {}, "dora": {}, "moslora": {}, "moelora": dict(num_experts=2),
           "mor": dict(num_experts=3), "mor_mean": dict(num_experts=3, router="mean")}


@pytest.mark.parametrize("name", list(METHODS))
def test_zero_B_equals_base_and_only_adapters_train(name):
    method = name.split("_")[0]
    model = mlp()
    ref_model = copy.deepcopy(model)
    replaced = mor.add_adapters(model, method, targets=("0", "2"), dropout=0.0, **METHODS[name])
    assert replaced == ["0", "2"]
    assert model.adapter_config["method"] == method and model.adapter_config["targets"] == ["0", "2"]
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), ref_model(x), atol=1e-6, rtol=1e-6)
    assert "0.base.weight" in model.state_dict()
    model(x).pow(2).sum().backward()
    adapter = set(mor.adapter_state_dict(model))
    for n, p in model.named_parameters():
        if n in adapter:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert model[2].lora_B.grad.abs().sum() > 0  # with B = 0, B is what moves first


def test_parameter_counts_follow_table2():
    d_in, h, d_out, r, N = 12, 10, 6, 4, 3
    layers = [(d_in, h), (h, d_out)]  # (d_in, d_out) of the two adapted layers
    expect = {  # Table 2 with d_in and d_out kept apart; the router counted with d_in
        "lora": sum(r * (i + o) for i, o in layers),
        "dora": sum(r * (i + o) + o for i, o in layers),
        "moslora": sum(r * (i + o) + r * r for i, o in layers),
        "moelora": sum(N * r * (i + o) + N * i for i, o in layers),
        "mor": sum(r * (i + o) + N * (i + o + r) for i, o in layers),
        "mor_mean": sum(r * (i + o) + N * (o + r) for i, o in layers),
    }
    total_base = sum(p.numel() for p in mlp().parameters())
    for name, n in expect.items():
        model = mlp()
        hyper = dict(r=r) if name in ("lora", "dora", "moslora") else dict(r=r, num_experts=N)
        if name == "mor_mean":
            hyper["router"] = "mean"
        mor.add_adapters(model, name.split("_")[0], targets=("0", "2"), **hyper)
        assert table2.count_parameters(model) == (n, n + total_base), name
        assert sum(v.numel() for v in mor.adapter_state_dict(model).values()) == n


def test_parameter_table_llama2_7b(capsys):
    rows = {row["label"]: row["trainable"] for row in table2.parameter_table(table2.LLAMA2_7B)}
    d, h, L, r = 4096, 11008, 32, 8
    lora_r8 = L * 3 * r * (d + h)  # w1, w3: d -> h, w2: h -> d
    assert rows["LoRA R8"] == lora_r8 and round(lora_r8 / 1e6, 1) == 11.6  # Table 1
    mor_e8 = lora_r8 + L * 8 * ((d + h) * 3 + 3 * r)
    assert rows["MoR E8R8"] == mor_e8 and round(mor_e8 / 1e6, 1) == 23.2  # Table 1
    assert rows["LoRA R16"] == 2 * lora_r8
    assert rows["DoRA R8"] == lora_r8 + L * (2 * h + d)
    assert rows["MoELoRA E2R8"] == 2 * lora_r8 + L * 2 * (2 * d + h)
    table2.main([])
    out = capsys.readouterr().out
    assert "hidden 11008" in out and "11,599,872" in out and "23,205,888" in out and " NO" not in out
    readme = open(os.path.join(ROOT, "README.md")).read().split("`python mor.py` (or `--params", 1)[1]
    assert out == readme.split("```\n", 2)[1]   # the table README shows is what `python mor.py` prints


def test_parameter_table_cli_params_file(tmp_path):
    """`python mor.py --params` hands over to tools/table2.py; a bad params.json is one error line."""
    p = tmp_path / "params.json"
    p.write_text('{"dim": 64, "n_layers": 2, "multiple_of": 16, "n_heads": 4}')

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "mor.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    res = run("--params", p)
    assert res.returncode == 0, res.stderr
    assert "hidden 176" in res.stdout  # 2·4·64/3 = 170 -> rounded up to a multiple of 16
    assert f"{2 * 3 * 8 * (64 + 176):,}" in res.stdout  # LoRA R8
    bad = tmp_path / "bad.json"
    bad.write_text('{"dim": 64,')
    for args, line in ((["--params", tmp_path / "missing.json"], f"--params: no such file {tmp_path}"),
                       (["--params", bad], f"{bad}: not a params.json ("),
                       (["--params", p, "--targets", "w9"], "--targets w9: target(s) ['w9'] match no")):
        res = run(*args)
        assert res.returncode == 1 and res.stdout == "" and res.stderr.startswith("error: " + line)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_adapter_state_dict_round_trip_and_strict():
    model = mlp()
    mor.add_adapters(model, "mor", targets=("0", "2"), num_experts=3)
    for _, layer in mor.adapter_layers(model):
        randomize(layer)
    sd = {k: v.clone() for k, v in mor.adapter_state_dict(model).items()}
    assert sorted(sd) == sorted(f"{i}.{n}" for i in (0, 2) for n in
                                ("lora_A", "lora_B", "omega_A", "omega_B", "router.weight"))
    fresh = mlp()
    mor.add_adapters(fresh, "mor", targets=("0", "2"), num_experts=3)
    mor.load_adapter_state_dict(fresh, sd)
    model.eval(), fresh.eval()  # no adapter dropout
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), model(x))
    for k, v in mor.adapter_state_dict(fresh).items():
        assert torch.equal(v, sd[k])
    bad = dict(sd)
    del bad["0.lora_A"]
    bad["0.extra"] = torch.zeros(1)
    bad["2.omega_B"] = torch.zeros(5, 6)
    with pytest.raises(RuntimeError) as e:
        mor.load_adapter_state_dict(fresh, bad)
    msg = str(e.value)
    assert "0.lora_A" in msg and "0.extra" in msg and "2.omega_B" in msg


@pytest.mark.parametrize("method", ["dora", "mor", "full"])
def test_save_load_adapter(tmp_path, method):
    model = mlp()
    if method == "full":
        model.adapter_config = {"method": "full"}
        with torch.no_grad():
            model[0].weight.add_(1.0)
    else:
        mor.add_adapters(model, method, targets=("2",), r=3, alpha=6, dropout=0.1)
        randomize(model[2])
    path = str(tmp_path / "sub" / "adapter.pth")
    mor.save_adapter(model, path)
    fresh = mlp()
    cfg = mor.load_adapter(fresh, path)
    assert cfg == model.adapter_config and fresh.adapter_config == cfg
    model.eval(), fresh.eval()
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), model(x))
    if method != "full":
        assert fresh[2].r == 3 and fresh[2].alpha == 6 and fresh[2].dropout.p == 0.1
        assert set(torch.load(path, weights_only=True)["state_dict"]) == {"2." + n for n, _ in
                                                                         model[2].adapter_parameters()}


def ffn_model(hidden=(96, 96), dim=32, targets=None, **hyper):
    """A LLaMA's adapted part (layers.i.feed_forward.w1/w2/w3; hidden width per layer), adapted with
    LoRA when targets are given."""
    model = nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"feed_forward": nn.ModuleDict(
        {"w1": nn.Linear(dim, h), "w2": nn.Linear(h, dim), "w3": nn.Linear(dim, h)})}) for h in hidden)})
    if targets:
        mor.add_adapters(model, "lora", targets=targets, r=2, **hyper)
    return model


def test_adapter_file_trained_on_another_base_is_one_error_naming_both(tmp_path):
    path = str(tmp_path / "adapter.pth")
    mor.save_adapter(ffn_model(targets=("w1", "w2", "w3")), path)
    ffn = "(w1 32x96, w2 96x32, w3 32x96)"
    with pytest.raises(ValueError) as e:   # deeper
        mor.load_adapter(ffn_model(hidden=(96, 96, 96)), path)
    assert str(e.value) == f"{path}: trained on dim 32 / 2 layers {ffn}, this base is dim 32 / 3 layers {ffn}"
    with pytest.raises(ValueError) as e:   # another FFN width
        mor.load_adapter(ffn_model(hidden=(128, 128)), path)
    assert str(e.value) == (f"{path}: trained on dim 32 / 2 layers {ffn}, this base is dim 32 / 2 layers "
                            "(w1 32x128, w2 128x32, w3 32x128)")
    with pytest.raises(ValueError) as e:   # another width
        mor.load_adapter(ffn_model(dim=48), path)
    assert str(e.value) == (f"{path}: trained on dim 32 / 2 layers {ffn}, this base is dim 48 / 2 layers "
                            "(w1 48x96, w2 96x48, w3 48x96)")
    mor.save_adapter(ffn_model(hidden=(96, 128), targets=("w1",)), path)
    with pytest.raises(ValueError) as e:   # the same shapes, in other layers: the first linear that differs
        mor.load_adapter(ffn_model(hidden=(128, 96)), path)
    assert str(e.value) == (f"{path}: trained on layers.0.feed_forward.w1 32x96, this base is "
                            "layers.0.feed_forward.w1 32x128")
    full = ffn_model()
    full.adapter_config = {"method": "full"}
    mor.save_adapter(full, path)
    with pytest.raises(ValueError) as e:   # full fine-tuning: every linear's weight
        mor.load_adapter(ffn_model(hidden=(96,)), path)
    assert str(e.value) == f"{path}: trained on dim 32 / 2 layers {ffn}, this base is dim 32 / 1 layers {ffn}"
    resumed = ffn_model(hidden=(128, 128), targets=("w1", "w2", "w3"))   # adapters there, as on resume
    resumed.adapter_config = {"method": "full"}
    mor.save_adapter(ffn_model(targets=("w1", "w2", "w3")), path)
    resumed.adapter_config = mor.load_adapter(ffn_model(), path)   # the same config, other shapes
    with pytest.raises(ValueError, match=re.escape(f"{path}: trained on dim 32 / 2 layers {ffn}, this base is "
                                                   "dim 32 / 2 layers (w1 32x128")):
        mor.load_adapter(resumed, path)


def test_adapter_file_faults_are_one_value_error_naming_the_file(tmp_path):
    good = str(tmp_path / "good.pth")
    model = ffn_model(targets=("w1",))
    mor.save_adapter(model, good)
    garbage, truncated, weights, code, vera, extra, other = (
        str(tmp_path / n) for n in ("garbage", "truncated", "weights", "code", "vera", "extra", "other"))
    open(garbage, "wb").write(bytes(range(256)) * 8)
    open(truncated, "wb").write(open(good, "rb").read()[:500])
    torch.save({"layers.0.feed_forward.w1.weight": torch.zeros(2, 2)}, weights)
    torch.save({"config": {"method": "lora"}, "state_dict": {}, "x": nn.Identity()}, code)   # a pickled object
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "method": "vera"}}, vera)
    torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], "layers.0.feed_forward.w1.bogus": torch.zeros(1)}},
               extra)
    torch.save({**ckpt, "config": {**ckpt["config"], "targets": ["w9"]}}, other)
    archive = "not an adapter file (not a torch.save archive: truncated, garbage, or another format)"
    cases = {garbage: archive, truncated: archive,
             weights: "not an adapter file (expected save_adapter()'s {'config', 'state_dict'})",
             code: "not an adapter file (UnpicklingError: Weights only load failed",
             vera: "unknown adapter method 'vera'; choose from",
             extra: "adapter state dict does not match the model: missing keys: [] unexpected keys: "
                    "['layers.0.feed_forward.w1.bogus'] mis-shaped: []",
             other: "target(s) ['w9'] match no nn.Linear in the model"}
    for path, reason in cases.items():
        with pytest.raises(ValueError) as e:
            mor.load_adapter(ffn_model(), path)
        assert str(e.value).startswith(f"{path}: {reason}") and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:   # the model has other adapters than the file
        mor.load_adapter(ffn_model(targets=("w2",)), good)
    assert str(e.value).startswith(f"{good}: the file holds adapters {{'method': 'lora', 'targets': ['w1']")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope'}: no such adapter file")):
        mor.load_adapter(ffn_model(), str(tmp_path / "nope"))


def test_mor_refuses_a_base_with_its_own_forward():
    class Doubled(nn.Linear):   # a quantised or otherwise changed linear: W x + b is not what it computes
        def forward(self, x):
            return 2 * super().forward(x)

    class Named(nn.Linear):     # a subclass that keeps nn.Linear's forward is fine
        pass
    with pytest.raises(TypeError, match="plain nn.Linear base, got Doubled"):
        mor.MoRLinear(Doubled(4, 3), r=2, num_experts=2)
    layer = mor.MoRLinear(Named(4, 3), r=2, num_experts=2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), layer.base(x))   # B = 0 at init: the base's output


def test_add_adapters_errors():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        mor.add_adapters(mlp(), "lora", targets=("w1",))
    with pytest.raises(ValueError, match="unknown adapter method"):
        mor.add_adapters(mlp(), "vera", targets=("0",))
    with pytest.raises(TypeError, match="num_experts"):
        mor.add_adapters(mlp(), "lora", targets=("0",), num_experts=2)
    with pytest.raises(ValueError, match="router"):
        mor.add_adapters(mlp(), "mor", targets=("0",), router="top2")
    model = mlp()
    mor.add_adapters(model, "lora", targets=("0",))
    with pytest.raises(RuntimeError, match="already has adapters"):
        mor.add_adapters(model, "lora", targets=("2",))
    with pytest.raises(RuntimeError, match="adapter_config"):
        mor.save_adapter(mlp(), "/tmp/never.pth")


def test_dotted_targets_on_nested_model():
    model = nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"ffn": nn.ModuleDict(
        {"w1": nn.Linear(4, 6, bias=False), "w2": nn.Linear(6, 4, bias=False)})}) for _ in range(2))})
    names = mor.add_adapters(model, "mor", targets=("ffn.w1", "w2"), num_experts=2)
    assert names == ["layers.0.ffn.w1", "layers.0.ffn.w2", "layers.1.ffn.w1", "layers.1.ffn.w2"]
    assert isinstance(model["layers"][1]["ffn"]["w1"], mor.MoRLinear)


def test_mor_file_stands_alone(tmp_path):
    src = open(os.path.join(ROOT, "mor.py")).read()
    imported = set()
    # the __main__ guard hands `python mor.py` over to tools/table2.py (run below without it)
    module = ast.parse(src.split('\nif __name__ == "__main__":\n')[0])
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch"}

    def dotted(node):  # "torch.ops.aten.x" for an attribute chain on a name, else None
        if isinstance(node, ast.Attribute):
            return dotted(node.value) + "." + node.attr if dotted(node.value) else None
        return node.id if isinstance(node, ast.Name) else None
    tree = ast.parse(src)
    names = {dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)} - {None}
    names |= {"torch." + n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call)
              and dotted(n.func) == "getattr" and dotted(n.args[0]) == "torch" and isinstance(n.args[1], ast.Constant)}
    private = sorted(n for n in names if n.split(".")[0] == "torch" and any(p[:1] == "_" or p == "ops"
                                                                            for p in n.split(".")[1:]))
    # copied into projects on other torch versions: public torch API only, but for softmax's own backward, looked up
    # with a written-out fallback (test_softmax_backward_fallback_equals_reference) because it pays in bf16
    assert private == ["torch._softmax_backward_data"], private
    code = ("import sys, torch, torch.nn as nn; import mor\n"
            "m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))\n"
            "mor.add_adapters(m, 'mor', targets=('0', '2'), num_experts=2)\n"
            "m(torch.randn(3, 4)).sum().backward()\n"
            "assert not any(k in sys.modules for k in ('llama', 'train', 'data', 'evaluate')), sys.modules.keys()\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # copied alone, `python mor.py` says in one line where the table lives
    shutil.copy(os.path.join(ROOT, "mor.py"), tmp_path / "mor.py")
    res = subprocess.run([sys.executable, "mor.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 1 and res.stdout == "" and res.stderr == (
        "error: `python mor.py` prints Table 2 with the MoR project's tools/table2.py, which is not "
        "beside this copy of mor.py\n")
