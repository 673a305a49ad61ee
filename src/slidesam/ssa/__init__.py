"""SSA: the Slide-SAM assisted network for multi-phase renal tumor CT (stage 2 and the pipeline)."""
