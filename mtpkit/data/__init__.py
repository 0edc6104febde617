"""Data: prompt sources, chat templating and loss masks, `collect`, and the hidden-state store."""
