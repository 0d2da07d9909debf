"""Wrong data, tokenizer, model or layout settings stop a run at setup with a ``ConfigError``
that names the setting (the CLI prints it as one line), instead of training with the wrong
tokenizer or failing mid-step inside torch. All single-process and config-level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forge_train.compose import compose_run_config, unknown_key_hint
from forge_train.config import ConfigError, DataConfig, ModelSettings, RunConfig

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]


def _bpe(texts: list[str], folder: Path, vocab_size: int = 400):
    """A small byte-level BPE saved as a Hugging Face tokenizer folder (loaded back, so it has
    a ``path`` as a user's tokenizer has)."""
    from forge_data import load_tokenizer, train_bpe_tokenizer

    train_bpe_tokenizer(texts, vocab_size=vocab_size).save(folder)
    return load_tokenizer(folder)


def _preprocessed(folder: Path, tokenizer, texts: list[str]) -> Path:
    from forge_data.preprocess import PreprocessConfig, preprocess

    source = folder.with_suffix(".jsonl")
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess(
        PreprocessConfig(inputs=[str(source)], output_dir=folder, mode="text", progress=False),
        tokenizer,
    )
    return folder


# -- 1. a model folder's tokenizer ---------------------------------------------------------------
def test_a_model_folder_without_a_tokenizer_is_refused_not_trained_with_forges_bpe(tmp_path):
    """Weights-only folders (and sentencepiece-only ones before) silently trained with forge's
    8192-token stdlib BPE and exported it beside the model's weights."""
    from forge_train.data import load_run_tokenizer

    folder = tmp_path / "weights_only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    expected = (
        r"model.hf_path: .*weights_only has no tokenizer .*"
        r"tokenizer.model.*: set data.tokenizer"
    )
    with pytest.raises(ConfigError, match=expected):
        load_run_tokenizer(DataConfig(), ModelSettings(hf_path=str(folder)))
    with pytest.raises(ConfigError, match=r"model.hf_path: .*typo is not a folder"):
        load_run_tokenizer(DataConfig(), ModelSettings(hf_path=str(tmp_path / "typo")))
    # data.tokenizer still takes precedence over the folder's (missing) tokenizer
    tok = _bpe(TEXTS, tmp_path / "tok", vocab_size=300)
    chosen = load_run_tokenizer(
        DataConfig(tokenizer=str(tmp_path / "tok")), ModelSettings(hf_path=str(folder))
    )
    assert chosen.vocab_size == tok.vocab_size
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text("{not json")
    with pytest.raises(
        ConfigError, match=r"data.tokenizer: cannot load the tokenizer of .*corrupt"
    ):
        load_run_tokenizer(DataConfig(tokenizer=str(corrupt)))


def test_a_model_folder_with_only_a_slow_tokenizer_loads_it(tmp_path):
    """A slow tokenizer (here GPT-2's ``vocab.json`` + ``merges.txt``, no ``tokenizer.json``)
    is the folder's tokenizer: forge_data's ``load_tokenizer`` converts it; one it cannot
    convert (a corrupt SentencePiece ``tokenizer.model``) is a ConfigError naming the key."""
    from forge_train.data import load_run_tokenizer

    folder = tmp_path / "slow"
    folder.mkdir()
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na b\nab c\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    tokenizer = load_run_tokenizer(DataConfig(), ModelSettings(hf_path=str(folder)))
    assert tokenizer.vocab_size == len(vocab)
    assert tokenizer.encode("abc") == [5]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes(b"\0" * 100)
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ConfigError, match=r"model.hf_path: cannot load the tokenizer of .*broken"):
        load_run_tokenizer(DataConfig(), ModelSettings(hf_path=str(broken)))


def test_a_pretrained_model_smaller_than_the_tokenizer_names_the_folder():
    from forge_train.components import check_vocab

    hf = RunConfig(model=ModelSettings(hf_path="/models/m"))
    expected = (
        r"model.hf_path: the tokenizer \(the folder's own "
        r"tokenizer\) has 8192 ids but the model of /models/m has only 4096"
    )
    with pytest.raises(ConfigError, match=expected):
        check_vocab(hf, 8192, 4096)
    check_vocab(hf, 4096, 4096)
    check_vocab(hf, 32000, 32064)  # a padded embedding is fine
    scratch = RunConfig(model=ModelSettings(config={"family": "llama"}))
    with pytest.raises(ConfigError, match=r"model.vocab_size: the tokenizer \(forge's default"):
        check_vocab(scratch, 8192, 4096)


