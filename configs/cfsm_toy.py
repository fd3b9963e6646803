"""Toy stage 1: a small CFSM generator for the toy target style (surveillance-like degradations), on 2 CPU cores.

    python train_generator.py configs/cfsm_toy   # needs the toy baseline's model.pt (python train.py configs/toy)

Source = the toy training .rec (generated on first use), target = its unlabelled `target_faces`, identity network =
the toy baseline (r_tiny, 128-d). A narrow generator (gen_dim 16) and a step budget (max_steps) instead of epochs:
one toy epoch at batch 8 is 900 steps, far beyond a few CPU minutes.

The toy recipe (measured by `tools/style_report.py`, docs/research/toy_record.md): the input handed past the
encoder at half resolution (`gen_input_skip="half"`: the released architecture cannot reconstruct toy faces at o = 0
in a few hundred steps, and half resolution starts the decoder at the target style's sharpness), reconstruction
weighted 10x, styles sampled with |o| ~ U(0, 6) so the identity term (weight 15) has to make distance grow with |o|,
a mode-seeking term so that styles of one face differ, a basis term that stops the ten directions collapsing into
one change at different strengths (|cos| of two directions' changes kept <= 0.8), a discriminator of width 16 (the
released width 64 is ten times the toy generator), lr 1e-3 falling linearly to 0 over the second half of the steps.
"""
from pathlib import Path

from easydict import EasyDict as edict

_ROOT = Path(__file__).resolve().parents[1]

config = edict()
config.rec = str(_ROOT / "data" / "toy")
config.generate_toy_data = True
config.target = str(_ROOT / "data" / "toy" / "target_faces")
config.id_network = "r_tiny"
config.id_embedding_size = 128
config.id_model = str(_ROOT / "work_dirs" / "toy" / "model.pt")  # written by `python train.py configs/toy`
config.gen_dim = 16
config.batch_size = 8
config.num_epoch = 1
config.max_steps = 400
config.lambda_id_schedule = [(0, 15.0)]   # at 5 the distance reached only ~0.35 at |o| = 6 (d* 0.65) in 400 steps
config.num_workers = 1
config.save_every = 100
config.frequent = 20
config.image_every = 60
config.fp16 = False
config.gen_lr = 1e-3                     # faster than the published 1e-4: the toy budget is a few hundred steps
config.gen_input_skip = "half"           # the input at half resolution, added before tanh (docs/research/toy_record.md)
config.lambda_diversity = 0.05           # mode seeking: without it styles drift to one look (distinctness 0.19)
config.lambda_basis = 1.0                # mode seeking alone left |cos| 0.94-0.99 between directions on seeds 1, 4
config.basis_cos_margin = 0.8            # a floor that acts only on collapse: 0.5 cost the distance curve
config.gen_lr_decay = 0.5                # lr falls to 0 over the second half (seed 2048: 6/7 -> 7/7 goals)
config.lambda_rec = 10.0                 # o = 0 must give the input back (identity distance at o = 0 <= 0.15)
config.style_sampling = "uniform_magnitude"  # |o| ~ U(0, 6): the identity target d*(|o|) spans its range each batch
config.dis_dim = 16                      # the released width 64 is a 8.3M-parameter D against a 0.85M toy G
