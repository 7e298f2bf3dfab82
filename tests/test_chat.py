"""llama.py --adapter --chat: the Tulu template the model sees, cached decoding with an adapter against greedy
argmax over full forwards (no cache) computed here, streaming, and the command line with piped stdin."""
import io
import os
import subprocess
import sys

import pytest
import torch

import llama
import mor
from conftest import ROOT, STORIES
from tools import chat

SYSTEM, TURNS = "Be brief.", ["hello there", "and again?"]


def adapted(ckpt_dir: str, method: str, run_dir: str, seed: int = 0, **hyper) -> llama.Transformer:
    """Base + `method` adapter with random, non-zero weights (as if trained), saved to run_dir/adapter.pth and
    loaded back the way the command line does; the returned model is the loaded one."""
    model = llama.Transformer.from_checkpoint(ckpt_dir, max_seq_len=256)
    torch.manual_seed(seed)
    mor.add_adapters(model, method, **hyper)
    with torch.no_grad():
        for p in mor.adapter_state_dict(model).values():
            p.add_(0.5 * torch.randn_like(p))
    mor.save_adapter(model, os.path.join(run_dir, "adapter.pth"))
    loaded = llama.Transformer.from_checkpoint(ckpt_dir, max_seq_len=256)
    chat.apply_adapter(loaded, run_dir)
    x = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)   # the file holds the adapter
        assert (loaded(x) - llama.Transformer.from_checkpoint(ckpt_dir)(x)).abs().max() > 1e-2   # and it matters
    return loaded


@torch.no_grad()
def greedy_full_forward(model, context: list[int], n: int, eos_id: int) -> list[int]:
    """Reference: argmax of the last logits of a full causal forward (no KV cache) over everything so far."""
    out = []
    for _ in range(n):
        t = int(model(torch.tensor([context + out]))[0, -1].argmax())
        if t == eos_id:
            break
        out.append(t)
    return out


