"""freshrec: jobs."""

import streaming  # noqa: F401  (first: its guard keeps torch out of Flink's embedded Python)
