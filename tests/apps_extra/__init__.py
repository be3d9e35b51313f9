"""Small helper applications and probes for test_sampling.py and test_metrics.py (run in subprocesses)."""
