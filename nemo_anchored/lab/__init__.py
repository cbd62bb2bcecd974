"""`nemo-anchored lab`: a synthetic forgetting lab (general skills vs an iGSM-like domain)."""
