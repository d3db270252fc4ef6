"""The HTTP routes, one router per concern: scoring, health and metrics, administration."""
