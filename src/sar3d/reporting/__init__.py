"""Tables, figures, statistics and cross-study comparison from the evaluation files and MLflow."""
