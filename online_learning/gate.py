"""The quality gate: parameters are published only if they are sane and not getting worse.

Three checks, each refusal with a reason the trainer logs:

* every value in the blobs about to go out is finite (no NaN/Inf);
* no weight's magnitude exceeds ``max_abs`` (a diverging learner shows it here first);
* the prequential AUC of the last ``window`` examples (each scored *before* learning from
  it) has not dropped more than ``margin`` below the AUC the serving version had when it
  was published.

>>> g = QualityGate(window=4, margin=0.1)
>>> for p, y in [(0.9, 1), (0.2, 0), (0.8, 1), (0.3, 0)]:
...     g.observe(p, y)
>>> g.auc()
1.0
>>> import numpy as np
>>> g.check({"w": np.array([1.0, np.nan])}, served_auc=None)
'parameters contain 1 NaN/Inf value(s) in w'
>>> for p, y in [(0.1, 1), (0.9, 0), (0.2, 1), (0.8, 0)]:
...     g.observe(p, y)
>>> g.check({"w": np.array([1.0])}, served_auc=1.0)
'prequential AUC 0.000 over the last 4 examples is 1.000 below the serving version (1.000; margin 0.1)'
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy.stats import rankdata

WEIGHT_ARRAYS = ("w", "weight", "u_weight", "i_weight")


class QualityGate:
    def __init__(self, max_abs: float = 100.0, margin: float = 0.05, window: int = 2000) -> None:
        self.max_abs, self.margin = max_abs, margin
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)
        self.refusals = 0

    def observe(self, p: float, label: int) -> None:
        self.recent.append((p, int(label)))

    def auc(self) -> float | None:
        """AUC of the recent predictions (None until both labels were seen)."""
        if not self.recent:
            return None
        p = np.array([x for x, _ in self.recent])
        y = np.array([y for _, y in self.recent])
        pos = int(y.sum())
        neg = len(y) - pos
        if not pos or not neg:
            return None
        ranks = rankdata(p)  # ties share their mean rank
        return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))

    def check(self, arrays: dict[str, np.ndarray], served_auc: float | None) -> str | None:
        """None if the parameters may go out, else the reason they may not."""
        for name, values in arrays.items():
            if values.dtype.kind != "f":
                continue
            bad = int((~np.isfinite(values)).sum())
            if bad:
                return self._refuse(f"parameters contain {bad} NaN/Inf value(s) in {name}")
            if name in WEIGHT_ARRAYS and values.size and float(np.abs(values).max()) > self.max_abs:
                return self._refuse(f"weights exploded: max |{name}| = {float(np.abs(values).max()):.3g} "
                                    f"> {self.max_abs:g}")
        auc = self.auc()
        if auc is not None and served_auc is not None and auc < served_auc - self.margin:
            return self._refuse(f"prequential AUC {auc:.3f} over the last {len(self.recent)} examples is "
                                f"{served_auc - auc:.3f} below the serving version ({served_auc:.3f}; "
                                f"margin {self.margin:g})")
        return None

    def _refuse(self, reason: str) -> str:
        self.refusals += 1
        return reason
