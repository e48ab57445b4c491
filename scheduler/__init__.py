"""Requests' state machine and batch policy. Pure Python: never imports torch."""
