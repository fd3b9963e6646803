"""AdaFace R100 on WebFace12M with CFSM guided synthesis: AdaFace's own IR-101 (`ir_101`, the network of the released
AdaFace+CFSM model), so `pretrained_backbone_model=` that `.ckpt` fine-tunes it and the eval commands read it.

AdaFace's network, not InsightFace's iresnet100: AdaFace's IR layout (`input_layer` / `body.N` / `output_layer`) and
its dropout 0.4 before the embedding layer. AdaFace trains on BGR: `channel_order` stays `auto`, so the backbone is fed
BGR (flipped after CFSM synthesis, right before it), as the released model was trained; the run's summary.json
records it for the eval commands (docs/backbones.md, "Channel order in training")."""
from easydict import EasyDict as edict

config = edict()
config.rec = "/train_tmp/WebFace12M"
config.num_classes = 617970
config.num_image = 12720066
config.network = "ir_101"
config.dropout = 0.4  # AdaFace's output_layer dropout
config.loss = "adaface"
config.m = 0.4
config.s = 64.0
config.adaface_h = 0.333
config.adaface_t_alpha = 0.01
config.fp16 = True
config.batch_size = 128
config.lr = 0.1
config.num_epoch = 20
config.warmup_epoch = 1
config.sample_rate = 0.3
config.num_workers = 4
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.pretrained_synthesis_model = "./pretrained_CFSM/WiderFace70K.pth"
config.rs_ratio = 0.75
# epsilon = alpha = 0.314, k = 1 (the paper's attack): configs/base.py's defaults
