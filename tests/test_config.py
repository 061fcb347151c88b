import pytest

from gpt_jax import config
from gpt_jax.config import ConfigError, ModelConfig

REPO_CONFIGS = config.REPO_ROOT / "configs"


def test_recipes_load():
    cfg = config.load(REPO_CONFIGS / "shakespeare_char.toml")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (6, 6, 384, 256)
    assert (cfg.train.batch_size, cfg.train.learning_rate, cfg.train.max_iters, cfg.model.dropout) == (64, 1e-3, 5000, 0.2)
    config.load(REPO_CONFIGS / "shakespeare_char_cpu.toml")


def test_overrides_are_typed():
    cfg = config.load(REPO_CONFIGS / "shakespeare_char.toml",
                      config.parse_overrides(["--n_layer=2", "--learning_rate=3e-4", "--bias=true", "--out_dir=x"]))
    assert cfg.model.n_layer == 2 and cfg.train.learning_rate == 3e-4 and cfg.model.bias is True
    assert cfg.train.out_dir == "x"
    assert config.load(overrides={"vocab_size": "none"}).model.vocab_size is None


@pytest.mark.parametrize("overrides, message", [
    ({"n_layr": "2"}, "unknown config key 'n_layr': did you mean 'n_layer'?"),
    ({"n_layer": "two"}, "--n_layer=two: expected int"),
    ({"dropout": "x"}, "--dropout=x: expected float"),
    ({"bias": "maybe"}, "--bias=maybe: expected bool"),
    ({"n_embd": "100", "n_head": "3"}, "n_embd (100) must be divisible by n_head (3)"),
    ({"n_layer": "0"}, "n_layer must be positive"),
    ({"block_size": "-4"}, "block_size must be positive"),
    ({"dropout": "1.0"}, "dropout must be in [0, 1)"),
    ({"batch_size": "0"}, "batch_size must be positive"),
    ({"dtype": "float8"}, "dtype must be auto, float32 or bfloat16"),
])
def test_bad_values_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        config.load(overrides=overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layer = 4\nn_head = = 2\n")
    with pytest.raises(ConfigError, match="TOML syntax error.*line 2"):
        config.load(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("learning_rat = 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        config.load(typo)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('n_layer = "four"\n')
    with pytest.raises(ConfigError, match="n_layer = 'four': expected int"):
        config.load(wrong)


def test_model_config_validates_directly():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(n_embd=10, n_head=3)
    with pytest.raises(ConfigError, match="vocab_size must be positive"):
        ModelConfig(vocab_size=0)


def test_help_lists_every_key():
    text = config.help_text()
    for key in config.fields():
        assert f"--{key} " in text
