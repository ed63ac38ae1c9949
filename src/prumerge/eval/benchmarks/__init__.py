"""The built-in benchmarks, one loader a file, on the registry types of :mod:`.base`.

:mod:`prumerge.eval.datasets` imports every loader here (registering it) and looks
benchmarks up by name.
"""
