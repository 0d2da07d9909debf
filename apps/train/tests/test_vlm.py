"""forge-train on vision-language models, on scikit-image captions: recipe=vlm (vlm-tiny), the
Qwen2.5-VL and LLaVA-OneVision presets (each family's processor, placeholders and, for
Qwen2.5-VL, M-RoPE positions), the meta-device build, and the Hugging Face export of a trained
Qwen2.5-VL checked against transformers. The steps are run by hand (constant learning rate) to
compare the weights before and after; one shared data cache keeps the tokenizer and the image
shard from being rebuilt per test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forge_data import default_tokenizer
from forge_data.vision.placeholders import STYLES
from forge_train.components import build_components
from forge_train.compose import compose_run_config
from forge_train.config import ConfigError, ParallelSettings
from forge_train.data import load_run_tokenizer, model_inputs
from forge_train.modeling import build_model, export_hf
from forge_train.trainer import train
from forge_train.vlm_model import vlm_model_config
from forge_train.vlm_processing import placeholder_style

pytest.importorskip("skimage")

CPU = torch.device("cpu")
DEGREES = ParallelSettings().resolve(1)  # one process


@pytest.fixture(scope="module", autouse=True)
def data_cache(vlm_data_cache_dir):
    """The session's VLM data cache (demo tokenizer, image shard) for the module's runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_DATA_CACHE", str(vlm_data_cache_dir))
        yield


def _compose(tmp_path, *overrides: str):
    return compose_run_config(["recipe=vlm", f"train.output_dir={tmp_path / 'run'}", *overrides])


def _train(parts, lr: float, steps: int) -> list[float]:
    """``steps`` optimizer steps at a constant ``lr``; the mean loss per token of each."""
    for group in parts.optimizer.param_groups:  # no warmup schedule in this hand-run loop
        group["lr"] = lr
    losses = []
    for _ in range(steps):
        total, count = 0.0, 0
        for mb in next(parts.loader):
            kwargs, n = model_inputs(mb, CPU)
            assert "images" in kwargs
            loss = parts.model(**kwargs, loss_reduction="sum")
            (loss / n).backward()
            total, count = total + float(loss.detach()), count + int(n)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        losses.append(total / count)
    return losses


def test_vlm_recipe_trains_with_frozen_vision(tmp_path):
    cfg = _compose(tmp_path, "train.steps=12")
    assert cfg.model.kind == "vlm"
    assert cfg.train.freeze == ["vision"]
    parts = build_components(cfg, world_size=1, degrees=DEGREES, device=CPU)
    model = parts.model
    assert model.trainable_parts() == ["projector", "language_model"]
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    losses = _train(parts, cfg.optim.lr, cfg.train.steps)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    for k, v in model.vision.state_dict().items():
        torch.testing.assert_close(v, vision_before[k], rtol=0, atol=0)
    assert any(
        not torch.equal(v, projector_before[k]) for k, v in model.projector.state_dict().items()
    )


@pytest.mark.parametrize(
    ("preset", "image_token", "init_device"),
    [("qwen2_5-vl-tiny", "<|image_pad|>", "meta"), ("llava-ov-tiny", "<image>", "device")],
)
def test_family_presets_train(tmp_path, preset, image_token, init_device):
    """Each family's processor and placeholders come from the model config; the loss falls.
    Qwen2.5-VL's batches carry the 3-D positions the model would compute itself, per packed
    document; it is built on the meta device and materialized after parallelization."""
    cfg = _compose(tmp_path, f"model={preset}", f"model.init_device={init_device}")
    parts = build_components(cfg, world_size=1, degrees=DEGREES, device=CPU)
    model, config = parts.model, parts.model_config
    assert config.image_token_id == parts.tokenizer.token_to_id(image_token)
    # Only the family's own placeholder tokens join the tokenizer's vocabulary.
    own = placeholder_style(config).special_tokens
    others = {t for s in STYLES.values() for t in s.special_tokens} - set(own)
    assert all(parts.tokenizer.token_to_id(t) is not None for t in own)
    assert others
    assert all(parts.tokenizer.token_to_id(t) is None for t in others), others
    assert parts.tokenizer.vocab_size == default_tokenizer().vocab_size + len(own)
    assert not any(p.is_meta for p in model.parameters())
    batch = next(parts.loader)[0]
    images = model_inputs(batch, CPU)[0]["images"]
    if config.family == "qwen2_5_vl":
        expected = model.mrope_positions(
            batch["input_ids"].reshape(1, -1), images=images, cu_seqlens=batch["cu_seqlens"]
        )
        assert torch.equal(batch["mrope_position_ids"], expected)
        assert int(expected[1:].amax()) < int(batch["position_ids"].amax())  # 2-D image grid
    else:
        assert "mrope_position_ids" not in batch
        assert images.image_sizes is not None
    tokens = int((batch["input_ids"] == config.image_token_id).sum())
    assert tokens == sum(model.num_visual_tokens(images))
    losses = _train(parts, cfg.optim.lr, 8)
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses


