"""The synthetic forgetting lab (general skills vs an iGSM-like domain) that `nemo-anchored lab`
runs: settings.py, run.py (the runs), summary.py and report.py (results), tasks.py, base.py."""
