"""The loop's reporting on tiny single-process runs: the multi-token prediction split of the
loss, tokens/s and MFU over input tokens and step time only, the honest label of an
evaluation without a validation set, the start-up warnings, and the merged LoRA export."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import forge_train.loop
from forge_core.testing import import_path
from forge_train.compose import compose_run_config
from forge_train.data import model_inputs
from forge_train.loop import Trainer
from forge_train.step import StepRunner

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mtp_loss_is_reported_apart_and_the_gradient_keeps_it(tmp_path):
    """With ``mtp_depth=1`` the step's ``loss`` and the evaluation are the next-token
    cross-entropy alone (from the logits, independently; and bit for bit the summed loss of
    the same weights without the MTP module, which the objective less the weighted depth
    matches only up to rounding), ``mtp_1_loss`` the depth's, and the gradient still that of
    ``ce + mtp_loss_weight * ce_1``."""
    from forge_models import build_model
    from forge_models.causal_lm import shift_labels

    # DeepSeek-V3's weight; on these weights and batches the objective less 0.3 * ce_1 is
    # off the plain cross-entropy in the last bit (0.5 would happen to subtract back exactly).
    cfg = tiny.tiny_config(
        tmp_path, "+model.config.mtp_depth=1", "+model.config.mtp_loss_weight=0.3"
    )
    trainer = Trainer(cfg)
    try:
        with tiny.reference_kernels():
            trainer._build()
            model, runner = trainer.parts.model, trainer.runner
            micro_batches = next(trainer.parts.loader)
            inputs = [model_inputs(mb, trainer.device) for mb in micro_batches]
            n = sum(int(count) for _, count in inputs)
            # The same weights without the MTP module: its summed loss is the plain next-token
            # cross-entropy, by the same computation as the model's, added up as the step does.
            plain = build_model(model.config, mtp_depth=0)
            missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
            assert not missing
            assert unexpected
            assert all(k.startswith("mtp.") for k in unexpected)
            plain_sum = torch.zeros((), device=trainer.device)
            ce = depth = 0.0
            with torch.no_grad():
                for kwargs, _ in inputs:
                    plain_sum += plain(**kwargs, loss_reduction="sum").float()
                    logits = model(**{k: v for k, v in kwargs.items() if k != "labels"})
                    targets = shift_labels(kwargs["labels"], cu_seqlens=kwargs["cu_seqlens"])
                    ce += F.cross_entropy(
                        logits.flatten(0, 1), targets.reshape(-1), reduction="sum"
                    ).item()
                    model(**kwargs, loss_reduction="sum")
                    depth += model.mtp_losses[0].item()
            eval_sum, eval_tokens = runner.eval_sums(micro_batches).tolist()
            assert eval_tokens == n
            assert abs(eval_sum - ce) <= 1e-5 * ce
            assert eval_sum == plain_sum.item()
            loss, _, tokens = runner.accumulate(micro_batches)
            assert tokens == n
            torch.testing.assert_close(loss.item(), ce / n, rtol=1e-5, atol=0)
            assert torch.equal(loss, plain_sum / n), (loss.item(), (plain_sum / n).item())
            torch.testing.assert_close(
                runner.last_mtp_losses["mtp_1_loss"], depth / n, rtol=1e-5, atol=0
            )
            assert abs(depth / n - ce / n) > 1e-3  # the two are told apart
            # The gradient: of the whole objective, recomputed by hand.
            got = {name: p.grad.clone() for name, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            for kwargs, _ in inputs:
                (model(**kwargs, loss_reduction="sum") / n).backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-8)
            assert got["mtp.0.eh_proj.weight"].abs().sum() > 0  # the depth is trained
    finally:
        trainer.close()


def test_sft_throughput_counts_input_tokens_over_step_time_only(tmp_path, monkeypatch, capsys):
    """Chat data (assistant-only loss, padded rows) without a validation set, on a clock that
    advances 0.25 s per batch taken from the loader, 1 s per step and 1000 s per evaluation or
    checkpoint save: every row's tokens/s is the step's non-padding input tokens (more than its
    loss tokens) over 1.25 s, its data wait 0.25 s, the evaluation is labelled as read from the
    training set, and the set-up warnings are printed once."""
    from forge_data import PackedLoader

    clock = [0.0]
    monkeypatch.setattr(
        forge_train.loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0])
    )
    processed: list[int] = []
    run, evaluate, save = StepRunner.run, Trainer.evaluate, Trainer._save

    def timed_run(self, step, micro_batches):
        # Independently of document_ids: the pieces' lengths (forge_data's PackedLoader).
        processed.append(sum(int(mb["pieces"][:, 4].sum()) for mb in micro_batches))
        clock[0] += 1.0
        return run(self, step, micro_batches)

    def slow(method):
        def wrapped(self, *args):
            clock[0] += 1000.0
            return method(self, *args)

        return wrapped

    take = PackedLoader.__next__

    def slow_next(self):
        clock[0] += 0.25
        return take(self)

    monkeypatch.setattr(PackedLoader, "__next__", slow_next)
    monkeypatch.setattr(StepRunner, "run", timed_run)
    monkeypatch.setattr(Trainer, "evaluate", slow(evaluate))
    monkeypatch.setattr(Trainer, "_save", slow(save))
    chat = tiny.chat_file(tmp_path / "chat.jsonl", n=24)
    cfg = tiny.tiny_config(
        tmp_path / "run",
        "data=chat",
        f"data.paths=[{chat}]",
        "data.seq_len=64",
        "data.micro_batch_rows=1",
        "train.steps=4",
        "train.eval_every=2",
        "train.eval_batches=1",
        "checkpoint.interval=1",
        "checkpoint.export_hf=false",
        "optim.warmup_steps=8",
        "logging.log_every=1",
        "logging.peak_tflops=1",
    )
    with tiny.reference_kernels():
        trainer = Trainer(cfg)
        try:
            trainer.run()
            flops_per_token = trainer.parts.flops_per_token
        finally:
            trainer.close()
    rows = _rows(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    loss_tokens = [
        b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *steps[:-1]], steps, strict=True)
    ]
    for row, fed, trained in zip(steps, processed, loss_tokens, strict=True):
        assert row["tokens_per_s"] == fed / 1.25  # no evaluation or save inside
        assert row["data_wait_s"] == 0.25
        assert fed > 2 * trained > 0  # the user turns and chat markup are input too
        assert row["mfu"] == fed / 1.25 * flops_per_token / 1e12
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_split"] == "train" for r in evals)
    out = capsys.readouterr().out
    assert out.count("warning: no validation set") == 1
    assert "data.val_paths" in out
    assert out.count("warning: optim.warmup_steps=8 >= train.steps=4") == 1
    assert "peaks at 0.005" in out  # optim.lr=1e-2 x 4/8
    assert "step 2: loss on training batches" in out
    assert "held-out loss" not in out


def test_merged_lora_export_reproduces_the_trained_model(tmp_path):
    """The HF export of a LoRA run (adapters merged into the weights) gives the logits of the
    trained model with its adapters."""
    import forge_models

    chat = tiny.chat_file(tmp_path / "chat.jsonl", n=24)
    cfg = compose_run_config(
        [
            *tiny.TINY,
            f"train.output_dir={tmp_path / 'run'}",
            "recipe=lora",
            f"data.paths=[{chat}]",
            "data.seq_len=64",
            "data.micro_batch_rows=2",
            "data.global_batch_rows=2",
            "train.steps=3",
            "train.eval_batches=0",
            "lora.rank=4",
            "optim.lr=5e-2",
            "optim.warmup_steps=1",
            "checkpoint.interval=0",
        ]
    )
    with tiny.reference_kernels():
        trainer = Trainer(cfg)
        try:
            result = trainer.run()
            model = trainer.parts.model.eval()
            ids = torch.randint(0, 8000, (1, 32), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                want = model(input_ids=ids)
                exported = forge_models.from_pretrained(result.hf_dir).eval()
                got = exported(ids)
                # The adapters moved the model: the check compares more than the base weights.
                for module in model.modules():
                    if hasattr(module, "lora_B"):
                        assert module.lora_B.abs().sum() > 0
        finally:
            trainer.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
