"""Turning runs into answers: tidy tables and the comparison (compare), intervals and tests
(statistics), the results table and findings (results), every figure (plots), and the
worked example of each normalization (explain)."""