# -- 2. tensor parallelism and the attention heads ------------------------------------------------
def _heads(num_heads: int, num_kv_heads: int):
    from forge_models import TransformerConfig

    return TransformerConfig(
        vocab_size=64,
        hidden_size=32 * num_heads,
        intermediate_size=64,
        num_layers=1,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=32,
    )


def test_tensor_parallelism_must_split_whole_heads():
    """tp=2 with 3 heads of 32 passed forge-parallel's shape check (q_proj's 96 outputs split
    in two) and failed at the first forward: ``shape '[1, 512, -1, 32]' is invalid``."""
    from forge_train.components import check_tensor_parallel_heads

    expected = (
        r"parallel.tp=2 does not divide the model's "
        r"num_heads=3.*valid tp degrees for num_heads=3, num_kv_heads=3: 1, 3"
    )
    with pytest.raises(ConfigError, match=expected):
        check_tensor_parallel_heads(_heads(3, 3), 2)
    expected = (
        r"parallel.tp=2 exceeds the model's num_kv_heads=1: "
        r".*does not replicate them; valid tp degrees .*: 1 "
    )
    with pytest.raises(ConfigError, match=expected):
        check_tensor_parallel_heads(_heads(8, 1), 2)
    expected = (
        r"parallel.tp=4 does not divide the model's "
        r"num_kv_heads=6.*: 1, 2, 3, 6"
    )
    with pytest.raises(ConfigError, match=expected):
        check_tensor_parallel_heads(_heads(12, 6), 4)
    for tp in (1, 2, 4):
        check_tensor_parallel_heads(_heads(8, 4), tp)
    check_tensor_parallel_heads(_heads(3, 1), 1)


# -- 3. / 4. preprocessed shards ------------------------------------------------------------------
def test_preprocessed_shards_of_another_tokenizer_are_refused(tmp_path):
    """Shards tokenized with another tokenizer ended in ``IndexError: index out of range in
    self`` at the first step (a device-side assert on a GPU), or trained on the wrong tokens
    when the vocabularies had the same size."""
    from forge_data import load_tokenizer
    from forge_models import TransformerConfig
    from forge_train.data import build_data

    made_with = _bpe(TEXTS, tmp_path / "tok_a")
    shards = _preprocessed(tmp_path / "pre", made_with, TEXTS[:20])
    config = DataConfig(kind="preprocessed", paths=[str(shards)])

    smaller = _bpe(TEXTS[:50], tmp_path / "tok_small", vocab_size=280)
    n, m = made_with.vocab_size, smaller.vocab_size
    assert m < n
    expected = (
        rf"data.paths: {shards} was tokenized with "
        rf".*tok_a \({n} ids\), not the run's tokenizer .*tok_small, {m} ids"
    )
    with pytest.raises(ConfigError, match=expected):
        build_data(config, smaller)
    # The same size with two ids swapped: the shards' ids would silently mean other tokens.
    state = json.loads((tmp_path / "tok_a" / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "tok_b").mkdir()
    (tmp_path / "tok_b" / "tokenizer.json").write_text(json.dumps(state))
    swapped = load_tokenizer(tmp_path / "tok_b")
    assert swapped.vocab_size == n
    with pytest.raises(ConfigError, match=rf"tok_a \({n} ids\), whose vocabulary differs"):
        build_data(config, swapped)
    model = TransformerConfig(
        vocab_size=n - 1, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1
    )
    with pytest.raises(ConfigError, match=rf"more than the model's vocabulary of {n - 1}"):
        build_data(config, made_with, model_config=model)
    val = DataConfig(kind="preprocessed", paths=[str(shards)], val_paths=[str(tmp_path / "no")])
    with pytest.raises(ConfigError, match=r"data.val_paths: .*no does not exist"):
        build_data(val, made_with)
    assert len(build_data(config, made_with).train) == 20


def test_several_preprocessed_folders_are_read_back_to_back(tmp_path):
    """``data.paths=[outA,outB]`` was passed to TokenDataset as shard prefixes and failed with
    '.../outA.idx does not exist'."""
    from forge_train.data import build_data

    tokenizer = _bpe(TEXTS, tmp_path / "tok")
    first = _preprocessed(tmp_path / "a", tokenizer, TEXTS[:20])
    second = _preprocessed(tmp_path / "b", tokenizer, TEXTS[20:50])
    data = build_data(
        DataConfig(kind="preprocessed", paths=[str(first), str(second)]), tokenizer
    ).train
    assert len(data) == 50
    documents = [tokenizer.decode(data.document(i)[0][:-1]) for i in range(50)]  # (eos)
    assert sorted(documents[:20]) == sorted(TEXTS[:20])  # folder a's, then folder b's
    assert sorted(documents[20:]) == sorted(TEXTS[20:50])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data.paths: .*empty has no manifest.json"):
        build_data(DataConfig(kind="preprocessed", paths=[str(first), str(empty)]), tokenizer)


# -- 5. errors that arrived as tracebacks ---------------------------------------------------------
def test_batch_rows_that_do_not_split_over_the_data_parallel_ranks():
    """Was a ValueError from the loader, after the model was built (a traceback on each rank)."""
    from forge_train.data import check_batch_split

    config = DataConfig(global_batch_rows=4, micro_batch_rows=4)
    expected = (
        r"data.global_batch_rows=4 is not a multiple of the "
        r"data-parallel size 2 x data.micro_batch_rows=4 = 8.*multiple of 8 "
        r"\(8, 16, ...\) or data.micro_batch_rows among \[1, 2\]"
    )
    with pytest.raises(ConfigError, match=expected):
        check_batch_split(config, 2)
    check_batch_split(config, 1)
    with pytest.raises(ConfigError, match=r"\(at least 8: one row per data-parallel rank\)"):
        check_batch_split(DataConfig(global_batch_rows=4, micro_batch_rows=1), 8)


def test_a_model_folder_that_does_not_fit_its_config_names_the_key(tmp_path):
    """A missing folder and weights of another shape than config.json says were a
    FileNotFoundError and a CheckpointMismatchError traceback."""
    import forge_models
    from forge_train.modeling import build_model, model_config

    with pytest.raises(ConfigError, match=r"model.hf_path: checkpoint folder .*typo does not"):
        model_config(ModelSettings(hf_path=str(tmp_path / "typo")), 64)
    config = forge_models.TransformerConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2
    )
    folder = tmp_path / "hf"
    forge_models.save_pretrained(forge_models.build_model(config, device="cpu"), folder)
    hf_config = json.loads((folder / "config.json").read_text())
    hf_config["intermediate_size"] = 48  # config.json no longer describes the weights
    (folder / "config.json").write_text(json.dumps(hf_config))
    settings = ModelSettings(hf_path=str(folder), init_device="device")
    expected = (
        r"(?s)model.hf_path: the weights in .*hf do not fit "
        r"the model that its config.json describes.*mis-shaped"
    )
    with pytest.raises(ConfigError, match=expected):
        build_model(settings, model_config(settings, 64), seed=0)
    torch.manual_seed(0)


