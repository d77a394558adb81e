"""Preference tuning by Direct Preference Optimization: ``config`` (the job) and ``task`` (training it)."""
