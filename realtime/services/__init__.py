"""Upstream services: each takes the identity it acts for and builds its client from it."""
