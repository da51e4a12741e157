"""Tests of state/: codecs, the view store, the read client, batch reads."""
