"""Every config key, declared once: default, one-line meaning, the stage that reads it, the rule its value obeys and
what a change does when a run resumes (configs/schema.py says what each column means). Job configs override only
what differs; unknown keys are an error. The value checks, stage sets, resume policies and the key table in
docs/configs.md are all derived from these rows.

Override any key on the command line: `train.py CONFIG key=value ...` (parsed with the type of the default).
"""
import math

from easydict import EasyDict as edict

from backbones import BACKBONES
from backbones.channel_order import CHANNEL_ORDERS
from cfsm.attack import STYLE_SEARCHES
from cfsm.networks import INPUT_SKIPS
from cfsm.stage1 import STYLE_SAMPLINGS
from configs.schema import FREE, INERT, REFUSE, STAGE1, STAGE2, Key, Rule, choices, numbers, pair, within
from losses import MARGIN_LOSSES
from utils.data.degrade import DEGRADE_BOUNDS
from utils.optim import OPTIMIZERS

_PROBABILITY = within(0, 1, note="a probability")


def _degrade_pair(key: str) -> Rule:
    low, high, what = DEGRADE_BOUNDS[key]  # the bounds the augmentation itself enforces
    return pair(low, high, what)


def _nonempty_name(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


# The first key of each section, and the section's heading (docs/configs.md groups the table by it).
SECTIONS = {"rec": "data", "network": "model", "loss": "margin loss and Partial FC", "optimizer": "optimisation",
            "pretrained_synthesis_model": "CFSM guided synthesis (stage 2)",
            "degrade_resize_prob": "hand-crafted degradations (AdaFace-style, utils/data/degrade.py; 0 = off)",
            "output": "run control", "frequent": "monitoring",
            "target": "stage 1: training a CFSM generator (train_generator.py)"}

KEYS = [
    # ---- data ----
    Key("rec", "synthetic", "folder with train.rec/train.idx, an image folder, or \"synthetic\"", path=True),
    Key("num_classes", None, "identities; None = read from the data (a number is checked against it)",
        resume=REFUSE, types=(int, type(None)), rule=within(1, none_ok=True, note="None = read from the data")),
    Key("num_image", None, "training images; None = read from the data (checked when given)",
        resume=REFUSE, types=(int, type(None)), rule=within(1, none_ok=True, note="None = read from the data")),
    Key("generate_toy_data", False, "create the embedded toy data in `rec` when it is missing", resume=INERT),
    Key("num_workers", 2, "DataLoader worker processes per rank", resume=INERT,
        rule=within(0, note="0 = load in the training process")),
    Key("val_targets", [], "names of <rec>/<name>.bin verification sets (or .bin paths)", resume=FREE,
        rule=Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(t, str) and t for t in v),
                  "must be a list of .bin set names or .bin paths, e.g. ['lfw', 'cfp_fp'] (files <rec>/<name>.bin) "
                  "or lfw,cfp_fp on the command line")),
    Key("val_batch_size", 64, "batch size of in-training verification", resume=FREE, rule=within(1)),

    # ---- model ----
    Key("network", "r50", "backbone name (docs/backbones.md)", STAGE2, REFUSE, choices(BACKBONES)),
    Key("embedding_size", 512, "embedding dimension", STAGE2, REFUSE, within(1)),
    Key("dropout", 0.0, "dropout before the embedding layer", STAGE2, rule=within(0, 1, high_open=True)),
    Key("use_checkpoint", False, "activation (gradient) checkpointing in the backbone, saves memory", STAGE2),
    Key("channels_last", False, "run backbone and generator in channels_last memory format", STAGE2),
    Key("channel_order", "auto", "colour order fed to the backbone; auto: the pretrained file's, else the network's "
        "(ir_*: BGR)", STAGE2, REFUSE, choices(CHANNEL_ORDERS), legacy="rgb"),

    # ---- margin loss and Partial FC ----
    Key("loss", "arcface", "margin head", STAGE2, REFUSE, choices(MARGIN_LOSSES)),
    Key("s", 64.0, "logit scale", STAGE2, rule=within(0, low_open=True, note="the logit scale; 64 is usual")),
    Key("m", 0.5, "margin (arcface: angular, cosface/adaface: m)", STAGE2,
        rule=within(0, math.pi, high_open=True, note="the margin; 0.5 for arcface, 0.4 for cosface/adaface")),
    Key("margin_list", (1.0, 0.5, 0.0), "(m1, m2, m3) for loss=\"combined\" (arcface_torch CombinedMarginLoss)",
        STAGE2, rule=Rule(lambda v: numbers(v, 3), "must be three numbers (m1, m2, m3)")),
    Key("adaface_h", 0.333, "AdaFace h (feature-norm concentration)", STAGE2, rule=within(0, low_open=True)),
    Key("adaface_t_alpha", 0.01, "AdaFace EMA rate of the feature-norm statistics", STAGE2,
        rule=within(0, 1, low_open=True, note="EMA rate")),
    Key("sample_rate", 1.0, "Partial FC: share of class centres used per step (positives always kept)", STAGE2,
        REFUSE, within(0, 1, low_open=True)),

    # ---- optimisation ----
    Key("optimizer", "sgd", "optimizer of backbone and class centres", STAGE2, REFUSE, choices(OPTIMIZERS)),
    Key("lr", 0.1, "base learning rate (for the global batch of the config)", STAGE2, rule=within(0, low_open=True)),
    Key("momentum", 0.9, "SGD momentum", STAGE2,
        rule=within(0, 1, high_open=True, note="momentum >= 1 makes SGD diverge")),
    Key("weight_decay", 5e-4, "weight decay", STAGE2, rule=within(0)),
    Key("weight_decay_exclude", False, "True: no decay on backbone biases, norms, ViT pos_embed (arcface_torch "
        "decays all)", STAGE2, REFUSE),
    Key("batch_size", 128, "images per rank per step", resume=REFUSE,
        rule=within(2, note="BatchNorm needs at least 2 images per rank")),
    Key("gradient_acc", 1, "micro-batches accumulated per optimizer step", STAGE2, REFUSE, within(1)),
    Key("num_epoch", 20, "epochs of the full schedule", rule=within(1)),
    Key("warmup_epoch", 0, "linear warm-up epochs (<= num_epoch)", STAGE2, rule=within(0)),
    Key("lr_power", 2.0, "polynomial decay power after warm-up", STAGE2,
        rule=within(0, note="0 = constant lr after warm-up")),
    Key("clip_grad_norm", 5.0, "max L2 norm of the backbone gradient (0 = no clipping)", STAGE2,
        rule=within(0, note="0 = no clipping; a negative max norm would flip the gradient")),
    Key("fp16", False, "mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU (utils.precision)",
        resume=REFUSE),
    Key("bf16", False, "bf16 autocast (no scaler needed); not with fp16"),
    Key("max_nonfinite_steps", 20, "stop after this many consecutive skipped non-finite steps", resume=FREE,
        rule=within(1)),

    # ---- CFSM guided synthesis (stage 2) ----
    Key("pretrained_synthesis_model", None, "CFSM generator file (a dict with 'G_state_dict'); needed when "
        "rs_ratio < 1", STAGE2, types=(str, type(None)), path=True),
    Key("rs_ratio", 1.0, "share of clean images per batch (1.0 = plain training, no synthesis)", STAGE2,
        rule=within(0, 1, note="the share of clean images")),
    Key("epsilon", 0.314, "L-inf radius of the style attack around o0", STAGE2, rule=within(0)),
    Key("alpha", 0.314, "step size of each sign-ascent step on the style code", STAGE2, rule=within(0)),
    Key("k", 1, "number of attack steps (0 = random style)", STAGE2, rule=within(0, note="number of attack steps")),
    Key("style_search", "adversarial", "direction of the k steps: adversarial (gradient sign) | random_sign "
        "(control)", STAGE2, rule=choices(STYLE_SEARCHES)),

    # ---- hand-crafted degradation augmentation, in the data workers; 0 = off ----
    Key("degrade_resize_prob", 0.0, "P(downscale to s x s, s ~ U(degrade_resize_range), then back to 112)", STAGE2,
        rule=_PROBABILITY),
    Key("degrade_resize_range", (16, 64), "(min, max) side in pixels of the downscaled face", STAGE2,
        rule=_degrade_pair("degrade_resize_range")),
    Key("degrade_blur_prob", 0.0, "P(Gaussian blur)", STAGE2, rule=_PROBABILITY),
    Key("degrade_blur_sigma", (0.5, 2.0), "(min, max) blur sigma in pixels", STAGE2,
        rule=_degrade_pair("degrade_blur_sigma")),
    Key("degrade_color_prob", 0.0, "P(colour jitter: brightness, contrast, saturation, per-channel cast)", STAGE2,
        rule=_PROBABILITY),
    Key("degrade_color_strength", 0.25, "each jitter factor ~ U(1 - strength, 1 + strength)", STAGE2,
        rule=within(0, 1, high_open=True, note="factors ~ U(1 - strength, 1 + strength)")),
    Key("degrade_noise_prob", 0.0, "P(additive Gaussian noise)", STAGE2, rule=_PROBABILITY),
    Key("degrade_noise_std", (2.0, 10.0), "(min, max) noise std on the 0..255 scale", STAGE2,
        rule=_degrade_pair("degrade_noise_std")),
    Key("degrade_jpeg_prob", 0.0, "P(JPEG re-encoding)", STAGE2, rule=_PROBABILITY),
    Key("degrade_jpeg_quality", (10, 60), "(min, max) JPEG quality", STAGE2,
        rule=_degrade_pair("degrade_jpeg_quality")),

    # ---- run control ----
    Key("output", None, "run folder; None = work_dirs/<config name>", resume=INERT, types=(str, type(None)),
        path=True),
    Key("seed", 2048, "seeds data order, flips, styles, init", resume=REFUSE, rule=within(0, 2**31, high_open=True)),
    Key("max_steps", 0, "0 = full schedule; > 0 stops after that many optimizer steps", resume=FREE,
        rule=within(0, note="0 = full schedule")),
    Key("save_every", 2000, "checkpoint every N optimizer steps (0 = only at the end)", resume=INERT,
        rule=within(0, note="0 = only at the end")),
    Key("keep_checkpoints", 2, "complete checkpoints kept in output/checkpoints", resume=INERT, rule=within(1)),
    Key("resume", "auto", "False | True (must exist) | \"auto\" (resume when a complete checkpoint exists)",
        resume=INERT, types=(bool, str),
        rule=Rule(lambda v: v in (True, False, "auto"), "must be False, True or \"auto\"")),
    Key("pretrained_backbone_model", None, "fine-tune from: state dict, model.pt, AdaFace/Lightning .ckpt or "
        ".safetensors", STAGE2, FREE, types=(str, type(None)), path=True),
    Key("device", "auto", "auto (CUDA when available) | cpu | cuda", resume=INERT,
        rule=choices(("auto", "cpu", "cuda"))),
    Key("dist_timeout_s", 600, "process-group timeout: a stuck or dead rank fails the job after this",
        resume=INERT, rule=within(0, low_open=True, note="seconds before a stuck rank fails the job")),

    # ---- monitoring ----
    Key("frequent", 10, "console/TensorBoard log every N steps", resume=INERT,
        rule=within(1, note="log every N steps")),
    Key("verbose", 2000, "verification every N steps (and at the end)", resume=FREE,
        rule=within(0, note="verification every N steps; 0 = only at the end")),
    Key("image_every", 500, "clean-vs-synthesized grid every N steps and at the end (0 = never)", resume=INERT,
        rule=within(0, note="0 = never")),
    Key("tensorboard", True, "write TensorBoard event files in output/tensorboard", resume=INERT),
    Key("wandb", False, "also log to Weights & Biases (pip install wandb; docs/monitoring.md)", resume=FREE),
    Key("wandb_project", "cfsm", "wandb project of the run", resume=FREE,
        rule=Rule(_nonempty_name, "must be a non-empty project name")),
    Key("wandb_entity", None, "wandb user or team; None = your default entity", resume=FREE,
        rule=Rule(lambda v: v is None or _nonempty_name(v),
                  "must be a wandb user or team name, or None (your default entity)")),
    Key("wandb_run_suffix", "", "appended to the wandb run name <config name>_<yymmdd_HHMM>", resume=FREE),
    Key("wandb_notes", "", "notes stored with the wandb run", resume=FREE),
    Key("wandb_resume", True, "a resumed run continues its wandb run (id in output/wandb_run.json)", resume=FREE),
    Key("wandb_save_artifacts", False, "upload the final model.pt / generator.pth as a wandb artifact",
        resume=FREE),

    # ---- stage 1: training a CFSM generator (train_generator.py); `rec` is the labelled source, and `batch_size`,
    # ---- `num_epoch`, `output`, `seed`, `resume`, `save_every`, `image_every`, `fp16`/`bf16` apply as above ----
    Key("target", "", "unlabelled target-domain faces: a folder of images or a .txt list of paths", STAGE1,
        path=True),
    Key("id_network", "r50", "architecture of the frozen identity network", STAGE1, REFUSE, choices(BACKBONES)),
    Key("id_model", None, "its weights (InsightFace backbone.pth or a train.py model.pt)", STAGE1,
        types=(str, type(None)), path=True),
    Key("id_embedding_size", 512, "its embedding size", STAGE1, REFUSE, within(1)),
    Key("id_channel_order", "auto", "colour order fed to the identity network; auto: id_model's, else "
        "id_network's", STAGE1, rule=choices(CHANNEL_ORDERS), legacy="rgb"),
    Key("gen_dim", 64, "generator base width (released models: 64)", STAGE1, REFUSE, within(1)),
    Key("gen_n_downsample", 2, "generator down/up-sampling stages", STAGE1, REFUSE, within(0)),
    Key("gen_n_residual", 3, "residual blocks in the generator decoder", STAGE1, REFUSE, within(0)),
    Key("gen_latent_dim", 128, "latent size of the style subspace z = o @ U + mu", STAGE1, REFUSE, within(1)),
    Key("gen_style_dim", 10, "style coefficient dimension (basis count; <= gen_latent_dim)", STAGE1, REFUSE,
        within(1)),
    Key("gen_input_skip", "none", "input handed past the encoder so a small, briefly trained generator can give "
        "x back at o = 0 (none = released; docs/stage1.md)", STAGE1, REFUSE, choices(INPUT_SKIPS)),
    Key("init_generator", None, "start stage 1 from this generator file (shared origin => comparable bases)", STAGE1,
        FREE, types=(str, type(None)), path=True),
    Key("gen_lr", 1e-4, "Adam lr of generator and discriminator", STAGE1, rule=within(0, low_open=True)),
    Key("gen_betas", (0.5, 0.999), "Adam betas", STAGE1,
        rule=Rule(lambda v: numbers(v, 2) and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")),
    Key("gen_lr_decay", 0.0, "lr falls linearly to 0 over the run's last f (0 = constant, as CFSM): a short run ends "
        "settled, not wherever its last batches left it", STAGE1,
        rule=within(0, 1, high_open=True, note="the share of the run over which lr falls to 0")),
    Key("lambda_id_schedule", [(0, 8.0), (5, 5.0), (8, 2.0)], "(start_epoch, lambda_id) steps of the identity loss",
        STAGE1, types=(list, tuple), rule=Rule(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(
            numbers(item, 2) and item[0] >= 0 and item[1] >= 0 for item in v),
            "must be a non-empty list of (start_epoch >= 0, lambda_id >= 0) pairs")),
    Key("id_distance_range", (0.0, 6.0, 0.05, 0.65), "(la, ua, lm, um): target distance d* grows with |o|", STAGE1,
        rule=Rule(lambda v: numbers(v, 4) and v[0] != v[1], "must be four numbers (la, ua, lm, um), la != ua")),
    Key("lambda_rec", 1.0, "weight of the L1 reconstruction at o = 0 (odd iterations)", STAGE1,
        rule=within(0, note="weight of the reconstruction loss")),
    Key("lambda_mode_seeking", 0.0, "weight of a mode-seeking term (0 = off, as CFSM): two styles of one face "
        "should give different faces",
        STAGE1, rule=within(0, note="weight of the mode-seeking term"), renamed_from=("lambda_diversity",)),
    Key("lambda_basis", 0.0, "weight of the basis term on two c*e_i changes' |cos| (0 = off, as CFSM): basis "
        "directions should make different changes", STAGE1,
        rule=within(0, note="weight of the basis term")),
    Key("basis_cos_margin", 0.5, "|cos| of two directions' changes above which the basis term acts", STAGE1,
        rule=within(0, 1, high_open=True, note="a |cos| below 1")),
    Key("style_sampling", "gaussian", "synthesis styles: gaussian (o ~ N(0, I)) | uniform_magnitude "
        "(|o| ~ U(0, ua))", STAGE1, rule=choices(STYLE_SAMPLINGS)),
    Key("dis_dim", 64, "discriminator first-layer width (released discriminators: 64)", STAGE1, REFUSE, within(1)),
    Key("style_report_faces", 32, "source faces of the end-of-run style report (0 = skip)", STAGE1, FREE,
        within(0, note="0 = no style report")),
]

config = edict({key.name: key.default for key in KEYS})
