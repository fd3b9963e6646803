"""Stage 1: train a CFSM generator for a new target domain (unpaired labelled source faces -> unlabelled targets).

    torchrun --nproc_per_node=8 train_generator.py configs/cfsm_widerface [key=value ...]
    python train_generator.py configs/cfsm_toy            # one process, CPU or one GPU
    python -m train_generator configs/cfsm_toy output=work_dirs/my_gen init_generator=work_dirs/cfsm_toy/generator.pth

Per global iteration s: G(x, o) once; the discriminator learns target (1) vs G's output (0); then G learns.
Even s synthesise with o ~ N(0, I) (LSGAN + lambda_id * identity-distance loss + orthogonality penalty), odd s
reconstruct at o = 0 (L1 + penalty). Checkpoints (`output/checkpoints/step_*/rank_0.pt`) and the final
`output/generator.pth` use the released format (`G_state_dict`, `D_state_dict`, `optimizerG_state_dict`,
`optimizerD_state_dict`), so `cfsm.load_generator` and stage-2 `train.py` read them unchanged.
The run around the steps is `utils.run.scaffold.Run`, shared with stage 2; the objectives are `cfsm.stage1`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from easydict import EasyDict

from backbones import identity_order
from cfsm import Generator, MultiDiscriminator
from cfsm.loading import check_stage1_files, init_generator_from_file, load_identity_network, \
    stage1_generator_config
from cfsm.stage1 import ExtraTerms, check_lambda_schedule, identity_loss, is_synthesis_step, lambda_id_at, \
    lr_at, lsgan_loss, sample_style, split_outputs, target_distance
from cfsm.style_report import report_from_datasets, report_scalars
from cfsm.target_data import TargetBatchSampler, TargetFaceDataset
from cfsm.visualize import save_png, training_samples_grid
from configs.loader import ConfigError, load_config, parse_launch_args, refuse_other_stage, resume_policy
from dataset import batch_sampler_loader, build_dataset, ensure_rec, training_loader
from utils import checkpoint as ckpt
from utils.cli import run_command
from utils.distributed import DistEnv, agree_all, agree_call, cleanup, init_distributed
from utils.optim import GENERATOR_OPTIMIZER, build_optimizer
from utils.precision import mixed_precision
from utils.run.scaffold import Run, rounded
from utils.run.run_folder import rank_file
from utils.run.run_state import Resumed, load_optimizer_keeping_config

RELEASED_KEYS = ("G_state_dict", "D_state_dict", "optimizerG_state_dict", "optimizerD_state_dict")
# [((sources, labels), targets)]: one loader batch per step (stage 1 does not accumulate gradients)
Batch = Sequence[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class StepResult:
    """One stage-1 iteration's outcome. The losses are detached tensors, read (a device sync) only when logged."""
    finite: bool                     # both updates finite, agreed by all ranks
    losses: dict[str, torch.Tensor]  # this iteration's: g_gan, id (+ extra terms) on synthesis steps or rec; d, regu, g
    sources: torch.Tensor            # the source faces G restyled, and the target faces D saw (sample grids)
    targets: torch.Tensor


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_launch_args(argv, __doc__, "configs/cfsm_toy")
    cfg = load_config(args.config, args.overrides)
    refuse_other_stage(cfg, "cfsm_stage1")  # a key of the other stage would be ignored
    validate_stage1(cfg)
    env = init_distributed(cfg.device, cfg.dist_timeout_s, args.local_rank)
    try:
        # every input file, before the output folder and any other collective; agreed, because each node reads its
        # own disk: a rank with a missing or bad file raises it, the others stop with it instead of waiting
        agree_call(env, lambda: check_stage1_files(cfg), "the stage-1 input file check")
        return train(cfg, env)
    finally:
        cleanup(env)


def validate_stage1(cfg: EasyDict) -> None:
    """Stage-1 key checks that need no data: every bad value stops the run before any process group exists."""
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' = {cfg[key]!r}: {what}")

    need(bool(cfg.target), "target", "stage 1 needs unlabelled target-domain faces (a folder or a .txt list)")
    need(bool(cfg.id_model), "id_model", "stage 1 needs a pretrained identity network (an InsightFace "
         "backbone.pth or train.py's model.pt) matching id_network / id_embedding_size")
    need(Path(str(cfg.id_model)).is_file(), "id_model", "file not found")
    if cfg.init_generator:
        need(Path(str(cfg.init_generator)).is_file(), "init_generator", "file not found")
    # numeric ranges (gen_*, lambda_*, id_distance_range, ...) are checked with every config: configs/loader.py
    need(cfg.gen_style_dim <= cfg.gen_latent_dim, "gen_style_dim", f"must be <= gen_latent_dim "
         f"({cfg.gen_latent_dim}): the basis U spans a subspace of the latent space")
    need(cfg.gradient_acc == 1, "gradient_acc", "stage 1 takes one batch per step; set gradient_acc=1")
    try:
        check_lambda_schedule(cfg.lambda_id_schedule)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def released_state(G: torch.nn.Module, D: torch.nn.Module, opt_g: torch.optim.Optimizer,
                   opt_d: torch.optim.Optimizer) -> dict:
    return {"G_state_dict": G.state_dict(), "D_state_dict": D.state_dict(),
            "optimizerG_state_dict": opt_g.state_dict(), "optimizerD_state_dict": opt_d.state_dict()}


