"""How answers get scores: the rubric and reading scores, the pairwise tournament, an external reward
model, and which of them judges (judges).

It imports only the run and model wings.
"""
