"""The bench/ scripts run end to end on tiny shapes on the CPU, so they cannot rot unnoticed.

Times are printed by the scripts, never asserted here. What is asserted: each exits 0, the correctness
checks the scripts make before timing pass (naive eq. 12 loop vs MoRLinear, cached decoding vs a full
forward), and every table has its rows.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import BENCHMARKS, ROOT, STORIES


def run_bench(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, f"bench/{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def table_rows(out: str, labels: list[str]) -> dict[str, list[str]]:
    """The cells after each label in a printed table (labels may contain spaces)."""
    rows = {}
    for line in out.splitlines():
        for label in labels:
            if line.startswith(label + "  "):
                rows[label] = line[len(label):].split()
    return rows


def test_layer_runs_and_naive_loop_agrees():
    out = run_bench("layer.py", "--device", "cpu", "--shapes", "64x192,192x64", "--seq_len", "16",
                    "--warmup", "0", "--repeats", "1")
    diffs = [float(d) for d in re.findall(r"# check \d+->\d+: naive eq. 12 loop vs mor.MoRLinear \(training path, "
                                          r"output and gradients\), max relative diff (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    labels = ["frozen base", "LoRA R8", "DoRA R8", "MoSLoRA R8", "MoELoRA E2R8", "MoELoRA E8R8", "MoR E1R8",
              "MoR E2R8", "MoR E4R8", "MoR E8R8", "MoR E8R8 naive"]
    rows = table_rows(out, labels)
    assert set(rows) == set(labels)
    for label, cells in rows.items():
        assert float(cells[2]) > 0 and float(cells[5]) > 0, label  # time / base, mem / base
    ops = {label: int(cells[-1]) for label, cells in rows.items()}
    # the per-expert loop dispatches the expert work 8 times: more ops than the stacked form, which has more
    # than plain LoRA (router, softmax, z, B-tilde), which has more than the base alone
    assert ops["MoR E8R8 naive"] > ops["MoR E8R8"] > ops["LoRA R8"] > ops["frozen base"]
    assert "target MoR E8R8 fwd+bwd <= 1.10 x frozen base:" in out


def test_step_runs():
    out = run_bench("step.py", "--device", "cpu", "--preset", "tiny", "--seq_len", "16", "--warmup", "0",
                    "--repeats", "1")
    rows = table_rows(out, ["MoR E8R8", "LoRA R8", "MoELoRA E8R8", "DoRA R8"])
    assert len(rows) == 4 and rows["LoRA R8"][3] == "1.000"  # time / LoRA of the reference itself
    for target in ("step <= 1.05 x LoRA R8", "step <= 0.80 x MoELoRA E8R8", "peak memory <= 1.05 x LoRA R8"):
        assert f"target MoR E8R8 {target}:" in out


def test_infer_runs_and_cached_decoding_matches():
    out = run_bench("infer.py", "--device", "cpu", "--preset", "tiny", "--prompt_len", "8", "--new_tokens", "2",
                    "--warmup", "0", "--repeats", "1")
    diff = float(re.search(r"cached decoding vs full forward without caches, max relative diff (\S+)", out)[1])
    assert diff < 1e-4
    rows = table_rows(out, ["frozen base", "merged LoRA R8", "MoR E8R8", "MoELoRA E8R8", "unmerged LoRA R8"])
    assert len(rows) == 5 and rows["merged LoRA R8"][2] == "1.000"


def test_profile_layer_runs():
    out = run_bench("profile_layer.py", "--device", "cpu", "--tokens", "8", "--d_in", "64", "--d_out", "192",
                    "--rows", "3")
    for label in ("frozen base", "LoRA R8", "MoR E8R8"):
        assert f"== {label}: wall" in out


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="bench/load.py reads /proc (Linux)")
def test_load_runs_and_loads_every_byte():
    out = run_bench("load.py", "--device", "cpu", "--size_gb", "0.05")
    cells = table_rows(out, ["loaded model (bfloat16, cpu)"])["loaded model (bfloat16, cpu)"]
    # the loaded parameters are the file's tensors: the same bytes, less the files' few KB of pickle framing
    assert 0.99 < float(cells[1]) <= 1.0
    assert "target peak resident memory <= 1.2 x checkpoint:" in out


@pytest.mark.skipif(not os.path.isdir(os.path.join(BENCHMARKS, "mmlu")), reason="needs ../shared benchmarks")
def test_prefix_runs_and_the_ways_agree():
    out = run_bench("prefix.py", "--ckpt_dir", STORIES, "--data_dir", BENCHMARKS, "--max_seq_len", "512",
                    "--tasks", "arc_easy,mmlu", "--limit", "2")
    diff = float(out.split("planned vs one forward per choice:")[1].split()[0])
    assert diff < 1e-3


def test_peers_without_its_venv_is_a_one_line_error():
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is importable here: this checks the project's own environment")
    except ImportError:
        pass
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "peers.py")], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode != 0 and res.stderr.strip().startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


# what each part of bench/gpu.sh prints once it has measured something (at tiny CPU shapes with --dry-run)
GPU_SH_FIGURES = {
    "tests": [" skipped"],   # no CUDA here: the CUDA tests are collected and skipped
    "step": ["LoRA R8: 1 warm-up step(s)", "round 1/1: LoRA R8", "target MoR E8R8 step <= 1.05 x LoRA R8:"],
    "step-compiled": ["MoR E8R8: 1 warm-up step(s)", "(the first compiles", "round 1/1: LoRA R8",
                      "target MoR E8R8 step <= 1.05 x LoRA R8:"],
    "step-graphs": ["MoR E8R8: 1 warm-up step(s)", "mode reduce-overhead", "round 1/1: LoRA R8",
                    "target MoR E8R8 step <= 1.05 x LoRA R8:"],
    "decode": ["eager, round 1/1: frozen base", "target MoR decode <= 1.10 x merged LoRA (eager):"],
    "decode-compiled": ["MoR E8R8: built and run once in", "reduce-overhead, aot_eager, round 1/1:",
                        "target MoR decode <= 1.10 x merged LoRA (torch.compile"],
    "profile": ["== LoRA R8: wall", "== MoR E8R8: wall"],
    "profile-compiled": ["LoRA R8, recording off: 1 graph(s), 0 graph break(s)",
                         "MoR E8R8, recording on: 1 graph(s), 0 graph break(s)"],
    "layer": ["round 1/1: frozen base", "target MoR E8R8 fwd+bwd <= 1.10 x frozen base:"],
    "load": ["target peak resident memory <= 1.2 x checkpoint:"],
}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="bench/load.py reads /proc (Linux)")
def test_gpu_sh_dry_run_runs_every_part(tmp_path):
    """bash bench/gpu.sh --dry-run: every part at tiny shapes on the CPU, each exits 0 and prints its figures
    as it goes, and $OUT/gpu.log holds the same output."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    out = res.stdout
    for part, figures in GPU_SH_FIGURES.items():
        section = re.search(rf"^== {part}: .*?^-- {part}: exit (\d+)", out, re.S | re.M)
        assert section and section[1] == "0", part
        for fig in figures:
            assert fig in section[0], (part, fig)
    assert "== every part exited 0" in out
    assert open(tmp_path / "gpu.log").read() == out


def test_gpu_sh_reports_a_part_over_its_cap(tmp_path):
    """A part stopped by its time limit is named as failed and makes the exit status non-zero; what it printed
    before the limit stays in the output (a fake interpreter that prints one line, then hangs)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0   # the device line\necho first figure\nexec sleep 300\n')
    fake.chmod(0o755)
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "profile"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=dict(os.environ, PYTHON=str(fake)))
    assert res.returncode == 1
    assert re.search(r"first figure\n-- profile: exit 124 \(time limit\), 1[5-9] s", res.stdout), res.stdout
    assert "== failed: profile" in res.stdout
