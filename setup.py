"""Only what pyproject.toml cannot say: the package list with one mapped
folder. The loop reference is the top-level folder ``reference/`` of this
repository and ships as the package ``kvcompress_reference`` (a name no other
project takes), beside ``kvcompress`` and its shipped property suite
``kvcompress.testing``."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["kvcompress", "kvcompress.*"]) + ["kvcompress_reference"],
      package_dir={"kvcompress_reference": "reference"})
