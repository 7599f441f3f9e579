"""Input checks shared by the public functions, with scikit-learn's messages where it has them."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_X_y
from sklearn.utils.multiclass import check_classification_targets


def check_Xy(X: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    """``X`` as finite float32 ``(n, d)`` and ``y`` as class labels ``(n,)``, or a ``ValueError``."""
    X, y = check_X_y(X, y, dtype=np.float32)
    check_classification_targets(y)
    return X, y


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low``, or a ``ValueError`` naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} is not valid; expected an integer >= {low}")
    return int(value)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; expected one of "
                         + ", ".join(repr(a) for a in allowed))
    return value  # type: ignore[return-value]
