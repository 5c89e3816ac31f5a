"""The `semid` command: train, encode, evaluate, demo (and embed, with the optional extra).

Every error reaches the user as one line on stderr naming the problem, with a non-zero exit status;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from semid import installed_version
from semid.atomic import is_stream, probe_writable
from semid.config import DEFAULT_CONFIG, DEVICE_NAMES, config_path, is_device_name, shipped_file

if TYPE_CHECKING:
    from semid.tokenizer import SemanticIdTokenizer


BUNDLED_SAMPLE = shipped_file("sample", "data", "goodbooks.parquet")
DEMO_CONFIG = shipped_file("configs", "configs", "demo.toml")


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set section.key=value` pairs; values are read as TOML values, else as plain strings."""
    from semid.config import ConfigError, tomllib

    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        try:
            parsed = tomllib.loads(f"v = {raw}")
        except tomllib.TOMLDecodeError:
            parsed = {"v": raw}
        if set(parsed) != {"v"}:  # a value with a line break would otherwise set more than its key, unseen
            raise ConfigError(f"--set {key.strip()}= takes one value, got {raw!r}")
        overrides[key.strip()] = parsed["v"]
    return overrides


def _load_config(path: str | None, overrides: dict[str, Any], fallback: Path = DEFAULT_CONFIG):
    """The named config, else the bundled one; never silently the dataclass defaults, which are not a recipe."""
    from semid.config import SemidConfig

    if not path and not fallback.is_file():
        raise FileNotFoundError(f"the bundled config {fallback} is missing from this install; pass --config")
    return SemidConfig.load(path or fallback).with_overrides(overrides)


def _read_training_items(path: Any, id_col: str | None, emb_col: str):
    """Items of a --data path, or of the `semid.sources.InputFiles` it was already resolved to."""
    from semid.sources import input_files, read_items

    source = input_files(path)
    return read_items(source, id_col=None if source.is_npy else id_col, emb_col=emb_col)


def cmd_train(args: argparse.Namespace) -> int:
    from semid import distributed
    from semid.collisions import SuffixOverflowError
    from semid.modeldir import check_save_target
    from semid.tokenizer import SemanticIdTokenizer

    check_save_target(args.out, args.overwrite)  # now, not after the training it would throw away
    overrides = _parse_overrides(args.set)
    if args.device:
        overrides["train.device"] = args.device
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    config = _load_config(args.config, overrides)
    source = config_path(args.config) if args.config else DEFAULT_CONFIG  # said at the end: a name may be shipped
    items = _read_training_items(args.data, args.id_col, args.emb_col)
    started = time.perf_counter()
    try:  # under torchrun every process trains; rank 0 writes the model and reports
        tok = SemanticIdTokenizer(config).fit(items.embeddings, ids=items.ids, checkpoint=args.checkpoint,
                                              resume=args.resume)
        ranks = distributed.current()
    except SuffixOverflowError as e:  # the Python advice (keep `tok`, change its config) does not apply here
        raise SuffixOverflowError(
            f"{e.__cause__ or e}. From the command line: train again with a larger --set collisions.suffix_size=... "
            "or with --set collisions.strategy=remap",
            size=e.size, codes=e.codes, suffix_size=e.suffix_size,
        ) from e
    finally:
        distributed.leave()
    if not ranks.is_main:
        return 0
    tok.save(args.out, overwrite=args.overwrite)
    final = tok.meta["final"]  # the saved model's codes
    processes = f" by {ranks.world_size} processes" if ranks.active else ""
    seconds = time.perf_counter() - started
    print(f"trained on {len(items)} items{processes} ({_trained_on(tok)}) in {seconds:.1f} s with the config "
          f"{source}; model saved to {args.out}")
    if final:
        print(f"fvu {final['fvu']:.4f}  collision_rate {final['collision_rate']:.4f}  (best step {tok.meta['best_step']})")
    return 0


