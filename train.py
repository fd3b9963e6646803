"""Stage 2: train a face-recognition backbone with Partial FC and in-loop CFSM adversarial synthesis.

    torchrun --nproc_per_node=8 train.py configs/arcface_ms1mv2_r50_ours [key=value ...]
    python train.py configs/toy_ours                       # one process, CPU or one GPU

Per step: split the batch (rs_ratio), restyle the synthetic share with an adversarial style code from the frozen
generator, one forward of the mixed batch, Partial FC margin loss, backward, clip, step; log / verify / checkpoint.
The run around the steps (output folder, resume, checkpoints, non-finite guard, summary) is `utils.run.Run`, shared
with stage 1 (`train_generator.py`); `make_train_step` is the step itself, which the benchmarks in bench/ time.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from easydict import EasyDict
from torch.profiler import record_function

from backbones import get_model
from cfsm import load_generator
from cfsm.attack import AttackStats, adversarial_mix, frozen_stats, split_counts
from cfsm.visualize import clean_vs_synth_grid
from dataset import build_dataset
from eval.verification_callback import verification_for_run
from losses import margin_loss_from_config
from partial_fc import PartialFC
from utils import checkpoint as ckpt
from utils.cli import run_command
from utils.config import ConfigError, load_config, parse_launch_args
from utils.degrade import Degradation
from utils.distributed import DistEnv, agree_any, agree_call, agree_all, cleanup, init_distributed
from utils.optim import PolyScheduler, build_optimizer, decay_param_groups
from utils.precision import mixed_precision
from utils.run import Run
from utils.run_state import Resumed, load_optimizer_keeping_config, load_scheduler_keeping_config
from utils.step_state import StepState

Batch = Sequence[tuple[torch.Tensor, torch.Tensor]]  # the gradient_acc (images, labels) micro-batches of one step


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_launch_args(argv, __doc__, "configs/arcface_ms1mv2_r50_ours")
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.device, cfg.dist_timeout_s, args.local_rank)
    try:
        return train(cfg, env)
    finally:
        cleanup(env)


def make_train_step(cfg: EasyDict, env: DistEnv, model: torch.nn.Module, backbone: torch.nn.Module, pfc: PartialFC,
                    generator: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    autocast: dict, style_rng: torch.Generator) -> Callable[[Batch], dict]:
    """`train_step(batch) -> stats`: one optimizer step of stage 2 over the micro-batches in `batch`.

    `model` is `backbone` itself or its DDP wrapper; `generator=None` is the plain (no CFSM) step. stats: `loss`,
    `grad_norm` (tensors, read only when logged), `finite` (agreed by all ranks: a skipped update is skipped
    everywhere), and the last micro-batch's `clean` images and CFSM `mix` (None without a generator)."""
    amp_dtype = autocast["dtype"] if autocast["enabled"] else None
    step_state = StepState(backbone, pfc)  # BN stats, AdaFace EMA, sampling counter: put back on a skipped step
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def train_step(batch: Batch) -> dict:
        step_state.capture()
        for index, (images, labels) in enumerate(batch):
            images = images.to(env.device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(env.device, non_blocking=True)
            class_sample = pfc.sample_negatives(labels)  # one negative set: the attack and the update share it

            def attack_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                # plain module: no DDP sync; no autocast of its own: the attack sets the precision of each attempt
                # (an inner autocast would turn its fp32 fallback back into fp16)
                with frozen_stats(backbone):
                    emb = backbone(x)
                return pfc(emb.float(), y, class_sample=class_sample, update_stats=False)

            mix, mixed = None, images
            if generator is not None:
                with record_function("cfsm/adversarial_mix"):
                    mix = adversarial_mix(images, labels, generator, attack_loss, rs_ratio=cfg.rs_ratio,
                                          epsilon=cfg.epsilon, alpha=cfg.alpha, k=cfg.k, rng=style_rng,
                                          autocast_dtype=amp_dtype,
                                          grad_scale=scaler.get_scale() if cfg.fp16 else 1.0,
                                          agree=agree_any)  # precision retries: chosen by all ranks together
                mixed = mix.images
            sync_now = index == len(batch) - 1  # DDP all-reduces the gradients once, on the last micro-batch
            with (model.no_sync() if env.distributed and not sync_now else nullcontext()):
                with record_function("step/forward"), torch.autocast(**autocast):
                    embeddings = model(mixed)
                with record_function("step/loss_backward"):
                    loss = pfc(embeddings.float(), labels, class_sample=class_sample)
                    scaler.scale(loss / len(batch)).backward()

        with record_function("step/optimizer"):
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.clip_grad_norm or float("inf"))
            pfc_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pfc.parameters()
                                                             if p.grad is not None] or [torch.zeros(())]))
            finite = agree_all(env, bool(torch.isfinite(loss) & torch.isfinite(grad_norm)
                                            & torch.isfinite(pfc_norm)))
            if finite:
                scaler.step(optimizer)
                scaler.update()
            else:  # skip the update on every rank alike; halve the fp16 scale as GradScaler would
                scaler.update(scaler.get_scale() / 2 if cfg.fp16 else None)
                step_state.restore()  # the forward's writes (possibly NaN) leave no trace
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm, "finite": finite, "clean": images, "mix": mix}

    return train_step


