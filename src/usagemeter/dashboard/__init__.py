"""The dashboard page and its assets (package data)."""
