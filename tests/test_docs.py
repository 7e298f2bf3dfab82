"""What the docs tell a user to do works: README's "Using mor.py in another project" block is run as written
(taken from README.md here, so the two cannot drift), add_adapters says why a GPT-2-style Conv1D target is
not adapted, and every shell command in a code block of README.md and docs/*.md is either run here (as
written, a download swapped for the demo's own checkpoint and adapter, or for ../shared/models/stories260K
when present) or listed in COMMANDS with the reason it is not (a download, a GPU, 8 GPUs, a long timing)."""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

import mor
from conftest import BENCHMARKS, ROOT, STORIES
from test_evaluate import make_data


def readme_block(heading: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_mor_example_runs_and_reloads_the_same_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # it writes base.pth and adapter.pth where it runs
    ns, out = {"__name__": "readme"}, io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out):
        exec(compile(readme_block("Using `mor.py` in another project"), "README.md", "exec"), ns)
    assert out.getvalue() == "True\n"
    model, reloaded, x = ns["model"], ns["reloaded"], torch.randn(5, 16)
    assert ns["config"] == model.adapter_config and ns["config"]["method"] == "mor"
    base = ns["MyModel"]()
    base.load_state_dict(torch.load("base.pth", weights_only=True))
    assert torch.equal(reloaded.fc1.base.weight, base.fc1.weight)   # the base weights were kept
    assert (model(x) - base(x)).abs().max() > 1e-3                   # and the trained adapter matters
    assert torch.equal(reloaded(x), model(x))                        # same weights, same kernels


def test_add_adapters_names_conv1d_targets():
    class Conv1D(nn.Module):   # Hugging Face GPT-2's layer: y = x @ weight + bias, not an nn.Linear
        def __init__(self, nf: int, nx: int):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return x @ self.weight + self.bias

    model = nn.ModuleDict({"h": nn.ModuleList([nn.ModuleDict({"c_attn": Conv1D(24, 8), "ln": nn.Linear(8, 8)})])})
    with pytest.raises(ValueError) as e:
        mor.add_adapters(model, "lora", targets=("c_attn",))
    msg = str(e.value)
    assert "h.0.c_attn is Conv1D, not nn.Linear" in msg and "only nn.Linear layers are adapted" in msg
    assert "conv.weight.T" in msg   # what to do
    with pytest.raises(ValueError, match=r"only nn.Linear layers are adapted, and their names look like \['h.0.ln'\]"):
        mor.add_adapters(model, "lora", targets=("nope",))


# ----------------------------------------------------------------------------- every command in the docs

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
COMMAND = re.compile(r"^(\w+=\S+ )*(python|torchrun|bash|pip|\.\./\S+)\b")   # an indented line that runs one


