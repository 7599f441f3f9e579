"""The ``imprint`` group and what its commands share: error handling, output, common options.

A user error (any ``retrieval_imprint.errors.ImprintError``: bad file, column, label, dimension,
setting, a locked collection...) exits with code 2 and one line on stderr, and leaves the
collection as it was. Any other exception is a bug and shows its traceback. A closed output pipe
(``imprint ... | head``) ends the command with exit 0. Heavy libraries are imported by the commands
that use them, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from retrieval_imprint import __version__
from retrieval_imprint.errors import ImprintError
from retrieval_imprint.params import RUNTIME, Param

if TYPE_CHECKING:  # numpy is imported by the commands that use it: --help answers without it
    import numpy as np


class UserError(click.ClickException):
    """A problem with the user's input: exit code 2, one line on stderr."""

    exit_code = 2


class ImprintGroup(click.Group):
    """Turns the library's user-facing errors into ``UserError``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ImprintError as exc:
            error = UserError(" ".join(str(exc).split()))
            error.exit_code = exc.exit_code  # type: ignore[misc]  # click reads it from the instance
            raise error from exc
        except BrokenPipeError:  # the reader went away (`imprint ... | head`): done, not failed
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush into
            ctx.exit(0)


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: ours and the installed versions of what answers depend on (read from the
    package metadata: nothing is imported)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    def of(*dists: str) -> str:
        for dist in dists:
            try:
                return f"{dist} {version(dist)}"
            except PackageNotFoundError:
                pass
        return f"{dists[0]} not installed"

    deps = [
        of("faiss-cpu", "faiss-gpu", "faiss"),
        of("numpy"),
        of("torch"),
        of("sentence-transformers"),
        of("scikit-learn"),
        of("sqlalchemy"),
    ]
    click.echo(f"imprint {__version__} (Python {sys.version.split()[0]})\n" + "\n".join(f"  {d}" for d in deps))
    ctx.exit(0)


@click.group(cls=ImprintGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Show the version and those of the libraries it runs on, and exit.",
)
@click.option(
    "--wait",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="How long a write waits for another process writing to the same collection.  [default: 0]",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write the embedding cache (see imprint cache).")
@click.option(
    "--device",
    default="none",
    envvar="IMPRINT_DEVICE",
    show_default=True,
    metavar="none|cpu|cuda|auto",
    help=RUNTIME["device"].help + " Also read from IMPRINT_DEVICE.",
)
def main(wait: float, no_cache: bool, device: str) -> None:
    """Few-shot classifiers imprinted from a frozen embedding model (IMPRINT, arXiv 2503.14572).

    \b
    imprint index intents/ train.csv     # embed, imprint, store
    imprint query intents/ "where is my card"
    imprint eval intents/ test.csv
    """
    if no_cache:  # read wherever an embedder is made, the Python API's switch too
        os.environ["RETRIEVAL_IMPRINT_CACHE"] = "off"
    from retrieval_imprint.device import set_device

    set_device(None if device == "none" else device)


def plain(v: Any) -> Any:
    """``v`` as plain data: numpy scalars as numbers, NaN as None, floats to 6 decimals (scores are
    float32: further digits are noise that differs between CPUs)."""
    import numpy as np

    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if np.isfinite(v) else None
    return v


def emit(data: Any) -> None:
    """Print ``data`` as JSON (``plain``)."""
    click.echo(json.dumps(plain(data), ensure_ascii=False, indent=2))


def output(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """Print a command's result: as JSON with ``--json``, else with ``human``."""
    if as_json:
        emit(data)
    else:
        human(plain(data))


def describe(choice: dict[str, Any], cv: bool = True) -> str:
    """A setting auto chose, in words: ``kmeans k=5, blend alpha=0.5 (held-out accuracy 0.912 ...)``."""
    gen = {"mean": "mean", "all": "all samples"}.get(choice["generator"], f"{choice['generator']} k={choice['k']}")
    if choice["generator"] == "ls":  # one row a class: no k
        gen = f"ls on {choice['features']} features" if choice.get("features") else "ls"
    agg = f"blend alpha={choice['alpha']:g}" if choice["aggregation"] == "blend" else choice["aggregation"]
    rows = choice.get("cv_results") or []
    mine = [r for r in rows if all(r[key] == choice[key] for key in ("generator", "k", "aggregation", "alpha"))]
    held_out = (
        f" ({'leave-one-out' if mine[0].get('held_out') == 'leave-one-out' else 'held-out'} accuracy"
        f" {mine[0]['accuracy']:.4f} on {mine[0]['scored']} rows"
        + (f" of {mine[0]['classes']} classes" if "classes" in mine[0] else "")
        + f", best of {len(rows)})"
        if cv and mine and mine[0]["accuracy"] is not None
        else ""
    )
    return f"{gen}, {agg}{held_out}"


