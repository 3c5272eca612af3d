"""The ttrv operator: kopf handlers (ttrv_operator.py, thin) over pure decisions (experiments.py, runs.py)."""
