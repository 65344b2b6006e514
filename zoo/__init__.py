"""zoo: normalized recurrent networks and a Lightning framework to train, compare and publish them."""

__version__ = "0.1.0"
