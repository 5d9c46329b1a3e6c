"""How well the factors separate anatomy from acquisition: the pieces of ``evaluate-disentanglement``."""
