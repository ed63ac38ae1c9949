"""Training with visual-token reduction in the loop.

- :mod:`prumerge.train.config`: the options of a run and their checks.
- :mod:`prumerge.train.mixture`: the reductions drawn per step.
- :mod:`prumerge.train.packing`: question-answer turns into sequences and batches.
- :mod:`prumerge.train.items`: training items from easy-vqa, generated scenes or LLaVA JSON.
- :mod:`prumerge.train.modules`: the standardised projector and learned prompt embeddings.
- :mod:`prumerge.train.lora`: LoRA adapters through peft; merging them into the weights.
- :mod:`prumerge.train.loop`: the loop (learning-rate schedule, batch order, resume, steps).
- :mod:`prumerge.train.trainables`: the model a run trains, and what it trains in it.
- :mod:`prumerge.train.step`: one step's loss under one reduction.
- :mod:`prumerge.train.rundir`: the run directory (config, checkpoint, metrics), atomic writes.
- :mod:`prumerge.train.process`: the torchrun launch, the allocator, log lines.
- :mod:`prumerge.train.finish`: the end of a run: weights written, the shipped model evaluated.
- :mod:`prumerge.train.evaluate`: quick accuracy checks with shared prefixes.
- :mod:`prumerge.train.recipe`: the named recipe that rebuilds the shipped weights.
- :mod:`prumerge.train.install`: shipping a run's weights as a default-model variant.
"""