def train(cfg: EasyDict, env: DistEnv) -> dict | None:
    """Run stage 2 with a loaded config on an initialised process environment; rank 0 returns the summary."""
    with Run(cfg, env, kind="recognition", log_name="train", tensorboard_prefix="train") as run:
        if run.finished is not None:  # this command already ran to its end: touch nothing
            return run.finished
        # ---- inputs first: every missing or wrong file stops us before any work (and before the folder exists) ----
        synthesis = split_counts(cfg.batch_size, cfg.rs_ratio)[1] > 0
        run.require_inputs({"rec": None if cfg.rec == "synthetic" else cfg.rec,
                            "pretrained_synthesis_model": cfg.pretrained_synthesis_model if synthesis else None,
                            "pretrained_backbone_model": cfg.pretrained_backbone_model or None})
        dataset = build_dataset(cfg.rec, augment=True, num_classes=cfg.num_classes, num_image=cfg.num_image)
        dataset.degradation = Degradation.from_config(cfg, seed=cfg.seed)  # None when every degrade_*_prob is 0
        num_classes = dataset.num_classes
        if num_classes < env.world_size:
            raise ConfigError(f"num_classes={num_classes} ({cfg.rec}) is smaller than the world size "
                              f"{env.world_size}: every rank must hold at least one class centre")
        generator = None
        if synthesis:
            generator = load_generator(cfg.pretrained_synthesis_model).to(env.device)  # frozen, eval, never DDP
        backbone = get_model(cfg.network, num_features=cfg.embedding_size, dropout=cfg.dropout,
                             use_checkpoint=cfg.use_checkpoint).to(env.device)
        if cfg.pretrained_backbone_model:
            ckpt.load_state_dict_strict(backbone, ckpt.load_state_dict_file(cfg.pretrained_backbone_model),
                                        source=str(cfg.pretrained_backbone_model))
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        backbone.to(memory_format=memory_format)
        if generator is not None:
            generator.to(memory_format=memory_format)
        pfc = PartialFC(margin_loss_from_config(cfg.loss, cfg), cfg.embedding_size, num_classes,
                        sample_rate=cfg.sample_rate, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                        ddp_grad_compensation=env.distributed).to(env.device)  # undo DDP's 1/W: as the reference

        loader = run.loader(dataset, micro_per_step=cfg.gradient_acc)
        optimizer = build_optimizer(cfg.optimizer, decay_param_groups(backbone, cfg.weight_decay_exclude)
                                    + [{"params": pfc.parameters()}], cfg)
        scheduler = PolyScheduler(optimizer, run.plan.total_steps, run.plan.warmup_steps, cfg.lr_power)
        _, scaler, autocast = mixed_precision(cfg.fp16, cfg.bf16, env.device.type)
        run.rngs["style"] = style_rng = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)  # any device

        def state() -> dict:
            return {"backbone": backbone.state_dict(), "partial_fc": pfc.state_dict(), "optimizer":
                    optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}

        def load_state(resumed: Resumed) -> None:  # lr, schedule and momentum come from this run's config
            backbone.load_state_dict(resumed.state["backbone"])
            pfc.load_state_dict(resumed.state["partial_fc"])
            load_optimizer_keeping_config(optimizer, resumed.state["optimizer"])
            load_scheduler_keeping_config(scheduler, resumed.state["scheduler"])
            scaler.load_state_dict(resumed.state["scaler"])

        step = run.resume(load_state, num_classes=num_classes, num_image=dataset.num_images)
        model = run.wrap_ddp(backbone, bucket_cap_mb=32, find_unused_parameters=False)
        backbone.train()
        train_step = make_train_step(cfg, env, model, backbone, pfc, generator, optimizer, scheduler, scaler,
                                     autocast, style_rng)
        run.start(step, f"{num_classes} classes, {dataset.num_images} images")
        # val_targets opened and checked now, before the first step; results go to the run's log (console, train.log)
        verify = verification_for_run(cfg.val_targets, cfg.rec, cfg.val_batch_size, env, run.writer, run.log)

        def run_verification(at_step: int) -> dict:
            # rank 0 verifies; an error there stops every rank (agreed in place of a barrier), not a timeout
            return agree_call(env, lambda: verify(at_step, backbone) if verify is not None else {},
                               "verification")

        # ---- the method: attack, forward, loss, step (make_train_step); then log, verify, checkpoint ----
        stats, val, stop_step = None, {}, run.plan.stop_step
        attack_stats = AttackStats()  # attack gain and |o*|: TensorBoard cfsm/*, means in summary.json
        for epoch, batch in run.step_batches(loader, step):  # ends at stop_step
            stats = train_step(batch)
            if stats["mix"] is not None:
                attack_stats.add(stats["mix"])
            step += 1
            run.check_finite(step, stats["finite"], {"loss": stats["loss"], "grad norm": stats["grad_norm"]})
            run.log_progress(step, epoch, {"loss": stats["loss"], "lr": optimizer.param_groups[0]["lr"],
                                           "grad_norm": stats["grad_norm"],
                                           "grad_scale": scaler.get_scale() if cfg.fp16 else 1.0})
            if run.writer is not None and run.log_due(step):
                for name, value in attack_stats.window().items():
                    run.writer.add_scalar(f"cfsm/{name}", value, step)
            mix = stats["mix"]
            if run.image_due(step) and mix is not None and mix.synth_index.numel():
                grid = clean_vs_synth_grid(stats["clean"][mix.synth_index], mix.images[mix.synth_index],
                                           mix.style.norm(dim=1))
                run.writer.add_image("cfsm/clean_vs_synth", grid, step, dataformats="HWC")
            if cfg.verbose and step % cfg.verbose == 0 and step < stop_step:
                val = run_verification(step)
            if run.save_due(step):
                run.save(step, state())

        run.final_save(step, state(), {"backbone": backbone.state_dict(), "partial_fc": pfc.state_dict()})
        val = run_verification(step) if cfg.val_targets else val
        final_loss = float(stats["loss"]) if stats is not None else None  # None: no step in this invocation

        def results() -> dict:
            ckpt.atomic_save(backbone.state_dict(), run.output / "model.pt")  # plain state dict: InsightFace tools
            shown = "n/a" if final_loss is None else f"{final_loss:.4f}"
            run.log.info(f"done: {step} steps, final loss {shown}, val {val}, model {run.output / 'model.pt'}")
            return {"final_loss": final_loss, "val": val, **attack_stats.means()}

        return run.finish(step, results)


if __name__ == "__main__":
    run_command(main)  # a wrong config key, value or file: one `error:` line, exit 2 (utils/cli.py)