def make_train_step(cfg: EasyDict, env: DistEnv, nets: Stage1, G_train: torch.nn.Module, D_train: torch.nn.Module,
                    id_net: torch.nn.Module, style_rng: torch.Generator) -> Callable[[Batch, int, float], StepResult]:
    """`train_step(batch, step, lambda_id) -> StepResult`: one stage-1 iteration (the step's parity picks synthesis
    or reconstruction; lambda_id follows the epoch). `G_train`/`D_train` are `nets.G`/`nets.D` or their DDP wrappers."""
    G, D, opt_g, opt_d, scaler, autocast = nets.G, nets.D, nets.opt_g, nets.opt_d, nets.scaler, nets.autocast
    distance_range = tuple(float(v) for v in cfg.id_distance_range)
    extra_terms = ExtraTerms.from_config(cfg)  # beyond the paper, off by default: their rows and losses (cfsm.stage1)

    def train_step(batch: Batch, step: int, lambda_id: float) -> StepResult:
        [((sources, _), targets)] = batch
        sources = sources.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        synthesis = is_synthesis_step(step)
        if synthesis:  # o ~ N(0, I) (style_sampling), for the batch with the extra terms' rows
            extra = extra_terms.batch(sources, lambda rows: sample_style(
                rows, G.style_dim, style_rng, cfg.style_sampling, distance_range[1]), style_rng)
            sources, style = extra.sources, extra.style
        else:  # reconstruction at o = 0
            style = torch.zeros(sources.shape[0], G.style_dim, device=env.device)
        with torch.autocast(**autocast):
            _, fake, regu = G_train(sources, style)

        # -- discriminator: real targets vs this iteration's output, one forward for both (per-sample norms) --
        with torch.autocast(**autocast):
            d_out = split_outputs(D_train(torch.cat([targets, fake.detach()])))
        loss_d = lsgan_loss([o[: targets.shape[0]] for o in d_out], 1.0) + \
            lsgan_loss([o[targets.shape[0]:] for o in d_out], 0.0)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        ok_d = cfg.fp16 or agree_all(env, bool(torch.isfinite(loss_d)))
        if ok_d:
            scaler.step(opt_d)  # with fp16 the scaler itself skips non-finite gradients (DDP-reduced: on all ranks)

        # -- generator: LSGAN + lambda_id * identity + regu (synthesis), lambda_rec * L1 + regu (reconstruction) --
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
            loss_g, extra_losses = extra.added_to(loss_g, fake)  # + the extra terms' weighted sum (0 terms: none)
            losses = {"g_gan": loss_gan.detach(), "id": loss_id.detach(), **extra_losses}
        else:
            loss_rec = (fake.float() - sources.float()).abs().mean()
            loss_g = cfg.lambda_rec * loss_rec + regu.float()
            losses = {"rec": loss_rec.detach()}
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()  # always: DDP expects a backward after every forward
        ok_g = cfg.fp16 or agree_all(env, bool(torch.isfinite(loss_g)))
        if ok_g:
            scaler.step(opt_g)
        scaler.update()
        losses.update(d=loss_d.detach(), regu=regu.detach().float(), g=loss_g.detach())
        return StepResult(ok_d and ok_g, losses, sources, targets)

    return train_step


