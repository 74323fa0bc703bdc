"""Log stores of the collector: one thin adapter per engine."""
