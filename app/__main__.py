"""``python -m app --run RUN_DIR [--host] [--port] [--auth user:pass]``: serve the web UI."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
