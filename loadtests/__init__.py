"""Load tests for ctr-serve: realistic /score traffic, A/B split checks and an SLO gate."""
