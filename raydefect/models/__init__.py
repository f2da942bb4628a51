"""Backbones, the multi-task defect model, its losses and the self-contained model artifact (core: no Ray)."""
