"""Training: a recipe planned once (plan), models and runtime (setup), one step (step), the
loop (loop), the run folder (rundir), a run's health (health) and its entry point (run)."""
