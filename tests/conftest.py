"""Test fixtures. gevent must patch the standard library before anything else
imports socket, ssl or requests, so this comes first, with keyword arguments only."""

from gevent import monkey

monkey.patch_all(thread=True, subprocess=True)
