"""Stage 1 with the published CFSM settings: WiderFace-like target faces, MS1MV2 source, R50 identity network.

    torchrun --nproc_per_node=8 train_generator.py configs/cfsm_widerface

Generator width 64 (the released models), batch 32 per rank, Adam 1e-4 (0.5, 0.999), lambda_id 8 -> 5 -> 2 over
5 + 3 + 12 epochs. Paths are placeholders: point `rec`, `target` and `id_model` at your data.
"""
from easydict import EasyDict as edict

config = edict()
config.rec = "/train_tmp/faces_emore"                  # labelled source faces (RecordIO folder)
config.target = "/train_tmp/widerface_70k"             # unlabelled target-domain faces, aligned 112x112
config.id_network = "r50"
config.id_embedding_size = 512
config.id_model = "./pretrained/ms1mv2_arcface_r50/backbone.pth"
config.gen_dim = 64
config.gen_n_downsample = 2
config.gen_n_residual = 3
config.gen_latent_dim = 128
config.gen_style_dim = 10
config.gen_lr = 1e-4
config.gen_betas = (0.5, 0.999)
config.batch_size = 32
config.num_epoch = 20
config.lambda_id_schedule = [(0, 8.0), (5, 5.0), (8, 2.0)]
config.id_distance_range = (0.0, 6.0, 0.05, 0.65)
config.fp16 = True
config.num_workers = 4
config.frequent = 50
config.image_every = 1000
