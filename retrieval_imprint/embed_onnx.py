"""The embedding model on ONNX Runtime: sentence-transformers' vectors without importing torch.

Importing torch and loading a model takes 4-8 s on a small CPU, most of a cold ``imprint query``
and of a server's start; ONNX Runtime and the Rust tokenizer load the same model in a fraction of
a second, and answer one short text about 2x faster (benchmarks/serving.py, docs/serving.md).

``export`` writes a sentence-transformers model's whole forward pass (transformer, pooling,
normalisation, dense layers) as one ONNX graph, with the fast tokenizer it uses, into a folder;
``OnnxModel`` loads such a folder. An export is kept only if it gives torch's vectors on probe
texts (short, long past the model's window, accented, blank) to within ``TOLERANCE`` in cosine;
a model it cannot reproduce (no fast tokenizer, a default prompt, modules other than these) is
refused with the reason, and the caller stays on torch. Exports are keyed by the model's
fingerprint (embed.py), so a model changed in place is exported again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
TOLERANCE = 1e-5  # largest 1 - cosine between torch's and the export's vector of a probe text
SUPPORTED = ("Transformer", "Pooling", "Normalize", "Dense")  # sentence-transformers modules, by class name
PROBES = (
    "where is my card",
    "  Put on some QUEEN, please!  ",
    "Ünïcödé ßtraße 東京 ☕",
    "",
    " ".join(["a long text past the window"] * 120),
)


class ExportError(Exception):
    """The model cannot be exported faithfully; the message says why (the caller stays on torch)."""


class OnnxModel:
    """An exported model: texts to float32 vectors with ONNX Runtime on the CPU. ``encode`` may
    be called from several threads at once (an InferenceSession's ``run`` is thread-safe)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.meta = json.loads((folder / "export.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.meta["max_length"])
        self.tokenizer.enable_padding(pad_id=self.meta["pad_id"], pad_token=self.meta["pad_token"])
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # no busy-waiting between runs: its threads would take the cores a server's event loop needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.dimension = int(self.meta["dimension"])

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Rows in input order; batches of like lengths (longest first) so that padding is short."""
        texts = list(texts)
        out = np.empty((len(texts), self.dimension), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._run([texts[i] for i in rows])
        return out

    def _run(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encoded],
            "attention_mask": [e.attention_mask for e in encoded],
            "token_type_ids": [e.type_ids for e in encoded],
        }
        feed = {name: np.asarray(columns[name], np.int64) for name in self.meta["inputs"]}
        return self.session.run(None, feed)[0]


def export(st: Any, folder: str | os.PathLike) -> OnnxModel:
    """Export the sentence-transformers model ``st`` into ``folder`` (written beside it and renamed
    into place, so a crash or a concurrent export never leaves half a folder) and load it; an
    ``ExportError`` if it cannot be reproduced to ``TOLERANCE``."""
    import torch

    modules = [type(m).__name__ for m in st]
    if not modules or modules[0] != "Transformer" or any(m not in SUPPORTED for m in modules):
        raise ExportError(f"modules {modules}: the ONNX export covers {', '.join(SUPPORTED)}")
    if st.default_prompt_name is not None:
        raise ExportError(f"the model prepends prompt {st.default_prompt_name!r} by default")
    tokenizer = st.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("the model has no fast (Rust) tokenizer")
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in tokenizer.model_input_names]

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, *tensors: Any) -> Any:
            return self.st(dict(zip(inputs, tensors)))["sentence_embedding"]

    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        expected = np.asarray(st.encode(list(PROBES), convert_to_numpy=True, show_progress_bar=False), np.float32)
        sample = tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")
        axes = {name: {0: "batch", 1: "tokens"} for name in inputs}
        with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on shapes: checked below instead
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Forward().eval().cpu(),
                tuple(sample[name].cpu() for name in inputs),
                str(staging / "model.onnx"),
                input_names=inputs,
                output_names=["embedding"],
                dynamic_axes={**axes, "embedding": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        (staging / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
        meta = {
            "format": FORMAT,
            "inputs": inputs,
            "max_length": int(st.max_seq_length),
            "pad_id": int(tokenizer.pad_token_id or 0),
            "pad_token": str(tokenizer.pad_token or "[PAD]"),
            "dimension": int(expected.shape[1]),
        }
        (staging / "export.json").write_text(json.dumps(meta, indent=1))
        model = OnnxModel(staging)
        together = model.encode(PROBES)  # padded to the longest probe, and each alone: no padding at all
        alone = np.concatenate([model.encode([text]) for text in PROBES])
        worst = float(np.max(1 - np.minimum(cosine(together, expected), cosine(alone, expected))))
        if not worst <= TOLERANCE:
            raise ExportError(f"its vectors differ from torch's by up to {worst:.2g} in cosine (limit {TOLERANCE:g})")
        try:
            os.replace(staging, folder)
        except OSError:  # another process put its export there first: the same model, use that one
            pass
        return OnnxModel(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cosine(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (1 for two zero rows, which some models give a blank text)."""
    norms = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)
    dots = np.einsum("ij,ij->i", A.astype(np.float64), B.astype(np.float64))
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 1.0)
