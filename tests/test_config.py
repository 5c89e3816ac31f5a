"""Every numeric config key rejects values it has no use for, naming the key; every shipped config loads."""
from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semid.config import BEST_METRICS, ConfigError, PartialConfigWarning, SemidConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAN, INF = math.nan, math.inf

BAD_VALUES = [
    ("model.hidden", [64, 0]),
    ("model.latent_dim", 0),
    ("model.latent_norm", -0.5),
    ("model.latent_norm", INF),
    ("model.latent_norm", NAN),
    ("model.decoder_dropout", 1.0),
    ("model.decoder_dropout", NAN),
    ("quantizer.levels", 0),
    ("quantizer.codebook_size", -4),
    ("quantizer.commitment", -1.0),
    ("quantizer.commitment", NAN),
    ("quantizer.commitment", INF),
    ("quantizer.kmeans_iters", -1),
    ("quantizer.kmeans_sample", -1),
    ("quantizer.kmeans_sample", 0),
    ("quantizer.refine_passes", -1),
    ("quantizer.dead_code_decay", 1.0),
    ("quantizer.dead_code_decay", -0.1),
    ("quantizer.dead_code_threshold", -0.05),
    ("quantizer.dead_code_threshold", INF),
    ("quantizer.dead_code_every", 0),
    ("quantizer.balance_weight", INF),
    ("quantizer.balance_temperature", 0.0),
    ("quantizer.balance_temperature", NAN),
    ("quantizer.gumbel_tau_start", 0.0),
    ("quantizer.gumbel_tau_start", INF),
    ("quantizer.gumbel_tau_end", 0.0),
    ("quantizer.gumbel_tau_end", 2.0),  # above the default start, 1.0: the schedule would never anneal
    ("quantizer.gumbel_tau_decay", 1.5),
    ("quantizer.gumbel_tau_decay", -0.5),
    ("quantizer.centre_shrinkage", NAN),
    ("train.seed", 2**64),
    ("train.best_metric", "nope"),
    ("train.best_metric", "usage"),  # a list per level: not a score
    ("model.hidden", [512, 2**17 + 1]),  # typos with extra zeros, refused before torch allocates terabytes
    ("model.latent_dim", 10**11),
    ("quantizer.codebook_size", 2**20 + 1),
    ("collisions.suffix_size", 10**9),
    ("train.batch_size", 0),
    ("train.steps", 0),
    ("train.steps", -5),
    ("train.min_epochs", INF),
    ("train.max_steps", -1),
    ("train.lr", -1.0),
    ("train.lr", NAN),
    ("train.lr", INF),
    ("train.norm_sampling", NAN),
    ("train.weight_decay", -1.0),
    ("train.weight_decay", NAN),
    ("train.warmup_steps", -1),
    ("train.eval_every", -3),
    ("train.early_stopping", -1),
    ("train.uniqueness_weight", -1.0),
    ("train.uniqueness_weight", NAN),
    ("train.uniqueness_every", 0),
    ("train.decoder_refit_steps", -1),
    ("train.checkpoint_every", -1),
    ("collisions.suffix_size", 0),
    # The loader takes ints where floats are expected, never floats for ints, bools for numbers or strings.
    ("train.steps", 100.0),
    ("train.lr", True),
    ("train.amp", 1),
    ("model.standardize", "yes"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_is_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        SemidConfig().with_overrides({key: value})
    shown = value[-1] if isinstance(value, list) else value  # a list names its offending element
    assert f"{shown!r}" in str(info.value), "the message shows the value got"


# Edge values that mean something: 0 as "off", the closed ends of intervals, an empty hidden list.
GOOD_VALUES = [
    ("model.hidden", []),
    ("model.latent_norm", 0.0),
    ("model.decoder_dropout", 0.0),
    ("quantizer.commitment", 0.0),
    ("quantizer.kmeans_iters", 0),
    ("quantizer.refine_passes", 0),
    ("quantizer.dead_code_decay", 0.0),
    ("quantizer.dead_code_threshold", 0.0),
    ("quantizer.gumbel_tau_end", 1.0),  # equal to the start: a constant temperature
    ("quantizer.gumbel_tau_decay", 1.0),
    ("train.seed", -1),  # a run refuses it (check_trainable); a model saved with it still loads
    ("train.best_metric", "cosine"),
    ("collisions.suffix_size", 2**24),
    ("train.lr", 0.0),  # frozen weights: the early-stopping tests train with it
    ("train.min_epochs", 0),
    ("train.max_steps", 0),
    ("train.norm_sampling", 1.0),
    ("train.weight_decay", 0),  # an int where a float is expected
    ("train.eval_every", 0),
    ("train.early_stopping", 0),
    ("train.uniqueness_weight", 0.0),
    ("train.decoder_refit_steps", 0),
    ("train.checkpoint_every", 0),
    ("train.steps", 10**12),  # no bound without train.max_steps
]


@pytest.mark.parametrize("key, value", GOOD_VALUES, ids=[f"{k}={v!r}" for k, v in GOOD_VALUES])
def test_meaningful_edge_value_is_accepted(key, value):
    section, _, name = key.partition(".")
    assert getattr(getattr(SemidConfig().with_overrides({key: value}), section), name) == value


def test_bad_value_in_a_file_is_rejected_naming_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=r"train.lr must be >= 0 \(0 freezes the weights\), got -1.0"):
        SemidConfig.load(path)


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.glob("*.toml"))
    assert paths, f"no configs under {CONFIGS}"
    for path in paths:
        config = SemidConfig.load(path)
        assert SemidConfig.from_dict(config.to_dict()) == config, path.name


