from setuptools import setup

# Configuration lives in pyproject.toml; this shim serves tools that still call setup.py.
setup()
