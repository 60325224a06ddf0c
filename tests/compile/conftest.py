"""Fixtures for the compile tests: ``zoo_models`` (see :mod:`tests.compile.zoo`) for every module here."""

from tests.compile.zoo import zoo_models

__all__ = ["zoo_models"]
