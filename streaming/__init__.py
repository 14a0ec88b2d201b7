"""freshrec: streaming."""

import sys

# Feast imports torch whenever it is installed, and inside Flink's embedded Python (pemja) that
# import can hang for good: seen in a catalogue task stuck in torch's C init, the job never
# opened and nothing was logged. The jobs use no torch, so there Feast goes without it.
if "pemja" in sys.modules:
    sys.modules.setdefault("torch", None)
