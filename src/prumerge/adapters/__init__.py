"""Adapters: the only code that knows model classes and layer indices."""
