"""Stage 2: train a face-recognition backbone with Partial FC and in-loop CFSM adversarial synthesis.

    torchrun --nproc_per_node=8 train.py configs/arcface_ms1mv2_r50_ours [key=value ...]
    python train.py configs/toy_ours                       # one process, CPU or one GPU

Per step: split the batch (rs_ratio), restyle the synthetic share with an adversarial style code from the frozen
generator, one forward of the mixed batch, Partial FC margin loss, backward, clip, step; log / verify / checkpoint.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from easydict import EasyDict
from torch.nn.parallel import DistributedDataParallel

from backbones import get_model
from cfsm import load_generator
from cfsm.attack import adversarial_mix, frozen_stats, split_counts
from cfsm.visualize import clean_vs_synth_grid
from dataset import CUDAPrefetcher, build_dataset, get_dataloader
from utils.degrade import Degradation
from eval.verification import CallBackVerification
from losses import build_margin_loss
from partial_fc import PartialFC
from utils import checkpoint as ckpt
from utils.config import ConfigError, load_config, parse_launch_args
from utils.distributed import DistEnv, all_ranks_ok, barrier, cleanup, init_distributed
from utils.logging import SpeedMeter, format_eta, setup_logger, summary_writer
from utils.optim import NonFiniteGuard, PolyScheduler, build_optimizer, mixed_precision


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_launch_args(argv, __doc__, "configs/arcface_ms1mv2_r50_ours")
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg.device, cfg.dist_timeout_s, args.local_rank)
    try:
        return train(cfg, env)
    finally:
        cleanup(env)


def train(cfg: EasyDict, env: DistEnv) -> dict | None:
    """Run stage 2 with a loaded config on an initialised process environment; rank 0 returns the summary."""
    start_time = time.time()
    output = Path(cfg.output or Path("work_dirs") / cfg.config_name)
    log = setup_logger(env.rank, output)
    torch.manual_seed(cfg.seed + env.rank)

    # ---- inputs first: every missing or wrong file stops us before any work ----
    if cfg.generate_toy_data:
        from utils.toyface import ensure_toy_data
        ensure_toy_data(cfg.rec)  # safe when several ranks call it at once
    dataset = build_dataset(cfg.rec, augment=True, num_classes=cfg.num_classes, num_image=cfg.num_image)
    dataset.degradation = Degradation.from_config(cfg, seed=cfg.seed)  # None when every degrade_*_prob is 0
    num_classes = dataset.num_classes
    if num_classes < env.world_size:
        raise ConfigError(f"num_classes={num_classes} ({cfg.rec}) is smaller than the world size {env.world_size}: "
                          f"every rank must hold at least one class centre")
    generator = None
    if split_counts(cfg.batch_size, cfg.rs_ratio)[1] > 0:
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

    m1, m2, m3 = cfg.margin_list
    margin = build_margin_loss(cfg.loss, **{
        "arcface": dict(s=cfg.s, margin=cfg.m), "cosface": dict(s=cfg.s, m=cfg.m),
        "combined": dict(s=cfg.s, m1=m1, m2=m2, m3=m3),
        "adaface": dict(m=cfg.m, h=cfg.adaface_h, s=cfg.s, t_alpha=cfg.adaface_t_alpha)}[cfg.loss])
    pfc = PartialFC(margin, cfg.embedding_size, num_classes, sample_rate=cfg.sample_rate,
                    rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                    ddp_grad_compensation=env.distributed).to(env.device)  # undo DDP's 1/W: as the reference

    loader = get_dataloader(dataset, cfg.batch_size, cfg.seed, cfg.num_workers, env.rank, env.world_size,
                            env.device)
    if env.device.type == "cuda":
        loader = CUDAPrefetcher(loader, env.device)  # overlaps host-to-device copies with compute
    batches_per_epoch = loader.sampler.batches_per_epoch
    if batches_per_epoch < cfg.gradient_acc:
        raise ConfigError(f"batch_size={cfg.batch_size} x {env.world_size} ranks leaves {batches_per_epoch} "
                          f"batches per epoch for {dataset.num_images} images in {cfg.rec}: too few")
    total_steps = batches_per_epoch * cfg.num_epoch // cfg.gradient_acc
    warmup_steps = batches_per_epoch * cfg.warmup_epoch // cfg.gradient_acc
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps

    optimizer = build_optimizer(cfg.optimizer, [{"params": backbone.parameters()}, {"params": pfc.parameters()}],
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = PolyScheduler(optimizer, total_steps, warmup_steps, cfg.lr_power)
    amp_dtype, scaler, autocast = mixed_precision(cfg.fp16, cfg.bf16, env.device.type)
    style_rng = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)  # CPU: same draws on any device
    rngs = {"style": style_rng}

    # ---- resume: the full state, so the run continues exactly where it stopped ----
    step, found = 0, ckpt.resume_checkpoint(output, cfg.resume, env.world_size, kind="recognition")
    if found is not None:
        step, directory = found
        state = ckpt.safe_load(ckpt.rank_file(directory, env.rank))
        backbone.load_state_dict(state["backbone"])
        pfc.load_state_dict(state["partial_fc"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"], rngs)
        log.info(f"resumed from {directory} at step {step}")

    model = backbone
    if env.distributed:
        model = DistributedDataParallel(backbone, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                        bucket_cap_mb=32, find_unused_parameters=False)
    backbone.train()
    writer = summary_writer(output, cfg.tensorboard) if env.is_main else None
    verify = CallBackVerification(cfg.val_targets, cfg.rec, batch_size=cfg.val_batch_size, summary_writer=writer) \
        if env.is_main and cfg.val_targets else None
    meter = SpeedMeter(cfg.batch_size * env.world_size * cfg.gradient_acc, last_step, step)
    log.info(f"{cfg.config_name}: {num_classes} classes, {dataset.num_images} images, world size {env.world_size}, "
             f"device {env.device}, {total_steps} steps ({batches_per_epoch} batches/epoch), stopping at {last_step}")

    def save(at_step: int) -> None:
        state = {"backbone": backbone.state_dict(), "partial_fc": pfc.state_dict(), "optimizer":
                 optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "rng": ckpt.capture_rng_state(rngs), "step": at_step}
        ckpt.save_run_checkpoint(output, at_step, env.rank, env.world_size, state, lambda: barrier(env),
                                 cfg.keep_checkpoints, "recognition", {"config": cfg.config_name})

    def run_verification(at_step: int) -> dict:
        results = verify(at_step, backbone) if verify is not None else {}
        barrier(env)  # other ranks wait here (process-group timeout: dist_timeout_s)
        return results

    loss_value, val, guard = float("nan"), {}, NonFiniteGuard(cfg.max_nonfinite_steps)
    micro = step * cfg.gradient_acc
    while step < last_step:
        epoch, start_batch = divmod(micro, batches_per_epoch)
        loader.sampler.set_epoch(epoch, start_batch)
        for images, labels in loader:
            images = images.to(env.device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(env.device, non_blocking=True)
            class_sample = pfc.sample_negatives(labels)  # one negative set per step: attack and update share it

            def attack_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                with frozen_stats(backbone), torch.autocast(**autocast):  # plain module: no DDP sync
                    emb = backbone(x)
                return pfc(emb.float(), y, class_sample=class_sample, update_stats=False)

            mix = None
            if generator is not None:
                mix = adversarial_mix(images, labels, generator, attack_loss, rs_ratio=cfg.rs_ratio,
                                      epsilon=cfg.epsilon, alpha=cfg.alpha, k=cfg.k, rng=style_rng,
                                      autocast_dtype=amp_dtype, grad_scale=scaler.get_scale() if cfg.fp16 else 1.0)
                clean_images, images = images, mix.images
            micro += 1
            boundary = micro % cfg.gradient_acc == 0
            with (model.no_sync() if env.distributed and not boundary else nullcontext()):
                with torch.autocast(**autocast):
                    embeddings = model(images)
                loss = pfc(embeddings.float(), labels, class_sample=class_sample)
                scaler.scale(loss / cfg.gradient_acc).backward()
            if not boundary:
                continue

            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.clip_grad_norm or float("inf"))
            pfc_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pfc.parameters()
                                                             if p.grad is not None] or [torch.zeros(())]))
            finite = all_ranks_ok(env, bool(torch.isfinite(loss) & torch.isfinite(grad_norm) & torch.isfinite(pfc_norm)))
            if finite:
                scaler.step(optimizer)
                scaler.update()
            else:  # skip the update on every rank alike; halve the fp16 scale as GradScaler would
                scaler.update(scaler.get_scale() / 2 if cfg.fp16 else None)
                log.warning(f"step {step + 1}: non-finite loss {loss.item():.4g} / grad norm {grad_norm.item():.4g}: "
                            f"update skipped ({guard.count + 1} in a row)")
            last = ckpt.latest_complete(output) if not finite else None
            guard.update(finite, step + 1, loss.item(), str(last[1]) if last else "none")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            loss_value = loss.item()

            if env.is_main and (step % cfg.frequent == 0 or step == last_step):
                speed, eta = meter.window(step)
                lr, scale = optimizer.param_groups[0]["lr"], scaler.get_scale() if cfg.fp16 else 1.0
                log.info(f"step {step}/{last_step} epoch {epoch} loss {loss_value:.4f} lr {lr:.5f} "
                         f"{speed:.1f} samples/s grad scale {scale:g} ETA {format_eta(eta)}")
                for tag, value in (("loss", loss_value), ("lr", lr), ("samples_per_sec", speed),
                                   ("grad_norm", grad_norm.item()), ("grad_scale", scale)):
                    if writer is not None:
                        writer.add_scalar(f"train/{tag}", value, step)
            if writer is not None and mix is not None and cfg.image_every and step % cfg.image_every == 0 \
                    and mix.synth_index.numel():
                grid = clean_vs_synth_grid(clean_images[mix.synth_index], mix.images[mix.synth_index],
                                           mix.style.norm(dim=1))
                writer.add_image("cfsm/clean_vs_synth", grid, step, dataformats="HWC")
            if cfg.verbose and step % cfg.verbose == 0 and step < last_step:
                val = run_verification(step)
            if cfg.save_every and step % cfg.save_every == 0 and step < last_step:
                save(step)
            if step >= last_step:
                break

    save(step)
    val = run_verification(step) if cfg.val_targets else val
    summary = None
    if env.is_main:
        ckpt.atomic_save(backbone.state_dict(), output / "model.pt")  # plain state dict: InsightFace tools load it
        summary = {"config": dict(cfg), "steps": step,
                   "epochs": micro / batches_per_epoch, "final_loss": loss_value,
                   "samples_per_sec": meter.mean(step), "val": val, "wall_s": time.time() - start_time}
        ckpt.atomic_write_text(json.dumps(summary, indent=1, default=str), output / "summary.json")
        log.info(f"done: {step} steps, final loss {loss_value:.4f}, val {val}, model {output / 'model.pt'}")
        if writer is not None:
            writer.close()
    return summary


if __name__ == "__main__":
    main()
