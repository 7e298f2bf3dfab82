"""The command line of `python llama.py`: complete a prompt, or chat in the Tulu template train.py
trains with, on a base in Meta's layout and optionally a train.py adapter. The model (llama.py)
knows nothing about adapters or chat templates: this module joins it to mor.py's adapter file and
data.py's template.

    python llama.py --ckpt_dir path/to/llama-2-7b --prompt "Once upon a time"
    python llama.py --ckpt_dir path/to/llama-2-7b --adapter out/ --chat < questions.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterable, Iterator

import torch

import data
import mor
from llama import CheckpointError, Tokenizer, Transformer, load_tokenizer, next_token
from tools import checks


def adapter_file(path: str) -> str:
    """--adapter as given: an adapter file, or a folder holding adapter.pth (train.py's out_dir, or
    one of its ckpt_<step> checkpoints)."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no adapter file or run folder there")
        return path
    if os.path.isfile(file := os.path.join(path, "adapter.pth")):
        return file
    hint = "train.py writes it when a run ends"
    if os.path.isfile(latest := os.path.join(path, "latest")):
        with open(latest, encoding="utf-8-sig") as f:
            ckpt = os.path.join(path, f.read().strip(), "adapter.pth")
        hint = f"the run has not finished; its latest checkpoint's is {ckpt}"
    raise FileNotFoundError(f"{path}: no adapter.pth in this folder ({hint})")


def apply_adapter(model: Transformer, path: str) -> dict:
    """Load train.py's adapter (a file, or a run or checkpoint folder holding adapter.pth) with
    mor.load_adapter, which checks the file against this base; eval mode. Returns the adapter's
    config."""
    path = adapter_file(path)
    try:
        config = mor.load_adapter(model, path)
    except (ValueError, TypeError, RuntimeError) as e:   # mor's message, one line naming the file
        msg = " ".join(str(e).split())
        raise CheckpointError(msg if msg.startswith(path) else f"{path}: {msg[:300]}") from None
    model.eval()   # new adapter modules start in training mode (dropout)
    return config


@torch.inference_mode()
def stream(model: Transformer, tokens: list[int], start_pos: int, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 0.9,
           eos_id: int | None = None) -> Iterator[int]:
    """One sequence (batch 1): feed `tokens` at positions start_pos.. (the KV cache holds the
    earlier ones), then yield new tokens one at a time, each fed back through the cache. Ends at
    eos_id (not yielded), after max_new_tokens, or at the end of the cache. Every yielded token but
    the last has been fed."""
    device = model.tok_embeddings.weight.device
    for _ in range(max_new_tokens):
        if start_pos + len(tokens) > model.cache_size[1]:
            return
        logits = model(torch.tensor([tokens], device=device), start_pos=start_pos, last_only=True)
        start_pos += len(tokens)
        t = int(next_token(logits[0, -1], temperature, top_p))
        if t == eos_id:
            return
        yield t
        tokens = [t]


def print_stream(tokenizer: Tokenizer, new: Iterator[int], before: list[int] = (),
                 out=None) -> list[int]:
    """Print tokens as they come (decoded together with `before`: a lone piece would lose its
    leading space; a character split across byte tokens waits for its last byte). Returns the
    tokens."""
    out = out or sys.stdout
    got, shown = [], tokenizer.decode(list(before))
    for t in new:
        got.append(t)
        text = tokenizer.decode(list(before) + got)
        if not text.endswith("\ufffd") and text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tokenizer.decode(list(before) + got)[len(shown):] + "\n")
    out.flush()
    return got