def test_a_tokenizer_without_a_config_gets_the_shipped_recipe_not_the_dataclass_defaults(monkeypatch, tmp_path):
    from semid import SemanticIdTokenizer, config as config_module

    recipe = SemidConfig.load(CONFIGS / "default.toml")
    assert SemidConfig.default() == recipe and SemanticIdTokenizer().config == recipe
    assert recipe != SemidConfig()  # else the test could not tell them apart
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", tmp_path / "gone.toml")
    with pytest.raises(ConfigError, match="bundled config .*gone.toml is missing"):
        SemidConfig.default()


def test_levels_stop_where_token_names_do():
    """Every position of an ID, a suffix included, needs a token letter: a deeper model could not be encoded."""
    from semid.config import MAX_LEVELS
    from semid.export import LEVEL_PREFIXES

    assert MAX_LEVELS + 1 == len(LEVEL_PREFIXES)
    SemidConfig().with_overrides({"quantizer.levels": MAX_LEVELS, "quantizer.codebook_size": 2})
    with pytest.raises(ConfigError, match=r"quantizer.levels must be in \[1, 25\], got 26"):
        SemidConfig().with_overrides({"quantizer.levels": MAX_LEVELS + 1, "quantizer.codebook_size": 2})



def test_keys_that_only_fail_together_are_refused_naming_both():
    """A one-dimensional latent under latent_norm is +-r for every item; k-means needs a row per code."""
    with pytest.raises(ConfigError, match=r"model.latent_norm = 0.5 .*model.latent_dim = 1 .*two codes"):
        SemidConfig().with_overrides({"model.latent_dim": 1, "model.latent_norm": 0.5})
    SemidConfig().with_overrides({"model.latent_dim": 1})  # without the norm a 1-d latent has many values
    with pytest.raises(ConfigError, match=r"quantizer.kmeans_sample \(100\) must be at least the largest codebook \(256\)"):
        SemidConfig().with_overrides({"quantizer.kmeans_sample": 100})
    SemidConfig().with_overrides({"quantizer.kmeans_sample": 100, "quantizer.kmeans_init": False})


def test_values_only_training_refuses_are_refused_when_a_run_starts_not_when_a_saved_config_loads():
    """An earlier semid trained with them, and the model it saved must stay loadable (its registry with it)."""
    for overrides, message in [
        ({"train.seed": 2**32}, r"train.seed must be in \[0, 4294967295\] \(torch keeps 32 bits"),
        ({"train.seed": -1}, r"train.seed must be in \[0, 4294967295\]"),
        ({"train.early_stopping": 3, "train.eval_every": 0}, r"train.early_stopping \(3\) counts evaluations"),
    ]:
        config = SemidConfig().with_overrides(overrides)  # made, saved and loaded as before
        with pytest.raises(ConfigError, match=message):
            config.train.check_trainable()
    SemidConfig().with_overrides({"train.seed": 2**32 - 1}).train.check_trainable()


def test_best_metrics_are_the_scalar_keys_of_a_training_evaluation():
    import torch

    from semid.rqvae import RQVAE
    from semid.train import quick_evaluate

    config = SemidConfig().with_overrides({"model.hidden": [8], "model.latent_dim": 4, "quantizer.codebook_size": 4})
    report = quick_evaluate(RQVAE(6, config.model, config.quantizer).eval(), torch.randn(40, 6))
    assert set(BEST_METRICS) == {k for k, v in report.items() if isinstance(v, float | int)}


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "items.npy"  # --config and --data swapped
    path.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'")
    with pytest.raises(ConfigError, match=r"items.npy is not UTF-8 text"):
        SemidConfig.load(path)


