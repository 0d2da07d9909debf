"""``forge-convert``: convert checkpoints between Hugging Face, forge and Megatron-Core.

::

    forge-convert hf-to-forge     HF_DIR OUT [--vocab-pad-multiple N]
    forge-convert forge-to-hf     FORGE_DIR OUT
    forge-convert hf-to-megatron  HF_DIR OUT [--tp N] [--pp M] [--ep E]
                                  [--virtual-pipeline-stages V | --pipeline-layout LAYOUT]
                                  [--format torch_dist|legacy]
    forge-convert megatron-to-hf  MCORE_DIR OUT [--hf-config CONFIG]

``--dry-run`` prints the mapping (source names and shapes -> target name, shape and transform)
and writes nothing; ``--check`` writes nothing either and instead verifies an existing OUT
against SRC tensor by tensor (bit-exact), listing the first mismatches (exit status 1).
Conversions stream: the output is written shard by shard (one pipeline stage at a time for
Megatron) into a temporary folder renamed into place at the end.

A *forge* folder is a safetensors checkpoint (sharded, with an index) of the forge state dict
(:func:`~forge_ckpt.convert.load_hf_as_forge` names and layouts), with the source
``config.json`` and ``forge_mapping.json`` (mapping name and options) beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge_ckpt.hf.io import HFCheckpoint

__all__ = ["main"]

FORGE_META = "forge_mapping.json"
_SHOW = 10  # mismatches listed


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


def _counted(items, bar) -> Iterator:
    for item in items:
        bar.update(1)
        yield item


# --------------------------------------------------------------------------------------------
# Forge folders
# --------------------------------------------------------------------------------------------


def _forge_spec_ctx(src: HFCheckpoint, args) -> tuple[Any, dict, dict]:
    from forge_ckpt.mapping.registry import get_mapping, mapping_for_hf_config

    config = src.config
    spec = get_mapping(args.mapping) if args.mapping else mapping_for_hf_config(config)
    # What the tensor names say (stacked experts, DeepSeek's MTP layers), kept with the options
    # so forge-to-hf writes the same layout back.
    options = {"vocab_pad_multiple": args.vocab_pad_multiple, **spec.detect_context(src.names())}
    return spec, spec.context(config, **options), options


def _read_forge_meta(folder: Path) -> dict:
    file = folder / FORGE_META
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder} has no {FORGE_META}: not a forge checkpoint folder (write one with "
            "`forge-convert hf-to-forge`)"
        )
    return json.loads(file.read_text())


def _hf_to_forge(args) -> int:
    from forge_ckpt.hf.io import HFCheckpoint, save_hf_checkpoint

    src = HFCheckpoint(args.src)
    spec, ctx, options = _forge_spec_ctx(src, args)
    info = src.tensor_info()
    shapes = {n: i.shape for n, i in info.items()}
    # No model to compare with here: check the shapes config.json implies (a plain-copy rule
    # cannot see a mis-shaped tensor) and refuse integer tensors where weights are floats.
    spec.check_hf(
        shapes, ctx, hf_config=src.config, hf_dtypes={n: i.dtype for n, i in info.items()}
    )
    bound = spec.bind(ctx)
    if args.dry_run:
        return _print_rules(bound, shapes, ctx, f"hf-to-forge ({spec.name})")
    if args.check:
        out = HFCheckpoint(args.out)
        by_target = {b.forge: b for b in bound}
        pairs = (
            (name, b.to_forge([src.get_tensor(n) for n in b.hf], ctx), actual)
            for name, actual in out.iter_tensors()
            if (b := by_target.get(name)) is not None
        )
        return _report(pairs, set(by_target), set(out.names()), args)
    meta = {"mapping": spec.name, "options": options}
    with _bar(len(bound), "hf -> forge", not args.quiet) as bar:
        save_hf_checkpoint(
            args.out,
            _counted(spec.hf_to_forge(src.iter_tensors(), ctx), bar),
            config=src.config,
            max_shard_size=args.max_shard_size,
            extra_files={FORGE_META: json.dumps(meta, indent=2) + "\n"},
            overwrite=args.overwrite,
        )
    return 0


def _forge_to_hf(args) -> int:
    from forge_ckpt.hf.io import HFCheckpoint, save_hf_checkpoint
    from forge_ckpt.mapping.registry import get_mapping

    meta = _read_forge_meta(Path(args.src))
    src = HFCheckpoint(args.src)
    config = src.config
    spec = get_mapping(args.mapping or meta["mapping"])
    ctx = spec.context(config, **meta.get("options", {}))
    spec.check_forge({n: i.shape for n, i in src.tensor_info().items()}, ctx)
    bound = spec.bind(ctx)
    if args.dry_run:
        shapes = {n: i.shape for n, i in src.tensor_info().items()}
        print(f"forge-to-hf ({spec.name}): {len(bound)} forge tensors")
        for b in bound:
            print(f"  {b.forge} {list(shapes[b.forge])} -> {' + '.join(b.hf)}  {_how(b)}")
        return 0
    if args.check:
        out = HFCheckpoint(args.out)
        slot = {n: (b, k) for b in bound for k, n in enumerate(b.hf)}
        pairs = (
            (name, slot[name][0].to_hf(src.get_tensor(slot[name][0].forge), ctx)[slot[name][1]], actual)
            for name, actual in out.iter_tensors()
            if name in slot
        )  # fmt: skip
        return _report(pairs, set(slot), set(out.names()), args)
    with _bar(len(bound), "forge -> hf", not args.quiet) as bar:
        save_hf_checkpoint(
            args.out,
            spec.forge_to_hf(_counted(src.iter_tensors(), bar), ctx),
            config=config,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    return 0


# --------------------------------------------------------------------------------------------
# Megatron
# --------------------------------------------------------------------------------------------


def _hf_to_megatron(args) -> int:
    from forge_ckpt.hf.io import HFCheckpoint
    from forge_ckpt.megatron.convert import hf_to_megatron, megatron_context, open_megatron
    from forge_ckpt.megatron.families import get_megatron_family
    from forge_ckpt.megatron.tensor_parallel import tp_kind

    src = HFCheckpoint(args.src)
    config = src.config
    family = get_megatron_family(args.family or config)
    te = not args.local_spec
    options = {
        "te_spec": te,
        "grouped_gemm": args.grouped_gemm,
        **family.mapping.detect_context(src.names()),
    }
    ctx = megatron_context(
        family, config, tensor_parallel=args.tp, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        **options,
    )  # fmt: skip
    shapes = {n: i.shape for n, i in src.tensor_info().items()}
    family.mapping.check_hf(shapes, ctx)
    bound = family.mapping.bind(ctx)
    if args.dry_run:
        split = lambda b: f"tp: {tp_kind(b.forge, te_spec=te)}"  # noqa: E731
        vp = f", vp={args.virtual_pipeline_stages}" if args.virtual_pipeline_stages > 1 else ""
        layout = f", layout={args.pipeline_layout!r}" if args.pipeline_layout else ""
        title = f"hf-to-megatron ({family.name}, {args.format}, tp={args.tp}, pp={args.pp}{vp}{layout}, ep={args.ep})"
        return _print_rules(bound, shapes, ctx, title, extra=split)
    if args.check:
        out = open_megatron(args.out, trusted_globals=tuple(args.trust_global))
        padded = out.args.get("padded_vocab_size")
        if padded is not None:
            ctx = megatron_context(family, config, vocab_pad_multiple=int(padded), **options)
        by_target = {b.forge: b for b in bound}
        from forge_ckpt.megatron.convert import _language_model, _megatron_items

        _, lm, prefix = _language_model(family, config, ctx)  # a VLM: its language model's
        actual = _megatron_items(out, family, lm, prefix)
        seen: set[str] = set()

        def pairs():
            for name, t in actual:
                seen.add(name)
                b = by_target.get(name)
                if b is not None:
                    yield name, b.to_forge([src.get_tensor(n) for n in b.hf], ctx), t

        return _report(pairs(), set(by_target), seen, args)
    with _bar(len(bound), "hf -> megatron", not args.quiet) as bar:
        hf_to_megatron(
            args.src, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp, expert_parallel=args.ep,
            first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers,
            virtual_pipeline=args.virtual_pipeline_stages, pipeline_layout=args.pipeline_layout, format=args.format,
            family=family, te_spec=te, grouped_gemm=args.grouped_gemm,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, iteration=args.iteration,
            overwrite=args.overwrite, progress=bar.update,
        )  # fmt: skip
    return 0


def _megatron_to_hf(args) -> int:
    from forge_ckpt.hf.io import HFCheckpoint
    from forge_ckpt.megatron.convert import iter_megatron_as_hf, megatron_to_hf, open_megatron

    trusted = tuple(args.trust_global)
    if args.dry_run:
        ckpt = open_megatron(args.src, trusted_globals=trusted)
        config, items = iter_megatron_as_hf(args.src, hf_config=args.hf_config, family=args.family, trusted_globals=trusted)  # fmt: skip
        kind = type(ckpt).__name__
        vp = ckpt.args.get("virtual_pipeline_model_parallel_size") or 1
        print(f"megatron-to-hf ({kind}, tp={ckpt.args.get('tensor_model_parallel_size')}, pp={ckpt.args.get('pipeline_model_parallel_size')}, vp={vp}, ep={ckpt.args.get('expert_model_parallel_size', 1)}, model_type={config.get('model_type')})")  # fmt: skip
        for name, t in items:
            print(f"  -> {name} {list(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return 0
    if args.check:
        _, items = iter_megatron_as_hf(args.src, hf_config=args.hf_config, family=args.family, trusted_globals=trusted)  # fmt: skip
        out = HFCheckpoint(args.out)
        names = set(out.names())
        seen: set[str] = set()

        def pairs():
            for name, t in items:
                seen.add(name)
                if name in names:
                    yield name, t, out.get_tensor(name)

        code = _report(pairs(), seen, names, args, lazy_expected=True)
        return code
    with _bar(0, "megatron -> hf", not args.quiet) as bar:
        megatron_to_hf(
            args.src, args.out, hf_config=args.hf_config, family=args.family, trusted_globals=trusted,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=bar.update,
        )  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------
# Dry run and check output
# --------------------------------------------------------------------------------------------


def _how(b) -> str:
    steps = ([b.rule.concat.describe()] if b.rule.concat else []) + [
        t.describe() for t in b.rule.transforms
    ]
    return f"[{', '.join(steps)}]" if steps else "[copy]"


def _print_rules(bound, shapes, ctx, title: str, extra: Callable | None = None) -> int:
    print(f"{title}: {len(bound)} target tensors")
    for b in bound:
        src = " + ".join(f"{n} {list(shapes[n])}" for n in b.hf)
        target = list(b.forge_shape([shapes[n] for n in b.hf], ctx))
        more = f"  {extra(b)}" if extra else ""
        print(f"  {src} -> {b.forge} {target}  {_how(b)}{more}")
    return 0


def _report(pairs, expected: set[str], present: set[str], args, lazy_expected: bool = False) -> int:
    """Compare ``(name, expected, actual)`` triples bit for bit; print a summary."""
    from forge_ckpt.bits import differing_elements, identical

    bad: list[str] = []
    checked = 0
    for name, want, got in pairs:
        checked += 1
        if want.shape != got.shape or want.dtype != got.dtype:
            bad.append(
                f"{name}: expected {list(want.shape)} {want.dtype}, found {list(got.shape)} {got.dtype}"
            )
        elif not identical(want, got):  # bits: a NaN equals its copy, -0.0 is not 0.0
            diff = (want.double() - got.double()).abs()
            bad.append(f"{name}: {differing_elements(want, got)} of {want.numel()} values differ (max abs diff {diff.max().item():.3g})")  # fmt: skip
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    bad += [f"{n}: missing from the converted checkpoint" for n in missing]
    bad += [f"{n}: unexpected in the converted checkpoint" for n in unexpected]
    if bad:
        print(f"check FAILED: {len(bad)} problem(s) in {checked} compared tensors; first ones:")
        for line in bad[:_SHOW]:
            print(f"  {line}")
        return 1
    print(f"check passed: {checked} tensors bit-exact")
    return 0


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("src", type=Path, help="source checkpoint folder")
        sp.add_argument("out", type=Path, help="destination folder (must not exist or be empty)")
        mode = sp.add_mutually_exclusive_group()
        mode.add_argument("--dry-run", action="store_true", help="print the mapping, write nothing")
        mode.add_argument("--check", action="store_true", help="verify an existing OUT against SRC")
        sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, help_ in (
        ("hf-to-forge", "Hugging Face -> forge"),
        ("forge-to-hf", "forge -> Hugging Face"),
    ):
        sp = sub.add_parser(name, help=help_)
        common(sp)
        sp.add_argument("--mapping", help="mapping name (default: from config.json's model_type)")
        sp.add_argument(
            "--vocab-pad-multiple", type=int, default=1, help="pad vocabulary rows to a multiple"
        )
        sp.add_argument("--max-shard-size", default="5GB")

    sp = sub.add_parser("hf-to-megatron", help="Hugging Face -> Megatron-Core")
    common(sp)
    sp.add_argument("--family", help="model family (default: from config.json's model_type)")
    sp.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    sp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    sp.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE families)")
    sp.add_argument(
        "--first-stage-layers",
        type=int,
        help="layers of the first pipeline stage (Megatron's --decoder-first-pipeline-num-layers)",
    )
    sp.add_argument(
        "--last-stage-layers",
        type=int,
        help="layers of the last pipeline stage (Megatron's --decoder-last-pipeline-num-layers)",
    )
    sp.add_argument(
        "--virtual-pipeline-stages",
        type=int,
        default=1,
        metavar="N",
        help="model chunks per pipeline rank, interleaved (Megatron's --num-virtual-stages-per-pipeline-rank)",
    )
    sp.add_argument(
        "--pipeline-layout",
        metavar="LAYOUT",
        help="custom layout, e.g. 'Et|tt|tt|tL' (Megatron's --pipeline-model-parallel-layout)",
    )
    sp.add_argument("--format", choices=("torch_dist", "legacy"), default="torch_dist")
    sp.add_argument(
        "--local-spec",
        action="store_true",
        help="local layer spec names (default: Transformer Engine)",
    )
    sp.add_argument(
        "--grouped-gemm", action="store_true", help="TEGroupedMLP expert names (weight0..)"
    )
    sp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    sp.add_argument("--iteration", type=int, default=0)
    sp.add_argument(
        "--trust-global",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="(--check) allow this class in Megatron pickles",
    )

    sp = sub.add_parser("megatron-to-hf", help="Megatron-Core -> Hugging Face")
    common(sp)
    sp.add_argument(
        "--hf-config",
        help="config.json (or HF folder) of the model; default: the hf_config.json saved with the checkpoint",
    )
    sp.add_argument("--family", help="model family (default: from the config's model_type)")
    sp.add_argument("--max-shard-size", default="5GB")
    sp.add_argument(
        "--trust-global",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="allow this class in Megatron pickles (trusted checkpoints only)",
    )
    return p  # fmt: skip


_COMMANDS = {
    "hf-to-forge": _hf_to_forge,
    "forge-to-hf": _forge_to_hf,
    "hf-to-megatron": _hf_to_megatron,
    "megatron-to-hf": _megatron_to_hf,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``forge-convert``; returns the exit status (0 ok, 1 check failed, 2 error)."""
    args = _parser().parse_args(argv)
    if args.check and not Path(args.out).exists():
        print(f"forge-convert: error: --check needs the converted checkpoint, {args.out} does not exist", file=sys.stderr)  # fmt: skip
        return 2
    try:
        return _COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"forge-convert: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
