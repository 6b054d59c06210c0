"""What a person runs beside the loop: chat with a run's models, export one, inspect a run, compare reports.

A top floor: it imports any wing below it (run, model, judge, loop), never the stage runner.
"""
