"""Stage 2: train a face-recognition backbone with Partial FC and in-loop CFSM adversarial synthesis.

    torchrun --nproc_per_node=8 train.py configs/arcface_ms1mv2_r50_ours [key=value ...]
    python train.py configs/toy_ours                       # one process, CPU or one GPU

Per step: split the batch (rs_ratio), restyle the synthetic share with an adversarial style code from the frozen
generator, one forward of the mixed batch, Partial FC margin loss, backward, clip, step; log / verify / checkpoint.
The run around the steps (folder, resume, checkpoints, non-finite guard, summary) is `utils.run.scaffold.Run`, shared with
stage 1; `make_train_step` is the step itself, which the benchmarks in bench/ time; `train` reads as the method.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from easydict import EasyDict
from torch.profiler import record_function

from backbones import ChannelOrder, backbone_order, feed_in_order, get_model
from cfsm import load_generator
from cfsm.attack import AttackStats, StyleMix, adversarial_mix, frozen_stats, split_counts
from cfsm.visualize import mix_grid, save_png
from configs.loader import ConfigError, load_config, parse_launch_args, refuse_other_stage, resume_policy
from dataset import build_dataset, ensure_rec, training_loader
from eval.verification_callback import verification_for_run
from losses import margin_loss_from_config
from partial_fc import PartialFC
from utils import checkpoint as ckpt, model_file
from utils.cli import run_command
from utils.data.degrade import Degradation
from utils.distributed import DistEnv, agree_all, agree_any, agree_call, cleanup, init_distributed
from utils.optim import PolyScheduler, build_optimizer, decay_param_groups
from utils.precision import mixed_precision
from utils.run.scaffold import Run, StepPlan, rounded
from utils.run.run_state import Resumed, load_optimizer_keeping_config, load_scheduler_keeping_config
from utils.run.step_state import StepState

Batch = Sequence[tuple[torch.Tensor, torch.Tensor]]  # the gradient_acc (images, labels) micro-batches of one step


@dataclass(frozen=True)
class StepResult:
    """One stage-2 step's outcome. The tensors are read (a device sync) only when logged."""
    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: bool              # agreed by all ranks: a skipped update is skipped everywhere
    clean: torch.Tensor       # the last micro-batch's images, as loaded
    mix: StyleMix | None      # and their CFSM mix (None without a generator)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_launch_args(argv, __doc__, "configs/arcface_ms1mv2_r50_ours")
    cfg = load_config(args.config, args.overrides)
    refuse_other_stage(cfg, "recognition")  # a key of the other stage would be ignored
    env = init_distributed(cfg.device, cfg.dist_timeout_s, args.local_rank)
    try:
        return train(cfg, env)
    finally:
        cleanup(env)


def make_train_step(cfg: EasyDict, env: DistEnv, nets: Stage2, model: torch.nn.Module,
                    style_rng: torch.Generator) -> Callable[[Batch], StepResult]:
    """`train_step(batch) -> StepResult`: one optimizer step of stage 2 over the micro-batches in `batch`.

    `model` is `nets.backbone` itself or its DDP wrapper; `nets.generator=None` is the plain (no CFSM) step."""
    backbone, pfc, generator, optimizer, scaler, autocast = (nets.backbone, nets.pfc, nets.generator, nets.optimizer,
                                                             nets.scaler, nets.autocast)
    amp_dtype = autocast["dtype"] if autocast["enabled"] else None
    step_state = StepState(backbone, pfc)  # BN stats, AdaFace EMA, sampling counter: put back on a skipped step
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def train_step(batch: Batch) -> StepResult:
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
                                          autocast_dtype=amp_dtype, grad_scale=scaler.get_scale() if cfg.fp16 else 1.0,
                                          agree=agree_any,  # precision retries: chosen by all ranks together
                                          search=cfg.style_search)
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
            nets.scheduler.step()
        return StepResult(loss.detach(), grad_norm, finite, images, mix)

    return train_step


