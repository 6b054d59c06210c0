"""What a run is: its config, where its files live, its stages, records, lock, failpoints, Oxen and metrics.

The ground floor: it imports nothing of the rest of the package.
"""
