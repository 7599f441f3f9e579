"""What readers.py needs of each file format below its rows: the first byte that is not UTF-8
named by its line, a CSV parser's error in words, an .npz member memory-mapped in place, and
Parquet's vector columns straight from Arrow's buffers.
"""

from __future__ import annotations

import csv
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError


def arrow_vectors(table: Any) -> dict[str, np.ndarray]:
    """Parquet list columns of numbers, equal lengths and no nulls, as ``(n, d)`` arrays straight
    from Arrow's buffers: a million 384-d rows as Python lists would take minutes and gigabytes.
    Other list columns are left to the row-by-row reader, whose errors name the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        kind = column.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            continue
        if not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
            continue
        lengths = pc.list_value_length(column)
        values = column.flatten()
        if (
            column.null_count
            or values.null_count
            or not len(column)
            or pc.min(lengths).as_py() == 0
            or pc.min(lengths).as_py() != pc.max(lengths).as_py()
        ):
            continue
        out[name] = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), -1)
    return out


def csv_problem(exc: Exception, fmt: str) -> str:
    """What a ``csv.Error`` met in the row starting on a line means, in words."""
    reason = str(exc)
    if "unexpected end of data" in reason:
        return f"not valid {fmt.upper()}: a quoted field that starts in this row is never closed"
    if "field larger than field limit" in reason:
        return f"a field of this row is longer than {csv.field_size_limit():,} characters"
    return f"not valid {fmt.upper()} ({reason})"


def check_utf8(file: Path) -> None:
    """A ``DataError`` naming the line of the first byte that is not UTF-8 (``open`` would only
    name a byte offset, and only once it got there)."""
    with file.open("rb") as f:
        line = 1
        tail = b""
        while block := f.read(1 << 20):
            data = tail + block
            try:
                data.decode("utf-8")
                tail = b""
            except UnicodeDecodeError as exc:
                if exc.end >= len(data) - 3 and exc.reason == "unexpected end of data":  # a character split
                    tail = data[exc.start :]
                    line += data[: exc.start].count(b"\n")
                    continue
                line += data[: exc.start].count(b"\n")
                raise DataError(
                    f"{file}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text (save the file as UTF-8)"
                ) from None
            line += data.count(b"\n")


def npz_member_mapped(file: Path, key: str) -> np.ndarray | None:
    """Array ``key`` of an .npz memory-mapped in place, or None where it is compressed
    (``np.savez_compressed``) or its header needs NumPy's full reader. NumPy maps .npy files
    but loads .npz members whole; an uncompressed member is an .npy file at an offset."""
    with zipfile.ZipFile(file) as archive:
        info = archive.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with file.open("rb") as f:
        f.seek(info.header_offset + 26)  # the local header: name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject or not np.prod(shape):
        return None
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")
