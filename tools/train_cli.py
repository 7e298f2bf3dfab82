"""train.py's command line: every TrainConfig field as a flag, --resume's settings, and the checks
made before anything is loaded or written. Each fault is a ConfigError, which train.main prints as
one `error:` line."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

import mor
from tools import checks
from tools.run_dir import checkpoints, find_checkpoint, run_dir

METHODS = ("mor", "lora", "dora", "moelora", "moslora", "full")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# torchrun's own parser rejects `--r` after the script name (an ambiguous prefix of its --rdzv-*,
# --role, ... flags), so the rank also answers to --lora_r
ALIASES = {"r": ("--lora_r",)}
# what may differ from the checkpoint's settings on resume: the schedule's length and peak (see
# tools/schedule.py), where the base now lives, and settings that do not change the math; all else
# would be another run
RESUMABLE = ("max_steps", "epochs", "lr", "resume", "out_dir", "ckpt_dir", "tokenizer", "device",
             "compile", "compile_mode", "tf32", "grad_ckpt", "progress", "peak_tflops", "eval_every",
             "ckpt_every", "keep_ckpts", "crash_at_step")


class ConfigError(ValueError):
    """A flag value that cannot work; the message says which and why."""


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parser(config: type, defaults: bool = True) -> argparse.ArgumentParser:
    """Every field of the config dataclass as --name (its docstring is the description); booleans
    also as bare --name / --no_name; lists take several values. With defaults=False, only the flags
    given on the command line appear in the result."""
    ap = argparse.ArgumentParser(description=config.__doc__)
    for f in fields(config):
        d, h = getattr(config(), f.name), f.metadata["help"]
        shown = " ".join(map(str, d)) if isinstance(d, list) else d
        h += f" [default: {shown}]" if d not in ("", []) else ""
        dflt = d if defaults else argparse.SUPPRESS
        if isinstance(d, bool):
            ap.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=dflt, help=h)
            ap.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=dflt,
                            help=argparse.SUPPRESS)
        elif isinstance(d, list):
            ap.add_argument(f"--{f.name}", nargs="+", default=dflt,
                            help=h + " (space or comma separated)")
        else:
            ap.add_argument(f"--{f.name}", *ALIASES.get(f.name, ()), dest=f.name, type=type(d), default=dflt,
                            help=h)
    return ap


def given_flags(config: type, argv: list[str]) -> dict:
    """The settings given on the command line (not defaulted), lists split at commas: "a,b" as well
    as "a b"."""
    given = vars(parser(config, defaults=False).parse_args(argv))
    return {k: [x for v in vals for x in str(v).split(",") if x] if isinstance(vals, list) else vals
            for k, vals in given.items()}


def parse_args(config: type, argv: list[str] | None = None):
    """The config of a command line: defaults, then the given flags; with --resume, the run's own
    settings under the given flags."""
    given = given_flags(config, argv)
    if given.get("resume"):
        return run_config(config, given["resume"], given)
    return config(**{**vars(parser(config).parse_args(argv)), **given})


def check_config(cfg) -> None:
    """Every flag value that cannot work, before the data and the model are loaded."""
    for name, value, allowed in (("method", cfg.method, METHODS), ("router", cfg.router, mor.ROUTERS),
                                 ("compile_mode", cfg.compile_mode, COMPILE_MODES)):
        if value not in allowed:
            raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
    if not cfg.ckpt_dir or not cfg.data:
        raise ConfigError("--ckpt_dir and --data are required (run `python train.py` alone for the "
                          "demo)")
    if not os.path.isfile(os.path.join(cfg.ckpt_dir, "params.json")):   # fail before tokenising
        raise ConfigError(f"--ckpt_dir {cfg.ckpt_dir}: no params.json (Meta's layout: params.json + "
                          "consolidated.NN.pth)")
    for path in cfg.data + cfg.val_data:
        if not os.path.isfile(path):
            raise ConfigError(f"--data/--val_data: no such file {path}")
        if os.path.getsize(path) == 0:
            raise ConfigError(f"{path}: the file is empty (expected one JSON example per line)")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"{cfg.out_dir}: --out_dir is a file, not a folder; choose another "
                          "--out_dir")
    try:   # every numeric flag's range, a --device this machine has, a writable --out_dir
        checks.check_ranges(vars(cfg), checks.TRAIN)
        checks.check_device(cfg.device if cfg.device != "auto" else "cpu")
        checks.check_writable(cfg.out_dir, "--out_dir", cfg.out_dir)
    except checks.FlagError as e:
        raise ConfigError(str(e)) from None
    if cfg.method != "full" and not cfg.targets:
        raise ConfigError("--targets: no layer name given (e.g. --targets w1 w2 w3)")


# ----------------------------------------------------------------------------- resume, a new run's folder

def run_config(config: type, resume: str, given: dict):
    """`--resume DIR`: the run's own settings (config.json of its folder), the flags given now over
    them."""
    path = os.path.join(run_dir(find_checkpoint(resume)), "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the run's settings ({e})") from None
    names = {f.name for f in fields(config)}
    cfg = config(**{k: v for k, v in saved.items() if k in names})
    cfg.crash_at_step = -1   # a testing aid applies to one launch only
    if "epochs" in given and "max_steps" not in given:
        cfg.max_steps = -1   # a new --epochs sets the run's length
    for k, v in given.items():
        setattr(cfg, k, v)
    cfg.out_dir = given.get("out_dir", run_dir(find_checkpoint(resume)))
    return cfg


def check_resume(cfg, state: dict, ckpt: str) -> None:
    """The resumed run must be the checkpoint's run: only the RESUMABLE settings may differ from its
    config."""
    old, flag = state["config"], lambda k: "--r" if k == "r" else f"--{k}"
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)
    diff = [f"{flag(k)} {show(getattr(cfg, k))} (the run has {show(v)})" for k, v in old.items()
            if hasattr(cfg, k) and k not in RESUMABLE and v != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"--resume {cfg.resume}: {', '.join(diff)}: cannot change on resume (only "
                          "--max_steps, --epochs, --lr and system flags can); leave them out, or start a new "
                          "run in a new --out_dir")
    if os.path.realpath(cfg.out_dir) != os.path.realpath(run_dir(ckpt)):
        raise ConfigError(f"--out_dir {cfg.out_dir}: a resumed run writes into its own folder {run_dir(ckpt)}; "
                          "leave out --out_dir")


def check_out_dir(cfg) -> None:
    """A new run needs a folder without another run in it: its checkpoints would be mixed with (and
    rotated away by) this run's, and its log rewritten. Checked before anything is written."""
    if cfg.resume or not os.path.isdir(cfg.out_dir):
        return
    ckpts = [name for _, name in checkpoints(cfg.out_dir)]
    ckpts += ["latest"] if os.path.isfile(os.path.join(cfg.out_dir, "latest")) else []
    files = [f for f in ("log.jsonl", "adapter.pth")
             if os.path.isfile(os.path.join(cfg.out_dir, f))]
    if ckpts:
        raise ConfigError(f"{cfg.out_dir}: --out_dir holds another run's checkpoints ({', '.join(ckpts[-3:])}); "
                          f"continue it with --resume {cfg.out_dir}, or choose a new --out_dir")
    if files:
        raise ConfigError(f"{cfg.out_dir}: --out_dir holds another run's {' and '.join(files)} (no checkpoint "
                          "to resume); choose a new --out_dir")
