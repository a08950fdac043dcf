"""The six-stage Ovis-U1 trainer (plus the two preparation steps) and its recipes."""
