"""`rlkd plan`: will a run fit, per GPU, before it is queued — from model configs alone (no weights)."""
