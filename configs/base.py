"""Every config key with its default. Job configs override only what differs; unknown keys are an error.

Override any key on the command line: `train.py CONFIG key=value ...` (parsed with the type of the default).
"""
from easydict import EasyDict as edict

config = edict()

# ---- data ----
config.rec = "synthetic"                 # data: folder with train.rec/train.idx, an image folder, or "synthetic"
config.num_classes = None                # identities; None = read from the data (a number is checked against it)
config.num_image = None                  # training images; None = read from the data (checked when given)
config.generate_toy_data = False         # create the embedded toy data in `rec` when it is missing
config.num_workers = 2                   # DataLoader worker processes per rank
config.val_targets = []                  # names of <rec>/<name>.bin verification sets
config.val_batch_size = 64               # batch size of in-training verification

# ---- model ----
config.network = "r50"                   # backbone name (backbones.BACKBONE_NAMES)
config.embedding_size = 512              # embedding dimension
config.dropout = 0.0                     # dropout before the embedding layer
config.use_checkpoint = False            # activation (gradient) checkpointing in the backbone, saves memory
config.channels_last = False             # run backbone and generator in channels_last memory format
config.channel_order = "auto"            # auto | rgb | bgr fed to the backbone; auto: the pretrained file's, else network's (ir_*: BGR)

# ---- margin loss and Partial FC ----
config.loss = "arcface"                  # arcface | cosface | combined | adaface
config.s = 64.0                          # logit scale
config.m = 0.5                           # margin (arcface: angular, cosface/adaface: m)
config.margin_list = (1.0, 0.5, 0.0)     # (m1, m2, m3) for loss="combined" (arcface_torch CombinedMarginLoss)
config.adaface_h = 0.333                 # AdaFace h (feature-norm concentration)
config.adaface_t_alpha = 0.01            # AdaFace EMA rate of the feature-norm statistics
config.sample_rate = 1.0                 # Partial FC: share of class centres used per step (positives always kept)

# ---- optimisation ----
config.optimizer = "sgd"                 # sgd | adamw
config.lr = 0.1                          # base learning rate (for the global batch of the config)
config.momentum = 0.9                    # SGD momentum
config.weight_decay = 5e-4               # weight decay
config.weight_decay_exclude = False      # True: no decay on backbone biases, norms, ViT pos_embed (arcface_torch decays all)
config.batch_size = 128                  # images per rank per step
config.gradient_acc = 1                  # micro-batches accumulated per optimizer step
config.num_epoch = 20                    # epochs of the full schedule
config.warmup_epoch = 0                  # linear warm-up epochs
config.lr_power = 2.0                    # polynomial decay power after warm-up
config.clip_grad_norm = 5.0              # max L2 norm of the backbone gradient (0 = no clipping)
config.fp16 = False                      # mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU (utils.precision)
config.bf16 = False                      # bf16 autocast (no scaler needed)
config.max_nonfinite_steps = 20          # stop after this many consecutive skipped non-finite steps

# ---- CFSM guided synthesis (stage 2) ----
config.pretrained_synthesis_model = None  # path to a CFSM generator file (dict with 'G_state_dict')
config.rs_ratio = 1.0                    # share of clean images per batch (1.0 = plain training, no synthesis)
config.epsilon = 0.314                   # L-inf radius of the style attack around o0
config.alpha = 0.314                     # step size of each sign-ascent step on the style code
config.k = 1                             # number of attack steps (0 = random style)
config.style_search = "adversarial"      # direction of the k steps: adversarial (gradient sign) | random_sign (control)

# ---- hand-crafted degradation augmentation (AdaFace-style; utils/degrade.py), in the data workers; 0 = off ----
config.degrade_resize_prob = 0.0         # P(downscale to s x s, s ~ U(degrade_resize_range), then back to 112)
config.degrade_resize_range = (16, 64)   # (min, max) side in pixels of the downscaled face
config.degrade_blur_prob = 0.0           # P(Gaussian blur)
config.degrade_blur_sigma = (0.5, 2.0)   # (min, max) blur sigma in pixels
config.degrade_color_prob = 0.0          # P(colour jitter: brightness, contrast, saturation, per-channel cast)
config.degrade_color_strength = 0.25     # each jitter factor ~ U(1 - strength, 1 + strength)
config.degrade_noise_prob = 0.0          # P(additive Gaussian noise)
config.degrade_noise_std = (2.0, 10.0)   # (min, max) noise std on the 0..255 scale
config.degrade_jpeg_prob = 0.0           # P(JPEG re-encoding)
config.degrade_jpeg_quality = (10, 60)   # (min, max) JPEG quality

