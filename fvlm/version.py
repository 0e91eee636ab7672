"""The fvlm version (recorded in checkpoints, results and predictions); a module of its own so the
library can read it without importing the package root."""
__version__ = "0.1.0"
