"""ViT-T on WebFace42M, Partial FC 0.3, 40 epochs: arcface_torch's wf42m_pfc03_40epoch_8gpu_vit_t (8 GPUs x 512).

Same recipe as arcface_torch train_v2.py: CosFace through CombinedMarginLoss (1.0, 0.0, 0.4), AdamW lr 1e-3 with
weight decay 0.1 on every parameter, 4 warm-up epochs then linear decay (its PolynomialLRWarmup has power 1),
gradient norm clipped at 5, fp16. Its 64-GPU variant differs only in batch_size=384.
"""
from easydict import EasyDict as edict

config = edict()
config.rec = "/train_tmp/WebFace42M"     # train.rec/train.idx (no verification .bin files in WebFace42M)
config.num_classes = 2059906
config.num_image = 42474557
config.network = "vit_t_dp005_mask0"    # drop path 0.05, no patch masking
config.embedding_size = 512
config.loss = "combined"
config.margin_list = (1.0, 0.0, 0.4)     # cos(theta) - 0.4: CosFace
config.s = 64.0
config.sample_rate = 0.3
config.fp16 = True
config.optimizer = "adamw"
config.lr = 1e-3
config.weight_decay = 0.1
config.weight_decay_exclude = False      # arcface_torch decays everything; True spares biases, norms, pos_embed
config.batch_size = 512
config.num_epoch = 40
config.warmup_epoch = 4                  # num_epoch // 10
config.lr_power = 1.0
config.clip_grad_norm = 5.0
config.val_targets = []
config.verbose = 2000
config.save_every = 2000