# ---- run control ----
config.output = None                     # run folder; None = work_dirs/<config name>
config.seed = 2048                       # seeds data order, flips, styles, init
config.max_steps = 0                     # 0 = full schedule; > 0 stops after that many optimizer steps
config.save_every = 2000                 # checkpoint every N optimizer steps (0 = only at the end)
config.keep_checkpoints = 2              # complete checkpoints kept in output/checkpoints
config.resume = "auto"                   # False | True (must exist) | "auto" (resume when a complete checkpoint exists)
config.pretrained_backbone_model = None  # fine-tune from: state dict, model.pt, AdaFace/Lightning .ckpt or .safetensors
config.device = "auto"                   # auto (CUDA when available) | cpu | cuda
config.dist_timeout_s = 600              # process-group timeout: a stuck or dead rank fails the job after this

# ---- monitoring ----
config.frequent = 10                     # console/TensorBoard log every N steps
config.verbose = 2000                    # verification every N steps (and at the end)
config.image_every = 500                 # clean-vs-synthesized grid every N steps and at the end (0 = never)
config.tensorboard = True                # write TensorBoard event files in output/tensorboard
config.wandb = False                     # also log to Weights & Biases (pip install wandb; docs/monitoring.md)
config.wandb_project = "cfsm"            # wandb project of the run
config.wandb_entity = None               # wandb user or team; None = your default entity
config.wandb_run_suffix = ""             # appended to the wandb run name <config name>_<yymmdd_HHMM>
config.wandb_notes = ""                  # notes stored with the wandb run
config.wandb_resume = True               # a resumed run continues its wandb run (id in output/wandb_run.json)
config.wandb_save_artifacts = False      # upload the final model.pt / generator.pth as a wandb artifact

# ---- stage 1: training a CFSM generator (train_generator.py); `rec` is the labelled source, `batch_size`,
# ---- `num_epoch`, `output`, `seed`, `resume`, `save_every`, `image_every`, `fp16`/`bf16` apply as above ----
config.target = ""                       # unlabelled target-domain faces: a folder of images or a .txt list of paths
config.id_network = "r50"                # architecture of the frozen identity network
config.id_model = None                   # its weights (InsightFace backbone.pth or a train.py model.pt)
config.id_embedding_size = 512           # its embedding size
config.id_channel_order = "auto"         # auto | rgb | bgr fed to the identity network; auto: id_model's, else id_network's
config.gen_dim = 64                      # generator base width (released models: 64)
config.gen_n_downsample = 2              # generator down/up-sampling stages
config.gen_n_residual = 3                # residual blocks in the generator decoder
config.gen_latent_dim = 128              # latent size of the style subspace z = o @ U + mu
config.gen_style_dim = 10                # style coefficient dimension (basis count)
config.gen_input_skip = "none"           # none (released) | color | image | half | lowpass: the input handed past the
                                         # encoder (cfsm/networks.py), so a small generator trained briefly can give o = 0
                                         # back; the toy uses lowpass (docs/research/generator_study.md)
config.init_generator = None             # start stage 1 from this generator file (shared origin => comparable bases)
config.gen_lr = 1e-4                     # Adam lr of generator and discriminator
config.gen_betas = (0.5, 0.999)          # Adam betas
config.gen_lr_decay = 0.0                # 0 = constant (CFSM); f = lr falls linearly to 0 over the run's last f (for a
                                         # short run to end settled; no stage-2 gain measured on the toy)
config.lambda_id_schedule = [(0, 8.0), (5, 5.0), (8, 2.0)]  # (start_epoch, lambda_id) steps of the identity loss
config.id_distance_range = (0.0, 6.0, 0.05, 0.65)  # (la, ua, lm, um): target distance d* grows with |o|
config.lambda_rec = 1.0                  # weight of the L1 reconstruction at o = 0 (odd iterations)
config.lambda_mode_seeking = 0.0         # weight of a mode-seeking term on synthesis iterations (0 = off, as CFSM): for
                                         # styles of one face that differ; no stage-2 gain measured on the toy
config.lambda_basis = 0.0                # weight of the basis term on two c*e_i changes' |cos| (0 = off, as CFSM): for
                                         # basis directions that are different changes; no stage-2 gain measured on the toy
config.basis_cos_margin = 0.5            # |cos| of two directions' changes above which the basis term acts
config.style_sampling = "gaussian"       # synthesis styles: gaussian (o ~ N(0, I)) | uniform_magnitude (|o| ~ U(0, ua))
config.dis_dim = 64                      # discriminator first-layer width (released discriminators: 64)
config.style_report_faces = 32           # source faces of the end-of-run style report (cfsm/style_report.py; 0 = skip)
