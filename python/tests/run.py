#!/usr/bin/env python3
"""Runs the Python package's tests (CTest's PythonPackage test). Exits 77 (CTest: skipped) with a
message when torch is missing; CCA_LIBRARY names the library to test (CTest sets it)."""
import os
import sys
import unittest

try:
    import torch  # noqa: F401
except ImportError:
    print("skipping the Python package tests: torch is not installed "
          "(Debian: apt-get install python3-torch python3-numpy, or scripts/setup.sh)")
    sys.exit(77)

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(here), here]
suite = unittest.defaultTestLoader.discover(here, top_level_dir=here)
result = unittest.TextTestRunner(verbosity=2).run(suite)
sys.exit(0 if result.wasSuccessful() else 1)
