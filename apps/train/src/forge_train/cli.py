"""``forge-train``: compose the config from overrides, validate it, train.

::

    uv run forge-train                                   # the default job (tiny model, stdlib)
    uv run forge-train model=llama3.2-1b train.steps=100 data.tokenizer=/path/to/llama
    uv run forge-train recipe=sft data.paths=[chat.jsonl] model.hf_path=/path/to/hf
    uv run forge-train --cfg                             # print the resolved config
    uv run torchrun --nproc-per-node 2 -m forge_train parallel=ddp
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forge_train.config import ConfigError

__all__ = ["main"]

USAGE = """usage: forge-train [--cfg] [--help] [--benchmark] [group=preset ...] [group.key=value ...]

Train a language model from the Hydra config tree of forge_train.conf.

options:
  --cfg         print the resolved config (YAML) and exit
  --benchmark   same as train.benchmark=true: run train.steps steps, print one summary line
  --help, -h    this message, with the presets of every group

overrides: group=preset picks a preset (model=llama3.2-1b), group.key=value changes a key
(train.steps=100, optim.lr=1e-3, data.paths=[a.jsonl,b.jsonl]); see the README.
"""


def _help() -> str:
    from forge_train.compose import list_presets

    lines = [USAGE, "presets:"]
    for group, names in list_presets().items():
        lines.append(f"  {group:<11} {', '.join(names)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(_help())
        return 0
    show_cfg = "--cfg" in args
    overrides = [a for a in args if a not in ("--cfg", "--benchmark")]
    if "--benchmark" in args:
        overrides.append("train.benchmark=true")
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        print(f"forge-train: unknown option {unknown[0]}\n\n{_help()}", file=sys.stderr)
        return 2
    from forge_train.compose import compose_run_config, compose_yaml

    try:
        if show_cfg:
            print(compose_yaml(overrides), end="")
            compose_run_config(overrides)  # still report invalid values
            return 0
        cfg = compose_run_config(overrides)
    except ConfigError as exc:
        print(f"forge-train: invalid config: {exc}", file=sys.stderr)
        return 2
    from forge_train.trainer import train

    try:
        result = train(cfg)
    except ConfigError as exc:
        print(f"forge-train: invalid config: {exc}", file=sys.stderr)
        return 2
    if result.stopped == "SIGTERM":
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
