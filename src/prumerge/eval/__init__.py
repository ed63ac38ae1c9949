"""Evaluation: benchmarks, metrics, a generated benchmark and a resumable runner.

- :mod:`prumerge.eval.metrics`: VQA accuracy, POPE, MME, ScienceQA and exact match, computed
  the way the community's scripts compute them; :mod:`prumerge.eval.normalize`: EvalAI's
  answer normalisation that VQA accuracy and exact match compare after.
- :mod:`prumerge.eval.datasets`: benchmarks by name (lookup and loading); the loaders for
  LLaVA's data formats live in :mod:`prumerge.eval.benchmarks`, one a file.
- The generated benchmark and easy-vqa live in :mod:`prumerge.data`, which training reads too.
- :mod:`prumerge.eval.runner`: runs any :class:`~prumerge.eval.runner.Predictor` over a
  benchmark, resumably and data-parallel, and summarises the results.

Nothing here imports a model; the submodules are imported on demand.
"""
