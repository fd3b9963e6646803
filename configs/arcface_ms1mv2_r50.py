"""Baseline: ArcFace R50 on MS1MV2 (faces_emore), 8 GPUs x 256, 20 epochs, as the CFSM seed without synthesis."""
from easydict import EasyDict as edict

config = edict()
config.rec = "/train_tmp/faces_emore"    # MS1MV2 train.rec/train.idx + lfw/cfp_fp/agedb_30 .bin
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
