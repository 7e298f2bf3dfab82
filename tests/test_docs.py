"""What the docs tell a user to do works: README's "Using mor.py in another project" block is run as written
(taken from README.md here, so the two cannot drift), and add_adapters says why a GPT-2-style Conv1D target
is not adapted."""
import contextlib
import io
import os
import re

import pytest
import torch
import torch.nn as nn

import mor
from conftest import ROOT


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