@dataclass
class Stage1:
    """Stage 1's networks, their optimizers and precision state, and the epoch length the step count maps onto."""
    G: torch.nn.Module
    D: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: dict  # keyword arguments of torch.autocast (utils.precision)
    batches_per_epoch: int

    def state(self, cfg: EasyDict, epoch: int) -> dict:
        """Every rank writes the full state: with a folder per node, each resumes from its own."""
        return {**released_state(self.G, self.D, self.opt_g, self.opt_d), "epoch": epoch,
                "batches_per_epoch": self.batches_per_epoch, "scaler": self.scaler.state_dict(),
                "gen_config": stage1_generator_config(cfg)}

    def load_state(self, resumed: Resumed) -> None:
        """The step count fixes epoch, batch, parity and target stream; the batches per epoch must match."""
        main_state = resumed.state  # this rank's file, checked intact and loaded on every rank together
        if int(main_state.get("batches_per_epoch", self.batches_per_epoch)) != self.batches_per_epoch:
            raise ckpt.CheckpointError(
                f"checkpoint {resumed.directory} counts {main_state['batches_per_epoch']} batches per epoch, "
                f"this run {self.batches_per_epoch} (rec / batch_size changed?): its step {resumed.step} would map "
                f"to another epoch. Use the original settings, or resume=False with "
                f"init_generator={rank_file(resumed.directory, 0)}")
        self.G.load_state_dict(main_state["G_state_dict"])
        self.D.load_state_dict(main_state["D_state_dict"])
        load_optimizer_keeping_config(self.opt_g, main_state["optimizerG_state_dict"])  # gen_lr/betas as configured
        load_optimizer_keeping_config(self.opt_d, main_state["optimizerD_state_dict"])
        self.scaler.load_state_dict(main_state["scaler"])


def build_networks(cfg: EasyDict, env: DistEnv, run: Run) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(G, D) on the run's device in training mode, initialised from `init_generator` when given."""
    G = Generator(**stage1_generator_config(cfg))  # the gen_* keys: cfsm.loading.GENERATOR_CONFIG_KEYS
    D = MultiDiscriminator(dim=cfg.dis_dim)
    if cfg.init_generator:
        with_d = init_generator_from_file(cfg.init_generator, G, D)
        run.log.info(f"generator {'and discriminator ' if with_d else ''}initialised from {cfg.init_generator}"
                     f"{'' if with_d else ' (discriminator: fresh, the file has no matching one)'}")
    return G.to(env.device).train(), D.to(env.device).train()


def build_stage1(cfg: EasyDict, env: DistEnv, G: torch.nn.Module, D: torch.nn.Module,
                 batches_per_epoch: int) -> Stage1:
    """G and D with their optimizers (`utils.optim.GENERATOR_OPTIMIZER`: gen_lr, gen_betas) and precision."""
    opt_g = build_optimizer(GENERATOR_OPTIMIZER, G.parameters(), cfg)
    opt_d = build_optimizer(GENERATOR_OPTIMIZER, D.parameters(), cfg)
    _, scaler, autocast = mixed_precision(cfg.fp16, cfg.bf16, env.device.type)
    return Stage1(G, D, opt_g, opt_d, scaler, autocast, batches_per_epoch)


