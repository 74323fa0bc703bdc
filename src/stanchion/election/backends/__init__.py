"""Election backends: one thin adapter per engine (loaded lazily by URL scheme)."""
