"""``python -m herdserver.offline build-cache [--data PATH] [--cache-dir DIR] [--stdout]``.

The command's old home, kept because the README, run_herd.py and the servers'
background loader run it by this name; the code is ``places.geonames_cache.main``.
"""

import sys

from .places.geonames_cache import main

if __name__ == "__main__":
    sys.exit(main())
