"""What crosses a process boundary: messages, framing, pickling, shared-memory layouts.

Pure: nothing here starts a process or owns a descriptor. The processes that
speak it are drawn in `procqueue/_local/__init__.py`.
"""
