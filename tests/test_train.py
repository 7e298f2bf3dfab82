"""train.py: every method learns with a frozen base, gradient accumulation, torchrun (gloo), exact resume
after SIGKILL, SIGTERM, NaN stop, bad input. CUDA-only tests (bf16, compile, NCCL) are named test_cuda_*."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import data
import mor
import train
from conftest import ROOT
from llama import Transformer
from tools import schedule, train_cli

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """16 synthetic chat examples (4 skills x 4) as a Tulu-format JSONL file."""
    path = str(tmp_path_factory.mktemp("sft") / "train.jsonl")
    return data.write_jsonl(data.synthetic_tasks(4, seed=0), path)


def config(ckpt, sft, out, **kw) -> train.TrainConfig:
    base = dict(ckpt_dir=ckpt, data=[sft], out_dir=str(out), max_len=128, val_size=0, global_batch=8,
                micro_batch=8, max_steps=4, lr=1e-2, progress=False, pad_to_multiple=1, ckpt_every=1000, seed=0)
    base.update(kw)
    return train.TrainConfig(**base)


def cli(cfg: train.TrainConfig) -> list[str]:
    """The command-line flags that reproduce cfg."""
    args = []
    for k, v in vars(cfg).items():
        if v == []:
            continue
        flag = "--lora_r" if k == "r" else f"--{k}"   # torchrun rejects --r (ambiguous with its own flags)
        args += [flag] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return args


def plain_loss(model, examples) -> float:
    """Mean next-token loss over supervised tokens, one example at a time (independent of train.py)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
            for t in range(1, len(ids)):
                if labels[t] != data.IGNORE_INDEX:
                    total -= float(logp[t - 1, labels[t]])
                    count += 1
    return total / count


def base_weights_unchanged(model, ckpt):
    original = torch.load(os.path.join(ckpt, "consolidated.00.pth"), weights_only=True)
    own = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for k, v in original.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("method", ["mor", "lora", "dora", "moelora", "moslora", "full"])
