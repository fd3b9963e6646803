"""ArcFace R50 on MS1MV2 with CFSM guided synthesis (the seed paper's values)."""
from easydict import EasyDict as edict

config = edict()
config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.network = "r50"
config.loss = "arcface"
config.s = 64.0
config.m = 0.5
config.fp16 = True
config.batch_size = 256
config.lr = 0.1
config.num_epoch = 20
config.warmup_epoch = 2
config.num_workers = 4
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.save_every = 2000
config.pretrained_synthesis_model = "./pretrained_CFSM/WiderFace70K.pth"
config.rs_ratio = 0.75
config.epsilon = 0.314
config.alpha = 0.314
config.k = 1