def test_a_value_of_the_wrong_type_names_the_type_expected():
    with pytest.raises(ConfigError, match=r"model.hidden' has value \[1.5\], expected list of int$"):
        SemidConfig().with_overrides({"model.hidden": [1.5]})
    with pytest.raises(ConfigError, match=r"expected int or list of int$"):
        SemidConfig().with_overrides({"quantizer.codebook_size": "256"})


def test_every_shipped_config_says_every_key_on_which_the_defaults_and_the_recipe_differ(recwarn):
    for path in sorted(CONFIGS.glob("*.toml")):
        SemidConfig.load(path)
    assert not [w for w in recwarn if issubclass(w.category, PartialConfigWarning)]


def test_a_partial_config_file_warns_of_each_key_left_to_the_neutral_defaults(tmp_path):
    """A file with only the keys a user changed trains with the dataclass defaults for the rest: say which of them
    are not the recipe's, with both values, so a weaker model is never trained unknowingly."""
    partial = tmp_path / "mine.toml"
    partial.write_text('[train]\nsteps = 5\n[quantizer]\ndistance = "cosine"\n')
    with pytest.warns(PartialConfigWarning, match=r"mine.toml leaves out 11 key\(s\)") as caught:
        config = SemidConfig.load(partial)
    message = str(caught[0].message)
    assert "model.hidden = [512, 256, 128] (recipe: [1024, 512, 256])" in message
    assert "train.uniqueness_weight = 0.0 (recipe: 3.0)" in message
    assert "train.steps" not in message and "quantizer.distance" not in message  # the file set those
    assert config.train.steps == 5 and config.model.hidden == SemidConfig().model.hidden
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.warns(PartialConfigWarning, match=r"leaves out 13 key\(s\)"):
        assert SemidConfig.load(empty) == SemidConfig()
    with warnings.catch_warnings():  # a model directory's record of what an older semid trained with: no warning
        warnings.simplefilter("error", PartialConfigWarning)
        assert SemidConfig.load(partial, record=True) == config


def test_a_byte_order_mark_is_read_and_a_directory_is_named(tmp_path):
    marked = tmp_path / "windows.toml"
    marked.write_bytes("\ufeff".encode() + (CONFIGS / "default.toml").read_bytes())  # as Notepad saves UTF-8
    assert SemidConfig.load(marked) == SemidConfig.default()
    with pytest.raises(ConfigError, match=r"config .* is a directory; name a .toml file"):
        SemidConfig.load(tmp_path)


def test_numpy_scalars_are_taken_and_kept_as_python_numbers():
    import numpy as np

    config = SemidConfig.default().with_overrides({"train.steps": np.int64(30), "train.lr": np.float32(0.5),
                                                    "quantizer.codebook_size": [np.int32(8)] * 3})
    assert type(config.train.steps) is int and type(config.train.lr) is float
    assert config.quantizer.codebook_size == [8, 8, 8] and all(type(k) is int for k in config.quantizer.codebook_size)
    assert SemidConfig.from_dict(config.to_dict()) == config and "steps = 30" in config.to_toml()
    with pytest.raises(ConfigError, match="train.steps' has value"):
        SemidConfig.default().with_overrides({"train.steps": np.float64(30.0)})  # a float for an int, as before


def test_shipped_configs_are_named_alone_from_any_directory(tmp_path, monkeypatch):
    """`from_config("tiger")` and `--config tiger` work outside the source tree, as from an installed wheel;
    a file of that name in the working directory comes first, and a wrong name lists the shipped ones."""
    from semid.config import DEFAULT_CONFIG, shipped_config_names

    monkeypatch.chdir(tmp_path)
    tiger = SemidConfig.load(DEFAULT_CONFIG.parent / "tiger.toml")
    assert SemidConfig.load("tiger") == tiger and SemidConfig.load("tiger.toml") == tiger
    assert SemidConfig.load("default") == SemidConfig.default()
    assert {"default", "demo", "tiger"} <= set(shipped_config_names())
    (tmp_path / "tiger.toml").write_text(DEFAULT_CONFIG.read_text())  # the user's own file of that name
    assert SemidConfig.load("tiger.toml") == SemidConfig.default() == SemidConfig.load("tiger")
    with pytest.raises(ConfigError, match=r"config file not found: tigr \(the configs that ship with semid are "
                                          r"named alone: default, demo, tiger\)"):
        SemidConfig.load("tigr")
    with pytest.raises(ConfigError, match="config file not found: elsewhere/tiger.toml"):
        SemidConfig.load("elsewhere/tiger.toml")  # a path is a path