def chat(model: Transformer, tokenizer: Tokenizer, lines: Iterable[str], system: str | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9,
         out=None) -> list[int]:
    """One user turn per line of `lines` (blank lines skipped), each answered in the Tulu template
    train.py trains with (data.chat_prompt); the conversation stays in the KV cache and only new
    tokens are fed. Tokens follow data.encode_segments: [BOS] template-and-question, the reply, EOS
    (a token, not text). Returns the tokens of the (last) conversation."""
    out = out or sys.stdout
    max_len = model.params.max_seq_len
    model.setup_cache(1, max_len)
    history, cached = [], 0   # every token of the conversation; how many of them the cache holds
    for line in lines:
        if not line.strip():
            continue
        first = not history
        turn = tokenizer.encode(data.chat_prompt(line, system if first else None), bos=first)
        if len(history) + len(turn) + 1 > max_len:   # the conversation no longer fits: start anew
            print(f"[the conversation reached max_seq_len={max_len} tokens: starting a new one]",
                  file=sys.stderr)
            history, cached = [], 0
            turn = tokenizer.encode(data.chat_prompt(line, system), bos=True)
            if len(turn) + 1 > max_len:
                print(f"[this turn alone is {len(turn)} tokens, more than max_seq_len={max_len}: "
                      "skipped]", file=sys.stderr)
                continue
        history += turn
        new = stream(model, history[cached:], cached, max_new_tokens, temperature, top_p,
                     tokenizer.eos_id)
        reply = print_stream(tokenizer, new, out=out)
        # the last reply token was sampled, maybe not fed
        cached = len(history) + max(len(reply) - 1, 0)
        history += reply + [tokenizer.eos_id]             # each reply ends with EOS, as in training
    model.clear_cache()
    return history


def stdin_turns() -> Iterator[str]:
    """Lines of stdin until EOF, or none if there is no stdin (`<&-`); at a terminal each is asked
    for with "> " on stderr (stdout holds replies only). Bytes that are not UTF-8 become U+FFFD: one
    bad byte ends no conversation."""
    while sys.stdin is not None:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        if not (line := getattr(sys.stdin, "buffer", sys.stdin).readline()):
            return
        yield line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="llama.py", description="Complete a prompt, or chat, with a "
                                 "LLaMA checkpoint in Meta's layout (and a train.py adapter).")
    ap.add_argument("--ckpt_dir", required=True,
                    help="folder with params.json and consolidated.NN.pth")
    ap.add_argument("--prompt", help="text to complete (with --chat: one user turn, then exit)")
    ap.add_argument("--chat", action="store_true", help="Tulu chat template (as train.py trains); "
                    "without --prompt one user turn per line of stdin, until EOF (Ctrl-D)")
    ap.add_argument("--system", help="--chat: a system message before the first turn")
    ap.add_argument("--adapter", help="train.py's adapter.pth, or its run folder (out_dir)")
    ap.add_argument("--tokenizer", help="default: tokenizer.model in ckpt_dir, else in its parent "
                    "(LLaMA-2 layout)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--max_seq_len", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, else float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.prompt is None and not args.chat:
        ap.error("give --prompt TEXT, or --chat (prompts from stdin)")
    try:
        checks.check_ranges(vars(args), checks.LLAMA)
        checks.check_device(args.device)
    except checks.FlagError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    t0 = time.time()
    try:   # bad files: one line naming the file and the problem, not a traceback
        model = Transformer.from_checkpoint(args.ckpt_dir, args.device, dtype, args.max_seq_len,
                                            max_batch_size=1)
        if args.adapter:
            apply_adapter(model, args.adapter)
        tokenizer = load_tokenizer(args.ckpt_dir, model.params.vocab_size, args.tokenizer)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"[loaded in {time.time() - t0:.1f} s]", file=sys.stderr)
    if args.chat:
        lines = [args.prompt] if args.prompt is not None else stdin_turns()
        chat(model, tokenizer, lines, args.system, args.max_new_tokens, args.temperature,
             args.top_p)
        return
    prompt = tokenizer.encode(args.prompt)[-args.max_seq_len:]
    model.setup_cache(1, args.max_seq_len)
    sys.stdout.write(tokenizer.decode(prompt))
    sys.stdout.flush()
    new = stream(model, prompt, 0, args.max_new_tokens, args.temperature, args.top_p,
                 tokenizer.eos_id)
    print_stream(tokenizer, new, before=prompt)
