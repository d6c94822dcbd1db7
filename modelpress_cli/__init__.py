"""`modelpress`: the command-line client of the ModelPress API.

It talks HTTP only (httpx): no torch, no app or worker imports. `jobspec` (pydantic, torch-free) is
used, when importable, to reject a bad spec file before anything is uploaded.
"""

__version__ = "0.1.0"
