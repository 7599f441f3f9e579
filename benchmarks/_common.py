"""Helpers shared by the benchmark scripts: machine description, timing, table output."""

from __future__ import annotations

import os
import platform
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parents[1] / "docs"


def cpu_features() -> str:
    """The SIMD the CPU offers (AVX2, AVX-512) and the one FAISS's loaded build uses: the same
    figures differ by up to 2x between an AVX2 and an AVX-512 machine."""
    import faiss

    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        flags = []
    offered = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512")) if flag in flags] or ["unknown"]
    config = getattr(faiss, "SIMDConfig", None)  # FAISS >= 1.12 dispatches at run time ($FAISS_SIMD_LEVEL)
    used = config.get_level_name() if config is not None else faiss.get_compile_options()
    return f"CPU {'+'.join(offered)}, FAISS SIMD {used}"


def machine() -> str:
    import faiss

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cpu_features()}, Python "
        f"{platform.python_version()}, numpy {np.__version__}, faiss {faiss.__version__}"
    )


def timed(fn: Callable[[], object], repeat: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary working folder removed when the run ends, however it ends: normally, by an
    error, by Ctrl-C, or by SIGTERM (turned into SystemExit here, so the removal still runs).
    A benchmark's folder can hold tens of GB."""
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            yield Path(folder)
    finally:
        signal.signal(signal.SIGTERM, previous)
