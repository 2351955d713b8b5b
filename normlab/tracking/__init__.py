"""Everything that writes to MLflow: the store connection (connection), one training run's
record (run_log) and how it ended (run_ending), its life from start to ending (lifecycle)
with its lease and resume, a sweep's parent and children (sweep_records), reading runs back
for a comparison (run_query), and redaction of credentials from all of it."""

EXPERIMENT = "normlab"  # the experiment runs go to when no --experiment names one