@dataclass
class Stage2:
    """Stage 2's networks (generator None: the plain baseline) and their optimizer, schedule and precision state."""
    backbone: torch.nn.Module
    pfc: PartialFC
    generator: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: PolyScheduler
    scaler: torch.amp.GradScaler
    autocast: dict  # keyword arguments of torch.autocast (utils.precision)
    channel: ChannelOrder  # the colour order the backbone sees (BGR: it flips the RGB batches itself)

    def state(self) -> dict:
        return {"backbone": self.backbone.state_dict(), "partial_fc": self.pfc.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state(self, resumed: Resumed) -> None:  # lr, schedule and momentum come from this run's config
        self.backbone.load_state_dict(resumed.state["backbone"])
        self.pfc.load_state_dict(resumed.state["partial_fc"])
        load_optimizer_keeping_config(self.optimizer, resumed.state["optimizer"])
        load_scheduler_keeping_config(self.scheduler, resumed.state["scheduler"])
        self.scaler.load_state_dict(resumed.state["scaler"])


def build_stage2(cfg: EasyDict, env: DistEnv, num_classes: int, synthesis: bool, plan: StepPlan) -> Stage2:
    """The networks on the run's device, their optimizer (the `optimizer` registry), poly schedule over `plan` and
    precision; the frozen generator only when the batch has a synthetic share."""
    if num_classes < env.world_size:
        raise ConfigError(f"num_classes={num_classes} ({cfg.rec}) is smaller than the world size {env.world_size}: "
                          f"every rank must hold at least one class centre")
    channel = backbone_order(cfg)  # first: an explicit order against pretrained_backbone_model's is a config error
    generator = load_generator(cfg.pretrained_synthesis_model).to(env.device) if synthesis else None  # frozen, no DDP
    # RGB batches; a BGR backbone flips them itself (a hook): after synthesis, in the step, the attack and verification
    backbone = feed_in_order(get_model(cfg.network, num_features=cfg.embedding_size, dropout=cfg.dropout,
                                       use_checkpoint=cfg.use_checkpoint), channel.order).to(env.device)
    if cfg.pretrained_backbone_model:
        ckpt.load_state_dict_strict(backbone, model_file.load_state_dict_file(cfg.pretrained_backbone_model),
                                    source=str(cfg.pretrained_backbone_model))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for net in (n for n in (backbone, generator) if n is not None):
        net.to(memory_format=memory_format)
    pfc = PartialFC(margin_loss_from_config(cfg.loss, cfg), cfg.embedding_size, num_classes,
                    sample_rate=cfg.sample_rate, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                    ddp_grad_compensation=env.distributed).to(env.device)  # undo DDP's 1/W: as the reference
    optimizer = build_optimizer(cfg.optimizer, decay_param_groups(backbone, cfg.weight_decay_exclude)
                                + [{"params": pfc.parameters()}], cfg)
    scheduler = PolyScheduler(optimizer, plan.total_steps, plan.warmup_steps, cfg.lr_power)
    _, scaler, autocast = mixed_precision(cfg.fp16, cfg.bf16, env.device.type)
    return Stage2(backbone, pfc, generator, optimizer, scheduler, scaler, autocast, channel)


def train(cfg: EasyDict, env: DistEnv) -> dict | None:
    """Run stage 2 with a loaded config on an initialised process environment; rank 0 returns the summary."""
    with Run(cfg, env, resume_policy("recognition"), log_name="train", tensorboard_prefix="train") as run:
        if run.finished is not None:  # this command already ran to its end: touch nothing
            return run.finished
        ensure_rec(cfg.rec, cfg.generate_toy_data)  # every rank: the toy set is written once, under a file lock
        # ---- inputs first: every missing or wrong file stops us before any work (and before the folder exists) ----
        synthesis = split_counts(cfg.batch_size, cfg.rs_ratio)[1] > 0
        run.require_inputs({"rec": None if cfg.rec == "synthetic" else cfg.rec,
                            "pretrained_synthesis_model": cfg.pretrained_synthesis_model if synthesis else None,
                            "pretrained_backbone_model": cfg.pretrained_backbone_model or None})
        dataset = build_dataset(cfg.rec, augment=True, num_classes=cfg.num_classes, num_image=cfg.num_image)
        dataset.degradation = Degradation.from_config(cfg, seed=cfg.seed)  # None when every degrade_*_prob is 0
        loader = training_loader(dataset, cfg.batch_size, cfg.seed, cfg.num_workers, env.rank, env.world_size,
                                 env.device)
        plan = run.use_loader(loader, dataset, micro_per_step=cfg.gradient_acc)  # the run's step counts
        nets = build_stage2(cfg, env, dataset.num_classes, synthesis, plan)
        run.rngs["style"] = style_rng = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)  # any device
        step = run.resume(nets.load_state, num_classes=dataset.num_classes, num_image=dataset.num_images,
                          channel_order=nets.channel.order)  # resolved (auto -> rgb/bgr): saved, a change refused
        model = run.wrap_ddp(nets.backbone.train(), bucket_cap_mb=32, find_unused_parameters=False)
        train_step = make_train_step(cfg, env, nets, model, style_rng)
        run.start(step, f"{dataset.num_classes} classes, {dataset.num_images} images", nets.autocast, nets.channel)
        # val_targets opened and checked now, before the first step; results go to the run's log (console, train.log)
        verify = verification_for_run(cfg.val_targets, cfg.rec, cfg.val_batch_size, env, run.writer, run.log)

        @run.untimed  # not training: left out of samples/s; rank 0 verifies, an error there stops all ranks
        def run_verification(at_step: int) -> dict:
            return agree_call(env, lambda: verify(at_step, nets.backbone) if verify is not None else {}, "verification")

        # ---- the method: attack, forward, loss, step (make_train_step); then log, verify, checkpoint ----
        result, val, attack_stats = None, {}, AttackStats()  # attack gain, |o*|: TensorBoard cfsm/*, summary means
        for epoch, batch in run.step_batches(loader, step):  # ends at the plan's stop step
            result = train_step(batch)
            if result.mix is not None:
                attack_stats.add(result.mix)
            step += 1
            run.check_finite(step, result.finite, {"loss": result.loss, "grad norm": result.grad_norm})
            log_step(run, step, epoch, result, nets, attack_stats)
            if cfg.verbose and step % cfg.verbose == 0 and step < run.plan.stop_step:
                val = run_verification(step)
            if run.save_due(step):
                run.save(step, nets.state())

        run.final_save(step, state := nets.state(), {k: state[k] for k in ("backbone", "partial_fc")})
        val = run_verification(step) if cfg.val_targets else val
        return run.finish(step, lambda: write_results(run, step, nets, result, val, attack_stats))


