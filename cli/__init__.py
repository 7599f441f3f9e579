"""The ``imprint`` command line (click): a thin layer over the ``retrieval_imprint`` Python API.

Installed as ``retrieval_imprint.cli`` (``setup.cfg`` maps this top-level folder there).
"""

from __future__ import annotations

import click

from retrieval_imprint import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imprint")
def main() -> None:
    """Few-shot classifiers imprinted from a frozen embedding model (IMPRINT, arXiv 2503.14572)."""


@main.command()
def demo() -> None:
    """Embed the packaged demo intents and compare the published imprinting methods.

    \b
    Example:
        imprint demo
    """
    from retrieval_imprint.demo import run_demo

    rows = run_demo()
    w1, w2 = max(len(r.method) for r in rows), max(len(r.setting) for r in rows)
    click.echo(f"{'method':<{w1}}  {'NORMpre/GEN/NORMpost/NORMinf/AGG':<{w2}}  proxies  accuracy  macro-F1")
    for r in rows:
        click.echo(f"{r.method:<{w1}}  {r.setting:<{w2}}  {r.n_proxies:>7}  {r.evaluation.accuracy:>8.3f}"
                   f"  {r.evaluation.macro_f1:>8.3f}")
    click.echo(f"({rows[0].evaluation.n} test utterances; imprint k=20 keeps every sample of these "
               "12-shot classes, so it equals 1-NN here)")
