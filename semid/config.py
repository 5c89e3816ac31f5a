"""Dataclass configs that load from and save to TOML.

The key names are a contract (the design notes fix them) so that config files keep working across versions. An
unknown key is an error that names it: a typo such as `codebok_size` must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from semid.atomic import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class PartialConfigWarning(UserWarning):
    """A config file left out keys on which semid's neutral dataclass defaults and its tuned recipe differ."""


DEVICE_NAMES = "auto, cpu, cuda or cuda:N (GPU N)"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(name: object) -> bool:
    """A name `semid.device.resolve_device` understands; checked here, without torch, for configs and the CLI."""
    return isinstance(name, str) and _DEVICE_NAME.fullmatch(name) is not None


# LLM tokens name each position of an ID by a letter (semid.export.LEVEL_PREFIXES, a-z): L levels and a suffix.
MAX_LEVELS = 25
# Bounds far beyond any use, so that a typo (an extra zero or three) is refused by key name before torch tries
# to allocate terabytes: a layer or latent of 131,072 units, a codebook of 1M codes (each code an LLM token),
# a suffix of 16.7M values (every value a token in the vocabulary semid lists).
MAX_WIDTH = 2**17
MAX_CODEBOOK = 2**20
MAX_SUFFIX = 2**24
# torch's CPU generator keeps 32 bits of a seed (2**32 trains as 0): a run takes seeds below this (check_trainable).
MAX_SEED = 2**32 - 1
# The scalar keys of a training evaluation (semid.train.quick_evaluate) that can choose the best weights.
BEST_METRICS = ("fvu", "mse", "cosine", "collision_rate", "colliding_items", "max_group")


def shipped_file(package_dir: str, source_dir: str, name: str) -> Path:
    """A file that ships with semid: package data of an installed wheel, else the source tree's own copy
    (pyproject.toml maps the repository's configs/ and data/ into the package)."""
    package = Path(__file__).resolve().parent
    installed = package / package_dir / name
    return installed if installed.is_file() else package.parent / source_dir / name


DEFAULT_CONFIG = shipped_file("configs", "configs", "default.toml")


def shipped_config_names() -> list[str]:
    """The configs that ship with semid (default, demo, tiger), by name."""
    return sorted(p.stem for p in DEFAULT_CONFIG.parent.glob("*.toml"))


def config_path(name: str | Path) -> Path:
    """A config file by its path, or a shipped config by its name alone (`tiger`, `tiger.toml`), so that the
    recipes are reachable from any directory and from an installed wheel. A file in the working directory
    comes first: `tiger` is ./tiger, else ./tiger.toml (an edited copy), else the shipped tiger.toml."""
    path = Path(name)
    if path.exists() or path.parent != Path(".") or path.suffix not in ("", ".toml"):
        return path
    local = path.with_name(f"{path.name}.toml") if not path.suffix else path
    if local.exists():
        return local
    shipped = DEFAULT_CONFIG.parent / f"{path.stem}.toml"
    return shipped if shipped.is_file() else path