def _trained_on(tok: SemanticIdTokenizer) -> str:
    """"cpu, bf16 autocast": the device and precision a model trained with, which a seed's result depends on
    ("unknown" for a model written by a semid that did not record them)."""
    return ", ".join(tok.meta[k] for k in ("train_device", "train_precision") if k in tok.meta) or "unknown"


def cmd_encode(args: argparse.Namespace) -> int:
    from semid.export import write_vocabulary
    from semid.modeldir import registry_lock
    from semid.tokenizer import SemanticIdTokenizer

    # From reading the registry to saving it, one encode at a time per model: new IDs are remembered (so
    # they never change later), and a concurrent encode can neither hand out the same ones nor drop them.
    with registry_lock(args.model):
        tok = SemanticIdTokenizer.load(args.model, device=args.device)
        summary = tok.encode_file(args.data, args.out, batch_size=args.batch_size, id_col=args.id_col,
                                  emb_col=args.emb_col, progress=False if args.quiet else None,
                                  trie=args.trie, save_registry_to=args.model)
    if args.vocab:
        write_vocabulary(tok.token_vocabulary(), args.vocab)
    print(f"encoded {summary['n_items']} items ({summary['new_items']} new) to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from semid.io import write_json_atomic
    from semid.metrics import format_report, read_sequences
    from semid.sources import read_interaction_sequences
    from semid.tokenizer import SemanticIdTokenizer

    if args.plot:
        from semid.plot import check_plotting

        check_plotting()
    tok = SemanticIdTokenizer.load(args.model, device=args.device)
    items = _read_training_items(args.data, args.id_col, args.emb_col)
    sequences = read_sequences(args.sequences) if args.sequences else None
    if args.interactions:
        catalogue = items.ids if items.ids is not None else range(len(items))  # a .npy's items are its rows
        log = read_interaction_sequences(args.interactions, catalogue, user_col=args.user_col or "user_id",
                                         item_col=args.id_col, time_col=args.time_col)
        sequences = log.sequences
        print(f"sequences of {len(sequences):,} users from {log.interactions:,} interactions "
              f"({log.skipped:,} with items outside the catalogue skipped)")
    report = tok.evaluate(items.embeddings, ids=items.ids, sequences=sequences,
                          progress=not args.quiet and sys.stderr.isatty())  # whatever the model trained with
    print(format_report(report))
    if args.json:
        write_json_atomic(report, args.json)
        print(f"report written to {args.json}")
    if args.plot:
        from semid.plot import plot_codebook_usage

        plot_codebook_usage(tok.encode_raw(items.embeddings), tok.model.codebook_sizes, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """What a model directory holds, without data: for a model handed over by someone else, or an old run."""
    from semid.io import write_json_atomic
    from semid.metrics import format_report
    from semid.tokenizer import SemanticIdTokenizer

    tok = SemanticIdTokenizer.load(args.model, device="cpu")  # checks every digest: a loaded model is intact
    config, meta = tok.config, tok.meta
    sizes = list(tok.model.codebook_sizes)
    strategy = config.collisions.strategy
    if config.model.type == "rqvae":
        widths = "-".join(str(w) for w in config.model.hidden) or "linear"
        model = f"rqvae: {meta['input_dim']} -> {widths} -> {config.model.latent_dim}"
    else:
        model = f"rqkmeans on the {meta['input_dim']}-d input"
    info = {
        "model_dir": str(args.model),
        "model": model,
        "codebook_sizes": sizes,
        "collision_strategy": strategy,
        "id_length": tok.id_length,
        "distance": config.quantizer.distance,
        "forward": config.quantizer.forward,
        # .get: a model written by an earlier semid may lack a key; what it has is still worth showing
        "trained_items": meta.get("n_train_items"),
        "trained_on": _trained_on(tok),
        "train_steps": meta.get("train_steps"),
        "best_step": meta.get("best_step"),
        "registered_items": len(tok.registry),
        "final": meta.get("final") or {},
    }
    suffix = f" + a suffix of up to {config.collisions.suffix_size}" if info["id_length"] > len(sizes) else ""
    print(f"semid model {args.model}")
    forward = f", {info['forward']} forward" if config.model.type == "rqvae" else ""
    print(f"  model       {model}; {info['distance']} codes{forward}")
    print(f"  IDs         {len(sizes)} levels of {'/'.join(map(str, sizes))} codes{suffix}: "
          f"{info['id_length']} tokens, collisions by {strategy}")
    trained = "?" if info["trained_items"] is None else f"{info['trained_items']:,}"
    steps = "" if info["train_steps"] is None else f", {info['train_steps']:,} steps"
    print(f"  trained     {trained} items ({info['trained_on']}){steps}, best step {info['best_step']}")
    print(f"  registry    {info['registered_items']:,} items hold an ID")
    if info["final"]:
        print("\nat the end of training, on the items it trained on:")
        print(format_report(info["final"]))
    if args.json:
        write_json_atomic(info, args.json)
        print(f"info written to {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled goodbooks sample: train, encode, evaluate, report."""
    from semid.export import write_vocabulary
    from semid.io import write_json_atomic
    from semid.metrics import format_report
    from semid.modeldir import check_save_target
    from semid.sources import input_files
    from semid.tokenizer import SemanticIdTokenizer

    data = Path(args.data) if args.data else BUNDLED_SAMPLE
    if not args.data and not data.is_file():
        raise FileNotFoundError(f"bundled sample not found at {data}; pass --data PATH")
    out = Path(args.out)
    # Before training: the demo's outputs all go under --out, and its model replaces out/model.
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a directory for the demo's outputs")
    if out.resolve() in data.resolve().parents:
        raise ValueError(f"--data {data} is inside --out {out}, where the demo writes its outputs: move it out")
    source = input_files(data)  # resolved once for every read below; says first if it names nothing readable
    if source.would_read(out / "ids.parquet"):
        raise ValueError(f"--out {out} puts the demo's ids.parquet where the next run would read it as a part of "
                         f"--data {data}: name another directory")
    for name in ("ids.parquet", "trie.json", "vocab.txt", "report.json"):
        check_output_file((out / name).resolve(), f"--out {out} ({name})")
    check_save_target(out / "model", overwrite=True)
    overrides = _parse_overrides(args.set)
    if args.device:
        overrides["train.device"] = args.device
    config = _load_config(args.config, overrides, fallback=DEMO_CONFIG)
    items = _read_training_items(source, "item_id", "embedding")
    print(f"semid demo: {len(items)} items of dimension {items.embeddings.shape[1]} from {data}")
    started = time.perf_counter()
    tok = SemanticIdTokenizer(config).fit(items.embeddings, ids=items.ids)
    train_s = time.perf_counter() - started
    tok.save(out / "model", overwrite=True)  # the demo's own output: a rerun replaces it
    summary = tok.encode_file(source, out / "ids.parquet", progress=False, trie=out / "trie.json")
    write_vocabulary(tok.token_vocabulary(), out / "vocab.txt")
    report = tok.evaluate(items.embeddings, ids=items.ids, progress=False)
    report["train_seconds"] = round(train_s, 2)
    write_json_atomic(report, out / "report.json")
    print(format_report(report))
    print(f"\ntrained in {train_s:.1f} s ({_trained_on(tok)}); encoded {summary['n_items']} items")
    print(f"outputs in {out}/: model/ (config, weights, registry), ids.parquet (with LLM tokens), trie.json, "
          "vocab.txt (every token for an LLM's tokenizer), report.json")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from semid.embed import embed_file

    n = embed_file(args.data, args.out, text_col=args.text_col, id_col=args.id_col, model=args.model_name,
                   batch_size=args.batch_size, normalize=args.normalize)
    print(f"embedded {n} items to {args.out}")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _device_name(text: str) -> str:
    if not is_device_name(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_NAMES}, got {text!r}")
    return text


_DATA_HELP = (".npy matrix, or .parquet with id and embedding columns: one file, or a directory or quoted glob "
              "pattern of parquet parts read as one table in path order")


class _VersionAction(argparse.Action):
    """`--version`, whose lookup (importlib.metadata, tens of milliseconds) runs only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"semid {installed_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semid", description="Semantic IDs for generative recommenders.")
    threads_help = ("CPU threads for torch (default: one per core); on a machine busy with other work, fewer "
                    "run faster")
    device_help = f"{DEVICE_NAMES}; auto takes the current GPU when torch sees one"
    parser.add_argument("--version", action=_VersionAction, help="print semid's version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--threads", type=_positive_int, help=threads_help)
    # Both also after the command (`semid train --debug ...`); SUPPRESS keeps a top-level one from being reset
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    common.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, help=threads_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    def columns(p: argparse.ArgumentParser) -> None:
        p.add_argument("--id-col", default="item_id", type=lambda name: name or None,
                       help="parquet id column (default: item_id); '' for a parquet without ids, whose items are "
                            "then known by their embeddings and numbered by row, as in a .npy")
        p.add_argument("--emb-col", default="embedding", help="parquet embedding column (default: embedding)")

    p = command("train", help="train a tokenizer and save it to a model directory")
    p.add_argument("--config", help="TOML config file, or a shipped config by name: default, demo, tiger "
                                    "(default: default)")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", required=True, help="model directory to write (a new one, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model already in --out, and the registry of IDs it handed out")
    p.add_argument("--device", type=_device_name, help=device_help)
    p.add_argument("--seed", type=int, help="train.seed: the same seed on the same kind of device gives the same model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=2000")
    p.add_argument("--checkpoint", help="resumable training checkpoint path (see train.checkpoint_every)")
    p.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    columns(p)
    p.set_defaults(func=cmd_train)

    p = command("encode", help="give every item of a file its semantic ID (streams in batches)")
    p.add_argument("--model", required=True, help="model directory written by `semid train`")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", required=True, help="output parquet: item_id, codes, semantic_id, tokens")
    p.add_argument("--batch-size", type=int, default=65536, help="items read and encoded at a time (default: 65536)")
    p.add_argument("--device", type=_device_name, help=device_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    p.add_argument("--trie", help="also write the prefix trie (JSON) of this file's IDs for constrained decoding; "
                                  "encode the whole catalogue (known items keep their IDs) for a trie of every item")
    p.add_argument("--vocab", help="also write every token the model's IDs can use, one per line, for an LLM's tokenizer")
    columns(p)
    p.set_defaults(func=cmd_encode)

    p = command("evaluate", help="print the metric report of a model on a data set")
    p.add_argument("--model", required=True, help="model directory written by `semid train`")
    p.add_argument("--data", required=True, help=f"the items to score: {_DATA_HELP}; none is registered")
    p.add_argument("--json", help="also write the report as JSON here")
    sequences = p.add_mutually_exclusive_group()
    sequences.add_argument("--sequences", help="user sequences (user<TAB>row row ...) for sequence_prefix_agreement")
    sequences.add_argument("--interactions", help="interaction log (.parquet/.csv, or a directory or pattern of them: "
                                                  "user, item, time per row) for sequence_prefix_agreement; items "
                                                  "named as in --id-col")
    p.add_argument("--user-col", help="--interactions' user column (default: user_id)")
    p.add_argument("--time-col", help="--interactions' time column (default: timestamp where the log has one, "
                                      "else each user's items in file order)")
    p.add_argument("--plot", help="write a PNG of code usage per level (needs matplotlib)")
    p.add_argument("--device", type=_device_name, help=device_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    columns(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("info", help="what a model directory holds: ID shape, training, registry, final metrics")
    p.add_argument("--model", required=True, help="model directory written by `semid train`")
    p.add_argument("--json", help="also write it as JSON here")
    p.set_defaults(func=cmd_info)

    p = command("demo", help="train, encode and evaluate on the bundled goodbooks sample")
    p.add_argument("--out", default="semid-demo", help="output directory (default: ./semid-demo)")
    p.add_argument("--data", help="use other items instead of the bundled sample (as train's --data)")
    p.add_argument("--config", help="TOML config file, or a shipped config by name (default: demo, a small "
                                    "model for the sample)")
    p.add_argument("--device", type=_device_name, help=device_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_demo)

    p = command("embed", help="embed an item-text parquet with sentence-transformers (optional extra)")
    p.add_argument("--data", required=True, help="parquet with an id column and a text column (or a directory or "
                                                 "pattern of parquet parts)")
    p.add_argument("--out", required=True, help="output parquet: item_id, embedding")
    p.add_argument("--text-col", default="text", help="text column (default: text)")
    p.add_argument("--id-col", default="item_id", help="id column (default: item_id)")
    p.add_argument("--model-name", default="all-MiniLM-L6-v2", help="sentence-transformers model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="texts embedded at a time (default: 256)")
    p.add_argument("--normalize", action="store_true",
                   help="unit-length rows, the model's usual output (default: raw mean-pooled, as the shared sets)")
    p.set_defaults(func=cmd_embed)
    return parser


# Per command: the arguments it reads, the model directory it uses (or writes, for train), the files it writes.
_PATH_ROLES: dict[str, tuple[tuple[str, ...], str | None, tuple[str, ...]]] = {
    "train": (("data", "config"), "out", ("checkpoint",)),
    "encode": (("data",), "model", ("out", "trie", "vocab")),
    "evaluate": (("data", "sequences", "interactions"), "model", ("json", "plot")),
    "info": ((), "model", ("json",)),
    "embed": (("data",), None, ("out",)),
}


# The inputs that are tables, which a directory or glob pattern of parts may hold, and the formats of each.
_TABLE_INPUTS = {"data": "SUFFIXES", "interactions": "LOG_SUFFIXES"}  # names in semid.sources


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that would overwrite an input, another output, or a file of the
    model directory: `--vocab items.parquet` would destroy the catalogue, and `--out M/registry.parquet` the
    record of every ID handed out. `semid train --overwrite` replaces its whole --out directory, so no input
    of train may live there either."""
    inputs, model_arg, outputs = _PATH_ROLES.get(args.command, ((), None, ()))
    model = getattr(args, model_arg, None) if model_arg else None
    model_root = Path(model).resolve() if model else None

    def inside_model(path: Path) -> bool:
        return model_root is not None and model_root in (path, *path.parents)

    seen: dict[Path, str] = {}
    tables = []  # inputs that may be directories or patterns of parts
    for name in inputs:
        if value := getattr(args, name, None):
            listed = _table_files(value, name)
            for source in (Path(value).resolve(), *(f.resolve() for f in (listed.files if listed else ()))):
                if args.command == "train" and inside_model(source):
                    raise ValueError(f"--{name} {value} is inside --out {model}, which training replaces: move it out")
                seen[source] = f"the input --{name} {value}"
            if listed is not None and listed.in_parts:
                tables.append((listed, f"the input --{name} {value}"))
    for name in outputs:
        value = getattr(args, name, None)
        if not value:
            continue
        target = Path(value).resolve()
        if target in seen:
            raise ValueError(f"--{name} {value} is {seen[target]}: write it to another path")
        if reader := next((label for listed, label in tables if listed.would_read(value)), None):
            raise ValueError(f"--{name} {value} would be read as a part of {reader} by the next run: write it "
                             "outside that directory or pattern")
        if inside_model(target):
            raise ValueError(f"--{name} {value} is inside the model directory {model}, which holds the model and "
                             "the registry of IDs handed out: write it to another path")
        if is_stream(value):  # /dev/null, /dev/stdout: written into, and may take every output
            continue
        check_output_file(target, f"--{name} {value}")
        seen[target] = f"the output --{name} {value}"


def _table_files(value: str, name: str):
    """The files a --data or --interactions argument names (None for other inputs, or one that does not resolve:
    the command itself then says why)."""
    if name not in _TABLE_INPUTS:
        return None
    from semid import sources
    from semid.io import InputError

    try:
        return sources.input_files(value, suffixes=getattr(sources, _TABLE_INPUTS[name]))
    except InputError:
        return None


def check_output_file(target: Path, named: str) -> None:
    """Refuse, before any work, a file output that cannot be one: a directory, a path under a file, or a path
    inside any semid model directory (whose files an output would replace, and which `train --overwrite`
    deletes whole)."""
    from semid.modeldir import enclosing_model

    if target.is_dir():
        raise ValueError(f"{named} is a directory; name a file")
    if (under := next((folder for folder in target.parents if folder.exists() and not folder.is_dir()), None)):
        raise ValueError(f"{named}: {under} is a file, not a directory")
    if (model := enclosing_model(target)) is not None:
        raise ValueError(f"{named} is inside the semid model directory {model}, which holds a model and the "
                         "registry of IDs it handed out: write it to another path")
    try:
        probe_writable(target)
    except OSError as exc:
        raise ValueError(f"{named} cannot be written: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", False) and not args.checkpoint:
        parser.error("--resume needs --checkpoint PATH, the checkpoint to continue from")
    if args.command == "evaluate" and (args.user_col or args.time_col) and not args.interactions:
        parser.error("--user-col and --time-col name columns of --interactions LOG, which is missing")
    if args.command == "evaluate" and args.interactions and args.id_col is None:
        parser.error("--interactions names its items in the --id-col column, and --id-col '' names none")

    def one_line_warning(message, category, *_args, **_kwargs) -> None:
        print(f"semid {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    # SIGTERM (a job scheduler, `timeout`, docker stop) interrupts as Ctrl-C does, so that what a run was doing
    # is undone or named: a model replace puts the old model back, a checkpoint is pointed to. Each signal is
    # also recorded: one that lands while torch or numpy is importing can leave a half-made module behind, whose
    # later error ("module 'numpy' has no attribute 'diff'") is then reported as the interruption it is.
    received: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    # A signal the parent ignores stays ignored (`semid train ... &` in a script: SIGINT is the script's), and
    # one whose handler was not set from Python (None) is left alone, as it could not be put back.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
                if in_main_thread and signal.getsignal(sig) not in (signal.SIG_IGN, None)}
    try:
        if args.threads:  # inside the try: Ctrl-C during torch's import is an interruption like any other
            import torch

            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():  # restores the warning display for a caller of main()
            warnings.showwarning = one_line_warning
            check_output_paths(args)
            return args.func(args)
    except KeyboardInterrupt as stop:
        return _stopped(args, terminated=isinstance(stop, Terminated))
    except BrokenPipeError:  # the reader left (`| head`): its choice, not this command's error
        _silence_stdout()
        return 141
    except Exception as exc:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        if received:
            return _stopped(args, terminated=received[-1] == signal.SIGTERM)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"semid {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(args: argparse.Namespace, terminated: bool) -> int:
    """Say that the command was stopped, and where a checkpoint resumes it; the shell's exit code for the signal."""
    checkpoint = getattr(args, "checkpoint", None)
    left = f"; the checkpoint {checkpoint} resumes it (--resume)" if checkpoint and Path(checkpoint).exists() else ""
    print(f"\nsemid {args.command}: {'terminated' if terminated else 'interrupted'}{left}", file=sys.stderr)
    return 143 if terminated else 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe once more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # not a real file (a test's capture)
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as from Ctrl-C (see `main`)."""


if __name__ == "__main__":
    sys.exit(main())
