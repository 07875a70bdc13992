"""Train state, optimizer, compiled steps, checkpoints, metrics and the train loop."""
