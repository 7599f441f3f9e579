"""The ``imprint`` command line: a thin click layer over the ``retrieval_imprint`` Python API.

Installed as ``retrieval_imprint.cli`` (``setup.cfg`` maps this top-level folder there). ``app``
holds the group and what commands share; ``use``, ``evaluation``, ``manage``, ``study``, ``serving`` and ``embedding`` hold
the commands.
Every command has ``--help`` with an example; commands that print results take ``--json``.
"""

from . import embedding, evaluation, manage, serving, study, use  # noqa: F401  (each module adds its commands to the group)
from .app import main

__all__ = ["main"]
