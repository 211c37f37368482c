"""herdserver: a gevent proxy herd speaking IAMAT / WHATSAT / AT.

Importing the package never monkey-patches: the entry points do that first.
"""

__version__ = "0.1.0"
