"""Config loading: every key in base.py, job overrides, key=value parsing, unknown keys, validation."""
import re
from pathlib import Path

import pytest

from utils.config import ConfigError, apply_overrides, base_config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_every_base_key_has_a_comment():
    for line in (CONFIG_DIR / "base.py").read_text().splitlines():
        if re.match(r"^config\.\w+ = ", line):
            assert "#" in line, f"base.py key without a one-line comment: {line}"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__",)))
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
                                           ("optimizer=adam", "optimizer")])
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
