"""The method's steps that are not judging: new prompts, preference pairs, RAFT's selection, evaluation's
held-out split, head-to-head and drift, and Open Assistant's data.

It imports the run, model and judge wings.
"""