def quiet_option(fn: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(fn)


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def collection_argument(fn: Callable) -> Callable:
    return click.argument("collection", type=click.Path(file_okay=False, path_type=Path))(fn)


READ_OPTIONS = ("text_column", "label_column", "vector_column", "split")


def data_options(fn: Callable) -> Callable:
    """The options saying how to read data files, handed to the command as one ``reading`` dict
    of ``readers.read``'s keywords."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, reading={name: kwargs.pop(name) for name in READ_OPTIONS}, **kwargs)

    for option in reversed(
        [
            click.option("--text-column", help="Column holding the texts (default: text, sentence, utterance, query)."),
            click.option("--label-column", help="Column holding the labels (default: label, category, intent, class)."),
            click.option("--vector-column", help="Column holding precomputed vectors (lists of numbers)."),
            click.option("--split", help="NPZ files: read the arrays SPLIT_X and SPLIT_y."),
        ]
    ):
        command = option(command)
    return command


def id_option(fn: Callable) -> Callable:
    return click.option(
        "--id-column",
        help="Column of row ids kept beside each sample (default: ref), shown by imprint examples and query --explain.",
    )(fn)


def setting_options(params: list[Param], note: str = "") -> Callable[[Callable], Callable]:
    """One option per setting of ``params.py``: its name, choices and help, and its default shown.
    Every option defaults to None (not given), so a command can tell what the user chose."""

    def deco(fn: Callable) -> Callable:
        for p in reversed(params):
            flag = "--" + p.name.replace("_", "-")
            shown = "none" if p.default is None else p.default
            help_text = f"{p.help}{note} [default: {shown}]"
            if p.type is bool:
                option = click.option(f"{flag}/--no-{p.name.replace('_', '-')}", p.name, default=None, help=help_text)
            else:
                option = click.option(
                    flag, p.name, type=click.Choice(p.choices()) if p.choices else p.type, default=None, help=help_text
                )
            fn = option(fn)
        return fn

    return deco


@functools.cache
def embedder(model: str | None, quiet: bool):
    """One embedder per model for the whole command: loading the model is the slow part."""
    from retrieval_imprint.embed import Embedder

    return Embedder(model, progress=show_progress(quiet))


def show_progress(quiet: bool) -> bool:
    return not quiet  # off a terminal, as plain periodic lines (progress.py)


def lock_timeout() -> float:
    """The group's ``--wait``: how long this command's writes wait for another writer."""
    ctx = click.get_current_context(silent=True)
    return float(ctx.find_root().params.get("wait") or 0.0) if ctx is not None else 0.0


def engine_options(f: Callable) -> Callable:
    """``--engine local|ray`` and ``--ray-address``."""
    f = click.option(
        "--ray-address",
        metavar="ADDRESS",
        help="The Ray cluster to use with --engine ray ('auto': the one this machine is part of; "
        "'ray://host:10001'); default: start a local one.",
    )(f)
    return click.option(
        "--engine",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="ray: run on a Ray cluster (pip install 'retrieval-imprint[ray]').",
    )(f)


def ray_connect(address: str | None) -> None:
    """Connect to the Ray cluster ``--ray-address`` names, or start a local one."""
    from retrieval_imprint.distributed import init

    init(address)


def open_collection(path: Path, **options: Any):
    """Open the collection at ``path`` (sharded or not) with the command's ``--wait``; it is closed
    when the command ends (its last SQLite connection closed, so the WAL is checkpointed then, not
    whenever the garbage collector gets to it)."""
    from retrieval_imprint.sharded import open_any

    col = open_any(path, lock_timeout=lock_timeout(), **options)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(col.close)
    return col


def collection_vectors(col: Any, datasets: list, quiet: bool) -> np.ndarray:
    """Rows of ``datasets`` as vectors, texts embedded with the collection's (checked) model."""
    from retrieval_imprint.embed import embed_all

    return embed_all(datasets, col.embedder(progress=show_progress(quiet)) if col.model is not None else None)


def query_vectors(datasets: list, model: str | None, quiet: bool) -> np.ndarray:
    """Rows of ``datasets`` as vectors, texts embedded with ``model`` (the command's one embedder)."""
    from retrieval_imprint.embed import embed_all

    return embed_all(datasets, embedder(model, quiet) if model is not None else None)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a ``UserError`` saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'retrieval-imprint[plot]'") from None
    return plt
