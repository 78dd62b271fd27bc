"""ModelPress: a model-compression service for PyTorch."""

__version__ = "0.4.0"
