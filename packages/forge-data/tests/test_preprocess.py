"""``forge-preprocess``: jsonl / text folders -> shuffled indexed shards with a manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from forge_data.cli import main
from forge_data.indexed import IndexedDataset
from forge_data.loader import LoaderConfig, PackedLoader, TokenDataset
from forge_data.packing import IGNORE_INDEX

TEXTS = [f"def f{i}(x):\n    return x * {i} + {'y' * i}\n" for i in range(12)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs").mkdir()
    for i, text in enumerate(TEXTS[:4]):
        (root / "docs" / f"{i}.txt").write_text(text)
    (root / "docs" / "empty.md").write_text("")
    lines = [json.dumps({"text": t}) for t in TEXTS[4:]]
    lines[2:2] = ["{not json", json.dumps({"body": "no text key"}), json.dumps({"text": 3})]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _documents(out: Path) -> list[tuple[int, ...]]:
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [IndexedDataset(out / s["prefix"]) for s in manifest["shards"]]
    return [tuple(shard[i].tolist()) for shard in shards for i in range(len(shard))]


def test_cli_tokenizes_shuffles_and_reports(corpus, tokenizer, saved_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(corpus / "docs"), str(corpus / "data.jsonl"), "--tokenizer", str(saved_tokenizer)]
    rc = main([*args, "--out", str(out), "--num-shards", "2", "--seed", "3", "--quiet"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    expected = [(*tokenizer.encode(t), tokenizer.eos_id) for t in TEXTS]
    docs = _documents(out)
    assert Counter(docs) == Counter(expected)  # every document exactly once
    assert docs != expected  # shuffled
    assert manifest["documents"] == 12
    assert len(manifest["shards"]) == 2
    assert manifest["tokens"] == sum(map(len, expected))
    assert sum(manifest["length"]["histogram"].values()) == 12
    skipped = manifest["skipped"]
    assert skipped["by_reason"] == {
        "empty document": 1,
        "invalid JSON": 1,
        "record has no 'text' field": 1,
        "text field is int, not a string": 1,
    }
    where = {r["location"] for r in skipped["records"]}
    assert {f"{corpus / 'data.jsonl'}:3", f"{corpus / 'data.jsonl'}:5"} <= where
    assert str(corpus / "docs" / "empty.md") in where
    assert json.loads(capsys.readouterr().out)["documents"] == 12

    # A pool of tokenizer workers, through the installed console script, writes the same bytes.
    script = Path(sys.executable).with_name("forge-preprocess")
    out2 = tmp_path / "out2"
    run = subprocess.run(
        [
            str(script),
            *args,
            "--out",
            str(out2),
            "--num-shards",
            "2",
            "--seed",
            "3",
            "--workers",
            "2",
            "--chunk-size",
            "3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for s in manifest["shards"]:
        for ext in (".bin", ".idx"):
            name = s["prefix"] + ext
            assert (out / name).read_bytes() == (out2 / name).read_bytes()

    # Strict mode stops at the first bad record, naming it.
    rc = main([*args, "--out", str(tmp_path / "strict"), "--on-error", "raise", "--quiet"])
    assert rc == 2
    assert "data.jsonl:3: invalid JSON" in capsys.readouterr().err


def test_chat_mode_stores_the_assistant_mask_and_the_loader_trains_only_on_it(
    tokenizer, saved_tokenizer, tmp_path
):
    chats = [
        [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ]
        for i in range(6)
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps({"messages": c}) for c in chats))
    out = tmp_path / "sft"
    args = [str(src), "--out", str(out), "--tokenizer", str(saved_tokenizer), "--mode", "chat"]
    assert main([*args, "--chat-template", "chatml", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 6
    # Trained tokens: the two replies and their end markers, per conversation.
    replies = sum(
        len(tokenizer.encode(f"It is {2 * i}.<|im_end|>\n"))
        + len(tokenizer.encode("Yes.<|im_end|>\n"))
        for i in range(6)
    )
    assert manifest["trained_tokens"] == replies

    loader = PackedLoader(
        TokenDataset(out), LoaderConfig(seq_len=512, global_batch_rows=1), dp_rank=0, dp_size=1
    )
    micro = next(loader)[0]
    assert micro["pieces"].shape[0] == 6  # all six conversations in one row
    labels = micro["labels"][micro["labels"] != IGNORE_INDEX]
    assert labels.numel() == replies
    assert tokenizer.decode(labels.tolist()).count("<|im_end|>") == 12
    assert "What is" not in tokenizer.decode(labels.tolist())


def test_parquet_input(tokenizer, saved_tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": TEXTS[:5]}), tmp_path / "t.parquet")
    out = tmp_path / "pq"
    args = [str(tmp_path / "t.parquet"), "--out", str(out), "--tokenizer", str(saved_tokenizer)]
    assert main([*args, "--text-key", "content", "--no-eos", "--quiet"]) == 0
    assert Counter(_documents(out)) == Counter(tuple(tokenizer.encode(t)) for t in TEXTS[:5])
    assert json.loads((out / "manifest.json").read_text())["documents"] == 5
