"""Training loops, shared run bookkeeping (results, checkpoints, timing) and task trainers."""