@dataclass
class ModelConfig:
    # "rqvae": encoder -> residual quantizer -> decoder. "rqkmeans": the quantizer alone on the raw input.
    type: str = "rqvae"
    hidden: list[int] = field(default_factory=lambda: [512, 256, 128])  # encoder widths; the decoder mirrors them
    latent_dim: int = 32  # width of the latent the codes quantize
    activation: str = "silu"  # "relu" | "gelu" | "silu"
    layer_norm: bool = False  # LayerNorm after every hidden layer (before the activation), encoder and decoder
    # When > 0, every encoder output is rescaled to this root-mean-square element (RMSNorm without weights,
    # times this constant). The decoder can undo any scale the encoder gives the latent, so without it the
    # latent scale drifts, and with it the weight of the codebook, commitment and uniqueness losses, which are
    # taken in latent units. The constant sets that weight once and for all (bench/VARIANTS.md).
    latent_norm: float = 0.0
    # Dropout after every hidden activation of the decoder, in training only. Without it the decoder of a small
    # catalogue memorises the training items' code tuples and reconstructs new items badly; with it, similar
    # items share prefixes a little less often, so it is off by default. The encoder gets none: noise there
    # moves the codes themselves and cost catalogue fvu (bench/HELDOUT.md).
    decoder_dropout: float = 0.0
    # Inputs are centred and scaled by one global factor before the encoder, so that learning rates and
    # distance scales behave the same whatever the embedding model's norm; outputs are mapped back.
    standardize: bool = True

    def __post_init__(self) -> None:
        _choice("model.type", self.type, ("rqvae", "rqkmeans"))
        _choice("model.activation", self.activation, ("relu", "gelu", "silu"))
        for width in self.hidden:  # an empty list is a linear encoder and decoder
            _in_range("model.hidden", width, 0, MAX_WIDTH, low_open=True, high_open=False, note=" (every width)")
        _in_range("model.latent_dim", self.latent_dim, 0, MAX_WIDTH, low_open=True, high_open=False)
        _in_range("model.latent_norm", self.latent_norm, 0, 100, high_open=False,
                  note=" (0 turns it off; the standardised input's elements have RMS 1)")
        if self.type == "rqvae" and self.latent_dim == 1 and self.latent_norm:
            raise ConfigError(f"model.latent_norm = {self.latent_norm} holds every latent at that root-mean-square "
                              "element, and a latent of model.latent_dim = 1 has one element: every item would be "
                              f"+-{self.latent_norm}, two codes in all. Use a wider latent or latent_norm = 0")
        _in_range("model.decoder_dropout", self.decoder_dropout, 0, 1)


