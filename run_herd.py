#!/usr/bin/env python3
"""``python run_herd.py`` from a clone: the same program as the installed ``run_herd``
command (herdserver/supervisor.py), kept so the README's first command works as it is."""

import sys

from herdserver.supervisor import main

if __name__ == "__main__":
    sys.exit(main())
