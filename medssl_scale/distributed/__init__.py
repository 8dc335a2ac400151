"""Everything that knows about processes and collectives; the rest of the code asks this package."""