def test_every_method_lowers_the_loss(tiny_ckpt, sft, tmp_path, method):
    cfg = config(tiny_ckpt, sft, tmp_path, method=method, max_steps=6, lr=1e-3 if method == "full" else 1e-2)
    tok = train.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    examples, _ = data.load_dataset(sft, tok, cfg.max_len)
    before = plain_loss(Transformer.from_checkpoint(tiny_ckpt), examples)
    model = train.train(cfg)
    model.eval()
    after = plain_loss(model, examples)
    assert after < 0.9 * before, (before, after)
    # no CUDA graphs here: zero_grad frees the gradients after each step, as when they are not kept, full
    # fine-tuning would hold a model-sized gradient through the next forward
    assert all(p.grad is None for p in model.parameters())
    if method != "full":
        base_weights_unchanged(model, tiny_ckpt)   # bit-identical frozen base
        assert all(not p.requires_grad for n, p in model.named_parameters() if ".base." in n)
    saved = torch.load(os.path.join(tmp_path, "adapter.pth"), weights_only=True)
    assert saved["config"]["method"] == method
    log = [json.loads(line) for line in open(os.path.join(tmp_path, "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 7))


def test_grad_accumulation_matches_one_big_batch(tiny_ckpt, sft):
    tok = train.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    examples, _ = data.load_dataset(sft, tok, 128)
    examples = examples[:4]
    model = Transformer.from_checkpoint(tiny_ckpt)
    torch.manual_seed(0)
    mor.add_adapters(model, "mor", r=4, num_experts=3, dropout=0.0)
    with torch.no_grad():   # B = 0 at init would leave A without gradient: make every factor matter
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        train.forward_backward(model, micro_batches, torch.device("cpu"))
        return {n: p.grad.clone() for n, p in params.items()}

    one = grads([data.collate(examples, pad_id=0)])
    four = grads([data.collate([ex], pad_id=0) for ex in examples])
    # reference: mean over every supervised token of the 4 examples, plain loop, no padding
    model.zero_grad(set_to_none=True)
    losses, count = [], 0
    for ids, labels in examples:
        logp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
        for t in range(1, len(ids)):
            if labels[t] != data.IGNORE_INDEX:
                losses.append(-logp[t - 1, labels[t]])
                count += 1
    (torch.stack(losses).sum() / count).backward()
    ref = {n: p.grad.clone() for n, p in params.items()}
    for n in params:
        assert torch.allclose(one[n], ref[n], atol=1e-6, rtol=1e-5), n
        assert torch.allclose(four[n], ref[n], atol=1e-6, rtol=1e-5), n
        assert ref[n].abs().max() > 0, n


class ReplayedScale(torch.autograd.Function):
    """y = x * w whose backward writes dL/dw into one buffer that every call reuses, as a CUDA graph replay
    writes a compiled backward's outputs to the same memory-pool addresses each time (the device-independent
    part of --compile_mode reduce-overhead)."""
    out = None

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        return x * w

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ReplayedScale.out is None:
            ReplayedScale.out = torch.empty(x.shape[-1])
        ReplayedScale.out.copy_((g * x).sum((0, 1)))
        return g * 0, ReplayedScale.out.view(-1)   # a fresh alias: autograd may take it over as .grad


def test_accumulation_survives_backward_outputs_being_overwritten():
    """forward_backward over 2 micro-batches (2 steps) gives the gradient of the whole batch even when each
    backward's output memory is overwritten by the next one; reference: plain autograd, one loop over every
    token of the whole batch. Taking the first backward's output over as .grad would give 2 g2, not g1 + g2."""
    g = torch.Generator().manual_seed(0)
    emb, head = torch.randn(11, 6, generator=g), torch.randn(6, 11, generator=g)
    w = torch.nn.Parameter(torch.randn(6, generator=g))

    def model(ids):
        return ReplayedScale.apply(emb[ids], w) @ head
    model.parameters = lambda: [w]   # all forward_backward asks of a model besides calling it
    for step in range(2):
        ids = torch.randint(0, 11, (4, 5), generator=g)
        mbs = [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2]} for i in (0, 2)]
        if step:
            w.grad.zero_()   # what zero_grad(set_to_none=False) does
        train.forward_backward(model, mbs, torch.device("cpu"), keep_grads=True)
        ref = torch.zeros(())
        wr = w.detach().clone().requires_grad_()
        for row in ids:
            logp = F.log_softmax((emb[row] * wr) @ head, dim=-1)
            ref = ref - sum(logp[t - 1, row[t]] for t in range(1, len(row)))
        (expected,) = torch.autograd.grad(ref / (4 * 4), wr)
        torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-6)   # fp32, sums of 16 tokens


# End-to-end equality after Adam steps uses LoRA or MoR's mean router: at MoR's init every expert is the same
# (Ω = 1), so the learned router's gradient is pure rounding noise (exactly 0 in exact arithmetic), which Adam
# rescales to updates of size lr·noise/eps that differ with summation order. Gradients are compared above.
def test_accumulation_layouts_give_same_training(tiny_ckpt, sft, tmp_path):
    kw = dict(global_batch=4, max_steps=3, dropout=0.0, method="lora")
    a = train.train(config(tiny_ckpt, sft, tmp_path / "a", micro_batch=4, **kw))
    b = train.train(config(tiny_ckpt, sft, tmp_path / "b", micro_batch=1, **kw))
    sa, sb = mor.adapter_state_dict(a), mor.adapter_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0), k


