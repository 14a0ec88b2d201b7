"""The quality gate: parameters are published only if they are sane and not worse than what serves.

Three checks, each refusal with a reason the trainer logs:

* every value in the blobs about to go out is finite (no NaN/Inf);
* no weight's magnitude exceeds ``max_abs`` (a diverging learner shows it here first);
* champion/challenger on the same examples: each of the last ``window`` examples was scored,
  before anything learned from it, by the model being trained and by the served version's
  weights; the new parameters go out only if their prequential AUC is not more than
  ``margin`` below the served version's. (Comparing with the AUC the served version had on
  *earlier* examples would not do: the stream's difficulty drifts, and a gate that remembers
  an easy hour refuses everything after it.)

>>> g = QualityGate(window=4, margin=0.1)
>>> for p, y in [(0.9, 1), (0.2, 0), (0.8, 1), (0.3, 0)]:
...     g.observe(p, y)
>>> g.auc()
1.0
>>> import numpy as np
>>> g.check({"w": np.array([1.0, np.nan])})
'parameters contain 1 NaN/Inf value(s) in w'
>>> for p, served, y in [(0.1, 0.9, 1), (0.9, 0.1, 0), (0.2, 0.8, 1), (0.8, 0.2, 0)]:
...     g.observe(p, y, served)
>>> print(g.check({"w": np.array([1.0])}))
prequential AUC 0.000 is 1.000 below the served version's 1.000 on the same 4 examples (margin 0.1)
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy.stats import rankdata

WEIGHT_ARRAYS = ("w", "weight", "u_weight", "i_weight")


class QualityGate:
    def __init__(self, max_abs: float = 100.0, margin: float = 0.05, window: int = 2000) -> None:
        self.max_abs, self.margin = max_abs, margin
        self.recent: deque[tuple[float, float | None, int]] = deque(maxlen=window)
        self.refusals = 0

    def observe(self, p: float, label: int, p_served: float | None = None) -> None:
        """One prequential prediction of the model in training, and the served version's."""
        self.recent.append((p, p_served, int(label)))

    def auc(self, served: bool = False) -> float | None:
        """AUC of the recent predictions, the trained model's or (``served``) the served version's,
        over the examples both scored; None until both labels were seen."""
        rows = [r for r in self.recent if r[1] is not None] if served else list(self.recent)
        if not rows:
            return None
        p = np.array([r[1] if served else r[0] for r in rows])
        y = np.array([r[2] for r in rows])
        pos = int(y.sum())
        neg = len(y) - pos
        if not pos or not neg:
            return None
        ranks = rankdata(p)  # ties share their mean rank
        return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))

    def check(self, arrays: dict[str, np.ndarray]) -> str | None:
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
        both = [r for r in self.recent if r[1] is not None]
        if len(both) < len(self.recent):  # compare on the same examples only
            return None
        auc, served = self.auc(), self.auc(served=True)
        if auc is not None and served is not None and auc < served - self.margin:
            return self._refuse(f"prequential AUC {auc:.3f} is {served - auc:.3f} below the served version's "
                                f"{served:.3f} on the same {len(both)} examples (margin {self.margin:g})")
        return None

    def _refuse(self, reason: str) -> str:
        self.refusals += 1
        return reason
