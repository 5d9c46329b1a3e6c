import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meduet.cli import main
from pydantic import ValidationError

from meduet.config import ConfigError, MeduetConfig, Paths, config_from_dict, config_hash, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_repository_params_are_valid():
    cfg = load_config(REPO / "params.yaml")
    assert [d.domain for d in cfg.harmonize.datasets] == [s.name for s in cfg.demo_data.sites]


@pytest.mark.parametrize("data,message", [
    ({"harmonize": {"target_spacing": [1.5, -1, 1.5]}}, r"harmonize.target_spacing.1 = -1: Input should be greater than 0"),
    ({"harmonize": {"workerz": 2}}, r"harmonize.workerz: unknown key \(value 2\)"),
    ({"nonsense": {}}, r"nonsense: unknown key"),
    ({"harmonize": {"intensity": {"a_min": 300, "a_max": 100}}}, r"a_max \(100.0\) must be greater than a_min"),
    ({"harmonize": {"datasets": [{"name": "x", "root": "a", "domain": "s"}, {"name": "x", "root": "b", "domain": "s"}]}},
     r"dataset names must be unique"),
    ({"harmonize": {"datasets": [{"name": "bad name!", "root": "a", "domain": "s"}]}}, r"harmonize.datasets.0.name"),
    ({"vae": {"crop_size": [32, 30, 32]}}, r"vae.crop_size = \[32, 30, 32\]: .*multiple of 4"),
    ({"storage": {"dvc_remote_url": "bucket/path"}}, r"storage.dvc_remote_url = 'bucket/path'"),
    ({"evaluate_synthesis": {"ssim_window": 8}}, r"evaluate_synthesis.ssim_window = 8: .*must be odd"),
])
def test_config_errors_name_file_key_and_value(tmp_path, data, message):
    path = _params(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("text,message", [
    ("harmonize: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_malformed_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_params(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = _params(tmp_path, {})
    cfg = load_config(path, ["harmonize.workers=3", "harmonize.target_spacing=[2, 2, 3]", "storage.s3_region=eu-1"])
    assert cfg.harmonize.workers == 3 and cfg.harmonize.target_spacing == (2.0, 2.0, 3.0)
    assert cfg.storage.s3_region == "eu-1"
    with pytest.raises(ConfigError, match="expects key.path=value"):
        load_config(path, ["harmonize.workers"])
    with pytest.raises(ConfigError, match="harmonize.workers = 0"):
        load_config(path, ["harmonize.workers=0"])


def test_show_round_trips_and_hash_is_stable(tmp_path):
    cfg = MeduetConfig()
    again = load_config(_params(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert config_hash(again.harmonize) == config_hash(cfg.harmonize)
    assert config_hash(cfg.harmonize) != config_hash(cfg.harmonize.model_copy(update={"workers": 9}))


def test_paths_resolve_relative_to_the_params_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUET_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    paths = Paths.resolve(MeduetConfig(), tmp_path)
    assert paths.harmonized == tmp_path / "data" / "harmonized"
    assert paths.local("s3://b/x") == "s3://b/x" and paths.local("rel") == tmp_path / "rel"
    assert paths.s3_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


def test_cli_config_commands(tmp_path, capsys):
    path = _params(tmp_path, {"harmonize": {"workers": 4}})
    assert main(["config", "validate", "--params", str(path)]) == 0
    assert main(["config", "show", "--params", str(path), "--set", "harmonize.fail_fast=true"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out.split("OK\n", 1)[-1])
    assert shown["harmonize"]["workers"] == 4 and shown["harmonize"]["fail_fast"] is True
    assert main(["config", "validate", "--params", str(_params(tmp_path, {"bad": 1}))]) == 2
    assert "bad: unknown key" in capsys.readouterr().err


def test_help_everywhere():
    for args in (["--help"], ["harmonize", "--help"], ["config", "show", "--help"]):
        done = subprocess.run([sys.executable, "-m", "meduet.cli", *args], capture_output=True, encoding="utf-8")
        assert done.returncode == 0 and "usage: meduet" in done.stdout


@pytest.mark.parametrize("value", ["models/autoencoder.pt", "/opt/weights/autoencoder.pt", "data/pretrained/../x.pt"])
def test_untracked_pretrained_weights_are_refused_with_the_reason(value):
    with pytest.raises(ConfigError, match=r"vae.pretrained = .*must lie under data/pretrained/ .*reruns the stage"):
        config_from_dict({"vae": {"pretrained": value}})
    for accepted in ("data/pretrained/autoencoder.pt", "s3://bucket/maisi/autoencoder.pt"):
        assert config_from_dict({"vae": {"pretrained": accepted}}).vae.pretrained == accepted


def test_pretrain_recipes_fill_unset_switches_and_explicit_ones_win() -> None:
    from meduet.config import RECIPES, PretrainConfig

    faithful = PretrainConfig.model_validate({"batch_size": 16, "method": {"recipe": "faithful"}}).method
    assert {k: getattr(faithful, k) for k in RECIPES["faithful"]} == RECIPES["faithful"]
    mixed = PretrainConfig.model_validate({"batch_size": 16, "method": {"recipe": "faithful", "grl_ramp": True}})
    assert mixed.method.grl_ramp and mixed.method.clean_adversary == 0.0
    assert PretrainConfig(batch_size=4).method.crops_per_volume == 2  # the recipe's 4 shrinks to fit the batch
    improved = PretrainConfig(batch_size=16).method  # the default: the best measured configuration
    assert improved.recipe == "improved" and improved.clean_adversary == 1.0 and improved.crops_per_volume == 4
    assert not improved.cross_site_partners and improved.site_alignment == 0.0 and improved.ema_horizon is None
    with pytest.raises(ValidationError, match="multiple of 2 x method.crops_per_volume"):
        PretrainConfig.model_validate({"batch_size": 4, "method": {"crops_per_volume": 4}})


def test_grl_ramp_and_ema_horizon_schedules() -> None:
    from meduet.config import PretrainConfig
    from meduet.engine.pretrain_training import loss_weights, teacher_momentum

    cfg = PretrainConfig.model_validate({"batch_size": 16, "steps": 1000, "method": {"recipe": "all"}})
    assert loss_weights(cfg, 0).grl_lambda == 0.0
    assert loss_weights(cfg, 1000).grl_lambda == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert loss_weights(cfg, 100).grl_lambda == pytest.approx(2 / (1 + math.exp(-1)) - 1)
    assert teacher_momentum(cfg, 0) == pytest.approx(1 - 1 / 10)  # horizon 1 % of 1000 steps
    assert teacher_momentum(cfg, 1000) == pytest.approx(1 - 1 / 100)  # 10 %
    faithful = PretrainConfig.model_validate({"batch_size": 16, "steps": 1000, "method": {"recipe": "faithful"}})
    assert loss_weights(faithful, 0).grl_lambda == 1.0 and loss_weights(faithful, 0).clean_adversary == 0.0
    assert teacher_momentum(faithful, 0) == pytest.approx(0.997)
