"""Config loading: every key in base.py, job overrides, key=value parsing, unknown keys, validation."""
import re
from pathlib import Path

import pytest

from configs.loader import ConfigError, apply_overrides, available_configs, base_config, load_config
from tests.helpers import REPO

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_every_base_key_has_a_comment():
    for line in (CONFIG_DIR / "base.py").read_text().splitlines():
        if re.match(r"^config\.\w+ = ", line):
            assert "#" in line, f"base.py key without a one-line comment: {line}"


@pytest.mark.parametrize("name", available_configs())
def test_every_config_loads(name):
    cfg = load_config(f"configs/{name}")
    assert cfg.config_name == name
    assert set(base_config()) <= set(cfg)


def test_ours_has_seed_values():
    cfg = load_config("configs/arcface_ms1mv2_r50_ours")
    assert (cfg.rs_ratio, cfg.epsilon, cfg.alpha, cfg.k) == (0.75, 0.314, 0.314, 1)
    assert (cfg.network, cfg.loss, cfg.s, cfg.m, cfg.batch_size, cfg.num_epoch, cfg.warmup_epoch) == \
        ("r50", "arcface", 64.0, 0.5, 256, 20, 2)
    assert cfg.fp16 and cfg.sample_rate == 1.0 and cfg.momentum == 0.9 and cfg.weight_decay == 5e-4


def test_overrides_parse_with_the_key_type():
    cfg = load_config("configs/arcface_ms1mv2_r50", ["lr=0.05", "batch_size=64", "fp16=false", "rec=/data/x",
                                                      "resume=auto", "val_targets=['lfw']", "num_classes=10",
                                                      "epsilon=1", "output=none"])
    assert cfg.lr == 0.05 and cfg.batch_size == 64 and cfg.fp16 is False and cfg.rec == "/data/x"
    assert cfg.resume == "auto" and cfg.val_targets == ["lfw"] and cfg.num_classes == 10
    assert isinstance(cfg.epsilon, float) and cfg.epsilon == 1.0 and cfg.output is None


def test_unknown_key_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*|unknown config key 'btch_size'.*batch_size"):
        load_config("configs/arcface_ms1mv2_r50", ["btch_size=3"])


def test_unknown_key_in_job_config_is_an_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.rs_ration = 0.5\n")
    with pytest.raises(ConfigError, match=r"rs_ration.*bad\.py.*rs_ratio"):
        load_config(str(bad))


@pytest.mark.parametrize("override, key", [("rs_ratio=1.5", "rs_ratio"), ("k=-1", "k"), ("resume=maybe", "resume"),
                                           ("batch_size=abc", "batch_size"), ("fp16=maybe", "fp16"),
                                           ("optimizer=adam", "optimizer"),
                                           ("style_search=gradient", "style_search")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/arcface_ms1mv2_r50", [override])


def test_synthesis_without_generator_is_an_error():
    with pytest.raises(ConfigError, match="pretrained_synthesis_model"):
        load_config("configs/arcface_ms1mv2_r50", ["rs_ratio=0.5"])


def test_missing_config_lists_available():
    with pytest.raises(ConfigError, match="available configs:.*arcface_ms1mv2_r50"):
        load_config("configs/no_such_config")


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base_config(), ["lr"])


# ---- registries: the choices and keys of `network`, `loss`, `optimizer` come from the model modules ----
class _RecordingConfig(dict):
    """A config mapping that records which keys were read."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("name", sorted(__import__("losses").MARGIN_LOSSES))
def test_each_margin_loss_reads_exactly_its_declared_keys(name):
    from losses import MARGIN_LOSSES, margin_loss_from_config

    cfg = _RecordingConfig(load_config("configs/arcface_ms1mv2_r50", [f"loss={name}"]))
    head = margin_loss_from_config(name, cfg)
    assert isinstance(head, MARGIN_LOSSES[name])
    assert cfg.read == set(MARGIN_LOSSES[name].config_keys) and cfg.read <= set(base_config())


def test_a_registered_margin_loss_is_a_config_choice(monkeypatch):
    """Adding a head is one registry entry: config validation and train.py's builder pick it up."""
    from losses import MARGIN_LOSSES, CosFace, margin_loss_from_config

    class HalfCosFace(CosFace):
        config_keys = ("s",)

        @classmethod
        def options_from_config(cls, values):
            return dict(s=values["s"], m=0.2)

    monkeypatch.setitem(MARGIN_LOSSES, "halfcos", HalfCosFace)
    cfg = load_config("configs/arcface_ms1mv2_r50", ["loss=halfcos"])
    head = margin_loss_from_config(cfg.loss, cfg)
    assert isinstance(head, HalfCosFace) and head.m == 0.2
    monkeypatch.delitem(MARGIN_LOSSES, "halfcos")
    with pytest.raises(ConfigError, match=r"'loss' = 'halfcos'.*choices: arcface, cosface, combined, adaface"):
        load_config("configs/arcface_ms1mv2_r50", ["loss=halfcos"])


def test_a_registered_optimizer_is_a_config_choice_and_gets_only_its_keys(monkeypatch):
    import torch

    from utils.optim import OPTIMIZERS, OptimizerSpec, build_optimizer

    monkeypatch.setitem(OPTIMIZERS, "rmsprop", OptimizerSpec(torch.optim.RMSprop, {"lr": "lr", "momentum": "momentum"}))
    cfg = load_config("configs/arcface_ms1mv2_r50", ["optimizer=rmsprop", "lr=0.03", "momentum=0.5"])
    opt = build_optimizer(cfg.optimizer, [{"params": [torch.nn.Parameter(torch.zeros(2))]}], config=cfg)
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.defaults["lr"] == 0.03 and opt.defaults["momentum"] == 0.5 and opt.defaults["weight_decay"] == 0
    adamw = build_optimizer("adamw", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], config=cfg)
    assert "momentum" not in adamw.defaults and adamw.defaults["lr"] == 0.03


