"""longtune.train: the recipe, model building, rope extension, the training loop, checkpoints,
export and evaluation. `python -m longtune.train RECIPE` is the entry for launchers."""
