"""The only layer that imports Ray: cluster connection, Ray Train, Ray Tune, Ray Data pipelines."""