def log_step(run: Run, step: int, epoch: int, result: StepResult, nets: Stage2, attack_stats: AttackStats) -> None:
    """Progress and attack statistics (every `frequent` steps), clean vs synthesised faces (`image_every`)."""
    run.log_progress(step, epoch, {"loss": result.loss, "lr": nets.optimizer.param_groups[0]["lr"], "grad_norm":
                                   result.grad_norm, "grad_scale": nets.scaler.get_scale() if run.cfg.fp16 else 1.0})
    if run.writer is not None and run.log_due(step):
        for name, value in attack_stats.window().items():
            run.writer.add_scalar(f"cfsm/{name}", value, step)
    run.add_image(step, "cfsm/clean_vs_synth", lambda: mix_grid(result.clean, result.mix))


def write_results(run: Run, step: int, nets: Stage2, last: StepResult | None, val: dict,
                  attack_stats: AttackStats) -> dict:
    """Rank 0 at the end: `model.pt` (a plain state dict), `clean_vs_synth.png`, the summary (`channel_order`: eval)."""
    final_loss = float(last.loss) if last is not None else None  # None: no step in this invocation
    ckpt.atomic_save(nets.backbone.state_dict(), run.output / "model.pt")
    if last is not None and (grid := mix_grid(last.clean, last.mix)) is not None:  # a first look after any run
        save_png(grid, run.output / "clean_vs_synth.png")
    run.log.info(f"done: {step} steps, final loss {'n/a' if final_loss is None else f'{final_loss:.4g}'}, "
                 f"val {rounded(val)}, model {run.output / 'model.pt'}")
    return {"final_loss": final_loss, "val": val, **attack_stats.means(), "channel_order": nets.channel.order}


if __name__ == "__main__":
    run_command(main)  # a wrong config key, value or file: one `error:` line, exit 2 (utils/cli.py)
