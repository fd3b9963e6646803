"""ArcFace R50 on MS1MV2 with CFSM guided synthesis (the seed paper's values): the baseline plus synthesis."""
from easydict import EasyDict as edict

from configs.arcface_ms1mv2_r50 import config as _baseline

config = edict(_baseline)
config.pretrained_synthesis_model = "./pretrained_CFSM/WiderFace70K.pth"  # a released generator (CFSM README)
config.rs_ratio = 0.75
# epsilon = alpha = 0.314, k = 1 (the paper's attack): configs/base.py's defaults
