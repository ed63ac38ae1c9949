"""Data that both training and evaluation read; nothing here imports a model or the harness.

- :mod:`prumerge.data.sample`: :class:`~prumerge.data.sample.Sample`, one question about one
  image, and LLaVA-1.5's answer instructions.
- :mod:`prumerge.data.easy_vqa`: the installed easy-vqa dataset, by split and by image.
- :mod:`prumerge.data.synth`: a seeded, generated benchmark of small coloured shapes (also
  training data, from its train split).
- :mod:`prumerge.data.llava_json`: LLaVA's instruction-tuning JSON (``image`` plus
  ``conversations`` with ``<image>``), for training a user's own LLaVA.
"""
