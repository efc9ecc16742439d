"""Training on Ray Train: the stages, their examples, data parallelism, the run and the pseudo-label round."""
