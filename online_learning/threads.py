"""One compute thread per process for numpy's BLAS and torch.

The learners and the API work on small vectors and share two cores with each other and the
Flink job. Idle BLAS/OpenMP threads spin rather than sleep, so a second thread per process
only steals the other processes' core. Measured: ``freshrec evaluate`` (two processes) took
143 s of wall and 286 s of CPU on the Taobao slice with numpy's default two OpenBLAS
threads, 87 s and 117 s with one; the API's p99 at 100 requests/s went from 800 ms to 16 ms.

>>> import numpy, torch
>>> from threadpoolctl import threadpool_info
>>> one_thread()
>>> sorted({(pool["user_api"], pool["num_threads"]) for pool in threadpool_info()})
[('blas', 1), ('openmp', 1)]
>>> torch.get_num_threads()
1
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits


def one_thread() -> None:
    """Limit numpy's BLAS and torch to one thread each, from now on (libraries already loaded)."""
    threadpool_limits(limits=1)
    torch.set_num_threads(1)
