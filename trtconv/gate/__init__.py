"""Statistics and verdicts of the accuracy gate, and the optional multiple-choice task."""
