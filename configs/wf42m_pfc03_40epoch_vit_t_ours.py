"""ViT-T on WebFace42M (configs/wf42m_pfc03_40epoch_vit_t) with CFSM guided synthesis at the seed paper's values."""
from easydict import EasyDict as edict

from configs.wf42m_pfc03_40epoch_vit_t import config as _baseline

config = edict(_baseline)
config.pretrained_synthesis_model = "./pretrained_CFSM/WiderFace70K.pth"  # a released generator (CFSM README)
config.rs_ratio = 0.75
# epsilon = alpha = 0.314, k = 1 (the paper's attack): configs/base.py's defaults
