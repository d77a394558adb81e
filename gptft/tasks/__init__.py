"""Tasks: what to load, which model to build, how to score it, and what a run leaves behind."""
