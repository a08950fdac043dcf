"""The six-stage Ovis-U1 trainer (plus the preparation steps) and its recipes."""
