"""The Hydra config tree of ``forge-train`` (composed by :mod:`forge_train.compose`)."""
