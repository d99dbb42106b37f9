"""Hostile input against the running server: each case asserts the exact error, that the server
still serves, and that instances stored before are byte-identical afterwards."""
