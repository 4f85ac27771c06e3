"""Training of the project's own small block-diffusion model on synthetic long-context retrieval.

`training.tasks` generates the examples, `training.train` trains and saves a checkpoint,
`training.evaluate` measures exact-match accuracy through the runtime's engine.
"""
