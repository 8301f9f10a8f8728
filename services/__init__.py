"""Oakling."""