def test_a_registered_backbone_is_a_config_choice(monkeypatch):
    from backbones import BACKBONES

    monkeypatch.setitem(BACKBONES, "r_mini", BACKBONES["r_tiny"])
    assert load_config("configs/toy", ["network=r_mini", "id_network=r_mini"]).network == "r_mini"
    with pytest.raises(ConfigError, match=r"'network' = 'r_nano'.*choices:.*r_tiny"):
        load_config("configs/toy", ["network=r_nano"])
    with pytest.raises(ConfigError, match=r"'id_network' = 'r_nano'"):
        load_config("configs/toy", ["id_network=r_nano"])


@pytest.mark.parametrize("override, key", [("dropout=0.2", "dropout"), ("use_checkpoint=True", "use_checkpoint")])
def test_a_key_the_network_would_ignore_is_refused(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*network mbf does not use it"):
        load_config("configs/toy", ["network=mbf", override])


def test_unsupported_combined_margins_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"margin_list of loss='combined'.*m1=1.35"):
        load_config("configs/toy", ["loss=combined", "margin_list=(1.35, 0.0, 0.0)"])


# ---- value ranges (issue 10 §7): every numeric key of base.py is checked at load, naming key and value ----
def test_every_numeric_base_key_has_a_range_rule():
    from configs.loader import base_keys

    rows = base_keys()
    numeric = {k for k, row in rows.items() if (isinstance(row.default, (int, float)) and not isinstance(
        row.default, bool)) or isinstance(row.default, (list, tuple)) and row.default
        and all(isinstance(x, (int, float, list, tuple)) for x in row.default)}
    assert numeric | {"num_classes", "num_image"} <= {k for k, row in rows.items() if row.rule is not None}


@pytest.mark.parametrize("override", [
    "clip_grad_norm=-1", "frequent=0", "embedding_size=0", "val_batch_size=0", "momentum=1.0", "momentum=1.5", "s=0",
    "s=-64", "dist_timeout_s=0", "lr=0", "lr=-0.1", "weight_decay=-1e-4", "num_workers=-1", "seed=-1", "m=-0.1",
    "m=3.5", "dropout=1.0", "adaface_t_alpha=0", "adaface_h=0", "lr_power=-1", "max_nonfinite_steps=0",
    "image_every=-1", "verbose=-5", "num_epoch=0", "warmup_epoch=-1", "warmup_epoch=30", "num_classes=0",
    "num_image=0", "gen_lr=0", "gen_betas=(1.0, 0.9)", "gen_dim=0", "id_embedding_size=0", "gen_n_residual=-1",
    "id_distance_range=(1.0, 1.0, 0.0, 0.5)", "lambda_id_schedule=[(0, -1.0)]", "margin_list=(1.0, 0.5)",
    "lambda_rec=-1", "dis_dim=0", "style_report_faces=-1",
    "lr=1e999", "gradient_acc=0", "keep_checkpoints=0", "sample_rate=0", "val_targets=['']"])
def test_out_of_range_values_name_key_and_value(override):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError, match=rf"config key '{key}' = .*: must|config key '{key}'"):
        load_config("configs/arcface_ms1mv2_r50", [override])


def test_clip_grad_norm_zero_still_means_off_and_the_message_says_so():
    assert load_config("configs/toy", ["clip_grad_norm=0"]).clip_grad_norm == 0
    with pytest.raises(ConfigError, match=r"'clip_grad_norm' = -1.0: must be >= 0 \(0 = no clipping"):
        load_config("configs/toy", ["clip_grad_norm=-1"])


def test_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    from configs.loader import base_keys

    PATH_KEYS = [k for k, row in base_keys().items() if row.path]
    assert {"rec", "output", "target", "id_model", "init_generator"} <= set(PATH_KEYS)
    monkeypatch.setenv("HOME", str(tmp_path))
    gen = tmp_path / "g.pth"
    cfg = load_config("configs/toy", [f"{key}=~/x/{key}" for key in PATH_KEYS if key != "pretrained_synthesis_model"]
                      + ["rs_ratio=0.5", "pretrained_synthesis_model=~/g.pth"])
    for key in PATH_KEYS:
        assert cfg[key].startswith(str(tmp_path)) and "~" not in cfg[key], (key, cfg[key])
    assert cfg.pretrained_synthesis_model == str(gen)