@dataclass
class QuantizerConfig:
    levels: int = 3
    codebook_size: int | list[int] = 256
    distance: str = "l2"  # "l2" | "cosine"
    forward: str = "rotation"  # "ste" | "rotation" | "gumbel"
    commitment: float = 0.25  # beta in  ||sg(e) - q||^2 + beta ||e - sg(q)||^2
    kmeans_init: bool = True
    kmeans_iters: int = 25  # Lloyd iterations of the k-means initialisation, after k-means++ seeding
    kmeans_sample: int = 65536  # rows of data used for k-means init (a seeded random sample)
    refine_passes: int = 3  # rqkmeans only: joint refinement passes over all levels after greedy k-means
    dead_code_reset: bool = True
    dead_code_decay: float = 0.9  # EMA decay of per-code assignment counts
    dead_code_threshold: float = 0.05  # dead when EMA count < threshold * batch_size / K
    dead_code_every: int = 20  # steps between dead-code checks
    # Usage balance: weight of log K - H(mean soft assignment) per level, softmax(-distance / temperature)
    # over each batch (L2 distances divided by the residual's mean square). 0 = off.
    balance_weight: float = 0.0
    balance_temperature: float = 0.05
    gumbel_tau_start: float = 1.0
    gumbel_tau_end: float = 0.01
    # tau = max(end, start * decay**step); 0 picks the decay that reaches `end` at half of train.steps
    gumbel_tau_decay: float = 0.0
    gumbel_hard: bool = False  # straight-through hard one-hot in the forward pass
    # Prefix centres: once trained, the last level codes each item's residual relative to the mean residual
    # of the items that share its prefix (a table fitted on the training items and saved with the model).
    # Without them, items of one prefix share an offset that makes them pick the same last code; see
    # bench/COLLISIONS.md. A group of n >= 2 items gets centre sum / (n + shrinkage); a lone item gets none.
    # A single level has no prefix, and no centres.
    prefix_centres: bool = True
    centre_shrinkage: float = 0.0

    def __post_init__(self) -> None:
        _choice("quantizer.distance", self.distance, ("l2", "cosine"))
        _choice("quantizer.forward", self.forward, ("ste", "rotation", "gumbel"))
        _in_range("quantizer.levels", self.levels, 1, MAX_LEVELS, high_open=False)
        sizes = self.sizes()
        if len(sizes) != self.levels:
            raise ConfigError(f"quantizer.codebook_size lists {len(sizes)} sizes for {self.levels} levels")
        for size in sizes:
            _in_range("quantizer.codebook_size", size, 0, MAX_CODEBOOK, low_open=True, high_open=False,
                      note=" (every size)")
        _in_range("quantizer.commitment", self.commitment, note=" (0 turns it off)")
        _in_range("quantizer.kmeans_iters", self.kmeans_iters, note=" (0: the seeding alone)")
        _positive("quantizer.kmeans_sample", self.kmeans_sample)
        if self.kmeans_init and self.kmeans_sample < max(sizes):
            raise ConfigError(f"quantizer.kmeans_sample ({self.kmeans_sample}) must be at least the largest codebook "
                              f"({max(sizes)}): k-means needs a sampled row for every code")
        _in_range("quantizer.refine_passes", self.refine_passes, note=" (0 turns it off)")
        # At 1 the counts never move from their starting expectation, so no code is ever found dead.
        _in_range("quantizer.dead_code_decay", self.dead_code_decay, 0, 1)
        _in_range("quantizer.dead_code_threshold", self.dead_code_threshold)
        _positive("quantizer.dead_code_every", self.dead_code_every)
        _in_range("quantizer.balance_weight", self.balance_weight)
        _positive("quantizer.balance_temperature", self.balance_temperature)
        _positive("quantizer.gumbel_tau_start", self.gumbel_tau_start)
        # The schedule only anneals downwards: tau = max(end, start * decay**step).
        _in_range("quantizer.gumbel_tau_end", self.gumbel_tau_end, 0, self.gumbel_tau_start, low_open=True,
                  high_open=False, note=" (at most quantizer.gumbel_tau_start)")
        _in_range("quantizer.gumbel_tau_decay", self.gumbel_tau_decay, 0, 1, high_open=False,
                  note=" (0 picks it from train.steps)")
        _in_range("quantizer.centre_shrinkage", self.centre_shrinkage)
        if self.prefix_centres and not self.prefixes_fit_a_key():
            raise ConfigError(f"quantizer.prefix_centres keys each prefix by one 64-bit integer, and codebook sizes "
                              f"{self.sizes()} have more prefixes than that holds (the product of all sizes but "
                              "the last must be below 2^63): set quantizer.prefix_centres = false, or use fewer "
                              "levels or smaller codebooks")

    def prefixes_fit_a_key(self) -> bool:
        """Whether every prefix (the codes of all levels but the last) packs into one int64 key."""
        return math.prod(self.sizes()[:-1]) < 2**63

    def sizes(self) -> list[int]:
        """Codebook size of every level."""
        if isinstance(self.codebook_size, int):
            return [self.codebook_size] * self.levels
        return list(self.codebook_size)


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" (semid.device)
    batch_size: int = 1024
    steps: int = 20000
    # A larger catalogue needs more passes than `steps` gives it: the run takes at least min_epochs passes over
    # the items (0: off), but never more than max_steps steps (0: no bound). See `steps_for`.
    min_epochs: float = 0.0
    max_steps: int = 0
    lr: float = 0.001
    # On a heavy-tailed catalogue (its top 1% of items hold more than 20% of the variance) this share
    # of each batch is drawn in proportion to the item's squared distance from the mean, the rest uniformly
    # (0: off). The reconstruction term is reweighted by 1 / (N p), so it still estimates the catalogue's mean
    # error; the latent-space terms follow the draw. Other catalogues train on shuffled passes, whatever
    # this says. See `semid.train.norm_sampling_probabilities`.
    norm_sampling: float = 0.0
    optimizer: str = "adamw"  # "adamw" | "adagrad"
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" (from lr down to 0.1 x lr at the last step) | "constant"
    warmup_steps: int = 0  # linear ramp of the rate from lr / warmup_steps to lr over the first steps
    amp: bool = True  # bf16 autocast where native: Ampere+ GPUs, CPUs with AVX512-BF16/AMX (semid.device.native_bf16)
    compile: bool = False  # torch.compile the model (slow to start; off by default)
    cuda_graph: bool = True  # capture the AdamW training step as a CUDA graph on GPU
    eval_every: int = 1000
    # The weights kept are those of the best evaluation by this scalar key of a training evaluation
    # (BEST_METRICS): lower is better, except for cosine; collision_rate breaks ties.
    best_metric: str = "fvu"
    early_stopping: int = 0  # stop after this many evaluations without improvement; 0 = never
    # Uniqueness loss: every `uniqueness_every` steps (at least one pass over the catalogue, see
    # `uniqueness_interval`) the whole corpus is encoded, items that share a code tuple (all but the
    # best-placed of each group) get as target the nearest free last-level code of their prefix, and a loss
    # of this weight pulls their latent there. 0 turns it off.
    uniqueness_weight: float = 0.0
    uniqueness_every: int = 100
    # Decoder refit: after the best weights are chosen (and prefix centres fitted), the decoder alone trains
    # this many more steps on the quantized latents of the final codes, from the rate training ended with
    # down to zero. The encoder and the codes do not change. 0 turns it off.
    decoder_refit_steps: int = 200
    # Dropout on the decoder's hidden activations during the refit only (0 = off). The codes are fixed by then,
    # so it costs them nothing; it makes the decoder read tuples it never saw better: for catalogues that grow
    # after training, 0.1 with decoder_refit_steps = 1000 (bench/HELDOUT.md, session 17).
    decoder_refit_dropout: float = 0.0
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (needs a checkpoint path); 0 = at evaluations
    progress: bool = True  # tqdm bars for training, and by default for a fitted tokenizer's evaluate()

    def __post_init__(self) -> None:
        if not is_device_name(self.device):
            raise ConfigError(f"config key 'train.device' is {self.device!r}; choose {DEVICE_NAMES}")
        _choice("train.optimizer", self.optimizer, ("adamw", "adagrad"))
        _choice("train.schedule", self.schedule, ("cosine", "constant"))
        # torch.manual_seed takes a 64-bit int; beyond that it fails with a message that names no key.
        _in_range("train.seed", self.seed, -2**63, 2**63 - 1, high_open=False)
        _choice("train.best_metric", self.best_metric, BEST_METRICS)
        _positive("train.batch_size", self.batch_size)
        _positive("train.steps", self.steps)
        _in_range("train.min_epochs", self.min_epochs, note=" (0 turns it off)")
        _in_range("train.max_steps", self.max_steps, note=" (0: no bound)")
        _in_range("train.lr", self.lr, note=" (0 freezes the weights)")
        _in_range("train.norm_sampling", self.norm_sampling, 0, 1, high_open=False)
        _in_range("train.weight_decay", self.weight_decay)
        _in_range("train.warmup_steps", self.warmup_steps)
        _in_range("train.eval_every", self.eval_every, note=" (0: only at the end)")
        _in_range("train.early_stopping", self.early_stopping, note=" (0: never)")
        _in_range("train.uniqueness_weight", self.uniqueness_weight, note=" (0 turns it off)")
        _positive("train.uniqueness_every", self.uniqueness_every)
        _in_range("train.decoder_refit_steps", self.decoder_refit_steps, note=" (0 turns it off)")
        _in_range("train.decoder_refit_dropout", self.decoder_refit_dropout, 0, 1)
        _in_range("train.checkpoint_every", self.checkpoint_every, note=" (0: at every evaluation)")
        if self.max_steps and self.max_steps < self.steps:
            raise ConfigError(f"train.max_steps ({self.max_steps}) must be 0 or at least train.steps ({self.steps})")

    def check_trainable(self) -> None:
        """Refuse, when a run starts, values that only training cares about and that an earlier semid accepted:
        checked here rather than when a config is made, so that a model saved with them still loads."""
        # torch's CPU generator keeps 32 bits of a seed: 2**32 would train as 0, and -1 as 2**32 - 1
        _in_range("train.seed", self.seed, 0, MAX_SEED, high_open=False,
                  note=" (torch keeps 32 bits of a seed: others repeat one of these)")
        if self.early_stopping and not self.eval_every:
            raise ConfigError(f"train.early_stopping ({self.early_stopping}) counts evaluations without improvement, "
                              "and train.eval_every = 0 evaluates only at the end: set train.eval_every too")

    def steps_for(self, n_items: int) -> int:
        """Training steps on n_items: `steps`, raised to min_epochs passes of batch_size rows, at most max_steps.

        On Beauty (12k items, batch 1024) 4,000 steps are 340 passes; on a 29k catalogue the same steps
        were 140 passes and fvu was still falling (0.473; 8,000 steps: 0.426, bench/VARIANTS.md).
        """
        steps = max(self.steps, self._min_epoch_steps(n_items))
        return min(steps, self.max_steps) if self.max_steps else steps

    def steps_note(self, n_items: int) -> str | None:
        """Why `steps_for(n_items)` is not `steps`, for the progress output; None when it is.

        A user who lowers train.steps for a quick run should not find out from the step counter alone that
        min_epochs decided instead.
        """
        steps = self.steps_for(n_items)  # never below `steps`: a max_steps below it is refused
        if steps == self.steps:
            return None
        capped = ", at most train.max_steps" if steps < self._min_epoch_steps(n_items) else ""
        return (f"{steps:,} steps: train.steps = {self.steps:,} is raised to train.min_epochs = {self.min_epochs:g} "
                f"passes over {n_items:,} items{capped} (train.min_epochs = 0 keeps train.steps)")

    def _min_epoch_steps(self, n_items: int) -> int:
        return math.ceil(self.min_epochs * n_items / self._batch_rows(n_items))

    def uniqueness_interval(self, n_items: int) -> int:
        """Steps between refreshes of the uniqueness targets: `uniqueness_every`, but at least one pass of
        batch_size rows over n_items.

        A refresh encodes the whole catalogue, while an item's target is used only when the item is drawn,
        about once a pass: refreshing more often costs a full encode for targets that mostly go unused. It
        changes nothing up to 102k items at the default batch of 1,024; on 500k items every 100 steps spent
        10 s a refresh on a 2-core CPU, as long as the 100 steps themselves.
        """
        return max(self.uniqueness_every, math.ceil(n_items / self._batch_rows(n_items)))

    def _batch_rows(self, n_items: int) -> int:
        """Rows of one batch on n_items: batch_size, or the whole catalogue when it is smaller."""
        return min(self.batch_size, max(n_items, 1))


