"""The scheduler's sync core, no trio: sequences, admission, the step plan, prefix locks.

Between the actors (whose scheduler shell wraps it) and models/ (whose step data it fills).
"""