# -- 6. misspelled keys ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], "unknown key train.stepz; did you mean train.steps?"),
        (["optim.learning_rate=1e-3"], "unknown key optim.learning_rate; did you mean optim.lr?"),
        (["trian.steps=3"], "unknown key trian.steps; did you mean train.steps?"),
        (["modle=tiny"], "unknown key modle; did you mean model?"),
        (
            ["logging.wandb.projet=x"],
            "unknown key logging.wandb.projet; did you mean logging.wandb.project?",
        ),
        (
            ["model.config.hidden_sizee=64"],
            "unknown key model.config.hidden_sizee; did you mean model.config.hidden_size?",
        ),
        (["data.nope=1"], "unknown key data.nope; valid keys under data: kind, paths,"),
        # valid keys the preset leaves out: Hydra's advice (+key=value) is right for them
        (["lora.rank=4"], "To append to your config use +lora.rank=4"),
        (["model.config.qk_norm=true"], "To append to your config use +model.config.qk_norm"),
        # following that advice with a misspelled key reaches the config's own check
        (["+train.stepz=3"], "train.stepz: unknown key; did you mean train.steps?"),
        (["+optim.learning_rate=1e-3"], "optim.learning_rate: unknown key; did you mean optim.lr?"),
        (["+train.zzzqqq=1"], "train.zzzqqq: unknown key; valid keys under train: steps, seed"),
    ],
)
def test_a_misspelled_key_gets_the_key_it_is_closest_to(overrides, message):
    with pytest.raises(ConfigError) as raised:
        compose_run_config(overrides)
    assert message in str(raised.value)


def test_unknown_key_hint_leaves_valid_keys_alone():
    assert unknown_key_hint("train.steps") is None
    assert unknown_key_hint("lora.rank") is None  # LoraConfig | None
    assert unknown_key_hint("model.config.num_heads") is None
    assert unknown_key_hint("model.config.text.whatever") is None  # a VLM's nested dicts
    assert unknown_key_hint("parallel.tensor_parallel") == (
        "unknown key parallel.tensor_parallel; did you mean parallel.tp?"
    )