@dataclass
class CollisionConfig:
    strategy: str = "suffix"  # "suffix" | "remap" | "none"
    suffix_size: int = 256  # vocabulary of the suffix token
    # Balanced last level at encode time: the items of one encode call share the last level's codes evenly
    # (log-domain Sinkhorn over their last-level distances) instead of each taking its nearest code. It
    # spreads crowded prefixes before collisions are resolved; it needs an (n, K_last) matrix in memory. A call
    # of fewer items than the last level has codes keeps the nearest codes: there is nothing to share out.
    balanced_last_level: bool = False

    def __post_init__(self) -> None:
        _choice("collisions.strategy", self.strategy, ("suffix", "remap", "none"))
        _in_range("collisions.suffix_size", self.suffix_size, 0, MAX_SUFFIX, low_open=True, high_open=False)


@dataclass
class SemidConfig:
    """Every setting of a run, in four sections.

    The dataclass defaults are neutral building blocks that tests and overrides start from, not a tuned
    recipe (L2 distance, no uniqueness loss, ...). The recipe is `configs/default.toml`: `SemidConfig.default()`,
    which `SemanticIdTokenizer()` and `semid train` use when given no config.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    collisions: CollisionConfig = field(default_factory=CollisionConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SemidConfig":
        return _build(cls, data, prefix="")

    @classmethod
    def default(cls) -> "SemidConfig":
        """semid's tuned recipe, the shipped `configs/default.toml` (bench/RESULTS.md has what it gives)."""
        if not DEFAULT_CONFIG.is_file():
            raise ConfigError(f"the bundled config {DEFAULT_CONFIG} is missing from this install; pass a config")
        return cls.load(DEFAULT_CONFIG)

    @classmethod
    def load(cls, path: str | Path, *, record: bool = False) -> "SemidConfig":
        """A TOML config file, or a shipped config by name (`config_path`). Keys it leaves out take the dataclass
        defaults, with a `PartialConfigWarning` where those differ from the recipe, unless the file is a `record`
        of a run (a model directory's config.toml): keys an older semid did not write are what that run trained
        with, not a user's oversight."""
        path = Path(path) if record else config_path(path)
        data = _read_toml(path)
        config = cls.from_dict(data)
        if not record:
            _warn_of_neutral_defaults(path, data)
        return config

    def with_overrides(self, overrides: dict[str, Any] | None) -> "SemidConfig":
        """A copy with dotted-key overrides applied, e.g. {"quantizer.forward": "ste"}."""
        data = self.to_dict()
        for dotted, value in (overrides or {}).items():
            section, _, key = dotted.partition(".")
            if section not in data or not key:
                raise ConfigError(f"unknown config key '{dotted}' (sections: {', '.join(data)})")
            data[section][key] = value
        return SemidConfig.from_dict(data)

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        text = self.to_toml()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; name a .toml file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the configs that ship with semid are named alone: "
                          f"{', '.join(shipped_config_names())})")
    try:  # utf-8-sig: editors on Windows (Notepad) start UTF-8 files with a byte-order mark, which TOML refuses
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (TOML is UTF-8; is it the config?)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _warn_of_neutral_defaults(path: Path, data: dict[str, Any]) -> None:
    """Warn of the keys a config file leaves out whose dataclass default is not the recipe's value.

    Why: the dataclass defaults are neutral building blocks (L2 codes, no uniqueness loss), so that a file such
    as configs/tiger.toml means only what it says; but a user who writes just the keys they want to change
    expects the tuned recipe, and would train a weaker model without knowing it.
    """
    if not DEFAULT_CONFIG.is_file() or path.resolve() == DEFAULT_CONFIG.resolve():
        return
    neutral, recipe = SemidConfig().to_dict(), SemidConfig.default().to_dict()
    left_out = [f"{section}.{key} = {_toml_value(value)} (recipe: {_toml_value(recipe[section][key])})"
                for section, values in neutral.items() for key, value in values.items()
                if key not in data.get(section, {}) and recipe[section][key] != value]
    if left_out:
        warnings.warn(PartialConfigWarning(
            f"{path} leaves out {len(left_out)} key(s) that then take semid's neutral defaults, not the tuned "
            f"recipe of configs/default.toml: {'; '.join(left_out)}. Set them in the file, or start from the "
            "recipe (no --config, with --set KEY=VALUE; or a copy of configs/default.toml)"
        ), stacklevel=3)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(allowed)}")


