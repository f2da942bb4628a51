"""The training engine (core: plain PyTorch, no Ray).

`data` turns manifest rows into augmented tensors, `schedule` plans the three stages and their optimisers, `loop`
holds one data-parallel replica's training state (`Trainer`: train an epoch, validate, early stopping, checkpoint
state), `checkpoint` saves and loads that state, `run` writes a run folder (metrics.csv, plots, the exported model
and test metrics) and `fit` is the plain-PyTorch driver. `raydefect.pipelines.train` runs the same `Trainer` inside
Ray Train workers.
"""
