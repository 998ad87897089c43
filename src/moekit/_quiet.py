"""Imported first by ``moekit/__init__.py``, before torch.

The CPU torch wheel does not bring numpy and moekit does not need it (a fresh
``pip install -e .`` has none), but ``import torch`` then warns "Failed to
initialize NumPy" on every command, which reads like the bug it no longer is.
"""

import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
