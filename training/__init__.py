"""Battery-cell inspection: data, models, training and evaluation."""