def test_balance_loss_is_added_for_balanced_router(tiny_ckpt, sft):
    tok = train.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    examples, _ = data.load_dataset(sft, tok, 128)
    model = Transformer.from_checkpoint(tiny_ckpt)
    mor.add_adapters(model, "mor", num_experts=4, dropout=0.0, router="balanced")
    model.train()
    mb = [data.collate(examples[:4], pad_id=0)]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for coef in (0.0, 0.5):
        model.zero_grad(set_to_none=True)
        train.forward_backward(model, mb, torch.device("cpu"), balance_coef=coef)
        out[coef] = {n: p.grad.clone() for n, p in params.items()}
    model(mb[0]["input_ids"])   # the balance loss of this batch on its own
    aux = torch.autograd.grad(mor.balance_loss(model), list(params.values()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in aux)
    for (n, p), g in zip(params.items(), aux):
        expected = out[0.0][n] + (0.5 * g if g is not None else 0)
        assert torch.allclose(out[0.5][n], expected, atol=1e-6), n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_DUMP = """
import os, sys, torch
import mor, train
from tools import train_cli
model = train.train(train_cli.parse_args(train.TrainConfig, sys.argv[1:]))
sd = mor.save_adapter(model, None)["state_dict"]   # gathered from the shards under FSDP
torch.save(sd, os.path.join(model_out, f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tiny_ckpt, sft, tmp_path, mode):
    """torchrun --nproc_per_node=2 (gloo): both ranks end identical and equal to one process, same global batch."""
    script = tmp_path / "run.py"
    script.write_text(f"model_out = {str(tmp_path)!r}\n" + RANK_DUMP)
    kw = dict(global_batch=4, max_steps=3, dropout=0.0, router="mean")
    cfg = config(tiny_ckpt, sft, tmp_path / "ddp", micro_batch=1, fsdp=mode == "fsdp", **kw)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script)] + cli(cfg)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) x 2 micro-batch(es) of 1 = global batch 4" in r.stdout
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    single = mor.adapter_state_dict(train.train(config(tiny_ckpt, sft, tmp_path / "one", micro_batch=4, **kw)))
    saved = torch.load(tmp_path / "ddp" / "adapter.pth", weights_only=True)["state_dict"]
    for k in single:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(saved[k], r0[k]), k
        # one process's micro-batch of 4 against 2 ranks x 2 of 1: the loss sums in another order (fp32 eps 1.2e-7
        # relative in the gradients), and 3 AdamW steps of lr 1e-2 pass that on at ~lr x 1e-7 per step: 1e-6
        assert torch.allclose(r0[k], single[k], atol=1e-6, rtol=0), k


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, env=ENV, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_sigkill_and_resume_is_bit_identical(tiny_ckpt, sft, tmp_path):
    # dropout on: the resumed run must also continue the RNG stream exactly
    kw = dict(global_batch=4, micro_batch=2, max_steps=6, ckpt_every=2, dropout=0.1, lr=5e-3)
    full = run_cli(cli(config(tiny_ckpt, sft, tmp_path / "full", **kw)))
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = run_cli(cli(config(tiny_ckpt, sft, tmp_path / "crash", crash_at_step=3, **kw)))
    assert crashed.returncode == -signal.SIGKILL
    assert open(tmp_path / "crash" / "latest").read().strip() == "ckpt_00000002"   # step 3 was lost
    assert not (tmp_path / "crash" / "adapter.pth").exists()
    resumed = run_cli(cli(config(tiny_ckpt, sft, tmp_path / "crash", resume=str(tmp_path / "crash"), **kw)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    a = torch.load(tmp_path / "full" / "adapter.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "crash" / "adapter.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "crash" / "log.jsonl")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]   # the log is rewritten from the checkpoint on


def signal_after_two_steps(p: subprocess.Popen, log, send) -> tuple[str, str]:
    """Once the run's log.jsonl has two steps, call send() (a signal to the run); then its (stdout, stderr)."""
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    send()
    return p.communicate(timeout=120)


def test_sigterm_checkpoints_and_exits_cleanly(tiny_ckpt, sft, tmp_path):
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] +
                         cli(config(tiny_ckpt, sft, out, max_steps=100000, global_batch=4, micro_batch=4)),
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = out / "log.jsonl"
    stdout, stderr = signal_after_two_steps(p, log, lambda: p.send_signal(signal.SIGTERM))
    assert p.returncode == 0, stderr[-3000:]
    assert "stopped by signal" in stdout
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    assert open(out / "latest").read().strip() == f"ckpt_{last:08d}"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_ckpt, sft, tmp_path):
    r = run_cli(cli(config(tiny_ckpt, sft, tmp_path, method="full", lr=1e30, max_steps=20, ckpt_every=1,
                           grad_clip=0.0, global_batch=4, micro_batch=4)))
    assert r.returncode == 1
    assert "is not finite" in r.stderr and "Last good checkpoint" in r.stderr
    good = open(tmp_path / "latest").read().strip()
    state = torch.load(tmp_path / good / "state.pt", weights_only=True)
    assert state["step"] >= 1 and good in r.stderr
    weights = torch.load(tmp_path / good / "adapter.pth", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_bad_input_errors(tiny_ckpt, sft, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = open(sft).read().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"messages": [{"role": "user", "content": "hi"}]}'] + lines[3:]) + "\n")

    def main(cfg_or_args):
        args = cli(cfg_or_args) if isinstance(cfg_or_args, train.TrainConfig) else cfg_or_args
        with pytest.raises(SystemExit) as e:
            train.main(args)
        assert e.value.code == 1
        return capsys.readouterr().err

    assert f"error: {bad}:4: no assistant turn" in main(config(tiny_ckpt, str(bad), tmp_path / "a", max_steps=1))
    train.main(cli(config(tiny_ckpt, str(bad), tmp_path / "b", max_steps=1, skip_bad_examples=True)))
    assert "1 bad line(s) skipped" in capsys.readouterr().out
    assert "--method must be one of" in main(config(tiny_ckpt, sft, tmp_path / "c", method="bogus"))
    assert "no checkpoint there" in main(["--ckpt_dir", tiny_ckpt, "--data", sft, "--resume", str(tmp_path / "d")])
    assert "--ckpt_dir and --data are required" in main(["--data", sft])
    assert "no params.json" in main(["--ckpt_dir", str(tmp_path), "--data", sft])
    assert "--ckpt_every must be in [1, inf), got 0" in main(config(tiny_ckpt, sft, tmp_path / "e", ckpt_every=0))
    assert "error: global batch 6 is not a multiple of micro_batch 4" in main(
        config(tiny_ckpt, sft, tmp_path / "f", global_batch=6, micro_batch=4))
    # resuming with other adapter settings: one clear line before any weight is loaded, not a state-dict traceback
    train.main(cli(config(tiny_ckpt, sft, tmp_path / "g", method="lora", max_steps=1, global_batch=4,
                          micro_batch=4)))
    capsys.readouterr()
    err = main(config(tiny_ckpt, sft, tmp_path / "g", method="mor", r=4, max_steps=2, global_batch=4, micro_batch=4,
                      resume=str(tmp_path / "g")))
    assert f"error: --resume {tmp_path / 'g'}: --method mor (the run has lora), --r 4 (the run has 8): cannot " \
        "change on resume" in err


def test_cli_overrides_every_field():
    cfg = train_cli.parse_args(train.TrainConfig, ["--lr", "1e-4", "--no_compile", "--pack", "--targets", "w1,w3", "--data", "a", "b",
                            "--method", "lora", "--tf32", "false", "--num_experts", "2", "--lora_r", "16"])
    assert (cfg.lr, cfg.compile, cfg.pack, cfg.targets, cfg.data, cfg.method, cfg.tf32, cfg.num_experts, cfg.r) == \
        (1e-4, False, True, ["w1", "w3"], ["a", "b"], "lora", False, 2, 16)
    assert train_cli.parse_args(train.TrainConfig, ["--r", "4"]).r == 4
    d = train.TrainConfig()   # the paper's §4.1 defaults
    assert (d.method, d.r, d.alpha, d.num_experts, d.dropout, d.lr, d.global_batch, d.max_len, d.targets) == \
        ("mor", 8, 32, 8, 0.05, 2e-4, 8, 1024, ["w1", "w2", "w3"])


def test_lr_schedule_by_hand():
    lam = [schedule.lr_lambda(s, warmup=2, total=6, min_ratio=0.0) for s in range(6)]
    assert lam[:2] == [0.5, 1.0]
    assert lam[2] == pytest.approx(1.0) and lam[4] == pytest.approx(0.5) and lam[5] == pytest.approx(
        0.5 * (1 + __import__("math").cos(__import__("math").pi * 3 / 4)))


def test_compile_modes_accepted_and_compiled_steps_match_eager(tiny_ckpt, sft, tmp_path):
    """Each --compile_mode parses and builds per-block compiled training steps equal to eager ones; with
    reduce-overhead (CUDA graphs) every length bucket gets its own static graph. aot_eager keeps it cheap on
    CPU: it ignores the mode (inductor's concern, on CUDA), but Dynamo's capture, guards and static shapes are
    the real ones."""
    from torch._dynamo.utils import counters
    for mode in train.COMPILE_MODES:
        assert train_cli.parse_args(train.TrainConfig, ["--compile_mode", mode]).compile_mode == mode
    with pytest.raises(train.ConfigError, match="--compile_mode must be one of default, reduce-overhead, "
                                                "max-autotune-no-cudagraphs, got 'max-autotune'"):
        train_cli.check_config(config(tiny_ckpt, sft, tmp_path, compile_mode="max-autotune"))
    tok = train.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    examples, _ = data.load_dataset(sft, tok, 128)
    batches = [data.collate([(ids[:n], labels[:n]) for ids, labels in examples[:2]], 0, 8) for n in (8, 16, 24)]

    def steps(mode, n_batches):
        model = Transformer.from_checkpoint(tiny_ckpt)
        model.train()
        torch.manual_seed(0)
        mor.add_adapters(model, "mor", r=4, num_experts=3, dropout=0.0)
        if mode:
            train.wrap_blocks(model, compile=True, grad_ckpt=False, mode=mode, buckets=3, backend="aot_eager")
        out = []
        for mb in batches[:n_batches]:
            model.zero_grad(set_to_none=True)
            loss, _ = train.forward_backward(model, [mb], torch.device("cpu"))
            out.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        return out

    eager = steps(None, 3)
    graphs = {}
    for mode, n_batches in (("default", 3), ("reduce-overhead", 3), ("max-autotune-no-cudagraphs", 1)):
        torch._dynamo.reset()
        counters.clear()
        for (loss, grads), (ref_loss, ref_grads) in zip(steps(mode, n_batches), eager):
            assert loss == pytest.approx(ref_loss, rel=1e-6)
            assert all(torch.allclose(g, r, atol=1e-6, rtol=1e-5) for g, r in zip(grads, ref_grads))
        graphs[mode] = counters["stats"]["unique_graphs"]
    # two graphs per shape (the first block's input needs no gradient, the others' do): static shapes give
    # 2 per bucket; the default mode turns dynamic at the second shape and covers the third with it
    assert graphs["reduce-overhead"] == 6 and graphs["default"] == 4
    assert torch._dynamo.config.recompile_limit >= 4 * 3 + 2


def test_lr_schedule_refit_on_resume_by_hand():
    cfg = train.TrainConfig(warmup_ratio=0.5)
    saved = schedule.plan_schedule(cfg, 10)
    assert saved == {"warmup": 5, "total": 10, "start": 0, "start_mult": 1.0}

    def lrs(plan, steps):
        return [schedule.lr_lambda(s, min_ratio=0.0, **plan) for s in steps]
    # resumed at step 2 (in the warmup) and made longer: the warmup goes on, the cosine spans steps 5..20
    longer = schedule.plan_schedule(cfg, 20, step=2, saved=saved)
    assert lrs(longer, range(2, 7)) == pytest.approx([3 / 5, 4 / 5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 15))])
    # made shorter than the warmup: from the last multiplier 2/5 down over the 2 steps left (3 intervals)
    shorter = schedule.plan_schedule(cfg, 4, step=2, saved=saved)
    assert lrs(shorter, [2, 3]) == pytest.approx([0.4 * 0.5 * (1 + math.cos(math.pi / 3)),
                                                  0.4 * 0.5 * (1 + math.cos(2 * math.pi / 3))])
    assert schedule.plan_schedule(cfg, 10, step=7, saved=saved) is saved   # the same length: the saved plan
    # a killed run resumed with --max_steps at or below its step trains nothing: the saved plan, no 1/0
    for total in (6, 7):
        assert schedule.plan_schedule(cfg, total, step=7, saved=saved) is saved


