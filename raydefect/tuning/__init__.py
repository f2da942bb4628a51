"""Tuning without Ray: the search space (`space`) and the study folder (`study`); Ray Tune lives in pipelines.tune."""
