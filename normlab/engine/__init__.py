"""The training engine: what a user can name (registry) and a run's config (config), both
torch-free; the model (models), data as device tensors (data), one training step (step), the
epoch loop and evaluation (train), checkpoints, run RNG and signal handling. It knows nothing
of MLflow or plotting. Read it in that order; what exists only for speed is in engine/fast/,
each technique a switch of `Speedups`."""