class Chunks(io.StringIO):
    """Records each write: streaming means a reply arrives in several writes, not one."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, s):
        self.chunks.append(s)
        return super().write(s)


def check_chat(model, tok, max_new_tokens: int) -> str:
    """Run a two-turn chat; check what the model was fed and every reply against the full-forward reference."""
    fed = {}

    def record(module, args, kwargs):
        tokens, start = args[0][0].tolist(), kwargs.get("start_pos")
        assert start is not None   # the chat decodes through the KV cache
        for j, t in enumerate(tokens):
            assert fed.setdefault(start + j, t) == t   # a position fed twice gets the same token
    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    out = Chunks()
    try:
        history = chat.chat(model, tok, [t + "\n" for t in TURNS], SYSTEM, max_new_tokens, out=out)
    finally:
        hook.remove()
    # the template, written out by hand (data.py's Tulu template): BOS, turn, reply, EOS token, turn, reply, EOS
    turn1 = tok.encode("<|system|>\nBe brief.\n<|user|>\nhello there\n<|assistant|>\n", bos=True, eos=False)
    turn2 = tok.encode("<|user|>\nand again?\n<|assistant|>\n", bos=False, eos=False)
    reply1 = greedy_full_forward(model, turn1, max_new_tokens, tok.eos_id)
    reply2 = greedy_full_forward(model, turn1 + reply1 + [tok.eos_id] + turn2, max_new_tokens, tok.eos_id)
    assert reply1 and reply2
    assert history == turn1 + reply1 + [tok.eos_id] + turn2 + reply2 + [tok.eos_id]
    seen = [fed[i] for i in range(len(fed))]   # every position once, in order
    assert seen == history[:len(seen)] and len(seen) >= len(history) - 2   # last reply token, EOS: not needed
    assert out.getvalue() == tok.decode(reply1) + "\n" + tok.decode(reply2) + "\n"
    assert len(out.chunks) > 4   # streamed: pieces as they come
    return out.getvalue()


@pytest.mark.parametrize("method,hyper", [("mor", dict(r=2, num_experts=3)), ("lora", dict(r=2))])
def test_chat_with_adapter_equals_full_forward(tiny_ckpt, tmp_path, method, hyper):
    model = adapted(tiny_ckpt, method, str(tmp_path), **hyper)
    tok = llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    check_chat(model, tok, max_new_tokens=10)


def test_cli_chat_with_piped_stdin_and_prompt(tiny_ckpt, tmp_path, capsys):
    run = str(tmp_path / "run")
    model = adapted(tiny_ckpt, "mor", run, r=2, num_experts=3)
    tok = llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    args = ["--ckpt_dir", tiny_ckpt, "--adapter", run, "--max_new_tokens", "8", "--max_seq_len", "256"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "llama.py"), *args, "--chat", "--system", SYSTEM],
                       input="\n".join(TURNS) + "\n", capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    out, threads = io.StringIO(), torch.get_num_threads()   # the same conversation's replies in this process
    torch.set_num_threads(1)   # with the subprocess's one thread: the same kernels, so the same greedy tokens
    try:
        chat.chat(model, tok, TURNS, SYSTEM, 8, out=out)
    finally:
        torch.set_num_threads(threads)
    assert p.stdout == out.getvalue() and p.stdout.strip()
    # --prompt with --chat: one turn, then exit
    chat.main(args + ["--chat", "--prompt", TURNS[0]])
    one = io.StringIO()
    chat.chat(model, tok, TURNS[:1], None, 8, out=one)
    assert capsys.readouterr().out == one.getvalue() != ""
    # --prompt alone: plain completion with the adapter (no template), as llama.generate makes it
    chat.main(args + ["--prompt", "Once upon a time"])
    prompt = tok.encode("Once upon a time")
    new = llama.generate(model, [prompt], 8, eos_id=tok.eos_id)[0]
    assert capsys.readouterr().out == tok.decode(prompt + new) + "\n"
    # neither --prompt nor --chat: a usage error
    with pytest.raises(SystemExit) as e:
        chat.main(["--ckpt_dir", tiny_ckpt])
    assert e.value.code == 2 and "give --prompt TEXT, or --chat" in capsys.readouterr().err


def test_long_conversation_starts_over(tiny_ckpt, tmp_path, capsys):
    """A turn that no longer fits max_seq_len starts a new conversation (said on stderr), not an error."""
    model = llama.Transformer.from_checkpoint(tiny_ckpt, max_seq_len=48)
    tok = llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    history = chat.chat(model, tok, ["hello there"] * 3, None, 8, out=io.StringIO())
    assert "starting a new one" in capsys.readouterr().err
    assert history[:len(tok.encode("<|user|>\nhello there\n<|assistant|>\n"))] == \
        tok.encode("<|user|>\nhello there\n<|assistant|>\n")


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="stories260K not present")
def test_stories260k_chat_with_mor_adapter(tmp_path):
    model = adapted(STORIES, "mor", str(tmp_path), r=4, num_experts=4)
    tok = llama.Tokenizer(os.path.join(STORIES, "tokenizer.model"))
    text = check_chat(model, tok, max_new_tokens=24)
    assert len(text) > 20


def test_cli_chat_stdin_not_utf8_closed_or_empty(tiny_ckpt):
    """Bytes that are not UTF-8 are read as U+FFFD and the conversation goes on (the same replies as for the
    replaced text, computed here); stdin at EOF or closed (`<&-`) ends cleanly with exit 0 and no reply."""
    tok = llama.Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    cmd = [sys.executable, os.path.join(ROOT, "llama.py"), "--ckpt_dir", tiny_ckpt, "--chat", "--max_new_tokens", "6",
           "--max_seq_len", "256"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, input=b"caf\xe9 \xff\xfe ok\nsecond turn\n", capture_output=True, timeout=120, env=env)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
    model = llama.Transformer.from_checkpoint(tiny_ckpt, max_seq_len=256)
    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)   # the subprocess's one thread: the same kernels, so the same greedy tokens
    try:
        chat.chat(model, tok, ["caf\ufffd \ufffd\ufffd ok\n", "second turn\n"], None, 6, out=out)
    finally:
        torch.set_num_threads(threads)
    assert p.stdout.decode() == out.getvalue() and out.getvalue().count("\n") == 2
    for stdin in (dict(stdin=subprocess.DEVNULL), dict(preexec_fn=lambda: os.close(0))):   # EOF, then closed
        p = subprocess.run(cmd, capture_output=True, timeout=120, env=env, **stdin)
        assert p.returncode == 0 and p.stdout == b"" and b"Traceback" not in p.stderr, p.stderr