@pytest.mark.parametrize("override", ["degrade_resize_prob=1.5", "degrade_resize_range=(64, 16)",
                                      "degrade_jpeg_quality=(0, 60)", "degrade_noise_std=(-1.0, 2.0)"])
def test_degradation_values_are_checked(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("configs/toy", [override])


def test_a_key_of_the_other_stage_is_refused_not_ignored():
    from configs.loader import refuse_other_stage
    stage2 = load_config("configs/toy", ["gen_dim=32", "lambda_rec=2.0"])
    with pytest.raises(ConfigError, match=r"gen_dim=32, lambda_rec=2.0: stage-1 key\(s\) that train.py does not "
                                          r"read \(train_generator.py does\)"):
        refuse_other_stage(stage2, "recognition")
    with pytest.raises(ConfigError, match=r"lr=0.5: stage-2 key\(s\) that train_generator.py does not read"):
        refuse_other_stage(load_config("configs/cfsm_toy", ["lr=0.5"]), "cfsm_stage1")
    for name, kind in (("toy", "recognition"), ("toy_ours", "recognition"), ("arcface_ms1mv2_r50_ours", "recognition"),
                       ("cfsm_toy", "cfsm_stage1"), ("cfsm_widerface", "cfsm_stage1")):
        refuse_other_stage(load_config(f"configs/{name}"), kind)  # the shipped configs hold their own stage's keys


def test_val_targets_take_a_plain_comma_list_of_names_or_bin_paths():
    cfg = load_config("configs/toy", ["val_targets=toy_clean, ~/sets/lfw.bin"])
    assert cfg.val_targets == ["toy_clean", "~/sets/lfw.bin"]
    assert load_config("configs/toy", ["val_targets=['a', 'b']"]).val_targets == ["a", "b"]


def test_the_toy_config_verifies_on_every_toy_set():
    from utils.data.toyface import VERIFICATION_SETS

    assert load_config("configs/toy").val_targets == list(VERIFICATION_SETS)


@pytest.mark.parametrize("body, said", [
    ("config = [1, 2]\n", "`config` is a list ([1, 2]), not a dict of config keys"),
    ("import os\nconfig = os\n", "`config` is the module os, not a dict of config keys"),
    ("raise SystemExit(0)\n", "exits while being loaded (SystemExit(0))"),
    ("import sys\nsys.exit()\n", "exits while being loaded (SystemExit(None))"),
], ids=["list", "module", "SystemExit(0)", "sys.exit()"])
def test_a_config_module_that_is_not_a_config_is_one_error_line(tmp_path, body, said):
    """Through the command: no AttributeError traceback, and a config that exits by itself is no silent success
    (exit 0, no output, no run)."""
    import subprocess
    import sys

    from tests.helpers import REPO, headroom, launch_env

    path = tmp_path / "job.py"
    path.write_text(body)
    proc = subprocess.run([sys.executable, "train.py", str(path), f"output={tmp_path / 'run'}"], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=headroom(60))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: config file {path}") and said in line and "config = dict(" in line, line
    assert not (tmp_path / "run").exists()


# ---- one row per key (configs/base.py, configs/schema.py): every table is derived from the rows ----
def test_the_key_table_in_docs_is_derived_from_base_py():
    from configs.base import KEYS, SECTIONS
    from configs.schema import docs_with_table, key_table_markdown

    doc = (REPO / "docs" / "configs.md").read_text()
    assert docs_with_table(doc, key_table_markdown(KEYS, SECTIONS)) == doc, \
        "docs/configs.md: regenerate the key table with `python -m tools.config_keys --update-docs`"
    assert "| `rs_ratio` | `1.0` | stage 2 |" in doc and "| `gen_input_skip` |" in doc


def test_a_choice_key_is_checked_against_the_code_that_declares_it():
    from cfsm.networks import INPUT_SKIPS
    from cfsm.stage1 import STYLE_SAMPLINGS

    for key, declared in (("gen_input_skip", tuple(INPUT_SKIPS)), ("style_sampling", STYLE_SAMPLINGS)):
        for value in declared:
            assert load_config("configs/cfsm_toy", [f"{key}={value}"])[key] == value
        with pytest.raises(ConfigError, match=rf"config key '{key}' = 'nope': choices: {', '.join(declared)}$"):
            load_config("configs/cfsm_toy", [f"{key}=nope"])


def test_a_row_with_an_unknown_stage_or_resume_rule_is_refused():
    from configs.schema import Key

    with pytest.raises(ValueError, match="'x': stage 'stage 3'"):
        Key("x", 1, "a key", stage="stage 3")
    with pytest.raises(ValueError, match="resume 'maybe' unknown"):
        Key("x", 1, "a key", resume="maybe")
