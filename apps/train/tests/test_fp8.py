"""train.fp8: validated config, forge_kernels' conversion, and a CPU run on emulated FP8 GEMMs
(forward and backward) that tracks the fp32 run closely without equalling it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forge_models
from forge_core.testing import import_path
from forge_train.compose import compose_run_config
from forge_train.config import ConfigError
from forge_train.fp8 import check_fp8_support, convert_model_to_fp8
from forge_train.trainer import train

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.fp8=e4m3"], "train.fp8: must be one of per_tensor, blockwise, got 'e4m3'"),
        (["train.fp8_policy=p.json"], "train.fp8_policy: needs train.fp8 to be set"),
    ],
)
def test_invalid_fp8_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run_config(overrides)


def _tiny_llama() -> torch.nn.Module:
    return forge_models.build_model(
        forge_models.TransformerConfig(
            family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
            num_heads=4, num_kv_heads=2,
        )
    )  # fmt: skip


def test_conversion_swaps_eligible_linears_only():
    model = _tiny_llama()
    names = convert_model_to_fp8(model, "per_tensor")
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in high precision
    with pytest.raises(
        ConfigError, match=r"train.fp8=blockwise: no linear layer .* multiples of 128"
    ):
        convert_model_to_fp8(_tiny_llama(), "blockwise")  # 32/64 features: no 128 block


def test_a_policy_for_another_recipe_or_gpu_is_a_config_error(tmp_path, monkeypatch):
    """A ``train.fp8_policy`` table timed with another recipe, or on another GPU model, is
    refused saying to recalibrate (forge-train has no ``force`` setting to pass)."""
    import forge_kernels.fp8.policy as policy_module
    from forge_kernels.fp8 import CalibrationEntry, Fp8Policy

    entry = CalibrationEntry(m=128, n=32, k=32, bf16_ms=1.0, fp8_ms=0.5)
    path = tmp_path / "policy.json"
    Fp8Policy(entries=(entry,), device_name="NVIDIA H100 80GB HBM3", recipe="current").save(path)
    with pytest.raises(
        ConfigError,
        match=r"train.fp8_policy: .* was calibrated for the 'current' recipe, but "
        r"train.fp8=blockwise trains with 'blockwise'.*recalibrate it on this GPU with recipe "
        r"'blockwise' .*--policy-recipe blockwise",
    ):
        convert_model_to_fp8(_tiny_llama(), "blockwise", policy_path=str(path))
    assert convert_model_to_fp8(_tiny_llama(), "per_tensor", policy_path=str(path))

    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(policy_module, "current_device_name", lambda: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"calibrated on 'NVIDIA H100.*not on this GPU") as err:
        convert_model_to_fp8(_tiny_llama(), "per_tensor", policy_path=str(path))
    assert "force=True" not in str(err.value)
    assert "train.fp8_policy=null" in str(err.value)


def test_a_policy_is_read_once(tmp_path, monkeypatch):
    """``train.fp8_policy`` is read from disk once; its recipe and device are checked on that
    object (a second read could see another file, and costs a parse per conversion)."""
    import forge_kernels.fp8.policy as policy_module
    from forge_kernels.fp8 import CalibrationEntry, Fp8Policy

    entry = CalibrationEntry(m=128, n=32, k=32, bf16_ms=1.0, fp8_ms=0.5)
    path = tmp_path / "policy.json"
    Fp8Policy(entries=(entry,), device_name="NVIDIA H100 80GB HBM3", recipe="current").save(path)
    reads = []
    read_text = Path.read_text

    def counting_read_text(self, *args, **kwargs):
        reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(policy_module, "current_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert convert_model_to_fp8(_tiny_llama(), "per_tensor", policy_path=str(path))
    assert reads == [path]


def test_unusable_fp8_is_a_config_error(monkeypatch):
    import forge_kernels.fp8

    def unsupported(*args, **kwargs):
        raise TypeError("no float8 casts on this device")

    monkeypatch.setattr(forge_kernels.fp8, "fp8_linear", unsupported)
    with pytest.raises(ConfigError, match=r"train.fp8=per_tensor: forge_kernels cannot run or "
                       r"emulate FP8 linears on cpu \(TypeError: no float8"):  # fmt: skip
        check_fp8_support("per_tensor", torch.device("cpu"))


def test_two_emulated_fp8_steps_track_fp32(tmp_path, capsys):
    common = ("train.steps=2", "train.eval_batches=0", "checkpoint.export_hf=false",
              "checkpoint.interval=0", "checkpoint.save_final=false")  # fmt: skip
    fp32 = train(tiny.tiny_config(tmp_path / "fp32", *common))
    fp8 = train(tiny.tiny_config(tmp_path / "fp8", *common, "train.fp8=per_tensor"))
    assert "+ fp8 per_tensor (12 linears)" in capsys.readouterr().out  # 6 per layer, 2 layers
    assert fp8.losses != fp32.losses  # FP8 rounding ran...
    torch.testing.assert_close(fp8.losses, fp32.losses, rtol=1e-2, atol=0)  # ...and tracks fp32


def test_meta_initialized_fp8_linears_get_the_model_init(tmp_path):
    """Built on the meta device, the FP8 linears get the weights a model built on the device
    (initialized, then converted) holds: ``init_weights`` draws them in the model's order."""
    from forge_kernels.fp8 import Fp8Linear
    from forge_train.components import build_components

    def built(init_device):
        cfg = tiny.tiny_config(
            tmp_path / init_device, f"model.init_device={init_device}", "train.fp8=per_tensor"
        )
        return build_components(
            cfg, world_size=1, degrees=cfg.parallel.resolve(1), device=torch.device("cpu")
        )

    meta, device = built("meta"), built("device")
    fp8 = [m for m in meta.model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == len(meta.fp8_layers) == 12
    expected = device.model.state_dict()
    for name, value in meta.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