def doc_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every shell command in a code block of README.md and docs/*.md: each line of a
    ```bash block, the "$ " lines of a plain ``` block, and indented (4-space) lines that start with a command;
    a trailing backslash joins the next line, a "  # comment" is dropped, and "a && b" is two commands."""
    found = []
    for path in DOCS:
        fence, indented, prev_blank, cmd, start = None, False, True, "", 0
        for no, line in enumerate(open(os.path.join(ROOT, path)).read().split("\n"), 1):
            if line.startswith("```"):
                fence = None if fence is not None else line[3:].strip()
                continue
            if fence is not None:
                text = line if fence in ("bash", "sh") else (line[2:] if line.startswith("$ ") else None)
            else:
                indented = line.startswith("    ") and (prev_blank or indented)
                text = line[4:] if indented and (cmd or COMMAND.match(line[4:].lstrip())) else None
                prev_blank = not line.strip()
            if text is None or (not cmd and (not text.strip() or text.lstrip().startswith("#"))):
                continue   # not a command; or output shown as a comment ("# fruits")
            start = start if cmd else no
            cmd += re.sub(r"\s{2,}#.*$", "", text).strip()
            if cmd.endswith("\\"):
                cmd = cmd[:-1].rstrip() + " "
                continue
            found += [(f"{path}:{start}", part.strip()) for part in cmd.split(" && ")]
            cmd = ""
    return found


# Every command of the docs matches one of these (first match wins): run by the test named, or not run, and why.
DOWNLOAD = "not run: needs a download ({})"
COMMANDS = [
    (r"^python train\.py$", "test_demo_prints_the_readme_table"),
    (r"^python llama\.py --ckpt_dir out/demo/base --adapter out/demo/mor --chat", "test_demo_chat_answers_fruits"),
    (r"^python (llama|evaluate)\.py --ckpt_dir (path/to/|checkpoints/)?llama-2-7b\b",
     "test_llama_2_commands_on_the_demo_model"),
    (r"^python (llama|evaluate)\.py --ckpt_dir \.\./shared/models/stories260K\b", "test_stories260k_commands"),
    (r"^pip install ", DOWNLOAD.format("packages from PyPI; this suite runs in the environment it makes")),
    (r"^python -m pytest -q tests$", "not run: it is the suite this test belongs to"),
    (r"^python -c \"from datasets import load_dataset", DOWNLOAD.format("Tulu-v2 from the Hugging Face Hub")),
    (r"^torchrun --nproc_per_node[ =]8 ", "not run: 8 GPUs and LLaMA-2-7B/70B; tests/test_train.py and "
     "test_evaluate.py run 2 CPU ranks"),
    (r"^torchrun --nnodes=2 ", "not run: two nodes of 8 GPUs"),
    (r"^python train\.py --resume out/mor_e8r8", "not run: needs the run folder of a LLaMA-2-7B training; "
     "tests/test_resume.py resumes tiny runs"),
    (r"^bash bench/gpu\.sh --dry-run$", "not run here: tests/test_bench.py runs it "
     "(test_gpu_sh_dry_run_runs_every_part)"),
    (r"^(PYTHON=\S+ )?bash bench/gpu\.sh\b", "not run: a CUDA GPU (the prepared GPU check)"),
    (r"^python -m venv \.\./peers-venv$|peers-venv/bin/", DOWNLOAD.format("a second environment with "
     "transformers, lm-eval and peft for bench/peers.py")),
    (r"^OMP_NUM_THREADS=1 python bench/(infer|load|prefix)\.py ", "not run: a timing (minutes, repeated); "
     "tests/test_bench.py runs each script at tiny sizes"),
    (r"^python bench/replicate\.py ", "not run: the grid takes hours; tests/test_replicate.py runs its parts"),
]


def test_every_command_in_the_docs_is_run_or_says_why_not():
    """A command added to the docs must be run by a test here or be listed with the reason it is not; a rule
    that no longer matches any command is stale."""
    commands, used = doc_commands(), set()
    assert len(commands) > 30   # the extraction found the blocks (README alone has 9 commands)
    for where, cmd in commands:
        hit = next((k for k, (pattern, _) in enumerate(COMMANDS) if re.search(pattern, cmd)), None)
        assert hit is not None, f"{where}: `{cmd}` is neither run by tests/test_docs.py nor listed as not run"
        used.add(hit)
    assert [COMMANDS[k][0] for k in range(len(COMMANDS)) if k not in used] == []


def doc_runs(test: str) -> list[tuple[str, str]]:
    """The (file:line, command) pairs that COMMANDS gives to `test`; a command written twice runs once."""
    runs, seen = [], set()
    for where, cmd in doc_commands():
        action = next(a for pattern, a in COMMANDS if re.search(pattern, cmd))
        if action == test and cmd not in seen:
            runs.append((where, cmd))
            seen.add(cmd)
    assert runs, f"no command of the docs is run by {test}"
    return runs


def run_doc(cmd: str, cwd: str, swap: dict[str, str] | None = None, stdin: str = "",
            timeout: float = 600) -> str:
    """Run a doc's command as written, from `cwd`: `python X.py` is this interpreter on the repo's X.py, each
    `swap` key (a path to a download) is replaced by its value; stdout on success, else the test fails."""
    argv = [(swap or {}).get(a, a) for a in shlex.split(cmd)]
    assert argv[0] == "python" and argv[1].endswith(".py"), cmd
    argv[:2] = [sys.executable, os.path.join(ROOT, argv[1])]
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
    return p.stdout


def run_docs(runs: list[tuple[str, str]], cwd: str, **kw) -> list[str]:
    """run_doc for each (where, command), two at a time (each is mostly one process's start-up)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda run: run_doc(run[1], cwd, **kw), runs))


def test_python_mor_prints_the_readme_table():
    """README: "`python mor.py` ... prints:" and the Table 2 block below it, character for character."""
    text = open(os.path.join(ROOT, "README.md")).read()
    shown = text.split("`python mor.py` (or", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    assert run_doc("python mor.py", ROOT) == shown


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    """A folder in which the docs' `python train.py` has run: out/demo/{base,mor}, and its stdout."""
    d = str(tmp_path_factory.mktemp("demo"))
    [(where, cmd)] = doc_runs("test_demo_prints_the_readme_table")   # README's quick start, training.md
    open(os.path.join(d, "stdout.txt"), "w").write(run_doc(cmd, d))
    return d


def test_demo_prints_the_readme_table(demo_dir):
    """`python train.py` ends with the table the README shows (everything is seeded; the README's last line
    ends in "..." where the timing goes)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    shown = [line[4:] for line in text.split("It ends with", 1)[1].split("\n\n")[1].split("\n")]
    printed = open(os.path.join(demo_dir, "stdout.txt")).read().rstrip("\n").split("\n")
    printed = printed[printed.index(shown[0]):]
    assert printed[:-1] == shown[:-1] and printed[-1].startswith(shown[-1].rstrip(". ")), printed


def test_demo_chat_answers_fruits(demo_dir):
    """README: the demo's adapter answers "fruits" to the apple-and-pear question, asked with --prompt, or
    on stdin (one line, then EOF)."""
    runs = doc_runs("test_demo_chat_answers_fruits")   # stdin is read only by the one without --prompt
    for (where, cmd), out in zip(runs, run_docs(runs, demo_dir, stdin="What kind of things are apple and "
                                                                      "pear?\n")):
        assert "fruits" in out, (where, out)
    assert len(runs) == 2


# the table docs/evaluation.md shows for stories260K: the header (column names), then the values
EVAL_SHOWN = open(os.path.join(ROOT, "docs", "evaluation.md")).read().split(
    "--data_dir ../shared/benchmarks\n", 1)[1].split("\n")[:2]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.split("|")]


def with_out(runs: list[tuple[str, str]], folder: str) -> list[tuple[str, str]]:
    """evaluate.py commands get their own --out (the last --out wins), so that two can run at once."""
    return [(w, c + f" --out {os.path.join(folder, f'results_{k}.json')}" if "evaluate.py" in c else c)
            for k, (w, c) in enumerate(runs)]


def test_llama_2_commands_on_the_demo_model(demo_dir, tmp_path):
    """The commands written for LLaMA-2-7B, run on the demo's base (the same Meta layout) and its MoR
    adapter (a run folder, as out/mor_e8r8 is), evaluate.py on a folder of every task in its official form
    (3 rows each). Each exits 0; evaluate.py prints the table's columns and writes its JSON."""
    make_data(str(tmp_path / "benchmarks"), "official")
    base, run = os.path.join(demo_dir, "out", "demo", "base"), os.path.join(demo_dir, "out", "demo", "mor")
    swap = {"llama-2-7b": base, "checkpoints/llama-2-7b": base, "path/to/llama-2-7b": base,
            "out/mor_e8r8": run, "out/adapter.pth": os.path.join(run, "adapter.pth"),
            "out/mor.pth": os.path.join(run, "adapter.pth"), "benchmarks": str(tmp_path / "benchmarks")}
    runs = with_out(doc_runs("test_llama_2_commands_on_the_demo_model"), str(tmp_path))
    outs = run_docs(runs, str(tmp_path), swap=swap, stdin="What kind of things are apple and pear?\n")
    for k, ((where, cmd), out) in enumerate(zip(runs, outs)):
        if "evaluate.py" in cmd:
            assert cells(out.split("\n")[0]) == cells(EVAL_SHOWN[0]), (where, out)
            assert json.load(open(tmp_path / f"results_{k}.json"))["tasks"], where
        if "--router_stats" in cmd:
            assert "mean router weight per expert, block -1" in out, (where, out)
    assert sum("evaluate.py" in c for _, c in runs) == 4 and sum("llama.py" in c for _, c in runs) == 4


@pytest.mark.skipif(not (os.path.isdir(STORIES) and os.path.isdir(BENCHMARKS)),
                    reason="../shared/models/stories260K or ../shared/benchmarks absent")
def test_stories260k_commands(tmp_path):
    """The commands on stories260K, from the repo root as the docs write them; evaluate.py with --limit 1
    (the full files take minutes): the table's columns and HellaSwag absent, as docs/evaluation.md shows."""
    runs = doc_runs("test_stories260k_commands")
    runs = with_out([(w, c + " --limit 1" if "evaluate.py" in c else c) for w, c in runs], str(tmp_path))
    for (where, cmd), out in zip(runs, run_docs(runs, ROOT)):
        if "evaluate.py" in cmd:
            header, row = out.split("\n")[:2]
            assert cells(header) == cells(EVAL_SHOWN[0]), (where, out)
            assert cells(row)[5] == cells(EVAL_SHOWN[1])[5] == "absent", (where, out)
        else:
            assert out.startswith("Once upon a time") and len(out) > 40, (where, out)
