"""The recommendation API (serving.app) and what it serves with."""
