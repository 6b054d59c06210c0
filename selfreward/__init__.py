"""Shared code for the self-rewarding pipeline: the stages in scripts/ import from here.

Five wings, each importing only those below it: run (config, layout, stages, records), model, judge, loop,
and on top tools (what a person runs beside the loop), stage.py (what every stage shares) and dryrun.py.
"""

__version__ = "0.1.0"
