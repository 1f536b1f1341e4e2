"""Training: a recipe planned once (plan), models and runtime (setup), one step (step), the
loop (loop), on-policy steps (on_policy), where metrics go (tracking), the run folder (rundir),
a run's health (health), teacher correction (correct) and its entry point (run)."""
