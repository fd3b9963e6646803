"""Toy CFSM-guided training: the toy baseline plus adversarial synthesis with a toy generator (stage 1 output)."""
from pathlib import Path

from easydict import EasyDict as edict

from configs.toy import config as _toy

config = edict(_toy)
# a generator trained by `python train_generator.py configs/cfsm_toy` (the toy pipeline does this for you)
config.pretrained_synthesis_model = str(Path(__file__).resolve().parents[1] / "work_dirs" / "cfsm_toy" /
                                        "generator.pth")
config.rs_ratio = 0.75
# epsilon = alpha = 0.314, k = 1 (the paper's attack): configs/base.py's defaults
