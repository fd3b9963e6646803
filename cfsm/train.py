"""Stage 1: train a CFSM generator for a new target domain (unpaired labelled source faces -> unlabelled targets).

    torchrun --nproc_per_node=8 cfsm/train.py configs/cfsm_widerface [key=value ...]
    python cfsm/train.py configs/cfsm_toy            # one process, CPU or one GPU
    python -m cfsm.train configs/cfsm_toy output=work_dirs/my_gen init_generator=work_dirs/cfsm_toy/generator.pth

Per global iteration s: G(x, o) once; the discriminator learns target (1) vs G's output (0); then G learns.
Even s synthesise with o ~ N(0, I) (LSGAN + lambda_id * identity-distance loss + orthogonality penalty), odd s
reconstruct at o = 0 (L1 + penalty). Checkpoints (`output/checkpoints/step_*/rank_0.pt`) and the final
`output/generator.pth` use the released format (`G_state_dict`, `D_state_dict`, `optimizerG_state_dict`,
`optimizerD_state_dict`), so `cfsm.load_generator` and stage-2 `train.py` read them unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python cfsm/train.py`: Python put cfsm/ first on sys.path; the repo root must be there instead so that
    # `cfsm`, `dataset`, `utils` import as packages (and cfsm/train.py does not shadow the root train.py).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from utils import checkpoint as ckpt  # noqa: E402
from utils.config import ConfigError, load_config, parse_launch_args  # noqa: E402
from utils.distributed import DistEnv, all_ranks_ok, barrier, cleanup, init_distributed  # noqa: E402
from utils.logging import SpeedMeter, format_eta, setup_logger, summary_writer  # noqa: E402
from utils.optim import mixed_precision  # noqa: E402

RELEASED_KEYS = ("G_state_dict", "D_state_dict", "optimizerG_state_dict", "optimizerD_state_dict")


def main(argv=None) -> dict | None:
    args = parse_launch_args(argv, __doc__, "configs/cfsm_toy")
    cfg = load_config(args.config, args.overrides)
    validate_stage1(cfg)
    from cfsm.loading import check_stage1_files

    check_stage1_files(cfg)  # every input file, before any process group: a bad one stops each rank at start
    env = init_distributed(cfg.device, cfg.dist_timeout_s, args.local_rank)
    try:
        return train(cfg, env)
    finally:
        cleanup(env)


def validate_stage1(cfg) -> None:
    """Stage-1 key checks that need no data: every bad value stops the run before any process group exists."""
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' = {cfg[key]!r}: {what}")

    from cfsm.stage1 import STYLE_SAMPLINGS, check_lambda_schedule

    need(bool(cfg.target), "target", "stage 1 needs unlabelled target-domain faces (a folder or a .txt list)")
    need(bool(cfg.id_model), "id_model", "stage 1 needs a pretrained identity network (an InsightFace "
         "backbone.pth or train.py's model.pt) matching id_network / id_embedding_size")
    need(Path(str(cfg.id_model)).is_file(), "id_model", "file not found")
    if cfg.init_generator:
        need(Path(str(cfg.init_generator)).is_file(), "init_generator", "file not found")
    for key in ("gen_dim", "gen_latent_dim", "gen_style_dim", "id_embedding_size"):
        need(isinstance(cfg[key], int) and cfg[key] > 0, key, "must be a positive integer")
    for key in ("gen_n_downsample", "gen_n_residual"):
        need(isinstance(cfg[key], int) and cfg[key] >= 0, key, "must be an integer >= 0")
    need(cfg.gen_style_dim <= cfg.gen_latent_dim, "gen_style_dim", f"must be <= gen_latent_dim "
         f"({cfg.gen_latent_dim}): the basis U spans a subspace of the latent space")
    need(cfg.gen_lr > 0, "gen_lr", "must be > 0")
    need(isinstance(cfg.lambda_rec, (int, float)) and cfg.lambda_rec >= 0, "lambda_rec", "must be a number >= 0")
    need(cfg.style_sampling in STYLE_SAMPLINGS, "style_sampling", f"must be one of {STYLE_SAMPLINGS}")
    need(isinstance(cfg.dis_dim, int) and cfg.dis_dim > 0, "dis_dim", "must be a positive integer")
    need(isinstance(cfg.style_report_faces, int) and cfg.style_report_faces >= 0, "style_report_faces",
         "must be an integer >= 0 (0 = no style report)")
    need(len(cfg.gen_betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.gen_betas), "gen_betas",
         "must be two numbers in [0, 1)")
    need(len(cfg.id_distance_range) == 4 and cfg.id_distance_range[0] != cfg.id_distance_range[1],
         "id_distance_range", "must be (la, ua, lm, um) with la != ua")
    try:
        check_lambda_schedule(cfg.lambda_id_schedule)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _worker_init(worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # workers only decode; OpenCV's own threads would fight the training process for cores


def _released_state(G, D, opt_g, opt_d) -> dict:
    return {"G_state_dict": G.state_dict(), "D_state_dict": D.state_dict(),
            "optimizerG_state_dict": opt_g.state_dict(), "optimizerD_state_dict": opt_d.state_dict()}


def build_identity_network(cfg, device: torch.device) -> torch.nn.Module:
    """The frozen face-recognition network f: strict load of `id_model`, eval mode, no parameter gradients."""
    from cfsm.loading import load_identity_network

    return load_identity_network(cfg.id_model, cfg.id_network, cfg.id_embedding_size, device)


def build_generator(cfg):
    from cfsm import Generator

    return Generator(dim=cfg.gen_dim, n_residual=cfg.gen_n_residual, n_downsample=cfg.gen_n_downsample,
                     latent_dim=cfg.gen_latent_dim, style_dim=cfg.gen_style_dim)


def build_discriminator(cfg):
    from cfsm import MultiDiscriminator

    return MultiDiscriminator(dim=cfg.dis_dim)


def init_from_generator_file(path: str, G: torch.nn.Module, D: torch.nn.Module, log) -> None:
    """Start from a released-format file: G strictly (a shared origin makes style bases comparable), D when the
    file has a matching one; optimizer states start fresh (a new target domain is a new optimisation)."""
    from cfsm.loading import init_generator_from_file as load_into

    if load_into(path, G, D):
        log.info(f"generator and discriminator initialised from {path}")
    else:
        log.info(f"generator initialised from {path} (discriminator: fresh, the file has no matching one)")


def _dist_wrap(module: torch.nn.Module, env: DistEnv, find_unused: bool = False) -> torch.nn.Module:
    if not env.distributed:
        return module
    # buffers (AdaIN running stats) are never read or updated: no need to broadcast them every forward
    return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=find_unused)


def train(cfg, env: DistEnv) -> dict | None:
    """Run stage 1 to completion (or `max_steps`); returns the summary on rank 0."""
    from cfsm.stage1 import identity_loss, is_synthesis_step, lambda_id_at, lsgan_loss, sample_style, \
        split_outputs, target_distance
    from cfsm.target_data import TargetBatchSampler, TargetFaceDataset
    from cfsm.visualize import save_png, training_samples_grid
    from dataset import build_dataset, get_dataloader

    start_time = time.time()
    output = Path(cfg.output or Path("work_dirs") / cfg.config_name)
    log = setup_logger(env.rank, output, name="cfsm_train")
    torch.manual_seed(cfg.seed + env.rank)

    # ---- inputs first: every missing or wrong file stops us before any work ----
    if cfg.generate_toy_data:
        from utils.toyface import ensure_toy_data
        ensure_toy_data(cfg.rec)
    source = build_dataset(cfg.rec, augment=True, num_classes=cfg.num_classes, num_image=cfg.num_image)
    target = TargetFaceDataset(cfg.target)
    id_net = build_identity_network(cfg, env.device)
    G, D = build_generator(cfg), build_discriminator(cfg)
    if cfg.init_generator:
        init_from_generator_file(cfg.init_generator, G, D, log)
    G.to(env.device).train()
    D.to(env.device).train()

    loader = get_dataloader(source, cfg.batch_size, cfg.seed, cfg.num_workers, env.rank, env.world_size,
                            env.device)
    bpe = loader.sampler.batches_per_epoch
    target_sampler = TargetBatchSampler(len(target), cfg.batch_size, env.rank, env.world_size, cfg.seed)
    target_loader = DataLoader(target, batch_sampler=target_sampler, num_workers=cfg.num_workers,
                               pin_memory=env.device.type == "cuda", worker_init_fn=_worker_init,
                               persistent_workers=cfg.num_workers > 0)
    total_steps = bpe * cfg.num_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps

    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas))
    _, scaler, autocast = mixed_precision(cfg.fp16, cfg.bf16, env.device.type)
    style_rng = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)  # CPU: same draws on any device
    rngs = {"style": style_rng}

    # ---- resume: the full state; the step count fixes epoch, batch, alternation parity and target stream ----
    step, found = 0, ckpt.resume_checkpoint(output, cfg.resume, env.world_size, kind="cfsm_stage1")
    if found is not None:
        step, directory = found
        main_state = ckpt.safe_load(ckpt.rank_file(directory, 0))
        if int(main_state.get("batches_per_epoch", bpe)) != bpe:
            raise ckpt.CheckpointError(
                f"checkpoint {directory} counts {main_state['batches_per_epoch']} batches per epoch, this run "
                f"{bpe} (rec / batch_size changed?): its step {step} would map to another epoch. Use the original "
                f"settings, or resume=False with init_generator={directory / 'rank_0.pt'}")
        G.load_state_dict(main_state["G_state_dict"])
        D.load_state_dict(main_state["D_state_dict"])
        opt_g.load_state_dict(main_state["optimizerG_state_dict"])
        opt_d.load_state_dict(main_state["optimizerD_state_dict"])
        scaler.load_state_dict(main_state["scaler"])
        own = main_state if env.rank == 0 else ckpt.safe_load(ckpt.rank_file(directory, env.rank))
        ckpt.restore_rng_state(own["rng"], rngs)
        log.info(f"resumed from {directory} at step {step} (epoch {step // bpe}, batch {step % bpe})")

    # At 112x112 the discriminator's third scale normalises a 1x1 map to zeros, so its lower layers get no
    # gradient; DDP must be told to expect unused parameters there (the set depends on the image size).
    G_train, D_train = _dist_wrap(G, env), _dist_wrap(D, env, find_unused=True)
    writer = summary_writer(output, cfg.tensorboard) if env.is_main else None
    meter = SpeedMeter(cfg.batch_size * env.world_size, last_step, step)
    distance_range = tuple(float(v) for v in cfg.id_distance_range)
    log.info(f"{cfg.config_name}: source {source.num_images} images ({cfg.rec}), target {len(target)} images "
             f"({cfg.target}), world size {env.world_size}, device {env.device}, {total_steps} steps "
             f"({bpe} batches/epoch), stopping at {last_step}; G {sum(p.numel() for p in G.parameters()):,} "
             f"params, D {sum(p.numel() for p in D.parameters()):,}, identity net {cfg.id_network}")

    last_saved = -1

    def save(at_step: int) -> None:
        nonlocal last_saved
        rng = ckpt.capture_rng_state(rngs)
        if env.rank == 0:  # G/D/optimizers are replicated: one copy, in the released format plus the run state
            state = {**_released_state(G, D, opt_g, opt_d), "step": at_step, "epoch": at_step // bpe,
                     "batches_per_epoch": bpe, "scaler": scaler.state_dict(), "rng": rng,
                     "gen_config": {"dim": cfg.gen_dim, "n_residual": cfg.gen_n_residual,
                                    "n_downsample": cfg.gen_n_downsample, "latent_dim": cfg.gen_latent_dim,
                                    "style_dim": cfg.gen_style_dim}}
        else:
            state = {"step": at_step, "rng": rng}
        ckpt.save_run_checkpoint(output, at_step, env.rank, env.world_size, state, lambda: barrier(env),
                                 cfg.keep_checkpoints, "cfsm_stage1",
                                 {"config": cfg.config_name, "epoch": at_step // bpe})
        last_saved = at_step

    last = {}  # latest detached loss tensors by name; .item() only when logging (avoids a sync per step)
    nonfinite = 0
    sources = targets = None
    while step < last_step:
        epoch, start_batch = divmod(step, bpe)
        loader.sampler.set_epoch(epoch, start_batch)
        target_sampler.set_range(step, bpe - start_batch)
        lambda_id = lambda_id_at(cfg.lambda_id_schedule, epoch)
        for (sources, _), targets in zip(loader, target_loader):
            sources = sources.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            synthesis = is_synthesis_step(step)
            batch = sources.shape[0]
            if synthesis:
                style = sample_style(batch, G.style_dim, style_rng, cfg.style_sampling,
                                     distance_range[1]).to(env.device)
            else:
                style = torch.zeros(batch, G.style_dim, device=env.device)

            with torch.autocast(**autocast):
                _, fake, regu = G_train(sources, style)

            # -- discriminator: real targets vs this iteration's output, one forward for both (per-sample norms) --
            with torch.autocast(**autocast):
                d_out = split_outputs(D_train(torch.cat([targets, fake.detach()])))
            loss_d = lsgan_loss([o[: targets.shape[0]] for o in d_out], 1.0) + \
                lsgan_loss([o[targets.shape[0]:] for o in d_out], 0.0)
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            ok_d = cfg.fp16 or all_ranks_ok(env, bool(torch.isfinite(loss_d)))
            if ok_d:
                scaler.step(opt_d)  # with fp16 the scaler itself skips non-finite gradients

            # -- generator --
            if synthesis:
                D.requires_grad_(False)  # plain module, frozen: no D gradients, no DDP hooks on this forward
                with torch.autocast(**autocast):
                    loss_gan = lsgan_loss(D(fake), 1.0)
                    with torch.no_grad():
                        emb_src = id_net(sources)
                    # fp32 input: a backbone that switches autocast off inside (fp16=False) gets matching dtypes
                    emb_fake = id_net(fake.float())
                D.requires_grad_(True)
                loss_id = identity_loss(emb_src, emb_fake, target_distance(style, distance_range))
                loss_g = loss_gan + lambda_id * loss_id + regu.float()
                last.update(g_gan=loss_gan.detach(), id=loss_id.detach())
            else:
                loss_rec = (fake.float() - sources.float()).abs().mean()
                loss_g = cfg.lambda_rec * loss_rec + regu.float()
                last.update(rec=loss_rec.detach())
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()  # always: DDP expects a backward after every forward
            ok_g = cfg.fp16 or all_ranks_ok(env, bool(torch.isfinite(loss_g)))
            if ok_g:
                scaler.step(opt_g)
            scaler.update()
            last.update(d=loss_d.detach(), regu=regu.detach().float(), g=loss_g.detach())
            if ok_d and ok_g:
                nonfinite = 0
            else:
                nonfinite += 1
                log.warning(f"step {step + 1}: non-finite loss (D {loss_d.item():.4g}, G {loss_g.item():.4g}): "
                            f"update skipped ({nonfinite} in a row)")
                if nonfinite >= cfg.max_nonfinite_steps:
                    raise RuntimeError(f"{nonfinite} consecutive non-finite stage-1 steps (max_nonfinite_steps="
                                       f"{cfg.max_nonfinite_steps}) at step {step + 1}; lower gen_lr or check data")
            step += 1

            if env.is_main and cfg.frequent and (step % cfg.frequent == 0 or step == last_step):
                speed, eta = meter.window(step)
                values = {k: float(v) for k, v in last.items()}
                log.info(f"step {step}/{last_step} epoch {epoch} lambda_id {lambda_id:g} " +
                         " ".join(f"{k} {v:.4f}" for k, v in values.items()) +
                         f" {speed:.1f} samples/s ETA {format_eta(eta)}")
                if writer is not None:
                    for k, v in values.items():
                        writer.add_scalar(f"stage1/loss_{k}", v, step)
                    writer.add_scalar("stage1/lambda_id", lambda_id, step)
                    writer.add_scalar("stage1/samples_per_sec", speed, step)
            if writer is not None and cfg.image_every and step % cfg.image_every == 0:
                grid = training_samples_grid(G, sources, targets, rng=torch.Generator().manual_seed(step))
                writer.add_image("stage1/source_synth_target", grid, step, dataformats="HWC")
            if step < last_step and (step % bpe == 0 or (cfg.save_every and step % cfg.save_every == 0)):
                save(step)
            if step >= last_step:
                break

    if last_saved != step:
        save(step)
    summary = None
    if env.is_main:
        ckpt.atomic_save(_released_state(G, D, opt_g, opt_d), output / "generator.pth")
        if sources is not None:
            grid = training_samples_grid(G, sources, targets, rng=torch.Generator().manual_seed(step))
            save_png(grid, output / "samples.png")
        losses = {k: float(v) for k, v in last.items()}
        summary = {"config": {k: v for k, v in cfg.items() if _jsonable(v)}, "steps": step,
                   "epochs": step / bpe, "losses": losses, "finite": all(math.isfinite(v) for v in losses.values()),
                   "samples_per_sec": meter.mean(step), "wall_s": time.time() - start_time,
                   "generator": str(output / "generator.pth")}
        if cfg.style_report_faces:
            from cfsm.style_report import report_from_datasets, report_scalars

            summary["style_report"] = report_from_datasets(G, id_net, source, target, cfg.style_report_faces,
                                                           output / "style_report", distance_range)
            log.info(f"style report: {output / 'style_report'}: " + " ".join(
                f"{k} {v:.3f}" for k, v in report_scalars(summary["style_report"]).items()))
            if writer is not None:
                for k, v in report_scalars(summary["style_report"]).items():
                    writer.add_scalar(f"stage1/style_report/{k}", v, step)
        ckpt.atomic_write_text(json.dumps(summary, indent=1), output / "summary.json")
        log.info(f"done: {step} steps, losses {losses}, generator {output / 'generator.pth'}")
        if writer is not None:
            writer.close()
    barrier(env)
    return summary


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


if __name__ == "__main__":
    main()
