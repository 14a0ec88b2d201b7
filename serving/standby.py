"""A warm spare of the API: imported, serving model loaded and followed, listening only once
the API's port is free.

Starting the API cold takes ~10 s (Feast and torch imports) and longer on busy cores, so
``freshrec up`` keeps one spare beside the API: when the API dies, the spare takes its port
within a fraction of a second, already on the current model, and the supervisor starts a
new spare. Run: ``python -m serving.standby`` with the API's FRESHREC_* variables.
"""

from __future__ import annotations

import uvicorn

from freshrec.config import Settings
from serving.app import create_app


def main() -> None:
    settings = Settings.from_env()
    app = create_app(settings, own_process=True, standby=True)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, access_log=False)


if __name__ == "__main__":
    main()
