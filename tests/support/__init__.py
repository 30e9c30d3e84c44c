"""Helpers shared by the tests: a daemon in a subprocess, test services, ports."""
