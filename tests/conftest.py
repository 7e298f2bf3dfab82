import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(ROOT, "..", "shared")
STORIES = os.path.join(SHARED, "models", "stories260K")
BENCHMARKS = os.path.join(SHARED, "benchmarks")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random LLaMA in Meta's layout: params.json, consolidated.00.pth, tokenizer.model."""
    from tiny import write_checkpoint
    d = str(tmp_path_factory.mktemp("tiny_ckpt"))
    write_checkpoint(d)
    return d
