"""Scaling ladders: model sizes x FLOPs budgets, each with an MDM, an ARM and a block twin."""
