"""Training: the loop and its steps, what trains (trainables/), checkpoints, export, the run folder, sharding,
validation, stage 1."""