def train(cfg: EasyDict, env: DistEnv) -> dict | None:
    """Run stage 1 to completion (or `max_steps`); returns the summary on rank 0."""
    with Run(cfg, env, resume_policy("cfsm_stage1"), log_name="train", tensorboard_prefix="stage1",
             save_each_epoch=True) as run:
        if run.finished is not None:  # this command already ran to its end: touch nothing
            return run.finished
        ensure_rec(cfg.rec, cfg.generate_toy_data)  # every rank: the toy set is written once, under a file lock
        # ---- inputs first: every missing or wrong file stops us before any work (and before the folder exists) ----
        run.require_inputs({"rec": None if cfg.rec == "synthetic" else cfg.rec, "target": cfg.target or None,
                            "id_model": cfg.id_model or None, "init_generator": cfg.init_generator or None})
        source = build_dataset(cfg.rec, augment=True, num_classes=cfg.num_classes, num_image=cfg.num_image)
        target = TargetFaceDataset(cfg.target)
        # G's images are RGB; an identity network trained on BGR (AdaFace) flips them itself, right before it
        id_order = identity_order(cfg)
        id_net = load_identity_network(cfg.id_model, cfg.id_network, cfg.id_embedding_size, env.device,
                                       channel_order=id_order.order)
        G, D = build_networks(cfg, env, run)
        loader = training_loader(source, cfg.batch_size, cfg.seed, cfg.num_workers, env.rank, env.world_size,
                                 env.device)
        batches_per_epoch = run.use_loader(loader, source).batches_per_epoch
        # the target stream is addressed by global step: a resumed run reads what an uninterrupted one would
        target_sampler = TargetBatchSampler(len(target), cfg.batch_size, env.rank, env.world_size, cfg.seed)
        target_loader = batch_sampler_loader(target, target_sampler, cfg.num_workers, env.device)
        nets = build_stage1(cfg, env, G, D, batches_per_epoch)
        run.rngs["style"] = style_rng = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)  # any device

        step = run.resume(nets.load_state, num_classes=source.num_classes, num_image=source.num_images,
                          id_channel_order=id_order.order)  # resolved (auto -> rgb/bgr): a change is listed
        # At 112x112 the discriminator's third scale normalises a 1x1 map to zeros, so its lower layers get no
        # gradient; DDP must be told to expect unused parameters there (the set depends on the image size).
        # Buffers (AdaIN running stats) are never read or updated: no need to broadcast them every forward.
        G_train = run.wrap_ddp(G, broadcast_buffers=False, find_unused_parameters=False)
        D_train = run.wrap_ddp(D, broadcast_buffers=False, find_unused_parameters=True)
        train_step = make_train_step(cfg, env, nets, G_train, D_train, id_net, style_rng)
        # the stage-1 terms this run optimises (cfsm.stage1)
        objectives = ["lsgan", "identity", "rec"] + ExtraTerms.from_config(cfg).names
        run.start(step, f"source {source.num_images} images ({cfg.rec}), target {len(target)} images ({cfg.target})",
                  nets.autocast, network=f"CFSM generator (G {sum(p.numel() for p in G.parameters()):,} params, D "
                  f"{sum(p.numel() for p in D.parameters()):,}; identity net {cfg.id_network})",
                  loss="+".join(objectives), channel=id_order, fed="identity net")

        def open_epoch(epoch: int, first_batch: int):
            loader.sampler.set_epoch(epoch, first_batch)
            target_sampler.set_range(epoch * batches_per_epoch + first_batch, batches_per_epoch - first_batch)
            return zip(loader, target_loader)

        # ---- the method: D step, G step (make_train_step); then log, pictures, checkpoint ----
        latest, result = {}, None  # newest value of every loss (synthesis and reconstruction steps alternate)
        for epoch, batch in run.step_batches(loader, step, open_epoch):
            lambda_id = lambda_id_at(cfg.lambda_id_schedule, epoch)
            lr = lr_at(step, run.plan.stop_step, cfg.gen_lr, cfg.gen_lr_decay)
            for group in (*nets.opt_g.param_groups, *nets.opt_d.param_groups):
                group["lr"] = lr
            result = train_step(batch, step, lambda_id)
            latest.update(result.losses)
            step += 1
            run.check_finite(step, result.finite, {"loss D": latest["d"], "loss G": latest["g"]})
            run.log_progress(step, epoch, {"lambda_id": lambda_id, "gen_lr": lr,
                                           **{f"loss_{k}": v for k, v in latest.items()}})
            run.add_image(step, "stage1/source_synth_target", lambda: samples_grid(G, result, step))
            if run.save_due(step):
                run.save(step, nets.state(cfg, run.plan.epoch_of(step)))

        run.final_save(step, nets.state(cfg, run.plan.epoch_of(step)), {"G": G.state_dict(), "D": D.state_dict()})
        return run.finish(step, lambda: {**write_results(cfg, run, step, nets, id_net, source, target, latest, result),
                                         "id_channel_order": id_order.order})


def samples_grid(G: torch.nn.Module, result: StepResult, step: int):
    """Source, synthesised and target faces of a step's batch, as one HWC picture (styles seeded by the step)."""
    return training_samples_grid(G, result.sources, result.targets, rng=torch.Generator().manual_seed(step))


def write_results(cfg: EasyDict, run: Run, step: int, nets: Stage1, id_net: torch.nn.Module, source, target,
                  latest: dict, last: StepResult | None) -> dict:
    """Rank 0 at the end: `generator.pth` (the released format), `samples.png`, the style report when asked for,
    and the summary's stage-1 entries."""
    ckpt.atomic_save(released_state(nets.G, nets.D, nets.opt_g, nets.opt_d), run.output / "generator.pth")
    if last is not None:
        save_png(samples_grid(nets.G, last, step), run.output / "samples.png")
    losses = {k: float(v) for k, v in latest.items()}
    run.log.info(f"done: {step} steps, losses {rounded(losses)}, generator {run.output / 'generator.pth'}")
    out = {"losses": losses, "finite": all(math.isfinite(v) for v in losses.values()),
           "generator": str(run.output / "generator.pth")}
    if cfg.style_report_faces:  # is the style space controllable? (cfsm/style_report.py)
        out["style_report"] = report_from_datasets(nets.G, id_net, source, target, cfg.style_report_faces,
                                                   run.output / "style_report", cfg.id_distance_range)
        scalars = report_scalars(out["style_report"])
        run.log.info("style report: " + " ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        if run.writer is not None:
            for k, v in scalars.items():
                run.writer.add_scalar(f"stage1/style_report/{k}", v, step)
    return out


if __name__ == "__main__":
    run_command(main)  # a wrong config key, value or file: one `error:` line, exit 2 (utils/cli.py)
