"""Pictures for people: mask overlays, metric plots and the self-contained evaluation report (no Ray, no torch)."""
