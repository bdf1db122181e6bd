"""Adapters for training frameworks: thin layers over the framework-free Monitor."""
