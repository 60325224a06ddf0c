"""Examples for the README and the docs, runnable from the repository root (``python -m examples.make``
writes their data again). This folder is a package so that ``edgeml compile examples.regressor:make_net``
imports the regressor's factory from the repository root."""
