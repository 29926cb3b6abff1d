"""Pipelines: stages of worker processes with bounded room between them.

`stage.py` is what a user writes (`Stage`), `pipeline.py` the stages' pools
(`Pipeline`), `flow.py` one map in motion (its threads, drawn there), and
`routes.py` the plain bookkeeping of where each item is.
"""
