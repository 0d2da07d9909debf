"""``forge-preprocess``: jsonl / parquet / plain-text folders -> tokenized, shuffled shards.

Examples::

    forge-preprocess corpus/ --out data/ --tokenizer my-tokenizer/ --num-shards 8 --workers 4
    forge-preprocess chats.jsonl --out sft/ --tokenizer default --mode chat --chat-template chatml
    forge-preprocess --stdlib --out data/ --tokenizer default       # the built-in default run

``--tokenizer default`` trains (once, cached) the byte-level BPE of
:func:`forge_data.tokenizer.default_tokenizer`; ``--stdlib`` uses the Python standard library's
source as the corpus, so the default run needs no download.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forge-preprocess",
        description="Tokenize jsonl / parquet / text corpora into shuffled indexed shards.",
    )
    p.add_argument("inputs", nargs="*", help="files or folders (.jsonl, .parquet, .txt/.md/.py)")
    p.add_argument("--stdlib", action="store_true", help="add the Python stdlib source as input")
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--tokenizer", default="default", help="HF tokenizer folder, or 'default'")
    p.add_argument("--tokenizer-cache", default=None, help="cache folder for --tokenizer default")
    p.add_argument("--mode", choices=["text", "chat"], default="text")
    p.add_argument("--text-key", default="text")
    p.add_argument("--messages-key", default="messages")
    p.add_argument("--chat-template", default=None, help="chatml, llama3, or a Jinja file")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to documents")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: in-process)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from forge_data.preprocess import PreprocessConfig, preprocess
    from forge_data.tokenizer import default_tokenizer, load_tokenizer, stdlib_corpus_files

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    inputs = list(args.inputs) + ([str(p) for p in stdlib_corpus_files()] if args.stdlib else [])
    if args.tokenizer == "default":
        tokenizer = default_tokenizer(args.tokenizer_cache)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    template = args.chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text()
    try:
        config = PreprocessConfig(
            inputs=inputs,
            output_dir=args.out,
            mode=args.mode,
            text_key=args.text_key,
            messages_key=args.messages_key,
            chat_template=template,
            system_prompt=args.system_prompt,
            append_eos=not args.no_eos,
            num_shards=args.num_shards,
            num_workers=args.workers,
            chunk_size=args.chunk_size,
            seed=args.seed,
            on_error=args.on_error,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
        manifest = preprocess(config, tokenizer)
    except ValueError as err:
        print(f"forge-preprocess: error: {err}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("documents", "tokens", "trained_tokens", "skipped")}
    summary["skipped"] = {k: v for k, v in summary["skipped"].items() if k != "records"}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
