"""The pool's decisions, apart from its I/O: task states, the pending queue,
batch sizing, retries, crash attribution and the books.

Pure: no processes, pipes, threads or clocks of its own. A backend feeds the
`Scheduler` events and carries out the instructions it returns; the local
backend's wiring is drawn in `procqueue/_local/__init__.py`.
"""
