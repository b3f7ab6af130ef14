"""Tables, plots and the paper's numbers, built from the tracking store or from scored videos.

Reports know nothing of torch: `table` imports only these and MLflow.
"""
