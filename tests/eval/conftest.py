"""The model-backed evaluation tests share the suite's fixtures (tests/conftest.py):
``tiny_checkpoint``, ``one_thread`` and ``default_model_cache``."""
