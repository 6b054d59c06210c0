"""What a model does: load, describe and merge it, one chat format, generation on two backends, training.

It imports only the run wing.
"""
