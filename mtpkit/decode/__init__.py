"""Speculative decoding with trained heads, acceptance metrics and `mtpkit eval`."""
