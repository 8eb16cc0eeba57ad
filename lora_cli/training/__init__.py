"""Training: the recipe (options), the run's setup, the loop, the state a run resumes from, and the
data-parallel process group."""
