"""Packaging entry point.

All metadata lives in ``setup.cfg``.  This file exists because the
``twisted/plugins`` directory must be listed as a package explicitly: it has
no ``__init__.py`` (Twisted skips plugin directories that are packages), so
``find_packages`` cannot see it.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["snet_daemon", "snet_daemon.*"]), "twisted.plugins"],
)
