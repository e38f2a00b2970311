"""seqshard: distributed long-context training."""
__version__ = "0.1.0"