def _positive(key: str, value: float, note: str = "") -> None:
    _in_range(key, value, low_open=True, note=note)


def _in_range(key: str, value: float, low: float = 0, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = True, note: str = "") -> None:
    """A value outside [low, high) (or the open/closed variant) is a ConfigError that names the key.

    One `not (above and below)` test rejects NaN too, which fails every comparison, and the default open
    infinite bound rejects inf: no key has a use for either, and torch would otherwise fail far from the
    config with a message that names no key (Invalid learning rate: -1.0), or train on NaN.
    """
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        if high == math.inf:
            allowed = f"{'>' if low_open else '>='} {low}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be {allowed}{note}, got {value}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Accept a value only if it matches the annotated type; ints are accepted where floats are."""
    options = get_args(hint) if get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    for option in options:
        origin = get_origin(option)
        if origin is list:
            (item_type,) = get_args(option)
            if isinstance(value, list) and all(_is_instance(v, item_type) for v in value):
                return [_plain(v, item_type) for v in value]
        elif _is_instance(value, option):
            return _plain(value, option)
    raise ConfigError(f"config key '{key}' has value {value!r}, expected {_type_name(hint)}")


def _is_instance(value: Any, type_: type) -> bool:
    """numbers.Integral and numbers.Real, not int and float: numpy scalars (a sweep over np.arange) count too."""
    if type_ is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if type_ is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, type_)


def _plain(value: Any, type_: type) -> Any:
    """A checked value as the Python type itself (an int where a float is due, a numpy scalar), so configs
    compare, print and write to TOML alike."""
    return type_(value) if type_ in (int, float) else value


def _type_name(hint: Any) -> str:
    """`list of int`, `int or list of int`: read by people who wrote a value of the wrong type."""
    options = get_args(hint) if get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    return " or ".join(f"list of {_type_name(get_args(o)[0])}" if get_origin(o) is list else o.__name__
                       for o in options)
