"""Scaling ladders: model sizes x FLOPs budgets, each with an MDM and an ARM twin."""
