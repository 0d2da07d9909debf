"""Step time of a vision-language model under pipeline parallelism: the vision encoder inside
stage 0 (coupled, the baseline) against the encoder decoupled from the pipeline
(:mod:`forge_train.vlm_pipeline`: encoded ahead of the schedule, spread over the pipeline ranks).

Run on two processes (gloo on CPU, or NCCL on GPUs), e.g.::

    OMP_NUM_THREADS=1 uv run torchrun --nproc-per-node 2 \\
        apps/train/benchmarks/bench_vlm_pipeline.py --steps 8 --microbatches 4

The job: ``recipe=vlm model=qwen2_5-vl-tiny`` on scikit-image captions, with a deeper and
wider vision tower and more image windows (``--vision-depth``, ``--vision-hidden``,
``--max-tiles``), untied embeddings, ``pp=2``, 1F1B, no data parallelism, all parts trained.
Every step, all variants run the same batch from the same initial weights, one after the
other (interleaved, so machine noise hits them alike); the median step time (forward,
backward, optimizer) of each is printed side by side with the ratio:

- ``coupled/layers``: stage 0 = encoder + projector + embedding + half the decoder layers;
- ``coupled/params``: the same, layers split to balance parameters (the encoder's counted on
  stage 0, so stage 0 gets fewer decoder layers);
- ``decoupled``: stages = decoder layers only, the encoder ahead of the schedule.

Also printed: the CPU seconds of all ranks per step (the work done) and of the busiest rank
(what bounds the step when every rank has a core of its own: on a shared, oversubscribed CPU the
wall-clock times mostly measure the contention), and the encoder's forward + backward time for
one micro-batch, measured alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn


class CoupledEmbedding(nn.Module):
    """Stage 0's first module in the coupled baseline: the encoder, the projector and the token
    embedding of the micro-batch the pipeline runs (its visual inputs from ``batches``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision = model.vision
        self.projector = model.projector
        self.embed_tokens = model.language_model.embed_tokens
        self.image_token_id = model.config.image_token_id
        self.hidden = model.config.text.hidden_size
        self.batches: list[dict] = []
        self.stage_holder: list[nn.Module] = []  # the StageModule (for its micro-batch index)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_meta:  # shape inference
            return torch.empty(*ids.shape, self.hidden, device="meta")
        images = self.batches[self.stage_holder[0].microbatch].get("images")
        embeds = self.embed_tokens(ids)
        if images is not None:
            features = self.projector(self.vision(images), images)
            where = (ids == self.image_token_id)[..., None]
            embeds = embeds.masked_scatter(where, features.to(embeds.dtype))
        return embeds


class CoupledTrunk(nn.Module):
    """The whole VLM as a plain decoder whose pre-module is :class:`CoupledEmbedding`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed = CoupledEmbedding(model)
        lm = model.language_model
        self.language_model = nn.Module()
        self.language_model.layers = lm.layers
        self.language_model.norm = lm.norm
        self.language_model.lm_head = lm.lm_head


def _overrides(args) -> list[str]:
    return [
        "recipe=vlm",
        "model=qwen2_5-vl-tiny",
        "+model.config.text.tie_word_embeddings=false",
        f"+model.config.text.num_layers={args.text_layers}",
        f"model.config.vision.depth={args.vision_depth}",
        f"model.config.vision.hidden_size={args.vision_hidden}",
        f"model.config.vision.intermediate_size={2 * args.vision_hidden}",
        "model.config.vision.fullatt_block_indexes=[]",
        "parallel=pp2-fsdp",
        "parallel.data_parallel=null",
        "parallel.dp_shard=1",
        "train.freeze=[]",
        f"data.max_tiles={args.max_tiles}",
        f"data.seq_len={args.seq_len}",
        "data.micro_batch_rows=1",
        f"data.global_batch_rows={args.microbatches}",
        "train.output_dir=/tmp/forge-bench-vlm-pipeline",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--max-tiles", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    from forge_core import init_distributed
    from forge_kernels.registry import reference_implementations
    from forge_parallel.pipeline import pipeline
    from forge_train.components import build_components
    from forge_train.compose import compose_run_config
    from forge_train.data import model_inputs
    from forge_train.modeling import build_model
    from forge_train.pipeline_model import PipelineLoss
    from forge_train.vlm_pipeline import VisualEncoder

    init_distributed()
    rank = dist.get_rank()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cfg = compose_run_config(_overrides(args))
    degrees = cfg.parallel.resolve(dist.get_world_size())
    parts = build_components(cfg, world_size=dist.get_world_size(), degrees=degrees, device=device)
    decoupled = parts.pipeline
    variants: dict[str, dict] = {
        "decoupled": {"parts": decoupled, "optimizer": parts.optimizer},
    }
    for split in ("layers", "params"):
        model, _ = build_model(cfg.model, parts.model_config, seed=cfg.train.seed)
        model.to(device)
        trunk = CoupledTrunk(model)
        loss = PipelineLoss(microbatches=args.microbatches)
        pipe = pipeline(
            trunk,
            decoupled.group,
            loss_fn=loss,
            schedule="1f1b",
            microbatches=args.microbatches,
            split=split,
            blocks="language_model.layers.*",  # not the (larger) vision tower's blocks
        )
        (stage,) = pipe.modules
        embed = trunk.embed if pipe.has_first_stage else None
        if embed is not None:
            embed.stage_holder.append(stage)
        optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-3)
        variants[f"coupled/{split}"] = {
            "pipe": pipe,
            "loss": loss,
            "embed": embed,
            "optimizer": optimizer,
            "stage_layers": len(stage.block_names),
        }
    inputs_model = decoupled.inputs_model
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    busiest: dict[str, list[float]] = {name: [] for name in variants}

    def prepare(micro_batches):
        batches, ids, targets, block_args, tokens = [], [], [], [], 0
        for mb in micro_batches:
            kwargs, n = model_inputs(mb, device)
            batches.append(kwargs)
            ids.append(kwargs["input_ids"])
            targets.append(mb["labels"].reshape(1, -1).to(device))
            attention = inputs_model.attention_inputs(
                kwargs["input_ids"],
                position_ids=kwargs["position_ids"],
                cu_seqlens=kwargs["cu_seqlens"],
                max_seqlen=kwargs["max_seqlen"],
                block_ids=kwargs.get("block_ids"),
            )
            block_args.append((attention,))
            tokens += int(n)
        return batches, torch.cat(ids), torch.cat(targets), block_args, tokens

    def run(name: str, v: dict, prepared) -> tuple[float, float, float]:
        batches, ids, targets, block_args, tokens = prepared
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        if name == "decoupled":
            p = v["parts"]
            p.loss.scale = 1.0 / tokens
            first, finish = p.first_stage_inputs(ids, batches, backward=True)
            p.pipe.step(
                *first,
                target=targets if p.is_last else None,
                losses=[],
                block_args=block_args,
                finish=finish,  # the encoder's and embedding's backward, before tied sums
            )
        else:
            pipe = v["pipe"]
            v["loss"].scale = 1.0 / tokens
            if v["embed"] is not None:
                v["embed"].batches = batches
            pipe.step(
                *((ids,) if pipe.has_first_stage else ()),
                target=targets if pipe.has_last_stage else None,
                losses=[],
                block_args=block_args,
            )
        v["optimizer"].step()
        v["optimizer"].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        busy = torch.tensor(time.process_time() - start_cpu, dtype=torch.float64)
        most = busy.clone()
        dist.all_reduce(busy)  # CPU seconds of all ranks (the work, whatever the contention)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)  # the busiest rank's
        return elapsed, float(busy), float(most)

    with reference_implementations():
        for step in range(args.warmup + args.steps):
            prepared = prepare(next(parts.loader))
            for name, v in variants.items():
                elapsed, busy, most = run(name, v, prepared)
                if step >= args.warmup:
                    times[name].append(elapsed)
                    cpu[name].append(busy)
                    busiest[name].append(most)
        # The encoder alone: forward + backward of one micro-batch's images.
        encoder = VisualEncoder(build_model(cfg.model, parts.model_config, seed=0)[0].to(device))
        images = prepared[0][0]["images"]
        encoder_times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            encoder(images).sum().backward()
            encoder_times.append(time.perf_counter() - start)
    if rank == 0:
        base = statistics.median(times["coupled/layers"])
        patches = int(images.pixel_values.shape[0])
        print(
            f"VLM pipeline, pp=2, 1f1b, {args.microbatches} micro-batches of {args.seq_len} "
            f"tokens, vision depth {args.vision_depth} x hidden {args.vision_hidden} "
            f"({patches} patches per micro-batch), {args.text_layers} text layers, "
            f"{args.steps} timed steps, device {device.type}"
        )
        top = statistics.median(busiest["coupled/layers"])
        print(
            f"{'variant':<16} {'stage-0 layers':>14} {'median step s':>14} {'vs coupled':>11} "
            f"{'CPU s (all ranks)':>18} {'busiest rank CPU s':>19} {'vs coupled':>11}"
        )
        for name, ts in times.items():
            layers = variants[name].get("stage_layers", "-")
            if name == "decoupled":
                layers = len(decoupled.pipe.modules[0].block_names)
            med = statistics.median(ts)
            busy, most = statistics.median(cpu[name]), statistics.median(busiest[name])
            print(
                f"{name:<16} {layers!s:>14} {med:>14.4f} {base / med:>10.2f}x {busy:>18.4f} "
                f"{most:>19.4f} {top / most:>10.2f}x"
            )
        print(
            f"encoder forward+backward alone, one micro-batch: "
            f"{statistics.median(encoder_times):.4f} s"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