def test_demo_smoke(tmp_path):
    """The demo's whole path (tokenizer, Meta layout on disk, full pretraining, MoR, evaluation), tiny sizes."""
    from demo.demo import demo
    result = demo(str(tmp_path), n_per_skill=8, n_eval=4, pretrain_steps=2, steps=2, progress=False)
    assert set(result["before"]) == set(result["after"]) == set(data.SKILLS) | {"all"}
    assert os.path.isfile(tmp_path / "mor" / "adapter.pth")
    for f in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        assert os.path.isfile(tmp_path / "base" / f)


# ----------------------------------------------------------------------------- CUDA only (bench/gpu.sh)

@CUDA
def test_cuda_bf16_base_fp32_adapters(tiny_ckpt, sft, tmp_path):
    model = train.train(config(tiny_ckpt, sft, tmp_path, device="cuda", compile=False, max_steps=6))
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    original = torch.load(os.path.join(tiny_ckpt, "consolidated.00.pth"), weights_only=True)
    own = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    assert all(torch.equal(own[k].cpu(), v.to(torch.bfloat16)) for k, v in original.items())
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert log[-1]["loss"] < log[0]["loss"]


def mor_step_grads(ckpt: str, device: str, bf16: bool, compiled: bool) -> tuple[float, dict]:
    """Loss and adapter gradients of one forward/backward of a MoR model (activation checkpointing on)."""
    model = Transformer.from_checkpoint(ckpt, device=device)
    torch.manual_seed(0)  # the same random A and router in every run
    mor.add_adapters(model, "mor", r=4, num_experts=3, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0 and unequal experts, so that every adapter parameter gets a real gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    train.cast_for_training(model, torch.bfloat16 if bf16 else torch.float32)
    model.train()
    train.wrap_blocks(model, compile=compiled, grad_ckpt=True)
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@CUDA
def test_cuda_compile_matches_eager(tiny_ckpt):
    """Compiled blocks add no more error than bf16 itself: against an fp32 eager reference, the compiled bf16
    loss and gradients are within twice the eager bf16 ones' error (and both close to it).

    Compared on one step rather than on weights after Adam steps: Adam turns bf16 rounding noise in
    near-zero gradients into full-size updates."""
    l32, g32 = mor_step_grads(tiny_ckpt, "cuda", bf16=False, compiled=False)
    leager, geager = mor_step_grads(tiny_ckpt, "cuda", bf16=True, compiled=False)
    lcomp, gcomp = mor_step_grads(tiny_ckpt, "cuda", bf16=True, compiled=True)
    assert abs(lcomp - l32) <= 2 * abs(leager - l32) + 1e-3 * abs(l32)
    for n, ref in g32.items():
        e_eager, e_comp = (geager[n] - ref).norm(), (gcomp[n] - ref).norm()
        assert e_comp <= 2 * e_eager + 1e-3 * ref.norm(), (n, e_comp.item(), e_eager.item())
        assert e_comp <= 0.2 * ref.norm(), n


@CUDA
def test_cuda_reduce_overhead_accumulation_matches_eager(tiny_ckpt):
    """--compile_mode reduce-overhead with 2 micro-batches per step: every adapter gradient of 3 steps equals
    eager's (the first run of a graph warms up, the second records it, the third replays it).

    fp32 on both sides, TF32 off: the two differ only by inductor's fusion and summation order over at most
    a few hundred terms (~1e-6 relative); a micro-batch lost or counted twice is an O(1) difference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens = torch.randint(0, 300, (3, 2, 2, 32), generator=torch.Generator().manual_seed(0))

    def run(mode):
        model = Transformer.from_checkpoint(tiny_ckpt, device="cuda")
        model.train()
        torch.manual_seed(0)
        mor.add_adapters(model, "mor", r=4, num_experts=3, dropout=0.0)   # eager's RNG is not inductor's
        with torch.no_grad():   # B != 0, unequal experts: every adapter parameter gets a real gradient
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        train.wrap_blocks(model, compile=mode is not None, grad_ckpt=False, mode=mode, buckets=1)
        params = [p for p in model.parameters() if p.requires_grad]
        out = []
        for step in tokens:
            model.zero_grad(set_to_none=False)
            train.forward_backward(model, [{"input_ids": t, "labels": t} for t in step], torch.device("cuda"),
                                   keep_grads=mode is not None)
            out.append([p.grad.clone() for p in params])
        return out

    eager = run(None)
    torch._dynamo.reset()
    for step, (graphs, ref) in enumerate(zip(run("reduce-overhead"), eager)):
        for g, r in zip(graphs, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(),
                                       msg=lambda m, s=step: f"step {s}: {m}")


@CUDA
def test_cuda_torchrun_nccl_one_process(tiny_ckpt, sft, tmp_path):
    for extra in ([], ["--fsdp"]):
        out = tmp_path / ("fsdp" if extra else "ddp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
               os.path.join(ROOT, "train.py")] + cli(config(tiny_ckpt, sft, out, device="cuda", max_steps=3,
                                                            ckpt_every=2, compile=False)) + extra
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert os.path.isfile(out / "adapter.pth") and open(out / "latest").read().strip() == "ckpt_00000003"
        # resume from step 2 under the same launcher
        shutil.rmtree(out / "ckpt_00000003")
        with open(out / "latest", "w") as f:
            f.write("ckpt_00000002\n")
        r = subprocess.run(cmd + ["--resume", str(out)], env=ENV, capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
        assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr[-3000:]
