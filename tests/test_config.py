"""Settings: TOML in, CLI overrides on top, errors that name the file and the key."""

from pathlib import Path

import pytest
import tomllib

from unetcell.config import Config, config_from_dict, config_to_toml, load_config, save_config
from unetcell.errors import ConfigError


def test_defaults_are_the_papers_network():
    c = Config()
    assert (c.model.filters, c.model.depth, c.model.padding, c.model.upsampling) == (64, 4, "valid", "transpose")
    assert (c.targets.w0, c.targets.sigma) == (10.0, 5.0)
    assert (c.augment.elastic_grid, c.augment.elastic_sigma) == (3, 10.0)


def test_toml_round_trip(tmp_path):
    c = Config().override("model", filters=8).override("train", epochs=3, learning_rate=1e-4)
    save_config(c, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == c


def test_overrides_skip_options_not_given(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nepochs = 7\n")
    c = load_config(tmp_path / "c.toml").override("train", epochs=None, seed=4)
    assert (c.train.epochs, c.train.seed) == (7, 4)


def test_integers_are_accepted_for_floats(tmp_path):
    (tmp_path / "c.toml").write_text("[targets]\nw0 = 5\n")
    assert load_config(tmp_path / "c.toml").targets.w0 == 5.0


@pytest.mark.parametrize(
    "text, words",
    [
        ("[train]\nepoch = 3\n", ["train.epoch", "c.toml"]),
        ("[trian]\nepochs = 3\n", ["[trian]", "c.toml"]),
        ('[train]\nepochs = "3"\n', ["train.epochs", "int"]),
        ('[model]\npadding = "full"\n', ["model.padding"]),
        ("[train\n", ["not valid TOML"]),
    ],
)
def test_bad_settings_name_the_file_and_key(tmp_path, text, words):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.toml")
    for word in words:
        assert word in str(e.value)


EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_hold_what_they_say_and_survive_a_round_trip(path, tmp_path):
    assert EXPERIMENTS  # the glob found the shipped files
    config = load_config(path)
    for section, settings in tomllib.loads(path.read_text()).items():
        for key, value in settings.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    text = config_to_toml(config)
    assert config_from_dict(tomllib.loads(text)) == config  # every setting written, not only the file's
    (tmp_path / "again.toml").write_text(text)
    assert load_config(tmp_path / "again.toml") == config


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_a_misspelt_key_in_a_shipped_experiment_is_named_with_its_file(path, tmp_path):
    section, settings = next(iter(tomllib.loads(path.read_text()).items()))
    key = next(iter(settings))
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace(f"{key} =", f"{key}s =", 1))
    with pytest.raises(ConfigError, match=rf"{section}\.{key}s") as e:
        load_config(copy)
    assert str(copy) in str(e.value)


def test_three_class_targets_bring_three_classes_and_instances_from_the_interiors():
    from unetcell.config import Config
    from unetcell.errors import ConfigError

    config = Config().override("targets", kind="three-class").for_targets()
    assert (config.model.classes, config.predict.instances) == (3, "interiors")
    assert Config().for_targets() == Config()
    with pytest.raises(ConfigError, match="three-class"):
        Config().override("predict", instances="interiors").for_targets()
    with pytest.raises(ConfigError, match="targets.kind"):
        Config().override("targets", kind="boundary")
