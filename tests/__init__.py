"""The test suite (pytest); run it with scripts/test."""
