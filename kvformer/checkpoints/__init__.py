"""Translate outside checkpoint formats into (ModelConfig, state_dict in kvformer's names)."""