@pytest.mark.parametrize("preset", ["vlm-tiny", "qwen2_5-vl-tiny", "llava-ov-tiny"])
def test_meta_build_materializes_like_the_cpu_build(tmp_path, preset):
    """``init_device=meta``, then forge_models.materialize (as after parallelization) with the
    run's seed, gives every part the weights the CPU build gives."""
    import forge_models

    cfg = _compose(tmp_path, f"model={preset}")
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    on_cpu, meta = build_model(cfg.model, config, seed=3)
    assert not meta
    settings = dataclasses.replace(cfg.model, init_device="meta")
    on_meta, meta = build_model(settings, config, seed=3)
    assert meta
    assert all(p.is_meta for p in on_meta.parameters())
    torch.manual_seed(3)
    forge_models.materialize(on_meta, CPU)
    expected = on_cpu.state_dict()
    for name, tensor in on_meta.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_real_size_preset_composes_on_the_meta_device(tmp_path):
    from forge_models.vlm import vlm_config_from_dict

    cfg = _compose(tmp_path, "model=qwen2_5-vl-3b")
    assert cfg.model.init_device == "auto"
    config = vlm_config_from_dict(cfg.model.config)  # token ids and vocabulary: the model's
    assert (config.family, config.vision.depth, config.text.hidden_size) == ("qwen2_5_vl", 32, 2048)
    model, on_meta = build_model(cfg.model, config, seed=0)  # auto: above 1B parameters
    assert on_meta
    assert 3.5e9 < sum(p.numel() for p in model.parameters()) < 4e9
    # the demo tokenizer writes <|image_pad|> as another id than the preset's 151655
    with pytest.raises(ConfigError, match=r"data\.tokenizer to the model's own tokenizer"):
        vlm_model_config(cfg.model, load_run_tokenizer(cfg.data, cfg.model), frozen=[])


def test_custom_combination_refuses_hf_export(tmp_path):
    cfg = _compose(tmp_path)  # vlm-tiny: SigLIP + pixel shuffle, no transformers counterpart
    config = vlm_model_config(cfg.model, load_run_tokenizer(cfg.data, cfg.model), frozen=[])
    with pytest.raises(ConfigError, match="no Hugging Face counterpart"):
        export_hf(None, config, tmp_path, tokenizer=None, lora=None, dtype=None, is_main=True)
    # A run asking for the export fails at start-up, before any training.
    with pytest.raises(ConfigError, match="no Hugging Face counterpart"):
        train(_compose(tmp_path / "start", "checkpoint.export_hf=true"))
    assert not (tmp_path / "start" / "run" / "checkpoints").exists()


def test_qwen2_5_vl_export_matches_transformers(tmp_path):
    """A run of the Qwen2.5-VL preset exports at its end a folder transformers loads (tokenizer
    beside it) that gives the trained model's logits on an image + caption, in float32."""
    import transformers

    from forge_core import init_distributed, shutdown_distributed
    from forge_data import load_tokenizer
    from forge_models.vlm import VisualInputs
    from forge_train.loop import Trainer

    cfg = _compose(
        tmp_path, "model=qwen2_5-vl-tiny", "train.steps=3", "checkpoint.export_hf=true",
        "checkpoint.interval=0", "checkpoint.save_final=false", "logging.progress=plain", "logging.tensorboard=false",
    )  # fmt: skip
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        init_distributed()
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    finally:
        trainer.close()
        if owns_group:
            shutdown_distributed()
    model, config = trainer.parts.model.eval(), trainer.parts.model_config
    assert result.hf_dir is not None
    assert (result.hf_dir / "tokenizer.json").exists()
    assert (result.hf_dir / "preprocessor_config.json").exists()  # the run's image processor
    tokenizer = load_tokenizer(result.hf_dir)
    assert tokenizer.token_to_id("<|image_pad|>") == config.image_token_id
    reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        result.hf_dir, dtype=torch.float32
    ).eval()

    sample = trainer.parts.data.train.samples[0]
    ids = sample["input_ids"][None]
    image = sample["visual"]["image"]
    with torch.no_grad():
        ours = model(ids, images=VisualInputs(**image))
        theirs = reference(
            input_ids=ids,
            pixel_values=image["pixel_values"],
            image_grid_thw=image["grid_thw"],
            mm_token_type_ids=(ids == config.image_token_id).int(),
        ).logits
    vocab = theirs.shape[-1]
    assert vocab == config.text.vocab_size
    error = (ours[..., :vocab] - theirs).norm() / theirs.norm()
    assert error < 1e-5, error


def test_null_token_the_style_lacks_means_none(tmp_path):
    """LLaVA-OneVision's placeholders open an image with no token: null there means none (it
    used to fail, naming a placeholder token ``None``)."""
    cfg = _compose(tmp_path, "model=llava-ov-tiny", "+model.config.vision_start_token_id=null")
    config = vlm_model_config(cfg.model, load_run_tokenizer(cfg.data, cfg.model), frozen=[])
    assert config.vision_start_token_id is None
