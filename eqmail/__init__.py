"""eqmail -- a small qmail-compatible mail transfer agent on gevent.

See README.md for the layout of the package and how to run it.
"""
__version__ = "0.1.0"
