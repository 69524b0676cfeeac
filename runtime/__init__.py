"""tether's local interleaving engine: runs intervention bodies inside a model's forward pass.

No networking lives here: the client and server packages build on this engine, never the reverse. The
public names (`NNsight`, `save`, `local`, the errors) are the facade's, `tether/__init__.py`: import them
from `tether`; this package's modules are imported by their own names.
"""
