"""Shipped example feature definitions (card transactions) used by the embedded default."""
