"""Toy baseline on the embedded procedural faces: CPU-sized, no downloads (data generated on first use)."""
from pathlib import Path

from easydict import EasyDict as edict

config = edict()
config.rec = str(Path(__file__).resolve().parents[1] / "data" / "toy")
config.generate_toy_data = True
config.network = "r_tiny"                # width-reduced IResNet, same code path as r50
config.embedding_size = 128
config.s = 32.0
config.m = 0.3
config.batch_size = 64
config.lr = 0.1
config.num_epoch = 5                     # 560 steps: at 2 the synthesized share cost as much as it gave (docs/toy_results.md)
config.warmup_epoch = 1
config.fp16 = False
config.num_workers = 1
config.val_targets = ["toy_clean", "toy_target"]   # utils.data.toyface.VERIFICATION_SETS (a test keeps them equal)
config.val_batch_size = 128
config.verbose = 112                     # verification once per epoch (and at the end)
config.frequent = 20
config.image_every = 100
config.save_every = 50                   # a Ctrl-C loses at most 50 steps; the same command resumes
