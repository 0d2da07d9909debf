"""Vision encoders (ViTs) and the projectors that connect them to a language model."""
