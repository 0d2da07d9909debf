"""forge-train: the Forge training pipeline."""
