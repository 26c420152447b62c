"""satpipe training and evaluation: shards -> loader -> SAT / PGD / TRADES training -> robustness reports."""
__version__ = "0.1.0"
